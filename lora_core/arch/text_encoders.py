"""Text encoders, by what they are (CLIP-L, OpenCLIP-G, T5-XXL, ...), in Hugging Face naming.

Canonical text-encoder paths are the Hugging Face module names of that encoder: CLIP `text_model.encoder.
layers.3.self_attn.q_proj` (with the `text_model.` prefix transformers 5 drops; plus `text_projection` where
ComfyUI keeps one), T5 `encoder.block.3.layer.0.SelfAttention.q`. ComfyUI's CLIP objects use exactly these
names under `<attribute>.transformer.` (`clip_l.transformer.text_model...`, `t5xxl.transformer.encoder...`),
so a host binding needs no table; the module lists below serve layout-only key maps (a LoRA inspected or
merged with no model loaded).

Which encoder is `te1`, `te2`, ... is a fact of each family (arch/families/*.py), not of the encoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder. `comfy_name` is the attribute ComfyUI's CLIP object keeps it under (state dict
    `<comfy_name>.transformer.`). `lora_layers` is how many layers a typical LoRA trains: SD2 runs OpenCLIP-H
    at its penultimate layer, so kohya/diffusers SD2 LoRAs cover 23 of the 24 layers ComfyUI keeps."""

    family: str
    comfy_name: str
    hidden_size: int
    num_layers: int
    lora_layers: int
    intermediate_size: int
    num_heads: int
    kind: str = "clip"          # "clip" | "t5" | "llm": the module naming scheme
    # (HF path, element kind) of weights beyond the scheme's own, e.g. the vision tower of a vision-language
    # encoder (`visual.blocks.N.attn.qkv`); the family that registers the encoder lists them
    extra_modules: tuple[tuple[str, str], ...] = ()


CLIP_L = TextEncoderSpec("CLIP-L", "clip_l", 768, 12, 12, 3072, 12)
OPENCLIP_H = TextEncoderSpec("OpenCLIP-H", "clip_h", 1024, 24, 23, 4096, 16)
OPENCLIP_G = TextEncoderSpec("OpenCLIP-G", "clip_g", 1280, 32, 32, 5120, 20)
T5_XXL = TextEncoderSpec("T5-XXL", "t5xxl", 4096, 24, 24, 10240, 64, kind="t5")
ENCODERS = {spec.comfy_name: spec for spec in (CLIP_L, OPENCLIP_H, OPENCLIP_G, T5_XXL)}
TEXT_ENCODER_FAMILIES = {name: spec for name, spec in ENCODERS.items() if spec.kind == "clip"}


def register_encoder(spec: TextEncoderSpec) -> TextEncoderSpec:
    """Add an encoder a family needs (UMT5, an LLM encoder ...); families call this at import. Two families may
    hold different models under one ComfyUI name (`llama`: HunyuanVideo's LLaVA-Llama-3-8B, HiDream's
    Llama-3.1-8B): each keeps its own spec (its title in messages) as long as the module trees agree."""
    first = ENCODERS.setdefault(spec.comfy_name, spec)
    if first is not spec:
        same_tree = (first.kind, first.hidden_size, first.num_layers, first.intermediate_size) == (
            spec.kind, spec.hidden_size, spec.num_layers, spec.intermediate_size)
        if not same_tree:
            raise ValueError(f"text encoder {spec.family!r} registered under ComfyUI's {spec.comfy_name!r}, "
                             f"which already holds {first.family!r} with another module tree")
    return spec


# ------------------------------------------------------------------------------------------- module lists

CLIP_LAYER_PARTS = (
    ("self_attn.q_proj", "te_attn"), ("self_attn.k_proj", "te_attn"),
    ("self_attn.v_proj", "te_attn"), ("self_attn.out_proj", "te_attn"),
    ("layer_norm1", "norm"), ("layer_norm2", "norm"),
    ("mlp.fc1", "te_mlp"), ("mlp.fc2", "te_mlp"),
)
CLIP_EMBEDDING_PARTS = (
    ("text_model.embeddings.token_embedding", "te_embed"),
    ("text_model.embeddings.position_embedding", "te_embed"),
)
CLIP_FINAL_PARTS = (("text_model.final_layer_norm", "norm"), ("text_projection", "proj"))

T5_BLOCK_PARTS = (
    ("layer.0.SelfAttention.q", "te_attn"), ("layer.0.SelfAttention.k", "te_attn"),
    ("layer.0.SelfAttention.v", "te_attn"), ("layer.0.SelfAttention.o", "te_attn"),
    ("layer.0.layer_norm", "norm"),
    ("layer.1.DenseReluDense.wi_0", "te_mlp"), ("layer.1.DenseReluDense.wi_1", "te_mlp"),
    ("layer.1.DenseReluDense.wo", "te_mlp"), ("layer.1.layer_norm", "norm"),
)
# Keep the old names importable: they are CLIP's.
LAYER_PARTS, EMBEDDING_PARTS, FINAL_PARTS = CLIP_LAYER_PARTS, CLIP_EMBEDDING_PARTS, CLIP_FINAL_PARTS

_LAYER_RE = re.compile(r"^(?:text_model\.)?encoder\.(?:layers|block)\.(\d+)\.|^model\.layers\.(\d+)\.")


def te_modules(spec: TextEncoderSpec, num_layers: Optional[int] = None) -> list[tuple[str, str]]:
    """(HF path, element kind) of every weight-carrying module of a text encoder (its `extra_modules` last)."""
    layers = spec.num_layers if num_layers is None else num_layers
    if spec.kind == "t5":
        out = [("shared", "te_embed"), ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias", "te_embed")]
        for i in range(layers):
            out += [(f"encoder.block.{i}.{p}", kind) for p, kind in T5_BLOCK_PARTS]
        out.append(("encoder.final_layer_norm", "norm"))
    elif spec.kind == "llm":
        out = [("model.embed_tokens", "te_embed")]
        for i in range(layers):
            out += [(f"model.layers.{i}.{p}", kind) for p, kind in LLM_LAYER_PARTS]
        out.append(("model.norm", "norm"))
    else:
        out = list(CLIP_EMBEDDING_PARTS)
        for i in range(layers):
            out += [(f"text_model.encoder.layers.{i}.{p}", kind) for p, kind in CLIP_LAYER_PARTS]
        out += list(CLIP_FINAL_PARTS)
    return out + list(spec.extra_modules)


LLM_LAYER_PARTS = (
    ("self_attn.q_proj", "te_attn"), ("self_attn.k_proj", "te_attn"), ("self_attn.v_proj", "te_attn"),
    ("self_attn.o_proj", "te_attn"), ("mlp.gate_proj", "te_mlp"), ("mlp.up_proj", "te_mlp"),
    ("mlp.down_proj", "te_mlp"), ("input_layernorm", "norm"), ("post_attention_layernorm", "norm"),
)

_KIND_RULES = (
    (re.compile(r"(self_attn|SelfAttention|EncDecAttention|\.attn)\."), "te_attn"),
    (re.compile(r"(self_attn|SelfAttention)\.[a-z_0-9]+$"), "te_attn"),
    (re.compile(r"(\.mlp\.|DenseReluDense|feed_forward)"), "te_mlp"),
    (re.compile(r"(norm|layernorm)", re.I), "norm"),
    (re.compile(r"(embed|shared|relative_attention_bias)"), "te_embed"),
    (re.compile(r"text_projection$"), "proj"),
)


def te_kind(path: str) -> str:
    """Element kind of a text-encoder path (any encoder, HF naming)."""
    for suffix, kind in CLIP_LAYER_PARTS + CLIP_EMBEDDING_PARTS + CLIP_FINAL_PARTS:
        if path.endswith(suffix):
            return kind
    if "relative_attention_bias" in path:
        return "te_embed"
    for rx, kind in _KIND_RULES:
        if rx.search(path):
            return kind
    return "te_embed"


def te_layer(path: str) -> Optional[int]:
    """Layer index of a text-encoder path (`text_model.encoder.layers.7.mlp.fc1` -> 7, T5 `encoder.block.3...`
    -> 3, LLM `model.layers.2...` -> 2), else None."""
    m = _LAYER_RE.match(path)
    if not m:
        return None
    return int(m.group(1) if m.group(1) is not None else m.group(2))


def canonical_te_path(host_path: str, spec: Optional[TextEncoderSpec] = None) -> str:
    """HF path as a host spells it -> canonical path. CLIP: adds the `text_model.` prefix transformers 5 drops.
    Other encoders keep their names."""
    if spec is not None and spec.kind != "clip":
        return host_path
    if host_path.startswith(("text_model.", "text_projection")):
        return host_path
    if host_path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        return "text_model." + host_path
    if spec is None and host_path.startswith(("encoder.block.", "shared", "encoder.final_layer_norm", "model.")):
        return host_path
    return "text_model." + host_path


def short_te_path(path: str) -> str:
    """The same path without CLIP's `text_model.` (what transformers 5 and some writers use)."""
    return path[len("text_model."):] if path.startswith("text_model.") else path


_KOHYA_CLIP = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def kohya_names(spec: TextEncoderSpec, path: str) -> bool:
    """Whether kohya (and ComfyUI's map of kohya names) name this module `lora_te<N>_<path _>`: CLIP's encoder
    attention and MLP linears; every T5-XXL weight (ComfyUI gives `lora_te*_` names to `t5xxl` only: UMT5-XXL and
    LLM encoders have none)."""
    if spec.kind == "clip":
        return bool(_KOHYA_CLIP.match(path))
    return spec.kind == "t5" and spec.comfy_name == "t5xxl"
