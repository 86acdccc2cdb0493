"""The patch engine's fast paths agree with the plain path, and its bookkeeping is exact.

Plain path = apply each patch on its own, in order, in fp32: W <- W + adapters.delta_at(module, W, s) (that is
s * adapters.delta(module, W) for every algorithm but OFT/BOFT), then cast once. Fast paths under test: rank-concatenated fusion of a low-rank stack, the one-pass
`addmm(backup, ups, downs, out=weight)` write for fp32 weights, incremental re-patch (only changed keys,
recomputed from the backup), restore, rollback after a failure part-way, bf16 weights through one fp32
intermediate. Runs on CPU, and on CUDA too when a GPU is present (bench/gpu_check.sh).
"""
from __future__ import annotations

import random

import pytest
import torch

from lora_core import adapters
from lora_core.engine import PatchEngine, WeightPatch, patch_weight
from lora_core.errors import LoraMatchError, LoraValueError
from lora_core.types import ModuleLora

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = {"a.weight": (48, 32), "b.weight": (64, 48), "c.weight": (32, 16, 3, 3), "d.weight": (40, 40)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_tensors(device="cpu", dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {k: (torch.randn(s, generator=g) / s[1] ** 0.5).to(device, dtype) for k, s in SHAPES.items()}


def lora_module(name: str, shape, rank: int, seed: int, alpha: float | None = None) -> ModuleLora:
    g = _gen(seed)
    out_dim, rest = shape[0], shape[1:]
    down = torch.randn((rank, *rest), generator=g) / (rest[0] ** 0.5)
    up = torch.randn((out_dim, rank) + (1,) * (len(shape) - 2), generator=g) * 0.1
    return ModuleLora(name, "lora", {"up": up, "down": down}, alpha=alpha if alpha is not None else rank / 2)


def full_module(name: str, shape, seed: int) -> ModuleLora:
    return ModuleLora(name, "full", {"diff": torch.randn(shape, generator=_gen(seed)) * 0.01})


def stack_plan(n_loras: int, strengths=None, rank: int = 4, seed: int = 1) -> dict[str, list[WeightPatch]]:
    strengths = strengths or [1.0 - 0.15 * i for i in range(n_loras)]
    plan = {}
    for k, shape in SHAPES.items():
        plan[k] = [WeightPatch(lora_module(f"l{i}.{k}", shape, rank + i, seed * 100 + i * 7 + len(k)), s)
                   for i, s in enumerate(strengths)]
    return plan


def plain(weight: torch.Tensor, patches) -> torch.Tensor:
    """The reference: one patch at a time, in fp32, cast back once."""
    work = weight.to(torch.float32, copy=True)
    for p in patches:
        if p.strength != 0.0:
            work += adapters.delta_at(p.module, work, p.strength)
    return work.to(weight.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------- fusion

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_loras", [1, 2, 4, 8])
def test_fused_stack_equals_sequential_application(device, n_loras):
    tensors = make_tensors(device)
    originals = {k: t.clone() for k, t in tensors.items()}
    plan = stack_plan(n_loras)
    PatchEngine(tensors).apply(plan)
    for key, patches in plan.items():
        expected = plain(originals[key], patches)
        assert rel_err(tensors[key], expected) < 1e-6, key
        assert not torch.equal(tensors[key], originals[key]), f"{key} was not patched"


def test_fused_stack_uses_one_matmul_per_weight(monkeypatch):
    """Rank concatenation: one matmul per target weight, whatever the stack size, on the first patch (in place
    on the pristine weight) and on a re-patch (one addmm from the backup)."""
    calls = []
    real_addmm, real_addmm_ = torch.addmm, torch.Tensor.addmm_

    def counting_addmm(*args, **kwargs):
        calls.append(("addmm", args[1].shape))
        return real_addmm(*args, **kwargs)

    def counting_addmm_(self, *args, **kwargs):
        calls.append(("addmm_", args[0].shape))
        return real_addmm_(self, *args, **kwargs)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm_)
    engine = PatchEngine(make_tensors())
    engine.apply(stack_plan(4, rank=3))
    assert [c[0] for c in calls] == ["addmm_"] * len(SHAPES)
    engine.apply(stack_plan(4, rank=3, strengths=[0.1, 0.2, 0.3, 0.4]))
    assert [c[0] for c in calls[len(SHAPES):]] == ["addmm"] * len(SHAPES)
    assert all(shape[1] == 3 + 4 + 5 + 6 for _, shape in calls)  # ranks 3..6 concatenated


@pytest.mark.parametrize("device", DEVICES)
def test_engine_fast_write_matches_patch_weight_bit_for_bit(device):
    """The engine's one-pass fp32 write and patch_weight (what our ComfyUI adapter runs) give the same bits."""
    tensors = make_tensors(device)
    originals = {k: t.clone() for k, t in tensors.items()}
    for n in (1, 3):
        plan = stack_plan(n, seed=n)
        PatchEngine(tensors).apply(plan)
        for key, patches in plan.items():
            assert torch.equal(tensors[key], patch_weight(originals[key].clone(), patches, key)), key
            tensors[key].copy_(originals[key])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_stack_keeps_order_around_weight_dependent_patches(device):
    """A weight-dependent patch (DoRA) between low-rank ones splits the fusion; order is preserved."""
    shape = SHAPES["d.weight"]
    dora = lora_module("dora", shape, 4, 11)
    dora.dora_scale = torch.rand(shape[0], 1, generator=_gen(5)) + 0.5
    patches = [WeightPatch(lora_module("x", shape, 4, 12), 0.8), WeightPatch(full_module("f", shape, 13), 0.5),
               WeightPatch(dora, 0.7), WeightPatch(lora_module("y", shape, 2, 14), -0.6),
               WeightPatch(lora_module("z", shape, 3, 15), 0.3)]
    tensors = make_tensors(device)
    original = tensors["d.weight"].clone()
    PatchEngine(tensors).apply({"d.weight": patches})
    assert rel_err(tensors["d.weight"], plain(original, patches)) < 1e-6
    swapped = [patches[0], patches[2], patches[1], patches[3], patches[4]]
    assert rel_err(plain(original, swapped), plain(original, patches)) > 1e-6  # order does matter here


@pytest.mark.parametrize("device", DEVICES)
def test_oft_and_boft_get_their_strength_inside_a_mixed_stack(device):
    """OFT/BOFT strengths reach the adapter (adapters.delta_at: LyCORIS's multiplier on the rotation, not s * D,
    checked against LyCORIS in test_adapters.py): first patch and strength re-patches equal the plain path and
    patch_weight (ComfyUI's path) bit for bit."""
    shape = SHAPES["b.weight"]
    g = _gen(21)
    oft = ModuleLora("oft", "oft", {"blocks": torch.randn(8, 8, 8, generator=g) * 0.05,
                                    "rescale": 1 + 0.1 * torch.randn(64, 1, generator=g)}, alpha=0.0)
    boft = ModuleLora("boft", "boft", {"blocks": torch.randn(2, 8, 8, 8, generator=g) * 0.05}, alpha=0.0)
    x, y = lora_module("x", shape, 4, 22), lora_module("y", shape, 2, 23)
    tensors = make_tensors(device)
    original = tensors["b.weight"].clone()
    engine = PatchEngine(tensors)
    for s_oft, s_boft in ((0.5, -0.7), (1.3, 0.5), (1.0, 1.0)):
        patches = [WeightPatch(x, 0.8), WeightPatch(oft, s_oft), WeightPatch(y, -0.6), WeightPatch(boft, s_boft)]
        engine.apply({"b.weight": patches})
        assert rel_err(tensors["b.weight"], plain(original, patches)) < 1e-6
        assert torch.equal(tensors["b.weight"], patch_weight(original.clone(), patches))
    for module in (oft, boft):   # the linear rule would be something else
        linear = original + 0.5 * adapters.delta(module, original)
        assert rel_err(patch_weight(original.clone(), [WeightPatch(module, 0.5)]), linear) > 1e-3, module.algo


def test_zero_strength_patches_are_skipped():
    tensors = make_tensors()
    original = tensors["a.weight"].clone()
    plan = stack_plan(2, strengths=[0.0, 0.0])
    PatchEngine(tensors).apply({"a.weight": plan["a.weight"]})
    assert torch.equal(tensors["a.weight"], original)


# ----------------------------------------------------------------------------- incremental re-patch

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_change_repatch_equals_fresh_patch_bit_for_bit(device, dtype):
    tensors = make_tensors(device, dtype)
    fresh_tensors = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    engine.apply(stack_plan(4, strengths=[1.0, 0.8, 0.6, 0.4]))
    new_plan = stack_plan(4, strengths=[0.5, 0.8, 0.6, 0.4])
    counts = engine.apply(new_plan)
    assert counts["written"] == len(SHAPES)
    PatchEngine(fresh_tensors).apply(new_plan)
    for key in SHAPES:
        assert torch.equal(tensors[key], fresh_tensors[key]), key


def test_block_change_rewrites_only_changed_keys():
    tensors = make_tensors()
    engine = PatchEngine(tensors)
    plan = stack_plan(3)
    engine.apply(plan)
    untouched = {k: tensors[k].data_ptr() for k in SHAPES}
    before = {k: tensors[k].clone() for k in SHAPES}
    # a block factor of 0.5 on "b" only: same modules, one key's strengths change
    changed = dict(plan)
    changed["b.weight"] = [WeightPatch(p.module, p.strength * 0.5) for p in plan["b.weight"]]
    counts = engine.apply(changed)
    assert counts == {"written": 1, "restored": 0, "unchanged": len(SHAPES) - 1}
    for key in SHAPES:
        assert tensors[key].data_ptr() == untouched[key], "patched in place: storage must not move"
        if key != "b.weight":
            assert torch.equal(tensors[key], before[key])
    fresh = make_tensors()
    PatchEngine(fresh).apply(changed)
    assert torch.equal(tensors["b.weight"], fresh["b.weight"])


def test_a_rebuilt_plan_over_the_same_tensors_counts_as_unchanged():
    """Plans are rebuilt from the file on every change (new ModuleLora objects over the same tensors):
    only keys whose patches really differ are recomputed."""
    tensors = make_tensors()
    engine = PatchEngine(tensors)
    plan = stack_plan(2)
    engine.apply(plan)

    def rebuilt(module: ModuleLora) -> ModuleLora:
        return ModuleLora(module.name, module.algo, dict(module.tensors), alpha=module.alpha)

    again = {k: [WeightPatch(rebuilt(p.module), p.strength) for p in ps] for k, ps in plan.items()}
    again["a.weight"][0] = WeightPatch(again["a.weight"][0].module, 0.25)
    assert engine.apply(again) == {"written": 1, "restored": 0, "unchanged": len(SHAPES) - 1}
    other_tensors = {k: [WeightPatch(ModuleLora(p.module.name, "lora", {r: t.clone() * 2 for r, t in
                                                                         p.module.tensors.items()},
                                                alpha=p.module.alpha), p.strength) for p in ps]
                     for k, ps in again.items()}
    assert engine.apply(other_tensors)["written"] == len(SHAPES)
    fresh = make_tensors()
    PatchEngine(fresh).apply(other_tensors)
    assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES)


def test_dropping_a_key_restores_it_and_frees_its_backup():
    tensors = make_tensors()
    original = tensors["c.weight"].clone()
    engine = PatchEngine(tensors)
    plan = stack_plan(2)
    engine.apply(plan)
    assert engine.backup_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    plan.pop("c.weight")
    counts = engine.apply(plan)
    assert counts["restored"] == 1
    assert torch.equal(tensors["c.weight"], original)
    assert engine.backup_bytes() == sum(tensors[k].numel() * tensors[k].element_size() for k in plan)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_is_bit_exact_after_1000_swaps(device):
    tensors = make_tensors(device)
    originals = {k: t.clone() for k, t in tensors.items()}
    pointers = {k: t.data_ptr() for k, t in tensors.items()}
    modules = {k: [lora_module(f"m{i}.{k}", s, 2 + i, 300 + i) for i in range(3)] for k, s in SHAPES.items()}
    engine = PatchEngine(tensors)
    rng = random.Random(0)
    for swap in range(1000):
        strengths = [rng.choice([0.0, 0.25, 0.5, 1.0, -0.75, 1.5]) for _ in range(3)]
        keys = [k for k in SHAPES if rng.random() < 0.8]
        plan = {k: [WeightPatch(m, s) for m, s in zip(modules[k], strengths)] for k in keys}
        engine.apply(plan)
        if swap % 97 == 0:
            fresh = {k: t.clone() for k, t in originals.items()}
            PatchEngine(fresh).apply(plan)
            assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES), f"drift at swap {swap}"
        if swap % 250 == 249:
            engine.restore()
    engine.restore()
    for key in SHAPES:
        assert torch.equal(tensors[key], originals[key]), key
        assert tensors[key].data_ptr() == pointers[key]
    assert engine.backup_bytes() == 0


# ---------------------------------------------------------------------------------- transactions

class Boom(RuntimeError):
    pass


@pytest.fixture
def exploding_delta(monkeypatch):
    """adapters.delta raises for modules named 'boom*', after the engine has already written other keys."""
    real = adapters.delta

    def delta(module, weight):
        if module.name.startswith("boom"):
            raise Boom(module.name)
        return real(module, weight)

    monkeypatch.setattr(adapters, "delta", delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_failure_part_way_leaves_every_tensor_unchanged(exploding_delta, dtype):
    tensors = make_tensors(dtype=dtype)
    engine = PatchEngine(tensors)
    engine.apply(stack_plan(2))                       # a previous state to return to
    before = {k: t.clone() for k, t in tensors.items()}
    plan = stack_plan(3, strengths=[0.3, 0.2, 0.1])   # every key changes...
    # ...and the last key fails after its low-rank run was already added in place
    plan["d.weight"] = plan["d.weight"] + [WeightPatch(full_module("boom.d", SHAPES["d.weight"], 3), 1.0)]
    with pytest.raises(Boom):
        engine.apply(plan)
    for key in SHAPES:
        assert torch.equal(tensors[key], before[key]), key
    # the engine is still usable and exact afterwards
    engine.restore()
    assert all(torch.equal(tensors[k], v) for k, v in make_tensors(dtype=dtype).items())


def test_failure_on_first_patch_leaves_tensors_and_backups_clean(exploding_delta):
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    plan = stack_plan(1)
    plan["c.weight"] = [WeightPatch(full_module("boom.c", SHAPES["c.weight"], 4), 1.0)]
    with pytest.raises(Boom):
        engine.apply(plan)
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)
    assert engine.backup_bytes() == 0 and not engine.patched_keys


def test_validation_errors_come_before_any_write():
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    plan = stack_plan(1)
    plan["b.weight"] = [WeightPatch(lora_module("wrong", (64, 47), 4, 1), 1.0)]
    with pytest.raises(LoraMatchError):
        engine.apply(plan)
    plan = stack_plan(1, strengths=[float("nan")])
    with pytest.raises(LoraValueError):
        engine.apply(plan)
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


# ------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_are_rounded_once_from_an_fp32_intermediate(device, dtype):
    tensors = make_tensors(device, dtype)
    originals = {k: t.clone() for k, t in tensors.items()}
    plan = stack_plan(4)
    PatchEngine(tensors).apply(plan)
    for key, patches in plan.items():
        fp32 = patch_weight(originals[key].float(), patches, key)
        assert torch.equal(tensors[key], fp32.to(dtype)), key
        # and within half an ulp (plus fp32 noise) of the fp64 truth: no double rounding per LoRA
        truth = originals[key].double()
        for p in patches:
            up, down = adapters.lowrank_factors(p.module, truth.shape)
            truth = truth + p.strength * (up.double().to(device) @ down.double().to(device)).reshape(truth.shape)
        ulp = (truth.abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        assert ((tensors[key].double() - truth).abs() <= 0.5 * ulp * (1 + 1e-3) + 1e-7).all(), key


def _check_pinned_cpu_backup_of_gpu_weights():
    tensors = make_tensors("cuda", torch.float16)
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors, backup_device="cpu")
    engine.apply(stack_plan(2))
    assert all(b.device.type == "cpu" and b.is_pinned() for b in engine._backups.values())
    engine.apply(stack_plan(2, strengths=[0.1, 0.2]))
    fresh = {k: t.clone() for k, t in originals.items()}
    PatchEngine(fresh).apply(stack_plan(2, strengths=[0.1, 0.2]))
    assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES)
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


if torch.cuda.is_available():  # pinned backups exist only for GPU weights; collected on GPU machines only
    def test_cpu_backup_of_gpu_weights_is_pinned_and_exact():
        _check_pinned_cpu_backup_of_gpu_weights()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_patch_in_place_and_repatch_from_backup_agree_and_restore_exactly(dtype):
    """The first patch works on the pristine tensor itself, a re-patch recomputes from the backup: both give
    the bits a fresh engine gives, the backup holds the original bits, and its memory is accounted and freed."""
    g = _gen(3)
    tensors = {"big.weight": torch.randn(1024, 768, generator=g).to(dtype), "small.weight": torch.randn(8, 8).to(dtype)}
    originals = {k: t.clone() for k, t in tensors.items()}
    plan = {k: [WeightPatch(lora_module(k, t.shape, 8, 21), 0.9)] for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    engine.apply(plan)
    assert engine.backup_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.equal(engine._backups["big.weight"], originals["big.weight"])
    assert not torch.equal(tensors["big.weight"], originals["big.weight"])
    changed = {k: [WeightPatch(p[0].module, -0.4)] for k, p in plan.items()}
    engine.apply(changed)
    fresh = {k: t.clone() for k, t in originals.items()}
    PatchEngine(fresh).apply(changed)
    for key in plan:
        assert torch.equal(tensors[key], fresh[key]), key
    engine.restore()
    assert engine.backup_bytes() == 0
    assert all(torch.equal(tensors[k], originals[k]) for k in tensors)


@pytest.mark.parametrize("batch", [False, True])
def test_strength_changes_reuse_prepared_factors_until_the_modules_change(monkeypatch, batch):
    """Factors are gathered once per set of modules: a strength or block change gathers nothing, a new module for
    one key gathers that key only, a dropped key lets go of them; on the CPU they are the file's own tensors (no
    memory of their own)."""
    calls = []
    real = adapters.lowrank_parts

    def counting(module, shape, device=None):
        calls.append(module.name)
        return real(module, shape, device)

    monkeypatch.setattr(adapters, "lowrank_parts", counting)
    single = PatchEngine(make_tensors(), batch_same_shape=batch)
    single.apply(stack_plan(1))
    assert single.factor_bytes() == 0
    single.restore()
    calls.clear()
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors, batch_same_shape=batch)
    plan = stack_plan(2)
    engine.apply(plan)
    assert len(calls) == 2 * len(SHAPES)
    assert engine.factor_bytes() == 0
    calls.clear()
    changed = {k: [WeightPatch(p.module, s) for p, s in zip(ps, [0.3, -0.2])] for k, ps in plan.items()}
    engine.apply(changed)
    assert calls == []
    fresh = {k: t.clone() for k, t in originals.items()}
    PatchEngine(fresh, batch_same_shape=batch).apply(changed)
    assert all(torch.equal(tensors[k], fresh[k]) for k in SHAPES)
    calls.clear()
    changed["a.weight"] = [WeightPatch(lora_module("new.a", SHAPES["a.weight"], 3, 99), 0.5)]
    engine.apply(changed)
    assert calls == ["new.a"]
    changed.pop("b.weight")
    engine.apply(changed)
    assert "b.weight" not in engine._lowranks
    engine.restore()
    assert engine.factor_bytes() == 0 and engine.backup_bytes() == 0
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


def test_a_bad_strength_on_the_same_modules_is_refused_before_any_write():
    """A strength-only change skips the shape checks (done when the modules were first applied), not the
    strength check."""
    tensors = make_tensors()
    engine = PatchEngine(tensors)
    plan = stack_plan(2)
    engine.apply(plan)
    before = {k: t.clone() for k, t in tensors.items()}
    bad = {k: [WeightPatch(p.module, s) for p, s in zip(ps, [0.5, float("inf")])] for k, ps in plan.items()}
    with pytest.raises(LoraValueError, match="inf"):
        engine.apply(bad)
    assert all(torch.equal(tensors[k], before[k]) for k in SHAPES)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_loras", [1, 3])
@pytest.mark.parametrize("batch", [False, True])
def test_the_loras_own_tensors_are_never_written(factor_dtype, n_loras, batch):
    """On a CPU the engine works from the file's own factor tensors: scaling must happen on copies."""
    plan = stack_plan(n_loras)
    for patches in plan.values():
        for p in patches:
            p.module.tensors.update({r: t.to(factor_dtype) for r, t in p.module.tensors.items()})
    saved = {id(t): t.clone() for ps in plan.values() for p in ps for t in p.module.tensors.values()}
    engine = PatchEngine(make_tensors(), batch_same_shape=batch)
    for strengths in ([1.0, 0.5, 0.25], [0.3, -0.2, 0.7], [1.0, 0.5, 0.25]):
        engine.apply({k: [WeightPatch(p.module, s) for p, s in zip(ps, strengths)] for k, ps in plan.items()})
    for ps in plan.values():
        for p in ps:
            assert all(torch.equal(t, saved[id(t)]) for t in p.module.tensors.values()), p.module.name
