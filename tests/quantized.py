"""Quantised and fp8 tiny SD1.5 models for tests, built the way ComfyUI and ComfyUI-GGUF build real ones.

ComfyUI-GGUF (city96/ComfyUI-GGUF) is not installable here, so `gguf_sd15()` imitates its contract with code
of our own, read from its sources (ops.py `GGMLTensor`, `GGMLLayer.get_weight/cast_bias_weight/
ggml_save_to_state_dict`, `GGMLOps`; nodes.py `GGUFModelPatcher`, `UnetLoaderGGUF.load_unet`; dequant.py
`dequantize_tensor`, `dequantize_blocks_Q8_0`; loader.py `gguf_sd_loader`; tools/convert.py for which tensors are
quantised). What matters to a LoRA loader:

* Every tensor of the file is a `torch.Tensor` subclass (`PackedTensor`, GGUF's `GGMLTensor`) with
  `tensor_type` (GGUF's quantisation type; "Q8_0" quantised, "F32" plain) and `tensor_shape` (the weight's
  logical shape). A quantised one holds packed bytes: dtype uint8, `.size()` the packed storage
  (rows, blocks * 34 for Q8_0: one fp16 scale and 32 int8 per 32 values), while its `.shape` property answers
  the logical shape. Like GGUF's converter, tensors with at most 1024 values, 1-D tensors and tensors whose
  values do not split into blocks stay F32; a tensor whose last dimension is not a multiple of the block is
  packed from its (n/256, 256) reshape (convert.py's "shape fix", the logical shape is kept).
* Layers (`QuantOps`, GGUF's `GGMLOps`, a `comfy.ops.manual_cast` subclass) take the file's tensors as
  their parameters as they are, and `state_dict()` of a quantised layer returns `zeros_like(weight)` on the
  meta device (GGUF's "fake state dict for vram estimation"): the packed storage's shape, not the weight's.
* The ModelPatcher (`GGUFLikePatcher`, GGUF's `GGUFModelPatcher`) is a real `comfy.model_patcher.ModelPatcher`
  that, for a quantised key, never computes a patched weight at load time: it stores
  `[(self.patches[key], key)]` on the weight's `.patches` and always asks for that (`force_patch_weights`,
  lowvram included). At forward time the layer dequantises the weight to the input's dtype and hands it,
  a plain tensor of the logical shape, to `comfy.lora.calculate_weight(patch_list, weight, key)`. F32 tensors
  go ComfyUI's normal way (backup, fp32 copy, `calculate_weight`, `stochastic_rounding`), still as the
  subclass.

`load_unet(state_dict, ...)` is the part of `comfy.sd.load_diffusion_model_state_dict` after model detection
(which only knows full-size configs): the same dtype choice, manual cast, custom operations and
`load_model_weights`, with `scaled_fp8` read from the state dict's marker key like `model_detection` does.
`fp8_state_dict()` writes a tiny model's weights as an fp8 checkpoint (plain, or scaled like ComfyUI's
scaled-fp8 files: `weight / scale_weight` in fp8, `scale_weight` per Linear, the `scaled_fp8` marker).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from tests.comfy_host import import_comfy
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402

CPU = torch.device("cpu")
BLOCK, BLOCK_BYTES = 32, 34          # Q8_0: 32 values -> fp16 scale (2 bytes) + 32 int8
ROW_FIX = 256                        # convert.py reshapes such tensors to (n / 256, 256) before quantising
SMALL = 1024                         # convert.py keeps tensors with at most this many values in F32
PLAIN_TYPES = (None, "F32")          # GGUF's TORCH_COMPATIBLE_QTYPES (F16 too; our files hold none)


# ----------------------------------------------------------------------------------------- the tensor


class PackedTensor(torch.Tensor):
    """A weight as ComfyUI-GGUF hands it to ComfyUI: `tensor_type`, logical `tensor_shape`, `patches`."""

    tensor_type: Optional[str]
    tensor_shape: torch.Size
    patches: list

    @staticmethod
    def __new__(cls, data: torch.Tensor, tensor_type: Optional[str], tensor_shape, patches=None):
        tensor = torch.Tensor._make_subclass(cls, data, False)
        tensor.tensor_type, tensor.tensor_shape, tensor.patches = tensor_type, torch.Size(tensor_shape), []
        return tensor

    def __init__(self, *args, **kwargs):
        super().__init__()

    def _keep(self, new):
        # Results of torch ops come back as this class (torch's default __torch_function__) but without the
        # attributes; the methods ComfyUI calls on weights keep them, as GGUF's class does.
        if isinstance(new, PackedTensor):
            new.tensor_type = getattr(self, "tensor_type", None)
            new.tensor_shape = getattr(self, "tensor_shape", None) or new.size()
            new.patches = list(getattr(self, "patches", []))
        return new

    def to(self, *args, **kwargs):
        return self._keep(super().to(*args, **kwargs))

    def detach(self, *args, **kwargs):      # torch.nn.Parameter(t) is t.detach() for a subclass
        return self._keep(super().detach(*args, **kwargs))

    @property
    def shape(self):
        shape = getattr(self, "tensor_shape", None)
        return shape if shape is not None else self.size()

    def plain(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)


def is_quantized(tensor) -> bool:
    return tensor is not None and getattr(tensor, "tensor_type", None) not in PLAIN_TYPES


def quantize(tensor: torch.Tensor) -> PackedTensor:
    """One file tensor as GGUF's loader makes it: Q8_0 where convert.py would quantise, else F32."""
    shape = tensor.shape
    numel = tensor.numel()
    if tensor.ndim < 2 or numel <= SMALL:
        return PackedTensor(tensor.detach().to(torch.float32).contiguous(), "F32", shape)
    if shape[-1] % BLOCK == 0:
        rows = tensor.reshape(-1, shape[-1])
    elif numel % ROW_FIX == 0:
        rows = tensor.reshape(-1, ROW_FIX)
    else:
        return PackedTensor(tensor.detach().to(torch.float32).contiguous(), "F32", shape)
    blocks = rows.detach().to(torch.float32).reshape(-1, BLOCK)
    scale = (blocks.abs().amax(dim=1, keepdim=True) / 127.0).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)
    values = torch.round(blocks / safe).clamp(-127, 127).to(torch.int8)
    packed = torch.cat([scale.view(torch.uint8), values.view(torch.uint8)], dim=1)
    return PackedTensor(packed.reshape(rows.shape[0], -1).contiguous(), "Q8_0", shape)


def dequantize(tensor: PackedTensor, dtype=torch.float32) -> torch.Tensor:
    """The plain tensor (logical shape, `dtype`) a layer computes with; F32 tensors are only cast."""
    if not is_quantized(tensor):
        return tensor.plain().to(dtype)
    blocks = tensor.plain().reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
    values = blocks[:, 2:].contiguous().view(torch.int8).to(dtype)
    return (scale * values).reshape(tensor.tensor_shape)


def quantize_state_dict(state_dict: dict) -> dict:
    return {k: quantize(v) for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------- the layers


class _QuantLayer:
    """What GGUF's GGMLLayer does for Linear/Conv2d: keep the file's tensors, dequantise and patch per call."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias"):
            value = state_dict.get(prefix + name)
            if value is not None:
                setattr(self, name, torch.nn.Parameter(value, requires_grad=False))
            elif getattr(self, name, None) is not None:
                missing_keys.append(prefix + name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not (is_quantized(self.weight) or is_quantized(self.bias)):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = torch.zeros_like(self.weight, device="meta")
        if self.bias is not None:
            destination[prefix + "bias"] = torch.zeros_like(self.bias, device="meta")

    def patched_weight(self, tensor, dtype) -> Optional[torch.Tensor]:
        """The weight a forward pass computes with: dequantised, then the ModelPatcher's patches applied."""
        if tensor is None:
            return None
        patch_list, key = [], None
        for patches, key in getattr(tensor, "patches", []):
            patch_list += patches
        weight = dequantize(tensor, dtype)
        if patch_list:
            weight = comfy.lora.calculate_weight(patch_list, weight, key)
        return weight

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if is_quantized(self.weight) or is_quantized(self.bias):
            weight = self.patched_weight(self.weight.to(input.device), input.dtype)
            bias = self.patched_weight(self.bias.to(input.device), input.dtype) if self.bias is not None else None
            out = self._quant_forward(input, weight, bias)
        else:
            out = super().forward_comfy_cast_weights(input, *args, **kwargs)
        return out.as_subclass(torch.Tensor) if isinstance(out, PackedTensor) else out


class QuantOps(comfy.ops.manual_cast):
    class Linear(_QuantLayer, comfy.ops.manual_cast.Linear):
        def _quant_forward(self, input, weight, bias):
            return torch.nn.functional.linear(input, weight, bias)

    class Conv2d(_QuantLayer, comfy.ops.manual_cast.Conv2d):
        def _quant_forward(self, input, weight, bias):
            return self._conv_forward(input, weight, bias)


# ----------------------------------------------------------------------------------------- the patcher


class GGUFLikePatcher(comfy.model_patcher.ModelPatcher):
    """A real ModelPatcher with GGUFModelPatcher's three differences for quantised weights."""

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        if not is_quantized(weight):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        moved = weight.to(device_to if device_to is not None else weight.device)
        moved.patches = [(self.patches[key], key)]
        comfy.utils.set_attr_param(self.model, key, moved)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for param in self.model.parameters():
                if is_quantized(param):
                    param.patches = []
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

    def load(self, *args, force_patch_weights=False, **kwargs):
        return super().load(*args, force_patch_weights=True, **kwargs)


# ----------------------------------------------------------------------------------------- loading


def load_unet(state_dict: dict, dtype=None, custom_operations=None, patcher_class=comfy.model_patcher.ModelPatcher,
              unet_config: Optional[dict] = None):
    """A tiny SD1.5 from a diffusion-model state dict, by `comfy.sd.load_diffusion_model_state_dict`'s steps
    after detection (0.3.75, sd.py): `dtype` is `model_options["dtype"]` (UNETLoader's weight_dtype)."""
    sd = dict(state_dict)
    model_config = comfy.supported_models.SD15(dict(unet_config or tm.unet_config_sd15()))
    if "scaled_fp8" in sd:                                    # model_detection.model_config_from_unet
        marker = sd.pop("scaled_fp8")
        model_config.scaled_fp8 = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
    weight_dtype = None if model_config.scaled_fp8 is not None else comfy.utils.weight_dtype(sd)
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=supported,
                              weight_dtype=weight_dtype)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, CPU, model_config.supported_inference_dtypes))
    model_config.custom_operations = custom_operations
    model = model_config.get_model(sd, "").to(CPU)
    model.load_model_weights(sd, "")
    return patcher_class(model, load_device=CPU, offload_device=CPU)


@functools.lru_cache(maxsize=None)
def _reference(seed: int) -> tuple[dict, frozenset]:
    patcher = tm.comfy_sd15(seed=seed)
    unet = patcher.model.diffusion_model
    linear = frozenset(f"{name}.weight" for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear))
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, linear


def reference_state_dict(seed: int = 0) -> dict:
    """The fp32 weights of `tiny_models.comfy_sd15(seed=seed)` in diffusion-model naming (no prefix)."""
    return {k: v.clone() for k, v in _reference(seed)[0].items()}


def linear_weight_keys(seed: int = 0) -> frozenset:
    """Keys of the tiny SD1.5's Linear weights."""
    return _reference(seed)[1]


@functools.lru_cache(maxsize=None)
def _quantized_reference(seed: int) -> dict:
    return quantize_state_dict(_reference(seed)[0])


def gguf_sd15(seed: int = 0):
    """Tiny SD1.5 quantised to Q8_0 and loaded like UnetLoaderGGUF does (custom operations + its patcher).
    Each call gets tensors of its own (the packed bytes, never written, are shared between calls)."""
    state = {k: PackedTensor(v.plain() if is_quantized(v) else v.plain().clone(), v.tensor_type, v.tensor_shape)
             for k, v in _quantized_reference(seed).items()}
    return load_unet(state, custom_operations=QuantOps, patcher_class=GGUFLikePatcher)


def fp8_state_dict(dtype, scaled: bool = False, seed: int = 0) -> dict:
    """The tiny SD1.5 as an fp8 checkpoint. Plain: every tensor in `dtype` (what UNETLoader's fp8 weight_dtype
    loads). Scaled: Linear weights as fp8 `weight / scale_weight` with an fp32 `scale_weight` each (absmax/
    the format's max, like scaled-fp8 files), everything else fp32, and the `scaled_fp8` marker."""
    reference = reference_state_dict(seed)
    if not scaled:
        return {k: v.to(dtype) for k, v in reference.items()}
    linear = linear_weight_keys(seed)
    out = {}
    for key, value in reference.items():
        if key in linear:
            scale = (value.abs().amax() / torch.finfo(dtype).max).to(torch.float32)
            out[key] = (value / scale).to(dtype)
            out[key[:-len("weight")] + "scale_weight"] = scale
        else:
            out[key] = value
    out["scaled_fp8"] = torch.tensor([], dtype=dtype)      # what ComfyUI writes (model_base.py)
    return out

