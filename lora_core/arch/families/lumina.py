"""The Lumina family: Z-Image (Turbo / base) and Lumina Image 2.0. ComfyUI builds both with one class, `Lumina2`
(`comfy/ldm/lumina/model.py::NextDiT`; `supported_models.ZImage` subclasses `Lumina2`), so one family describes
both and one LoRA branch of core's key map serves both.

Canonical names are ComfyUI's NextDiT module names (the original Alpha-VLLM / Tongyi trainers' names, which
kohya sd-scripts `networks/lora_lumina.py` writes too). The tree, h = dim:

* three stacks of the same block, `layers.N` (Z-Image 30, Lumina 2 26), `noise_refiner.0-1` (modulated) and
  `context_refiner.0-1` (no modulation): `attention.qkv` (**fused q | k | v** with GQA rows: q = n_heads x head,
  k = v = n_kv_heads x head; Z-Image 30 / 30 heads -> equal thirds of 11520, Lumina 2 24 / 8 heads ->
  [2304, 768, 768] of 3840), `attention.out`, RMS norms `attention.q_norm` / `k_norm`, `feed_forward.w1` / `w3`
  (ffn) and `w2`, RMS norms `attention_norm1/2`, `ffn_norm1/2`, and the block modulation (4h rows: scale / gate
  for attention and MLP): Z-Image `adaLN_modulation.0` (from a 256-wide time embedding), Lumina 2
  `adaLN_modulation.1` (after a SiLU, from 1024);
* top level: `x_embedder`, `t_embedder.mlp.0/2`, `cap_embedder.0` (RMSNorm over the text feature width: Z-Image
  2560 = Qwen3-4B, Lumina 2 2304 = Gemma-2-2B) / `cap_embedder.1`, `norm_final` (RMSNorm, unused by the forward),
  `final_layer.linear`, `final_layer.adaLN_modulation.1`; Z-Image's `x_pad_token` / `cap_pad_token` are plain
  parameters (not modules).

Writers and their names (tests/lumina_writers.py cites each rule's source):

* ComfyUI native (its trainer), diffusion-pipe (`ComfyPipeline`, Lumina 2's `models/lumina_2.py`):
  `diffusion_model.<path>`; kohya sd-scripts Lumina (`LORA_PREFIX_LUMINA = "lora_unet"`): `lora_unet_<path _>`;
  LyCORIS inside kohya the same, LyCORIS' own wrapper `lycoris_<path _>`; bare `<path>`.
* Z-Image in diffusers naming (`ZImageTransformer2DModel`: `attention.to_q` / `to_k` / `to_v` = rows of
  `attention.qkv`, `attention.to_out.0` = `attention.out`, `attention.norm_q` / `norm_k`, `all_x_embedder.2-1`,
  `all_final_layer.2-1.*`; comfy/utils.py z_image_to_diffusers): diffusers / PEFT `transformer.<d>`, ai-toolkit
  and musubi `convert_lora.py --target other` `diffusion_model.<d>`, DiffSynth-Studio bare `<d>` (PEFT's
  `.default.`), musubi-tuner `networks/lora_zimage.py` `lora_unet_<d _>`, LyCORIS `lycoris_<d _>`.
* Lumina 2 in diffusers naming (`Lumina2Transformer2DModel`: `attn.to_q/k/v` with the GQA split, `attn.to_out.0`,
  `attn.norm_q/k`, `feed_forward.linear_1/2/3`, `norm1.linear` (block modulation), `norm1.norm` / context
  refiner `norm1` (attention_norm1), `norm2`, `time_caption_embed.timestep_embedder.linear_1/2`,
  `time_caption_embed.caption_embedder.0/1`, `norm_out.linear_1` / `linear_2` (final modulation / linear);
  diffusers single_file_utils.py convert_lumina2_to_diffusers): the same prefixes.
  Z-Image's diffusers names are read on both variants (core maps them on Lumina 2 too), Lumina 2's only on Lumina
  2; rows always follow the host's own n_heads / n_kv_heads. Core 0.3.75 splits `attention.to_q/k/v` into equal
  thirds on Lumina 2 too (wrong for its GQA layout): ours does not.
* Full diffs: `<prefix><path>.diff` / `.diff_b` (lightx2v, ComfyUI).

Text encoders: te1 = Qwen3-4B (`qwen3_4b`) on Z-Image, Gemma-2-2B (`gemma2_2b`) on Lumina 2. ComfyUI maps only
`text_encoders.<encoder>.transformer.model.layers.N...`; kohya Lumina trains Gemma as `lora_te_<HF Gemma2Model
path _>` (`lora_te_layers_0_self_attn_q_proj`, no `model.`), diffusers' pipelines as `text_encoder.layers.N...`.

Variants: from the host (ComfyUI's `ZImage` config class, `z_image_modulation`, `adaLN_modulation.0` vs `.1`,
dim 3840 vs 2304) or a LoRA's metadata (musubi `z_image` / `Z-Image`, kohya `lumina2` / `lumina-2`, ai-toolkit
`zimage` / `lumina2`) or shapes (the block width, the caption width, the qkv rows).

Blocks: `TE1`, `IN` (x_embedder, t_embedder, cap_embedder), `NR0`-`NR1` (noise refiner), `CR0`-`CR1` (context
refiner), `L00`.. (`L00`-`L29` Z-Image, `L00`-`L25` Lumina 2), `OUT` (norm_final, final_layer). Neither Inspire
Pack nor hako-mikan's A1111 extension has a layout for this family: named syntax (`L00-L14=0.5`, `NR*=0`,
`L*.mod=0`). Inspire mode takes its first value for every block (Inspire's BASE).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

from ..family import Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, TrainSpec
from ..text_encoders import TextEncoderSpec, register_encoder

# Per-layer norms the LLM scheme of text_encoders.py does not list: Qwen3's q/k norms, Gemma 2's extra
# feed-forward norms (ComfyUI's Llama2_ with q_norm / k_norm "gemma3" and Gemma2's sandwich norms).
QWEN3_4B = register_encoder(TextEncoderSpec(
    "Qwen3-4B", "qwen3_4b", 2560, 36, 36, 9728, 32, kind="llm",
    extra_modules=tuple((f"model.layers.{i}.self_attn.{n}", "norm") for i in range(36) for n in ("q_norm", "k_norm"))))
GEMMA2_2B = register_encoder(TextEncoderSpec(
    "Gemma-2-2B", "gemma2_2b", 2304, 26, 26, 9216, 8, kind="llm",
    extra_modules=tuple((f"model.layers.{i}.{n}", "norm") for i in range(26)
                        for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"))))

BASE, IN, OUT = "BASE", "IN", "OUT"

ELEMENT_KINDS = (
    "attn",                        # attention.qkv (q, k, v parts) and attention.out
    "mlp",                         # feed_forward.w1 / w2 / w3
    "mod",                         # per-block adaLN modulation
    "norm",                        # RMS norms (q/k norms, attention/ffn norms, cap_embedder.0, norm_final)
    "x_embed", "t_embed", "cap_embed",   # IN
    "final", "final_mod",          # OUT: final_layer.linear, final_layer.adaLN_modulation.1
    "pad_token",                   # IN: Z-Image's x_pad_token / cap_pad_token (parameters of the model itself)
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoder
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"attn", "te_attn"}),
    "mlp": frozenset({"mlp", "te_mlp"}),
    "modulation": frozenset({"mod", "final_mod"}),
    "embed": frozenset({"x_embed", "t_embed", "cap_embed", "te_embed"}),
})

# Every writer prefix of a diffusers-named module (on top of the underscored forms).
DIFFUSERS_PREFIXES = ("transformer.", "", "diffusion_model.", "base_model.model.", "transformer.base_model.model.")
DIFFUSERS_UNDERSCORED = ("lora_unet_", "lycoris_", "lora_transformer_")
# (canonical suffix in a block, element kind, Z-Image diffusers name, Lumina 2 diffusers name)
BLOCK_MODULES = (
    ("attention.out", "attn", "attention.to_out.0", "attn.to_out.0"),
    ("attention.q_norm", "norm", "attention.norm_q", "attn.norm_q"),
    ("attention.k_norm", "norm", "attention.norm_k", "attn.norm_k"),
    ("feed_forward.w1", "mlp", "feed_forward.w1", "feed_forward.linear_1"),
    ("feed_forward.w2", "mlp", "feed_forward.w2", "feed_forward.linear_2"),
    ("feed_forward.w3", "mlp", "feed_forward.w3", "feed_forward.linear_3"),
    ("attention_norm1", "norm", "attention_norm1", None),   # Lumina 2: norm1.norm / context refiner norm1
    ("attention_norm2", "norm", "attention_norm2", "norm2"),
    ("ffn_norm1", "norm", "ffn_norm1", "ffn_norm1"),
    ("ffn_norm2", "norm", "ffn_norm2", "ffn_norm2"),
)
STACKS = ("noise_refiner", "context_refiner", "layers")
# The family's own marks on any host (others' names never use them): the refiners, the caption embedder, NextDiT's
# `layers.N.attention.*` / `feed_forward.w*`, and Lumina 2's diffusers block names.
_LAYER = r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._]"


@dataclass(frozen=True)
class LuminaSpec:
    """Structure of a NextDiT: width `dim`, `layers` main blocks and `refiners` of each refiner stack, q rows
    (= dim) and k / v rows (n_kv_heads x head width), the feed-forward width, the caption (text feature) width, the
    time-embedding width the block modulation reads, and whether it has Z-Image's modulation (`adaLN_modulation.0`,
    a 256-wide time embedding) or Lumina 2's (`adaLN_modulation.1`)."""

    dim: int = 3840
    layers: int = 30
    refiners: int = 2
    kv_rows: int = 3840
    ffn: int = 10240
    cap_feat: int = 2560
    z_image: bool = True
    t_hidden: int = 1024
    mod_in: int = 256
    in_rows: int = 64
    out_rows: int = 64

    @property
    def qkv_rows(self) -> int:
        return self.dim + 2 * self.kv_rows

    @property
    def mod_param(self) -> str:
        return "adaLN_modulation.0" if self.z_image else "adaLN_modulation.1"

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "LuminaSpec":
        """From ComfyUI's `unet_config` (model_detection.py's Lumina 2 branch; NextDiT's defaults otherwise)."""
        dim = int(config.get("dim", 4096))
        heads = int(config.get("n_heads", 32))
        kv = int(config.get("n_kv_heads") or heads)
        multiple = int(config.get("multiple_of", 256))
        mult = config.get("ffn_dim_multiplier", 4.0)
        hidden = int(float(mult) * dim) if mult is not None else dim
        ffn = multiple * ((hidden + multiple - 1) // multiple)
        z = bool(config.get("z_image_modulation", False))
        patch = int(config.get("patch_size", 2))
        channels = int(config.get("in_channels", 4))
        return cls(dim=dim, layers=int(config.get("n_layers", 32)), refiners=int(config.get("n_refiner_layers", 2)),
                   kv_rows=kv * (dim // heads), ffn=ffn, cap_feat=int(config.get("cap_feat_dim", 5120)), z_image=z,
                   t_hidden=min(dim, 1024), mod_in=min(dim, 256 if z else 1024), in_rows=dim,
                   out_rows=patch * patch * channels)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]],
                   config: Optional[Mapping] = None) -> Optional[LuminaSpec]:
    """LuminaSpec of a ComfyUI NextDiT state dict given without prefix (`layers.0.attention.qkv.weight`), else None.
    ComfyUI's detector keys on `cap_embedder.1.weight`; the fused `attention.qkv` makes it this family's."""
    keyset = set(keys)
    if "cap_embedder.1.weight" not in keyset or not any(k.endswith(".attention.qkv.weight") for k in keyset):
        return None
    z = any(k.endswith(".adaLN_modulation.0.weight") for k in keyset)
    base = LuminaSpec.from_comfy_config(config) if config and config.get("dim") else (
        ZIMAGE_SPEC if z else LUMINA2_SPEC)
    spec = replace(base, layers=_count(keyset, r"layers\.(\d+)\.") or base.layers,
                   refiners=max(_count(keyset, r"noise_refiner\.(\d+)\."), _count(keyset, r"context_refiner\.(\d+)\.")),
                   z_image=z)
    if shapes:
        def dim(key, axis, default):
            return int(shapes[key][axis]) if key in shapes and len(shapes[key]) > axis else default

        d = dim("cap_embedder.1.weight", 0, spec.dim)
        qkv = dim("layers.0.attention.qkv.weight", 0, d + 2 * spec.kv_rows)
        mod = f"layers.0.{spec.mod_param}.weight"
        spec = replace(spec, dim=d, kv_rows=(qkv - d) // 2, ffn=dim("layers.0.feed_forward.w1.weight", 0, spec.ffn),
                       cap_feat=dim("cap_embedder.1.weight", 1, spec.cap_feat),
                       t_hidden=dim("t_embedder.mlp.0.weight", 0, spec.t_hidden), mod_in=dim(mod, 1, spec.mod_in),
                       in_rows=dim("x_embedder.weight", 0, d),
                       out_rows=dim("final_layer.linear.weight", 0, spec.out_rows))
    return spec


def diffusers_spec(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[tuple[bool, LuminaSpec]]:
    """(is Z-Image, LuminaSpec) of diffusers' ZImageTransformer2DModel / Lumina2Transformer2DModel state dict."""
    keyset = set(keys)
    shapes = shapes or {}

    def dim(key, axis, default):
        return int(shapes[key][axis]) if key in shapes and len(shapes[key]) > axis else default

    if "cap_embedder.1.weight" in keyset and "layers.0.attention.to_q.weight" in keyset:   # ZImageTransformer2DModel
        d = dim("cap_embedder.1.weight", 0, ZIMAGE_SPEC.dim)
        x = next((k for k in keyset if re.fullmatch(r"all_x_embedder\.[^.]+\.weight", k)), "")
        f = next((k for k in keyset if re.fullmatch(r"all_final_layer\.[^.]+\.linear\.weight", k)), "")
        spec = LuminaSpec(dim=d, layers=_count(keyset, r"layers\.(\d+)\."),
                          refiners=_count(keyset, r"noise_refiner\.(\d+)\."),
                          kv_rows=dim("layers.0.attention.to_k.weight", 0, d),
                          ffn=dim("layers.0.feed_forward.w1.weight", 0, ZIMAGE_SPEC.ffn),
                          cap_feat=dim("cap_embedder.1.weight", 1, ZIMAGE_SPEC.cap_feat), z_image=True,
                          t_hidden=dim("t_embedder.mlp.0.weight", 0, 1024),
                          mod_in=dim("layers.0.adaLN_modulation.0.weight", 1, 256), in_rows=d,
                          out_rows=dim(f, 0, 64))
        return True, spec
    if "time_caption_embed.caption_embedder.1.weight" in keyset and "layers.0.attn.to_q.weight" in keyset:
        cap = "time_caption_embed.caption_embedder.1.weight"
        d = dim(cap, 0, LUMINA2_SPEC.dim)
        spec = LuminaSpec(dim=d, layers=_count(keyset, r"layers\.(\d+)\."),
                          refiners=_count(keyset, r"noise_refiner\.(\d+)\."),
                          kv_rows=dim("layers.0.attn.to_k.weight", 0, LUMINA2_SPEC.kv_rows),
                          ffn=dim("layers.0.feed_forward.linear_1.weight", 0, LUMINA2_SPEC.ffn),
                          cap_feat=dim(cap, 1, LUMINA2_SPEC.cap_feat), z_image=False,
                          t_hidden=dim("time_caption_embed.timestep_embedder.linear_1.weight", 0, min(d, 1024)),
                          mod_in=dim("layers.0.norm1.linear.weight", 1, min(d, 1024)), in_rows=d,
                          out_rows=dim("norm_out.linear_2.weight", 0, 64))
        return False, spec
    return None


ZIMAGE_SPEC = LuminaSpec()
LUMINA2_SPEC = LuminaSpec(dim=2304, layers=26, kv_rows=768, ffn=9216, cap_feat=2304, z_image=False, t_hidden=1024,
                          mod_in=1024)


def _block(stack: str, i: int) -> str:
    return {"layers": f"L{i:02d}", "noise_refiner": f"NR{i}", "context_refiner": f"CR{i}"}[stack]


class LuminaFamily(Family):
    name = "lumina"
    title = "Z-Image / Lumina Image 2.0"
    denoiser = "transformer"
    markers = (
        (r"(^|[._])(noise_refiner|context_refiner)[._]\d+[._]", "Z-Image / Lumina 2 (noise / context refiner)"),
        (r"(^|[._])cap_embedder[._]|(^|[._])time_caption_embed[._]", "Z-Image / Lumina 2 (caption embedder)"),
        (_LAYER + r"(attention[._](qkv|out|to_[qkv]|to_out)|feed_forward[._](w[123]|linear_[123])|attn[._]to_[qkv]"
                  r"([._]|$)|adaLN_modulation[._][01])", "Z-Image / Lumina 2 (layers.N.attention / feed_forward)"),
        (r"(^|[._])all_(x_embedder|final_layer)[._]", "Z-Image (diffusers all_x_embedder / all_final_layer)"),
    )

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        self._dif_cache: dict = {}

        def variant(name, title, short, aliases, layout_key, spec, encoder, kohya_te, meta):
            components = {"transformer": ComponentSpec("transformer", ""),
                          "te1": ComponentSpec("te1", "TE1", encoder, kohya_te, "text_encoder.")}
            return ArchSpec(name=name, title=title, family=self, config=spec, components=components, aliases=aliases,
                            layout_key=layout_key, metadata={**meta, "short": short, "resolution": 1024})

        # musubi-tuner's strings (architectures.py, sai_model_spec.py) and kohya sd-scripts' (library/lumina_util.py,
        # sai_model_spec.py); ai-toolkit writes `zimage` / `lumina2`.
        self.ZIMAGE = variant("Z-Image", "Z-Image (Turbo)", "Z-Image", ("z_image", "z-image", "zimage", "z-image-turbo"),
                              "z_image", ZIMAGE_SPEC, QWEN3_4B, (),
                              {"ss_base_model_version": "z_image", "modelspec.architecture": "Z-Image",
                               "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
                               "ss_network_module": "networks.lora_zimage",
                               "match": ("z-image", "z_image", "zimage")})
        self.LUMINA2 = variant("Lumina-Image-2.0", "Lumina Image 2.0", "Lumina 2",
                               ("lumina2", "lumina-2", "lumina_2", "lumina-image-2.0", "lumina image 2.0"), "lumina2",
                               LUMINA2_SPEC, GEMMA2_2B, ("lora_te_", "lora_te1_"),
                               {"ss_base_model_version": "lumina2", "modelspec.architecture": "lumina-2",
                                "modelspec.implementation": "https://github.com/Alpha-VLLM/Lumina-Image-2.0",
                                "ss_network_module": "networks.lora_lumina",
                                "match": ("lumina-2", "lumina2", "lumina_2", "lumina-image-2")})
        self.variants = (self.ZIMAGE, self.LUMINA2)

    # ----------------------------------------------------------------------------- recognition
    def variant_of_spec(self, spec: LuminaSpec) -> ArchSpec:
        return self.ZIMAGE if spec.z_image else self.LUMINA2

    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes, config if config and config.get("image_model") == "lumina2" else None)
        if spec is None:
            return None
        return self.variant_of_spec(spec), spec

    def detect_diffusers(self, keys, shapes):
        found = diffusers_spec(keys, shapes)
        if found is None:
            return None
        return (self.ZIMAGE if found[0] else self.LUMINA2), found[1]

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        if comfy_names == {QWEN3_4B.comfy_name}:
            return self.ZIMAGE
        if comfy_names == {GEMMA2_2B.comfy_name}:
            return self.LUMINA2
        return None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {QWEN3_4B.comfy_name: "te1", GEMMA2_2B.comfy_name: "te1"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: LuminaSpec, variant=None) -> list[ModuleDef]:
        h, kv = spec.dim, spec.kv_rows
        out = [ModuleDef("x_embedder", IN, "x_embed", spec.in_rows),
               ModuleDef("t_embedder.mlp.0", IN, "t_embed", spec.t_hidden),
               ModuleDef("t_embedder.mlp.2", IN, "t_embed"),
               ModuleDef("cap_embedder.0", IN, "norm"),
               ModuleDef("cap_embedder.1", IN, "cap_embed", h)]
        if spec.z_image:   # parameters of the model itself, named by their key (a full diff's `.diff` reaches them)
            out += [ModuleDef("x_pad_token", IN, "pad_token", param=""),
                    ModuleDef("cap_pad_token", IN, "pad_token", param="")]
        for stack in STACKS:
            count = spec.layers if stack == "layers" else spec.refiners
            for i in range(count):
                block, p = _block(stack, i), f"{stack}.{i}"
                out.append(ModuleDef(f"{p}.attention.qkv", block, "attn", spec.qkv_rows,
                                     (Part("q", 0, h, "attn"), Part("k", h, kv, "attn"), Part("v", h + kv, kv, "attn"))))
                for suffix, kind, _, _ in BLOCK_MODULES:
                    rows = spec.ffn if suffix in ("feed_forward.w1", "feed_forward.w3") else h if kind != "norm" else 0
                    out.append(ModuleDef(f"{p}.{suffix}", block, kind, rows))
                if stack != "context_refiner":
                    out.append(ModuleDef(f"{p}.{spec.mod_param}", block, "mod", 4 * h))
        out += [ModuleDef("norm_final", OUT, "norm"),
                ModuleDef("final_layer.linear", OUT, "final", spec.out_rows),
                ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", h)]
        return out

    def _diffusers_names(self, spec: LuminaSpec) -> dict[str, list[tuple[str, Optional[tuple], int, str]]]:
        """canonical path -> [(diffusers path, pieces or None, alias rows, scheme)], scheme "z" = ZImageTransformer2DModel's
        names, "l" = Lumina2Transformer2DModel's (both read on either variant; the host's rows decide the split)."""
        cached = self._dif_cache.get(spec)
        if cached is not None:
            return cached
        h, kv = spec.dim, spec.kv_rows
        table: dict[str, list] = {}

        def add(canonical, diffusers, scheme, pieces=None, rows=0):
            table.setdefault(canonical, []).append((diffusers, pieces, rows, scheme))

        add("x_embedder", "all_x_embedder.2-1", "z")
        add("final_layer.linear", "all_final_layer.2-1.linear", "z")
        add("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1", "z")
        add("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1", "l")
        add("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2", "l")
        add("cap_embedder.0", "time_caption_embed.caption_embedder.0", "l")
        add("cap_embedder.1", "time_caption_embed.caption_embedder.1", "l")
        add("final_layer.adaLN_modulation.1", "norm_out.linear_1", "l")
        add("final_layer.linear", "norm_out.linear_2", "l")
        for stack in STACKS:
            count = spec.layers if stack == "layers" else spec.refiners
            for i in range(count):
                p = f"{stack}.{i}"
                for j, (x, start, rows) in enumerate((("q", 0, h), ("k", h, kv), ("v", h + kv, kv))):
                    add(f"{p}.attention.qkv", f"{p}.attention.to_{x}", "z", ((start, 0, rows),), rows)
                    add(f"{p}.attention.qkv", f"{p}.attn.to_{x}", "l", ((start, 0, rows),), rows)
                for suffix, _, z_name, l_name in BLOCK_MODULES:
                    if z_name != suffix:
                        add(f"{p}.{suffix}", f"{p}.{z_name}", "z")
                    if l_name is None:
                        l_name = "norm1" if stack == "context_refiner" else "norm1.norm"
                    if l_name != suffix:
                        add(f"{p}.{suffix}", f"{p}.{l_name}", "l")
                if stack != "context_refiner":
                    add(f"{p}.{spec.mod_param}", f"{p}.norm1.linear", "l")
        self._dif_cache[spec] = table
        return table

    def aliases(self, module: ModuleDef, spec: LuminaSpec, variant=None) -> list[Alias]:
        out = self.native_aliases(module.path, prefixes=("transformer.", "base_model.model.",
                                                         "transformer.base_model.model."))
        out.append(Alias("lora_transformer_" + module.path.replace(".", "_")))
        for diffusers, pieces, rows, scheme in self._diffusers_names(spec).get(module.path, ()):
            if scheme == "l" and spec.z_image:
                continue   # Lumina2Transformer2DModel's names: only Lumina 2 files carry them
            out += self.diffusers_aliases(diffusers, pieces, rows, prefixes=DIFFUSERS_PREFIXES,
                                          underscored=DIFFUSERS_UNDERSCORED)
        return out

    def diffusers_names(self, spec: LuminaSpec) -> dict:
        scheme = "z" if spec.z_image else "l"
        out = {m.path: (m.path,) for m in self.modules(spec)}
        for path, entries in self._diffusers_names(spec).items():
            names = tuple(n for n, _, _, s in entries if s == scheme)
            if names:
                out[path] = names
        return out

    def diffusers_host_pieces(self, spec: LuminaSpec, variant=None) -> dict:
        """diffusers key -> (canonical path, ((canonical start, host start, length), ...) or None, param), in the
        naming of the variant's own diffusers class (ZImageTransformer2DModel or Lumina2Transformer2DModel)."""
        scheme = "z" if spec.z_image else "l"
        renamed = {path: [e for e in entries if e[3] == scheme] for path, entries in self._diffusers_names(spec).items()}
        out = {}
        for m in self.modules(spec):
            entries = renamed.get(m.path) or []
            if not entries:
                if spec.z_image or m.path != "norm_final":   # Lumina2Transformer2DModel drops the unused norm_final
                    out[m.key] = (m.path, None, m.param)
                continue
            for diffusers, pieces, _rows, _ in entries:
                out[f"{diffusers}.weight"] = (m.path, tuple(pieces) if pieces is not None else None, "weight")
        return out

    def lora_votes(self, modules, variant, key_map) -> int:
        """+1 / -1 per block module whose input width is / is not the variant's width (Z-Image 3840, Lumina 2 2304),
        per caption-embedder module whose text width fits (2560 / 2304), and per fused qkv whose rows fit (11520 /
        3840); text-encoder modules by their encoder's width."""
        from ... import adapters

        votes = 0
        spec = variant.config
        for name, module in modules.items():
            target = key_map.resolve(name)
            if target is None or module.algo not in ("lora", "loha", "lokr", "full", "norm", "set"):
                continue
            try:
                shape = tuple(adapters.natural_shape(module))
            except Exception:
                continue
            if len(shape) < 2:
                continue
            if target.component in variant.text_encoders:
                if target.path.endswith(".self_attn.q_proj"):
                    votes += 1 if shape[1] == variant.text_encoders[target.component].hidden_size else -1
                continue
            if target.path == "cap_embedder.1":
                votes += 1 if shape[1] == spec.cap_feat else -1
            elif re.match(r"(layers|noise_refiner|context_refiner)\.", target.path):
                wanted = spec.ffn if target.path.endswith("feed_forward.w2") else \
                    spec.mod_in if target.kind == "mod" else spec.dim
                votes += 1 if shape[1] == wanted else -1
                if target.path.endswith("attention.qkv") and target.pieces is None:
                    votes += 1 if shape[0] == spec.qkv_rows else -1
        return votes

    def denoiser_words(self):
        return ("layers", "noise_refiner", "context_refiner", "x_embedder", "t_embedder", "cap_embedder", "norm_final",
                "final_layer", "all_x_embedder", "all_final_layer", "time_caption_embed", "norm_out", "x_pad_token",
                "cap_pad_token")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, LuminaSpec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        m = re.search(r"(?:^|[._])(layers|noise_refiner|context_refiner)[._](\d+)[._](.*)", rest)
        if m:
            stack, index, tail = m.group(1), int(m.group(2)), m.group(3)
            count = spec.layers if stack == "layers" else spec.refiners
            if index >= count:
                return (f"{name!r}: key for {stack} block {index}, but this {title} model has {count} (0-{count - 1}): "
                        f"this LoRA was made for a deeper model (Z-Image has 30 layers, Lumina 2 26)")
            mod = re.match(r"adaLN_modulation[._]([01])", tail)
            if mod:
                if stack == "context_refiner":
                    return (f"{name!r}: modulation key for context refiner {index}, which has no modulation in "
                            f"Z-Image or Lumina 2: this LoRA was made for another model")
                if spec.mod_param[-1] != mod.group(1):
                    made = "Z-Image" if mod.group(1) == "0" else "Lumina Image 2.0"
                    return (f"{name!r}: block modulation named `adaLN_modulation.{mod.group(1)}`, which is {made}'s; "
                            f"this {title} model has `{spec.mod_param}`: this LoRA was made for {made}")
        if spec.z_image and re.search(r"(^|[._])(attn[._](to_|norm_)|feed_forward[._]linear_[123]|norm1[._]linear|"
                                      r"time_caption_embed|norm_out[._]linear_[12])", rest):
            return (f"{name!r}: diffusers' Lumina2Transformer2DModel name (`attn.to_q`, `feed_forward.linear_1`, "
                    f"`norm1.linear`, ...): this LoRA was made for Lumina Image 2.0, not {title}")
        if re.search(r"(^|[._])x_pad_token|cap_pad_token", rest):
            return (f"{name!r}: Z-Image's pad tokens (`x_pad_token`, `cap_pad_token`), which this {title} model "
                    "does not have: this file was made for Z-Image")
        return (f"{name!r}: Z-Image / Lumina-style key that names no module of this {title} model; check the LoRA's "
                "base model (or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        spec = variant.config
        main = tuple(_block("layers", i) for i in range(spec.layers))
        noise = tuple(_block("noise_refiner", i) for i in range(spec.refiners))
        context = tuple(_block("context_refiner", i) for i in range(spec.refiners))
        encoder = variant.components["te1"].encoder
        descriptions = {"TE1": f"text encoder 1 ({encoder.family})",
                        IN: "input embeddings (x_embedder, t_embedder, cap_embedder)",
                        OUT: "output (norm_final, final_layer linear and modulation)"}
        for i, b in enumerate(noise):
            descriptions[b] = f"noise refiner {i} (image tokens, modulated: attention, feed-forward)"
        for i, b in enumerate(context):
            descriptions[b] = f"context refiner {i} (caption tokens, no modulation: attention, feed-forward)"
        for i, b in enumerate(main):
            descriptions[b] = f"transformer layer {i} (joint image and caption tokens: attention, feed-forward, " \
                              "modulation)"
        layout = BlockLayout(
            key=variant.layout_key, blocks=("TE1", IN) + noise + context + main + (OUT,), te_blocks=("TE1",),
            other_blocks=(IN, OUT), descriptions=descriptions,
            groups={BASE: ("TE1",), "L": main, "NR": noise, "CR": context, "REF": noise + context},
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> Optional[TrainSpec]:
        """How each variant's common trainer trains it. Flow matching at the model's own shift (ComfyUI samples
        Z-Image with ModelSamplingAuraFlow shift 3.0, Lumina 2 with shift 6.0; NextDiT's own t = 1 - sigma and its
        negated output are inside ComfyUI's model, so the velocity target is the generic one), no guidance input.

        * **Z-Image**, musubi-tuner (`networks/lora_zimage.py`: every Linear of `ZImageTransformerBlock` with the
          default exclude `.*(_modulation|_refiner).*`): the main layers' attention (diffusers' separate to_q / to_k /
          to_v, i.e. the three row ranges of ComfyUI's fused qkv, each its own LoRA, and to_out.0) and feed-forward
          (w1 / w2 / w3); no modulation, no refiner. Saved in the names ai-toolkit writes and core reads
          (`diffusion_model.<diffusers path>`, see `train_names`). "all layers" adds the modulation, the refiners,
          the embedders and the final layer.
        * **Lumina 2**, kohya sd-scripts (`networks/lora_lumina.py`: LUMINA_TARGET_REPLACE_MODULE =
          JointTransformerBlock + FinalLayer, split_qkv off): every Linear of the main layers and both refiners
          (fused qkv whole, with its GQA rows [q | k | v]; out; w1 / w2 / w3; adaLN modulation) and the final layer,
          named `lora_unet_<path _>`. Its resolution shift is kohya's `nextdit_shift` (mu 0.5 at 256 image tokens,
          1.15 at 4096, as Flux's)."""
        if variant is self.ZIMAGE or (config is not None and getattr(config, "z_image", False)):
            return TrainSpec(kinds=LUMINA_TRAIN_KINDS, target_sets=ZIMAGE_TARGET_SETS, conv_kinds=(),
                             text_encoders=("te1",), guidance_input=False,
                             timestep_sampling="logit-normal, model shift", resolution_shift=None,
                             block_lists=STACKS, path_kinds=((r"^(noise_refiner|context_refiner)\.", "refiner"),))
        return TrainSpec(kinds=LUMINA_TRAIN_KINDS, target_sets=LUMINA2_TARGET_SETS, conv_kinds=(),
                         text_encoders=("te1",), guidance_input=False,
                         timestep_sampling="logit-normal, model shift", resolution_shift=(2, 256, 0.5, 4096, 1.15),
                         block_lists=STACKS)

    def train_names(self, target, variant, config=None) -> Optional[tuple[tuple[str, int, int], ...]]:
        """Z-Image: ai-toolkit's names (`diffusion_model.` + ZImageTransformer2DModel's module path, what core reads
        since its Z-Image support): the fused qkv as to_q / to_k / to_v (rows of the host's own q / k / v widths),
        attention.out as to_out.0, the embedders and final layer as all_x_embedder.2-1 / all_final_layer.2-1.*.
        Lumina 2: None (kohya's lora_unet_ names, the merge naming)."""
        if variant is not self.ZIMAGE:
            return None
        spec = config if isinstance(config, LuminaSpec) else variant.config
        entries = [e for e in self._diffusers_names(spec).get(target.path, ()) if e[3] == "z"]
        if not entries:
            return ((f"diffusion_model.{target.path}", 0, 0),)
        return tuple((f"diffusion_model.{name}", pieces[0][0] if pieces else 0, rows if pieces else 0)
                     for name, pieces, rows, _ in entries)


# Training kinds -> element kinds (the train node's target choices name training kinds; Z-Image's `refiner` kind
# comes from TrainSpec.path_kinds: every module of noise_refiner / context_refiner).
LUMINA_TRAIN_KINDS = {
    "attn": frozenset({"attn"}),
    "mlp": frozenset({"mlp"}),
    "mod": frozenset({"mod"}),
    "embed": frozenset({"x_embed", "t_embed", "cap_embed"}),
    "final": frozenset({"final", "final_mod"}),
}
# Z-Image: the first (the node's default) is musubi's default, the main layers' attention and feed-forward.
ZIMAGE_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(LUMINA_TRAIN_KINDS) + ("refiner",),
}
# Lumina 2: kohya's default, every Linear of the blocks (modulation included) and of the final layer.
LUMINA2_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp", "mod", "final"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(LUMINA_TRAIN_KINDS),
}


FAMILY = LuminaFamily()
Z_IMAGE, LUMINA2 = FAMILY.ZIMAGE, FAMILY.LUMINA2
