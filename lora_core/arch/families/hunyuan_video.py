"""The HunyuanVideo family: HunyuanVideo 1.0 text-to-video, its image-to-video models (Tencent's I2V, 33 input
channels; SkyReels V1 I2V, 32) and HunyuanVideo 1.5 (which ComfyUI runs on the same class).

Canonical names are ComfyUI's (`comfy/ldm/hunyuan_video/model.py`: Flux's `DoubleStreamBlock` / `SingleStreamBlock`
and `LastLayer`, so the block names are BFL's; `supported_models.HunyuanVideo.process_unet_state_dict` renames
Tencent's checkpoint names to these on load). The tree, h = hidden (3072 = 24 heads x 128 in 1.0):

* `double_blocks.N` (20): `img_mod.lin` (6h), `img_attn.qkv` (**fused q | k | v**, 3h), `img_attn.proj`,
  `img_attn.norm.query_norm` / `key_norm` (RMSNorm scales), `img_mlp.0` (4h), `img_mlp.2`, and the same for `txt_`;
* `single_blocks.N` (40): `linear1` (**fused q | k | v | mlp-in**, 3h + 4h rows), `linear2` (reads **[attention h |
  mlp 4h] columns**), `modulation.lin` (3h), `norm.query_norm` / `key_norm`;
* input: `img_in.proj` (a **Conv3d** patch embedder, patch 1 x 2 x 2), `time_in.in_layer/out_layer`,
  `vector_in.*` (CLIP-L's pooled output), `guidance_in.*` (distilled guidance), and the text **token refiner**
  `txt_in`: `input_embedder`, `t_embedder.in_layer/out_layer`, `c_embedder.in_layer/out_layer`,
  `individual_token_refiner.blocks.0-1.{norm1, self_attn.qkv (fused q|k|v), self_attn.proj, norm2, mlp.0, mlp.2,
  adaLN_modulation.1 (2h: [gate_msa | gate_mlp])}`;
* output: `final_layer.linear`, `final_layer.adaLN_modulation.1` ([shift | scale]);
* 1.5 adds `byt5_in.*` (glyph text), `vision_in.proj.*` (SigLIP image features), `cond_type_embedding` and runs 54
  double blocks, no single blocks, h 2048.

Writers and their names (tests/hunyuan_video_writers.py cites each rule's source):

* ComfyUI native `diffusion_model.<path>` (also `model.diffusion_model.`, bare) and `lora_unet_<path _>`.
* Tencent's own module names (HunyuanVideo `hyvideo/modules/models.py`, `token_refiner.py`: `img_mod.linear`,
  `img_attn_qkv`, `img_attn_proj`, `img_attn_q_norm`, `img_mlp.fc1` / `fc2`, `modulation.linear`, `q_norm`,
  `time_in.mlp.0` / `mlp.2`, `txt_in.t_embedder.mlp.0`, `txt_in.c_embedder.linear_1`, refiner `self_attn_qkv`,
  `self_attn_proj`, `mlp.fc1`): diffusion-pipe writes them with `transformer.` (models/hunyuan_video.py), older
  diffusion-pipe and musubi's `convert_lora.py --target other` with `diffusion_model.`; musubi-tuner's own files
  (`networks/lora.py`, prefix `lora_unet`) as `lora_unet_<Tencent path _>` (`lora_unet_double_blocks_0_img_mlp_fc1`);
  LyCORIS `lycoris_<path _>` in either naming; bare Tencent names (HunyuanVideo's own LoRA scripts). musubi's
  HunyuanVideo 1.5 network (`networks/lora_hv_1_5.py`) trains q, k, v apart: `lora_unet_double_blocks_0_img_attn_q`
  = rows (0, h) of `img_attn.qkv` (what its `convert_hunyuan_video_1_5_lora_to_comfy.py` fuses).
* diffusers / PEFT on `HunyuanVideoTransformer3DModel` (`transformer.` prefix, also bare and `base_model.model.`):
  `transformer_blocks.N.attn.to_q` = rows (0, h) of `double_blocks.N.img_attn.qkv`, `add_q_proj` of `txt_attn.qkv`,
  `single_transformer_blocks.N.attn.to_q` / `proj_mlp` = rows of `linear1`, `context_embedder.token_refiner.
  refiner_blocks.N.attn.to_q` of the refiner's `self_attn.qkv`, ... (diffusers' own map:
  loaders/lora_conversion_utils.py `_convert_hunyuan_video_lora_to_diffusers`); `norm_out.linear` holds [scale |
  shift], the canonical [shift | scale] with the halves swapped. OneTrainer `lora_transformer_<diffusers path _>`.
* Full diffs (lightx2v-style): `<prefix><path>.diff` / `.diff_b` (`diff_m`: modulation only).

Core 0.3.75 (comfy/lora.py, the HunyuanVideo branch) maps the native names and Tencent names under `transformer.` /
`diffusion_model.` for the block weights, but not musubi's `lora_unet_` MLP / modulation names, not the Tencent input
names (`time_in.mlp.0`, `c_embedder.linear_1`), no diffusers name and no `lycoris_` name: those load here only.

Text encoders (ComfyUI's `HunyuanVideoClipModel`): te1 = CLIP-L (`clip_l`; `lora_te1_`, `lora_te_`, `text_encoder.`
as ComfyUI maps it), te2 = LLaVA-Llama-3-8B's language model (`llama`; only ComfyUI's generic
`text_encoders.llama.transformer.model.layers.N...`; no trainer writes it). diffusers' pipeline numbers them the
other way round (text_encoder = Llama) but loads no text-encoder LoRA for HunyuanVideo. 1.5: Qwen2.5-VL-7B (te1);
its ByT5 glyph encoder has no names here.

Variants (ComfyUI's supported_models): in_channels 33 -> I2V, 32 -> SkyReels I2V, `vision_in` -> 1.5, else T2V.
Metadata (musubi-tuner architectures.py, sai_model_spec.py): `ss_base_model_version` `hunyuan_video` /
`hunyuan_video_1_5`, `modelspec.architecture` `hunyuan-video` / `hunyuan-video-1.5` (+ "/lora").

Blocks: `TE1`, `TE2`, `IN` (embedders and the token refiner: element kinds `refiner_attn` / `refiner_mlp` /
`refiner_mod`), `DB00`-`DB19`, `SB00`-`SB39`, `OUT`. Inspire Pack: BASE + one slot per double / single block (61
values on 1.0), ordinal over the blocks a file has, no presets; hako-mikan's A1111 extension has no layout.

Flux.1 shares every block name and, at full size, every block shape (hidden 3072, MLP 12288): only the input
names, the depths (19 / 38 vs 20 / 40), Tencent / musubi names and metadata tell a Flux LoRA from a HunyuanVideo
one. `confusable_with` makes the loader refuse a file that is decisively the other family's even when every
module fits (registry.confusable_family).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import (Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, TrainSpec,
                      deeper_block_reason, text_encoder_descriptions)
from ..text_encoders import CLIP_L, TextEncoderSpec, register_encoder
from .qwen_image import QWEN25_VL_7B

# LLaVA-Llama-3-8B's language model as ComfyUI keeps it (comfy/text_encoders/llama.py Llama2Config: 4096 wide,
# 32 layers, MLP 14336, 32 heads / 8 KV heads; `llama.transformer.model.layers.N.self_attn.q_proj`).
LLAVA_LLAMA3_8B = register_encoder(TextEncoderSpec("LLaVA-Llama-3-8B", "llama", 4096, 32, 32, 14336, 32,
                                                   kind="llm"))

BASE, IN, OUT = "BASE", "IN", "OUT"
REFINER = "txt_in.individual_token_refiner.blocks"

ELEMENT_KINDS = (
    "img_attn", "txt_attn",        # double-block attention: qkv (q, k, v parts) and proj, per stream
    "img_mlp", "txt_mlp",          # double-block MLPs
    "img_mod", "txt_mod",          # double-block modulation
    "linear1_attn", "linear1_mlp",  # single-block linear1 rows: q|k|v, and the MLP input
    "linear2_attn", "linear2_mlp",  # single-block linear2 columns: attention output, MLP output
    "mod",                         # single-block modulation.lin
    "norm",                        # RMSNorm scales, the refiner's LayerNorms
    "img_in", "time_in", "vector_in", "guidance_in", "txt_in",   # IN: embedders
    "refiner_attn", "refiner_mlp", "refiner_mod",                # IN: the token refiner's blocks
    "final", "final_mod",          # OUT
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoders
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn", "refiner_attn", "te_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "linear1_mlp", "linear2_mlp", "refiner_mlp", "te_mlp"}),
    "modulation": frozenset({"img_mod", "txt_mod", "mod", "final_mod", "refiner_mod"}),
    "img": frozenset({"img_attn", "img_mlp", "img_mod"}),
    "txt": frozenset({"txt_attn", "txt_mlp", "txt_mod"}),
    "linear1": frozenset({"linear1_attn", "linear1_mlp"}),
    "linear2": frozenset({"linear2_attn", "linear2_mlp"}),
    "refiner": frozenset({"refiner_attn", "refiner_mlp", "refiner_mod"}),
    "embed": frozenset({"img_in", "time_in", "vector_in", "guidance_in", "txt_in", "te_embed"}),
})

# (canonical suffix in a double block's stream, Tencent's suffix, kind suffix, rows: "h", "3h", "6h", "mlp", "")
_STREAM = (
    ("mod.lin", "mod.linear", "mod", "6h"),
    ("attn.qkv", "attn_qkv", "attn", "3h"),
    ("attn.proj", "attn_proj", "attn", "h"),
    ("attn.norm.query_norm", "attn_q_norm", "norm", ""),
    ("attn.norm.key_norm", "attn_k_norm", "norm", ""),
    ("mlp.0", "mlp.fc1", "mlp", "mlp"),
    ("mlp.2", "mlp.fc2", "mlp", "h"),
)
# diffusers' names per stream (HunyuanVideoTransformerBlock), for the non-qkv modules
_DIFFUSERS_STREAM = {
    ("img", "mod.lin"): "norm1.linear", ("txt", "mod.lin"): "norm1_context.linear",
    ("img", "attn.proj"): "attn.to_out.0", ("txt", "attn.proj"): "attn.to_add_out",
    ("img", "attn.norm.query_norm"): "attn.norm_q", ("img", "attn.norm.key_norm"): "attn.norm_k",
    ("txt", "attn.norm.query_norm"): "attn.norm_added_q", ("txt", "attn.norm.key_norm"): "attn.norm_added_k",
    ("img", "mlp.0"): "ff.net.0.proj", ("img", "mlp.2"): "ff.net.2",
    ("txt", "mlp.0"): "ff_context.net.0.proj", ("txt", "mlp.2"): "ff_context.net.2",
}
# top-level modules: (canonical, Tencent, diffusers, block, kind, rows)
_TOP = (
    ("img_in.proj", "img_in.proj", "x_embedder.proj", IN, "img_in", "h"),
    # (diffusers' 1.5 class, HunyuanVideo15Transformer3DModel, names the time embedder `time_embed`)
    ("time_in.in_layer", "time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",
                                           "time_embed.timestep_embedder.linear_1"), IN, "time_in", "h"),
    ("time_in.out_layer", "time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",
                                            "time_embed.timestep_embedder.linear_2"), IN, "time_in", "h"),
    ("vector_in.in_layer", "vector_in.in_layer", "time_text_embed.text_embedder.linear_1", IN, "vector_in", "h"),
    ("vector_in.out_layer", "vector_in.out_layer", "time_text_embed.text_embedder.linear_2", IN, "vector_in", "h"),
    ("guidance_in.in_layer", "guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1", IN, "guidance_in",
     "h"),
    ("guidance_in.out_layer", "guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2", IN, "guidance_in",
     "h"),
    ("txt_in.input_embedder", "txt_in.input_embedder", "context_embedder.proj_in", IN, "txt_in", "h"),
    ("txt_in.t_embedder.in_layer", "txt_in.t_embedder.mlp.0",
     "context_embedder.time_text_embed.timestep_embedder.linear_1", IN, "txt_in", "h"),
    ("txt_in.t_embedder.out_layer", "txt_in.t_embedder.mlp.2",
     "context_embedder.time_text_embed.timestep_embedder.linear_2", IN, "txt_in", "h"),
    ("txt_in.c_embedder.in_layer", "txt_in.c_embedder.linear_1",
     "context_embedder.time_text_embed.text_embedder.linear_1", IN, "txt_in", "h"),
    ("txt_in.c_embedder.out_layer", "txt_in.c_embedder.linear_2",
     "context_embedder.time_text_embed.text_embedder.linear_2", IN, "txt_in", "h"),
)
# the token refiner's blocks: (canonical suffix, Tencent suffix, diffusers suffix, kind, rows)
_REFINER = (
    ("norm1", "norm1", "norm1", "norm", ""),
    ("self_attn.qkv", "self_attn_qkv", None, "refiner_attn", "3h"),
    ("self_attn.proj", "self_attn_proj", "attn.to_out.0", "refiner_attn", "h"),
    ("norm2", "norm2", "norm2", "norm", ""),
    ("mlp.0", "mlp.fc1", "ff.net.0.proj", "refiner_mlp", "4h"),
    ("mlp.2", "mlp.fc2", "ff.net.2", "refiner_mlp", "h"),
    ("adaLN_modulation.1", "adaLN_modulation.1", "norm_out.linear", "refiner_mod", "2h"),
)
_WRITER_PREFIXES = r"(?:transformer\.|diffusion_model\.|base_model\.model\.|lora_unet_|lora_transformer_|lycoris_)?"


@dataclass(frozen=True)
class HunyuanVideoSpec:
    """Structure of a HunyuanVideo transformer in ComfyUI's `unet_config` terms plus which optional modules exist.
    `refiner_blocks` is fixed at 2 by ComfyUI's TokenRefiner (and Tencent's config)."""

    hidden: int = 3072
    depth: int = 20
    depth_single: int = 40
    mlp_hidden: int = 12288
    refiner_blocks: int = 2
    in_channels: int = 16
    vector_in: bool = True
    guidance: bool = True
    byt5: bool = False
    vision_in: int = 0           # 1.5: the SigLIP feature width (1152), 0: none
    cond_type: bool = False      # 1.5's cond_type_embedding
    meanflow: bool = False       # time_r_in

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "HunyuanVideoSpec":
        hidden = int(config.get("hidden_size", 3072))
        return cls(hidden=hidden, depth=int(config.get("depth", 20)),
                   depth_single=int(config.get("depth_single_blocks", 40)),
                   mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
                   in_channels=int(config.get("in_channels", 16)),
                   vector_in=config.get("vec_in_dim", 768) is not None,
                   guidance=bool(config.get("guidance_embed", True)), byt5=bool(config.get("byt5", False)),
                   vision_in=int(config.get("vision_in_dim") or 0),
                   cond_type=bool(config.get("use_cond_type_embedding", False)),
                   meanflow=bool(config.get("meanflow", False)))


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]],
                   config: Optional[Mapping] = None) -> Optional[HunyuanVideoSpec]:
    """HunyuanVideoSpec of a ComfyUI state dict given without prefix, else None. ComfyUI's own marker is the token
    refiner (`txt_in.individual_token_refiner.blocks.0.norm1.weight`, model_detection.py); a 2-D patch embedder is
    HunyuanImage 2.1 (same class, another model), not claimed."""
    keyset = set(keys)
    if f"{REFINER}.0.norm1.weight" not in keyset or "img_in.proj.weight" not in keyset:
        return None
    shapes = shapes or {}
    proj = shapes.get("img_in.proj.weight")
    if proj is not None and len(proj) != 5:
        return None
    if proj is None and config and len(config.get("patch_size") or (1, 2, 2)) != 3:
        return None

    def dim(key, axis, default):
        return int(shapes[key][axis]) if key in shapes else default

    hidden = dim("img_in.proj.weight", 0, 0)
    if not hidden:
        hidden = int((config or {}).get("hidden_size", 3072))
    return HunyuanVideoSpec(
        hidden=hidden, depth=_count(keyset, r"double_blocks\.(\d+)\."),
        depth_single=_count(keyset, r"single_blocks\.(\d+)\."),
        mlp_hidden=dim("double_blocks.0.img_mlp.0.weight", 0, 4 * hidden),
        refiner_blocks=_count(keyset, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.") or 2,
        in_channels=dim("img_in.proj.weight", 1, int((config or {}).get("in_channels", 16))),
        vector_in="vector_in.in_layer.weight" in keyset, guidance="guidance_in.in_layer.weight" in keyset,
        byt5="byt5_in.fc1.weight" in keyset,
        vision_in=dim("vision_in.proj.1.weight", 1, 1152 if "vision_in.proj.1.weight" in keyset else 0),
        cond_type="cond_type_embedding.weight" in keyset, meanflow="time_r_in.in_layer.weight" in keyset)


def _db(i: int) -> str:
    return f"DB{i:02d}"


def _sb(i: int) -> str:
    return f"SB{i:02d}"


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    title = "HunyuanVideo (1.0 T2V, I2V, SkyReels; 1.5)"
    denoiser = "transformer"
    # Names only HunyuanVideo uses: Tencent's / musubi's spellings and the token refiner. Its BFL block names
    # (`double_blocks.N.img_attn.qkv`) are Flux's too and mark nothing.
    markers = (
        (r"(^|[._])(img|txt)_(attn_qkv|attn_proj|attn_[qk]_norm|mlp[._]fc[12]|mod[._]linear)([._]|$)",
         "HunyuanVideo (Tencent / musubi names)"),
        (r"(individual_token_refiner|token_refiner[._]refiner_blocks)", "HunyuanVideo (token refiner)"),
        (r"(^|[._])single_blocks[._]\d+[._]modulation[._]linear", "HunyuanVideo (Tencent names)"),
        (r"(^|[._])img_in[._]proj([._]|$)", "HunyuanVideo (3-D patch embedder)"),
    )
    # Flux.1 shares every block name and shape: a file decisively Flux's is refused here even when it fits.
    confusable_with = ("flux",)
    metadata_match = ("hunyuan_video", "hunyuan-video", "hunyuanvideo")

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        self._dif_cache = None
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", CLIP_L, ("lora_te1_", "lora_te_"), "text_encoder."),
            "te2": ComponentSpec("te2", "TE2", LLAVA_LLAMA3_8B, (), ""),
        }
        components15 = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", QWEN25_VL_7B, (), ""),
        }
        tencent = "https://github.com/Tencent/HunyuanVideo"

        def variant(name, title, short, aliases, config, match, version="hunyuan_video",
                    architecture="hunyuan-video", implementation=tencent, comps=components, layout="hunyuan_video"):
            return ArchSpec(name=name, title=title, family=self, config=config, components=comps, aliases=aliases,
                            layout_key=layout,
                            metadata={"ss_base_model_version": version, "modelspec.architecture": architecture,
                                      "modelspec.implementation": implementation, "ss_network_module": "networks.lora",
                                      "resolution": 720, "short": short, "match": match})

        self.T2V = variant("HunyuanVideo", "HunyuanVideo", "HunyuanVideo",
                           ("hunyuan_video", "hunyuan-video", "hunyuanvideo", "hv", "hunyuan"), HunyuanVideoSpec(),
                           ("hunyuan-video", "hunyuan_video", "hunyuanvideo"))
        self.I2V = variant("HunyuanVideo-I2V", "HunyuanVideo I2V", "HunyuanVideo I2V",
                           ("hunyuan_video_i2v", "hunyuan-video-i2v", "hv-i2v"), HunyuanVideoSpec(in_channels=33),
                           ("hunyuan-video-i2v", "hunyuan_video_i2v", "hunyuanvideo-i2v"))
        self.SKYREELS = variant("SkyReels-V1-I2V", "SkyReels V1 I2V (HunyuanVideo)", "SkyReels I2V",
                                ("skyreels", "skyreels-i2v", "skyreels_v1"), HunyuanVideoSpec(in_channels=32),
                                ("skyreels",))
        self.V15 = variant("HunyuanVideo-1.5", "HunyuanVideo 1.5", "HunyuanVideo 1.5",
                           ("hunyuan_video_1_5", "hunyuan-video-1.5", "hv15", "hunyuanvideo-1.5"),
                           HunyuanVideoSpec(hidden=2048, depth=54, depth_single=0, mlp_hidden=8192, in_channels=65,
                                            vector_in=False, guidance=False, byt5=True, vision_in=1152,
                                            cond_type=True),
                           ("hunyuan-video-1.5", "hunyuan_video_1_5", "hunyuanvideo-1.5", "hunyuan-video-1-5"),
                           "hunyuan_video_1_5", "hunyuan-video-1.5", "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5",
                           components15, "hunyuan_video_1_5")
        self.variants = (self.T2V, self.I2V, self.SKYREELS, self.V15)

    # ----------------------------------------------------------------------------- recognition
    def variant_of_spec(self, spec: HunyuanVideoSpec, config_name: str = "") -> ArchSpec:
        name = config_name.lower()
        if spec.vision_in or "15" in name:
            return self.V15
        if spec.in_channels == 33 or name.endswith("i2v") and "skyreels" not in name:
            return self.I2V
        if spec.in_channels == 32 or "skyreels" in name:
            return self.SKYREELS
        return self.T2V

    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes, config)
        if spec is None:
            return None
        if not shapes and config and config.get("hidden_size"):
            spec = HunyuanVideoSpec(**{**spec.__dict__, "hidden": int(config["hidden_size"]),
                                       "mlp_hidden": int(int(config["hidden_size"]) * float(config.get("mlp_ratio", 4))),
                                       "in_channels": int(config.get("in_channels", spec.in_channels))})
        return self.variant_of_spec(spec, config_name), spec

    def detect_diffusers(self, keys, shapes):
        keyset = set(keys)
        if "context_embedder.token_refiner.refiner_blocks.0.norm1.weight" not in keyset \
                or "x_embedder.proj.weight" not in keyset:
            return None
        shapes = shapes or {}
        proj = shapes.get("x_embedder.proj.weight")
        if proj is not None and len(proj) != 5:
            return None
        hidden = int(proj[0]) if proj is not None else 3072
        mlp = shapes.get("transformer_blocks.0.ff.net.0.proj.weight")
        vision = shapes.get("image_embedder.linear_1.weight")
        spec = HunyuanVideoSpec(
            byt5="context_embedder_2.linear_1.weight" in keyset,
            vision_in=(int(vision[1]) if vision is not None else 1152) if "image_embedder.linear_1.weight" in keyset
            else 0, cond_type="cond_type_embed.weight" in keyset,
            hidden=hidden, depth=_count(keyset, r"transformer_blocks\.(\d+)\."),
            depth_single=_count(keyset, r"single_transformer_blocks\.(\d+)\."),
            mlp_hidden=int(mlp[0]) if mlp is not None else 4 * hidden,
            refiner_blocks=_count(keyset, r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.") or 2,
            in_channels=int(proj[1]) if proj is not None else 16,
            vector_in="time_text_embed.text_embedder.linear_1.weight" in keyset,
            guidance="time_text_embed.guidance_embedder.linear_1.weight" in keyset)
        return self.variant_of_spec(spec), spec

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        return self.T2V if comfy_names == {"clip_l", LLAVA_LLAMA3_8B.comfy_name} else None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        if variant is self.V15:
            return {QWEN25_VL_7B.comfy_name: "te1"}
        return {"clip_l": "te1", LLAVA_LLAMA3_8B.comfy_name: "te2"}

    # ----------------------------------------------------------------------------- modules
    def _table(self, spec: HunyuanVideoSpec):
        """[(ModuleDef, Tencent path or None, [(diffusers path, pieces, rows)])] in layout order."""
        if self._dif_cache is not None and self._dif_cache[0] == spec:
            return self._dif_cache[1]
        h, m = spec.hidden, spec.mlp_hidden
        rows = {"h": h, "2h": 2 * h, "3h": 3 * h, "4h": 4 * h, "6h": 6 * h, "mlp": m, "": 0}
        qkv = lambda kind: (Part("q", 0, h, kind), Part("k", h, h, kind), Part("v", 2 * h, h, kind))  # noqa: E731
        split = lambda names: [(n, ((j * h, 0, h),), h) for j, n in enumerate(names)]  # noqa: E731
        table = []

        def add(module, tencent=None, diffusers=()):
            table.append((module, tencent, list(diffusers)))

        for path, tencent, dif, block, kind, size in _TOP:
            if path.startswith("vector_in") and not spec.vector_in:
                continue
            if path.startswith("guidance_in") and not spec.guidance:
                continue
            add(ModuleDef(path, block, kind, rows[size]), tencent,
                [(name, None, 0) for name in ((dif,) if isinstance(dif, str) else dif)])
        if spec.meanflow:
            for sub in ("in_layer", "out_layer"):
                add(ModuleDef(f"time_r_in.{sub}", IN, "time_in", h))
        # 1.5's input modules; diffusers' names are HunyuanVideo15Transformer3DModel's
        if spec.byt5:
            add(ModuleDef("byt5_in.layernorm", IN, "norm"), None, [("context_embedder_2.norm", None, 0)])
            for j, sub in enumerate(("fc1", "fc2", "fc3")):
                add(ModuleDef(f"byt5_in.{sub}", IN, "txt_in"), None, [(f"context_embedder_2.linear_{j + 1}", None, 0)])
        if spec.vision_in:
            add(ModuleDef("vision_in.proj.0", IN, "norm"), None, [("image_embedder.norm_in", None, 0)])
            add(ModuleDef("vision_in.proj.1", IN, "img_in"), None, [("image_embedder.linear_1", None, 0)])
            add(ModuleDef("vision_in.proj.3", IN, "img_in", h), None, [("image_embedder.linear_2", None, 0)])
            add(ModuleDef("vision_in.proj.4", IN, "norm"), None, [("image_embedder.norm_out", None, 0)])
        if spec.cond_type:
            add(ModuleDef("cond_type_embedding", IN, "txt_in"), None, [("cond_type_embed", None, 0)])
        for r in range(spec.refiner_blocks):
            c, t, d = f"{REFINER}.{r}", f"{REFINER}.{r}", f"context_embedder.token_refiner.refiner_blocks.{r}"
            for sub, tsub, dsub, kind, size in _REFINER:
                parts = qkv(kind) if sub == "self_attn.qkv" else ()
                difs = split([f"{d}.attn.to_{x}" for x in "qkv"]) if dsub is None else [(f"{d}.{dsub}", None, 0)]
                add(ModuleDef(f"{c}.{sub}", IN, kind, rows[size], parts), f"{t}.{tsub}", difs)
        for i in range(spec.depth):
            b, c, d = _db(i), f"double_blocks.{i}", f"transformer_blocks.{i}"
            for stream in ("img", "txt"):
                for sub, tsub, kind, size in _STREAM:
                    full_kind = "norm" if kind == "norm" else f"{stream}_{kind}"
                    param = "scale" if kind == "norm" else "weight"
                    if sub == "attn.qkv":
                        names = [f"{d}.attn.to_{x}" for x in "qkv"] if stream == "img" else \
                            [f"{d}.attn.add_{x}_proj" for x in "qkv"]
                        module = ModuleDef(f"{c}.{stream}_{sub}", b, full_kind, rows[size], qkv(full_kind))
                        add(module, f"{c}.{stream}_{tsub}", split(names))
                        continue
                    module = ModuleDef(f"{c}.{stream}_{sub}", b, full_kind, rows[size], param=param)
                    add(module, f"{c}.{stream}_{tsub}", [(f"{d}.{_DIFFUSERS_STREAM[(stream, sub)]}", None, 0)])
        for i in range(spec.depth_single):
            b, c, d = _sb(i), f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            linear1 = ModuleDef(f"{c}.linear1", b, "linear1_attn", 3 * h + m,
                                qkv("linear1_attn") + (Part("mlp", 3 * h, m, "linear1_mlp"),))
            add(linear1, f"{c}.linear1", split([f"{d}.attn.to_{x}" for x in "qkv"]) +
                [(f"{d}.proj_mlp", ((3 * h, 0, m),), m)])
            add(ModuleDef(f"{c}.linear2", b, "linear2_attn", h, (),
                          (Part("attn", 0, h, "linear2_attn"), Part("mlp", h, m, "linear2_mlp"))),
                f"{c}.linear2", [(f"{d}.proj_out", None, 0)])
            add(ModuleDef(f"{c}.norm.query_norm", b, "norm", param="scale"), f"{c}.q_norm",
                [(f"{d}.attn.norm_q", None, 0)])
            add(ModuleDef(f"{c}.norm.key_norm", b, "norm", param="scale"), f"{c}.k_norm",
                [(f"{d}.attn.norm_k", None, 0)])
            add(ModuleDef(f"{c}.modulation.lin", b, "mod", 3 * h), f"{c}.modulation.linear",
                [(f"{d}.norm.linear", None, 0)])
        add(ModuleDef("final_layer.linear", OUT, "final"), "final_layer.linear", [("proj_out", None, 0)])
        # diffusers' AdaLayerNormContinuous holds [scale | shift]; ComfyUI's / Tencent's final modulation [shift | scale]
        add(ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", 2 * h), "final_layer.adaLN_modulation.1",
            [("norm_out.linear", ((0, h, h), (h, 0, h)), 2 * h)])
        self._dif_cache = (spec, table)
        return table

    def modules(self, spec: HunyuanVideoSpec, variant=None) -> list[ModuleDef]:
        return [module for module, _, _ in self._table(spec)]

    def aliases(self, module: ModuleDef, spec: HunyuanVideoSpec, variant=None) -> list[Alias]:
        entry = self._entries(spec).get(module.path)
        out = self.native_aliases(module.path, prefixes=("transformer.",))
        if entry is None:
            return out
        _, tencent, diffusers = entry
        if tencent and tencent != module.path:
            out += self.native_aliases(tencent, prefixes=("transformer.",))
        for name, pieces, rows in diffusers:
            out += self.diffusers_aliases(name, pieces, rows)
        m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv", module.path)
        if m:   # musubi's HunyuanVideo 1.5 network trains q, k and v apart: `img_attn_q` = rows (0, h) of the qkv
            h = spec.hidden
            for j, x in enumerate("qkv"):
                path = f"double_blocks.{m.group(1)}.{m.group(2)}_attn_{x}"
                under = path.replace(".", "_")
                for name in (f"diffusion_model.{path}", f"transformer.{path}", path, f"lora_unet_{under}",
                             f"lycoris_{under}"):
                    out.append(Alias(name, ((j * h, 0, h),), h))
        seen, unique = set(), []
        for alias in out:
            if alias.name not in seen:
                seen.add(alias.name)
                unique.append(alias)
        return unique

    def _entries(self, spec):
        table = self._table(spec)
        cached = getattr(self, "_entries_cache", None)
        if cached is not None and cached[0] is table:
            return cached[1]
        entries = {module.path: (module, tencent, dif) for module, tencent, dif in table}
        self._entries_cache = (table, entries)
        return entries

    def tencent_names(self, spec: HunyuanVideoSpec) -> dict[str, str]:
        """canonical path -> Tencent's module path (what diffusion-pipe and musubi name)."""
        return {module.path: tencent for module, tencent, _ in self._table(spec) if tencent}

    def diffusers_names(self, spec: HunyuanVideoSpec) -> dict:
        return {module.path: tuple(name for name, _, _ in dif) for module, _, dif in self._table(spec) if dif}

    def diffusers_host_pieces(self, spec: HunyuanVideoSpec, variant=None) -> dict:
        """diffusers key -> (canonical path, ((canonical start, host start, length), ...) or None, param)."""
        out = {}
        for module, _, dif in self._table(spec):
            for name, pieces, _rows in dif:
                out[f"{name}.weight"] = (module.path, tuple(pieces) if pieces is not None else None, module.param)
        return out

    def lora_votes(self, modules, variant, key_map) -> int:
        """Against Flux.1 (same block names and full-size shapes): +1 per modulation / time / vector / guidance
        module (both have them: a tie stays a tie), -1 for a file that covers exactly Flux.1's depth (a double
        block 18 and a single block 37 but none past them: HunyuanVideo has 20 and 40)."""
        votes, doubles, singles = 0, set(), set()
        for name in modules:
            target = key_map.resolve(name)
            if target is None:
                continue
            if target.kind in ("img_mod", "txt_mod", "mod", "final_mod", "time_in", "vector_in", "guidance_in"):
                votes += 1
            m = re.match(r"(double|single)_blocks\.(\d+)\.", target.path)
            if m:
                (doubles if m.group(1) == "double" else singles).add(int(m.group(2)))
        if doubles and singles and max(doubles) == 18 and max(singles) == 37:
            votes -= 1
        return votes

    def preferred_variant(self, names):
        # T2V, I2V and SkyReels share every block module (only img_in.proj's input channels differ)
        for variant in self.variants:
            if variant.name in names:
                return variant.name
        return None

    def conv_kernel(self, target, variant) -> Optional[int]:
        return None   # img_in.proj is a Conv3d (1 x 2 x 2): no square kernel to restore a flat change to

    def denoiser_words(self):
        return ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                "final_layer", "byt5_in", "vision_in", "time_r_in", "cond_type_embedding", "transformer_blocks",
                "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed", "norm_out",
                "proj_out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, HunyuanVideoSpec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        stacks = (("double_blocks|transformer_blocks", spec.depth, "double"),
                  ("single_blocks|single_transformer_blocks", spec.depth_single, "single"))
        reason = deeper_block_reason(name, rest, title, stacks,
                                     "HunyuanVideo 1.0 has 20 double and 40 single blocks, 1.5 54 double blocks")
        if reason:
            return reason
        if re.fullmatch(r"(img_in|txt_in)", rest) or re.match(r"(x_embedder|context_embedder)$", rest):
            return (f"{name!r}: Flux.1's input-embedder name; HunyuanVideo embeds through `img_in.proj` (a 3-D patch "
                    f"conv) and the `txt_in` token refiner: this LoRA was made for Flux.1")
        if re.search(r"guidance_(in|embedder)", rest) and not spec.guidance:
            return f"{name!r}: guidance-embedding key, but this {title} model has no guidance input"
        return (f"{name!r}: HunyuanVideo-style key that names no module of this {title} model; check the LoRA's base "
                "model (or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        full = variant.config
        te_blocks = tuple(c.block for c in variant.components.values() if c.is_text_encoder)
        doubles = tuple(_db(i) for i in range(full.depth))
        singles = tuple(_sb(i) for i in range(full.depth_single))
        descriptions = {IN: "input embeddings (img_in, time_in, vector_in, guidance_in) and the txt_in token refiner",
                        OUT: "final layer"}
        descriptions.update(text_encoder_descriptions(variant))
        for i, b in enumerate(doubles):
            descriptions[b] = f"double block {i} (image and text streams, joint attention)"
        for i, b in enumerate(singles):
            descriptions[b] = f"single block {i} (one stream: linear1 q|k|v|mlp, linear2)"
        # Inspire Pack gives double_blocks / single_blocks ordinal slots (BASE + 20 + 40 on 1.0); its Flux presets
        # would misalign, so none are offered.
        inspire = {1 + len(doubles) + len(singles): [BASE] + list(doubles) + list(singles)}
        layout = BlockLayout(
            key=variant.layout_key, blocks=te_blocks + (IN,) + doubles + singles + (OUT,), te_blocks=te_blocks,
            other_blocks=(IN, OUT), descriptions=descriptions,
            groups={BASE: te_blocks, "DB": doubles, "SB": singles} if singles else {BASE: te_blocks, "DB": doubles},
            a1111={}, a1111_missing=0.0,
            inspire_groups=(("double", r"DB(\d\d)"), ("single", r"SB(\d\d)")), inspire_layouts=inspire,
            inspire_preset_prefixes=(), element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> Optional[TrainSpec]:
        """musubi-tuner's HunyuanVideo training (`networks/lora.py`: HUNYUAN_TARGET_REPLACE_MODULES =
        MMDoubleStreamBlock + MMSingleStreamBlock, default exclude of the modulation): every Linear of the double
        blocks (fused img/txt `attn.qkv` whole, `attn.proj`, both MLPs) and single blocks (`linear1`, `linear2`),
        no `img_mod` / `txt_mod` / `modulation`. Text-to-video only; image datasets train as 1-frame videos
        (latents (B, 16, 1, h, w)).

        HunyuanVideo 1.5 (double blocks only, no guidance input, 32-channel latents) trains the same set, as
        text-to-video: its concat conditioning is the model's own empty one (ComfyUI's HunyuanVideo15.concat_cond:
        zero image latents and a zero mask, what its text-to-video sampling passes), no glyph (ByT5) or SigLIP
        input. musubi's 1.5 network trains q / k / v apart (`img_attn_q`, which core 0.3.75 does not read); the
        file keeps the fused `lora_unet_double_blocks_N_img_attn_qkv`, which core reads, with musubi's
        `hunyuan_video_1_5` header. The 1.0 I2V variants (HunyuanVideo I2V, SkyReels V1 I2V) train the same set on
        each clip's first frame, conditioned through their concat channels as ComfyUI's HunyuanImageToVideo
        ("v1 (concat)") builds it (the host adapter gives the start-image conditioning).
        Saved in the family's merge naming `lora_unet_<ComfyUI path _>`, which core reads for every module; musubi's
        own files name the MLPs in Tencent's naming (`img_mlp_fc1`), which core 0.3.75 does not read. The distilled
        guidance input gets the node's `guidance` (musubi trains with --guidance_scale 1.0); flow matching at the
        model's shift (ComfyUI: 7.0), logit-normal (musubi `shift` sampling)."""
        guidance = bool(getattr(config, "guidance", True)) if config is not None else True
        return TrainSpec(kinds=HV_TRAIN_KINDS, target_sets=HV_TARGET_SETS, conv_kinds=(), text_encoders=("te1",),
                         guidance_input=guidance, timestep_sampling="logit-normal, model shift",
                         resolution_shift=None, block_lists=("double_blocks", "single_blocks"), latent_dims=3)


# Training kinds -> element kinds.
HV_TRAIN_KINDS = {
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "linear1_mlp", "linear2_mlp"}),
    "mod": frozenset({"img_mod", "txt_mod", "mod"}),
    "refiner": frozenset({"refiner_attn", "refiner_mlp", "refiner_mod"}),
    "embed": frozenset({"time_in", "vector_in", "guidance_in", "txt_in"}),
    "final": frozenset({"final", "final_mod"}),
}
# musubi's default first (the node's default): attention and MLPs of both block kinds, no modulation.
HV_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(HV_TRAIN_KINDS),
}


FAMILY = HunyuanVideoFamily()
HUNYUAN_VIDEO, HUNYUAN_VIDEO_I2V, SKYREELS_I2V, HUNYUAN_VIDEO_15 = FAMILY.variants
