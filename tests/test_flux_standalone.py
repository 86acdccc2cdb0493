"""Standalone lora_core on diffusers' own FluxTransformer2DModel (no ComfyUI): `LoraPatcher(transformer=...)`
equals diffusers' `FluxLoraLoaderMixin.load_lora_weights` + `fuse_lora` for the files diffusers reads on any model
size (its own PEFT format), at several strengths; re-applying at another strength and `restore()` stay exact.

kohya's fused names (`img_attn.qkv`, `linear1`) diffusers converts only at full size (its converter hard-codes
3072-wide blocks), so on the tiny twin the reference for a kohya file is ComfyUI core: the same base weights in
ComfyUI's fused layout, core's own loader, and core's own Flux <-> diffusers map (`comfy.utils.flux_to_diffusers`)
to slice the patched fused weights back into diffusers' split ones."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin

from lora_core.api import LoraPatcher, LoraRequest
from lora_core.io import read_lora_file
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests.pack import diffusers_fuse_reference


def diffusers_reference(path, transformer, scale):
    # no text-encoder part in these files
    return diffusers_fuse_reference(FluxLoraLoaderMixin, path, transformer, scale, text_encoder=None)


@pytest.fixture(scope="module")
def twin():
    return dw.diffusers_flux_twin()


@pytest.fixture(scope="module")
def kohya_named(twin):
    """A kohya Flux file written for the ComfyUI model of the same shapes (fused qkv / linear1 names)."""
    from tests import tiny_models as tm

    comfy_model = tm.comfy_flux()
    return dw.kohya_flux(comfy_model, seed=3)


def _files(twin, kohya_named, tmp_path):
    peft, _ = dw.peft_flux(twin, seed=2, targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                  "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                                  "proj_mlp", "proj_out"))
    lw.save_safetensors(peft, tmp_path / "peft.safetensors")
    lw.save_safetensors(kohya_named, tmp_path / "kohya.safetensors")
    return {"peft": tmp_path / "peft.safetensors", "kohya": tmp_path / "kohya.safetensors"}


def core_reference(path, scale):
    """(diffusers twin carrying the ComfyUI model's base weights, twin state dict after core's loader)."""
    from tests.comfy_host import import_comfy

    comfy = import_comfy()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from tests import tiny_models as tm

    model = tm.comfy_flux()
    table = comfy.utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")

    def to_diffusers(state):
        out = {}
        for dif, target in table.items():
            if isinstance(target, str):
                if target in state:
                    out[dif] = state[target]
            elif target[0] in state:
                weight = state[target[0]]
                out[dif] = weight.narrow(*target[1]) if target[1] is not None else target[2](weight)
        return out

    twin = dw.diffusers_flux_twin()
    base = to_diffusers(model.model.state_dict())
    twin.load_state_dict({**twin.state_dict(), **base})
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path), scale, 0.0)
    mm.load_models_gpu([patched], force_full_load=True)
    after = {k: v.clone() for k, v in to_diffusers(patched.model.state_dict()).items()}
    mm.unload_all_models()
    return twin, {**twin.state_dict(), **after}


@pytest.mark.parametrize("source", ["peft", "kohya"])
@pytest.mark.parametrize("scale", [1.0, -0.6])
def test_lora_patcher_on_flux_equals_reference(twin, kohya_named, tmp_path, source, scale):
    path = str(_files(twin, kohya_named, tmp_path)[source])
    if source == "peft":
        reference = diffusers_reference(path, twin, scale)
    else:
        twin, reference = core_reference(path, scale)
        reference = {k: v.clone() for k, v in reference.items()}
    ours = copy.deepcopy(twin)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    patcher = LoraPatcher(transformer=ours)
    plan = patcher.apply([LoraRequest(read_lora_file(path), scale, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    changed = 0
    for key in reference:
        delta = (reference[key] - base[key]).abs().max().item()
        error = (state[key] - reference[key]).abs().max().item()
        assert error <= 1e-5 * delta + 2 * torch.finfo(torch.float32).eps * reference[key].abs().max().item(), key
        changed += delta > 0
    assert changed > 20
    if source == "kohya":   # a fused kohya qkv lands on the three split diffusers weights
        assert any(".attn.to_k." in k for k in plan.patches) and any(".proj_mlp." in k for k in plan.patches)
    patcher.apply([LoraRequest(read_lora_file(path), 0.3, 0.0)])
    patcher.restore()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())
