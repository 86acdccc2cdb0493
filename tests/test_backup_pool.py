"""The engine's backup storage is allocated once and reused (lora_core.engine.BackupPool; issue 16 item 4).

A first patch used to allocate one fresh buffer per weight, whose page faults cost 0.5-4.4 s for the same work
depending on what the allocator happened to hold. Now the backups of one apply are carved out of one slab, a
restore hands the buffers back to the engine, and the next patch (same keys, or other keys of the same shapes)
reuses that memory: same addresses, no allocation. These tests assert the mechanism (storage identity and
allocation counts, not times) and that every cycle still restores bit-exactly.
"""
from __future__ import annotations

import pytest
import torch

from lora_core import engine as engine_module
from lora_core.engine import PatchEngine, WeightPatch

from tests.test_engine import (SHAPES, Boom, exploding_delta, full_module, lora_module,  # noqa: F401
                               make_tensors, stack_plan)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ptrs(engine: PatchEngine) -> dict[str, int]:
    return {k: b.data_ptr() for k, b in engine._backups.items()}


@pytest.fixture
def slab_calls(monkeypatch):
    """Every allocation of backup memory the engine makes (one per slab)."""
    calls = []
    real = engine_module._slab

    def counted(numel, dtype, device, pinned):
        calls.append((numel, dtype, device.type, pinned))
        return real(numel, dtype, device, pinned)

    monkeypatch.setattr(engine_module, "_slab", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_restore_cycles_reuse_the_same_backup_memory_and_restore_exactly(slab_calls, dtype):
    tensors = make_tensors(dtype=dtype)
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    engine.apply(stack_plan(2))
    first = _ptrs(engine)
    assert len(slab_calls) == 1, "the first patch's backups come from one slab"
    assert len({b.untyped_storage().data_ptr() for b in engine._backups.values()}) == 1
    assert all(torch.equal(engine._backups[k], originals[k]) for k in SHAPES)
    for cycle in range(4):
        engine.restore()
        assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES), cycle
        assert engine.backup_bytes() == 0
        assert engine.reserved_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        engine.apply(stack_plan(1 + cycle % 3, strengths=[0.5 + 0.1 * cycle] * (1 + cycle % 3)))
        assert _ptrs(engine) == first, f"cycle {cycle}: the backups moved to new memory"
        assert all(torch.equal(engine._backups[k], originals[k]) for k in SHAPES), cycle
        assert engine.reserved_bytes() == 0
    assert len(slab_calls) == 1, "a patch after a restore allocated backup memory again"
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


def test_a_key_leaving_the_plan_lends_its_buffer_to_another_key_of_that_shape(slab_calls):
    tensors = make_tensors()
    tensors["d2.weight"] = torch.randn(40, 40)
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    shape = SHAPES["d.weight"]
    engine.apply({"d.weight": [WeightPatch(lora_module("x", shape, 4, 1), 1.0)]})
    buffer = engine._backups["d.weight"].data_ptr()
    engine.apply({})   # d leaves the plan: restored, its buffer goes idle
    assert torch.equal(tensors["d.weight"], originals["d.weight"]) and engine.reserved_bytes() == 40 * 40 * 4
    # d2, of the same shape, enters: it gets d's buffer, no new allocation
    engine.apply({"d2.weight": [WeightPatch(lora_module("y", shape, 4, 2), 1.0)]})
    assert engine._backups["d2.weight"].data_ptr() == buffer
    assert torch.equal(engine._backups["d2.weight"], originals["d2.weight"])
    assert len(slab_calls) == 1
    # within one apply a key that leaves keeps its buffer until the call succeeds (a failure rolls back to it),
    # so a swap in one call takes new memory once; the buffer it frees serves the next swap
    engine.apply({"d.weight": [WeightPatch(lora_module("x", shape, 4, 1), 1.0)]})
    assert len(slab_calls) == 2
    engine.apply({"d2.weight": [WeightPatch(lora_module("y", shape, 4, 2), 1.0)]})
    engine.apply({"d.weight": [WeightPatch(lora_module("x", shape, 4, 1), 1.0)]})
    assert len(slab_calls) == 2
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in tensors)


def test_reserve_faults_the_memory_in_ahead_and_the_first_patch_allocates_nothing(slab_calls):
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    engine.reserve(SHAPES)
    assert len(slab_calls) == 1 and engine.reserved_bytes() == sum(t.numel() * 4 for t in tensors.values())
    reserved = {b.data_ptr() for bufs in engine._pool._idle.values() for b in bufs.values()}
    engine.apply(stack_plan(2))
    assert len(slab_calls) == 1
    assert set(_ptrs(engine).values()) == reserved
    assert all(torch.equal(engine._backups[k], originals[k]) for k in SHAPES)
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


def test_release_frees_the_idle_memory_and_the_next_patch_allocates_again(slab_calls):
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    engine.apply(stack_plan(1))
    engine.restore(release=True)
    assert engine.reserved_bytes() == 0 and engine.backup_bytes() == 0
    engine.apply(stack_plan(1))
    assert len(slab_calls) == 2
    engine.restore()
    engine.release_backup_storage()
    assert engine.reserved_bytes() == 0
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


def test_without_keep_backup_storage_a_restore_keeps_nothing(slab_calls):
    tensors = make_tensors()
    engine = PatchEngine(tensors, keep_backup_storage=False)
    engine.apply(stack_plan(1))
    engine.restore()
    assert engine.reserved_bytes() == 0
    engine.apply(stack_plan(1))
    assert len(slab_calls) == 2
    engine.restore()


def test_a_failed_first_patch_returns_its_buffers_to_the_pool(exploding_delta, slab_calls):  # noqa: F811
    tensors = make_tensors()
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    plan = stack_plan(1)
    plan["c.weight"] = [WeightPatch(full_module("boom.c", SHAPES["c.weight"], 4), 1.0)]
    with pytest.raises(Boom):
        engine.apply(plan)
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)
    assert engine.backup_bytes() == 0 and not engine.patched_keys
    assert engine.reserved_bytes() == sum(t.numel() * 4 for t in tensors.values())
    engine.apply(stack_plan(1))   # the retry reuses the buffers
    assert len(slab_calls) == 1
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_and_single_paths_share_the_pool(device, batch, slab_calls):
    """Same-shape batches (the GPU default) take their backups from the pool too; GPU backups on the GPU are not
    kept idle after a restore (torch's caching allocator reuses device memory)."""
    tensors = {f"w{i}.weight": torch.randn(24, 16).to(device) for i in range(6)}
    originals = {k: t.clone() for k, t in tensors.items()}
    plan = {k: [WeightPatch(lora_module(k, t.shape, 4, i), 0.7)] for i, (k, t) in enumerate(tensors.items())}
    engine = PatchEngine(tensors, batch_same_shape=batch)
    engine.apply(plan)
    first = _ptrs(engine)
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in tensors)
    engine.apply(plan)
    if device == "cpu":
        assert _ptrs(engine) == first and len(slab_calls) == 1
    else:
        assert engine.reserved_bytes() == 0 and len(slab_calls) == 2
    engine.restore()
    assert all(torch.equal(tensors[k], originals[k]) for k in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_cpu_slabs_are_mapped_with_their_pages_faulted_in_and_work_like_any_backup(monkeypatch, dtype):
    """From POPULATE_BYTES on, a CPU slab is an anonymous mapping populated by the kernel in one pass (Linux
    MAP_POPULATE; torch.empty elsewhere): backups carved from it hold the originals, survive the engine dropping
    its own reference to the slab, and restore exactly."""
    monkeypatch.setattr(engine_module, "POPULATE_BYTES", 1024)
    slab = engine_module._slab(4096, dtype, torch.device("cpu"), False)
    if engine_module._POPULATE:
        assert slab.untyped_storage().data_ptr() % 4096 == 0   # a mapping of its own, page-aligned
    tensors = make_tensors(dtype=dtype)
    originals = {k: t.clone() for k, t in tensors.items()}
    engine = PatchEngine(tensors)
    for cycle in range(3):
        engine.apply(stack_plan(2, strengths=[0.9 - 0.2 * cycle, 0.3]))
        assert all(torch.equal(engine._backups[k], originals[k]) for k in SHAPES), cycle
        engine.restore()
        assert all(torch.equal(tensors[k], originals[k]) for k in SHAPES), cycle
    engine.restore(release=True)
