"""UNet module naming: LDM (ComfyUI / A1111 state dicts) <-> diffusers, derived from structure.

`unet_modules(spec)` lists every weight-carrying module of an LDM UNet with its diffusers name(s),
block id and element kind. It walks the UNet the way the model is built (levels, resnets per level,
which blocks carry attention, where the up-sampler sits), so it serves full-size SD1/SD2/SDXL and
shrunken test models alike. `spec_from_ldm_keys` / `spec_from_diffusers_keys` recover a `UNetSpec`
from a host's parameter names (and shapes, when given).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from .layouts import UNetSpec, block_of_ldm_path

# (LDM sub-module, diffusers sub-module, element kind) of a resnet block.
RESNET_PARTS = (
    ("in_layers.0", "norm1", "norm"),
    ("in_layers.2", "conv1", "resnet_conv"),
    ("emb_layers.1", "time_emb_proj", "emb"),
    ("out_layers.0", "norm2", "norm"),
    ("out_layers.3", "conv2", "resnet_conv"),
)
SKIP_PART = ("skip_connection", "conv_shortcut", "resnet_conv")

# Sub-modules of a spatial transformer (same name on both sides) and of each transformer block.
ATTENTION_PARTS = (("norm", "norm"), ("proj_in", "proj"), ("proj_out", "proj"))
TRANSFORMER_BLOCK_PARTS = (
    ("norm1", "norm"), ("norm2", "norm"), ("norm3", "norm"),
    ("attn1.to_q", "attn1"), ("attn1.to_k", "attn1"), ("attn1.to_v", "attn1"), ("attn1.to_out.0", "attn1"),
    ("attn2.to_q", "attn2"), ("attn2.to_k", "attn2"), ("attn2.to_v", "attn2"), ("attn2.to_out.0", "attn2"),
    ("ff.net.0.proj", "ff"), ("ff.net.2", "ff"),
)

# Modules outside the down/mid/up blocks. label_emb has two diffusers names: SDXL uses add_embedding,
# unCLIP-style models class_embedding; ComfyUI accepts both, so we do too (first one is canonical).
BASIC_PARTS = (
    ("input_blocks.0.0", ("conv_in",), "conv_in"),
    ("time_embed.0", ("time_embedding.linear_1",), "time_embed"),
    ("time_embed.2", ("time_embedding.linear_2",), "time_embed"),
    ("out.0", ("conv_norm_out",), "norm"),
    ("out.2", ("conv_out",), "conv_out"),
)
LABEL_EMB_PARTS = (
    ("label_emb.0.0", ("add_embedding.linear_1", "class_embedding.linear_1"), "label_emb"),
    ("label_emb.0.2", ("add_embedding.linear_2", "class_embedding.linear_2"), "label_emb"),
)


@dataclass(frozen=True)
class UNetModule:
    """One weight-carrying UNet module: LDM path (canonical), diffusers path(s), block, element kind."""

    ldm: str
    diffusers: tuple[str, ...]
    block: str
    kind: str


def _resnet(ldm: str, dif: str, has_skip: bool) -> list[UNetModule]:
    parts = RESNET_PARTS + ((SKIP_PART,) if has_skip else ())
    return [UNetModule(f"{ldm}.{a}", (f"{dif}.{b}",), block_of_ldm_path(ldm + "."), kind) for a, b, kind in parts]


def _attention(ldm: str, dif: str, depth: int) -> list[UNetModule]:
    block = block_of_ldm_path(ldm + ".")
    out = [UNetModule(f"{ldm}.{p}", (f"{dif}.{p}",), block, kind) for p, kind in ATTENTION_PARTS]
    for t in range(depth):
        out += [
            UNetModule(f"{ldm}.transformer_blocks.{t}.{p}", (f"{dif}.transformer_blocks.{t}.{p}",), block, kind)
            for p, kind in TRANSFORMER_BLOCK_PARTS
        ]
    return out


def _skips(spec: UNetSpec) -> tuple[list[bool], list[bool]]:
    """Which input / output resnets have a skip_connection conv (in-channels != out-channels).

    Mirrors how the UNet threads channels: output resnets see their own channels plus the matching
    input block's channels (the U-Net skip), popped in reverse order.
    """
    mc = spec.model_channels or 1
    ch, chans, in_skips = mc, [mc], []
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks[level]):
            in_skips.append(ch != mult * mc)
            ch = mult * mc
            chans.append(ch)
        if level != spec.levels - 1:
            chans.append(ch)
    out_skips = []
    for level in reversed(range(spec.levels)):
        for _ in range(spec.num_res_blocks[level] + 1):
            in_ch = ch + chans.pop()
            ch = spec.channel_mult[level] * mc
            out_skips.append(in_ch != ch)
    return in_skips, out_skips


def unet_modules(spec: UNetSpec) -> list[UNetModule]:
    """Every weight-carrying module of the UNet described by `spec`, LDM and diffusers names paired."""
    modules = [UNetModule(ldm, dif, block_of_ldm_path(ldm + "."), kind) for ldm, dif, kind in BASIC_PARTS]
    if spec.adm_in_channels:
        modules += [UNetModule(ldm, dif, "OTHER", kind) for ldm, dif, kind in LABEL_EMB_PARTS]
    in_skips, out_skips = _skips(spec)
    depths_in = list(spec.transformer_depth)

    n = 1
    for level in range(spec.levels):
        for i in range(spec.num_res_blocks[level]):
            modules += _resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", in_skips.pop(0))
            depth = depths_in.pop(0)
            if depth > 0:
                modules += _attention(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}", depth)
            n += 1
        if level != spec.levels - 1:
            modules.append(UNetModule(f"input_blocks.{n}.0.op", (f"down_blocks.{level}.downsamplers.0.conv",),
                                      block_of_ldm_path(f"input_blocks.{n}."), "downsample"))
            n += 1

    mid = spec.transformer_depth_middle
    if mid >= -1:
        modules += _resnet("middle_block.0", "mid_block.resnets.0", False)
    if mid >= 0:
        modules += _attention("middle_block.1", "mid_block.attentions.0", mid)
        modules += _resnet("middle_block.2", "mid_block.resnets.1", False)

    depths_out = spec.output_block_depths()
    n = 0
    for up, level in enumerate(reversed(range(spec.levels))):
        count = spec.num_res_blocks[level] + 1
        for i in range(count):
            modules += _resnet(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{i}", out_skips.pop(0))
            sub = 1
            if depths_out[n] > 0:
                modules += _attention(f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{i}", depths_out[n])
                sub = 2
            if level != 0 and i == count - 1:
                modules.append(UNetModule(f"output_blocks.{n}.{sub}.conv", (f"up_blocks.{up}.upsamplers.0.conv",),
                                          block_of_ldm_path(f"output_blocks.{n}."), "upsample"))
            n += 1
    return modules


def ldm_to_diffusers(spec: UNetSpec) -> dict[str, str]:
    """LDM module path -> canonical diffusers module path."""
    return {m.ldm: m.diffusers[0] for m in unet_modules(spec)}


def diffusers_to_ldm(spec: UNetSpec) -> dict[str, str]:
    """Diffusers module path (every accepted spelling) -> LDM module path."""
    return {d: m.ldm for m in unet_modules(spec) for d in m.diffusers}


# ---------------------------------------------------------------------------------------------
# Recovering a UNetSpec from a host's parameter names (+ shapes when available)
# ---------------------------------------------------------------------------------------------

def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _depth(keys: set[str], prefix: str, attention_marker: str) -> int:
    """Transformer depth of the attention at `prefix` (0 when there is none)."""
    if f"{prefix}.{attention_marker}" not in keys:
        return 0
    blocks = _indices(keys, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    return (blocks[-1] + 1) if blocks else 0


def _shape(shapes: Optional[Mapping[str, tuple]], key: str) -> Optional[tuple]:
    if shapes is None or key not in shapes:
        return None
    return tuple(shapes[key])


def _mults_from_skips(first_skips: list[bool]) -> tuple[int, ...]:
    """Without shapes, a channel change shows as a skip conv on a level's first resnet: invent a
    channel_mult that reproduces exactly that pattern (values are placeholders, structure is right)."""
    mults, mult = [], 1
    for skip in first_skips:
        if skip:
            mult += 1
        mults.append(mult)
    return tuple(mults)


def spec_from_ldm_keys(keys: Iterable[str], shapes: Optional[Mapping[str, tuple]] = None) -> Optional[UNetSpec]:
    """UNetSpec of an LDM state dict given WITHOUT prefix (`input_blocks.1.1.proj_in.weight`, ...).

    Returns None when the keys are not an LDM UNet. Channels/context come from `shapes` if given.
    """
    keys = set(keys)
    if "input_blocks.0.0.weight" not in keys:
        return None
    inputs = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in keys]
    bounds = downs + [inputs[-1] + 1]
    nrb, depth, first_skips, mults, start = [], [], [], [], 1
    mc_shape = _shape(shapes, "input_blocks.0.0.weight")
    mc = mc_shape[0] if mc_shape else 0
    for end in bounds:
        blocks = list(range(start, end))
        nrb.append(len(blocks))
        depth += [_depth(keys, f"input_blocks.{b}.1", "proj_in.weight") for b in blocks]
        first_skips.append(bool(blocks) and f"input_blocks.{blocks[0]}.0.skip_connection.weight" in keys)
        out_shape = _shape(shapes, f"input_blocks.{blocks[0]}.0.out_layers.3.weight") if blocks else None
        mults.append(out_shape[0] // mc if out_shape and mc else None)
        start = end + 1
    channel_mult = tuple(mults) if all(m is not None for m in mults) else _mults_from_skips(first_skips)

    if "middle_block.1.proj_in.weight" in keys:
        mid = _depth(keys, "middle_block.1", "proj_in.weight")
    else:
        mid = -1 if any(k.startswith("middle_block.0.") for k in keys) else -2
    outputs = _indices(keys, r"output_blocks\.(\d+)\.")
    depth_out = [_depth(keys, f"output_blocks.{b}.1", "proj_in.weight") for b in outputs]
    return UNetSpec(
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=tuple(nrb),
        transformer_depth=tuple(depth),
        transformer_depth_middle=mid,
        transformer_depth_output=tuple(reversed(depth_out)),
        context_dim=_context_dim(keys, shapes, r"(?:input_blocks|middle_block|output_blocks)\..*attn2\.to_k\.weight$"),
        use_linear_in_transformer=_linear_proj(keys, shapes),
        adm_in_channels=_adm(shapes, keys, ("label_emb.0.0.weight",)),
    )


def spec_from_diffusers_keys(keys: Iterable[str], shapes: Optional[Mapping[str, tuple]] = None) -> Optional[UNetSpec]:
    """UNetSpec of a diffusers `UNet2DConditionModel` state dict (`down_blocks.0.resnets.0.conv1.weight`)."""
    keys = set(keys)
    if "conv_in.weight" not in keys:
        return None
    levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
    nrb, depth, first_skips, mults = [], [], [], []
    mc_shape = _shape(shapes, "conv_in.weight")
    mc = mc_shape[0] if mc_shape else 0
    for level in range(levels):
        n_res = len(_indices(keys, rf"down_blocks\.{level}\.resnets\.(\d+)\."))
        nrb.append(n_res)
        depth += [_depth(keys, f"down_blocks.{level}.attentions.{i}", "proj_in.weight") for i in range(n_res)]
        first_skips.append(f"down_blocks.{level}.resnets.0.conv_shortcut.weight" in keys)
        out_shape = _shape(shapes, f"down_blocks.{level}.resnets.0.conv2.weight")
        mults.append(out_shape[0] // mc if out_shape and mc else None)
    channel_mult = tuple(mults) if all(m is not None for m in mults) else _mults_from_skips(first_skips)
    depth_out = []
    for up in range(levels):
        n_res = len(_indices(keys, rf"up_blocks\.{up}\.resnets\.(\d+)\."))
        depth_out += [_depth(keys, f"up_blocks.{up}.attentions.{i}", "proj_in.weight") for i in range(n_res)]
    if "mid_block.attentions.0.proj_in.weight" in keys:
        mid = _depth(keys, "mid_block.attentions.0", "proj_in.weight")
    else:
        mid = -1 if any(k.startswith("mid_block.") for k in keys) else -2
    return UNetSpec(
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=tuple(nrb),
        transformer_depth=tuple(depth),
        transformer_depth_middle=mid,
        transformer_depth_output=tuple(reversed(depth_out)),
        context_dim=_context_dim(keys, shapes, r".*attn2\.to_k\.weight$"),
        use_linear_in_transformer=_linear_proj(keys, shapes),
        adm_in_channels=_adm(shapes, keys, ("add_embedding.linear_1.weight", "class_embedding.linear_1.weight")),
    )


def _context_dim(keys: set[str], shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    for k in sorted(keys):
        if rx.match(k):
            shape = _shape(shapes, k)
            return shape[1] if shape else 0
    return 0


def _linear_proj(keys: set[str], shapes) -> Optional[bool]:
    for k in sorted(keys):
        if k.endswith("proj_in.weight"):
            shape = _shape(shapes, k)
            return None if shape is None else len(shape) == 2
    return None


def _adm(shapes, keys: set[str], candidates: tuple[str, ...]) -> Optional[int]:
    for k in candidates:
        if k in keys:
            shape = _shape(shapes, k)
            return shape[1] if shape else -1  # -1: present, width unknown
    return None
