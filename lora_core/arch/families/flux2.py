"""The Flux.2 family: Black Forest Labs' Flux.2 [dev] (ComfyUI 0.3.75 `supported_models.Flux2`; Klein came later
and is not loadable in this host).

Canonical names are ComfyUI's (BFL's) module names (comfy/ldm/flux/model.py and layers.py with Flux.2's switches
`global_modulation`, `mlp_silu_act`, no biases), which musubi-tuner, ai-toolkit and diffusion-pipe write too. The
tree differs from Flux.1 (families/flux.py) in three ways that matter for LoRAs: modulation is **shared** (three
global layers instead of one per block), every MLP is a **SiLU-gated** pair fused in one weight, and mlp_ratio is
3. With h = hidden (6144 = 48 heads x 128) and m = 3h (18432):

* `double_blocks.N` (8): `img_attn.qkv` (**fused q | k | v**, rows (0, h), (h, h), (2h, h)), `img_attn.proj`,
  `img_mlp.0` (**fused [gate | up]**, rows (0, m), (m, m): ComfyUI's SiLUActivation is `silu(first half) *
  second half`), `img_mlp.2` (reads m columns), RMSNorm scales `img_attn.norm.query_norm` / `key_norm`; the same
  for `txt_`. No `img_mod` / `txt_mod`.
* `single_blocks.N` (48): `linear1` (**fused q | k | v | gate | up**: rows (0, h), (h, h), (2h, h), (3h, m),
  (3h + m, m), 3h + 2m = 55296 rows; core 0.3.75's diffusers map slices its MLP as Flux.1's (3h, 4h), which is
  wrong here), `linear2` (reads **[attention h | MLP m] columns**), `norm.query_norm` / `key_norm`. No
  `modulation.lin`.
* shared modulation: `double_stream_modulation_img.lin` (6h), `double_stream_modulation_txt.lin` (6h),
  `single_stream_modulation.lin` (3h);
* top level: `img_in`, `txt_in` (from Mistral's 3 x 5120 = 15360 stacked hidden states), `time_in.{in,out}_layer`,
  `guidance_in.{in,out}_layer`, `final_layer.linear`, `final_layer.adaLN_modulation.1` ([shift | scale]).

Writers and their names (tests/flux2_writers.py cites each rule's source):

* ComfyUI native, ai-toolkit (BFL module names, `diffusion_model.` + PEFT lora_A / lora_B), diffusion-pipe:
  `diffusion_model.<path>`; BFL / bare: `<path>`; musubi-tuner (networks/lora_flux_2.py, `lora_unet`, the
  Linears of DoubleStreamBlock / SingleStreamBlock): `lora_unet_<path _>`; LyCORIS' own wrapper on the BFL model:
  `lycoris_<path _>`. Full diffs `<prefix><path>.diff`.
* diffusers / PEFT on `Flux2Transformer2DModel` (Flux2LoraLoaderMixin): `transformer.<diffusers path>` with
  Flux.2's own names: `transformer_blocks.N.attn.to_q` (rows of `img_attn.qkv`), `add_q_proj` (of `txt_attn.qkv`),
  `attn.to_out.0` / `to_add_out`, `ff.linear_in` / `ff.linear_out` (`img_mlp.0` / `.2`), `ff_context.*`,
  `single_transformer_blocks.N.attn.to_qkv_mlp_proj` (= `linear1`), `attn.to_out` (= `linear2`),
  `double_stream_modulation_img.linear` (= `.lin`), `time_guidance_embed.timestep_embedder.linear_1`,
  `x_embedder`, `context_embedder`, `norm_out.linear` ([scale | shift]: the halves swapped), `proj_out`; also
  bare (DiffSynth-Studio, with PEFT's `.default.` adapter name) and `base_model.model.`; OneTrainer-style
  `lora_transformer_<diffusers path _>`; SimpleTuner LyCORIS `lycoris_<diffusers path _>`.
* Flux.1-style diffusers names core 0.3.75 maps on Flux.2 through its Flux branch (`ff.net.0.proj`,
  `time_text_embed.*`, single-block `attn.to_q` / `proj_mlp` / `proj_out`): read with Flux.2's true rows
  (`proj_mlp` = linear1 rows (3h, 2m)).

Text encoder: Mistral-Small-3.x 24B (te1, ComfyUI's `mistral3_24b`: an LLM in `model.layers.N.self_attn.q_proj`
naming). ComfyUI maps it only as `text_encoders.mistral3_24b.transformer.<path>`; no trainer writes kohya names for
it, so it has no kohya prefix.

Blocks: `TE1`, `IN` (img_in, txt_in, time_in, guidance_in), `MOD` (the three shared modulation layers), `DB00`-
`DB07`, `SB00`-`SB47`, `OUT` (final_layer). Inspire Pack's loader gives double_blocks / single_blocks ordinal
slots (BASE + 8 + 48 = 57 values; its 58-value FLUX-* presets are Flux.1's and misalign here); hako-mikan's A1111
extension has no Flux.2 layout (named syntax: `DB00-DB07=0.5`, `SB*.linear1_mlp=0`, `MOD=0`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import (Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, TrainSpec,
                      deeper_block_reason, text_encoder_descriptions)
from ..text_encoders import TextEncoderSpec, register_encoder

MISTRAL3_24B = register_encoder(TextEncoderSpec("Mistral-Small-3.1-24B", "mistral3_24b", 5120, 40, 40, 32768, 32,
                                                kind="llm"))

BASE = "BASE"
IN, OUT, MOD = "IN", "OUT", "MOD"

ELEMENT_KINDS = (
    "img_attn", "txt_attn",        # double-block attention: qkv (q, k, v parts) and proj, per stream
    "img_mlp", "txt_mlp",          # double-block gated MLPs (mlp.0 gate | up parts, mlp.2)
    "img_mod", "txt_mod", "mod",   # the shared modulation layers (MOD): double img / txt, single
    "linear1_attn", "linear1_mlp",  # single-block linear1 rows: q|k|v, and the gated MLP input (gate | up)
    "linear2_attn", "linear2_mlp",  # single-block linear2 columns: attention output, MLP output
    "norm",                        # RMSNorm scales (query_norm / key_norm)
    "img_in", "txt_in", "time_in", "guidance_in",   # IN
    "final", "final_mod",          # OUT: final_layer.linear, final_layer.adaLN_modulation.1
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoder
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn", "te_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "linear1_mlp", "linear2_mlp", "te_mlp"}),
    "modulation": frozenset({"img_mod", "txt_mod", "mod", "final_mod"}),
    "img": frozenset({"img_attn", "img_mlp", "img_mod"}),
    "txt": frozenset({"txt_attn", "txt_mlp", "txt_mod"}),
    "linear1": frozenset({"linear1_attn", "linear1_mlp"}),
    "linear2": frozenset({"linear2_attn", "linear2_mlp"}),
    "embed": frozenset({"img_in", "txt_in", "time_in", "guidance_in", "te_embed"}),
})
_PREFIXES = r"(?:transformer\.|base_model\.model\.|diffusion_model\.|lora_transformer_|lycoris_|lora_unet_)?"
MODULATION = (("double_stream_modulation_img.lin", "img_mod", 6), ("double_stream_modulation_txt.lin", "txt_mod", 6),
              ("single_stream_modulation.lin", "mod", 3))


@dataclass(frozen=True)
class Flux2Spec:
    """Structure of a Flux.2 transformer in ComfyUI's `unet_config` terms (hidden_size, depth,
    depth_single_blocks, mlp_ratio 3, guidance_embed): `mlp_hidden` is m, the width of one MLP half."""

    hidden: int = 6144
    depth: int = 8
    depth_single: int = 48
    mlp_hidden: int = 18432
    guidance: bool = True

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "Flux2Spec":
        hidden = int(config.get("hidden_size", 6144))
        return cls(hidden=hidden, depth=int(config.get("depth", 8)),
                   depth_single=int(config.get("depth_single_blocks", 48)),
                   mlp_hidden=int(hidden * float(config.get("mlp_ratio", 3.0))),
                   guidance=bool(config.get("guidance_embed", True)))


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[Flux2Spec]:
    """Flux2Spec of a ComfyUI / BFL state dict given without prefix; comfy.model_detection's marks: Flux's
    `double_blocks.0.img_attn.norm.key_norm.scale` and `img_in`, plus `double_stream_modulation_img.lin`."""
    keyset = set(keys)
    if "double_blocks.0.img_attn.norm.key_norm.scale" not in keyset or "img_in.weight" not in keyset \
            or "double_stream_modulation_img.lin.weight" not in keyset:
        return None
    shapes = shapes or {}
    hidden = int(shapes["img_in.weight"][0]) if "img_in.weight" in shapes else 6144
    mlp = int(shapes["double_blocks.0.img_mlp.2.weight"][1]) if "double_blocks.0.img_mlp.2.weight" in shapes \
        else 3 * hidden
    return Flux2Spec(hidden=hidden, depth=_count(keyset, r"double_blocks\.(\d+)\."),
                     depth_single=_count(keyset, r"single_blocks\.(\d+)\."), mlp_hidden=mlp,
                     guidance="guidance_in.in_layer.weight" in keyset)


def _db(i: int) -> str:
    return f"DB{i:02d}"


def _sb(i: int) -> str:
    return f"SB{i:02d}"


class Flux2Family(Family):
    name = "flux2"
    title = "Flux.2 [dev]"
    denoiser = "transformer"
    # Names only Flux.2 uses (its double_blocks / single_blocks / transformer_blocks are Flux.1's too).
    markers = (
        (r"(^|[._])(double_stream_modulation_(img|txt)|single_stream_modulation)[._]", "Flux.2 (shared modulation)"),
        (r"(^|[._])to_qkv_mlp_proj([._]|$)", "Flux.2 (to_qkv_mlp_proj)"),
        (r"(^|[._])(ff|ff_context)[._]linear_(in|out)([._]|$)", "Flux.2 (ff.linear_in / linear_out)"),
        (r"(^|[._])time_guidance_embed[._]", "Flux.2 (time_guidance_embed)"),
    )
    # Flux.1's marks (double_blocks / single_blocks ...) are names of this family too: on a Flux.2 model they tell
    # nothing (explain.py skips them; this family's own `explain` says what an unmatched one means)
    shares_names_with = ("flux",)
    # musubi-tuner (architectures.py) / ai-toolkit strings that name Flux.2 ([dev] is the only one this host loads)
    metadata_match = ("flux_2", "flux.2", "flux2", "flux-2")

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", MISTRAL3_24B, (), "text_encoder."),
        }
        self.DEV = ArchSpec(
            name="Flux.2-dev", title="Flux.2 [dev]", family=self, config=Flux2Spec(), components=components,
            aliases=("flux2", "flux.2", "flux-2", "flux2-dev", "flux.2-dev", "flux_2_dev", "flux2_dev"),
            layout_key="flux2",
            # musubi-tuner's strings (architectures.py, sai_model_spec.py); ai-toolkit writes `flux2`
            metadata={"ss_base_model_version": "flux_2_dev", "modelspec.architecture": "Flux.2-dev",
                      "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
                      "ss_network_module": "networks.lora_flux_2", "resolution": 1024, "short": "Flux.2",
                      "match": ("flux.2-dev", "flux_2_dev", "flux2_dev", "flux2-dev", "flux-2-dev", "flux2",
                                "flux.2", "flux_2")})
        self.variants = (self.DEV,)

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes)
        if spec is None:
            return None
        if config and config.get("hidden_size") and config.get("image_model") == "flux2":
            spec = Flux2Spec.from_comfy_config(config)
        return self.DEV, spec

    def detect_diffusers(self, keys, shapes):
        keyset = set(keys)
        if "double_stream_modulation_img.linear.weight" not in keyset or "x_embedder.weight" not in keyset:
            return None
        shapes = shapes or {}
        hidden = int(shapes["x_embedder.weight"][0]) if "x_embedder.weight" in shapes else 6144
        key = "transformer_blocks.0.ff.linear_out.weight"
        spec = Flux2Spec(hidden=hidden, depth=_count(keyset, r"transformer_blocks\.(\d+)\."),
                         depth_single=_count(keyset, r"single_transformer_blocks\.(\d+)\."),
                         mlp_hidden=int(shapes[key][1]) if key in shapes else 3 * hidden,
                         guidance="time_guidance_embed.guidance_embedder.linear_1.weight" in keyset)
        return self.DEV, spec

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        return self.DEV if comfy_names == {MISTRAL3_24B.comfy_name} else None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {MISTRAL3_24B.comfy_name: "te1"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: Flux2Spec, variant=None) -> list[ModuleDef]:
        h, m = spec.hidden, spec.mlp_hidden
        out: list[ModuleDef] = [ModuleDef("img_in", IN, "img_in", h), ModuleDef("txt_in", IN, "txt_in", h),
                                ModuleDef("time_in.in_layer", IN, "time_in", h),
                                ModuleDef("time_in.out_layer", IN, "time_in", h)]
        if spec.guidance:
            out += [ModuleDef("guidance_in.in_layer", IN, "guidance_in", h),
                    ModuleDef("guidance_in.out_layer", IN, "guidance_in", h)]
        out += [ModuleDef(path, MOD, kind, n * h) for path, kind, n in MODULATION]
        qkv = lambda kind: (Part("q", 0, h, kind), Part("k", h, h, kind), Part("v", 2 * h, h, kind))  # noqa: E731
        for i in range(spec.depth):
            b, p = _db(i), f"double_blocks.{i}"
            for stream in ("img", "txt"):
                kind = f"{stream}_mlp"
                out += [ModuleDef(f"{p}.{stream}_attn.qkv", b, f"{stream}_attn", 3 * h, qkv(f"{stream}_attn")),
                        ModuleDef(f"{p}.{stream}_attn.proj", b, f"{stream}_attn", h),
                        ModuleDef(f"{p}.{stream}_attn.norm.query_norm", b, "norm", param="scale"),
                        ModuleDef(f"{p}.{stream}_attn.norm.key_norm", b, "norm", param="scale"),
                        ModuleDef(f"{p}.{stream}_mlp.0", b, kind, 2 * m, (Part("gate", 0, m, kind),
                                                                          Part("up", m, m, kind))),
                        ModuleDef(f"{p}.{stream}_mlp.2", b, kind, h)]
        for i in range(spec.depth_single):
            b, p = _sb(i), f"single_blocks.{i}"
            out += [ModuleDef(f"{p}.linear1", b, "linear1_attn", 3 * h + 2 * m,
                              qkv("linear1_attn") + (Part("gate", 3 * h, m, "linear1_mlp"),
                                                     Part("up", 3 * h + m, m, "linear1_mlp"))),
                    ModuleDef(f"{p}.linear2", b, "linear2_attn", h, (),
                              (Part("attn", 0, h, "linear2_attn"), Part("mlp", h, m, "linear2_mlp"))),
                    ModuleDef(f"{p}.norm.query_norm", b, "norm", param="scale"),
                    ModuleDef(f"{p}.norm.key_norm", b, "norm", param="scale")]
        out += [ModuleDef("final_layer.linear", OUT, "final"),
                ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", 2 * h)]
        return out

    def _tables(self, spec: Flux2Spec) -> tuple[dict, dict]:
        """(Flux2Transformer2DModel's names, other diffusers-style names core 0.3.75 maps through its Flux.1 branch):
        canonical path -> [(diffusers path, pieces or None, alias rows)]."""
        cached = getattr(self, "_dif_cache", None)
        if cached is not None and cached[0] == spec:
            return cached[1], cached[2]
        h, m = spec.hidden, spec.mlp_hidden
        own: dict[str, list] = {}
        legacy: dict[str, list] = {}

        def add(table, canonical, diffusers, pieces=None, rows=0):
            table.setdefault(canonical, []).append((diffusers, pieces, rows))

        add(own, "img_in", "x_embedder")
        add(own, "txt_in", "context_embedder")
        for canonical, sub in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
            for layer, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
                add(own, f"{canonical}.{layer}", f"time_guidance_embed.{sub}.{linear}")
                add(legacy, f"{canonical}.{layer}", f"time_text_embed.{sub}.{linear}")
        for path, _, _ in MODULATION:
            add(own, path, path[:-len(".lin")] + ".linear")
        add(own, "final_layer.linear", "proj_out")
        # diffusers' AdaLayerNormContinuous holds [scale | shift]; BFL's final modulation [shift | scale]
        add(own, "final_layer.adaLN_modulation.1", "norm_out.linear", ((0, h, h), (h, 0, h)), 2 * h)
        for i in range(spec.depth):
            c, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
            for j, x in enumerate("qkv"):
                add(own, f"{c}.img_attn.qkv", f"{d}.attn.to_{x}", ((j * h, 0, h),), h)
                add(own, f"{c}.txt_attn.qkv", f"{d}.attn.add_{x}_proj", ((j * h, 0, h),), h)
            for canonical, diffusers in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                         ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
                                         ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out"),
                                         ("img_attn.norm.query_norm", "attn.norm_q"),
                                         ("img_attn.norm.key_norm", "attn.norm_k"),
                                         ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                                         ("txt_attn.norm.key_norm", "attn.norm_added_k")):
                add(own, f"{c}.{canonical}", f"{d}.{diffusers}")
            for canonical, diffusers in (("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
                add(legacy, f"{c}.{canonical}", f"{d}.{diffusers}")
        for i in range(spec.depth_single):
            c, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            add(own, f"{c}.linear1", f"{d}.attn.to_qkv_mlp_proj")
            add(own, f"{c}.linear2", f"{d}.attn.to_out")
            add(own, f"{c}.norm.query_norm", f"{d}.attn.norm_q")
            add(own, f"{c}.norm.key_norm", f"{d}.attn.norm_k")
            for j, x in enumerate("qkv"):
                add(legacy, f"{c}.linear1", f"{d}.attn.to_{x}", ((j * h, 0, h),), h)
            # Flux.1's split name for the MLP input, with Flux.2's true rows: gate | up, 2m rows after q|k|v
            add(legacy, f"{c}.linear1", f"{d}.proj_mlp", ((3 * h, 0, 2 * m),), 2 * m)
            add(legacy, f"{c}.linear2", f"{d}.proj_out")
        self._dif_cache = (spec, own, legacy)
        return own, legacy

    def aliases(self, module: ModuleDef, spec: Flux2Spec, variant=None) -> list[Alias]:
        path, h = module.path, spec.hidden
        out = self.native_aliases(path)
        own, legacy = self._tables(spec)
        for table in (own, legacy):
            for diffusers, pieces, rows in table.get(path, ()):
                out += self.diffusers_aliases(diffusers, pieces, rows)
        if re.fullmatch(r"single_blocks\.\d+\.linear1", path):   # ComfyUI's own alias of the q|k|v rows
            for prefix in ("", "diffusion_model."):
                out.append(Alias(f"{prefix}{path}_qkv", ((0, 0, 3 * h),), 3 * h))
        return out

    def diffusers_names(self, spec: Flux2Spec) -> dict:
        own, _ = self._tables(spec)
        return {path: tuple(name for name, _, _ in entries) for path, entries in own.items()}

    def diffusers_host_pieces(self, spec: Flux2Spec, variant=None) -> dict:
        """diffusers key -> (canonical path, ((canonical start, host start, length), ...) or None, param)."""
        own, _ = self._tables(spec)
        out = {}
        for canonical, entries in own.items():
            param = "scale" if canonical.endswith("_norm") else "weight"
            for diffusers, pieces, _rows in entries:
                out[f"{diffusers}.weight"] = (canonical, tuple(pieces) if pieces is not None else None, param)
        return out

    def lora_votes(self, modules, variant, key_map) -> int:
        """Flux.2 vs Flux.1 (they share block names): +1 per MLP module whose shape has Flux.2's ratios (a gated
        `img_mlp.0` of 6 x its input, a `linear1` of 9 x, an `img_mlp.2` reading 3 x its output), -1 per one with
        Flux.1's (4 x, 7 x, 4 x); size-free, so it holds for pruned and tiny files alike."""
        from ... import adapters

        votes = 0
        for name, module in modules.items():
            target = key_map.resolve(name)
            if target is None or target.pieces is not None and len(target.pieces) != 1:
                continue
            if module.algo not in ("lora", "loha", "lokr", "full"):
                continue
            try:
                rows, cols = tuple(adapters.natural_shape(module))[:2]
            except Exception:
                continue
            path = target.path
            if re.search(r"_mlp\.0$", path):
                votes += 1 if rows == 6 * cols else -1 if rows == 4 * cols else 0
            elif re.search(r"_mlp\.2$", path):
                votes += 1 if cols == 3 * rows else -1 if cols == 4 * rows else 0
            elif path.endswith(".linear1") and rows != 3 * cols:
                votes += 1 if rows == 9 * cols else -1 if rows == 7 * cols else 0
        return votes

    def denoiser_words(self):
        return ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "guidance_in", "final_layer",
                "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
                "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                "time_guidance_embed", "time_text_embed", "norm_out", "proj_out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, Flux2Spec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        stacks = (("double_blocks|transformer_blocks", spec.depth, "double"),
                  ("single_blocks|single_transformer_blocks", spec.depth_single, "single"))
        reason = deeper_block_reason(name, rest, title, stacks,
                                     "Flux.2 [dev] has 8 double and 48 single blocks, Flux.1 19 and 38")
        if reason:
            return reason
        if re.search(r"(img_mod|txt_mod|modulation[._]lin|norm1[._]linear|norm1_context|norm[._]linear)", rest) \
                and not re.search(r"stream_modulation", rest):
            return (f"{name!r}: per-block modulation key, but {title} has no per-block modulation (its modulation "
                    f"is shared: double_stream_modulation_img / _txt, single_stream_modulation): this LoRA was made "
                    f"for Flux.1")
        if re.search(r"vector_in|text_embedder", rest):
            return (f"{name!r}: pooled-text (vector_in) key, but {title} has no pooled text input: this LoRA was "
                    f"made for Flux.1")
        if re.search(r"guidance_(in|embedder)", rest) and not spec.guidance:
            return f"{name!r}: guidance-embedding key, but this {title} model has no guidance input"
        return (f"{name!r}: Flux.2-style key that names no module of this {title} model; check the LoRA's base "
                "model (or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        full = variant.config
        doubles = tuple(_db(i) for i in range(full.depth))
        singles = tuple(_sb(i) for i in range(full.depth_single))
        descriptions = {"TE1": f"text encoder 1 ({MISTRAL3_24B.family})",
                        IN: "input embeddings (img_in, txt_in, time_in, guidance_in)",
                        MOD: "shared modulation (double_stream_modulation_img / _txt, single_stream_modulation)",
                        OUT: "final layer"}
        for i, b in enumerate(doubles):
            descriptions[b] = f"double block {i} (image and text streams, joint attention, gated MLPs)"
        for i, b in enumerate(singles):
            descriptions[b] = f"single block {i} (one stream: linear1 q|k|v|gate|up, linear2)"
        layout = BlockLayout(
            key=variant.layout_key, blocks=("TE1", IN, MOD) + doubles + singles + (OUT,), te_blocks=("TE1",),
            other_blocks=(IN, MOD, OUT), descriptions=descriptions,
            groups={BASE: ("TE1",), "DB": doubles, "SB": singles},
            a1111={}, a1111_missing=0.0,   # hako-mikan's extension has no Flux.2 layout
            # Inspire's loader gives double_blocks / single_blocks ordinal slots, as on Flux.1 (its own code does
            # not know the family); everything else (TE, IN, MOD, OUT) is its BASE
            inspire_groups=(("double", r"DB(\d\d)"), ("single", r"SB(\d\d)")),
            inspire_layouts={1 + len(doubles) + len(singles): [BASE] + list(doubles) + list(singles)},
            inspire_preset_prefixes=(),   # its FLUX-* presets are Flux.1's 58 / 20 values: they misalign here
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> Optional[TrainSpec]:
        """musubi-tuner's Flux.2 training (`networks/lora_flux_2.py`: FLUX_2_TARGET_REPLACE_MODULES = DoubleStreamBlock
        + SingleStreamBlock, default exclude `img_mod.lin|txt_mod.lin|modulation.lin` and `norm`): every Linear of
        the blocks (fused `img_attn.qkv` / `txt_attn.qkv` whole, `proj`, the fused gated `img_mlp.0` and `img_mlp.2`,
        single-block `linear1` / `linear2`); Flux.2's modulation is shared, outside the blocks, so the default never
        has it. Named `lora_unet_<path _>` (BFL / ComfyUI names, read by core). The distilled guidance input gets
        the node's `guidance`; flow matching at the model's own schedule (ComfyUI's ModelSamplingFlux for Flux.2)."""
        guidance = bool(getattr(config, "guidance", True)) if config is not None else True
        return TrainSpec(kinds=FLUX2_TRAIN_KINDS, target_sets=FLUX2_TARGET_SETS, conv_kinds=(), text_encoders=("te1",),
                         guidance_input=guidance, timestep_sampling="logit-normal, model shift",
                         resolution_shift=None, block_lists=("double_blocks", "single_blocks"))


# Training kinds -> element kinds.
FLUX2_TRAIN_KINDS = {
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "linear1_mlp", "linear2_mlp"}),
    "mod": frozenset({"img_mod", "txt_mod", "mod"}),
    "embed": frozenset({"img_in", "txt_in", "time_in", "guidance_in"}),
    "final": frozenset({"final", "final_mod"}),
}
# musubi's default first (the node's default): every Linear of the double and single blocks.
FLUX2_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(FLUX2_TRAIN_KINDS),
}


FAMILY = Flux2Family()
FLUX2_DEV = FAMILY.DEV
