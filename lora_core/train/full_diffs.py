"""Full-tensor diffs trained beside the low-rank paths: the biases of the adapted layers and the norms' weights and
biases, what ComfyUI core's Train LoRA node trains besides its LoRAs ("every weight + norms/biases").

Saved in the keys ComfyUI's loader reads (and A1111's `network_full`, LoRA Core's loader): `<name>.diff_b` for a
bias, `<name>.diff` for a norm's weight, next to the layer's own LoRA tensors (`lora_up`/`lora_down`/`alpha`, or
LyCORIS's). Both start at zero, so the model is unchanged at step 0, like the low-rank paths.

* `BiasDiff` wraps a layer's side path (any algorithm) and adds a trained per-channel delta of the layer's bias:
  Linear outputs on the last dim, Conv2d outputs on dim 1.
* `NormDiff` is the side path of a GroupNorm / LayerNorm with an affine weight: norm(x; w + dw, b + db) =
  norm(x; w, b) + normalize(x) * dw + db, so its side output is normalize(x) * dw + db (the normalisation without
  the affine part, recomputed in the path's dtype).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lora_core.errors import LoraFormatError, LoraValueError

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def _load(param: nn.Parameter, tensors: Mapping[str, torch.Tensor], key: str, source: str) -> None:
    saved = tensors.get(key)
    if saved is None:
        raise LoraFormatError(f"{source}: {key} is missing; this run trains norms and biases (unet_targets "
                              f"'all layers + norms/biases'). Use the run's settings to continue, or start a new run.")
    if tuple(saved.shape) != tuple(param.shape):
        raise LoraFormatError(f"{source}: {key} has shape {tuple(saved.shape)}, this run needs {tuple(param.shape)}.")
    with torch.no_grad():
        param.copy_(saved.to(param.dtype))


def _path_dtype(param: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    return x.dtype if torch.is_autocast_enabled(x.device.type) else param.dtype


class BiasDiff(nn.Module):
    """`inner(x)` (the layer's low-rank side path) plus a trained delta of the layer's bias."""

    def __init__(self, inner: nn.Module, base: nn.Module):
        super().__init__()
        bias = getattr(base, "bias", None)
        if bias is None or not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise LoraValueError(f"{type(base).__name__} has no bias to train.")
        self.inner = inner
        self.channel_dim = 1 if isinstance(base, nn.Conv2d) else -1
        self.diff_b = nn.Parameter(torch.zeros(bias.shape[0], dtype=torch.float32))

    @property
    def multiplier(self) -> float:
        return self.inner.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.inner.multiplier = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        shape = [1] * out.dim()
        shape[self.channel_dim] = -1
        return out + (self.diff_b * self.multiplier).to(out.dtype).view(shape)

    def file_tensors(self, name: str, dtype: torch.dtype) -> dict:
        out = self.inner.file_tensors(name, dtype)
        out[f"{name}.diff_b"] = self.diff_b.detach().to("cpu", dtype).clone()
        return out

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], name: str, source: str) -> None:
        self.inner.load_file_tensors(tensors, name, source)
        _load(self.diff_b, tensors, f"{name}.diff_b", source)

    def weight_delta(self, device=None) -> torch.Tensor:
        return self.inner.weight_delta(device)

    def bias_delta(self) -> torch.Tensor:
        return self.diff_b.detach().float()


class NormDiff(nn.Module):
    """The side path of a GroupNorm / LayerNorm: normalize(x) * dw + db (see the module docstring)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, NORM_TYPES) or getattr(base, "weight", None) is None:
            raise LoraValueError(f"{type(base).__name__} is not a GroupNorm / LayerNorm with an affine weight.")
        self._base = (base,)   # not registered: the norm's own parameters are not trained
        self.diff = nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.float32))
        self.diff_b = nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.float32)) \
            if getattr(base, "bias", None) is not None else None
        self.multiplier = 1.0
        self.rank = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        dtype = _path_dtype(self.diff, x)
        if isinstance(base, nn.GroupNorm):
            normal = F.group_norm(x.to(dtype), base.num_groups, None, None, base.eps)
            shape = [1, -1] + [1] * (x.dim() - 2)
        else:
            normal = F.layer_norm(x.to(dtype), base.normalized_shape, None, None, base.eps)
            shape = list(base.normalized_shape)
        out = normal * (self.diff * self.multiplier).to(dtype).view(shape)
        if self.diff_b is not None:
            out = out + (self.diff_b * self.multiplier).to(dtype).view(shape)
        return out

    def file_tensors(self, name: str, dtype: torch.dtype) -> dict:
        out = {f"{name}.diff": self.diff.detach().to("cpu", dtype).clone()}
        if self.diff_b is not None:
            out[f"{name}.diff_b"] = self.diff_b.detach().to("cpu", dtype).clone()
        return out

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], name: str, source: str) -> None:
        _load(self.diff, tensors, f"{name}.diff", source)
        if self.diff_b is not None:
            _load(self.diff_b, tensors, f"{name}.diff_b", source)

    def weight_delta(self, device=None) -> torch.Tensor:
        delta = self.diff.detach().float()
        return delta if device is None else delta.to(device)

    def bias_delta(self):
        return None if self.diff_b is None else self.diff_b.detach().float()
