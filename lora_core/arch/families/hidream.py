"""The HiDream family: HiDream-I1 (Full, Dev and Fast share one transformer; ComfyUI 0.3.75 `supported_models.
HiDream`).

Canonical names are ComfyUI's (comfy/ldm/hidream/model.py), which are also the original release's and diffusers'
`HiDreamImageTransformer2DModel`'s (diffusers' converter for `diffusion_model.` files only swaps the prefix). Every
block sits under an extra `.block.`; **nothing is fused** (no row parts). With h = heads x 128 (2560 = 20 x 128):

* `double_stream_blocks.N.block` (16): `adaLN_modulation.1` (12h), image attention `attn1.to_q` / `to_k` / `to_v` /
  `to_out` and text attention `attn1.to_q_t` / `to_k_t` / `to_v_t` / `to_out_t`, RMSNorm weights
  `attn1.q_rms_norm` / `k_rms_norm` (and `_t`); image feed-forward `ff_i` = mixture of experts: a shared expert
  `ff_i.shared_experts.w1 / w2 / w3` (SwiGLU), routed experts `ff_i.experts.E.w1 / w2 / w3` (4, 2 active) and the
  router `ff_i.gate` (a bare weight, experts x h); text feed-forward `ff_t.w1 / w2 / w3`;
* `single_stream_blocks.N.block` (32): `adaLN_modulation.1` (6h), `attn1.to_q` / `to_k` / `to_v` / `to_out` (+
  norms), `ff_i` (the same mixture of experts);
* top level: `x_embedder.proj`, `t_embedder.timestep_embedder.linear_1` / `_2`, `p_embedder.pooled_embedder.
  linear_1` / `_2` (pooled CLIP-L + CLIP-G text), `caption_projection.0` .. `.48` `.linear` (one per block for
  Llama's hidden states, the last for T5), `final_layer.linear`, `final_layer.adaLN_modulation.1` ([shift | scale]
  in ComfyUI and diffusers alike: no swap).

Writers (tests/hidream_writers.py cites each rule's source): ComfyUI native, ai-toolkit and diffusion-pipe:
`diffusion_model.<path>`; kohya-style generic (ComfyUI's own map; no kohya / musubi HiDream-I1 trainer exists):
`lora_unet_<path _>`; SimpleTuner / diffusers / PEFT: `transformer.<path>`; OneTrainer: `transformer.<path>` with
`lora_down` / `lora_up` (+ `dora_scale`); LyCORIS / SimpleTuner LyCORIS: `lycoris_<path _>`; bare `<path>`,
`base_model.model.<path>` and `lora_transformer_<path _>` are read too. Full diffs `<prefix><path>.diff`.

Text encoders: te1 CLIP-L (`clip_l`, `lora_te1_`), te2 OpenCLIP-G (`clip_g`, `lora_te2_`), te3 T5-XXL (`t5xxl`,
`lora_te3_`; ComfyUI numbers it after the CLIPs present), te4 Llama-3.1-8B (`llama`: ComfyUI maps it only as
`text_encoders.llama.transformer.<path>`); diffusers' `text_encoder.` .. `text_encoder_4.`.

Blocks: `TE1`-`TE4`, `IN` (x_embedder, t_embedder, p_embedder, caption_projection), `DS00`-`DS15` (double stream
blocks), `SS00`-`SS31` (single stream blocks), `OUT` (final_layer). No tool has a positional layout for HiDream:
Inspire Pack gives these blocks no slots (every key is its BASE), hako-mikan's A1111 extension has none; use named
syntax (`DS*=0.5`, `SS*.expert=0`, `*.router=0`). Metadata: ai-toolkit's `ss_base_model_version` `hidream_i1`
(nothing else in the trainers' sources).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import (Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, TrainSpec,
                      deeper_block_reason, text_encoder_descriptions)
from ..text_encoders import CLIP_L, OPENCLIP_G, T5_XXL, TextEncoderSpec, register_encoder

LLAMA31_8B = register_encoder(TextEncoderSpec("Llama-3.1-8B", "llama", 4096, 32, 32, 14336, 32, kind="llm"))

BASE, IN, OUT = "BASE", "IN", "OUT"

ELEMENT_KINDS = (
    "img_attn", "txt_attn",        # attn1.to_q/k/v/out (image stream) vs to_q_t/k_t/v_t/out_t (text stream)
    "shared_expert", "expert", "router",   # ff_i: the shared expert, the routed experts, the MoE gate
    "txt_mlp",                     # ff_t (double blocks' text feed-forward)
    "mod",                         # per-block adaLN_modulation.1
    "norm",                        # RMSNorm weights (q_rms_norm / k_rms_norm)
    "x_embed", "t_embed", "p_embed", "caption",   # IN
    "final", "final_mod",          # OUT
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoders
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"img_attn", "txt_attn", "te_attn"}),
    "mlp": frozenset({"shared_expert", "expert", "txt_mlp", "te_mlp"}),
    "moe": frozenset({"shared_expert", "expert", "router"}),
    "modulation": frozenset({"mod", "final_mod"}),
    "img": frozenset({"img_attn", "shared_expert", "expert", "router"}),
    "txt": frozenset({"txt_attn", "txt_mlp"}),
    "embed": frozenset({"x_embed", "t_embed", "p_embed", "caption", "te_embed"}),
})
PREFIXES = ("transformer.", "base_model.model.", "transformer.base_model.model.")


@dataclass(frozen=True)
class HiDreamSpec:
    """Structure of a HiDream transformer: width h, double / single block counts, routed experts, the experts'
    and the text feed-forward's hidden widths, caption projections, adaLN rows."""

    hidden: int = 2560
    depth: int = 16
    depth_single: int = 32
    experts: int = 4
    captions: int = 49

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "HiDreamSpec":
        hidden = int(config.get("num_attention_heads", 20)) * int(config.get("attention_head_dim", 128))
        depth, single = int(config.get("num_layers", 16)), int(config.get("num_single_layers", 32))
        return cls(hidden=hidden, depth=depth, depth_single=single,
                   experts=int(config.get("num_routed_experts", 4)), captions=depth + single + 1)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[HiDreamSpec]:
    """HiDreamSpec of a ComfyUI / diffusers state dict without prefix (comfy.model_detection's mark:
    `caption_projection.0.linear.weight`, with the `double_stream_blocks.N.block` tree)."""
    keyset = set(keys)
    if "caption_projection.0.linear.weight" not in keyset or \
            not any(k.startswith("double_stream_blocks.") for k in keyset):
        return None
    shapes = shapes or {}
    hidden = int(shapes["x_embedder.proj.weight"][0]) if "x_embedder.proj.weight" in shapes else 2560
    return HiDreamSpec(hidden=hidden, depth=_count(keyset, r"double_stream_blocks\.(\d+)\."),
                       depth_single=_count(keyset, r"single_stream_blocks\.(\d+)\."),
                       experts=_count(keyset, r"double_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.")
                       or _count(keyset, r"single_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.") or 4,
                       captions=_count(keyset, r"caption_projection\.(\d+)\."))


def _ds(i: int) -> str:
    return f"DS{i:02d}"


def _ss(i: int) -> str:
    return f"SS{i:02d}"


class HiDreamFamily(Family):
    name = "hidream"
    title = "HiDream-I1"
    denoiser = "transformer"
    markers = (
        (r"(^|[._])(double_stream_blocks|single_stream_blocks)[._]\d+[._]block[._]", "HiDream (stream blocks)"),
        (r"(^|[._])ff_i[._](experts|shared_experts|gate)([._]|$)", "HiDream (MoE feed-forward)"),
        (r"(^|[._])caption_projection[._]\d+[._]linear", "HiDream (caption_projection)"),
    )
    metadata_match = ("hidream",)

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", CLIP_L, ("lora_te1_", "lora_te_"), "text_encoder."),
            "te2": ComponentSpec("te2", "TE2", OPENCLIP_G, ("lora_te2_", "lora_prior_te_"), "text_encoder_2."),
            # ComfyUI numbers T5 after the CLIPs present (lora_te2_ without CLIP-G, lora_te1_ alone)
            "te3": ComponentSpec("te3", "TE3", T5_XXL, ("lora_te3_", "lora_te2_", "lora_te1_"), "text_encoder_3."),
            "te4": ComponentSpec("te4", "TE4", LLAMA31_8B, (), "text_encoder_4."),
        }
        self.I1 = ArchSpec(
            name="HiDream-I1", title="HiDream-I1", family=self, config=HiDreamSpec(), components=components,
            aliases=("hidream", "hidream-i1", "hidream_i1", "hidream-i1-full", "hidream-i1-dev", "hidream-i1-fast"),
            layout_key="hidream",
            # ai-toolkit's string (the only one in the trainers' sources); modelspec's is LoRA Core's own
            metadata={"ss_base_model_version": "hidream_i1", "modelspec.architecture": "hidream-i1",
                      "modelspec.implementation": "https://github.com/HiDream-ai/HiDream-I1",
                      "ss_network_module": "networks.lora", "resolution": 1024, "short": "HiDream-I1",
                      "match": ("hidream_i1", "hidream-i1", "hidream")})
        self.variants = (self.I1,)

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes)
        if spec is None:
            return None
        if not shapes and config and config.get("image_model") == "hidream":
            spec = HiDreamSpec.from_comfy_config(config)
        return self.I1, spec

    def detect_diffusers(self, keys, shapes):
        spec = spec_from_keys(keys, shapes)   # diffusers' HiDreamImageTransformer2DModel has ComfyUI's names
        return (self.I1, spec) if spec is not None else None

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        return self.I1 if LLAMA31_8B.comfy_name in comfy_names else None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3", LLAMA31_8B.comfy_name: "te4"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: HiDreamSpec, variant=None) -> list[ModuleDef]:
        h = spec.hidden
        out = [ModuleDef("x_embedder.proj", IN, "x_embed", h),
               ModuleDef("t_embedder.timestep_embedder.linear_1", IN, "t_embed", h),
               ModuleDef("t_embedder.timestep_embedder.linear_2", IN, "t_embed", h),
               ModuleDef("p_embedder.pooled_embedder.linear_1", IN, "p_embed", h),
               ModuleDef("p_embedder.pooled_embedder.linear_2", IN, "p_embed", h)]
        out += [ModuleDef(f"caption_projection.{i}.linear", IN, "caption", h) for i in range(spec.captions)]

        def ffn(block, p, kind):
            return [ModuleDef(f"{p}.{w}", block, kind, h if w == "w2" else 0) for w in ("w1", "w2", "w3")]

        for group, count, name, mod_rows in (("double_stream_blocks", spec.depth, _ds, 12),
                                             ("single_stream_blocks", spec.depth_single, _ss, 6)):
            for i in range(count):
                b, p = name(i), f"{group}.{i}.block"
                out.append(ModuleDef(f"{p}.adaLN_modulation.1", b, "mod", mod_rows * h))
                streams = ("", "_t") if group == "double_stream_blocks" else ("",)
                for t in streams:
                    kind = "txt_attn" if t else "img_attn"
                    out += [ModuleDef(f"{p}.attn1.{x}{t}", b, kind, h) for x in ("to_q", "to_k", "to_v", "to_out")]
                    out += [ModuleDef(f"{p}.attn1.{x}{t}", b, "norm") for x in ("q_rms_norm", "k_rms_norm")]
                out += ffn(b, f"{p}.ff_i.shared_experts", "shared_expert")
                for e in range(spec.experts):
                    out += ffn(b, f"{p}.ff_i.experts.{e}", "expert")
                out.append(ModuleDef(f"{p}.ff_i.gate", b, "router", spec.experts))
                if group == "double_stream_blocks":
                    out += ffn(b, f"{p}.ff_t", "txt_mlp")
        out += [ModuleDef("final_layer.linear", OUT, "final"),
                ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", 2 * h)]
        return out

    def aliases(self, module: ModuleDef, spec: HiDreamSpec, variant=None) -> list[Alias]:
        path = module.path
        out = self.native_aliases(path, prefixes=PREFIXES)
        out.append(Alias("lora_transformer_" + path.replace(".", "_")))
        return out

    def diffusers_names(self, spec: HiDreamSpec) -> dict:
        return {m.path: (m.path,) for m in self.modules(spec)}

    def diffusers_host_pieces(self, spec: HiDreamSpec, variant=None) -> dict:
        return {f"{m.path}.{m.param}": (m.path, None, m.param) for m in self.modules(spec)}

    def denoiser_words(self):
        return ("double_stream_blocks", "single_stream_blocks", "x_embedder", "t_embedder", "p_embedder",
                "caption_projection", "final_layer")

    def lora_votes(self, modules, variant, key_map) -> int:
        """-1 for a file with no transformer, T5 or Llama module: text-encoder LoRAs of CLIP-L / CLIP-G alone fit
        SDXL (and SD3) as well, and are SDXL's far more often."""
        for name in modules:
            target = key_map.resolve(name)
            if target is not None and target.component not in ("te1", "te2"):
                return 0
        return -1

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, HiDreamSpec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        stacks = (("double_stream_blocks", spec.depth, "double stream"),
                  ("single_stream_blocks", spec.depth_single, "single stream"))
        reason = deeper_block_reason(name, rest, title, stacks, "HiDream-I1 has 16 and 32")
        if reason:
            return reason
        m = re.search(r"(?:^|[._])experts[._](\d+)[._]", rest)
        if m and int(m.group(1)) >= spec.experts:
            return (f"{name!r}: key for routed expert {m.group(1)}, but this {title} model has {spec.experts} "
                    f"experts per block")
        return (f"{name!r}: HiDream-style key that names no module of this {title} model; check the LoRA's base "
                "model (or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        full = variant.config
        te_blocks = tuple(c.block for c in variant.components.values() if c.is_text_encoder)
        doubles = tuple(_ds(i) for i in range(full.depth))
        singles = tuple(_ss(i) for i in range(full.depth_single))
        descriptions = {IN: "input embeddings (x_embedder, t_embedder, p_embedder, caption_projection)",
                        OUT: "final layer"}
        descriptions.update(text_encoder_descriptions(variant))
        for i, b in enumerate(doubles):
            descriptions[b] = (f"double stream block {i} (image and text attention, MoE image feed-forward, text "
                               "feed-forward)")
        for i, b in enumerate(singles):
            descriptions[b] = f"single stream block {i} (attention, MoE feed-forward)"
        layout = BlockLayout(
            key=variant.layout_key, blocks=te_blocks + (IN,) + doubles + singles + (OUT,), te_blocks=te_blocks,
            other_blocks=(IN, OUT), descriptions=descriptions, groups={BASE: te_blocks, "DS": doubles, "SS": singles},
            a1111={}, a1111_missing=0.0,
            # Inspire Pack gives double_stream_blocks / single_stream_blocks no slots: BASE is its one position
            inspire_groups=(), inspire_layouts={1: [BASE]}, inspire_preset_prefixes=(),
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> Optional[TrainSpec]:
        """HiDream-I1 as ai-toolkit and diffusion-pipe train it (LoRA on the transformer's stream blocks; no kohya /
        musubi HiDream-I1 trainer exists): the default trains the attention (image `attn1.to_q` / `to_k` / `to_v` /
        `to_out` and the double blocks' text `_t` projections) and feed-forward Linears - the MoE's shared expert
        and every routed expert (`ff_i.shared_experts` / `ff_i.experts.E` w1 / w2 / w3) and the text `ff_t` - of
        the double and single stream blocks; the router `ff_i.gate` is a bare weight, not a Linear. "all layers"
        adds the blocks' adaLN modulation, the embedders (x / t / p, the caption projections) and the final layer.
        Saved in ai-toolkit's / diffusion-pipe's names (`diffusion_model.<path>`, the ComfyUI names core reads; see
        `train_names`) with ai-toolkit's `hidream_i1` header. Flow matching at the model's own schedule (ComfyUI's
        HiDream model_sampling, a ModelSamplingDiscreteFlow; its shift is whatever the MODEL carries, e.g. a
        ModelSamplingSD3 node's); no guidance input. Text-encoder training (off by default, as in those trainers)
        trains the two CLIPs."""
        return TrainSpec(kinds=HIDREAM_TRAIN_KINDS, target_sets=HIDREAM_TARGET_SETS, conv_kinds=(),
                         text_encoders=("te1", "te2"), guidance_input=False,
                         timestep_sampling="logit-normal, model shift", resolution_shift=None,
                         block_lists=("double_stream_blocks", "single_stream_blocks"))

    def train_names(self, target, variant, config=None) -> Optional[tuple[tuple[str, int, int], ...]]:
        """ai-toolkit's / diffusion-pipe's names for a trained HiDream LoRA: `diffusion_model.<path>` (nothing is
        fused: one LoRA per module)."""
        return ((f"diffusion_model.{target.path}", 0, 0),)


# Training kinds -> element kinds (the router is not a Linear: no training kind has it).
HIDREAM_TRAIN_KINDS = {
    "attn": frozenset({"img_attn", "txt_attn"}),
    "mlp": frozenset({"shared_expert", "expert", "txt_mlp"}),
    "mod": frozenset({"mod"}),
    "embed": frozenset({"x_embed", "t_embed", "p_embed", "caption"}),
    "final": frozenset({"final", "final_mod"}),
}
# The trainers' default first (the node's default): the stream blocks' attention and feed-forward (MoE) Linears.
HIDREAM_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(HIDREAM_TRAIN_KINDS),
}


FAMILY = HiDreamFamily()
HIDREAM_I1 = FAMILY.I1
