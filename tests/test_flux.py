"""Flux.1 and Chroma end to end in the real host: every writer's file loads, equals core's loader where core
reads it (1e-5 of the delta, at 1.0 and -0.6, same patched keys), and equals core on a renamed copy where core
cannot read the original; fused weights (qkv, linear1) get one patch per weight; text encoders apply where the
CLIP holds them; a LoRA for another family or size is refused with both names.
"""
from __future__ import annotations

import logging

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core.errors import LoraMatchError  # noqa: E402

STRENGTHS = (1.0, -0.6)


@pytest.fixture(scope="module")
def flux():
    return tm.comfy_flux(), tm.comfy_clip_flux()


@pytest.fixture(scope="module")
def chroma():
    return tm.comfy_chroma(), tm.comfy_clip_chroma()


@pytest.fixture(scope="module")
def twin():
    return dw.diffusers_flux_twin()


def bake(patcher) -> dict:
    """The patched tensors after ComfyUI loads `patcher`. ModelPatcher.load never writes a patch on a parameter of a
    non-leaf module (Wan's `modulation`, Z-Image's pad tokens, SD3's `pos_embed`: nodes/_params.py); our loader
    adds a callback that does. On a patcher without it (core's loader), such a tensor is what core's own patch math
    (`comfy.lora.calculate_weight` on the patches core registered) makes of it: the truth we compare with."""
    import comfy.lora
    import comfy.patcher_extension

    params = node_module("_params")
    mm.load_models_gpu([patcher], force_full_load=True)
    state = {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k in patcher.patches}
    mm.unload_all_models()
    ours = patcher.callbacks.get(comfy.patcher_extension.CallbacksMP.ON_LOAD, {}).get(params.CALLBACK_KEY)
    if not ours:
        for key in params.non_leaf_params(patcher.model, list(state)):
            state[key] = comfy.lora.calculate_weight(patcher.patches[key], state[key].float(), key).to(state[key].dtype)
    return state


EPS = torch.finfo(torch.float32).eps


def assert_same(ours: dict, core: dict, base: dict, what: str) -> None:
    """Same patched keys; every weight within 1e-5 of its delta's magnitude, plus the one-ulp rounding of the
    stored fp32 weight itself (two correctly rounded sums of the same value can differ by that much)."""
    assert ours.keys() == core.keys(), f"{what}: patched keys differ: {sorted(ours.keys() ^ core.keys())[:6]}"
    changed = 0
    for key in core:
        delta = (core[key] - base[key]).abs().max().item()
        error = (ours[key] - core[key]).abs().max().item()
        floor = 2 * EPS * core[key].abs().max().item()
        assert error <= 1e-5 * delta + floor, f"{what}: {key}: error {error:.3g} vs delta {delta:.3g}"
        changed += delta > 0
    assert changed, f"{what}: the LoRA changed no weight, so the comparison proves nothing"



def assert_merged_file_equals_stack(model, clip, merged: dict, ours, ours_clip, stacked, stacked_clip) -> None:
    """A merged file (`merged`, already loaded by our loader as `ours` / `ours_clip`) gives, in our loader and in
    core's (`load_lora_for_models` at 1.0), the weights of the stack it was merged from (`stacked` /
    `stacked_clip`), on the MODEL and the CLIP."""
    core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, merged, 1.0, 1.0)
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    want, want_clip = bake(stacked), bake(stacked_clip.patcher)
    assert_same(bake(ours), want, base, "merged file in our loader")
    assert_same(bake(core_model), want, base, "merged file in core's loader")
    assert_same(bake(ours_clip.patcher), want_clip, base_clip, "merged CLIP in our loader")
    assert_same(bake(core_clip.patcher), want_clip, base_clip, "merged CLIP in core's loader")

def core_load(model, clip, state, strength, caplog):
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        out = comfy.sd.load_lora_for_models(model, clip, state, strength, strength)
        not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not_loaded == [], f"core left keys unloaded: not a fair comparison: {not_loaded[:3]}"
    return out


def compare(host, tmp_path, caplog, state, core_state=None, with_clip=False, expect_unmatched=False):
    """Our loader on `state` vs core's on `core_state` (the same tensors under names core reads; default the
    same file), at every strength."""
    model, clip = host
    lw.save_safetensors(state, tmp_path / "lora.safetensors")
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    loader = node_module("loader")
    reports = []
    with loras_folder(tmp_path):
        for strength in STRENGTHS:
            core_model, core_clip = core_load(model, clip if with_clip else None, core_state or state, strength, caplog)
            if with_clip:
                ours, our_clip, report = loader.LoRACoreLoader().load(model, "lora.safetensors", strength, strength,
                                                                      clip=clip)
            else:
                ours, report = loader.LoRACoreLoaderModelOnly().load(model, "lora.safetensors", strength)
            if not expect_unmatched:
                assert "unmatched" not in report and "WARNING" not in report, report
            assert all(len(p) == 1 for p in ours.patches.values()), "one patch per weight, fused parts included"
            assert_same(bake(ours), bake(core_model), base, f"MODEL@{strength}")
            if with_clip:
                assert_same(bake(our_clip.patcher), bake(core_clip.patcher), base_clip, f"CLIP@{strength}")
            reports.append(report)
    assert all(torch.equal(v, base[k]) for k, v in model.model.state_dict().items())
    return reports


# ------------------------------------------------------------------------------------- writers core reads

def test_kohya_and_musubi_names(flux, tmp_path, caplog):
    model, clip = flux
    state = dw.kohya_flux(model, seed=1)
    state.update(dw.kohya_text_encoders(clip, {"clip_l": "lora_te1", "t5xxl": "lora_te3"}, seed=2))
    reports = compare(flux, tmp_path, caplog, state, with_clip=True)
    assert "Flux.1 [dev]" in reports[0] and "te2" in reports[0] and "te1" in reports[0]


def test_comfy_native_names_every_linear(flux, tmp_path, caplog):
    model, _ = flux
    compare(flux, tmp_path, caplog, dw.comfy_native(model, seed=3))
    compare(flux, tmp_path, caplog, dw.comfy_native(model, seed=4, peft_suffixes=True))


def test_full_diffs_with_bias(flux, tmp_path, caplog):
    model, _ = flux
    compare(flux, tmp_path, caplog, dw.full_diffs(model, seed=5))


def test_diffusers_peft_file_sliced_into_fused_weights(flux, twin, tmp_path, caplog):
    """PEFT on diffusers' FluxTransformer2DModel (what diffusers / ai-toolkit / SimpleTuner save): to_q/to_k/
    to_v/proj_mlp land on rows of the fused qkv and linear1, norm_out.linear swaps its halves."""
    state, _ = dw.peft_flux(twin, seed=6)
    assert any(".single_transformer_blocks.0.proj_mlp.lora_A" in k for k in state)
    compare(flux, tmp_path, caplog, state)
    model, _ = flux
    with loras_folder(tmp_path):
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
    assert len(ours.patches) < len([k for k in state if "lora_A" in k]), "parts of a fused weight are one patch"


def test_onetrainer_and_simpletuner_lycoris_names(flux, twin, tmp_path, caplog):
    compare(flux, tmp_path, caplog, dw.onetrainer_flux(twin, seed=7))
    state = lw.lycoris_state_dict(twin, "lokr", prefix="lycoris", rank=4, alpha=2.0, seed=8, target_module=("Linear",))
    state = {k: v for k, v in state.items() if "norm" not in k.split(".")[0] or "linear" in k.split(".")[0]}
    compare(flux, tmp_path, caplog, state)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_lycoris_inside_kohya_on_the_comfy_model(flux, tmp_path, caplog, algo):
    model, _ = flux
    blocks = torch.nn.ModuleDict({"double_blocks": model.model.diffusion_model.double_blocks,
                                  "single_blocks": model.model.diffusion_model.single_blocks})
    state = lw.lycoris_state_dict(blocks, algo, prefix="lora_unet", rank=4, alpha=2.0, seed=9,
                                  target_module=("Linear",))
    compare(flux, tmp_path, caplog, state)


# ------------------------------------------------------------------------------------- writers core misreads

def test_xlabs_partial_files_load_where_core_drops_them(flux, tmp_path, caplog):
    """x-flux trains some blocks only; core converts XLabs files only when double block 18 and single block 37
    are present, so it drops these. The truth: core on the same tensors under its own names."""
    model, _ = flux
    state = dw.xlabs_flux(model, seed=10, double=[1], single=[0, 2])
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        comfy.sd.load_lora_for_models(model, None, state, 1.0, 0.0)
        assert any("not loaded" in r.getMessage() for r in caplog.records), "core is expected to drop this file"
    compare(flux, tmp_path, caplog, state, core_state=dw.xlabs_to_comfy(state))


def test_bare_and_peft_prefixed_names(flux, twin, tmp_path, caplog):
    """Bare BFL names, bare diffusers names and `base_model.model.` PEFT names: core maps none of them."""
    model, _ = flux
    native = dw.comfy_native(model, seed=11, prefix="")
    compare(flux, tmp_path, caplog, native, core_state=dw.rename_prefix(
        {("diffusion_model." + k): v for k, v in native.items()}, "", ""))
    state, _ = dw.peft_flux(twin, seed=12)
    for prefix in ("", "base_model.model."):
        renamed = dw.rename_prefix(state, "transformer.", prefix)
        compare(flux, tmp_path, caplog, renamed, core_state=state)


# ------------------------------------------------------------------------------------- Chroma

def test_chroma_native_and_diffusers_names(chroma, tmp_path, caplog):
    model, clip = chroma
    state = dw.comfy_native(model, seed=13)
    assert any("distilled_guidance_layer" in k for k in state)
    compare(chroma, tmp_path, caplog, state)
    # Chroma's text encoder is T5 alone: te1, kohya `lora_te1_` as ComfyUI maps it
    te = dw.kohya_text_encoders(clip, {"t5xxl": "lora_te1"}, seed=14)
    reports = compare(chroma, tmp_path, caplog, {**dw.kohya_flux(model, seed=15), **te}, with_clip=True)
    assert "Chroma" in reports[0] and "te1" in reports[0]


def test_flux_lora_with_modulation_on_chroma_applies_the_rest_and_says_why(chroma, flux, tmp_path):
    """A Flux.1 LoRA that trained the per-block modulation: Chroma has none; the rest applies, the report says so."""
    flux_model, _ = flux
    state = dw.kohya_flux(flux_model, seed=16)
    lw.save_safetensors(state, tmp_path / "flux_on_chroma.safetensors")
    model, _ = chroma
    with loras_folder(tmp_path):
        _, report = node_module("loader").LoRACoreLoaderModelOnly().load(model, "flux_on_chroma.safetensors", 1.0)
    assert "no per-block modulation" in report and "WARNING" in report


# ------------------------------------------------------------------------------------- fit and mismatch

def test_lora_for_another_family_or_size_is_refused_naming_both(flux, tmp_path):
    model, _ = flux
    sd_model = tm.comfy_sd15()
    sd_lora = lw.kohya_state_dict(lw.unet_targets(sd_model.model.diffusion_model), "lora_unet", seed=1)
    lw.save_safetensors(sd_lora, tmp_path / "sd15.safetensors")
    lw.save_safetensors(dw.kohya_flux(model, seed=2), tmp_path / "flux.safetensors")
    bigger = tm.comfy_flux(hidden=96, heads=3)
    lw.save_safetensors(dw.kohya_flux(bigger, seed=3), tmp_path / "flux_wide.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    with loras_folder(tmp_path):
        with pytest.raises(LoraMatchError) as caught:
            loader.load(model, "sd15.safetensors", 1.0)
        assert "Stable Diffusion" in str(caught.value) and "Flux.1 [dev]" in str(caught.value)
        with pytest.raises(LoraMatchError) as caught:
            loader.load(sd_model, "flux.safetensors", 1.0)
        assert "Flux" in str(caught.value) and "Stable Diffusion 1.x" in str(caught.value)
        with pytest.raises(LoraMatchError, match="does not fit"):
            loader.load(model, "flux_wide.safetensors", 1.0)
