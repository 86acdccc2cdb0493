"""Same-shape batching in the patch engine (the GPU fast path, forced on here so it runs on CPU too).

Weights of one shape, dtype and device whose patches are all plain low-rank ones are patched together: one
stacked baddbmm and a few multi-tensor copies per group. Checked against the per-weight path and the plain
reference: same values (fp32, one rounding), exact restore, incremental re-patch, rollback, chunking, and
that weights the batch cannot take (DoRA, full diffs, lone shapes) still go through the per-weight path.
"""
from __future__ import annotations

import random

import pytest
import torch

from lora_core import engine as engine_module
from lora_core.engine import PatchEngine, WeightPatch

from test_engine import DEVICES, Boom, _gen, exploding_delta, full_module, lora_module, plain, rel_err  # noqa: F401

SHAPES = {**{f"attn{i}.weight": (48, 32) for i in range(5)},
          **{f"conv{i}.weight": (32, 16, 3, 3) for i in range(3)},
          "lone.weight": (40, 40), "dora.weight": (48, 32)}


def make_tensors(device="cpu", dtype=torch.float32, seed=0):
    g = _gen(seed)
    return {k: (torch.randn(s, generator=g) / s[1] ** 0.5).to(device, dtype) for k, s in SHAPES.items()}


def make_plan(strengths, rank=4, seed=1):
    plan = {}
    for n, (key, shape) in enumerate(SHAPES.items()):
        plan[key] = [WeightPatch(lora_module(f"l{i}.{key}", shape, rank, seed * 100 + i * 13 + n), s)
                     for i, s in enumerate(strengths)]
    dora = lora_module("dora", SHAPES["dora.weight"], 4, 77)
    dora.dora_scale = torch.rand(SHAPES["dora.weight"][0], 1, generator=_gen(5)) + 0.5
    plan["dora.weight"] = plan["dora.weight"] + [WeightPatch(dora, 0.6)]
    return plan


def counting(monkeypatch):
    calls = {"baddbmm_": 0, "addmm": 0, "addmm_": 0}
    real = {"baddbmm_": torch.Tensor.baddbmm_, "addmm": torch.addmm, "addmm_": torch.Tensor.addmm_}

    def wrap(name):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return counted

    monkeypatch.setattr(torch.Tensor, "baddbmm_", wrap("baddbmm_"))
    monkeypatch.setattr(torch.Tensor, "addmm_", wrap("addmm_"))
    monkeypatch.setattr(torch, "addmm", wrap("addmm"))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_patch_equals_per_weight_patch(device, dtype):
    plan = make_plan([1.0, 0.7, -0.4])
    batched, single = make_tensors(device, dtype), make_tensors(device, dtype)
    originals = make_tensors(device, dtype)
    PatchEngine(batched, batch_same_shape=True).apply(plan)
    PatchEngine(single, batch_same_shape=False).apply(plan)
    for key, patches in plan.items():
        assert not torch.equal(batched[key], originals[key]), key
        if dtype == torch.float32:
            assert rel_err(batched[key], plain(originals[key], patches)) < 1e-6, key
        else:  # one rounding each from nearly equal fp32 values: at most one ulp apart
            ulp = batched[key].float().abs() * torch.finfo(dtype).eps
            assert ((batched[key].float() - single[key].float()).abs() <= ulp + 1e-12).all(), key


def test_one_batched_gemm_per_shape_group(monkeypatch):
    calls = counting(monkeypatch)
    engine = PatchEngine(make_tensors(), batch_same_shape=True)
    engine.apply(make_plan([1.0, 0.5]))
    # attn0-4 and conv0-2 are two batches; lone (its own shape) and dora (not low-rank) go one by one
    assert calls == {"baddbmm_": 2, "addmm": 0, "addmm_": 2}
    engine.apply(make_plan([0.3, 0.5]))   # a strength change re-writes the same groups from their backups
    assert calls["baddbmm_"] == 4


def test_batches_are_chunked_to_bound_temporary_memory(monkeypatch):
    monkeypatch.setattr(engine_module, "BATCH_BYTES", 2 * 48 * 32 * 4)   # two attn weights per batch
    calls = counting(monkeypatch)
    plan = make_plan([1.0])
    chunked, whole = make_tensors(), make_tensors()
    PatchEngine(chunked, batch_same_shape=True).apply(plan)
    assert calls["baddbmm_"] == 3 + 3    # attn: 2+2+1; conv (18 KB each, over the bound): one per batch
    monkeypatch.undo()
    PatchEngine(whole, batch_same_shape=True).apply(plan)
    assert all(rel_err(chunked[k], whole[k]) < 1e-6 for k in SHAPES)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_repatch_and_restore_stay_exact_over_many_changes(device):
    tensors = make_tensors(device)
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors, batch_same_shape=True)
    rng = random.Random(1)
    for change in range(60):
        strengths = [rng.choice([0.0, 0.25, 1.0, -0.5]) for _ in range(2)]
        plan = make_plan(strengths)
        keys = [k for k in SHAPES if rng.random() < 0.8]   # partial groups and dropped keys
        engine.apply({k: plan[k] for k in keys})
        if change % 10 == 0:
            fresh = {k: t.clone() for k, t in originals.items()}
            PatchEngine(fresh, batch_same_shape=False).apply({k: plan[k] for k in keys})
            assert all(rel_err(tensors[k], fresh[k]) < 1e-6 for k in SHAPES), f"drift at change {change}"
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)
    assert engine.backup_bytes() == 0


def test_strength_change_after_batched_patch_equals_fresh_batched_patch_bit_for_bit():
    tensors, fresh = make_tensors(), make_tensors()
    engine = PatchEngine(tensors, batch_same_shape=True)
    engine.apply(make_plan([1.0, 0.5]))
    assert engine.apply(make_plan([0.2, 0.5]))["written"] == len(SHAPES)
    PatchEngine(fresh, batch_same_shape=True).apply(make_plan([0.2, 0.5]))
    assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES)


def test_failure_after_batches_were_written_rolls_them_back(exploding_delta):
    tensors = make_tensors()
    engine = PatchEngine(tensors, batch_same_shape=True)
    engine.apply(make_plan([1.0]))
    before = {k: t.clone() for k, t in tensors.items()}
    plan = make_plan([0.4, 0.9])
    plan["lone.weight"] = plan["lone.weight"] + [WeightPatch(full_module("boom.lone", SHAPES["lone.weight"], 3), 1.0)]
    with pytest.raises(Boom):
        engine.apply(plan)
    assert all(torch.equal(tensors[k], before[k]) for k in SHAPES)
    engine.restore()
    assert all(torch.equal(tensors[k], v) for k, v in make_tensors().items())


if torch.cuda.is_available():  # GPU weights with pinned CPU backups exist only on GPU machines (bench/gpu_check.sh)
    def test_batched_gpu_weights_with_pinned_cpu_backups_restore_exactly():
        tensors = make_tensors("cuda", torch.float16)
        originals = {k: t.clone() for k, t in tensors.items()}
        engine = PatchEngine(tensors, backup_device="cpu")   # batching is on by default for CUDA weights
        engine.apply(make_plan([1.0, 0.5]))
        assert all(b.device.type == "cpu" and b.is_pinned() for b in engine._backups.values())
        assert engine.factor_bytes() > 0   # the CPU LoRA's factors, copied to the GPU once
        engine.apply(make_plan([0.2, 0.5]))
        fresh = {k: t.clone() for k, t in originals.items()}
        PatchEngine(fresh).apply(make_plan([0.2, 0.5]))
        assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES)
        engine.restore()
        assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)
