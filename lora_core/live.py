"""Live LoRA: the LoRA applied at forward time, `y = W x + b + Σ_i s_i · B_i (A_i x)`, never merged into W.

Pure torch (no ComfyUI). A plan ({host tensor key: [WeightPatch]}, lora_core.api) is split by `split_plan`
into the part that has a cheap factored form (plain LoRA / LoCon, Tucker `mid` folded into the down factor, the
bias diff `diff_b`) and the rest (LoHa, LoKr, DoRA, OFT/BOFT, GLoRA, (IA)^3, full diffs: their delta depends on
W or has no low-rank form), which the caller applies as merged patches and reports. A module goes live only as a
whole: when any patch on its weight or bias cannot, every patch of that module is merged, so the result equals
the merged loaders' (`W_i = W_{i-1} + s_i D_i(W_{i-1})` for a weight-dependent patch after a low-rank one).

What lives where:

* `FactorStore`: the factors, concatenated over the LoRAs aimed at one layer (one matmul per layer for a whole
  stack), with rows of fused weights scattered into place, keyed by *which* modules they hold (never by
  strength), once on the CPU in fp32 and once per (device, dtype) where they are used. A strength or block
  change builds a new `LiveSet` over the same store: no factor is recomputed or moved.
* `LiveSet`: the scalar table of one set of strengths: per rank its multiplier `strength x block factor x
  alpha / rank`, per input column group its block factors (weights fused along their input), per layer the
  summed bias delta. All of it is one flat fp32 tensor, copied to a device once (a few KB) when first used there.
* `LiveLayer.add(module, x, out)`: the forward-time term for one host module (Linear or ConvNd), in the compute
  dtype of `x` (the LoRA never passes through a quantised weight's storage dtype).

The math equals the merged weight `W + Σ s_i U_i D_i` to the rounding of the compute dtype.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from . import adapters
from .engine import WeightPatch

F32 = torch.float32


def module_key(tensor_key: str) -> str:
    """`a.b.weight` / `a.b.bias` -> `a.b` (the module the tensor belongs to)."""
    for suffix in (".weight", ".bias"):
        if tensor_key.endswith(suffix):
            return tensor_key[: -len(suffix)]
    return tensor_key


@dataclass(frozen=True)
class LayerForm:
    """How a host module computes its output from `x`: "linear" (`x @ W.T`) or "conv" (N spatial dims, the
    module's stride / padding / dilation, groups 1, zero padding). Read from the host module by the caller."""

    kind: str
    dims: int = 0
    stride: tuple = ()
    padding: object = ()
    dilation: tuple = ()


def layer_form(module) -> tuple[Optional[LayerForm], str]:
    """(form, "") for a torch Linear / Conv1d/2d/3d (ComfyUI's ops subclass them), else (None, why not)."""
    if isinstance(module, torch.nn.Linear):
        return LayerForm("linear"), ""
    for dims, cls in ((1, torch.nn.Conv1d), (2, torch.nn.Conv2d), (3, torch.nn.Conv3d)):
        if isinstance(module, cls):
            if module.groups != 1:
                return None, f"grouped convolution (groups={module.groups})"
            if getattr(module, "padding_mode", "zeros") != "zeros":
                return None, f"padding mode {module.padding_mode}"
            return LayerForm("conv", dims, tuple(module.stride), module.padding, tuple(module.dilation)), ""
    return None, f"a {type(module).__name__} layer (live mode handles Linear and Conv layers)"


def live_reason(patch: WeightPatch, weight_shape) -> str:
    """"" when the patch has a factored form on a weight of `weight_shape`, else why it is merged instead."""
    module = patch.module
    if patch.target == "bias":
        return "" if module.bias_diff is not None else "bias patch without a bias diff"
    if module.dora_scale is not None:
        return f"{module.algo}+DoRA (the magnitude depends on the weight)"
    if module.algo != "lora":
        return f"{module.algo} (no low-rank factored form)"
    # The plan validated the patch against this weight (adapters.validate: same output rows and element count),
    # which is all lowrank_parts needs; _build_factors raises if an unvalidated one does not fit.
    return ""


@dataclass
class LiveSplit:
    """`live`: {module key: {"weight": [WeightPatch], "bias": [WeightPatch]}} applied at forward time;
    `merged`: the plan entries applied as merged patches; `fallback`: reason -> number of modules merged."""

    live: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)
    fallback: Counter = field(default_factory=Counter)
    forms: dict = field(default_factory=dict)       # module key -> LayerForm of the live layers

    def text(self) -> str:
        lines = [f"Live mode: {len(self.live)} layers applied at forward time (W x + s·B(A x))"]
        if self.fallback:
            lines.append(f"  merged instead (no factored form): {sum(self.fallback.values())} modules")
            lines.extend(f"    {why}: {n}" for why, n in sorted(self.fallback.items()))
        return "\n".join(lines)


def split_plan(patches: Mapping[str, Sequence[WeightPatch]], shapes: Mapping[str, torch.Size],
               form_of: Callable[[str], tuple[Optional[LayerForm], str]]) -> LiveSplit:
    """Split a plan into live layers and merged patches. `form_of(module key)` gives the host module's
    LayerForm (or None and why); a module goes live only when its form is known and every patch on its
    weight and bias has a factored form."""
    by_module: dict[str, dict[str, list[WeightPatch]]] = {}
    for key, items in patches.items():
        if not items:
            continue
        part = "bias" if key.endswith(".bias") else "weight"
        by_module.setdefault(module_key(key), {}).setdefault(part, []).extend(items)
    split = LiveSplit()
    for mkey, parts in by_module.items():
        form, why = form_of(mkey)
        if form is not None:
            weight_shape = shapes.get(mkey + ".weight")
            for part, items in parts.items():
                for patch in items:
                    why = live_reason(patch, weight_shape) if weight_shape is not None else "no weight"
                    if why:
                        break
                if why:
                    break
        if form is None or why:
            split.fallback[why] += 1
            for part, items in parts.items():
                split.merged[mkey + "." + part] = list(items)
        else:
            split.live[mkey] = parts
            split.forms[mkey] = form
    return split


# ------------------------------------------------------------------------------------------ factor store

def _term_identity(patch: WeightPatch) -> tuple:
    return (id(patch.module), patch.rows, patch.module_rows)


class _Factors:
    """One layer's concatenated factors: down (R, in*k) and up (out, R) in fp32 on the CPU (the file's tensors
    widened once), plus copies per (device, dtype) made when first used there."""

    __slots__ = ("keep", "down", "up", "ranks", "copies", "nbytes")

    def __init__(self, keep, down, up, ranks):
        self.keep, self.down, self.up, self.ranks = keep, down, up, ranks
        self.copies: dict = {}
        self.nbytes = (down.numel() + up.numel()) * 4

    def on(self, device, dtype):
        slot = (device, dtype)
        got = self.copies.get(slot)
        if got is None:
            got = self.copies[slot] = (self.down.to(device=device, dtype=dtype),
                                       self.up.to(device=device, dtype=dtype))
        return got


class FactorStore:
    """Factors by the set of modules they hold (not by strength), least recently used first out past
    `max_bytes` of CPU fp32 factors. Shared by every LiveSet of a model so a strength change reuses them."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, _Factors]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.built = 0   # how many factor groups were ever built (tests: a strength change builds none)

    def get(self, signature: tuple, patches: Sequence[WeightPatch], weight_shape) -> _Factors:
        with self._lock:
            entry = self._entries.get(signature)
            if entry is not None:
                self._entries.move_to_end(signature)
                return entry
        entry = _build_factors(patches, weight_shape)
        with self._lock:
            self.built += 1
            self._entries[signature] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
        return entry

    def device_bytes(self) -> int:
        return sum(d.numel() * d.element_size() + u.numel() * u.element_size()
                   for e in self._entries.values() for d, u in e.copies.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _build_factors(patches: Sequence[WeightPatch], weight_shape) -> _Factors:
    out_rows = int(weight_shape[0])
    downs, ups, ranks = [], [], []
    for patch in patches:
        parts = adapters.lowrank_parts(patch.module, torch.Size(patch.module_shape(weight_shape)))
        if parts is None:
            from .errors import LoraMatchError

            raise LoraMatchError(f"{patch.module.name}: its lora factors give a delta that does not fit a weight "
                                 f"of shape {tuple(weight_shape)}; the LoRA was made for a different model.")
        up2d, down2d, _ = parts
        up2d, down2d = up2d.to(F32), down2d.to(F32)
        rank = down2d.shape[0]
        if patch.rows is None:
            up_host = up2d
        else:
            up_host = torch.zeros(out_rows, rank, dtype=F32)
            for dst, src, count in patch.rows:
                up_host[dst:dst + count] = up2d[src:src + count]
        downs.append(down2d)
        ups.append(up_host)
        ranks.append(rank)
    down = torch.cat(downs, 0) if len(downs) > 1 else downs[0].contiguous()
    up = torch.cat(ups, 1) if len(ups) > 1 else ups[0].contiguous()
    return _Factors(tuple(p.module for p in patches), down, up, tuple(ranks))


# ------------------------------------------------------------------------------------------ scalar table

def _alpha_scale(module) -> float:
    """alpha / rank, the factor lowrank_parts reports (1 without alpha)."""
    return adapters._rank_scale(module.alpha, module.tensors["down"].shape[0])


def _column_vector(cols, in_channels: int) -> list[float]:
    values = [1.0] * in_channels
    for start, count, factor in cols:
        values[start:start + count] = [float(factor)] * count
    return values


class _Group:
    """Low-rank terms of one layer that share their input scaling (none, or one patch's column factors)."""

    __slots__ = ("factors", "scale_at", "cols_at", "rank")

    def __init__(self, factors: _Factors, scale_at: int, cols_at: Optional[int]):
        self.factors, self.scale_at, self.cols_at = factors, scale_at, cols_at
        self.rank = factors.down.shape[0]


class LiveLayer:
    """The forward-time LoRA of one host module: groups of concatenated factors + offsets into the scalar table."""

    __slots__ = ("key", "form", "groups", "bias_at", "out_features", "in_channels", "kernel", "owner")

    def __init__(self, key: str, form: LayerForm, groups, bias_at, out_features, in_channels, kernel, owner):
        self.key, self.form, self.groups, self.bias_at = key, form, groups, bias_at
        self.out_features, self.in_channels, self.kernel, self.owner = out_features, in_channels, kernel, owner

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the module's own output for input `x`) plus this layer's LoRA terms, in `out`'s dtype."""
        dtype, device = out.dtype, out.device
        table = self.owner.table_on(device, dtype)
        inplace = not torch.is_grad_enabled() and out.is_contiguous()
        x = x.to(dtype) if x.dtype != dtype else x
        conv = self.form.kind == "conv"
        for group in self.groups:
            down, up = group.factors.on(device, dtype)
            scale = table[group.scale_at:group.scale_at + group.rank]
            xin = x
            if group.cols_at is not None:
                cols = table[group.cols_at:group.cols_at + self.in_channels]
                xin = x * (cols.view(1, -1, *([1] * self.form.dims)) if conv else cols)
            if conv:
                conv_fn = _CONV[self.form.dims]
                h = conv_fn(xin, down.view(group.rank, self.in_channels, *self.kernel), None,
                            self.form.stride, self.form.padding, self.form.dilation)
                h = h * scale.view(1, -1, *([1] * self.form.dims))
                delta = conv_fn(h, up.view(self.out_features, group.rank, *([1] * self.form.dims)))
                out = out.add_(delta) if inplace else out + delta
            else:
                h = F.linear(xin, down)
                h = h.mul_(scale) if not torch.is_grad_enabled() else h * scale
                if inplace:
                    out.view(-1, self.out_features).addmm_(h.reshape(-1, group.rank), up.t())
                else:
                    out = out + F.linear(h, up)
        if self.bias_at is not None:
            bias = table[self.bias_at:self.bias_at + self.out_features]
            bias = bias.view(1, -1, *([1] * self.form.dims)) if conv else bias
            out = out.add_(bias) if inplace else out + bias
        return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LiveSet:
    """Every live layer of one set of strengths, with its scalar table.

    `layers`: {module key: LiveLayer}. `patches`: the plan entries the layers hold ({tensor key: [WeightPatch]}),
    which is what baking merges. Building one costs no factor work when `store` already holds the modules."""

    def __init__(self, split: LiveSplit, shapes: Mapping[str, torch.Size], store: FactorStore):
        values: list[float] = []
        self.layers: dict[str, LiveLayer] = {}
        self.patches: dict[str, list[WeightPatch]] = {}
        self.store = store
        for mkey, parts in split.live.items():
            form = split.forms[mkey]
            weight_shape = tuple(shapes[mkey + ".weight"])
            out_features = int(weight_shape[0])
            in_channels = int(weight_shape[1]) if len(weight_shape) > 1 else 1
            kernel = tuple(int(k) for k in weight_shape[2:])
            groups = []
            weight_patches = [p for p in parts.get("weight", ()) if p.strength != 0.0]
            plain = [p for p in weight_patches if p.cols is None]
            batches = ([plain] if plain else []) + [[p] for p in weight_patches if p.cols is not None]
            for batch in batches:
                signature = (mkey, weight_shape) + tuple(_term_identity(p) for p in batch)
                factors = store.get(signature, batch, weight_shape)
                scale_at = len(values)
                for patch, rank in zip(batch, factors.ranks):
                    values.extend([patch.strength * _alpha_scale(patch.module)] * rank)
                cols_at = None
                if batch[0].cols is not None:
                    cols_at = len(values)
                    values.extend(_column_vector(batch[0].cols, in_channels))
                groups.append(_Group(factors, scale_at, cols_at))
            bias_at = None
            bias_patches = [p for p in parts.get("bias", ()) if p.strength != 0.0]
            if bias_patches:
                bias = torch.zeros(out_features, dtype=F32)
                for patch in bias_patches:
                    diff = patch.module.bias_diff.to(F32).reshape(-1)
                    want = patch.module_rows or out_features
                    if diff.numel() != want:
                        from .errors import LoraMatchError

                        raise LoraMatchError(
                            f"{patch.module.name}: bias delta has {diff.numel()} values but {mkey}.bias has "
                            f"{out_features}; the LoRA was made for a different model.")
                    if patch.rows is None:
                        bias += patch.strength * diff
                    else:
                        for dst, src, count in patch.rows:
                            bias[dst:dst + count] += patch.strength * diff[src:src + count]
                bias_at = len(values)
                values.extend(bias.tolist())
            if not groups and bias_at is None:
                continue
            self.layers[mkey] = LiveLayer(mkey, form, tuple(groups), bias_at, out_features, in_channels, kernel,
                                          self)
            for part, items in parts.items():
                self.patches[mkey + "." + part] = list(items)
        self.table = torch.tensor(values, dtype=F32) if values else torch.zeros(0, dtype=F32)
        self._tables: dict = {}

    def table_on(self, device, dtype) -> torch.Tensor:
        slot = (device, dtype)
        table = self._tables.get(slot)
        if table is None:
            table = self._tables[slot] = self.table.to(device=device, dtype=dtype)
        return table

    def __len__(self) -> int:
        return len(self.layers)


def live_forward(base: Callable, module, layers: Sequence[LiveLayer]) -> Callable:
    """A forward for `module`: its class's own forward (`base`, unbound), then every live layer's terms."""

    def forward(*args, **kwargs):
        out = base(module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        for layer in layers:
            out = layer.add(x, out)
        return out

    return forward
