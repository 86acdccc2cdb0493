"""Training-time adapters of the LyCORIS algorithms: LoHa, LoKr and DoRA (on LoRA), in LyCORIS's key format.

Each one is a side path like `injection.LoRASidePath`: the hooked module returns `original(x) + path(x)`. Here
`path(x)` applies a weight change to x, ``op(x, D(W))`` (op = the module's own linear / conv with its stride,
padding, dilation and groups, no bias), where D(W) is computed by `lora_core.adapters.delta` from the path's live
parameters: the very function our loader patches weights with. What a file trains is therefore what it loads
as, by construction; the tests check both against ComfyUI core's loader and LyCORIS's own modules.

This is LyCORIS's own (non-bypass) forward: ``base + op(x, W' - W)`` with W' its merged weight.

File format (lycoris-lora 4.1.3, modules/loha.py, lokr.py, locon.py `custom_state_dict`; kohya module names):
* LoHa  ``<name>.hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·k·k), ``hada_w2_a``, ``hada_w2_b``, ``alpha``;
        ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r. Init as LyCORIS: w1b ~ N(0, 1), w1a ~ N(0, 0.1),
        w2b ~ N(0, 1), w2a = 0 (ΔW = 0 at step 0).
* LoKr  ``<name>.lokr_w1`` (a, c) full, ``lokr_w2_a`` (b, r) / ``lokr_w2_b`` (r, d·k·k), or a full ``lokr_w2``
        (b, d[, k, k]) when r >= max(b, d) / 2 (LyCORIS's rule), ``alpha``; out = a·b and in = c·d split by
        LyCORIS's `factorization(dim, -1)` (the divisor pair nearest the square root, smaller first);
        ΔW = kron(w1, w2) · alpha/r, or · 1 when w2 is full (LyCORIS then writes alpha = r). Init as LyCORIS:
        w1 and w2_a kaiming-uniform, w2_b (or w2) zero.
* DoRA  LoRA's ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` plus ``<name>.dora_scale``, the magnitude
        m, initialised to the column norms of W; W' = m ⊙ (W + ΔW) / ‖W + ΔW‖. The norm is taken per input
        column (LyCORIS ``wd_on_output=False``: dora_scale of shape (1, in[, 1, 1])), the axis on which ComfyUI
        core, LoRA Core and LyCORIS compute the same weight: on the output axis core divides by ‖W‖ instead of
        ‖W + ΔW‖ (see lora_core/adapters.py), so a file trained there would load differently in core.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_core import adapters
from lora_core.errors import LoraFormatError, LoraValueError
from lora_core.types import ModuleLora

from .quant import plain_weight

ALGORITHMS = ("LoRA", "LoCon", "LoHa", "LoKr", "DoRA")
LYCORIS_ALGORITHMS = ("LoHa", "LoKr", "DoRA")
# ss_network_args LyCORIS's kohya network (lycoris.kohya) records for each
NETWORK_ARGS = {"LoHa": {"algo": "loha"}, "LoKr": {"algo": "lokr", "factor": "-1"},
                "DoRA": {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}}


def factorization(dimension: int) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m the largest divisor not above sqrt(dimension): what LyCORIS's
    `factorization(dimension, -1)` returns (lycoris/functional/general.py)."""
    m = int(math.isqrt(dimension))
    while dimension % m:
        m -= 1
    return m, dimension // m


def _kaiming_uniform(shape, fan_in: int, generator) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from our generator."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator, dtype=torch.float32) * 2 * bound - bound


def _normal(shape, std: float, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


class WeightDeltaPath(nn.Module):
    """A side path whose change is a weight delta D(W) (lora_core.adapters.delta on the live parameters).

    Subclasses give `algo`, `dora` (whether a magnitude is trained), `ROLES` (adapters role -> file suffix) and
    create their parameters named after the roles."""

    algo = ""
    ROLES: dict = {}

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise LoraValueError(f"rank must be >= 1, got {rank}.")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise LoraValueError(f"{type(base).__name__} cannot carry a {type(self).__name__}.")
        self._base = (base,)   # a tuple: the base module is not registered (its weights are not trained)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv and getattr(base, "padding_mode", "zeros") != "zeros":
            raise LoraValueError(f"{type(self).__name__} supports zero-padded convolutions only.")
        self.rank = int(rank)
        self.multiplier = 1.0
        self.dora_scale: Optional[nn.Parameter] = None

    # ------------------------------------------------------------------ shapes
    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def out_dim(self) -> int:
        return self.base.out_channels if self.is_conv else self.base.out_features

    @property
    def in_dim(self) -> int:   # per group
        return self.base.in_channels // self.base.groups if self.is_conv else self.base.in_features

    @property
    def kernel(self) -> tuple:
        return tuple(self.base.kernel_size) if self.is_conv else ()

    def _init_magnitude(self) -> None:
        """DoRA magnitude m = ‖W‖ per input column, shaped (1, in[, 1, 1]) (LyCORIS wd_on_output=False)."""
        weight = plain_weight(self.base)   # values: an fp8 / scaled / NF4 base dequantised
        if weight.shape[0] == 1:
            raise LoraValueError("DoRA cannot train a layer with one output channel (its magnitude would read as "
                                 "per output row in ComfyUI's loader); leave it out of the targets.")
        norm = torch.linalg.vector_norm(weight, dim=[d for d in range(weight.dim()) if d != 1])
        self.dora_scale = nn.Parameter(norm.reshape(1, -1, *([1] * (weight.dim() - 2))).to("cpu"))

    # ------------------------------------------------------------------ maths
    def alpha_value(self) -> Optional[float]:
        return float(self.alpha)

    def module_lora(self, name: str = "") -> ModuleLora:
        tensors = {role: getattr(self, role) for role in self.ROLES if getattr(self, role, None) is not None}
        return ModuleLora(name=name or type(self).__name__, algo=self.algo, tensors=tensors,
                          alpha=self.alpha_value(), dora_scale=self.dora_scale)

    def weight_delta(self, device=None) -> torch.Tensor:
        """D(W) in fp32 (W' - W), differentiable in the path's parameters."""
        weight = plain_weight(self.base, device)   # one layer's values in fp32 (quantised bases dequantised)
        return adapters.delta(self.module_lora(), weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.weight_delta(x.device)
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32 else torch.float32
        delta = (delta * self.multiplier).to(dtype)
        x = x.to(dtype)
        if self.is_conv:
            base = self.base
            return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, delta)

    # ------------------------------------------------------------------ file format
    def file_tensors(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for role, suffix in self.ROLES.items():
            value = getattr(self, role, None)
            if value is not None:
                out[f"{name}.{suffix}"] = value.detach().to("cpu", dtype).clone()
        out[f"{name}.alpha"] = self.alpha.detach().to("cpu", dtype).clone()
        if self.dora_scale is not None:
            out[f"{name}.dora_scale"] = self.dora_scale.detach().to("cpu", dtype).clone()
        return out

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], name: str, source: str) -> None:
        parts = [(role, suffix) for role, suffix in self.ROLES.items() if getattr(self, role, None) is not None]
        if self.dora_scale is not None:
            parts.append(("dora_scale", "dora_scale"))
        with torch.no_grad():
            for role, suffix in parts:
                key = f"{name}.{suffix}"
                param = getattr(self, role)
                saved = tensors.get(key)
                if saved is None:
                    raise LoraFormatError(f"{source}: no {key} for this run's {type(self).__name__} module. The "
                                          f"saved run used another algorithm or rank: use the same settings to "
                                          f"continue, or start a new run.")
                if tuple(saved.shape) != tuple(param.shape):
                    raise LoraFormatError(f"{source}: {key} has shape {tuple(saved.shape)}, this run needs "
                                          f"{tuple(param.shape)} (different rank?). Use the same rank to continue, "
                                          f"or start a new run.")
                param.copy_(saved.to(param.dtype))
            if f"{name}.alpha" in tensors:
                self.alpha.copy_(tensors[f"{name}.alpha"].to(self.alpha.dtype))

    def state_keys(self, name: str) -> list[str]:
        return list(self.file_tensors(name, torch.float32))


class LoHaPath(WeightDeltaPath):
    algo = "loha"
    ROLES = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__(base, rank, alpha)
        flat_in = self.in_dim * math.prod(self.kernel)
        r = self.rank
        self.w1a = nn.Parameter(_normal((self.out_dim, r), 0.1, generator))
        self.w1b = nn.Parameter(_normal((r, flat_in), 1.0, generator))
        self.w2a = nn.Parameter(torch.zeros(self.out_dim, r))
        self.w2b = nn.Parameter(_normal((r, flat_in), 1.0, generator))
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha and alpha > 0 else float(r)))


class LoKrPath(WeightDeltaPath):
    algo = "lokr"
    ROLES = {"w1": "lokr_w1", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"}

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__(base, rank, alpha)
        out_a, out_b = factorization(self.out_dim)
        in_c, in_d = factorization(self.in_dim)
        k = math.prod(self.kernel)
        self.w1 = nn.Parameter(_kaiming_uniform((out_a, in_c), in_c, generator))
        self.full_w2 = self.rank >= max(out_b, in_d) / 2
        if self.full_w2:
            self.w2 = nn.Parameter(torch.zeros(out_b, in_d, *self.kernel))
            self.w2a = self.w2b = None
            alpha = self.rank   # LyCORIS: both factors full -> scale 1, alpha written as the rank
        else:
            self.w2 = None
            self.w2a = nn.Parameter(_kaiming_uniform((out_b, self.rank), self.rank, generator))
            self.w2b = nn.Parameter(torch.zeros(self.rank, in_d * k))
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha and alpha > 0 else float(self.rank)))

    def alpha_value(self) -> Optional[float]:
        return float(self.alpha)


class DoRAPath(WeightDeltaPath):
    """LoRA (kohya init: down kaiming-uniform, up zero) with a trained DoRA magnitude."""

    algo = "lora"
    ROLES = {"down": "lora_down.weight", "up": "lora_up.weight"}

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__(base, rank, alpha)
        flat_in = self.in_dim * math.prod(self.kernel)
        r = min(self.rank, flat_in, self.out_dim)
        self.rank = r
        self.down = nn.Parameter(_kaiming_uniform((r, self.in_dim, *self.kernel), flat_in, generator))
        self.up = nn.Parameter(torch.zeros(self.out_dim, r, *([1] * len(self.kernel))))
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha and alpha > 0 else float(r)))
        self._init_magnitude()


PATHS = {"LoHa": LoHaPath, "LoKr": LoKrPath, "DoRA": DoRAPath}


def make_path(algorithm: str, base: nn.Module, rank: int, alpha: float,
              generator: Optional[torch.Generator] = None) -> WeightDeltaPath:
    cls = PATHS.get(algorithm)
    if cls is None:
        raise LoraValueError(f"algorithm {algorithm!r} is not one of {list(PATHS)}.")
    return cls(base, rank, alpha, generator)
