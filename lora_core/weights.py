"""What lora_core reads from a host's weight tensor without assuming it is a plain tensor.

Hosts hold weights that are not plain tensors: a quantised weight may be a `torch.Tensor` subclass whose
storage is packed blocks (ComfyUI-GGUF: uint8 storage of shape (rows, blocks * bytes per block), the weight's
own shape in a `tensor_shape` attribute, its quantisation type in `tensor_type`), or a wrapper subclass whose
`.shape` is already the weight's (ComfyUI's `QuantizedTensor`). The shape a LoRA must fit is the logical one,
the shape of the dequantised weight the host later hands to the patch math; dtype and device are those of
that dequantised weight too, so the engine takes them from the tensor it is given at patch time, never
from the stored one.
"""
from __future__ import annotations

import torch

# Attributes quantised tensor classes use for the logical (dequantised) shape, in the order they are tried.
LOGICAL_SHAPE_ATTRS = ("tensor_shape", "logical_shape", "orig_shape")


def logical_shape(tensor) -> torch.Size:
    """The weight's logical shape: the one a quantised tensor declares (`tensor_shape`, ...), else `.shape`.
    Works for any tensor subclass or tensor-like object with a `shape`; imports no host."""
    for attr in LOGICAL_SHAPE_ATTRS:
        shape = getattr(tensor, attr, None)
        if shape is not None and not callable(shape):
            return torch.Size(shape)
    return torch.Size(tensor.shape)


def holds_values(tensor) -> bool:
    """Whether the tensor's elements are the weight's values, so math may read it as it is: a floating tensor
    off the meta device whose storage has the logical shape (plain, fp8, or a subclass holding plain values);
    not packed quantised storage and not a state-dict placeholder."""
    return (isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and tensor.is_floating_point()
            and tuple(tensor.size()) == tuple(logical_shape(tensor)))
