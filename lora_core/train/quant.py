"""Training on a quantised base (the QLoRA idea): the base weights stay in their storage format while a LoRA in
fp32 (or bf16) trains on top of them.

* **As loaded (fp8 and other cast layers).** ComfyUI loads an fp8 checkpoint (UNETLoader weight_dtype
  fp8_e4m3fn / e5m2, or a scaled-fp8 file) with "manual cast" operations: each Linear/Conv keeps its weight in
  fp8 and casts it to the compute dtype inside its forward (`comfy.ops.cast_bias_weight`; fp32 on CPU, bf16 /
  fp16 on GPU). Training through that forward as it is would keep every layer's cast copy alive for the
  backward pass (autograd saves a linear's weight to compute the gradient of its input), so a step would hold
  a full compute-dtype copy of the base after all. `FrozenBase` runs each such layer through `_FrozenLinear` /
  `_FrozenConv`: the forward casts, computes and drops the copy; the backward casts the stored weight again
  and computes only the input gradient (the base is frozen). Nothing of the base is saved for backward but
  the reference to the stored fp8 parameter, so at most one layer's cast weight exists at a time.
* **NF4 (bitsandbytes; CUDA, or its CPU backend).** `FrozenBase(..., nf4=codec)` quantises each frozen Linear of the denoiser
  to 4-bit NormalFloat with bitsandbytes (`bitsandbytes.functional.quantize_4bit(quant_type="nf4")`, blocks of
  64 values with one absmax each, two codes per byte) for the run, moves the original weight to the CPU, and
  computes through dequantise (`dequantize_4bit`) + matmul, both passes. The originals come back on exit: the
  MODEL in the graph is unchanged and the trained file applies to it (and to any other precision of it).
  bitsandbytes' CPU backend (0.50.2) does the same in torch ops, in the same format, so the production codec runs
  in the CPU tests too. Elsewhere (no bitsandbytes, another device, a release without CPU 4-bit ops)
  `nf4_codec()` raises a clear error naming the requirement.

What the layer computes with is the weight ComfyUI's own forward multiplies with: the stored weight cast to
the input's dtype (ComfyUI's `QuantizedTensor` dequantised), the layer's `weight_function`s (patches applied
at forward time) on it, times `scale_weight` for scaled-fp8 layers. Weights in a format this module does not
know (a GGUF tensor subclass with packed storage) keep their layer's own forward.

No ComfyUI import: ComfyUI's layers are recognised by their attributes (`comfy_cast_weights`,
`weight_function`, `scale_weight`, a weight with `dequantize()`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_core.errors import LoraValueError

BASE_QUANT = ("as loaded", "nf4")
LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                      "float8_e5m2fnuz") if hasattr(torch, name))
NF4_BLOCK = 64               # bitsandbytes' default blocksize for 4-bit weights (Linear4bit, Params4bit)
NF4_MIN_VALUES = 4096        # smaller Linears (embeddings of a few channels) stay as they are: nothing to save
NF4_REQUIREMENT = ("base_quant 'nf4' needs bitsandbytes, on an NVIDIA GPU (CUDA) or on the CPU with "
                   "bitsandbytes' CPU backend (0.50.2 tested): install it in ComfyUI's Python "
                   "(`python -m pip install bitsandbytes`), or choose base_quant "
                   "'as loaded' (load the model with UNETLoader weight_dtype fp8_e4m3fn for an fp8 base).")
_CONVS = {nn.Conv1d: (F.conv1d, torch.nn.grad.conv1d_input), nn.Conv2d: (F.conv2d, torch.nn.grad.conv2d_input),
          nn.Conv3d: (F.conv3d, torch.nn.grad.conv3d_input)}


# ------------------------------------------------------------------------------------------ NF4 codec

class NF4Codec:
    """quantize(weight) -> packed state; dequantize(state, dtype) -> the weight. The production codec is
    bitsandbytes' (`nf4_codec()`); another one with the same format can be given (the tests use a pure-torch
    one to check this module's maths)."""

    name = "nf4"

    def quantize(self, weight: torch.Tensor):
        raise NotImplementedError

    def dequantize(self, state, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, state) -> int:
        raise NotImplementedError

    def unsupported(self, weight: torch.Tensor) -> Optional[str]:
        """Why this codec cannot hold `weight` exactly (the layer then stays as loaded), or None."""
        return None


class BitsAndBytesNF4(NF4Codec):
    """bitsandbytes' NF4: `quantize_4bit(w, blocksize=64, quant_type="nf4")` / `dequantize_4bit`."""

    def __init__(self, bnb_functional):
        self.F = bnb_functional

    def quantize(self, weight):
        packed, state = self.F.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        return packed, state

    def dequantize(self, state, dtype):
        packed, quant_state = state
        return self.F.dequantize_4bit(packed, quant_state).to(dtype)

    def unsupported(self, weight):
        # bitsandbytes 0.50.2's native CPU dequantize_4bit indexes blocks within rows: a weight whose rows are not
        # whole blocks (input width 32, 96, ... ; not a multiple of 64) comes back wrong though it was packed
        # right (measured against the format, tests/test_train_quant.py). Real models' Linears are multiples of 64.
        if weight.device.type == "cpu" and weight.shape[-1] % NF4_BLOCK:
            return f"on the CPU bitsandbytes' NF4 needs an input width that is a multiple of {NF4_BLOCK}"
        return None

    def nbytes(self, state) -> int:
        packed, quant_state = state
        absmax = getattr(quant_state, "absmax", None)
        return packed.numel() * packed.element_size() + (absmax.numel() * absmax.element_size() if absmax is not
                                                         None else 0)


def nf4_codec(device) -> NF4Codec:
    """bitsandbytes' NF4 codec for `device`: CUDA, or the CPU (bitsandbytes' CPU backend: its 4-bit ops in torch,
    the same format; probed once on a small tensor); a LoraValueError naming the requirement anywhere else."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraValueError(f"{NF4_REQUIREMENT} (The model is on cuda but CUDA is not available.)")
    if device.type not in ("cuda", "cpu"):
        raise LoraValueError(f"{NF4_REQUIREMENT} (The model is on {device.type}, neither CUDA nor the CPU.)")
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as error:  # ImportError, or bitsandbytes failing to find its CUDA library
        raise LoraValueError(f"{NF4_REQUIREMENT} (import bitsandbytes failed: {error})") from error
    codec = BitsAndBytesNF4(bnb_functional)
    if device.type == "cpu":   # older bitsandbytes releases have no CPU 4-bit ops
        probe = torch.linspace(-1.0, 1.0, 2 * NF4_BLOCK).reshape(2, NF4_BLOCK)   # a weight-shaped probe
        try:
            back = codec.dequantize(codec.quantize(probe), torch.float32)
            works = back.shape == probe.shape and bool(((back - probe).abs() <= 0.2).all())   # the widest code gap is 0.28
        except Exception as error:
            works, reason = False, f"{type(error).__name__}: {error}"
        else:
            reason = "its NF4 round trip is wrong on the CPU"
        if not works:
            version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
            raise LoraValueError(f"{NF4_REQUIREMENT} (bitsandbytes {version} has no working NF4 on the CPU: "
                                 f"{reason}; upgrade it, or train on CUDA.)")
    return codec


def resolve_base_quant(choice: str, device) -> Optional[NF4Codec]:
    """The NF4 codec for `choice` 'nf4' (None for 'as loaded'); a clear error for anything else."""
    if choice not in BASE_QUANT:
        raise LoraValueError(f"base_quant must be one of {list(BASE_QUANT)}, got {choice!r}.")
    return nf4_codec(device) if choice == "nf4" else None


# ------------------------------------------------------------------------------------------ the weight

def _is_plain(tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _known_storage(weight) -> bool:
    """A weight this module can cast: plain floating (fp8 included), or a tensor with ComfyUI's
    `QuantizedTensor` interface (`dequantize()` and layout parameters)."""
    if weight is None:
        return False
    if _is_plain(weight):
        return weight.is_floating_point()
    return callable(getattr(weight, "dequantize", None)) and hasattr(weight, "_layout_params")


def compute_weight(module: nn.Module, dtype: torch.dtype, device, bias: bool = False):
    """The weight (and bias) `module` computes with, in `dtype` on `device`: an NF4 weight dequantised, else
    what ComfyUI's cast_bias_weight gives (cast, QuantizedTensor dequantised, weight_functions applied) times
    `scale_weight` (scaled fp8). Temporary: nothing keeps it."""
    nf4 = module.__dict__.get("_lora_core_nf4")
    if nf4 is not None:
        weight = nf4.codec.dequantize(nf4.state, dtype).to(device)
    else:
        weight = module.weight.to(device)
        weight = weight.to(dtype)
        if not _is_plain(weight) and callable(getattr(weight, "dequantize", None)):
            weight = weight.dequantize().to(dtype)
        for function in getattr(module, "weight_function", ()) or ():
            weight = function(weight)
        scale = getattr(module, "scale_weight", None)
        if isinstance(scale, torch.Tensor):
            weight = weight * scale.to(device=device, dtype=dtype)
    if not bias:
        return weight
    b = module.bias
    if b is not None:
        b = b.to(device=device, dtype=dtype)
        for function in getattr(module, "bias_function", ()) or ():
            b = function(b)
    return weight, b


def plain_weight(module: nn.Module, device=None) -> torch.Tensor:
    """The module's weight as values in fp32 (dequantised, scaled), e.g. for DoRA's magnitude; any module."""
    weight = module.weight
    if module.__dict__.get("_lora_core_nf4") is not None or (weight is not None and _known_storage(weight)
                                                               and not _is_plain(weight)) \
            or isinstance(getattr(module, "scale_weight", None), torch.Tensor):
        return compute_weight(module, torch.float32, device or weight.device).detach()
    weight = weight.detach()
    return (weight if device is None else weight.to(device)).float()


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        weight, bias = compute_weight(module, x.dtype, x.device, bias=True)
        ctx.module, ctx.dtype = module, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight = compute_weight(ctx.module, ctx.dtype, grad.device)
        return grad.to(weight.dtype).matmul(weight), None


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        weight, bias = compute_weight(module, x.dtype, x.device, bias=True)
        ctx.module, ctx.dtype, ctx.shape = module, x.dtype, tuple(x.shape)
        conv, _ = _CONVS[_conv_class(module)]
        return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, grad):
        module = ctx.module
        weight = compute_weight(module, ctx.dtype, grad.device)
        _, conv_input = _CONVS[_conv_class(module)]
        return conv_input(ctx.shape, weight, grad.to(weight.dtype), module.stride, module.padding,
                          module.dilation, module.groups), None


def _conv_class(module):
    for cls in _CONVS:
        if isinstance(module, cls):
            return cls
    return None


def _casts(module: nn.Module) -> bool:
    """Whether the layer computes with a weight other than the stored tensor (a cast, dequantised or patched
    one): ComfyUI's manual-cast ops, fp8 storage, a QuantizedTensor, forward-time weight functions."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or (_is_plain(weight) and weight.dtype in FP8_DTYPES) or not _is_plain(weight))


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    cls = _conv_class(module)
    return cls is not None and getattr(module, "padding_mode", "zeros") == "zeros" and \
        not isinstance(module.padding, str)


@dataclass
class _NF4:
    codec: NF4Codec
    state: object
    nbytes: int


@dataclass
class BaseReport:
    """What FrozenBase did: layers through the frozen-cast path, layers left to their own forward, NF4 layers,
    and the base's weight bytes per storage dtype while training."""

    frozen_cast: int = 0
    own_forward: int = 0
    nf4: int = 0
    nf4_skipped: dict = field(default_factory=dict)   # why -> Linears left as loaded (the codec cannot hold them)
    bytes_by_dtype: dict = field(default_factory=dict)

    @property
    def storage(self) -> str:
        return ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(self.bytes_by_dtype.items()))

    def describe(self) -> str:
        parts = [f"base weights {self.storage}"]
        if self.nf4:
            parts.append(f"{self.nf4} Linear layers in NF4")
        for why, count in self.nf4_skipped.items():
            parts.append(f"{count} Linear layers left as loaded ({why})")
        if self.frozen_cast:
            parts.append(f"{self.frozen_cast} layers cast per call (no compute-dtype copy kept for backward)")
        if self.own_forward:
            parts.append(f"{self.own_forward} quantised layers through their own forward")
        return "; ".join(parts)


class FrozenBase:
    """While active, the frozen cast/quantised Linear and Conv layers under `roots` compute through
    `_FrozenLinear` / `_FrozenConv` (see the module docstring); with `nf4` (a codec) the denoiser's Linears
    are first quantised to NF4 for the run. Enter before the LoRA is injected (its hooks call the forward set
    here), exit after it is removed. Every parameter under `roots` must be frozen."""

    def __init__(self, roots: Iterable[nn.Module], nf4: Optional[NF4Codec] = None,
                 nf4_roots: Iterable[nn.Module] = (), offload_device="cpu",
                 compute_dtype: Optional[torch.dtype] = None):
        self.roots = list(roots)
        self.compute_dtype = compute_dtype   # known: layers storing plain weights in it are left alone
        self.nf4 = nf4
        self.nf4_roots = list(nf4_roots) if nf4 is not None else []
        self.offload_device = torch.device(offload_device)
        self.report = BaseReport()
        self._forwards: list = []
        self._quantised: list = []

    # -------------------------------------------------------------- nf4
    def _quantise(self) -> None:
        seen = set()
        for root in self.nf4_roots:
            for module in root.modules():
                weight = getattr(module, "weight", None)
                if not isinstance(module, nn.Linear) or id(module) in seen or weight is None or \
                        not _known_storage(weight) or weight.numel() < NF4_MIN_VALUES:
                    continue
                seen.add(id(module))
                why = self.nf4.unsupported(weight)
                if why is not None:
                    self.report.nf4_skipped[why] = self.report.nf4_skipped.get(why, 0) + 1
                    continue
                device = weight.device
                with torch.no_grad():
                    values = compute_weight(module, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                            device)
                    state = self.nf4.quantize(values)
                del values
                module._lora_core_nf4 = _NF4(self.nf4, state, self.nf4.nbytes(state))
                self._quantised.append((module, device))
                module.weight.data = module.weight.data.to(self.offload_device)
                self.report.nf4 += 1

    def _dequantise(self) -> None:
        for module, device in self._quantised:
            module.weight.data = module.weight.data.to(device)
            module.__dict__.pop("_lora_core_nf4", None)
        self._quantised.clear()

    # -------------------------------------------------------------- forwards
    def __enter__(self):
        try:
            if self.nf4 is not None:
                self._quantise()
            seen = set()
            for root in self.roots:
                for module in root.modules():
                    if id(module) in seen:
                        continue
                    seen.add(id(module))
                    nf4 = module.__dict__.get("_lora_core_nf4") is not None
                    if not nf4 and not _casts(module):
                        continue
                    if not nf4 and self.compute_dtype is not None and _is_plain(module.weight) and \
                            module.weight.dtype == self.compute_dtype and not getattr(module, "weight_function", None) \
                            and not isinstance(getattr(module, "scale_weight", None), torch.Tensor):
                        continue   # computes with the stored weight itself (a manual-cast op in its own dtype)
                    if not nf4 and not (_supported(module) and _known_storage(module.weight)):
                        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                            self.report.own_forward += 1
                        continue
                    if not _supported(module):
                        continue
                    if module.__dict__.get("forward") is not None:
                        # another wrapper (a LoRA injected before entering) owns the forward: leave it whole
                        self.report.own_forward += 1
                        continue
                    self._hook(module)
            self._count_bytes()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _hook(self, module: nn.Module) -> None:
        previous = None
        original = module.forward
        function = _FrozenLinear if isinstance(module, nn.Linear) else _FrozenConv

        def forward(x, *args, _module=module, _original=original, _function=function, **kwargs):
            if args or kwargs or not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return _original(x, *args, **kwargs)
            if _module.__dict__.get("_lora_core_nf4") is None and _is_plain(_module.weight) and \
                    _module.weight.dtype == x.dtype and not getattr(_module, "weight_function", None) and \
                    not isinstance(getattr(_module, "scale_weight", None), torch.Tensor):
                return _original(x)   # computes with the stored weight itself: nothing would be copied
            return _function.apply(x, _module)

        module.forward = forward
        self._forwards.append((module, previous))
        self.report.frozen_cast += 1

    def _count_bytes(self) -> None:
        counted = {}
        for root in self.roots + self.nf4_roots:
            for module in root.modules():
                nf4 = module.__dict__.get("_lora_core_nf4")
                if nf4 is not None and id(module) not in counted:
                    counted[id(module)] = ("nf4", nf4.nbytes)
        for root in self.roots + self.nf4_roots:
            for name, param in root.named_parameters():
                if id(param) in counted:
                    continue
                owner = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
                if name.endswith("weight") and id(owner) in counted:
                    continue   # the NF4 layer's original, offloaded
                counted[id(param)] = (str(param.dtype).replace("torch.", ""), param.numel() * param.element_size())
        totals: dict = {}
        for kind, n in counted.values():
            totals[kind] = totals.get(kind, 0) + n
        self.report.bytes_by_dtype = totals

    def __exit__(self, *exc):
        for module, previous in reversed(self._forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._forwards.clear()
        self._dequantise()
        return False


def frozen_base(roots: Iterable[nn.Module], choice: str = "as loaded", device="cpu",
                nf4_roots: Iterable[nn.Module] = (), codec: Optional[NF4Codec] = None) -> FrozenBase:
    """The FrozenBase for a node choice: 'as loaded' keeps the weights as they are (fp8 layers cast per call),
    'nf4' quantises `nf4_roots`' Linears with bitsandbytes (CUDA, or its CPU backend; `codec` overrides it)."""
    nf4 = codec if (codec is not None and choice == "nf4") else resolve_base_quant(choice, device)
    return FrozenBase(roots, nf4=nf4, nf4_roots=nf4_roots if nf4 is not None else ())


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> dict:
    """Run `step()` (a forward returning a loss) and return what autograd saved for backward: bytes per dtype
    (each tensor once, by storage). A measurement tool for tests and the benchmark."""
    seen: dict = {}

    def pack(tensor):
        try:
            key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
            seen.setdefault(key, tensor.untyped_storage().nbytes())
        except Exception:
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    totals: dict = {}
    for (_, dtype), n in seen.items():
        name = str(dtype).replace("torch.", "")
        totals[name] = totals.get(name, 0) + n
    return totals
