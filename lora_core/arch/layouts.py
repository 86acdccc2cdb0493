"""Architectures as data: SD1.x, SD2.x and SDXL (Pony / Illustrious / NoobAI are SDXL).

Everything here is a table a test or a user can read; nothing branches on the architecture name.

* `UNetSpec` holds the UNet config facts in ComfyUI's own `unet_config` vocabulary (so a ComfyUI
  model's config converts 1:1 with `UNetSpec.from_comfy_config`), plus derived per-block tables.
* `TextEncoderSpec` describes one CLIP text encoder in HF naming (te1 / te2).
* `ArchSpec` ties a UNet, its text encoders and the block layout together.

Block layout decisions (used by `block_of_ldm_path` and by blocks.py):

* Text encoders get their own blocks: `TE1` and, on SDXL, `TE2`. A1111's `BASE` is the group of all
  text-encoder blocks (`ArchSpec.block_groups["BASE"]`), so SDXL can weight its two TEs apart.
* `IN00` is `input_blocks.0` (diffusers `conv_in`), exactly as A1111's 26/20-block layouts count it.
  Putting conv_in anywhere else would make an A1111 `IN00` weight a silent no-op for LoCon files.
* `OTHER` is every UNet module outside input/middle/output blocks: `time_embed` (diffusers
  `time_embedding`), `label_emb` (SDXL `add_embedding`), `out.0` (`conv_norm_out`), `out.2`
  (`conv_out`). A1111 cannot address these; blocks.py decides their factor (1.0 by default there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

# Element kinds for element-level (sub-block) control. Every target gets exactly one.
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

OTHER = "OTHER"
MID = "M00"
COMPONENTS = ("unet", "te1", "te2")
TE_BLOCK = {"te1": "TE1", "te2": "TE2"}

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


@dataclass(frozen=True)
class TextEncoderSpec:
    """One CLIP text encoder, addressed in HF naming (`text_model.encoder.layers.N.self_attn.q_proj`).

    `comfy_name` is the attribute ComfyUI's CLIP wrapper uses (state dict `<comfy_name>.transformer.`).
    `lora_layers` is how many layers a typical LoRA trains: SD2 runs OpenCLIP-H at its penultimate
    layer, so kohya/diffusers SD2 LoRAs cover 23 of the 24 layers ComfyUI keeps.
    """

    family: str
    comfy_name: str
    hidden_size: int
    num_layers: int
    lora_layers: int
    intermediate_size: int
    num_heads: int


CLIP_L = TextEncoderSpec("CLIP-L", "clip_l", 768, 12, 12, 3072, 12)
OPENCLIP_H = TextEncoderSpec("OpenCLIP-H", "clip_h", 1024, 24, 23, 4096, 16)
OPENCLIP_G = TextEncoderSpec("OpenCLIP-G", "clip_g", 1280, 32, 32, 5120, 20)
TEXT_ENCODER_FAMILIES = {spec.comfy_name: spec for spec in (CLIP_L, OPENCLIP_H, OPENCLIP_G)}


@dataclass(frozen=True, eq=False)
class ArchSpec:
    """An architecture: UNet facts, text encoders per component, and the block layout."""

    name: str
    title: str
    unet: UNetSpec
    text_encoders: dict  # component ("te1"/"te2") -> TextEncoderSpec
    aliases: tuple[str, ...] = ()
    block_groups: dict = field(default_factory=dict)  # group name -> block ids, e.g. BASE

    @property
    def te_blocks(self) -> tuple[str, ...]:
        return tuple(TE_BLOCK[c] for c in self.text_encoders)

    @property
    def blocks(self) -> tuple[str, ...]:
        """The full layout: text-encoder blocks, UNet blocks, then OTHER."""
        return self.te_blocks + self.unet.block_ids() + (OTHER,)


SD1 = ArchSpec(
    name="SD1",
    title="Stable Diffusion 1.x",
    unet=UNetSpec(
        model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
        transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
        transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
        context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
    ),
    text_encoders={"te1": CLIP_L},
    aliases=("sd1", "sd15", "sd1.5", "sd1.x", "sd14"),
    block_groups={"BASE": ("TE1",)},
)

SD2 = ArchSpec(
    name="SD2",
    title="Stable Diffusion 2.x",
    unet=UNetSpec(
        model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
        transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
        transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
        context_dim=1024, use_linear_in_transformer=True, adm_in_channels=None,
    ),
    text_encoders={"te1": OPENCLIP_H},
    aliases=("sd2", "sd20", "sd21", "sd2.0", "sd2.1", "sd2.x"),
    block_groups={"BASE": ("TE1",)},
)

SDXL = ArchSpec(
    name="SDXL",
    title="Stable Diffusion XL (also Pony, Illustrious, NoobAI)",
    unet=UNetSpec(
        model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
        transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
        transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    ),
    text_encoders={"te1": CLIP_L, "te2": OPENCLIP_G},
    aliases=("sdxl", "pony", "illustrious", "noobai", "sdxl1.0"),
    block_groups={"BASE": ("TE1", "TE2")},
)

ARCHS = {arch.name: arch for arch in (SD1, SD2, SDXL)}


def get_arch(name: str) -> ArchSpec:
    """Look an architecture up by name or alias, case-insensitively ("SD15", "pony", "SDXL", ...)."""
    wanted = name.strip().lower()
    for arch in ARCHS.values():
        if wanted == arch.name.lower() or wanted in arch.aliases:
            return arch
    from ..errors import LoraValueError

    known = ", ".join(sorted({a.name for a in ARCHS.values()} | {x for a in ARCHS.values() for x in a.aliases}))
    raise LoraValueError(f"unknown architecture {name!r}: use one of {known}")
