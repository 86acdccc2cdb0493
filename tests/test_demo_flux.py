"""The demo's tiny Flux assets (demo/tiny_flux.py) are what its docstring says, checked in-process with ComfyUI's
own detection and VAE class and with lora_core's reader. Running them through core's loaders, our nodes and the
frontend is test_e2e_server.py's and test_browser.py's job (workflows/07_flux_block_weights.json)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.comfy_host import import_comfy

comfy = import_comfy()
import comfy.model_detection  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

from demo import DEMO_MODELS  # noqa: E402
from demo import tiny_flux  # noqa: E402
from lora_core.arch import FLUX_DEV  # noqa: E402
from lora_core.arch.registry import arch_of_metadata, detect_lora  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402

FLUX_PARAMETERS = 535_324_480  # the docstring's 535.3 M
CLIP_L_PARAMETERS = 123_650_304  # 123.7 M: the real CLIP-L text model and its projection


@pytest.fixture(scope="module")
def assets() -> dict[str, Path]:
    # The same cached folder as the end-to-end tests (built once, reused while ASSET_VERSION matches).
    return tiny_flux.ensure_flux_models(Path(os.environ.get("LORA_CORE_E2E_MODELS", DEMO_MODELS)))


def test_comfy_detects_the_tiny_flux_as_flux_dev_with_768_wide_text_input(assets):
    state = comfy.utils.load_torch_file(str(assets["flux"]))
    config = comfy.model_detection.detect_unet_config(state, "")
    assert config == tiny_flux.tiny_flux_config()
    assert config["hidden_size"] == 3072 and config["depth"] == 1 and config["depth_single_blocks"] == 1
    assert config["context_in_dim"] == config["vec_in_dim"] == 768 and config["guidance_embed"] is True
    assert type(comfy.model_detection.model_config_from_unet_config(config, state)) is comfy.supported_models.Flux
    assert {k: tuple(v.shape) for k, v in state.items()} == tiny_flux.flux_layout()
    assert {v.dtype for v in state.values()} == {torch.float8_e4m3fn}
    assert sum(v.numel() for v in state.values()) == FLUX_PARAMETERS
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_clip_l_file_is_a_plain_clip_l_for_clip_loader(assets):
    state = comfy.utils.load_torch_file(str(assets["clip_l"]))
    assert comfy.sd.detect_te_model(state) == comfy.sd.TEModel.CLIP_L
    assert {k: tuple(v.shape) for k, v in state.items()} == tiny_flux.clip_l_layout()
    assert sum(v.numel() for v in state.values()) == CLIP_L_PARAMETERS


def test_taef1_files_make_a_16_channel_vae_that_decodes_flux_latents(assets):
    """What core's VAELoader does for `taef1`: both files under taesd_encoder./taesd_decoder. plus Flux's scale."""
    state = {}
    for part in ("encoder", "decoder"):
        for key, value in comfy.utils.load_torch_file(str(assets[f"taef1_{part}"])).items():
            state[f"taesd_{part}.{key}"] = value
    state.update(vae_scale=torch.tensor(0.3611), vae_shift=torch.tensor(0.1159))
    vae = comfy.sd.VAE(sd=state)
    assert vae.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("name", ["lora_flux_character", "lora_flux_style"])
def test_flux_loras_are_kohya_flux_files_that_fit_the_tiny_flux(assets, name):
    lora = read_lora_file(assets[name])
    assert lora.metadata["ss_base_model_version"] == "flux1"
    assert lora.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert arch_of_metadata(lora.metadata) is FLUX_DEV and detect_lora(lora) is FLUX_DEV
    targets = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): v for k, v in tiny_flux.flux_layout().items()}
    targets.update({"lora_te1_" + k[:-len(".weight")].replace(".", "_"): v
                    for k, v in tiny_flux.clip_l_layout().items()})
    modules = {key.split(".")[0] for key in lora.tensors}
    for module in modules:
        out_features, in_features = targets[module]
        rank = lora.tensors[f"{module}.lora_down.weight"].shape[0]
        assert lora.tensors[f"{module}.lora_down.weight"].shape == (rank, in_features), module
        assert lora.tensors[f"{module}.lora_up.weight"].shape == (out_features, rank), module
    # Every Linear of both blocks, as kohya trains a Flux LoRA by default (block vectors then choose).
    blocks = {m for m in modules if m.startswith("lora_unet_")}
    assert blocks == {"lora_unet_" + p.replace(".", "_") for p in tiny_flux.flux_block_targets()}
    assert any(m.startswith("lora_unet_double_blocks_0_") for m in blocks)
    assert any(m.startswith("lora_unet_single_blocks_0_") for m in blocks)
    assert any(m.startswith("lora_te1_") for m in modules) == (name == "lora_flux_character")


def _tensor_bytes(path: Path) -> bytes:
    """A safetensors file's data section (its JSON header's key order is not fixed by the writer)."""
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_same_seed_gives_the_same_tensors_and_another_seed_other_weights(tmp_path):
    """The fill rule every tiny Flux file goes through (shown on TAEF1, the small one): seeded and key-ordered."""
    first = tiny_flux.make_taef1(tmp_path / "a", seed=5)
    again = tiny_flux.make_taef1(tmp_path / "b", seed=5)
    other = tiny_flux.make_taef1(tmp_path / "c", seed=6)
    for a, b, c in zip(first, again, other):
        assert _tensor_bytes(a) == _tensor_bytes(b)
        assert _metadata(a) == _metadata(b)
        assert _tensor_bytes(a) != _tensor_bytes(c)
