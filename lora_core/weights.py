"""What a host weight is, as ComfyUI's `calculate_weight` path sees it, whatever tensor class holds it.

Quantised weights are tensor subclasses whose storage is packed: ComfyUI-GGUF's `GGMLTensor` reports the packed
byte layout as `.shape` (a Q8_0 (32, 768) weight is stored as (32, 816) bytes) and keeps the logical shape in
`tensor_shape`; the weight a patch is computed on is the dequantised one. Planning (shape checks, row ranges of
fused weights) must use the logical shape. This module knows the conventions without importing any pack.
"""
from __future__ import annotations

import torch

# Attributes quantised tensor classes use for the logical (dequantised) shape, in the order they are tried.
LOGICAL_SHAPE_ATTRS = ("tensor_shape", "logical_shape", "orig_shape")


def logical_shape(tensor) -> torch.Size:
    """The shape of the weight a patch applies to: a quantised tensor's logical shape, else `.shape`."""
    for attr in LOGICAL_SHAPE_ATTRS:
        shape = getattr(tensor, attr, None)
        if shape is not None and not callable(shape):
            return torch.Size(shape)
    return tensor.shape
