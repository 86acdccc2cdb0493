"""The Qwen-Image family: Qwen-Image, Qwen-Image-Edit, Edit-2509 ("Edit-Plus"), Edit-2511 and Layered. All five
share one transformer (same module names and shapes); only a LoRA's metadata tells them apart.

Canonical names are ComfyUI's, which for Qwen-Image are diffusers' own (`comfy/ldm/qwen_image/model.py` mirrors
diffusers' `QwenImageTransformer2DModel` module for module). The tree, h = heads x head width (3072 = 24 x 128):

* `transformer_blocks.N` (60): `img_mod.1` (6h) and `txt_mod.1` (6h) modulation; attention `attn.to_q`, `to_k`,
  `to_v`, `to_out.0` (image stream) and `attn.add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out` (text
  stream), RMSNorm weights `attn.norm_q` / `norm_k` / `norm_added_q` / `norm_added_k`; MLPs `img_mlp.net.0.proj`
  (4h), `img_mlp.net.2`, `txt_mlp.net.0.proj`, `txt_mlp.net.2`. **Nothing is fused**: no row parts anywhere.
* top level: `img_in`, `txt_norm` (RMSNorm over the text encoder's width, 3584), `txt_in`,
  `time_text_embed.timestep_embedder.linear_1` / `linear_2`, and `norm_out.linear` (2h) + `proj_out`.
  `norm_out.linear` is [scale | shift] in ComfyUI (LastLayer: `scale, shift = chunk(emb, 2)`) exactly as in
  diffusers (AdaLayerNormContinuous), so unlike Flux no half swap is needed between the two namings.

Writers and their names (tests/qwen_image_writers.py cites each rule's source):

* ComfyUI native, ai-toolkit (`transformer.` -> `diffusion_model.` before saving), diffusion-pipe (PEFT keys +
  `diffusion_model.`): `diffusion_model.<path>`; diffusers / PEFT (`QwenImagePipeline.save_lora_weights`):
  `transformer.<path>`; DiffSynth-Studio and Lightning: bare `<path>` (DiffSynth with PEFT's
  `.lora_A.default.weight`); musubi-tuner (`networks/lora_qwen_image.py`, prefix `lora_unet`, `_mod_` excluded
  by default): `lora_unet_<path _>`; LyCORIS / SimpleTuner: `lycoris_<path _>`; raw PEFT state dicts:
  `base_model.model.<path>` (core 0.3.75 reads none of the last). Full diffs: `<prefix><path>.diff` / `.diff_b`.

Text encoder: Qwen2.5-VL-7B (te1, ComfyUI's `qwen25_7b`: an LLM in `model.layers.N.self_attn.q_proj` naming,
plus the vision tower `visual.*` that Edit uses). ComfyUI maps it only as `text_encoders.qwen25_7b.transformer.
<path>`; no trainer writes text-encoder LoRAs for it, so it has no kohya prefix.

Blocks: `TE1`, `IN` (img_in, txt_norm, txt_in, time_text_embed), `B00`-`B59` (the transformer blocks; `B` is
the group of all of them), `OUT` (norm_out, proj_out). Inspire Pack has no layout for this family (everything is
its BASE) and hako-mikan's A1111 extension none either: use named syntax (`B00-B29=0.5`, `B*.txt=0`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, TrainSpec
from ..text_encoders import TextEncoderSpec, register_encoder

# Qwen2.5-VL-7B's vision tower as ComfyUI keeps it (comfy/text_encoders/qwen_vl.py: 32 blocks, 1280 wide); Edit
# encodes its input image with it.
VISION_TOWER = (("visual.patch_embed.proj", "te_embed"),) + tuple(
    (f"visual.blocks.{i}.{part}", kind) for i in range(32)
    for part, kind in (("norm1", "norm"), ("norm2", "norm"), ("attn.qkv", "te_attn"), ("attn.proj", "te_attn"),
                       ("mlp.gate_proj", "te_mlp"), ("mlp.up_proj", "te_mlp"), ("mlp.down_proj", "te_mlp"))
) + (("visual.merger.ln_q", "norm"), ("visual.merger.mlp.0", "proj"), ("visual.merger.mlp.2", "proj"))
QWEN25_VL_7B = register_encoder(TextEncoderSpec("Qwen2.5-VL-7B", "qwen25_7b", 3584, 28, 28, 18944, 28, kind="llm",
                                                extra_modules=VISION_TOWER))

BASE, IN, OUT, BLOCKS = "BASE", "IN", "OUT", "B"

ELEMENT_KINDS = (
    "img_attn", "txt_attn",        # to_q/to_k/to_v/to_out.0 (image stream) vs add_*_proj/to_add_out (text stream)
    "img_mlp", "txt_mlp",          # img_mlp.net.*, txt_mlp.net.*
    "img_mod", "txt_mod",          # img_mod.1, txt_mod.1
    "norm",                        # RMSNorm weights (attn.norm_q/k, norm_added_q/k, txt_norm)
    "img_in", "txt_in", "time_in",  # IN: img_in, txt_in, time_text_embed
    "final", "final_mod",          # OUT: proj_out, norm_out.linear
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoder
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"img_attn", "txt_attn", "te_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "te_mlp"}),
    "modulation": frozenset({"img_mod", "txt_mod", "final_mod"}),
    "img": frozenset({"img_attn", "img_mlp", "img_mod"}),
    "txt": frozenset({"txt_attn", "txt_mlp", "txt_mod"}),
    "embed": frozenset({"img_in", "txt_in", "time_in", "te_embed"}),
})

# (path inside transformer_blocks.N, element kind, rows in units of h; 0 = unknown / a norm)
BLOCK_MODULES = (
    ("img_mod.1", "img_mod", 6), ("txt_mod.1", "txt_mod", 6),
    ("attn.to_q", "img_attn", 1), ("attn.to_k", "img_attn", 1), ("attn.to_v", "img_attn", 1),
    ("attn.to_out.0", "img_attn", 1),
    ("attn.add_q_proj", "txt_attn", 1), ("attn.add_k_proj", "txt_attn", 1), ("attn.add_v_proj", "txt_attn", 1),
    ("attn.to_add_out", "txt_attn", 1),
    ("attn.norm_q", "norm", 0), ("attn.norm_k", "norm", 0), ("attn.norm_added_q", "norm", 0),
    ("attn.norm_added_k", "norm", 0),
    ("img_mlp.net.0.proj", "img_mlp", 4), ("img_mlp.net.2", "img_mlp", 1),
    ("txt_mlp.net.0.proj", "txt_mlp", 4), ("txt_mlp.net.2", "txt_mlp", 1),
)
# PEFT / diffusers / OneTrainer-style prefixes on top of the native forms (the names themselves are the same).
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "transformer.base_model.model.")


@dataclass(frozen=True)
class QwenImageSpec:
    """Structure of a Qwen-Image transformer: inner width h, blocks, MLP width (4h in every release), the text
    encoder's width (`joint_attention_dim`), the latent input width and `proj_out`'s rows."""

    hidden: int = 3072
    depth: int = 60
    mlp_hidden: int = 12288
    context: int = 3584
    in_channels: int = 64
    out_rows: int = 64

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "QwenImageSpec":
        """From ComfyUI's `unet_config` (its detector gives in_channels and num_layers; the other sizes are the
        model class' defaults unless given)."""
        hidden = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
        patch = int(config.get("patch_size", 2))
        in_channels = int(config.get("in_channels", 64))
        out_channels = int(config.get("out_channels") or 16)
        return cls(hidden=hidden, depth=int(config.get("num_layers", 60)), mlp_hidden=4 * hidden,
                   context=int(config.get("joint_attention_dim", 3584)), in_channels=in_channels,
                   out_rows=patch * patch * out_channels)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[QwenImageSpec]:
    """QwenImageSpec of a ComfyUI / diffusers state dict given without prefix, else None. Qwen-Image's own marks:
    `txt_norm` (what ComfyUI's detector keys on) together with the `img_mod.1` modulation of its blocks; other
    DiTs with `transformer_blocks` (Flux and SD3 in diffusers naming, Flux.2) have neither."""
    keyset = set(keys)
    if "txt_norm.weight" not in keyset or "img_in.weight" not in keyset:
        return None
    if not any(k.startswith("transformer_blocks.") and k.endswith(".img_mod.1.weight") for k in keyset):
        return None
    shapes = shapes or {}

    def dim(key: str, axis: int, default: int) -> int:
        return int(shapes[key][axis]) if key in shapes else default

    hidden = dim("img_in.weight", 0, 3072)
    return QwenImageSpec(hidden=hidden, depth=_count(keyset, r"transformer_blocks\.(\d+)\."),
                         mlp_hidden=dim("transformer_blocks.0.img_mlp.net.0.proj.weight", 0, 4 * hidden),
                         context=dim("txt_in.weight", 1, 3584), in_channels=dim("img_in.weight", 1, 64),
                         out_rows=dim("proj_out.weight", 0, 64))


def _block(i: int) -> str:
    return f"B{i:02d}"


class QwenImageFamily(Family):
    name = "qwen_image"
    title = "Qwen-Image (Edit, Edit-2509, Edit-2511, Layered)"
    denoiser = "transformer"
    # Names only Qwen-Image uses (its `transformer_blocks` / `add_q_proj` / `to_out` are shared with the
    # diffusers names of Flux and SD3, so they mark nothing).
    markers = (
        (r"(^|[._])(img|txt)_mlp[._]net[._]", "Qwen-Image"),
        (r"(^|[._])(img|txt)_mod[._]1([._]|$)", "Qwen-Image"),
        (r"(^|[._])txt_norm([._]|$)", "Qwen-Image"),
    )

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", QWEN25_VL_7B, (), "text_encoder."),
        }
        qwen = "https://github.com/QwenLM/Qwen-Image"

        def variant(name, title, short, aliases, base_version, architecture, match, implementation=qwen):
            return ArchSpec(name=name, title=title, family=self, config=QwenImageSpec(), components=components,
                            aliases=aliases, layout_key="qwen_image",
                            metadata={"ss_base_model_version": base_version, "modelspec.architecture": architecture,
                                      "modelspec.implementation": implementation, "short": short,
                                      "ss_network_module": "networks.lora_qwen_image", "resolution": 1328,
                                      "match": match})

        # musubi-tuner's strings (architectures.py, sai_model_spec.py); ai-toolkit writes `qwen_image` for Edit and
        # Edit-Plus too, so such files read as Qwen-Image (the variants share every module: nothing else differs).
        self.BASE = variant("Qwen-Image", "Qwen-Image", "Qwen-Image", ("qwen_image", "qwen-image", "qwen", "qwenimage"),
                            "qwen_image", "Qwen-Image", ("qwen-image", "qwen_image", "qwenimage"))
        self.EDIT = variant("Qwen-Image-Edit", "Qwen-Image-Edit", "Qwen-Image-Edit",
                            ("qwen_image_edit", "qwen-image-edit", "qwen-edit"), "qwen_image_edit", "Qwen-Image-Edit",
                            ("qwen-image-edit", "qwen_image_edit", "qwenimageedit"))
        self.EDIT_2509 = variant("Qwen-Image-Edit-2509", "Qwen-Image-Edit-2509 (Edit-Plus)", "Qwen-Image-Edit-2509",
                                 ("qwen-image-edit-2509", "qwen-image-edit-plus", "qwen_image_edit_plus"),
                                 "qwen_image_edit", "Qwen-Image-Edit-Plus",
                                 ("qwen-image-edit-plus", "qwen-image-edit-2509", "qwen_image_edit_plus",
                                  "qwen_image_edit_2509"))
        self.EDIT_2511 = variant("Qwen-Image-Edit-2511", "Qwen-Image-Edit-2511", "Qwen-Image-Edit-2511",
                                 ("qwen-image-edit-2511", "qwen_image_edit_2511"), "qwen_image_edit",
                                 "Qwen-Image-Edit-2511", ("qwen-image-edit-2511", "qwen_image_edit_2511"))
        self.LAYERED = variant("Qwen-Image-Layered", "Qwen-Image-Layered", "Qwen-Image-Layered",
                               ("qwen-image-layered", "qwen_image_layered"), "qwen_image_layered", "Qwen-Image-Layered",
                               ("qwen-image-layered", "qwen_image_layered"),
                               "https://github.com/QwenLM/Qwen-Image-Layered")
        self.variants = (self.BASE, self.EDIT, self.EDIT_2509, self.EDIT_2511, self.LAYERED)

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes)
        if spec is None:
            return None
        if not shapes and config and config.get("image_model") == "qwen_image":
            spec = QwenImageSpec.from_comfy_config(config)
        # ComfyUI has one model class for every variant: keys, shapes and config cannot tell Edit from Qwen-Image
        return self.BASE, spec

    def detect_diffusers(self, keys, shapes):
        spec = spec_from_keys(keys, shapes)   # diffusers' QwenImageTransformer2DModel has ComfyUI's names
        return (self.BASE, spec) if spec is not None else None

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        return self.BASE if comfy_names == {QWEN25_VL_7B.comfy_name} else None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {QWEN25_VL_7B.comfy_name: "te1"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: QwenImageSpec, variant=None) -> list[ModuleDef]:
        h = spec.hidden
        out = [ModuleDef("img_in", IN, "img_in", h), ModuleDef("txt_norm", IN, "norm"),
               ModuleDef("txt_in", IN, "txt_in", h),
               ModuleDef("time_text_embed.timestep_embedder.linear_1", IN, "time_in", h),
               ModuleDef("time_text_embed.timestep_embedder.linear_2", IN, "time_in", h)]
        for i in range(spec.depth):
            for sub, kind, rows in BLOCK_MODULES:
                width = spec.mlp_hidden if rows == 4 else rows * h
                out.append(ModuleDef(f"transformer_blocks.{i}.{sub}", _block(i), kind, width))
        out += [ModuleDef("norm_out.linear", OUT, "final_mod", 2 * h),
                ModuleDef("proj_out", OUT, "final", spec.out_rows)]
        return out

    def aliases(self, module: ModuleDef, spec: QwenImageSpec, variant=None) -> list[Alias]:
        path = module.path
        out = self.native_aliases(path, prefixes=DIFFUSERS_PREFIXES)
        out.append(Alias("lora_transformer_" + path.replace(".", "_")))   # the OneTrainer-style form of DiT names
        return out

    def diffusers_names(self, spec: QwenImageSpec) -> dict:
        return {m.path: (m.path,) for m in self.modules(spec)}

    def diffusers_host_pieces(self, spec: QwenImageSpec, variant=None) -> dict:
        """diffusers key -> (canonical path, None (the whole weight), param): the names are the same."""
        return {f"{m.path}.{m.param}": (m.path, None, m.param) for m in self.modules(spec)}

    def preferred_variant(self, names):
        # the variants share every module: a file without metadata is assumed to be for Qwen-Image
        return self.BASE.name if self.BASE.name in names else None

    def denoiser_words(self):
        return ("transformer_blocks", "img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, QwenImageSpec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        m = re.search(r"(?:^|[._])transformer_blocks[._](\d+)[._]", rest)
        if m and int(m.group(1)) >= spec.depth:
            return (f"{name!r}: key for transformer block {m.group(1)}, but this {title} model has {spec.depth} "
                    f"blocks (0-{spec.depth - 1}): this LoRA was made for a deeper model (Qwen-Image has 60)")
        if re.search(r"(?:^|[._])(ff|ff_context|norm1|norm1_context)[._]", rest):
            return (f"{name!r}: `ff` / `norm1` names are diffusers' Flux.1 or SD3 blocks, not Qwen-Image's "
                    f"(`img_mlp.net`, `img_mod.1`): this LoRA was made for another model")
        return (f"{name!r}: Qwen-Image-style key that names no module of this {title} model; check the LoRA's base "
                "model (or the module is not a weight)")

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> TrainSpec:
        """musubi-tuner's Qwen-Image training (networks/lora_qwen_image.py, docs/qwen_image.md): LoRA on the Linears
        of every QwenImageTransformerBlock except the modulation (musubi excludes `_mod_` by default): attention
        (to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out) and both MLPs, named lora_unet_<path _> (the native
        module names). musubi trains no text encoder (Qwen2.5-VL); ours can, through ComfyUI's generic names. Flow
        matching at the model's shift (ComfyUI samples Qwen-Image with ModelSamplingFlux, mu 1.15: s = e^1.15);
        the resolution shift option is Qwen-Image's own dynamic schedule (diffusers' scheduler config: mu 0.5 at
        256 image tokens, 0.9 at 8192; musubi `qwen_shift`)."""
        return TrainSpec(kinds=QWEN_TRAIN_KINDS, target_sets=QWEN_TARGET_SETS, conv_kinds=(),
                         text_encoders=("te1",), guidance_input=False,
                         timestep_sampling="logit-normal, model shift", resolution_shift=(2, 256, 0.5, 8192, 0.9),
                         block_lists=("transformer_blocks",))

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        blocks = tuple(_block(i) for i in range(variant.config.depth))
        descriptions = {"TE1": f"text encoder 1 ({QWEN25_VL_7B.family})",
                        IN: "input embeddings (img_in, txt_norm, txt_in, time_text_embed)",
                        OUT: "output (norm_out modulation, proj_out)"}
        for i, b in enumerate(blocks):
            descriptions[b] = (f"transformer block {i} (image and text streams, joint attention, modulation, "
                               "MLPs)")
        layout = BlockLayout(
            key=variant.layout_key, blocks=("TE1", IN) + blocks + (OUT,), te_blocks=("TE1",), other_blocks=(IN, OUT),
            descriptions=descriptions, groups={BASE: ("TE1",), BLOCKS: blocks},
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout


# Training kinds -> element kinds.
QWEN_TRAIN_KINDS = {
    "attn": frozenset({"img_attn", "txt_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp"}),
    "mod": frozenset({"img_mod", "txt_mod"}),
    "embed": frozenset({"img_in", "txt_in", "time_in"}),
    "final": frozenset({"final", "final_mod"}),
}
# The first (the node's default) is musubi's default: attention and MLPs of every block, no modulation ("attn+ff"
# is the same set); "all layers" adds the block modulation, the input embeddings and the output layers.
QWEN_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(QWEN_TRAIN_KINDS),
}


FAMILY = QwenImageFamily()
QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_2509, QWEN_IMAGE_EDIT_2511, QWEN_IMAGE_LAYERED = FAMILY.variants
