"""Block info, sweep and grid on a DiT (tiny Flux in the real host), and grid labels that stay readable on
small tiles."""
from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_models as tm

comfy = import_comfy()


@pytest.fixture(scope="module")
def flux():
    return tm.comfy_flux(depth=2, depth_single=3)


@pytest.fixture()
def lora(flux, tmp_path):
    state = dw.kohya_flux(flux, seed=1)
    state.update(dw.comfy_native(flux, seed=2, layers=dw.linear_layers(flux.model.diffusion_model, include=("img_in",))))
    lw.save_safetensors(state, tmp_path / "flux_tool.safetensors")
    with loras_folder(tmp_path):
        yield "flux_tool.safetensors"


def test_block_info_on_flux_with_and_without_model(flux, lora):
    tools = node_module("block_tools")
    text, chart = tools.LoRACoreBlockInfo().inspect(lora, "auto", model=flux)
    assert "Flux.1 [dev]" in text and "DB00" in text and "SB02" in text and "IN" in text
    assert chart.ndim == 4 and chart.shape[-1] == 3
    layout_text, _ = tools.LoRACoreBlockInfo().inspect(lora, "auto")   # full-size Flux layout from the keys
    assert "layout only" in layout_text and "SB02" in layout_text
    info = tools.block_info(lora, "auto", model=flux)
    assert list(info["blocks"]) == ["IN", "DB00", "DB01", "SB00", "SB01", "SB02"]
    assert all(entry["norm"] > 0 for entry in info["blocks"].values())


def test_block_sweep_on_flux(flux, lora):
    tools = node_module("block_tools")
    models, labels = tools.LoRACoreBlockSweep().sweep(flux, lora, 1.0, "blocks", 1.0, 0.0, "named", "", 0, 1.0, 1.0)
    assert [label.split()[0] for label in labels[1:]] == ["IN", "DB00", "DB01", "SB00", "SB01", "SB02"]
    full = set(models[0].patches)
    knocked = set(models[2].patches)   # DB00 off
    assert knocked == {k for k in full if ".double_blocks.0." not in k} and knocked != full
    models, labels = tools.LoRACoreBlockSweep().sweep(flux, lora, 1.0, "vectors", 1.0, 0.0, "named",
                                                      "SB*=0\nDB*.img_attn=0", 0, 1.0, 1.0)
    assert labels[1:] == ["SB*=0", "DB*.img_attn=0"]
    assert not any(".single_blocks." in k for k in models[1].patches)


def test_grid_labels_stay_readable_on_small_tiles():
    """A 64 px tile with a long label: the label band grows to hold the wrapped text at a fixed font size; every
    line fits the tile."""
    tools = node_module("block_tools")
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 64, 64, 3, generator=gen) for _ in range(3)]
    labels = ["baseline: all blocks 1", "SB00-SB37.linear1_mlp=0 (others 1)", "DB00 0 (others 1)"]
    grid, summary = tools.grid_image(images, labels, columns=3, heatmap=False)
    _, height, width, _ = grid.shape
    assert width == 3 * 64 and height > 64 + 28   # a band taller than one line: the long label wrapped
    font = tools._font(tools.LABEL_FONT_PX)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for label in labels:
        lines = tools._wrap(label + " | d 99.99% | >0.05: 99.9%", 60, font, draw)
        assert all(draw.textlength(line, font=font) <= 60 for line in lines) and len(lines) > 1
    big, _ = tools.grid_image([torch.rand(1, 512, 512, 3, generator=gen)] * 2, labels[:2], heatmap=False)
    assert big.shape[1] < 512 + 40   # large tiles keep a one-line band
