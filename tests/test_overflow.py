"""Finite inputs that would overflow: an absurd alpha, strength or block value fails where it enters, naming the
value, the LoRA and the module; a stack whose result would not fit an fp16 weight is refused before anything is
patched; MODEL/CLIP stay untouched."""
from __future__ import annotations

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import lora_writers as lw
from tests import tiny_models as tm

comfy = import_comfy()
from lora_core import blocks  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.engine import PatchEngine, WeightPatch  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.types import ModuleLora  # noqa: E402

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def host():
    model, clip = tm.comfy_sd15(), tm.comfy_clip_sd15()
    clip.cond_stage_model.to(torch.float16)   # fp16 text encoder, as ComfyUI runs CLIP on a GPU
    return model, clip


def te_lora(clip, alpha=4.0, scale=0.1) -> dict:
    layer = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj
    gen = torch.Generator().manual_seed(0)
    return {f"{TE_Q}.lora_down.weight": scale * torch.randn(4, layer.in_features, generator=gen),
            f"{TE_Q}.lora_up.weight": scale * torch.randn(layer.out_features, 4, generator=gen),
            f"{TE_Q}.alpha": torch.tensor(alpha)}


def snapshot(model, clip):
    return ({k: v.clone() for k, v in model.model.state_dict().items()},
            {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()})


def untouched(before, model, clip):
    for old, module in zip(before, (model.model, clip.cond_stage_model)):
        assert all(torch.equal(v, old[k]) for k, v in module.state_dict().items())


def test_huge_alpha_on_fp16_clip_is_refused_naming_the_file_and_module(host, tmp_path):
    model, clip = host
    lw.save_safetensors(te_lora(clip, alpha=1e38), tmp_path / "huge_alpha.safetensors")
    before = snapshot(model, clip)
    with loras_folder(tmp_path):
        with pytest.raises(LoraValueError) as caught:
            node_module("loader").LoRACoreLoader().load(model, "huge_alpha.safetensors", 1.0, 1.0, clip=clip)
    message = str(caught.value)
    assert "overflow" in message and TE_Q in message and "huge_alpha.safetensors" in message and "float16" in message
    untouched(before, model, clip)


def test_strength_inside_the_widget_range_that_overflows_fp16_is_refused(host, tmp_path):
    model, clip = host
    lw.save_safetensors(te_lora(clip, scale=40.0), tmp_path / "loud.safetensors")
    with loras_folder(tmp_path):
        loader = node_module("loader").LoRACoreLoader()
        loader.load(model, "loud.safetensors", 1.0, 1.0, clip=clip)              # fits at strength 1
        with pytest.raises(LoraValueError, match="would overflow its float16 weight"):
            loader.load(model, "loud.safetensors", 1.0, 100.0, clip=clip)        # 100x does not


def test_absurd_stack_strength_and_block_value_fail_where_they_enter(host, tmp_path):
    model, clip = host
    lw.save_safetensors(te_lora(clip), tmp_path / "ok.safetensors")
    with loras_folder(tmp_path):
        with pytest.raises(LoraValueError, match=r"strength_clip is 1e\+30, out of range"):
            node_module("loader").LoRACoreApplyStack().apply(model, [("ok.safetensors", 1.0, 1e30)], clip)
    with pytest.raises(LoraValueError, match=r"factor 1e\+39 for IN04.*out of range"):
        blocks.resolve_vector("sd1", "named", "IN04=1e39")
    with pytest.raises(LoraValueError, match="out of range"):
        blocks.resolve_vector("sd1", "a1111", ",".join(["1"] * 16 + ["1e39"]))
    with pytest.raises(LoraValueError, match="variable A"):
        blocks.resolve_vector("sd1", "named", "*=A", A=1e39)


def test_engine_refuses_an_overflowing_plan_and_changes_nothing():
    weight = torch.nn.Parameter(torch.randn(8, 8).half(), requires_grad=False)
    big = ModuleLora("big", "lora", {"up": torch.full((8, 2), 300.0), "down": torch.full((2, 8), 300.0)}, alpha=2.0,
                     source="big.safetensors")
    small = ModuleLora("small", "lora", {"up": torch.randn(8, 2) * 0.1, "down": torch.randn(2, 8) * 0.1}, alpha=2.0)
    other = torch.nn.Parameter(torch.randn(8, 8).half(), requires_grad=False)
    engine = PatchEngine({"w": weight, "o": other})
    before = (weight.clone(), other.clone())
    with pytest.raises(LoraValueError, match=r"patching w would overflow.*big \(big.safetensors\)"):
        engine.apply({"o": [WeightPatch(small, 1.0)], "w": [WeightPatch(big, 1.0)]})
    assert torch.equal(weight, before[0]) and torch.equal(other, before[1]) and engine.patched_keys == set()
