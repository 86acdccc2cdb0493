"""The patch engine: applies LoRA deltas to a host's weights in place, exactly and transactionally.

Two users share the arithmetic in `patch_weight`:
  * `PatchEngine` patches a plain mapping of live tensors (a diffusers UNet, a transformers CLIP, any
    nn.Module's state dict): it keeps one backup per patched tensor, recomputes from that backup on every
    change (so there is no drift, ever), and restores bit-exactly.
  * ComfyUI's ModelPatcher, which keeps its own backups and calls our weight adapter with an fp32 copy of
    the weight (nodes/_patches.py): there only `patch_weight` runs.

Semantics (docs/ARCHITECTURE.md): for patches [(m1, s1), (m2, s2), ...] on W, in order,
W_i = W_{i-1} + s_i * D_i(W_{i-1}) (OFT/BOFT: W_{i-1} + adapters.delta_at(m_i, W_{i-1}, s_i), LyCORIS's
multiplier), computed in fp32 on W's device and cast back once. A strength of 0 skips the patch. Consecutive
low-rank patches are fused into one matmul over their concatenated ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch

from . import adapters
from .errors import LoraCoreError, LoraValueError
from .types import ModuleLora
from .weights import logical_shape


@dataclass(frozen=True)
class WeightPatch:
    """One adapter aimed at one host tensor. `strength` already includes any block factor.

    `rows` maps the module's output rows onto the host tensor's: ((host row, module row, count), ...), None =
    the whole module row for row (the module has as many rows as the weight). Fused weights use it both ways:
    a diffusers `to_q` LoRA writes rows 0..h of ComfyUI's fused `qkv`; a kohya fused `qkv` LoRA writes rows
    h..2h of its output to a diffusers `to_k`. `module_rows` is the module's own row count (0 = the weight's).
    `cols` scales the module's input columns: ((start, count, factor), ...) (block weights on the parts of a
    weight fused along its input, e.g. Flux's single-block linear2)."""

    module: ModuleLora
    strength: float
    target: str = "weight"  # "weight": the module's weight; "bias": its diff_b / b_norm
    rows: Optional[tuple[tuple[int, int, int], ...]] = None
    module_rows: int = 0
    cols: Optional[tuple[tuple[int, int, float], ...]] = None

    def module_shape(self, weight_shape) -> tuple[int, ...]:
        """The shape of the module's own delta on a weight of `weight_shape`."""
        if not self.module_rows:
            return tuple(weight_shape)
        return (self.module_rows, *tuple(weight_shape)[1:])

    def view_offset(self) -> Optional[int]:
        """Host row where the module's row 0 lands when its rows map onto the weight in one contiguous run
        (what a weight-dependent adapter needs: its W is that slice); None otherwise."""
        if self.rows is None:
            return 0
        offsets = {dst - src for dst, src, _ in self.rows}
        return offsets.pop() if len(offsets) == 1 else None


def _column_factors(cols, in_channels: int, width: int, device) -> Optional[torch.Tensor]:
    """(width,) fp32 multipliers of a delta's flattened columns (in_channels x kernel), or None without `cols`."""
    if cols is None:
        return None
    per = max(1, width // max(1, in_channels))
    factors = torch.ones(width, dtype=torch.float32)
    for start, count, factor in cols:
        factors[start * per:(start + count) * per] = factor
    return factors.to(device)


# Strengths and block factors past this are input errors, not styles: they only turn weights into overflow
# (an fp16 weight holds at most 65504). Bounded where they enter, so a bad value fails before anything is patched.
MAX_STRENGTH = 1e4


def check_strength(value: float, what: str, limit: Optional[float] = MAX_STRENGTH) -> float:
    """Strengths must be finite numbers within +-`limit`; NaN, inf or 1e30 would poison every patched weight."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LoraValueError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(value):
        raise LoraValueError(f"{what} is {value}; use a finite number such as 1.0 (0 disables the LoRA).")
    if limit is not None and abs(value) > limit:
        raise LoraValueError(f"{what} is {value:g}, out of range: use a value between {-limit:g} and {limit:g} "
                             f"(1.0 is full strength; 0 disables the LoRA).")
    return value


def _flat_view(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def patch_weight(weight: torch.Tensor, patches: Sequence[WeightPatch], key: str = "") -> torch.Tensor:
    """Apply `patches` to `weight` in place and return it.

    `weight` must be a floating tensor the caller allows us to overwrite, normally an fp32 working copy on
    the weight's device. Patches with strength 0 are skipped (a factor of 0 skips the key).
    """
    lowrank_run: list[tuple[WeightPatch, tuple]] = []   # consecutive plain low-rank patches and their factors

    def flush() -> None:
        # one matmul per row range over the run's concatenated ranks, with the engine's own arithmetic (_LowRank)
        if lowrank_run:
            run = _LowRank.build((), [parts for _, parts in lowrank_run], [p for p, _ in lowrank_run],
                                 weight.shape)
            strengths = [p.strength for p, _ in lowrank_run]
            if run.segmented:
                flat = _flat_view(weight)
                for start, count, ups, downs in run.segments(strengths):
                    if ups is not None:
                        flat[start:start + count].addmm_(ups.to(weight.dtype), downs.to(weight.dtype))
            else:
                ups, downs, alpha = run.factors(strengths)
                _flat_view(weight).addmm_(ups.to(weight.dtype), downs.to(weight.dtype), alpha=alpha)
            lowrank_run.clear()

    for patch in patches:
        if patch.strength == 0.0:
            continue
        if patch.target == "bias":
            flush()
            _add_rows(weight, _bias_delta(patch, weight), patch.strength, patch)
            continue
        parts = adapters.lowrank_parts(patch.module, torch.Size(patch.module_shape(weight.shape)), weight.device)
        if parts is not None:
            lowrank_run.append((patch, parts))
            continue
        flush()
        _add_rows(weight, *_module_delta(patch, weight, key), patch)
    flush()
    return weight


def _add_rows(weight: torch.Tensor, delta: Optional[torch.Tensor], alpha: float, patch: WeightPatch) -> None:
    """weight[rows] += alpha * delta[module rows] (the whole weight when the patch has no row map)."""
    if delta is None:
        return
    if patch.rows is None:
        weight.add_(delta.reshape(weight.shape).to(weight.dtype), alpha=alpha)
        return
    flat, rows = _flat_view(weight), delta.reshape(delta.shape[0], -1).to(weight.dtype)
    for dst, src, count in patch.rows:
        flat[dst:dst + count].add_(rows[src:src + count], alpha=alpha)


def _module_delta(patch: WeightPatch, weight: torch.Tensor, key: str) -> tuple[torch.Tensor, float]:
    """(delta, alpha): the module's own change (module rows x the weight's other dims) in fp32, columns scaled by
    `cols`, to be added times alpha. Linear algorithms give D(W) and alpha = strength; OFT/BOFT, whose strength
    acts on the rotation itself (LyCORIS's multiplier), give their change at that strength and alpha 1. A
    weight-dependent adapter sees the slice of `weight` its rows map to."""
    module = patch.module
    shape = patch.module_shape(weight.shape)
    if adapters.is_additive(module):
        view = weight if patch.rows is None else weight.new_empty(shape)
    else:
        offset = patch.view_offset()
        if offset is None or offset + shape[0] > weight.shape[0]:
            from .errors import LoraMatchError

            raise LoraMatchError(
                f"{module.name} ({module.algo}{'+DoRA' if module.dora_scale is not None else ''}) depends on the "
                f"weight it patches, but its rows land on {key} in pieces (a fused module on split weights): this "
                f"algorithm cannot be applied to this model's layout. Load it on a model that keeps the module "
                f"fused (ComfyUI's layout).")
        view = weight if patch.rows is None else weight[offset:offset + shape[0]]
    if adapters.strength_is_linear(module):
        delta, alpha = adapters.delta(module, view), patch.strength
    else:
        delta, alpha = adapters.delta_at(module, view, patch.strength), 1.0
    factors = _column_factors(patch.cols, shape[1] if len(shape) > 1 else 1, delta[0].numel(), delta.device)
    if factors is not None:
        delta = delta.reshape(delta.shape[0], -1).mul_(factors).reshape(delta.shape)
    return delta, alpha


def _bias_delta(patch: WeightPatch, bias: torch.Tensor) -> Optional[torch.Tensor]:
    module = patch.module
    if module.bias_diff is None:
        return None
    want = patch.module_rows or bias.numel()
    if module.bias_diff.numel() != want:
        from .errors import LoraMatchError

        raise LoraMatchError(
            f"{module.name}: bias delta has {module.bias_diff.numel()} values but the target bias has shape "
            f"{tuple(bias.shape)}; the LoRA was made for a different model.")
    return module.bias_diff.to(device=bias.device, dtype=torch.float32, copy=True).reshape(want, 1)


def validate_patches(key: str, tensor: torch.Tensor, patches: Sequence[WeightPatch]) -> None:
    """Cheap checks (shapes, strengths) run for every key before any weight is touched."""
    from .weights import logical_shape

    shape = logical_shape(tensor)
    for patch in patches:
        check_strength(patch.strength, f"strength for {patch.module.name}", MAX_STRENGTH ** 2)
        if patch.rows is not None and any(dst < 0 or dst + n > shape[0] for dst, _, n in patch.rows):
            from .errors import LoraMatchError

            raise LoraMatchError(f"{patch.module.name}: its rows do not fit {key} with shape {tuple(shape)}; the LoRA "
                                 f"was made for a different model size.")
        if patch.target == "weight":
            adapters.validate(patch.module, torch.Size(patch.module_shape(shape)), key)
        elif patch.module.bias_diff is not None and patch.module.bias_diff.numel() != (
                patch.module_rows or math.prod(shape)):
            from .errors import LoraMatchError

            raise LoraMatchError(
                f"{patch.module.name}: bias delta has {patch.module.bias_diff.numel()} values but {key} has "
                f"{math.prod(shape)}; the LoRA was made for a different model.")


_OVERFLOW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_overflow(patches: Mapping[str, Sequence[WeightPatch]], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse patches whose result would be Inf/NaN in the weight's dtype, naming the weight, the modules and their
    files. Cheap in the normal case: each patch's change is bounded from the LoRA's own tensors
    (adapters.delta_bound); only weights whose bound comes near the dtype's limit (or whose change depends on the
    weight) are computed exactly here. fp8 weights are left alone: ComfyUI saturates them."""
    from .weights import holds_values

    for key, items in patches.items():
        tensor = tensors.get(key)
        if tensor is None or tensor.dtype not in _OVERFLOW_DTYPES:
            continue
        limit = torch.finfo(tensor.dtype).max
        bounds = [adapters.delta_bound(p.module) for p in items]
        if all(b is not None for b in bounds) and sum(abs(p.strength) * b for p, b in zip(items, bounds)) < limit / 4:
            continue
        if any(b is None for b in bounds) and tensor.dtype == torch.float32:
            continue   # weight-dependent changes (DoRA, OFT, ...) stay within a few times |W|: fp32 cannot overflow
        if not holds_values(tensor):
            continue
        with torch.no_grad():
            result = patch_weight(tensor.detach().to(torch.float32, copy=True), items, key)
            peak = result.abs().max()
        if not torch.isfinite(peak) or float(peak) > limit:
            names = ", ".join(dict.fromkeys(f"{p.module.name}" + (f" ({p.module.source})" if p.module.source else "")
                                            for p in items))
            raise LoraValueError(
                f"patching {key} would overflow its {str(tensor.dtype).replace('torch.', '')} weight "
                f"(largest value {float(peak):.3g}, limit {limit:.3g}): {names}. The LoRA's strength, alpha or "
                f"block factor is far too large, or the file is damaged; nothing was patched.")


def _tensor_identity(tensor) -> tuple:
    if not isinstance(tensor, torch.Tensor):
        return (tensor,)
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


def _module_identity(module: ModuleLora) -> tuple:
    """What makes two ModuleLoras the same patch: the same tensor storage (not the same Python object), so a
    plan rebuilt from the same file (parse_modules makes new ModuleLora objects each time) is recognised and
    unchanged keys are not recomputed. The engine keeps the applied plan alive, so a storage address cannot
    be reused by other data while it is compared against."""
    tensors = tuple(sorted((role, _tensor_identity(t)) for role, t in module.tensors.items()))
    return (module.name, module.algo, module.alpha, tensors, _tensor_identity(module.dora_scale),
            _tensor_identity(module.bias_diff), tuple(sorted(module.flags.items())))


def _modules_of(signature: tuple) -> tuple:
    return tuple((identity, target) for identity, _, target in signature)


@dataclass
class _LowRank:
    """A key's active patches as one rank-concatenated product, kept between applies so a strength change finds
    its factors on the weight's device: W + ((up.float() * alpha/rank) * strength) @ down.float() per LoRA.

    The factors stay in the file's dtype and are not concatenated ahead of time: on a CPU they are the file's
    own tensors (no memory of their own), on a GPU one copy at the file's size. They are widened, scaled and
    concatenated when used. patch_weight (the ComfyUI adapter's path) uses the same arithmetic for its runs, so
    both give identical bits.

    Fused weights: a LoRA whose rows map onto part of the weight (`rows`) contributes to those rows only. The
    weight's rows are cut where any LoRA's rows start or end; each range is one addmm over the ranks of every
    LoRA that covers it (`segments`), so every row is written once whatever the number of parts and LoRAs."""

    idents: tuple                  # module identities of the active patches, strengths excluded
    ups: tuple[torch.Tensor, ...]  # per LoRA (out, r), file dtype, on the weight's device
    downs: tuple[torch.Tensor, ...]  # per LoRA (r, in); a Tucker core folded in (fp32)
    scales: tuple[float, ...]      # alpha/rank of each LoRA
    owned_bytes: int               # memory that is not the file's own tensors (device copies, Tucker folds)
    rows: tuple = ()               # per LoRA: WeightPatch.rows (None = whole)
    cols: tuple = ()               # per LoRA: column factors (fp32 (in,) tensor) or None
    out_rows: int = 0

    @classmethod
    def build(cls, idents: tuple, parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
              patches: Sequence["WeightPatch"], weight_shape) -> "_LowRank":
        def storage(t: torch.Tensor) -> int:
            return t.untyped_storage().data_ptr()

        owned = 0
        for (up, down, _), patch in zip(parts, patches):
            for mine, theirs in ((up, patch.module.tensors["up"]), (down, patch.module.tensors["down"])):
                if storage(mine) != storage(theirs):
                    owned += mine.numel() * mine.element_size()
        in_channels = weight_shape[1] if len(weight_shape) > 1 else 1
        cols = tuple(_column_factors(p.cols, in_channels, down.shape[1], down.device)
                     for p, (_, down, _) in zip(patches, parts))
        return cls(idents, tuple(p[0] for p in parts), tuple(p[1] for p in parts), tuple(p[2] for p in parts), owned,
                   tuple(p.rows for p in patches), cols, int(weight_shape[0]))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(down.shape[0] for down in self.downs)

    @property
    def segmented(self) -> bool:
        return any(r is not None for r in self.rows)

    def per_column(self, values) -> torch.Tensor:
        """(..., R): one value per LoRA (`values` (k,) or (G, k)) repeated over that LoRA's columns."""
        values = torch.tensor(values, dtype=torch.float32)
        return torch.repeat_interleave(values, torch.tensor(self.ranks), dim=-1).to(self.ups[0].device)

    def _down(self, i: int) -> torch.Tensor:
        down = self.downs[i].float()
        factors = self.cols[i] if self.cols else None
        if factors is None:
            return down
        return (down.clone() if down is self.downs[i] else down).mul_(factors)

    def wide(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ups, downs) concatenated over the LoRAs, in fp32, unscaled (column factors applied to downs)."""
        if len(self.ups) == 1:
            return self.ups[0].float(), self._down(0)
        return (torch.cat([u.float() for u in self.ups], dim=1), torch.cat([self._down(i) for i in range(len(self.ups))]))

    def factors(self, strengths: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(ups, downs, alpha) in fp32 for one addmm. One LoRA keeps its strength as alpha (no extra pass)."""
        ups, downs = self.wide()
        # scale in place when widening made a new tensor (never the file's own fp32 tensor)
        own = len(self.ups) > 1 or self.ups[0].dtype != torch.float32
        if len(self.ups) == 1:
            return (ups.mul_(self.scales[0]) if own else ups * self.scales[0]), downs, strengths[0]
        ups = ups.mul_(self.per_column(self.scales)) if own else ups * self.per_column(self.scales)
        return ups.mul_(self.per_column(strengths)), downs, 1.0

    def segments(self, strengths: Sequence[float]) -> list[tuple[int, int, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """[(first row, row count, ups, downs)] covering every row of the weight once, in order: ups/downs in
        fp32, scaled like `factors`, concatenated over the LoRAs that write those rows; None for rows no LoRA
        writes (a re-patch copies them from the backup)."""
        spans = [r if r is not None else ((0, 0, self.out_rows),) for r in self.rows]
        cuts = {0, self.out_rows}
        for span in spans:
            for dst, _, n in span:
                cuts.update((dst, dst + n))
        bounds = sorted(c for c in cuts if 0 <= c <= self.out_rows)
        downs = [self._down(i) for i in range(len(self.ups))]
        out = []
        for a, b in zip(bounds, bounds[1:]):
            ups, ds = [], []
            for i, span in enumerate(spans):
                if strengths[i] == 0.0:
                    continue
                for dst, src, n in span:
                    if dst <= a and b <= dst + n:
                        lo = src + (a - dst)
                        ups.append(self.ups[i][lo:lo + (b - a)].float() * (self.scales[i] * strengths[i]))
                        ds.append(downs[i])
            if ups:
                out.append((a, b - a, ups[0] if len(ups) == 1 else torch.cat(ups, dim=1),
                            ds[0] if len(ds) == 1 else torch.cat(ds)))
            else:
                out.append((a, b - a, None, None))
        return out


def _pinned(tensor: torch.Tensor, device: torch.device) -> bool:
    # a GPU weight backed up in CPU memory: pinned, so copies to and from the GPU run at full PCIe speed
    return device.type == "cpu" and tensor.device.type == "cuda"


# CPU slabs from this size on are mapped with their pages faulted in by the kernel in one pass (MAP_POPULATE).
# Measured on a 2-vCPU KVM guest, 2 GiB then filled: 1.09-1.15 s in every run, against 1.2-3.7 s for
# torch.empty's pages faulted one by one by the copy (and 0.41 s for memory already touched).
POPULATE_BYTES = 64 << 20


def _slab(numel: int, dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    if pinned:
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes >= POPULATE_BYTES and _POPULATE:
        try:
            import mmap

            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
            return torch.frombuffer(region, dtype=dtype, count=numel)   # the tensor keeps the mapping alive
        except (OSError, ValueError, TypeError, RuntimeError):
            pass
    # Huge-page mappings were measured and rejected: each backup then faults in fresh pages (and may wait on
    # compaction), while torch.empty reuses memory the allocator already holds.
    return torch.empty(numel, dtype=dtype)


def _populate_flag() -> int:
    import mmap

    return getattr(mmap, "MAP_POPULATE", 0)


_POPULATE = _populate_flag()


_SLAB_ALIGN = 64   # bytes: every carved buffer starts on a cache line (vectorised copies, addmm)


class BackupPool:
    """Backup storage of one PatchEngine, kept for reuse (issue: a first patch paid page faults on freshly
    allocated backup memory, 0.5-4.4 s for the same work depending on what the allocator happened to hold).

    * `take(keys)` gives each key a buffer of its tensor's shape / dtype: one a patch/restore cycle returned
      (same memory, nothing allocated, no page fault), else carved out of one new slab per (device, dtype,
      pinned) for all the keys of this call: one allocation whose pages the backup copies fault in, in one pass.
    * `give(buffer)` takes a buffer back when its key is restored; a later patch of a tensor of that shape
      reuses it.
    * `release()` frees the idle buffers (a slab's memory goes back once none of its buffers is in use).

    Idle CPU memory is kept (`PatchEngine(keep_backup_storage=...)`, on for CPU backups): there the cost of fresh
    memory is page faults on every first touch. GPU backups are not kept: torch's caching allocator already
    reuses device memory, and idle VRAM would be taken from sampling."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._idle: dict[tuple, dict[str, torch.Tensor]] = {}   # kind -> {key it last backed up: buffer}
        self.allocations = 0   # slabs allocated so far (tests: a reused cycle allocates none)

    @staticmethod
    def _kind(tensor: torch.Tensor, device: torch.device) -> tuple:
        return (tuple(tensor.shape), tensor.dtype, device, _pinned(tensor, device))

    def take(self, wanted: Sequence[tuple[str, torch.Tensor, torch.device]]) -> list[torch.Tensor]:
        """A buffer per (key, tensor, backup device): an idle one of that kind (the key's own last buffer when it
        is idle), the rest from one slab per (device, dtype, pinned)."""
        out: list[Optional[torch.Tensor]] = []
        fresh: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for index, (key, tensor, device) in enumerate(wanted):
            idle = self._idle.get(self._kind(tensor, device))
            if idle:
                out.append(idle.pop(key) if key in idle else idle.pop(next(iter(idle))))
                continue
            out.append(None)
            fresh.setdefault((device, tensor.dtype, _pinned(tensor, device)), []).append((index, tensor))
        for (device, dtype, pinned), members in fresh.items():
            align = max(1, _SLAB_ALIGN // torch.empty((), dtype=dtype).element_size())
            sizes = [-(-t.shape.numel() // align) * align for _, t in members]
            slab = _slab(sum(sizes), dtype, device, pinned)
            self.allocations += 1
            offset = 0
            for (index, tensor), size in zip(members, sizes):
                out[index] = slab[offset:offset + tensor.shape.numel()].view(tensor.shape)
                offset += size
        return out  # type: ignore[return-value]

    def give(self, key: str, buffer: torch.Tensor, tensor: torch.Tensor) -> None:
        if self.keep:
            idle = self._idle.setdefault(self._kind(tensor, buffer.device), {})
            if key in idle:   # the key's earlier idle buffer goes under a fresh name: both stay usable
                idle[f"{key}\0{id(idle[key])}"] = idle.pop(key)
            idle[key] = buffer

    def idle_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self._idle.values() for b in bufs.values())

    def release(self) -> None:
        self._idle.clear()


# ------------------------------------------------------------------------------- same-shape batches

BATCH_BYTES = 256 << 20   # fp32 working set of one batched GEMM: bounds the temporary memory of a batch


def _stack_to(tensors: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stack on the tensors' own device (one copy there), then one transfer / cast to the compute device."""
    return torch.stack(list(tensors)).to(device, dtype)


def _copy_all(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """dst[i] <- src[i] for many tensors in as few kernels as the backend allows."""
    destinations, sources = list(destinations), list(sources)
    same = {(t.device, t.dtype) for t in destinations + sources}
    if hasattr(torch, "_foreach_copy_") and len(same) == 1:
        torch._foreach_copy_(destinations, sources)
    else:  # across devices (a GPU weight's pinned CPU backup) or dtypes, or torch < 2.1: one copy each
        for dst, src in zip(destinations, sources):
            dst.copy_(src)


class PatchEngine:
    """Patches a mapping of live tensors (name -> Parameter/Tensor) in place.

    * one backup per patched tensor, taken on first patch (on `backup_device`, default the tensor's own;
      pinned CPU memory when `backup_device="cpu"` and the tensor is on a GPU;);
    * a tensor that still holds its original values is patched where it is (no copy from the backup);
    * `apply(plan)` makes the tensors equal to backup + plan: keys whose patch list is unchanged are not
      touched, changed keys are recomputed from their backup (no drift), keys no longer in the plan are
      restored;
    * all-or-nothing: every key is validated before any write, and a failure part-way restores each key
      touched in that call to its previous state;
    * `restore()` copies every backup back (bit-exact) and frees them.

    Patches are compared by the storage of their modules' tensors, and a ModuleLora's identity is remembered
    while it is applied: treat a ModuleLora as read-only once applied (a changed LoRA is a new ModuleLora).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], backup_device: Optional[str | torch.device] = None,
                 batch_same_shape: Optional[bool] = None, keep_backup_storage: Optional[bool] = None):
        """`batch_same_shape`: patch weights of one shape, dtype and device together (a batched GEMM and a few
        multi-tensor copies per group instead of ~5 kernels per weight). None = on CUDA only, where kernel
        launches and per-weight Python dominate a patch; on a CPU each weight is a large enough job already.

        `keep_backup_storage`: keep the backup memory of restored tensors for the next patch (BackupPool), so
        only the engine's first patch pays for fresh memory; `release_backup_storage()` frees it. None = keep
        CPU backup memory (backups of CPU weights, pinned backups of GPU weights), not GPU memory."""
        self.tensors = dict(tensors)
        self.backup_device = torch.device(backup_device) if backup_device is not None else None
        self.batch_same_shape = batch_same_shape
        if keep_backup_storage is None:
            devices = {self.backup_device} if self.backup_device is not None else {
                t.device for t in self.tensors.values() if isinstance(t, torch.Tensor)}
            keep_backup_storage = all(d.type == "cpu" for d in devices)
        self._pool = BackupPool(keep_backup_storage)
        self._backups: dict[str, torch.Tensor] = {}
        self._applied: dict[str, tuple[Sequence[WeightPatch], tuple]] = {}
        self._lowranks: dict[str, _LowRank] = {}   # per patched key, while its modules stay the same
        # id(module) -> (module, identity) for the modules of the applied plan: a plan rebuilt from the same parsed
        # file (formats.parse_modules keeps its result) is compared without walking every module's tensors
        self._identities: dict[int, tuple[ModuleLora, tuple]] = {}

    @classmethod
    def for_module(cls, module: torch.nn.Module, **kwargs) -> "PatchEngine":
        return cls(dict(module.state_dict(keep_vars=True)), **kwargs)

    @property
    def patched_keys(self) -> set[str]:
        return set(self._applied)

    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._backups.values())

    def reserved_bytes(self) -> int:
        """Backup memory kept idle for the next patch (restored tensors' buffers; see BackupPool)."""
        return self._pool.idle_bytes()

    def release_backup_storage(self) -> None:
        """Free the idle backup memory (the backups of patched tensors stay)."""
        self._pool.release()

    def reserve(self, keys: Iterable[str]) -> None:
        """Take and fault in backup memory for `keys` now (one slab, one write pass), so the first patch of those
        tensors costs what a later one does: for callers that know what they will patch ahead of time (a model
        load, a benchmark's setup). Needs keep_backup_storage."""
        wanted = [k for k in dict.fromkeys(keys) if k not in self._backups]
        buffers = self._pool.take([(k, self._tensor(k), self.backup_device or self._tensor(k).device)
                                   for k in wanted])
        for key, buffer in zip(wanted, buffers):
            buffer.zero_()
            self._pool.give(key, buffer, self.tensors[key])

    def _drop_backup(self, key: str) -> None:
        self._pool.give(key, self._backups.pop(key), self.tensors[key])

    def _new_backups(self, keys: Sequence[str]) -> None:
        """Backups of `keys` (not backed up yet), buffers from the pool, filled from the live tensors."""
        keys = [k for k in keys if k not in self._backups]
        if not keys:
            return
        tensors = [self._tensor(k) for k in keys]
        buffers = self._pool.take([(k, t, self.backup_device or t.device) for k, t in zip(keys, tensors)])
        try:
            _copy_all(buffers, [t.detach() for t in tensors])
        except BaseException:
            for key, tensor, buffer in zip(keys, tensors, buffers):
                self._pool.give(key, buffer, tensor)
            raise
        self._backups.update(zip(keys, buffers))

    def _signature(self, patches: Sequence[WeightPatch]) -> tuple:
        return tuple(((self._identity(p.module), p.rows, p.module_rows, p.cols), p.strength, p.target)
                     for p in patches)

    def _identity(self, module: ModuleLora) -> tuple:
        known = self._identities.get(id(module))
        if known is not None and known[0] is module:
            return known[1]
        identity = _module_identity(module)
        self._identities[id(module)] = (module, identity)
        return identity

    def factor_bytes(self) -> int:
        """Memory of the low-rank factors kept for re-patching that the LoRA files do not already hold: copies on
        another device than the files' and concatenated stacks (a single CPU LoRA's factors are its own)."""
        return sum(entry.owned_bytes for entry in self._lowranks.values())

    def _lowrank(self, key: str, patches: Sequence[WeightPatch], signature: tuple,
                 tensor: torch.Tensor) -> Optional[tuple[_LowRank, list[float]]]:
        """(factors, strengths) when every active patch of `key` is a plain low-rank one, else None. The factors
        are gathered on the weight's device once per set of modules and reused while only strengths change (a
        strength or block-vector change then re-checks no shapes and copies nothing to the device)."""
        active = [(patch, ident) for patch, (ident, _, _) in zip(patches, signature) if patch.strength != 0.0]
        if not active or any(patch.target != "weight" for patch, _ in active):
            return None
        idents = tuple(ident for _, ident in active)
        strengths = [patch.strength for patch, _ in active]
        cached = self._lowranks.get(key)
        if cached is not None and cached.idents == idents and cached.ups[0].device == tensor.device:
            return cached, strengths
        shape = logical_shape(tensor)
        parts = [adapters.lowrank_parts(patch.module, torch.Size(patch.module_shape(shape)), tensor.device)
                 for patch, _ in active]
        if any(p is None for p in parts):
            return None
        entry = _LowRank.build(idents, parts, [patch for patch, _ in active], shape)
        self._lowranks[key] = entry
        return entry, strengths

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise LoraCoreError(f"patch plan names {key!r}, which is not a tensor of this model.") from None

    def _backup(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        saved = self._backups.get(key)
        if saved is None:
            self._new_backups([key])
            saved = self._backups[key]
        return saved

    def _write(self, key: str, patches: Sequence[WeightPatch], signature: tuple, pristine: bool = False) -> None:
        """tensor := backup + patches, computed in fp32 and written once.

        A plain low-rank stack is one addmm: on an fp32 tensor in place when it is `pristine` (still equal to
        its backup), else reading the backup and writing the tensor in one pass. Other dtypes go through one
        fp32 working copy and are rounded once; a pristine tensor is its own source, so a GPU weight with a CPU
        backup is not read back over PCIe. Other adapters run through patch_weight, in order."""
        tensor = self._tensor(key)
        original = self._backup(key, tensor)
        lowrank = self._lowrank(key, patches, signature, tensor)
        with torch.no_grad():
            fp32_in_place = tensor.dtype == torch.float32 and tensor.is_contiguous()
            if lowrank is not None and lowrank[0].segmented:
                (entry, strengths), source = lowrank, tensor if pristine else original
                in_place = fp32_in_place and source.device == tensor.device
                work = tensor if in_place else source.to(tensor.device, torch.float32, copy=True)
                flat, backup = _flat_view(work), _flat_view(original)
                for start, count, ups, downs in entry.segments(strengths):
                    rows = flat[start:start + count]
                    if ups is None:
                        if in_place and not pristine:
                            rows.copy_(backup[start:start + count])
                    elif in_place and not pristine:
                        torch.addmm(backup[start:start + count], ups, downs, out=rows)
                    else:
                        rows.addmm_(ups, downs)
                if not in_place:
                    tensor.copy_(work)
                return
            if lowrank is not None:
                (entry, strengths), source = lowrank, tensor if pristine else original
                ups, downs, alpha = entry.factors(strengths)
                if fp32_in_place and source.device == tensor.device:
                    if pristine:
                        _flat_view(tensor).addmm_(ups, downs, alpha=alpha)
                    else:
                        torch.addmm(_flat_view(original), ups, downs, alpha=alpha, out=_flat_view(tensor))
                    return
                work = source.to(tensor.device, torch.float32, copy=True)
                _flat_view(work).addmm_(ups, downs, alpha=alpha)
                tensor.copy_(work)
                return
            if fp32_in_place:
                if not pristine:
                    tensor.copy_(original)
                patch_weight(tensor, patches, key)
                return
            work = (tensor if pristine else original).to(tensor.device, torch.float32, copy=True)
            patch_weight(work, patches, key)
            tensor.copy_(work)

    def _batches(self, keys: Sequence[str], plan: Mapping[str, Sequence[WeightPatch]], signatures: Mapping):
        """Split `keys` into same-shape batches [(pristine, [(key, factors, strengths)])] and the keys written one
        by one."""
        groups: dict[tuple, list] = {}
        single: list[str] = []
        for key in keys:
            tensor = self._tensor(key)
            batch = self.batch_same_shape if self.batch_same_shape is not None else tensor.device.type == "cuda"
            lowrank = (self._lowrank(key, plan[key], signatures[key], tensor)
                       if batch and tensor.is_floating_point() and tensor.is_contiguous() else None)
            if lowrank is None or lowrank[0].segmented:
                single.append(key)
                continue
            pristine = key not in self._applied
            entry = lowrank[0]
            group = (tuple(tensor.shape), tensor.dtype, tensor.device, pristine, entry.ranks,
                     tuple(t.dtype for t in entry.ups + entry.downs))
            groups.setdefault(group, []).append((key, *lowrank))
        batches = []
        for (shape, _, _, pristine, *_), members in groups.items():
            if len(members) == 1:
                single.append(members[0][0])
                continue
            per_batch = max(1, BATCH_BYTES // (4 * math.prod(shape)))
            batches += [(pristine, members[i:i + per_batch]) for i in range(0, len(members), per_batch)]
        return batches, single

    def _write_batch(self, pristine: bool, members: Sequence[tuple[str, _LowRank, list[float]]]) -> None:
        """tensor_i := backup_i + ups_i @ downs_i for same-shape tensors with the same ranks: a few stacks, one
        column scaling, one baddbmm, one cast and one multi-tensor copy, whatever the number of weights. Same
        arithmetic as `_write` (fp32, one rounding); the bits may differ from it in the last place where the
        batched GEMM sums in another order."""
        keys = [key for key, _, _ in members]
        lives = [self._tensor(k) for k in keys]
        first = lives[0]
        rows = first.shape[0]
        self._new_backups(keys)
        sources = lives if pristine else [self._backups[k] for k in keys]
        with torch.no_grad():
            work = _stack_to([t.detach().reshape(rows, -1) for t in sources], first.device, torch.float32)
            # the same products as _LowRank.factors: widen, times alpha/rank, times strength, per column
            if len(members[0][1].ups) == 1:
                ups = torch.stack([entry.ups[0] for _, entry, _ in members]).float()
                downs = torch.stack([entry.downs[0] for _, entry, _ in members]).float()
            else:
                wide = [entry.wide() for _, entry, _ in members]
                ups, downs = torch.stack([w[0] for w in wide]), torch.stack([w[1] for w in wide])
            columns = members[0][1].per_column   # every member of a batch has the same ranks
            ups *= columns([entry.scales for _, entry, _ in members]).unsqueeze(1)
            ups *= columns([strengths for _, _, strengths in members]).unsqueeze(1)
            work.baddbmm_(ups, downs)
            if first.dtype != torch.float32:
                work = work.to(first.dtype)
            _copy_all([t.detach().view(rows, -1) for t in lives], work.unbind(0))

    def _restore_key(self, key: str) -> None:
        with torch.no_grad():
            self.tensors[key].copy_(self._backups[key])

    def apply(self, plan: Mapping[str, Sequence[WeightPatch]]) -> dict[str, int]:
        """Make the model equal to its original weights plus `plan`. Returns counts of what was done."""
        plan = {key: list(patches) for key, patches in plan.items() if patches}
        signatures = {k: self._signature(p) for k, p in plan.items()}
        to_write = [k for k in plan if k not in self._applied or self._applied[k][1] != signatures[k]]
        for key in to_write:
            # Unchanged keys were validated when written; a key whose modules are the same (only strengths
            # differ) needs only its strengths checked.
            applied = self._applied.get(key)
            if applied is not None and _modules_of(applied[1]) == _modules_of(signatures[key]):
                for patch in plan[key]:
                    check_strength(patch.strength, f"strength for {patch.module.name}", MAX_STRENGTH ** 2)
            else:
                validate_patches(key, self._tensor(key), plan[key])
        check_overflow({k: plan[k] for k in to_write}, self.tensors)
        to_restore = [k for k in self._applied if k not in plan]
        previous = dict(self._applied)
        done: list[str] = []
        try:
            # every new backup of this call at once: buffers from the pool, the rest carved from one slab
            self._new_backups(to_write)
            batches, single = self._batches(to_write, plan, signatures)
            for pristine, members in batches:
                done.extend(key for key, _, _ in members)
                self._write_batch(pristine, members)
            for key in single:
                # Listed before the write: an fp32 tensor is patched in place, so a failure inside
                # patch_weight leaves it half-written and it must be rolled back too.
                done.append(key)
                self._write(key, plan[key], signatures[key], pristine=key not in self._applied)
            for key in to_restore:
                done.append(key)
                self._restore_key(key)
        except BaseException:
            self._rollback(done, previous)
            raise
        for key in to_write:
            self._applied[key] = (plan[key], signatures[key])
        for key in to_restore:
            del self._applied[key]
            self._drop_backup(key)
            self._lowranks.pop(key, None)
        live = {id(p.module) for patches in plan.values() for p in patches}
        self._identities = {i: known for i, known in self._identities.items() if i in live}
        return {"written": len(to_write), "restored": len(to_restore), "unchanged": len(plan) - len(to_write)}

    def _rollback(self, keys: Iterable[str], previous: Mapping[str, tuple]) -> None:
        for key in keys:
            if key in previous:
                self._write(key, *previous[key])
            elif key in self._backups:  # a failure before the backup was taken changed nothing
                self._restore_key(key)
        for key in list(self._backups):
            if key not in previous:
                self._drop_backup(key)
        for key in list(self._lowranks):
            if key not in previous:
                del self._lowranks[key]
        live = {id(p.module) for patches, _ in previous.values() for p in patches}
        self._identities = {i: known for i, known in self._identities.items() if i in live}

    def restore(self, release: bool = False) -> None:
        """Put every patched tensor back exactly as it was and drop the backups. Their memory stays with the
        engine for the next patch when it keeps backup storage (see __init__), unless `release`."""
        for key in list(self._applied):
            self._restore_key(key)
        self._applied.clear()
        for key in list(self._backups):
            self._drop_backup(key)
        if release:
            self._pool.release()
        self._lowranks.clear()
        self._identities.clear()
