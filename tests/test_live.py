"""Live LoRA mode in the real ComfyUI 0.3.75 host (CPU, tiny SD1.5 and Flux.1 built with ComfyUI's classes).

The merged loaders are the reference (they equal core's loader, tests/test_parity_core.py): every live node's
outputs (the denoiser's prediction through `BaseModel.apply_model` after ComfyUI loads the MODEL the way a
sampler does, and the CLIP's conditioning) equal the matching merged node's to fp32 rounding, for one LoRA with
CLIP at 1.0 and -0.6, model-only, a LORA_STACK with a LoHa (merged instead, reported), block-weighted stacks with
their own vectors, and Flux with element kinds inside fused weights (rows of linear1, columns of linear2).
A strength or block change loaded after the first writes no weight (every parameter's storage and version
counter unchanged, no ModelPatcher weight write called) and builds no factor; Bake gives the merged loaders'
weights bit for bit; lowvram partial loading gives the same outputs as a full load.

LoRA files are written by tests/lora_writers.py (kohya naming) and LyCORIS itself (LoHa).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_models as tm
from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402

live = node_module("live")
loader = node_module("loader")
bw = node_module("block_weight")

# fp32 rounding, relative to the output's size: W x + U(D x) against (W + U D) x differs by about 1.2e-6 of the
# largest output value on the tiny SD1.5 (merged vs core's own loader: 0.6e-6, the same order).
TOLERANCE = 1e-5


def _te_layers(clip):
    encoder = clip.cond_stage_model.clip_l.transformer
    return {n.replace("text_model.", "text_model_"): m for n, m in encoder.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def sd15():
    return tm.comfy_sd15(), tm.comfy_clip_sd15()


@pytest.fixture(scope="module")
def loras(sd15, tmp_path_factory):
    model, clip = sd15
    folder = tmp_path_factory.mktemp("live_loras")
    unet = model.model.diffusion_model
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, seed, rank, tucker in (("a", 1, 4, False), ("b", 3, 8, True)):
        state = lw.kohya_state_dict(layers, "lora_unet", rank=rank, alpha=2.0, seed=seed, tucker=tucker)
        state.update(lw.kohya_state_dict(_te_layers(clip), "lora_te", rank=rank, alpha=2.0, seed=seed + 1))
        lw.save_safetensors(state, folder / f"{name}.safetensors")
    attention = {n: m for n, m in layers.items() if isinstance(m, torch.nn.Linear)}
    lw.save_safetensors(lw.kohya_state_dict(attention, "lora_unet", rank=4, alpha=4.0, seed=9),
                        folder / "attn.safetensors")
    loha = lw.lycoris_state_dict(unet, "loha", rank=4, seed=5, target_module=("Linear",))
    lw.save_safetensors(loha, folder / "loha.safetensors")
    with loras_folder(folder):
        yield folder


def _inputs(channels=4):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(2, channels, 8, 8, generator=gen), torch.tensor([14.6, 1.2]),
            torch.randn(2, 77, 768, generator=gen))


def prediction(patcher, **kwargs) -> torch.Tensor:
    """The denoiser's output after ComfyUI loads `patcher` the way a sampler does (gradients off, as ComfyUI's
    executor runs every node)."""
    with torch.no_grad():
        mm.load_models_gpu([patcher], force_full_load=True)
    x, sigma, context = _inputs()
    with torch.inference_mode():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, **kwargs).clone()


def conditioning(clip) -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize("a photo of a cat, detailed")).clone()


def assert_equal_outputs(got, want, base, what):
    effect = (want - base).abs().max().item()
    error = (got - want).abs().max().item()
    assert effect > 1e-3, f"{what}: the LoRA barely changes the output ({effect:.3g}); the test proves nothing"
    scale = want.abs().max().item()
    assert error <= TOLERANCE * scale, (f"{what}: live differs from merged by {error:.3g} (LoRA effect {effect:.3g}, "
                                        f"outputs up to {scale:.3g})")


@pytest.fixture(scope="module")
def base_outputs(sd15):
    model, clip = sd15
    return prediction(model), conditioning(clip)


@pytest.mark.parametrize("strength", (1.0, -0.6))
def test_single_lora_with_clip_equals_merged(sd15, loras, base_outputs, strength):
    model, clip = sd15
    merged_model, merged_clip, _ = loader.LoRACoreLoader().load(model, "a.safetensors", strength, strength, clip)
    live_model, live_clip, report = live.LoRACoreLoaderLive().load(model, "a.safetensors", strength, strength, clip)
    assert "Live mode: 134 layers" in report and "merged instead" not in report, report
    # Nothing merged: the live clones carry no weight patches, so ComfyUI keeps the input's patches_uuid.
    assert not live_model.patches and live_model.patches_uuid == model.patches_uuid
    assert not live_clip.patcher.patches
    assert_equal_outputs(prediction(live_model), prediction(merged_model), base_outputs[0], "UNet")
    assert_equal_outputs(conditioning(live_clip), conditioning(merged_clip), base_outputs[1], "CLIP")
    mm.unload_all_models()
    # The input model is untouched once the live clone is unloaded (object patches restored by ComfyUI).
    assert torch.equal(prediction(model), base_outputs[0])
    assert torch.equal(conditioning(clip), base_outputs[1])


def test_model_only_equals_merged(sd15, loras, base_outputs):
    model, _ = sd15
    (merged, _) = loader.LoRACoreLoaderModelOnly().load(model, "b.safetensors", 0.7)
    (ours, report) = live.LoRACoreLoaderModelOnlyLive().load(model, "b.safetensors", 0.7)
    assert "not applied: te1" in report, report
    assert_equal_outputs(prediction(ours), prediction(merged), base_outputs[0], "UNet (Tucker LoCon)")


def test_stack_with_a_loha_merges_it_and_reports(sd15, loras, base_outputs):
    model, clip = sd15
    stack = [("a.safetensors", 0.8, 0.5), ("b.safetensors", -0.4, 0.9), ("loha.safetensors", 0.6, 0.0)]
    merged_model, merged_clip, _ = loader.LoRACoreApplyStack().apply(model, stack, clip)
    live_model, live_clip, report = live.LoRACoreApplyStackLive().apply(model, stack, clip)
    assert "merged instead (no factored form)" in report and "loha (no low-rank factored form)" in report, report
    assert live_model.patches, "the LoHa's modules must be merged patches"
    # A module goes live only as a whole: the merged keys are exactly those the LoHa touches.
    loha_keys = {k for k, patches in merged_model.patches.items()
                 if any(p.module.algo == "loha" for entry in patches for p in entry[1].weights)}
    assert set(live_model.patches) == loha_keys
    assert_equal_outputs(prediction(live_model), prediction(merged_model), base_outputs[0], "UNet")
    assert_equal_outputs(conditioning(live_clip), conditioning(merged_clip), base_outputs[1], "CLIP")


def _block_stack():
    rows = [bw.make_row("a.safetensors", 0.9, 0.7, bw.BlockSettings("named", "IN*=0.5, OUT03-OUT05=0, TE1=0.3")),
            bw.make_row("b.safetensors", 0.6, 1.0, bw.BlockSettings("a1111", "1,0,1,1,0,1,1,0.5,1,1,0,1,1,1,1,1,1")),
            bw.make_row("attn.safetensors", -0.5, 1.0, bw.BlockSettings())]
    return rows


def test_block_weighted_stack_equals_merged(sd15, loras, base_outputs):
    model, clip = sd15
    rows = _block_stack()
    merged_model, merged_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, rows, clip)
    live_model, live_clip, table = live.LoRACoreApplyBlockStackLive().apply(model, rows, clip)
    assert "Block weights for a.safetensors: mode named" in table and "merged instead" not in table, table
    assert_equal_outputs(prediction(live_model), prediction(merged_model), base_outputs[0], "UNet")
    assert_equal_outputs(conditioning(live_clip), conditioning(merged_clip), base_outputs[1], "CLIP")
    # The single block-weight node too.
    widgets = ("a1111", "custom", "1,1,0,1,1,0.5,1,1,0,0,1,1,1,1,1,1,1", 0, 1.0, 1.0, False)
    merged_one, _, _ = bw.LoRACoreBlockWeight().load(model, "a.safetensors", 1.0, 1.0, *widgets)
    live_one, _, _ = live.LoRACoreBlockWeightLive().load(model, "a.safetensors", 1.0, 1.0, *widgets)
    assert_equal_outputs(prediction(live_one), prediction(merged_one), base_outputs[0], "UNet (block weight)")


def test_chained_live_nodes_compose_and_bake_equals_merged(sd15, loras):
    """Two live loaders chained on one model add both LoRAs on every shared layer; Bake of the chain gives the
    chained merged loaders' weights bit for bit and the same CLIP, with no live layer left."""
    model, clip = sd15
    m1, c1, _ = live.LoRACoreLoaderLive().load(model, "a.safetensors", 0.8, 0.6, clip)
    m2, c2, _ = live.LoRACoreLoaderLive().load(m1, "b.safetensors", 0.5, -0.3, c1)
    g1, h1, _ = loader.LoRACoreLoader().load(model, "a.safetensors", 0.8, 0.6, clip)
    g2, h2, _ = loader.LoRACoreLoader().load(g1, "b.safetensors", 0.5, -0.3, h1)
    base = prediction(model)
    assert_equal_outputs(prediction(m2), prediction(g2), base, "chained live")
    baked, baked_clip, report = live.LoRACoreBakeLive().bake(m2, c2)
    assert "MODEL: baked 121 live layers of 2 live node(s)" in report and "CLIP: baked 13 live layers" in report, report
    assert not live._live_forwards(baked) and not live._live_forwards(baked_clip.patcher)
    for (ours, reference) in ((baked, g2), (baked_clip.patcher, h2.patcher)):
        mm.load_models_gpu([reference], force_full_load=True)
        want = {k: v.clone() for k, v in reference.model.state_dict().items()}
        mm.load_models_gpu([ours], force_full_load=True)
        got = ours.model.state_dict()
        changed = [k for k in want if not torch.equal(want[k], got[k])]
        assert not changed, f"baked weights differ from the merged loaders' at {changed[:3]}"
        mm.unload_all_models()
    assert torch.equal(prediction(baked), prediction(g2))


class WeightWrites:
    """Every write to a weight while installed: ModelPatcher's weight paths (patch, restore, lowvram patches)
    and, afterwards, every parameter's storage / version counter / device compared with before."""

    def __init__(self, *modules):
        self.modules = modules
        self.calls: list = []

    def snapshot(self):
        return {(i, k): (t.data_ptr(), t.device, t.detach().clone()) for i, m in enumerate(self.modules)
                for k, t in m.state_dict(keep_vars=True).items()}

    @contextlib.contextmanager
    def installed(self):
        targets = [(comfy.model_patcher.ModelPatcher, "patch_weight_to_device"),
                   (comfy.model_patcher.ModelPatcher, "unpin_weight"),
                   (comfy.utils, "set_attr_param"), (comfy.utils, "copy_to_param"),
                   (comfy.lora, "calculate_weight")]
        saved = []
        for owner, name in targets:
            real = getattr(owner, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                if _name != "patch_weight_to_device" or args[1] in args[0].patches:
                    self.calls.append(_name)
                return _real(*args, **kwargs)

            saved.append((owner, name, real))
            setattr(owner, name, spy)
        before = self.snapshot()
        try:
            yield self
        finally:
            for owner, name, real in saved:
                setattr(owner, name, real)
        after = self.snapshot()
        self.changed = [k for k, (ptr, device, values) in after.items()
                        if before[k][:2] != (ptr, device) or not torch.equal(before[k][2], values)]


def test_strength_and_block_changes_write_no_weight(sd15, loras, base_outputs):
    """The second prompt of a tuning session: same graph, other strengths and vectors. ComfyUI swaps the new
    clones in (load_models_gpu) without restoring, recomputing or moving any weight, and no factor is rebuilt
    while the set of modules a LoRA touches stays the same; the outputs are those of the merged loader at the
    new values. A block turned on from 0 adds its modules: their layers' factors are gathered (LoRA tensors
    only), still without a weight write."""
    model, clip = sd15
    rows = _block_stack()
    first, first_clip, _ = live.LoRACoreApplyBlockStackLive().apply(model, rows, clip)
    prediction(first), conditioning(first_clip)
    store = live.factor_store(model.model)
    for change, rebuilt in (("IN*=1.5, OUT03-OUT05=0, TE1=1", False), ("IN*=1.5, OUT03-OUT05=0.25, TE1=1", True)):
        built = store.built
        rows[0] = bw.make_row("a.safetensors", 0.4, 0.2, bw.BlockSettings("named", change))
        rows[1]["strength_model"] = -0.8 if rebuilt else 0.3
        spy = WeightWrites(model.model, clip.cond_stage_model)
        with spy.installed():
            second, second_clip, _ = live.LoRACoreApplyBlockStackLive().apply(model, rows, clip)
            got, got_clip = prediction(second), conditioning(second_clip)
        assert not spy.calls, f"{change}: weights written through {sorted(set(spy.calls))}"
        assert not spy.changed, f"{change}: weights changed in place or moved: {spy.changed[:3]}"
        if rebuilt:   # only the layers of OUT03-OUT05 got a new module
            assert 0 < store.built - built < len(live._live_forwards(second)) / 2, store.built - built
        else:
            assert store.built == built, f"{change}: a strength change rebuilt {store.built - built} factor groups"
        merged, merged_clip, _ = bw.LoRACoreApplyBlockStack().apply(model, rows, clip)
        assert_equal_outputs(got, prediction(merged), base_outputs[0], f"UNet after {change}")
        assert_equal_outputs(got_clip, conditioning(merged_clip), base_outputs[1], f"CLIP after {change}")
        mm.unload_all_models()   # the live clones loaded again, as the next prompt finds them
        prediction(second), conditioning(second_clip)
    mm.unload_all_models()


def partially_load(patcher, budget: int):
    """What load_models_gpu does with a weight budget below the model's size (on this CPU host ComfyUI never
    goes lowvram by itself): LoadedModel.model_load(budget), kept in current_loaded_models."""
    loaded = mm.LoadedModel(patcher)
    with torch.inference_mode():
        loaded.model_load(lowvram_model_memory=budget)
    mm.current_loaded_models.insert(0, loaded)


def test_lowvram_partial_load_gives_the_same_outputs(sd15, loras, base_outputs):
    model, _ = sd15
    ours, _, _ = live.LoRACoreApplyStackLive().apply(model, [("a.safetensors", 0.9, 0.0), ("b.safetensors", 0.5, 0.0)])
    merged, _, _ = loader.LoRACoreApplyStack().apply(model, [("a.safetensors", 0.9, 0.0), ("b.safetensors", 0.5, 0.0)])
    full = prediction(ours)
    mm.unload_all_models()
    partially_load(ours, int(model.model_size() * 0.6))
    cast = [n for n, m in model.model.named_modules() if getattr(m, "comfy_cast_weights", False)]
    assert model.model.model_lowvram and cast, "the budget did not make ComfyUI load the model partially"
    x, sigma, context = _inputs()
    with torch.inference_mode():
        partial = ours.model.apply_model(x, sigma, c_crossattn=context).clone()
    mm.unload_all_models()
    assert torch.equal(partial, full) or (partial - full).abs().max() <= 1e-6 * (full - base_outputs[0]).abs().max()
    assert_equal_outputs(partial, prediction(merged), base_outputs[0], "UNet, lowvram")
    mm.unload_all_models()


# ----------------------------------------------------------------------------------------------- Flux


def flux_prediction(patcher, conds) -> torch.Tensor:
    mm.load_models_gpu([patcher], force_full_load=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    base = patcher.model
    extra = base.extra_conds(cross_attn=conds["cond"], pooled_output=conds["pooled_output"], noise=x,
                             device=x.device, guidance=3.5)
    kwargs = {k: c.process_cond(batch_size=1, area=None, device=x.device).cond for k, c in extra.items()}
    with torch.inference_mode():
        return base.apply_model(x, torch.tensor([0.7]), **kwargs).clone()


def test_flux_elements_inside_fused_weights_equal_merged(tmp_path):
    """Kohya Flux LoRA with element kinds inside fused weights (linear1's MLP rows, linear2's MLP columns, one
    double block's text stream) and a diffusers-named LoRA (to_q/to_k/to_v: rows of the fused qkv): live equals
    merged."""
    model, clip = tm.comfy_flux(depth=2, depth_single=3), tm.comfy_clip_flux()
    lw.save_safetensors(dw.kohya_flux(model, seed=5), tmp_path / "flux_kohya.safetensors")
    transformer = dw.diffusers_flux_twin(depth=2, depth_single=3)
    lw.save_safetensors(dw.peft_flux(transformer, seed=6)[0], tmp_path / "flux_peft.safetensors")
    with torch.inference_mode():
        tokens = clip.tokenize("a cat")
        conds = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    vector = "DB00=0.5, SB*.linear1_mlp=0, SB*.linear2_mlp=0.25, DB01.txt=0"
    rows = [bw.make_row("flux_kohya.safetensors", 0.9, 0.0, bw.BlockSettings("named", vector)),
            bw.make_row("flux_peft.safetensors", -0.7, 0.0, bw.BlockSettings())]
    with loras_folder(tmp_path):
        merged, _, _ = bw.LoRACoreApplyBlockStack().apply(model, rows)
        ours, _, table = live.LoRACoreApplyBlockStackLive().apply(model, rows)
    assert "merged instead" not in table, table
    layers = [layer for f in live._live_forwards(ours).values() for layer in f.layers]
    assert any(g.cols_at is not None for layer in layers for g in layer.groups), "no column-factor group"
    base = flux_prediction(model, conds)
    assert_equal_outputs(flux_prediction(ours, conds), flux_prediction(merged, conds), base, "Flux")
    mm.unload_all_models()


# ----------------------------------------------------------------------------------- GGUF and fp8 weights


def test_gguf_weights_live_equals_merged_without_patching_per_forward(loras):
    """On GGUF-quantised weights (tests/quantized.py's imitation of ComfyUI-GGUF) merged patches are applied again
    at every dequantisation (`calculate_weight` per layer per call); live mode adds the factored terms to the
    dequantised layer's output and never calls it, with the same outputs."""
    from tests import quantized as q

    model = q.gguf_sd15()
    (merged, _) = loader.LoRACoreLoaderModelOnly().load(model, "a.safetensors", 0.8)
    (ours, _) = live.LoRACoreLoaderModelOnlyLive().load(model, "a.safetensors", 0.8)
    base = prediction(model)
    calls = {"n": 0}
    real = comfy.lora.calculate_weight

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    comfy.lora.calculate_weight = counting
    try:
        want = prediction(merged)
        merged_calls, calls["n"] = calls["n"], 0
        got = prediction(ours)
    finally:
        comfy.lora.calculate_weight = real
    mm.unload_all_models()
    assert merged_calls > 0 and calls["n"] == 0, (merged_calls, calls["n"])
    assert_equal_outputs(got, want, base, "GGUF Q8_0")


def test_fp8_weights_keep_the_lora_in_the_compute_dtype(loras):
    """fp8 (e4m3fn) weights: merged, W + ΔW is rounded to fp8; live keeps W in fp8 and computes the LoRA in the
    compute dtype. Against the exact result (the same fp8 weights upcast to fp32, the LoRA merged in fp32) live is
    within fp32 rounding and closer than merged."""
    from tests import quantized as q

    state = q.fp8_state_dict(torch.float8_e4m3fn)
    fp8 = q.load_unet(state, dtype=torch.float8_e4m3fn)
    exact_model = q.load_unet({k: v.float() for k, v in state.items()}, dtype=torch.float32)
    (truth, _) = loader.LoRACoreLoaderModelOnly().load(exact_model, "a.safetensors", 0.8)
    (merged, _) = loader.LoRACoreLoaderModelOnly().load(fp8, "a.safetensors", 0.8)
    (ours, _) = live.LoRACoreLoaderModelOnlyLive().load(fp8, "a.safetensors", 0.8)
    exact = prediction(truth)
    base = prediction(exact_model)
    got, rounded = prediction(ours), prediction(merged)
    mm.unload_all_models()
    assert comfy.utils.get_attr(fp8.model, "diffusion_model.input_blocks.1.1.proj_in.weight").dtype == \
        torch.float8_e4m3fn
    live_error = (got - exact).abs().max().item()
    merged_error = (rounded - exact).abs().max().item()
    assert_equal_outputs(got, exact, base, "fp8 live vs exact")
    assert live_error < merged_error / 10, (live_error, merged_error)
