"""Quantised, fp8 and partially loaded models: LoRA Core gives core's results (real ComfyUI 0.3.75 host).

One kohya LoRA (every Linear and Conv2d of the tiny SD1.5, written by tests/lora_writers.py) is applied by our
`LoRACoreLoaderModelOnly` and by ComfyUI's own `LoraLoaderModelOnly` to the same model, then ComfyUI loads
each result the way sampling does:

* GGUF Q8_0 (tests/quantized.py imitates ComfyUI-GGUF's tensor class, ops and ModelPatcher): the weights the
  layers compute with at forward time (dequantised, then patched by `comfy.lora.calculate_weight`) equal
  core's to 1e-5 of the LoRA's delta, and so do the forward outputs; with a bf16/fp16 compute dtype our patch
  is rounded once from fp32, never further from the exact result than core's.
* fp8 (float8_e4m3fn, float8_e5m2, and ComfyUI's scaled fp8 ops): the patched weights before rounding equal
  core's (both through `calculate_weight`, after the op's `convert_weight`), the stored bits after
  ComfyUI's load equal core's bit for bit (same seeded stochastic rounding), the weights stay fp8.
* lowvram partial loading (fp32 and fp8 models): with a weight budget below the model's size some modules
  are patched at load time and some at forward time through `LowVramPatch`; forward outputs equal core's.
* LoRA Block Info with a GGUF model never reads packed storage as values.
"""
from __future__ import annotations

import pytest
import torch

from tests import lora_writers as lw
from tests import quantized as q
from tests import tiny_models as tm
from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module

from lora_core.weights import holds_values, logical_shape

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
    assert not holds_values(packed) and not holds_values(torch.zeros_like(packed, device="meta"))
    assert holds_values(q.quantize(torch.randn(8))) and holds_values(torch.zeros(2, 3, dtype=torch.float8_e5m2))


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


# --------------------------------------------------------------------------------------------- fp8

FP8_CASES = {"e4m3fn": (torch.float8_e4m3fn, False), "e5m2": (torch.float8_e5m2, False),
             "scaled-e4m3fn": (torch.float8_e4m3fn, True)}


def fp8_model(case):
    dtype, scaled = FP8_CASES[case]
    # Plain fp8 is what UNETLoader's weight_dtype loads; scaled fp8 is detected from the file (dtype None).
    return q.load_unet(q.fp8_state_dict(dtype, scaled), dtype=None if scaled else dtype)


def stored(patcher, keys) -> dict:
    return {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in keys}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_lora_matches_core_bit_for_bit(loras, case):
    dtype, scaled = FP8_CASES[case]
    model = fp8_model(case)
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    ours, core = both(model)
    keys = sorted(core.patches)
    fp8_keys = [k for k in keys if before[k].dtype == dtype]
    if scaled:   # ComfyUI's scaled-fp8 ops: Linear weights fp8 with a scale_weight, the rest in full precision
        scale_keys = [k[:-len("weight")] + "scale_weight" for k in fp8_keys]
        assert all(before[k].dtype == torch.float32 for k in scale_keys) and len(fp8_keys) < len(keys)
        assert any(before[k].item() != 1.0 for k in scale_keys)
    else:
        assert fp8_keys == keys
    assert fp8_keys
    # Before rounding: what patch_weight_to_device hands calculate_weight (fp32 copy, convert_weight applied).
    pre = {"ours": {}, "core": {}}
    base = {}
    for key in keys:
        weight, set_func, convert_func = comfy.model_patcher.get_key_weight(model.model, key)
        work = weight.to(torch.float32, copy=True)
        if convert_func is not None:
            work = convert_func(work, inplace=True)
        base[key] = work.clone()
        for label, patcher in (("ours", ours), ("core", core)):
            pre[label][key] = comfy.lora.calculate_weight(patcher.patches[key], work.clone(), key)
    pre_error = relative_error(pre["ours"], pre["core"], base)
    assert pre_error <= 1e-5, f"patched weights before rounding differ from core's by {pre_error:.3g} of the delta"
    # After ComfyUI's load: stochastic rounding seeded per key, for ours and core alike.
    after, outputs = {}, {}
    for label, patcher in (("ours", ours), ("core", core)):
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
        after[label] = stored(patcher, keys)
        outputs[label] = forward(patcher)
        mm.unload_all_models()
    for key in keys:
        assert after["ours"][key].dtype == before[key].dtype, f"{key} became {after['ours'][key].dtype}"
    differ = [k for k in fp8_keys if not same_bits(after["ours"][k], after["core"][k])]
    assert differ == [], f"{len(differ)} fp8 weights differ from core's bits, e.g. {differ[:3]}"
    changed = sum(int((bits(after["core"][k]) != bits(before[k])).sum()) for k in fp8_keys)
    assert changed > 0.5 * sum(before[k].numel() for k in fp8_keys), "the LoRA changed too few fp8 values"
    others = [k for k in keys if k not in fp8_keys]
    if others:
        error = relative_error({k: after["ours"][k] for k in others}, {k: after["core"][k] for k in others},
                               {k: before[k] for k in others})
        assert error <= 1e-5, f"full-precision weights differ from core's by {error:.3g} of the delta"
    assert torch.equal(outputs["ours"], outputs["core"]), "same stored weights must give the same output"
    # The model the loaders were given is untouched, still fp8, after both loads.
    for key, value in model.model.state_dict().items():
        assert same_bits(value, before[key]), f"{key} not restored"


# --------------------------------------------------------------------------------------------- lowvram


def partially_load(patcher, budget: int):
    """What load_models_gpu does once it has a weight budget (on a GPU it comes from free VRAM; on this CPU
    host ComfyUI never goes lowvram by itself): LoadedModel.model_load(budget), kept in current_loaded_models."""
    loaded = mm.LoadedModel(patcher)
    with torch.inference_mode():
        loaded.model_load(lowvram_model_memory=budget)
    mm.current_loaded_models.insert(0, loaded)


def load_paths(patcher) -> tuple[list, list]:
    """(keys patched at load time, keys patched at forward time by a LowVramPatch) among the patched keys."""
    at_load, at_forward = [], []
    for key in patcher.patches:
        module, name = module_of(patcher.model, key)
        functions = getattr(module, f"{name}_function", [])
        if any(isinstance(f, comfy.model_patcher.LowVramPatch) and f.key == key for f in functions):
            at_forward.append(key)
        elif getattr(module, "comfy_patched_weights", False):
            at_load.append(key)
    return sorted(at_load), sorted(at_forward)


@pytest.mark.parametrize("case", ("fp32", "e4m3fn"))
def test_lowvram_partial_load_matches_core(loras, case):
    model = tm.comfy_sd15() if case == "fp32" else fp8_model(case)
    base_out = forward(model)
    ours, core = both(model)
    budget = int(model.model_size() * 0.9)   # measured: fp32 52 of 121 keys at load, fp8 29
    outputs, paths = {}, {}
    for label, patcher in (("ours", ours), ("core", core)):
        partially_load(patcher, budget)
        assert patcher.model.model_lowvram and patcher.lowvram_patch_counter() > 0, f"{label}: loaded fully"
        paths[label] = load_paths(patcher)
        outputs[label] = forward(patcher)
        mm.unload_all_models()
    at_load, at_forward = paths["ours"]
    assert paths["ours"] == paths["core"], "ours and core loaded different modules lowvram"
    assert at_load and at_forward, f"{len(at_load)} keys patched at load, {len(at_forward)} at forward time"
    assert len(at_load) + len(at_forward) == len(core.patches)
    effect = (outputs["core"] - base_out).abs().max().item()
    error = (outputs["ours"] - outputs["core"]).abs().max().item()
    assert effect > 0.01, f"the LoRA barely changes the output ({effect:.3g})"
    assert error <= 1e-5 * effect, f"outputs differ from core's by {error:.3g} (LoRA effect {effect:.3g})"
    if case == "fp32":   # nothing is rounded: a partial load gives what a full load gives
        with torch.inference_mode():
            mm.load_models_gpu([ours], force_full_load=True)
        full = forward(ours)
        mm.unload_all_models()
        assert (full - outputs["ours"]).abs().max().item() <= 1e-5 * effect
    assert not model.model.model_lowvram and torch.equal(forward(model), base_out), "input model not restored"


# --------------------------------------------------------------------------------------------- block info


def test_block_info_on_gguf_model_reads_no_packed_storage(loras):
    """LoRA Block Info with a GGUF model connected: packed tensors are never read as values; a kohya LoRA's
    deltas need only shapes, so the per-block norms are those on the fp32 model."""
    tools = node_module("block_tools")
    reference = tools.block_info(LORA, "auto", tm.comfy_sd15())
    quantised = tools.block_info(LORA, "auto", q.gguf_sd15())
    assert reference["blocks"].keys() == quantised["blocks"].keys() and reference["blocks"]
    for block, entry in reference["blocks"].items():
        other = quantised["blocks"][block]
        assert (other["modules"], other["unknown"]) == (entry["modules"], 0), block
        assert other["norm"] == pytest.approx(entry["norm"], rel=1e-6), block
