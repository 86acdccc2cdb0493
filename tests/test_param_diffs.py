"""Full diffs on parameters of the model itself (not a module's weight): Z-Image's `x_pad_token` / `cap_pad_token`
and SD3's position table `pos_embed`, in the real host (ComfyUI 0.3.75, tiny models from its own classes).

Core's generic map (comfy/lora.py `model_lora_keys_unet`) names every state-dict tensor that is not a `.weight`
by its full key (`key_map["diffusion_model.x_pad_token"] = "diffusion_model.x_pad_token"`), and `load_lora` reads a
`<name>.diff` for every mapped name (weight_adapter/lora.py... `diff` is `comfy.lora`'s "diff" patch: the tensor is
added times the strength). So a lightx2v-style full diff `diffusion_model.x_pad_token.diff` is applied by core;
we apply it the same way. A bare (`x_pad_token.diff`, DiffSynth-style) or diffusers-prefixed (`transformer.
x_pad_token.diff`) name core does not map: the truth is core on the same tensors under `diffusion_model.`.
A merge keeps such a diff under ComfyUI's full key (the one name core reads).
"""
from __future__ import annotations

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import core_drops, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_lumina as tl
from tests import tiny_sd3 as ts
from tests.test_flux import assert_same, bake, compare

comfy = import_comfy()
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


@pytest.fixture(scope="module")
def zimage():
    return tl.comfy_z_image(), None


@pytest.fixture(scope="module")
def sd3():
    return ts.comfy_sd3("medium"), None


class _NoClip:
    """compare() clones a CLIP's state even for model-only loads."""

    class cond_stage_model:   # noqa: N801
        @staticmethod
        def state_dict():
            return {}


def _diffs(model, names, prefix="diffusion_model.", seed=0) -> dict:
    sd = model.model.diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {f"{prefix}{n}.diff": 0.05 * torch.randn(sd[n].shape, generator=gen) for n in names}


def _with_lora(model, state, seed) -> dict:
    """A few ordinary LoRA modules next to the parameter diffs (the file lightx2v ships has both)."""
    layers = dw.linear_layers(model.model.diffusion_model)
    some = dict(list(layers.items())[:4])
    return {**dw.comfy_native(model, seed=seed, layers=some), **state}


PAD = ("x_pad_token", "cap_pad_token")


def test_z_image_pad_token_diffs_equal_core(zimage, tmp_path, caplog):
    model, _ = zimage
    state = _with_lora(model, _diffs(model, PAD, seed=1), seed=2)
    assert not core_drops(model, None, state), "core reads `diffusion_model.x_pad_token.diff`"
    reports = compare((model, _NoClip), tmp_path, caplog, state)
    assert "unmatched" not in reports[0]
    with loras_folder(tmp_path):
        ours, _ = node_module("loader").LoRACoreLoaderModelOnly().load(model, "lora.safetensors", 1.0)
    assert {"diffusion_model.x_pad_token", "diffusion_model.cap_pad_token"} <= set(ours.patches)
    # the callback writes them for real (bake() computes core's math only on patchers without it), and the
    # unpatch restores them
    import comfy.model_management as mm

    before = model.model.diffusion_model.x_pad_token.detach().clone()
    mm.load_models_gpu([ours], force_full_load=True)
    want = before + state["diffusion_model.x_pad_token.diff"]
    assert torch.allclose(ours.model.diffusion_model.x_pad_token.detach(), want, atol=1e-6)
    mm.unload_all_models()
    assert torch.equal(model.model.diffusion_model.x_pad_token.detach(), before)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_z_image_pad_token_diffs_core_cannot_read_equal_core_renamed(zimage, tmp_path, caplog, prefix):
    model, _ = zimage
    state = _diffs(model, PAD, prefix=prefix, seed=3)
    assert core_drops(model, None, state), "core reads this file: nothing to prove"
    truth = {"diffusion_model." + k[len(prefix):]: v for k, v in state.items()}
    compare((model, _NoClip), tmp_path, caplog, state, core_state=truth)


def test_sd3_pos_embed_diff_equals_core(sd3, tmp_path, caplog):
    model, _ = sd3
    state = _with_lora(model, _diffs(model, ("pos_embed",), seed=4), seed=5)
    assert not core_drops(model, None, state)
    compare((model, _NoClip), tmp_path, caplog, state)
    key_map = node_module("_host").HostModels(model, None).key_map
    target = key_map.resolve("diffusion_model.pos_embed")
    assert target.host_key == "diffusion_model.pos_embed" and target.block == "IN" and target.kind == "pos_embed"


def test_pad_token_diff_blocks_and_merge(zimage, tmp_path):
    """The pad tokens are IN's `pad_token` kind in named syntax; a merge keeps their diffs under ComfyUI's full
    key, and the merged file equals the source in core and ours."""
    model, _ = zimage
    state = _with_lora(model, _diffs(model, PAD, seed=6), seed=7)
    lw.save_safetensors(state, tmp_path / "p.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    bw = node_module("block_weight").LoRACoreBlockWeight()
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    with loras_folder(tmp_path):
        off = bw.load(model, "p.safetensors", 1.0, 0.0, "named", "custom", "IN.pad_token=0", 0, 1.0, 1.0, False)[0]
        path, _ = node_module("mix").LoRACoreMergeSave().merge("exact", 0, 0.0, "pm", False, "auto", "fp32",
                                                               lora_stack=[("p.safetensors", 0.7, 0.0)],
                                                               model=model)["result"]
        source, _ = loader.load(model, "p.safetensors", 0.7)
        merged_ours, _ = loader.load(model, "pm.safetensors", 1.0)
    assert not any("pad_token" in k for k in off.patches)
    merged = comfy.utils.load_torch_file(path, safe_load=True)
    assert {"diffusion_model.x_pad_token.diff", "diffusion_model.cap_pad_token.diff"} <= set(merged)
    core, _ = comfy.sd.load_lora_for_models(model, None, merged, 1.0, 0.0)
    want = bake(source)
    assert "diffusion_model.cap_pad_token" in want
    assert_same(bake(merged_ours), want, base, "merged file in our loader")
    assert_same(bake(core), want, base, "merged file in core's loader")
