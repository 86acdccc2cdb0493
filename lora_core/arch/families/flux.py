"""The Flux.1 family: Flux.1 dev, schnell, Kontext and Fill, and Chroma (Flux's architecture without per-block
modulation, driven by a distilled guidance network).

Canonical names are ComfyUI's (Black Forest Labs') module names, which kohya sd-scripts and musubi-tuner write
too (`lora_unet_double_blocks_0_img_attn_qkv`). The tree (comfy/ldm/flux/model.py, layers.py):

* `double_blocks.N` (19): `img_mod.lin` (6h), `img_attn.qkv` (**fused q | k | v**, 3h), `img_attn.proj`,
  `img_mlp.0` (mlp), `img_mlp.2`, the same five for `txt_`, and RMSNorm scales `img_attn.norm.query_norm` /
  `key_norm` (and `txt_`);
* `single_blocks.N` (38): `linear1` (**fused q | k | v | mlp-in**, 3h + mlp rows), `linear2` (reads
  **[attention h | mlp] columns**), `modulation.lin` (3h), `norm.query_norm` / `key_norm`;
* top level: `img_in`, `txt_in`, `time_in.{in,out}_layer`, `vector_in.*`, `guidance_in.*` (dev), and
  `final_layer.linear`, `final_layer.adaLN_modulation.1` ([shift | scale]).

Chroma has the same double/single blocks without `img_mod` / `txt_mod` / `modulation`, no `time_in` /
`vector_in` / `guidance_in`, a `final_layer` without adaLN, and `distilled_guidance_layer` (in_proj, layers.N.
in_layer / out_layer, norms.N, out_proj).

Writers and their names (tests/lora_writers.py cites each rule's source):

* ComfyUI native, ai-toolkit Chroma, diffusion-pipe Chroma: `diffusion_model.<path>`; BFL / bare: `<path>`;
  kohya sd-scripts (networks/lora_flux.py, prefix `lora_unet`) and musubi-tuner: `lora_unet_<path _>`;
  LyCORIS inside kohya: `lora_unet_...`, LyCORIS' own wrapper on the BFL model: `lycoris_<path _>`.
* diffusers / PEFT / ai-toolkit / SimpleTuner / diffusion-pipe Flux: `transformer.<diffusers path>`
  (`transformer_blocks.N.attn.to_q` = rows (0, h) of `double_blocks.N.img_attn.qkv`, ...), also bare and
  `base_model.model.`; OneTrainer `lora_transformer_<diffusers path _>`; SimpleTuner LyCORIS
  `lycoris_<diffusers path _>`.
* XLabs x-flux (src/flux/modules/layers.py): `double_blocks.N.processor.qkv_lora1` (img qkv), `qkv_lora2`
  (txt qkv), `proj_lora1` / `proj_lora2`; `single_blocks.N.processor.qkv_lora` = rows (0, 3h) of `linear1`,
  `proj_lora` = `linear2`. Partial files (some blocks only) load too (core converts only complete ones).
  ComfyUI's own alias for the XLabs single-block form: `diffusion_model.single_blocks.N.linear1_qkv`.

Text encoders: Flux.1 = CLIP-L (te1, kohya `lora_te1_`) + T5-XXL (te2; kohya writes `lora_te3_`, OneTrainer
`lora_te2_`); Chroma = T5-XXL alone (te1; ComfyUI maps `lora_te1_`, kohya would write `lora_te3_`).

Blocks: `IN` (img_in, txt_in, time_in, vector_in, guidance_in), `DB00`-`DB18`, `SB00`-`SB37`, `OUT`
(final_layer), Chroma's `MOD` (distilled_guidance_layer), `TE1`/`TE2`. Inspire Pack's layout: 58 values,
BASE + 19 double + 38 single, ordinal over the blocks a file has; hako-mikan's (A1111/Forge): 61 values,
CLIP, T5, IN, D00-D18, S00-S37, OUT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import (Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, TrainSpec,
                      deeper_block_reason, text_encoder_descriptions)
from ..text_encoders import CLIP_L, T5_XXL

BASE = "BASE"
IN, OUT, MOD = "IN", "OUT", "MOD"

ELEMENT_KINDS = (
    "img_attn", "txt_attn",        # double-block attention: qkv (q, k, v parts) and proj, per stream
    "img_mlp", "txt_mlp",          # double-block MLPs
    "img_mod", "txt_mod",          # double-block modulation (Flux; absent in Chroma)
    "linear1_attn", "linear1_mlp",  # single-block linear1 rows: q|k|v, and the MLP input
    "linear2_attn", "linear2_mlp",  # single-block linear2 columns: attention output, MLP output
    "mod",                         # single-block modulation.lin
    "norm",                        # RMSNorm scales (query_norm / key_norm)
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in",   # IN
    "final", "final_mod",          # OUT: final_layer.linear, final_layer.adaLN_modulation.1
    "approximator",                # Chroma's distilled_guidance_layer (MOD)
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoders
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn", "te_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp", "linear1_mlp", "linear2_mlp", "te_mlp"}),
    "modulation": frozenset({"img_mod", "txt_mod", "mod", "final_mod", "approximator"}),
    "img": frozenset({"img_attn", "img_mlp", "img_mod"}),
    "txt": frozenset({"txt_attn", "txt_mlp", "txt_mod"}),
    "linear1": frozenset({"linear1_attn", "linear1_mlp"}),
    "linear2": frozenset({"linear2_attn", "linear2_mlp"}),
    "embed": frozenset({"img_in", "txt_in", "time_in", "vector_in", "guidance_in", "te_embed"}),
})


@dataclass(frozen=True)
class FluxSpec:
    """Structure of a Flux-family transformer, in the terms of ComfyUI's `unet_config` (hidden_size, depth,
    depth_single_blocks, mlp_ratio) plus which optional modules exist."""

    hidden: int = 3072
    depth: int = 19
    depth_single: int = 38
    mlp_hidden: int = 12288
    modulation: bool = True          # per-block img_mod / txt_mod / modulation.lin (Flux.1; not Chroma)
    guidance: bool = True            # guidance_in (dev, Kontext, Fill; not schnell)
    vector_in: bool = True           # vector_in (Flux.1; not Chroma)
    approximator_layers: int = 0     # Chroma's distilled_guidance_layer depth (0: none)

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "FluxSpec":
        hidden = int(config.get("hidden_size", 3072))
        chroma = str(config.get("image_model", "")).startswith("chroma")
        return cls(hidden=hidden, depth=int(config.get("depth", 19)),
                   depth_single=int(config.get("depth_single_blocks", 38)),
                   mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
                   modulation=not chroma, guidance=bool(config.get("guidance_embed", False)) and not chroma,
                   vector_in=not chroma and config.get("vec_in_dim", 768) is not None,
                   approximator_layers=int(config.get("n_layers", 5)) if chroma else 0)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[FluxSpec]:
    """FluxSpec of a ComfyUI/BFL state dict given without prefix (`double_blocks.0.img_attn.qkv.weight`)."""
    keyset = set(keys)
    if "double_blocks.0.img_attn.norm.key_norm.scale" not in keyset:
        return None
    if "double_stream_modulation_img.lin.weight" in keyset:
        return None   # Flux.2: its own family
    chroma = any(k.startswith("distilled_guidance_layer.") for k in keyset)
    if not chroma and "img_in.weight" not in keyset:
        return None
    shapes = shapes or {}
    hidden = 0
    for key in ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.proj.weight"):
        if key in shapes:
            hidden = int(shapes[key][0])
            break
    mlp = int(shapes["double_blocks.0.img_mlp.0.weight"][0]) if "double_blocks.0.img_mlp.0.weight" in shapes \
        else 4 * hidden
    return FluxSpec(hidden=hidden, depth=_count(keyset, r"double_blocks\.(\d+)\."),
                    depth_single=_count(keyset, r"single_blocks\.(\d+)\."), mlp_hidden=mlp,
                    modulation="double_blocks.0.img_mod.lin.weight" in keyset,
                    guidance="guidance_in.in_layer.weight" in keyset,
                    vector_in="vector_in.in_layer.weight" in keyset,
                    approximator_layers=_count(keyset, r"distilled_guidance_layer\.layers\.(\d+)\.") if chroma else 0)


def _db(i: int) -> str:
    return f"DB{i:02d}"


def _sb(i: int) -> str:
    return f"SB{i:02d}"


class FluxFamily(Family):
    name = "flux"
    title = "Flux.1 (dev, schnell, Kontext, Fill) and Chroma"
    denoiser = "transformer"
    markers = (
        (r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+[._]", "Flux.1 / Chroma"),
        (r"(^|[._])distilled_guidance_layer[._]", "Chroma"),
    )

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        flux_components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", CLIP_L, ("lora_te1_", "lora_te_"), "text_encoder."),
            "te2": ComponentSpec("te2", "TE2", T5_XXL, ("lora_te3_", "lora_te2_"), "text_encoder_2."),
        }
        chroma_components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", T5_XXL, ("lora_te1_", "lora_te3_"), "text_encoder."),
        }
        bfl = "https://github.com/black-forest-labs/flux"

        def flux(name, title, aliases, config, meta):
            return ArchSpec(name=name, title=title, family=self, config=config, components=flux_components,
                            aliases=aliases, layout_key="flux",
                            metadata={"modelspec.implementation": bfl, "ss_network_module": "networks.lora_flux",
                                      "resolution": 1024, "ss_model_type": "flux", **meta})

        self.DEV = flux("Flux.1-dev", "Flux.1 [dev]", ("flux", "flux1", "flux.1", "flux-dev", "flux1-dev"),
                        FluxSpec(), {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev", "short": "Flux.1",
                                     "match": ("flux-1-dev", "flux.1-dev", "flux1", "flux.1", "flux_1", "flux-1",
                                               "flux")})
        self.SCHNELL = flux("Flux.1-schnell", "Flux.1 [schnell]", ("flux-schnell", "schnell", "flux1-schnell"),
                            FluxSpec(guidance=False),
                            {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell", "short": "Flux.1 schnell",
                             "match": ("flux-1-schnell", "flux.1-schnell", "flux_schnell", "flux1_schnell")})
        self.KONTEXT = flux("Flux.1-Kontext", "Flux.1 Kontext [dev]", ("kontext", "flux-kontext", "flux.1-kontext"),
                            FluxSpec(), {"ss_base_model_version": "flux_kontext", "short": "Flux.1 Kontext",
                                         "modelspec.architecture": "flux-1-kontext-dev",
                                         "match": ("flux_kontext", "flux.1_kontext", "flux-1-kontext", "flux.1-kontext",
                                                   "flux1-kontext", "kontext")})
        self.FILL = flux("Flux.1-Fill", "Flux.1 Fill [dev]", ("flux-fill", "fill", "flux.1-fill"), FluxSpec(),
                         {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-fill-dev", "short": "Flux.1 Fill",
                          "match": ("flux-1-fill", "flux.1-fill", "flux_fill", "flux1-fill")})
        self.CHROMA = ArchSpec(
            name="Chroma", title="Chroma (Flux.1-schnell based)", family=self,
            config=FluxSpec(modulation=False, guidance=False, vector_in=False, approximator_layers=5),
            components=chroma_components, aliases=("chroma",), layout_key="chroma",
            metadata={"ss_base_model_version": "chroma", "modelspec.architecture": "chroma", "short": "Chroma",
                      "modelspec.implementation": "https://huggingface.co/lodestones/Chroma",
                      "ss_network_module": "networks.lora_flux", "resolution": 1024, "ss_model_type": "chroma",
                      "match": ("chroma",)})
        self.variants = (self.DEV, self.SCHNELL, self.KONTEXT, self.FILL, self.CHROMA)

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes)
        if spec is None:
            return None
        if config and config.get("hidden_size"):
            spec = FluxSpec.from_comfy_config(config)
        if spec.hidden == 0:
            spec = FluxSpec(**{**spec.__dict__, "hidden": 3072, "mlp_hidden": 12288})
        name = config_name.lower()
        if spec.approximator_layers or name.startswith("chroma"):
            return self.CHROMA, spec
        if "inpaint" in name or "fill" in name:
            return self.FILL, spec
        img_in = (shapes or {}).get("img_in.weight")
        if img_in is not None and int(img_in[1]) == 384:   # 96 channels x 2 x 2: Fill's masked-image input
            return self.FILL, spec
        if "schnell" in name or not spec.guidance:
            return self.SCHNELL, spec
        return self.DEV, spec

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        if comfy_names == {"clip_l", "t5xxl"}:
            return self.DEV
        if comfy_names == {"t5xxl"}:
            return self.CHROMA
        return None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        if variant is self.CHROMA or comfy_names == {"t5xxl"}:
            return {"t5xxl": "te1"}
        return {"clip_l": "te1", "t5xxl": "te2"}

    def detect_diffusers(self, keys, shapes):
        keyset = set(keys)
        if "x_embedder.weight" not in keyset or not any(k.startswith("single_transformer_blocks.") for k in keyset):
            return None
        if "double_stream_modulation_img.linear.weight" in keyset:
            return None   # diffusers' Flux2Transformer2DModel: its own family
        shapes = shapes or {}
        hidden = int(shapes["x_embedder.weight"][0]) if "x_embedder.weight" in shapes else 3072
        mlp = int(shapes["single_transformer_blocks.0.proj_mlp.weight"][0]) \
            if "single_transformer_blocks.0.proj_mlp.weight" in shapes else 4 * hidden
        chroma = any(k.startswith("distilled_guidance_layer.") for k in keyset)
        spec = FluxSpec(hidden=hidden, depth=_count(keyset, r"transformer_blocks\.(\d+)\."),
                        depth_single=_count(keyset, r"single_transformer_blocks\.(\d+)\."), mlp_hidden=mlp,
                        modulation="transformer_blocks.0.norm1.linear.weight" in keyset,
                        guidance="time_text_embed.guidance_embedder.linear_1.weight" in keyset,
                        vector_in="time_text_embed.text_embedder.linear_1.weight" in keyset,
                        approximator_layers=_count(keyset, r"distilled_guidance_layer\.layers\.(\d+)\.") if chroma
                        else 0)
        return (self.CHROMA if chroma else self.DEV if spec.guidance else self.SCHNELL), spec

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: FluxSpec, variant=None) -> list[ModuleDef]:
        h, m = spec.hidden, spec.mlp_hidden
        out: list[ModuleDef] = [ModuleDef("img_in", IN, "img_in", h)]
        if not spec.approximator_layers:   # Chroma feeds timesteps through its distilled guidance layer
            out += [ModuleDef("time_in.in_layer", IN, "time_in", h), ModuleDef("time_in.out_layer", IN, "time_in", h)]
        if spec.vector_in:
            out += [ModuleDef("vector_in.in_layer", IN, "vector_in", h), ModuleDef("vector_in.out_layer", IN,
                                                                                   "vector_in", h)]
        if spec.guidance:
            out += [ModuleDef("guidance_in.in_layer", IN, "guidance_in", h),
                    ModuleDef("guidance_in.out_layer", IN, "guidance_in", h)]
        out.append(ModuleDef("txt_in", IN, "txt_in", h))
        if spec.approximator_layers:
            out.append(ModuleDef("distilled_guidance_layer.in_proj", MOD, "approximator"))
            for i in range(spec.approximator_layers):
                out += [ModuleDef(f"distilled_guidance_layer.layers.{i}.in_layer", MOD, "approximator"),
                        ModuleDef(f"distilled_guidance_layer.layers.{i}.out_layer", MOD, "approximator"),
                        ModuleDef(f"distilled_guidance_layer.norms.{i}", MOD, "norm", param="scale")]
            out.append(ModuleDef("distilled_guidance_layer.out_proj", MOD, "approximator"))
        qkv = lambda kind: (Part("q", 0, h, kind), Part("k", h, h, kind), Part("v", 2 * h, h, kind))  # noqa: E731
        for i in range(spec.depth):
            b, p = _db(i), f"double_blocks.{i}"
            for stream in ("img", "txt"):
                if spec.modulation:
                    out.append(ModuleDef(f"{p}.{stream}_mod.lin", b, f"{stream}_mod", 6 * h))
                out += [ModuleDef(f"{p}.{stream}_attn.qkv", b, f"{stream}_attn", 3 * h, qkv(f"{stream}_attn")),
                        ModuleDef(f"{p}.{stream}_attn.proj", b, f"{stream}_attn", h),
                        ModuleDef(f"{p}.{stream}_attn.norm.query_norm", b, "norm", param="scale"),
                        ModuleDef(f"{p}.{stream}_attn.norm.key_norm", b, "norm", param="scale"),
                        ModuleDef(f"{p}.{stream}_mlp.0", b, f"{stream}_mlp", m),
                        ModuleDef(f"{p}.{stream}_mlp.2", b, f"{stream}_mlp", h)]
        for i in range(spec.depth_single):
            b, p = _sb(i), f"single_blocks.{i}"
            out += [ModuleDef(f"{p}.linear1", b, "linear1_attn", 3 * h + m,
                              qkv("linear1_attn") + (Part("mlp", 3 * h, m, "linear1_mlp"),)),
                    ModuleDef(f"{p}.linear2", b, "linear2_attn", h, (),
                              (Part("attn", 0, h, "linear2_attn"), Part("mlp", h, m, "linear2_mlp"))),
                    ModuleDef(f"{p}.norm.query_norm", b, "norm", param="scale"),
                    ModuleDef(f"{p}.norm.key_norm", b, "norm", param="scale")]
            if spec.modulation:
                out.append(ModuleDef(f"{p}.modulation.lin", b, "mod", 3 * h))
        out.append(ModuleDef("final_layer.linear", OUT, "final"))
        if spec.modulation:
            out.append(ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", 2 * h))
        return out

    def _diffusers_names(self, spec: FluxSpec) -> dict[str, list[tuple[str, Optional[tuple], int]]]:
        """canonical path -> [(diffusers path, pieces or None, alias rows)] (the diffusers class' names)."""
        cached = getattr(self, "_dif_cache", None)
        if cached is not None and cached[0] == spec:
            return cached[1]
        h, m = spec.hidden, spec.mlp_hidden
        table: dict[str, list] = {}

        def add(canonical, diffusers, pieces=None, rows=0):
            table.setdefault(canonical, []).append((diffusers, pieces, rows))

        add("img_in", "x_embedder")
        add("txt_in", "context_embedder")
        add("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
        add("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
        add("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
        add("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
        add("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        add("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
        add("final_layer.linear", "proj_out")
        # diffusers' AdaLayerNormContinuous holds [scale | shift]; Flux's final modulation [shift | scale]
        add("final_layer.adaLN_modulation.1", "norm_out.linear", ((0, h, h), (h, 0, h)), 2 * h)
        for name in ("in_proj", "out_proj"):
            add(f"distilled_guidance_layer.{name}", f"distilled_guidance_layer.{name}")
        for i in range(spec.approximator_layers):
            for sub, dif in (("in_layer", "linear_1"), ("out_layer", "linear_2")):   # ChromaTransformer2DModel's
                add(f"distilled_guidance_layer.layers.{i}.{sub}", f"distilled_guidance_layer.layers.{i}.{dif}")
                add(f"distilled_guidance_layer.layers.{i}.{sub}", f"distilled_guidance_layer.layers.{i}.{sub}")
            add(f"distilled_guidance_layer.norms.{i}", f"distilled_guidance_layer.norms.{i}")
        for i in range(spec.depth):
            c, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
            for j, x in enumerate("qkv"):
                add(f"{c}.img_attn.qkv", f"{d}.attn.to_{x}", ((j * h, 0, h),), h)
                add(f"{c}.txt_attn.qkv", f"{d}.attn.add_{x}_proj", ((j * h, 0, h),), h)
            for canonical, diffusers in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                         ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                                         ("img_attn.norm.query_norm", "attn.norm_q"),
                                         ("img_attn.norm.key_norm", "attn.norm_k"),
                                         ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                                         ("txt_attn.norm.key_norm", "attn.norm_added_k")):
                add(f"{c}.{canonical}", f"{d}.{diffusers}")
        for i in range(spec.depth_single):
            c, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            for j, x in enumerate("qkv"):
                add(f"{c}.linear1", f"{d}.attn.to_{x}", ((j * h, 0, h),), h)
            add(f"{c}.linear1", f"{d}.proj_mlp", ((3 * h, 0, m),), m)
            for canonical, diffusers in (("linear2", "proj_out"), ("modulation.lin", "norm.linear"),
                                         ("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k")):
                add(f"{c}.{canonical}", f"{d}.{diffusers}")
        self._dif_cache = (spec, table)
        return table

    def aliases(self, module: ModuleDef, spec: FluxSpec, variant=None) -> list[Alias]:
        path, h = module.path, spec.hidden
        out = self.native_aliases(path)
        for diffusers, pieces, rows in self._diffusers_names(spec).get(path, ()):
            out += self.diffusers_aliases(diffusers, pieces, rows)
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", path)
        if m:
            group, i, rest = m.groups()
            xlabs = {("double", "img_attn.qkv"): ("qkv_lora1", None, 0),
                     ("double", "txt_attn.qkv"): ("qkv_lora2", None, 0),
                     ("double", "img_attn.proj"): ("proj_lora1", None, 0),
                     ("double", "txt_attn.proj"): ("proj_lora2", None, 0),
                     ("single", "linear1"): ("qkv_lora", ((0, 0, 3 * h),), 3 * h),
                     ("single", "linear2"): ("proj_lora", None, 0)}.get((group, rest))
            if xlabs is not None:
                name, pieces, rows = xlabs
                for prefix in ("", "diffusion_model."):
                    out.append(Alias(f"{prefix}{group}_blocks.{i}.processor.{name}", pieces, rows))
            if (group, rest) == ("single", "linear1"):
                for prefix in ("", "diffusion_model."):
                    out.append(Alias(f"{prefix}single_blocks.{i}.linear1_qkv", ((0, 0, 3 * h),), 3 * h))
        return out

    def diffusers_names(self, spec: FluxSpec) -> dict:
        return {path: tuple(name for name, _, _ in entries) for path, entries in self._diffusers_names(spec).items()}

    def diffusers_host_pieces(self, spec: FluxSpec, variant=None) -> dict:
        """diffusers key -> (canonical path, ((canonical start, host start, length), ...) or None, param)."""
        out = {}
        for canonical, entries in self._diffusers_names(spec).items():
            param = "scale" if canonical.endswith(("_norm", ".norm")) or ".norms." in canonical else "weight"
            for diffusers, pieces, _rows in entries:
                host_pieces = None
                if pieces is not None:   # the alias' pieces (canonical, alias start, n) are the host's too
                    host_pieces = tuple(pieces)
                out[f"{diffusers}.weight"] = (canonical, host_pieces, param)
        return out

    def lora_votes(self, modules, variant, key_map) -> int:
        """Flux vs Chroma: per-block modulation and time/vector/guidance inputs exist only in Flux.1, the
        distilled guidance layer only in Chroma."""
        votes = 0
        chroma = variant is self.CHROMA
        for name in modules:
            target = key_map.resolve(name)
            if target is None:
                continue
            if target.kind in ("img_mod", "txt_mod", "mod", "final_mod", "time_in", "vector_in", "guidance_in"):
                votes += -1 if chroma else 1
            elif target.kind == "approximator":
                votes += 1 if chroma else -1
        return votes

    def preferred_variant(self, names):
        # dev, schnell, Kontext and Fill share every module: nothing in a file without metadata tells them apart
        for variant in self.variants:
            if variant.name in names:
                return variant.name
        return None

    def denoiser_words(self):
        return ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                "final_layer", "distilled_guidance_layer", "transformer_blocks", "single_transformer_blocks",
                "x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        title = km.arch.title if km.arch is not None else "Flux"
        if not isinstance(spec, FluxSpec):
            return None
        stacks = (("double_blocks|transformer_blocks", spec.depth, "double"),
                  ("single_blocks|single_transformer_blocks", spec.depth_single, "single"))
        reason = deeper_block_reason(name, rest, title, stacks, "Flux.1 has 19 double and 38 single blocks")
        if reason:
            return reason
        if re.search(r"(img_mod|txt_mod|modulation[._]lin|norm1[._]linear|norm1_context|norm[._]linear)", rest) \
                and not spec.modulation:
            return (f"{name!r}: per-block modulation key, but {title} has no per-block modulation (Chroma drives "
                    f"modulation with its distilled guidance layer): this LoRA was made for Flux.1; its other "
                    f"modules still apply")
        if re.search(r"distilled_guidance_layer", rest) and not spec.approximator_layers:
            return f"{name!r}: Chroma distilled-guidance key, but {title} has none: this LoRA was made for Chroma"
        if re.search(r"guidance_(in|embedder)", rest) and not spec.guidance:
            return (f"{name!r}: guidance-embedding key, but {title} has no guidance input (schnell / Chroma): "
                    f"this LoRA was made for Flux.1 [dev]")
        return (f"{name!r}: Flux-style key that names no module of this {title} model; check the LoRA's base model "
                "(or the module is not a weight)")

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        full = variant.config
        chroma = variant is self.CHROMA
        te_blocks = tuple(c.block for c in variant.components.values() if c.is_text_encoder)
        doubles = tuple(_db(i) for i in range(full.depth))
        singles = tuple(_sb(i) for i in range(full.depth_single))
        other = (IN, MOD, OUT) if chroma else (IN, OUT)
        blocks = te_blocks + (IN,) + ((MOD,) if chroma else ()) + doubles + singles + (OUT,)
        descriptions = {IN: "input embeddings (img_in, txt_in" + ("" if chroma else ", time_in, vector_in, "
                                                                   "guidance_in") + ")",
                        OUT: "final layer", MOD: "distilled guidance layer (Chroma's modulation network)"}
        descriptions.update(text_encoder_descriptions(variant))
        for i, b in enumerate(doubles):
            descriptions[b] = f"double block {i} (image and text streams, joint attention)"
        for i, b in enumerate(singles):
            descriptions[b] = f"single block {i} (one stream: linear1 q|k|v|mlp, linear2)"
        # hako-mikan's Flux layout (61): CLIP, T5, IN, D00-D18, S00-S37, OUT; Chroma has no CLIP.
        clip, t5 = (None, "TE1") if chroma else ("TE1", "TE2")
        a1111 = {61: [clip, t5, IN] + list(doubles) + list(singles) + [OUT]}
        layout = BlockLayout(
            key=variant.layout_key, blocks=blocks, te_blocks=te_blocks, other_blocks=other,
            descriptions=descriptions, groups={BASE: te_blocks, "DB": doubles, "SB": singles},
            a1111=a1111, a1111_missing=0.0,
            inspire_groups=(("double", r"DB(\d\d)"), ("single", r"SB(\d\d)")),
            inspire_layouts={58: [BASE] + list(doubles) + list(singles), 20: [BASE] + list(doubles)},
            inspire_preset_prefixes=("FLUX-",),
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout


    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config: Optional[FluxSpec] = None) -> TrainSpec:
        """kohya sd-scripts' Flux training (networks/lora_flux.py, docs/flux_train_network.md): LoRA on every
        Linear of the double and single blocks, modulation included; CLIP-L is the text encoder it trains (T5
        only with train_t5xxl); Flux.1 dev's guidance embedding is fed a guidance value (kohya recommends 1.0).
        Chroma: the same blocks (no modulation), T5 its only encoder, no guidance input (ComfyUI feeds 0), and
        no resolution-dependent schedule (BFL's belongs to Flux.1; ComfyUI samples Chroma at its fixed shift)."""
        spec = config if isinstance(config, FluxSpec) else variant.config
        return TrainSpec(
            kinds=FLUX_TRAIN_KINDS, target_sets=FLUX_TARGET_SETS, conv_kinds=(), text_encoders=("te1",),
            guidance_input=bool(spec.guidance), timestep_sampling="logit-normal, model shift",
            resolution_shift=None if variant is self.CHROMA else (2, 256, 0.5, 4096, 1.15),
            block_lists=("double_blocks", "single_blocks"))


# Training kinds -> element kinds. "attn" holds the single blocks' linear1 / linear2 too: their attention is fused
# with the MLP input / output in one weight (kohya names them whole).
FLUX_TRAIN_KINDS = {
    "attn": frozenset({"img_attn", "txt_attn", "linear1_attn", "linear2_attn"}),
    "mlp": frozenset({"img_mlp", "txt_mlp"}),
    "mod": frozenset({"img_mod", "txt_mod", "mod"}),
    "embed": frozenset({"img_in", "txt_in", "time_in", "vector_in", "guidance_in"}),
    "final": frozenset({"final", "final_mod"}),
    "approximator": frozenset({"approximator"}),
}
# The train node's choices on a Flux / Chroma model: the first (its default) is kohya's default (every block
# Linear, modulation included: 304 layers on Flux.1); "attn+ff" leaves modulation out (musubi-tuner's and
# ai-toolkit's convention, 228 layers); "all layers" adds the input embeddings, final layer and Chroma's
# distilled guidance layer. A DiT has no SD-style proj_in/out: "attn+proj" is "attn".
FLUX_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp", "mod"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(FLUX_TRAIN_KINDS),
}


FAMILY = FluxFamily()
FLUX_DEV, FLUX_SCHNELL, FLUX_KONTEXT, FLUX_FILL, CHROMA = (FAMILY.DEV, FAMILY.SCHNELL, FAMILY.KONTEXT, FAMILY.FILL,
                                                        FAMILY.CHROMA)
