"""Quantised models: LoRA Core gives core's results (real ComfyUI 0.3.75 host).

One kohya LoRA (every Linear and Conv2d of the tiny SD1.5, written by tests/lora_writers.py) is applied by our
`LoRACoreLoaderModelOnly` and by ComfyUI's own `LoraLoaderModelOnly` to the same model, then ComfyUI loads
each result the way sampling does:

* GGUF Q8_0 (tests/quantized.py imitates ComfyUI-GGUF's tensor class, ops and ModelPatcher): the weights the
  layers compute with at forward time (dequantised, then patched by `comfy.lora.calculate_weight`) equal
  core's to 1e-5 of the LoRA's delta, and so do the forward outputs; with a bf16/fp16 compute dtype our patch
  is rounded once from fp32, never further from the exact result than core's.
"""
from __future__ import annotations

import pytest
import torch

from tests import lora_writers as lw
from tests import quantized as q
from tests import tiny_models as tm
from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module

from lora_core.weights import logical_shape

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: the host is first on sys.path)

LORA = "kohya.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    reference = tm.comfy_sd15().model.diffusion_model
    layers = {name: m for name, m in reference.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    lw.save_safetensors(lw.kohya_state_dict(layers, "lora_unet", rank=4, alpha=2.0, seed=1), folder / LORA)
    with loras_folder(folder):
        yield folder


def both(model, strength=1.0):
    """(ours, core): the same LoRA on the same MODEL through LoRACoreLoaderModelOnly and LoraLoaderModelOnly."""
    ours, report = node_module("loader").LoRACoreLoaderModelOnly().load(model, LORA, strength)
    assert "unmatched" not in report and "WARNING" not in report, report
    (core,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, strength)
    assert set(ours.patches) == set(core.patches) and core.patches, "ours and core patch different keys"
    return ours, core


def inputs():
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([14.6, 1.2]),
            torch.randn(2, 77, 768, generator=gen))


def forward(patcher) -> torch.Tensor:
    x, sigma, context = inputs()
    with torch.inference_mode():
        return patcher.model.apply_model(x, sigma, c_crossattn=context).clone()


def relative_error(ours: dict, core: dict, base: dict) -> float:
    """max over keys of max|ours - core| / max|core - base| (the error relative to the LoRA's delta)."""
    worst = 0.0
    for key in core:
        delta = (core[key].float() - base[key].float()).abs().max().item()
        assert delta > 0, f"{key}: the LoRA did not change this weight, the comparison proves nothing"
        worst = max(worst, (ours[key].float() - core[key].float()).abs().max().item() / delta)
    return worst


def module_of(model, key):
    path, _, name = key.rpartition(".")
    return comfy.utils.get_attr(model, path), name


# --------------------------------------------------------------------------------------------- GGUF


def test_weight_introspection_never_assumes_a_plain_tensor():
    value = torch.randn(32, 768, generator=torch.Generator().manual_seed(3))
    packed = q.quantize(value)
    assert packed.size() == (32, 816) and packed.dtype == torch.uint8          # 24 blocks of 34 bytes per row
    assert (q.dequantize(packed) - value).abs().max() <= value.abs().max() / 127   # Q8_0: half a step per block
    moved = packed.to("cpu")                                                  # what ComfyUI does to weights
    assert (moved.tensor_type, moved.tensor_shape) == ("Q8_0", (32, 768))
    assert logical_shape(packed) == (32, 768) and logical_shape(torch.zeros(2, 3)) == (2, 3)


def forward_weights(patcher, keys) -> dict:
    """The weights the layers compute with in fp32: a quantised one dequantised and patched as its forward
    does, an F32 one as ComfyUI stored it."""
    out = {}
    for key in keys:
        module, name = module_of(patcher.model, key)
        tensor = getattr(module, name)
        if q.is_quantized(tensor):
            out[key] = module.patched_weight(tensor, torch.float32)
        else:
            out[key] = tensor.as_subclass(torch.Tensor).clone()
    return out


def quantized_keys(patcher) -> list:
    return sorted(k for k in patcher.patches if q.is_quantized(comfy.utils.get_attr(patcher.model, k)))


def test_gguf_q8_0_lora_matches_core(loras):
    model = q.gguf_sd15()
    packed = model.model.state_dict()
    ours, core = both(model, -0.7)
    keys = sorted(core.patches)
    keys_q = quantized_keys(core)
    base = forward_weights(model, keys)
    # The case of the bug report: a quantised layer's state dict gives its packed storage, not the weight's shape.
    assert len(keys) // 2 <= len(keys_q) < len(keys), (len(keys_q), len(keys))
    assert all(packed[k].shape != base[k].shape for k in keys_q)
    base_out = forward(model)
    results = {}
    for label, patcher in (("ours", ours), ("core", core)):
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
        for key in keys_q:       # patched the GGUF way: still packed, patches handed to the forward pass
            tensor = comfy.utils.get_attr(patcher.model, key)
            assert isinstance(tensor, q.PackedTensor) and tensor.dtype == torch.uint8 and tensor.patches, key
            assert tensor.patches[0][0] is patcher.patches[key]
        results[label] = (forward_weights(patcher, keys), forward(patcher))
        mm.unload_all_models()
        restored = forward_weights(model, keys)
        assert all(torch.equal(restored[k], base[k]) for k in keys), f"{label}: weights not restored"
    weight_error = relative_error(results["ours"][0], results["core"][0], base)
    assert weight_error <= 1e-5, f"patched weights differ from core's by {weight_error:.3g} of the delta"
    out_error = (results["ours"][1] - results["core"][1]).abs().max().item()
    effect = (results["core"][1] - base_out).abs().max().item()
    assert effect > 0.01, f"the LoRA barely changes the output ({effect:.3g}): the comparison proves nothing"
    assert out_error <= 1e-5 * effect, f"outputs differ from core's by {out_error:.3g} (LoRA effect {effect:.3g})"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_gguf_compute_dtype_patch_rounded_once(loras, dtype):
    """GGUF dequantises to the input's dtype and patches there (a GPU in bf16/fp16): our adapter works in fp32 and
    rounds once, so it is within half an ulp of the exact result and never further from it than core's."""
    model = q.gguf_sd15()
    ours, core = both(model)
    keys_q = quantized_keys(core)
    got = {}
    for label, patcher in (("ours", ours), ("core", core)):
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
            for key in keys_q:
                module, name = module_of(patcher.model, key)
                got[label, key] = module.patched_weight(getattr(module, name), dtype)
        mm.unload_all_models()
    # Round to nearest: |rounded - exact| <= eps/2 * |exact| (the smallest normal for subnormals), plus one fp32
    # ulp for the fp32 sum the result is rounded from.
    half_ulp = torch.finfo(dtype).eps / 2 + torch.finfo(torch.float32).eps
    tiny = torch.finfo(dtype).tiny
    worse = 0
    for key in keys_q:
        module, name = module_of(model.model, key)
        low = q.dequantize(getattr(module, name), dtype)
        exact = comfy.lora.calculate_weight(core.patches[key], low.float(), key)      # fp32 math, no rounding
        mine, theirs = got["ours", key], got["core", key]
        assert mine.dtype == dtype and mine.shape == exact.shape, (key, mine.dtype, mine.shape)
        assert not torch.equal(mine.float(), low.float()), f"{key}: the LoRA was not applied"
        error = (mine.float() - exact).abs()
        bound = half_ulp * exact.abs().clamp(min=tiny)
        assert bool((error <= bound).all()), f"{key}: {(error - bound).max().item():.3g} beyond half an ulp"
        worse += int((error > (theirs.float() - exact).abs()).sum())
    assert worse == 0, f"{worse} values further from the exact result than core's"
