"""CLIP text encoders in HF naming: module lists, element kinds, layer parsing.

Canonical text-encoder paths are HF `CLIPTextModel` names with the `text_model.` prefix
(`text_model.encoder.layers.3.self_attn.q_proj`), plus `text_projection` for encoders that carry
one (ComfyUI keeps it on every CLIP; transformers only on `CLIPTextModelWithProjection`).
"""
from __future__ import annotations

import re
from typing import Optional

from .layouts import TextEncoderSpec

LAYER_PARTS = (
    ("self_attn.q_proj", "te_attn"), ("self_attn.k_proj", "te_attn"),
    ("self_attn.v_proj", "te_attn"), ("self_attn.out_proj", "te_attn"),
    ("layer_norm1", "norm"), ("layer_norm2", "norm"),
    ("mlp.fc1", "te_mlp"), ("mlp.fc2", "te_mlp"),
)
EMBEDDING_PARTS = (
    ("text_model.embeddings.token_embedding", "te_embed"),
    ("text_model.embeddings.position_embedding", "te_embed"),
)
FINAL_PARTS = (("text_model.final_layer_norm", "norm"), ("text_projection", "proj"))

_LAYER_RE = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")


def te_modules(spec: TextEncoderSpec, num_layers: Optional[int] = None) -> list[tuple[str, str]]:
    """(HF path, element kind) of every weight-carrying module of a CLIP text encoder."""
    layers = spec.num_layers if num_layers is None else num_layers
    out = list(EMBEDDING_PARTS)
    for i in range(layers):
        out += [(f"text_model.encoder.layers.{i}.{p}", kind) for p, kind in LAYER_PARTS]
    return out + list(FINAL_PARTS)


def te_kind(path: str) -> str:
    """Element kind of a text-encoder path (HF naming)."""
    for suffix, kind in LAYER_PARTS + EMBEDDING_PARTS + FINAL_PARTS:
        if path.endswith(suffix):
            return kind
    return "norm" if "norm" in path else "te_embed"


def te_layer(path: str) -> Optional[int]:
    """Layer index of a text-encoder path (`text_model.encoder.layers.7.mlp.fc1` -> 7), else None."""
    m = _LAYER_RE.match(path)
    return int(m.group(1)) if m else None


def canonical_te_path(host_path: str) -> str:
    """HF path as a host spells it -> canonical path (adds the `text_model.` prefix transformers 5 drops)."""
    if host_path.startswith("text_model.") or host_path.startswith("text_projection"):
        return host_path
    return "text_model." + host_path
