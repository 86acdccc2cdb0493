"""The Stable Diffusion UNet family: SD1.x, SD2.x and SDXL (Pony / Illustrious / NoobAI are SDXL).

Everything LoRA Core knows about these models is here: the UNet structure in ComfyUI's `unet_config`
vocabulary (`UNetSpec`), the module list derived from it with LDM (ComfyUI / A1111 / kohya) and diffusers names,
recognition from a host's keys and shapes, the text encoders per variant, the block layout (A1111's and Inspire's
positional layouts, what each block is), and the metadata strings trainers write.

Block layout decisions:

* Text encoders get their own blocks: `TE1` and, on SDXL, `TE2`. A1111's `BASE` is the group of all
  text-encoder blocks, so SDXL can weight its two TEs apart.
* `IN00` is `input_blocks.0` (diffusers `conv_in`), exactly as A1111's 26/20-block layouts count it.
  Putting conv_in anywhere else would make an A1111 `IN00` weight a silent no-op for LoCon files.
* `OTHER` is every UNet module outside input/middle/output blocks: `time_embed` (diffusers
  `time_embedding`), `label_emb` (SDXL `add_embedding`), `out.0` (`conv_norm_out`), `out.2`
  (`conv_out`). A1111 cannot address these; it leaves them at 1.

`unet_modules(spec)` walks the UNet the way the model is built (levels, resnets per level, which blocks carry
attention, where the up-sampler sits), so it serves full-size SD1/SD2/SDXL and shrunken test models alike.
`spec_from_ldm_keys` / `spec_from_diffusers_keys` recover a `UNetSpec` from a host's parameter names (and
shapes, when given).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from ..family import Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, TrainSpec
from ..text_encoders import CLIP_L, OPENCLIP_G, OPENCLIP_H

OTHER = "OTHER"
MID = "M00"
BASE = "BASE"

# Element kinds of SD targets (UNet and CLIP). Every target gets exactly one.
ELEMENT_KINDS = (
    "attn1",        # UNet self-attention (transformer_blocks.N.attn1.*)
    "attn2",        # UNet cross-attention (transformer_blocks.N.attn2.*)
    "ff",           # UNet transformer feed-forward (ff.net.0.proj, ff.net.2)
    "proj",         # UNet attention proj_in / proj_out; TE text_projection
    "norm",         # any norm layer (GroupNorm / LayerNorm), UNet or TE
    "resnet_conv",  # resnet in_layers.2 / out_layers.3 / skip_connection (conv1, conv2, conv_shortcut)
    "emb",          # resnet emb_layers.1 (time_emb_proj)
    "downsample",   # input_blocks.N.0.op (downsamplers.0.conv)
    "upsample",     # output_blocks.N.{1,2}.conv (upsamplers.0.conv)
    "conv_in",      # input_blocks.0.0 (conv_in)
    "conv_out",     # out.2 (conv_out)
    "time_embed",   # time_embed.{0,2} (time_embedding.linear_{1,2})
    "label_emb",    # label_emb.0.{0,2} (add_embedding.linear_{1,2}), SDXL size conditioning
    "te_attn",      # TE self_attn.{q,k,v,out}_proj
    "te_mlp",       # TE mlp.fc1 / fc2
    "te_embed",     # TE token / position embedding
)
# Named-syntax / lbwe element groups -> kinds.
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"attn1", "attn2", "te_attn"}),   # A1111 "attn" matches attn1, attn2 and TE self_attn
    "mlp": frozenset({"te_mlp"}),
    "resnet": frozenset({"resnet_conv", "emb"}),       # a resnet's convs and its time-embedding projection
    "conv": frozenset({"resnet_conv", "conv_in", "conv_out", "downsample", "upsample"}),
    "emb": frozenset({"emb", "time_embed", "label_emb", "te_embed"}),
})

_INPUT_RE = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT_RE = re.compile(r"^output_blocks\.(\d+)\.")


def block_of_ldm_path(path: str) -> str:
    """Block id of a UNet module given in LDM naming: IN00.., M00, OUT00.. or OTHER.

    The index is read up to the next dot, so `input_blocks.1.` and `input_blocks.10.` never collide.
    """
    m = _INPUT_RE.match(path)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if path.startswith("middle_block."):
        return MID
    m = _OUTPUT_RE.match(path)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return OTHER


@dataclass(frozen=True)
class UNetSpec:
    """Structure of an LDM UNet, in ComfyUI's `unet_config` terms.

    `transformer_depth` has one entry per input resnet (level 0 first). `transformer_depth_output`
    follows ComfyUI's convention: it is consumed from its END, so output_blocks.0 takes the last entry.
    `transformer_depth_middle`: >= 0 attention depth; -1 only middle_block.0; -2 no middle block.
    Fields that cannot be known from key names alone (channels, context) are 0 / None when unknown.
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]
    context_dim: int
    use_linear_in_transformer: Optional[bool]
    adm_in_channels: Optional[int]

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def num_input_blocks(self) -> int:
        """input_blocks count: conv_in + one per resnet + one downsampler per level but the last."""
        return 1 + sum(self.num_res_blocks) + self.levels - 1

    @property
    def num_output_blocks(self) -> int:
        return sum(n + 1 for n in self.num_res_blocks)

    def input_block_depths(self) -> list[int]:
        """Transformer depth per input_blocks index (0 = no attention; conv_in and downsamplers are 0).

        -1 would never appear: a resnet block either has attention (depth >= 1) or not."""
        depths = [0]
        queue = list(self.transformer_depth)
        for level, n_res in enumerate(self.num_res_blocks):
            depths += [queue.pop(0) for _ in range(n_res)]
            if level != self.levels - 1:
                depths.append(0)
        return depths

    def output_block_depths(self) -> list[int]:
        """Transformer depth per output_blocks index (ComfyUI pops transformer_depth_output from its end)."""
        return list(reversed(self.transformer_depth_output))

    def to_comfy_config(self) -> dict:
        """The `unet_config` keys ComfyUI's UNetModel and `comfy.utils.unet_to_diffusers` read."""
        return {
            "model_channels": self.model_channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": list(self.num_res_blocks),
            "transformer_depth": list(self.transformer_depth),
            "transformer_depth_middle": self.transformer_depth_middle,
            "transformer_depth_output": list(self.transformer_depth_output),
            "context_dim": self.context_dim,
            "use_linear_in_transformer": bool(self.use_linear_in_transformer),
            "adm_in_channels": self.adm_in_channels,
        }

    @classmethod
    def from_comfy_config(cls, config: dict) -> "UNetSpec":
        """Read a ComfyUI `model.model_config.unet_config` dict (a plain dict: no ComfyUI import)."""
        levels = len(config["channel_mult"])
        nrb = config["num_res_blocks"]
        nrb = [nrb] * levels if isinstance(nrb, int) else list(nrb)
        depth = config.get("transformer_depth", 0)
        depth = [depth] * sum(nrb) if isinstance(depth, int) else list(depth)
        depth_out = config.get("transformer_depth_output")
        if depth_out is None:  # ComfyUI default: the input depths mirrored, one extra per level
            depth_out = []
            for level, n_res in enumerate(nrb):
                start = sum(nrb[:level])
                level_depths = depth[start:start + n_res]
                depth_out += level_depths + [level_depths[-1] if level_depths else 0]
        mid = config.get("transformer_depth_middle")
        if mid is None:
            mid = depth[-1] if depth else 0
        return cls(
            model_channels=int(config.get("model_channels", 0)),
            channel_mult=tuple(config["channel_mult"]),
            num_res_blocks=tuple(nrb),
            transformer_depth=tuple(depth),
            transformer_depth_middle=int(mid),
            transformer_depth_output=tuple(depth_out),
            context_dim=int(config.get("context_dim") or 0),
            use_linear_in_transformer=config.get("use_linear_in_transformer"),
            adm_in_channels=config.get("adm_in_channels"),
        )

    def block_ids(self) -> tuple[str, ...]:
        """UNet block ids in layout order: IN00.., M00 (when a middle block exists), OUT00.."""
        ids = [f"IN{i:02d}" for i in range(self.num_input_blocks)]
        if self.transformer_depth_middle >= -1:
            ids.append(MID)
        ids += [f"OUT{i:02d}" for i in range(self.num_output_blocks)]
        return tuple(ids)




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


@functools.lru_cache(maxsize=64)
def unet_modules(spec: UNetSpec) -> tuple[UNetModule, ...]:
    """Every weight-carrying module of the UNet described by `spec`, LDM and diffusers names paired (cached per
    spec; read-only)."""
    return tuple(_unet_modules(spec))


def _unet_modules(spec: UNetSpec) -> list[UNetModule]:
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


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------

def _ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(count)]


_SD_UNET = _ids("IN", 12) + [MID] + _ids("OUT", 12)
_SDXL_UNET = _ids("IN", 9) + [MID] + _ids("OUT", 9)

# A1111 block-id lists (BLOCKID26/17/20/12 of hako-mikan's extension): position -> block id.
A1111_SD26 = [BASE] + _SD_UNET
A1111_SD17 = [BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", MID] + _ids("OUT", 12)[3:]
A1111_SDXL20 = [BASE] + _SDXL_UNET
A1111_SDXL12 = [BASE, "IN04", "IN05", "IN07", "IN08", MID] + _ids("OUT", 6)
# Inspire's standard ordinal layouts (what the positions mean when the file has the usual blocks).
# `M00.k` is LDM `middle_block.k`: a plain LoRA only has middle_block.1 (one slot, written `M00`).
INSPIRE_SD17 = [BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", MID] + _ids("OUT", 12)[3:]
INSPIRE_SD27 = [BASE] + _ids("IN", 12)[1:] + ["M00.0", "M00.1", "M00.2"] + _ids("OUT", 12)
INSPIRE_SDXL12 = [BASE, "IN04", "IN05", "IN07", "IN08", MID] + _ids("OUT", 6)
INSPIRE_SDXL21 = [BASE] + _ids("IN", 9)[1:] + ["M00.0", "M00.1", "M00.2"] + _ids("OUT", 9)

_SD_LEVELS = {0: "64x64 latent, 320ch", 1: "32x32, 640ch", 2: "16x16, 1280ch", 3: "8x8, 1280ch"}
_SDXL_LEVELS = {0: "128x128, 320ch", 1: "64x64, 640ch", 2: "32x32, 1280ch"}


def _describe_blocks(sdxl: bool, te1: str) -> dict[str, str]:
    names = {"TE1": f"text encoder ({te1})", "TE2": "text encoder 2 (OpenCLIP-G)", MID: "middle block",
             OTHER: "time_embed, label_emb, out (non-block UNet modules)", "IN00": "conv_in"}
    levels = 3 if sdxl else 4
    size = _SDXL_LEVELS if sdxl else _SD_LEVELS
    attention = {1, 2} if sdxl else {0, 1, 2}
    for level in range(levels):
        for j in range(2):
            n = 3 * level + j + 1
            part = "resnet + attention" if level in attention else "resnet"
            names[f"IN{n:02d}"] = f"input level {level}.{j}: {part} ({size[level]})"
        if level != levels - 1:
            names[f"IN{3 * level + 3:02d}"] = f"downsample of level {level}"
    up_attention = {0, 1} if sdxl else {1, 2, 3}
    for up in range(levels):
        level = levels - 1 - up
        for j in range(3):
            n = 3 * up + j
            part = "resnet + attention" if up in up_attention else "resnet"
            extra = " + upsample" if j == 2 and up != levels - 1 else ""
            names[f"OUT{n:02d}"] = f"output level {level}.{j}: {part}{extra} ({size[level]})"
    return names


def _te(component: str, encoder, kohya: tuple[str, ...], diffusers: str) -> ComponentSpec:
    return ComponentSpec(component, component.upper(), encoder, kohya, diffusers)


_UNET = ComponentSpec("unet", "")
_TE1 = ("lora_te_", "lora_te1_")


def _unet_aliases(path: str, diffusers: tuple[str, ...]) -> list[Alias]:
    """kohya LDM, ComfyUI and checkpoint names; kohya-diffusers, SimpleTuner-LyCORIS, diffusers / PEFT and
    diffusers' old attention-processor names."""
    under = path.replace(".", "_")
    names = [f"lora_unet_{under}", f"diffusion_model.{path}", f"model.diffusion_model.{path}"]
    for d in diffusers:
        d_under = d.replace(".", "_")
        names += [f"lora_unet_{d_under}", f"lycoris_{d_under}", d, f"unet.{d}",
                  f"base_model.model.{d}", f"unet.base_model.model.{d}"]
        processor = d.replace(".to_", ".processor.to_")
        if processor.endswith(".to_out.0"):
            processor = processor[:-2]
        if processor != d:
            names += [processor, f"unet.{processor}"]
    return [Alias(n) for n in names]


# Detection rules by cross-attention context width (first match wins after size conditioning).
CONTEXT_DIMS = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
UNET_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "")


class SDFamily(Family):
    name = "sd"
    title = "Stable Diffusion UNet (SD1.x, SD2.x, SDXL)"
    denoiser = "unet"
    markers = ((r"(^|[._])(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]\d",
                "SD UNet (SD1.x / SD2.x / SDXL)"),)

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        sd = dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                  transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
                  transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0), adm_in_channels=None)
        self.SD1 = ArchSpec(
            name="SD1", title="Stable Diffusion 1.x", family=self,
            config=UNetSpec(**sd, context_dim=768, use_linear_in_transformer=False),
            components={"unet": _UNET, "te1": _te("te1", CLIP_L, _TE1, "text_encoder.")},
            aliases=("sd1", "sd15", "sd1.5", "sd1.x", "sd14"), layout_key="sd1",
            metadata={"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1",
                      "modelspec.implementation": "diffusers", "train_implementation": "diffusers",
                      "resolution": 512, "short": "SD1.x", "match": ("sd_v1", "stable-diffusion-v1", "sd1", "sd15")})
        self.SD2 = ArchSpec(
            name="SD2", title="Stable Diffusion 2.x", family=self,
            config=UNetSpec(**sd, context_dim=1024, use_linear_in_transformer=True),
            components={"unet": _UNET, "te1": _te("te1", OPENCLIP_H, _TE1, "text_encoder.")},
            aliases=("sd2", "sd20", "sd21", "sd2.0", "sd2.1", "sd2.x"), layout_key="sd2",
            metadata={"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512",
                      "modelspec.implementation": "diffusers", "train_implementation": "diffusers",
                      "resolution": 512, "short": "SD2.x", "match": ("sd_v2", "stable-diffusion-v2", "sd2")})
        self.SDXL = ArchSpec(
            name="SDXL", title="Stable Diffusion XL (also Pony, Illustrious, NoobAI)", family=self,
            config=UNetSpec(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                            transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
                            transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10), context_dim=2048,
                            use_linear_in_transformer=True, adm_in_channels=2816),
            components={"unet": _UNET, "te1": _te("te1", CLIP_L, ("lora_te1_", "lora_te_"), "text_encoder."),
                        "te2": _te("te2", OPENCLIP_G, ("lora_te2_", "lora_prior_te_"), "text_encoder_2.")},
            aliases=("sdxl", "pony", "illustrious", "noobai", "sdxl1.0"), layout_key="sdxl",
            metadata={"ss_base_model_version": "sdxl_base_v1-0",
                      "modelspec.architecture": "stable-diffusion-xl-v1-base",
                      "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                      "train_implementation": "https://github.com/Stability-AI/generative-models",
                      "resolution": 1024, "short": "SDXL", "match": ("sdxl", "stable-diffusion-xl")})
        self.variants = (self.SD1, self.SD2, self.SDXL)

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys, shapes, config=None, config_name=""):
        """A UNet from its LDM keys (+ shapes); the variant by size conditioning (SDXL), context width, or
        proj_in's shape. Without shapes an SD1 and an SD2 UNet have identical names: variant None."""
        keys = list(keys)
        if "input_blocks.0.0.weight" not in set(keys):
            return None
        spec = UNetSpec.from_comfy_config(config) if config else spec_from_ldm_keys(keys, shapes)
        if spec is None:
            return None
        return self.variant_of_spec(spec, config_name), spec

    def detect_diffusers(self, keys, shapes):
        spec = spec_from_diffusers_keys(keys, shapes)
        if spec is None:
            return None
        return self.variant_of_spec(spec), spec

    def variant_of_spec(self, spec: "UNetSpec", config_name: str = "") -> Optional[ArchSpec]:
        name = config_name.upper()
        if name:
            if "SDXL" in name or "VEGA" in name or "SSD1B" in name or "KOALA" in name:
                return self.SDXL
            if name.startswith("SD2"):
                return self.SD2
            if name.startswith("SD1"):
                return self.SD1
        if spec.adm_in_channels:
            return self.SDXL
        if spec.context_dim in CONTEXT_DIMS:
            return getattr(self, CONTEXT_DIMS[spec.context_dim])
        if spec.use_linear_in_transformer is not None:
            return self.SD2 if spec.use_linear_in_transformer else self.SD1
        return None

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        if "t5xxl" in comfy_names:
            return None   # no SD UNet model has a T5 encoder (CLIP-L + CLIP-G + T5 is SD3's)
        if "clip_g" in comfy_names:
            return self.SDXL
        if "clip_h" in comfy_names:
            return self.SD2
        if comfy_names == {"clip_l"}:
            return self.SD1
        return None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        """ComfyUI CLIP attribute -> component. Two encoders (SDXL): clip_l = te1, clip_g = te2; one encoder
        (SD1, SD2, an SDXL refiner's clip_g alone) is te1."""
        if {"clip_l", "clip_g"} <= comfy_names:
            return {"clip_l": "te1", "clip_g": "te2"}
        return {name: "te1" for name in comfy_names}

    # ----------------------------------------------------------------------------- modules
    def modules(self, config: "UNetSpec", variant=None) -> list[ModuleDef]:
        return [ModuleDef(m.ldm, m.block, m.kind) for m in unet_modules(config)]

    def aliases(self, module: ModuleDef, config: "UNetSpec", variant=None) -> list[Alias]:
        return _unet_aliases(module.path, self._diffusers_names(config).get(module.path, ()))

    def _diffusers_names(self, config: "UNetSpec") -> dict:
        cached = getattr(self, "_dif_cache", None)
        if cached is not None and cached[0] == config:
            return cached[1]
        table = {m.ldm: m.diffusers for m in unet_modules(config)}
        self._dif_cache = (config, table)
        return table

    def diffusers_names(self, config: "UNetSpec") -> dict:
        return self._diffusers_names(config)

    def diffusers_host_pieces(self, config: "UNetSpec", variant=None) -> dict:
        return {f"{d}.weight": (m.ldm, None, "weight") for m in unet_modules(config) for d in m.diffusers}

    def preferred_variant(self, names):
        return None   # SD1 and SD2 LoRAs with the same names: guessing would be wrong, ask

    def lora_votes(self, modules, variant, key_map) -> int:
        """+1 / -1 per module whose shape fits / contradicts `variant`: transformer proj_in/out a 1x1 conv (SD1)
        or a linear (SD2, SDXL); cross-attention key/value input width = the context width; TE width = hidden
        size."""
        from ... import adapters

        votes = 0
        for name, module in modules.items():
            target = key_map.resolve(name)
            if target is None or module.algo not in ("lora", "loha", "lokr", "full", "norm", "set"):
                continue
            shape = tuple(adapters.natural_shape(module))
            if len(shape) < 2:
                continue
            if target.component == "unet" and target.path.endswith((".proj_in", ".proj_out")):
                votes += 1 if (len(shape) == 4) == (variant.config.use_linear_in_transformer is False) else -1
            elif target.component == "unet" and target.path.endswith((".attn2.to_k", ".attn2.to_v")):
                votes += 1 if shape[1] == variant.config.context_dim else -1
            elif target.component in variant.text_encoders and target.path.endswith(".self_attn.q_proj"):
                votes += 1 if shape[1] == variant.text_encoders[target.component].hidden_size else -1
        return votes

    def conv_kernel(self, target, variant) -> Optional[int]:
        if target.kind in ("resnet_conv", "conv_in", "conv_out", "downsample", "upsample"):
            return 1 if target.path.endswith("skip_connection") else 3
        if target.kind == "proj" and variant.config.use_linear_in_transformer is False:
            return 1   # SD1's transformer proj_in / proj_out are 1x1 convs
        return None

    def denoiser_words(self):
        return ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block", "conv_in",
                "conv_out", "conv_norm_out", "time_embed", "time_embedding", "label_emb", "add_embedding", "out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.unet
        arch = km.arch.name if km.arch else "this"
        if spec is None:
            return f"{name!r}: UNet key, but no UNet is in this key map (CLIP-only): load it with the model"
        down = _num(r"(?:down|up)_blocks[._](\d+)", rest)
        if down is not None and down >= spec.levels:
            word = "down_blocks" if "down_blocks" in rest else "up_blocks"
            return (f"{name!r}: UNet key for {word}.{down}, but this model has {spec.levels} levels "
                    f"({word}.0-{spec.levels - 1}): this LoRA was made for a UNet with at least {down + 1} levels "
                    "(SD1.x/SD2.x have 4, SDXL 3)")
        for word, count in (("input_blocks", spec.num_input_blocks), ("output_blocks", spec.num_output_blocks)):
            idx = _num(word + r"[._](\d+)", rest)
            if idx is not None and idx >= count:
                return (f"{name!r}: UNet key for {word}.{idx}, but this model has {word}.0-{count - 1}: "
                        f"this LoRA was made for a bigger UNet (SD1.x/SD2.x have {word}.0-11, SDXL 0-8)")
        attn = re.search(r"(down|up)_blocks[._](\d+)[._]attentions[._](\d+)", rest)
        if attn and not _diffusers_level_has_attention(spec, attn.group(1), int(attn.group(2))):
            where = f"{attn.group(1)}_blocks.{attn.group(2)}"
            return (f"{name!r}: UNet key for {where}.attentions.{attn.group(3)}, but this model has no attention in "
                    f"{where} (SDXL has none at its 320-channel level): this LoRA was made for SD1.x/SD2.x")
        ldm_attn = re.search(r"(input|output)_blocks[._](\d+)[._]1[._](transformer_blocks|proj_in|proj_out|norm)", rest)
        if ldm_attn:
            depths = spec.input_block_depths() if ldm_attn.group(1) == "input" else spec.output_block_depths()
            if depths[int(ldm_attn.group(2))] == 0:
                where = f"{ldm_attn.group(1)}_blocks.{ldm_attn.group(2)}"
                return (f"{name!r}: attention key for {where}, but {where} has no attention in this {arch} model: "
                        "this LoRA was made for a different architecture")
        t = _num(r"transformer_blocks[._](\d+)", rest)
        deepest = max([*spec.transformer_depth, spec.transformer_depth_middle, *spec.transformer_depth_output, 0])
        if t is not None and t >= deepest:
            return (f"{name!r}: key for transformer_blocks.{t}, but no attention in this {arch} model has more than "
                    f"{deepest} transformer blocks: this LoRA was made for a deeper UNet (SDXL has 10)")
        return (f"{name!r}: UNet-style key that names no module of this {arch} UNet; check the LoRA's base "
                "model (or the module is not a weight, e.g. a bias-only or buffer key)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.name)
        if layout is not None:
            return layout
        sdxl = variant is self.SDXL
        te_blocks = tuple(c.block for c in variant.components.values() if c.is_text_encoder)
        unet_ids = tuple(_SDXL_UNET if sdxl else _SD_UNET)
        layout = BlockLayout(
            key=variant.layout_key,
            blocks=te_blocks + unet_ids + (OTHER,),
            te_blocks=te_blocks,
            other_blocks=(OTHER,),
            descriptions=_describe_blocks(sdxl, variant.text_encoders["te1"].family),
            groups={BASE: te_blocks},
            a1111={12: A1111_SDXL12, 20: A1111_SDXL20} if sdxl else {17: A1111_SD17, 26: A1111_SD26},
            a1111_missing=0.0,
            inspire_groups=(("in", r"IN(\d\d)"), ("mid", r"M(00)"), ("out", r"OUT(\d\d)")),
            inspire_layouts={12: INSPIRE_SDXL12, 21: INSPIRE_SDXL21} if sdxl else {17: INSPIRE_SD17,
                                                                                   27: INSPIRE_SD27},
            inspire_preset_prefixes=("SDXL-",) if sdxl else ("SD-",),
            element_kinds=ELEMENT_KINDS,
            element_groups=ELEMENT_GROUPS,
            mid_block=MID,
        )
        self._layouts[variant.name] = layout
        return layout


    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> TrainSpec:
        return SD_TRAIN

    def training_metadata(self, variant: ArchSpec, prediction: str) -> dict[str, str]:
        """kohya's strings; a v-prediction SD1/SD2 model is `sd_v1_v` / `sd_v2_v`, and an SD2 v-model
        `stable-diffusion-v2-768-v` (sd-scripts' sai_model_spec)."""
        out = super().training_metadata(variant, prediction)
        if prediction.startswith("v") and variant in (self.SD1, self.SD2):
            out["ss_base_model_version"] += "_v"
            if variant is self.SD2:
                out["modelspec.architecture"] = "stable-diffusion-v2-768-v/lora"
        out["ss_v2"] = str(variant is self.SD2)
        return out


def _num(pattern: str, text: str) -> Optional[int]:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def _diffusers_level_has_attention(spec, side: str, index: int) -> bool:
    if side == "down":
        start = sum(spec.num_res_blocks[:index])
        return any(spec.transformer_depth[start:start + spec.num_res_blocks[index]])
    level = spec.levels - 1 - index
    out = spec.output_block_depths()
    start = sum(n + 1 for n in list(reversed(spec.num_res_blocks))[:index])
    return any(out[start:start + spec.num_res_blocks[level] + 1])


# ------------------------------------------------------------------------------------------- training

# Training kinds (what kohya's SD target sets and the train node's choices name) -> element kinds. "other" is
# every UNet Linear/Conv none of the others names (conv_in, conv_out, time and label embeddings): with all five,
# every weight of rank >= 2 is trained, like ComfyUI core's Train LoRA node.
SD_TRAIN_KINDS = {
    "attn": frozenset({"attn1", "attn2"}),
    "ff": frozenset({"ff"}),
    "proj": frozenset({"proj"}),
    "resnet": frozenset({"resnet_conv", "emb", "downsample", "upsample"}),
    "other": frozenset({"conv_in", "conv_out", "time_embed", "label_emb"}),
}
SD_TRAIN = TrainSpec(
    kinds=SD_TRAIN_KINDS,
    target_sets={"attn+ff+proj": ("attn", "ff", "proj"), "attn+proj": ("attn", "proj"), "attn+ff": ("attn", "ff"),
                 "attn": ("attn",), "all layers": tuple(SD_TRAIN_KINDS)},
    conv_kinds=("resnet",),
    text_encoders=None,
    block_lists=("input_blocks", "middle_block", "output_blocks"),
)

# The same kinds from a module path alone, LDM or diffusers naming (a diffusers UNet's own module names, for
# lora_core.train.find_unet_targets); None = "other".
_ATTN_RE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FF_RE = re.compile(r"\.ff\.net\.(0\.proj|2)$")
_PROJ_RE = re.compile(r"(^|\.)(proj_in|proj_out)$")
_RESNET_RE = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv"
                        r"|conv1|conv2|time_emb_proj|conv_shortcut)$")


def train_kind_of_path(path: str) -> Optional[str]:
    """Training kind of a UNet module path in LDM or diffusers naming (attn, ff, proj, resnet), or None for a
    module none of them names (trained as "other")."""
    if _ATTN_RE.search(path):
        return "attn"
    if _FF_RE.search(path):
        return "ff"
    if _PROJ_RE.search(path):
        return "proj"
    if _RESNET_RE.search(path) and not path.startswith(("conv_in", "conv_out", "out.", "input_blocks.0.")):
        return "resnet"
    return None


FAMILY = SDFamily()
SD1, SD2, SDXL = FAMILY.SD1, FAMILY.SD2, FAMILY.SDXL
