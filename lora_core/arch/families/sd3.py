"""The SD3 family: Stable Diffusion 3 Medium, 3.5 Medium and 3.5 Large (Stability AI's MMDiT).

Canonical names are ComfyUI's MMDiT module names (comfy/ldm/modules/diffusionmodules/mmdit.py), which kohya
sd-scripts writes too (`lora_unet_joint_blocks_0_x_block_attn_qkv`). The tree, h = hidden = 64 x depth (ComfyUI
fixes the head width at 64: SD3 / 3.5 Medium 24 blocks, h 1536; 3.5 Large 38 blocks, h 2432):

* `joint_blocks.N` (N = 0 .. depth-1), each an image stream `x_block` and a text stream `context_block`:
  `attn.qkv` (**fused q | k | v**, rows (0, h), (h, h), (2h, h)), `attn.proj`, `mlp.fc1` (4h), `mlp.fc2`,
  `adaLN_modulation.1` (6h), and in 3.5 the RMS q/k norms `attn.ln_q` / `attn.ln_k`;
* 3.5 Medium's x_blocks 0-12 add a second self-attention `x_block.attn2.qkv` / `attn2.proj` (+ norms), and their
  `adaLN_modulation.1` has 9h rows;
* the last block's `context_block` is *pre-only*: just `attn.qkv` (+ norms) and a 2h `adaLN_modulation.1`
  ([shift | scale]);
* top level: `x_embedder.proj` (a patch_size x patch_size conv), `t_embedder.mlp.0/2`, `y_embedder.mlp.0/2`
  (pooled text), `context_embedder`, `final_layer.linear`, `final_layer.adaLN_modulation.1` ([shift | scale]).

Writers and their names (tests/sd3_writers.py cites each rule's source):

* ComfyUI native `diffusion_model.<path>` (also bare `<path>`); kohya sd-scripts `networks/lora_sd3.py`
  (`LORA_PREFIX_SD3 = "lora_unet"`): `lora_unet_<path _>`; LyCORIS inside kohya: the same; LyCORIS' own
  wrapper on the MMDiT: `lycoris_<path _>`.
* diffusers / PEFT / ai-toolkit / diffusion-pipe / SimpleTuner on diffusers' `SD3Transformer2DModel`:
  `transformer.<diffusers path>` (`transformer_blocks.N.attn.to_q` = rows (0, h) of `joint_blocks.N.x_block.
  attn.qkv`, `add_q_proj` of the context_block's, `attn2.to_q` of `x_block.attn2.qkv`; ComfyUI's
  comfy/utils.py mmdit_to_diffusers), also bare and `base_model.model.` (flash-sd3); OneTrainer
  `lora_transformer_<diffusers path _>`; SimpleTuner LyCORIS `lycoris_<diffusers path _>`. diffusers'
  `AdaLayerNormContinuous` holds [scale | shift]: `norm_out.linear` and the last block's `norm1_context.linear`
  are the canonical [shift | scale] with the halves swapped.

Text encoders: te1 = CLIP-L (`clip_l`, kohya `lora_te1_`, diffusers `text_encoder.`), te2 = OpenCLIP-G (`clip_g`,
`lora_te2_`, `text_encoder_2.`), te3 = T5-XXL (`t5xxl`, `lora_te3_`, `text_encoder_3.`); each optional in
ComfyUI's SD3 CLIP. ComfyUI also names T5 `lora_te2_` / `lora_te1_` when CLIPs are missing (its count of the
encoders present); those forms are read too.

Variants (kohya library/sd3_utils.py's rule, from the structure): q/k norms absent -> SD3 Medium; q/k norms and
attn2 -> SD3.5 Medium; q/k norms without attn2 -> SD3.5 Large. Metadata: kohya `ss_base_model_version` `medium` /
`5-medium` / `5-large`, `modelspec.architecture` `stable-diffusion-3-medium` / `stable-diffusion-3-5-medium` /
`stable-diffusion-3-5-large` (+ "/lora"); ai-toolkit's `sd_3` names the family, not the variant.

Blocks: `TE1` (CLIP-L), `TE2` (CLIP-G), `TE3` (T5), `IN` (x_embedder, t_embedder, y_embedder, context_embedder),
`JB00`.. (joint blocks: `JB00`-`JB23`, 3.5 Large `JB00`-`JB37`), `OUT` (final_layer). No A1111 layout exists for
SD3 (hako-mikan's extension has none); Inspire Pack gives `joint_blocks` no slots (every key is its BASE).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..family import (Alias, ArchSpec, BlockLayout, ComponentSpec, Family, ModuleDef, Part, TrainSpec,
                      text_encoder_descriptions)
from ..text_encoders import CLIP_L, OPENCLIP_G, T5_XXL

BASE = "BASE"
IN, OUT = "IN", "OUT"
HEAD = 64   # ComfyUI's MMDiT: hidden = 64 x depth, heads = depth

ELEMENT_KINDS = (
    "x_attn", "ctx_attn",          # joint attention per stream: qkv (q, k, v parts) and proj
    "x_attn2",                     # SD3.5 Medium's second image self-attention (qkv, proj)
    "x_mlp", "ctx_mlp",            # MLPs (fc1, fc2)
    "x_mod", "ctx_mod",            # per-block adaLN modulation
    "norm",                        # RMS q/k norms (ln_q / ln_k, SD3.5)
    "x_embed", "t_embed", "y_embed", "context_embed",   # IN
    "final", "final_mod",          # OUT: final_layer.linear, final_layer.adaLN_modulation.1
    "pos_embed",                   # IN: the position table `pos_embed` (a parameter of the model itself)
    "te_attn", "te_mlp", "te_embed", "proj",   # text encoders
)
ELEMENT_GROUPS: dict[str, frozenset] = {kind: frozenset([kind]) for kind in ELEMENT_KINDS}
ELEMENT_GROUPS.update({
    "attn": frozenset({"x_attn", "ctx_attn", "x_attn2", "te_attn"}),
    "mlp": frozenset({"x_mlp", "ctx_mlp", "te_mlp"}),
    "modulation": frozenset({"x_mod", "ctx_mod", "final_mod"}),
    "x": frozenset({"x_attn", "x_attn2", "x_mlp", "x_mod"}),
    "ctx": frozenset({"ctx_attn", "ctx_mlp", "ctx_mod"}),
    "embed": frozenset({"x_embed", "t_embed", "y_embed", "context_embed", "te_embed"}),
})
# (canonical suffix in a stream, kind suffix, diffusers name in the x stream, in the context stream)
_STREAM_MODULES = (
    ("attn.proj", "attn", "attn.to_out.0", "attn.to_add_out"),
    ("mlp.fc1", "mlp", "ff.net.0.proj", "ff_context.net.0.proj"),
    ("mlp.fc2", "mlp", "ff.net.2", "ff_context.net.2"),
    ("attn.ln_q", "norm", "attn.norm_q", "attn.norm_added_q"),
    ("attn.ln_k", "norm", "attn.norm_k", "attn.norm_added_k"),
)
_WRITER_PREFIXES = r"(?:transformer\.|base_model\.model\.|transformer\.base_model\.model\.|lora_transformer_|lycoris_)?"


@dataclass(frozen=True)
class SD3Spec:
    """Structure of an MMDiT in ComfyUI's `unet_config` terms: `depth` (hidden = 64 x depth unless a state dict
    says otherwise), the number of joint blocks, the blocks whose x_block has attn2, q/k norms, and which
    optional embedders exist. The last block's context_block is pre-only whenever the model has a final layer."""

    hidden: int = 1536
    blocks: int = 24
    attn2: tuple[int, ...] = ()
    qk_norm: bool = False
    mlp_hidden: int = 6144
    y_embedder: bool = True
    context_embedder: bool = True
    final_layer: bool = True
    patch_size: int = 2

    @property
    def pre_only(self) -> int:
        """Index of the block whose context_block is pre-only (-1: none)."""
        return self.blocks - 1 if self.final_layer else -1

    @classmethod
    def from_comfy_config(cls, config: Mapping) -> "SD3Spec":
        depth = int(config.get("depth", 24))
        blocks = int(config.get("num_blocks") or depth)
        hidden = HEAD * depth
        attn2 = tuple(range(blocks)) if config.get("x_block_self_attn") else \
            tuple(sorted(int(i) for i in config.get("x_block_self_attn_layers") or () if int(i) < blocks))
        return cls(hidden=hidden, blocks=blocks, attn2=attn2, qk_norm=config.get("qk_norm") is not None,
                   mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
                   y_embedder=config.get("adm_in_channels") is not None,
                   context_embedder=config.get("context_embedder_config") is not None,
                   final_layer=bool(config.get("final_layer", True)), patch_size=int(config.get("patch_size", 2)))


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _count(keys, pattern: str) -> int:
    found = _indices(keys, pattern)
    return found[-1] + 1 if found else 0


def _first_dim(shapes, *keys) -> int:
    for key in keys:
        if key in shapes:
            return int(shapes[key][0])
    return 0


def spec_from_keys(keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]) -> Optional[SD3Spec]:
    """SD3Spec of a ComfyUI / SAI state dict given without prefix (`joint_blocks.0.x_block.attn.qkv.weight`)."""
    keyset = set(keys)
    if "joint_blocks.0.context_block.attn.qkv.weight" not in keyset:   # comfy.model_detection's marker
        return None
    shapes = shapes or {}
    blocks = _count(keyset, r"joint_blocks\.(\d+)\.")
    hidden = _first_dim(shapes, "x_embedder.proj.weight", "joint_blocks.0.x_block.attn.proj.weight") or HEAD * blocks
    mlp = _first_dim(shapes, "joint_blocks.0.x_block.mlp.fc1.weight") or 4 * hidden
    patch = shapes.get("x_embedder.proj.weight")
    return SD3Spec(hidden=hidden, blocks=blocks,
                   attn2=tuple(_indices(keyset, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")),
                   qk_norm="joint_blocks.0.context_block.attn.ln_q.weight" in keyset, mlp_hidden=mlp,
                   y_embedder="y_embedder.mlp.0.weight" in keyset,
                   context_embedder="context_embedder.weight" in keyset,
                   final_layer="final_layer.linear.weight" in keyset,
                   patch_size=int(patch[-1]) if patch is not None and len(patch) == 4 else 2)


def _jb(i: int) -> str:
    return f"JB{i:02d}"


class SD3Family(Family):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5 (Medium, 3.5 Medium, 3.5 Large)"
    denoiser = "transformer"
    # Only names no other family uses: diffusers' `transformer_blocks.N.attn.to_q` is Flux's too, and an SD UNet's
    # diffusers names hold `...attentions.0.transformer_blocks.0.attn2...` (hence the anchored forms).
    markers = (
        (r"(^|[._])joint_blocks[._]\d+[._]", "SD3 MMDiT (joint_blocks)"),
        (r"(^|[._])(x_block|context_block)[._]", "SD3 MMDiT (x_block / context_block)"),
        (r"^" + _WRITER_PREFIXES + r"transformer_blocks[._]\d+[._]attn2[._]", "SD3.5 Medium (attn2)"),
        (r"^" + _WRITER_PREFIXES + r"pos_embed[._]proj", "SD3 MMDiT (pos_embed.proj)"),
    )

    def __init__(self):
        self._layouts: dict[str, BlockLayout] = {}
        components = {
            "transformer": ComponentSpec("transformer", ""),
            "te1": ComponentSpec("te1", "TE1", CLIP_L, ("lora_te1_", "lora_te_"), "text_encoder."),
            "te2": ComponentSpec("te2", "TE2", OPENCLIP_G, ("lora_te2_", "lora_prior_te_"), "text_encoder_2."),
            # ComfyUI numbers T5 after the CLIPs present (lora_te2_ without CLIP-G, lora_te1_ alone)
            "te3": ComponentSpec("te3", "TE3", T5_XXL, ("lora_te3_", "lora_te2_", "lora_te1_"), "text_encoder_3."),
        }

        def variant(name, title, aliases, layout_key, config, model_type, architecture, short, match):
            return ArchSpec(name=name, title=title, family=self, config=config, components=components,
                            aliases=aliases, layout_key=layout_key,
                            metadata={"ss_base_model_version": model_type, "modelspec.architecture": architecture,
                                      # kohya's determine_implementation falls through to "diffusers" for SD3
                                      "modelspec.implementation": "diffusers",
                                      "ss_network_module": "networks.lora_sd3", "resolution": 1024,
                                      "short": short, "match": match})

        self.MEDIUM = variant("SD3-Medium", "Stable Diffusion 3 Medium",
                              ("sd3", "sd3m", "sd3-medium", "sd3_medium", "sd3-m"), "sd3", SD3Spec(),
                              "medium", "stable-diffusion-3-medium", "SD3 Medium",
                              ("stable-diffusion-3-medium", "stable-diffusion-3-m", "sd3-medium", "sd3_medium",
                               "medium"))
        self.MEDIUM35 = variant("SD3.5-Medium", "Stable Diffusion 3.5 Medium",
                                ("sd3.5-medium", "sd3.5m", "sd35m", "sd35-medium", "sd3.5_medium"), "sd35m",
                                SD3Spec(attn2=tuple(range(13)), qk_norm=True), "5-medium",
                                "stable-diffusion-3-5-medium", "SD3.5 Medium",
                                ("stable-diffusion-3-5-medium", "stable-diffusion-3.5-medium", "sd3.5-medium",
                                 "sd3.5_medium", "sd35_medium", "5-medium"))
        self.LARGE35 = variant("SD3.5-Large", "Stable Diffusion 3.5 Large",
                               ("sd3.5-large", "sd3.5l", "sd35l", "sd35-large", "sd3.5_large", "sd3.5-large-turbo"),
                               "sd35l", SD3Spec(hidden=2432, blocks=38, qk_norm=True, mlp_hidden=9728), "5-large",
                               "stable-diffusion-3-5-large", "SD3.5 Large",
                               ("stable-diffusion-3-5-large", "stable-diffusion-3.5-large", "sd3.5-large",
                                "sd3.5_large", "sd35_large", "5-large"))
        self.variants = (self.MEDIUM, self.MEDIUM35, self.LARGE35)

    # Metadata that names SD3 but not which one: ai-toolkit's `sd_3`, ComfyUI's checkpoint saves
    # (`stable-diffusion-v3-medium` for every variant), bare `sd3` / `stable-diffusion-3`.
    metadata_match = ("sd_3", "sd3", "stable-diffusion-3", "stable-diffusion-v3")

    # ----------------------------------------------------------------------------- recognition
    def variant_of_spec(self, spec: SD3Spec) -> ArchSpec:
        """kohya's rule (library/sd3_utils.py): attn2 -> 3.5 Medium; q/k norms -> 3.5 Large; else SD3 Medium."""
        if spec.attn2:
            return self.MEDIUM35
        return self.LARGE35 if spec.qk_norm else self.MEDIUM

    def detect_host(self, keys, shapes, config=None, config_name=""):
        spec = spec_from_keys(keys, shapes)
        if spec is None:
            return None
        if not shapes and config and config.get("depth"):
            spec = SD3Spec(**{**spec.__dict__, "hidden": HEAD * int(config["depth"]),
                              "mlp_hidden": HEAD * int(config["depth"]) * 4})
        return self.variant_of_spec(spec), spec

    def detect_diffusers(self, keys, shapes):
        keyset = set(keys)
        if "pos_embed.proj.weight" not in keyset or "transformer_blocks.0.norm1_context.linear.weight" not in keyset \
                or any(k.startswith("single_transformer_blocks.") for k in keyset):
            return None
        shapes = shapes or {}
        blocks = _count(keyset, r"transformer_blocks\.(\d+)\.")
        hidden = _first_dim(shapes, "pos_embed.proj.weight") or HEAD * blocks
        patch = shapes.get("pos_embed.proj.weight")
        spec = SD3Spec(hidden=hidden, blocks=blocks,
                       attn2=tuple(_indices(keyset, r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight$")),
                       qk_norm="transformer_blocks.0.attn.norm_added_q.weight" in keyset,
                       mlp_hidden=_first_dim(shapes, "transformer_blocks.0.ff.net.0.proj.weight") or 4 * hidden,
                       y_embedder="time_text_embed.text_embedder.linear_1.weight" in keyset,
                       context_embedder="context_embedder.weight" in keyset,
                       final_layer="proj_out.weight" in keyset,
                       patch_size=int(patch[-1]) if patch is not None and len(patch) == 4 else 2)
        return self.variant_of_spec(spec), spec

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        # CLIP-G with T5 is SD3's alone (SDXL has no T5, Flux no CLIP-G); which SD3 is not in the CLIP
        if "clip_g" in comfy_names and "t5xxl" in comfy_names and "llama" not in comfy_names:   # llama: HiDream
            return self.MEDIUM
        return None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        return {"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3"}

    # ----------------------------------------------------------------------------- modules
    def modules(self, spec: SD3Spec, variant=None) -> list[ModuleDef]:
        h, m = spec.hidden, spec.mlp_hidden
        out: list[ModuleDef] = [ModuleDef("pos_embed", IN, "pos_embed", param=""),   # by its key: see param_key
                                ModuleDef("x_embedder.proj", IN, "x_embed", h),
                                ModuleDef("t_embedder.mlp.0", IN, "t_embed", h),
                                ModuleDef("t_embedder.mlp.2", IN, "t_embed", h)]
        if spec.y_embedder:
            out += [ModuleDef("y_embedder.mlp.0", IN, "y_embed", h), ModuleDef("y_embedder.mlp.2", IN, "y_embed", h)]
        if spec.context_embedder:
            out.append(ModuleDef("context_embedder", IN, "context_embed", h))

        def qkv(path, kind):
            return ModuleDef(path, block, kind, 3 * h, (Part("q", 0, h, kind), Part("k", h, h, kind),
                                                        Part("v", 2 * h, h, kind)))

        for i in range(spec.blocks):
            block, p = _jb(i), f"joint_blocks.{i}"
            for stream, prefix in (("x", "x_block"), ("ctx", "context_block")):
                pre_only = stream == "ctx" and i == spec.pre_only
                out.append(qkv(f"{p}.{prefix}.attn.qkv", f"{stream}_attn"))
                for suffix, kind, _, _ in _STREAM_MODULES:
                    if kind == "norm" and not spec.qk_norm:
                        continue
                    if pre_only and kind != "norm":
                        continue   # a pre-only block has no attention output, no MLP
                    rows = m if suffix == "mlp.fc1" else h if kind != "norm" else 0
                    out.append(ModuleDef(f"{p}.{prefix}.{suffix}", block, f"{stream}_{kind}" if kind != "norm"
                                         else "norm", rows))
                if stream == "x" and i in spec.attn2:
                    out += [qkv(f"{p}.x_block.attn2.qkv", "x_attn2"),
                            ModuleDef(f"{p}.x_block.attn2.proj", block, "x_attn2", h)]
                    if spec.qk_norm:
                        out += [ModuleDef(f"{p}.x_block.attn2.ln_q", block, "norm"),
                                ModuleDef(f"{p}.x_block.attn2.ln_k", block, "norm")]
                mods = 2 if pre_only else 9 if stream == "x" and i in spec.attn2 else 6
                out.append(ModuleDef(f"{p}.{prefix}.adaLN_modulation.1", block, f"{stream}_mod", mods * h))
        if spec.final_layer:
            out += [ModuleDef("final_layer.linear", OUT, "final"),
                    ModuleDef("final_layer.adaLN_modulation.1", OUT, "final_mod", 2 * h)]
        return out

    def _diffusers_names(self, spec: SD3Spec) -> dict[str, list[tuple[str, Optional[tuple], int]]]:
        """canonical path -> [(diffusers path, pieces or None, alias rows)] (SD3Transformer2DModel's names)."""
        cached = getattr(self, "_dif_cache", None)
        if cached is not None and cached[0] == spec:
            return cached[1]
        h = spec.hidden
        swapped = ((0, h, h), (h, 0, h))   # diffusers [scale | shift] -> canonical [shift | scale]
        table: dict[str, list] = {}

        def add(canonical, diffusers, pieces=None, rows=0):
            table.setdefault(canonical, []).append((diffusers, pieces, rows))

        add("x_embedder.proj", "pos_embed.proj")
        add("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
        add("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
        add("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
        add("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
        add("context_embedder", "context_embedder")
        add("final_layer.linear", "proj_out")
        add("final_layer.adaLN_modulation.1", "norm_out.linear", swapped, 2 * h)
        for i in range(spec.blocks):
            c, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            for j, x in enumerate("qkv"):
                add(f"{c}.x_block.attn.qkv", f"{d}.attn.to_{x}", ((j * h, 0, h),), h)
                add(f"{c}.context_block.attn.qkv", f"{d}.attn.add_{x}_proj", ((j * h, 0, h),), h)
                add(f"{c}.x_block.attn2.qkv", f"{d}.attn2.to_{x}", ((j * h, 0, h),), h)
            for suffix, _, x_name, ctx_name in _STREAM_MODULES:
                add(f"{c}.x_block.{suffix}", f"{d}.{x_name}")
                add(f"{c}.context_block.{suffix}", f"{d}.{ctx_name}")
            add(f"{c}.x_block.attn2.proj", f"{d}.attn2.to_out.0")
            add(f"{c}.x_block.attn2.ln_q", f"{d}.attn2.norm_q")
            add(f"{c}.x_block.attn2.ln_k", f"{d}.attn2.norm_k")
            add(f"{c}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
            if i == spec.pre_only:   # AdaLayerNormContinuous in diffusers: [scale | shift]
                add(f"{c}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear", swapped, 2 * h)
            else:
                add(f"{c}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
        self._dif_cache = (spec, table)
        return table

    def aliases(self, module: ModuleDef, spec: SD3Spec, variant=None) -> list[Alias]:
        out = self.native_aliases(module.path)
        for diffusers, pieces, rows in self._diffusers_names(spec).get(module.path, ()):
            out += self.diffusers_aliases(diffusers, pieces, rows)
        return out

    def diffusers_names(self, spec: SD3Spec) -> dict:
        return {path: tuple(name for name, _, _ in entries) for path, entries in self._diffusers_names(spec).items()}

    def diffusers_host_pieces(self, spec: SD3Spec, variant=None) -> dict:
        """diffusers key -> (canonical path, ((canonical start, host start, length), ...) or None, param)."""
        out = {}
        for canonical, entries in self._diffusers_names(spec).items():
            for diffusers, pieces, _rows in entries:
                out[f"{diffusers}.weight"] = (canonical, tuple(pieces) if pieces is not None else None, "weight")
        return out

    def conv_kernel(self, target, variant) -> Optional[int]:
        return variant.config.patch_size if target.path == "x_embedder.proj" else None

    def lora_votes(self, modules, variant, key_map) -> int:
        """+1 / -1 per joint-block module whose input width is / is not this variant's hidden size (3 Medium and
        3.5 Medium 1536, 3.5 Large 2432), and per modulation whose rows fit / contradict it (3.5 Medium's attn2
        blocks modulate 9h rows, SD3 Medium's 6h); -1 for a file with no transformer or T5 module (text-encoder
        LoRAs of CLIP-L / CLIP-G alone fit SDXL as well, and are SDXL's far more often)."""
        from ... import adapters

        votes = 0
        spec = variant.config
        own = False   # a module only SD3 has: its transformer or T5 (te3)
        for name, module in modules.items():
            target = key_map.resolve(name)
            own = own or (target is not None and target.component in ("transformer", "te3"))
            if target is None or module.algo not in ("lora", "loha", "lokr", "full", "norm", "set"):
                continue
            try:
                shape = tuple(adapters.natural_shape(module))
            except Exception:
                continue
            if len(shape) < 2:
                continue
            if target.component in variant.text_encoders and target.path.endswith(".self_attn.q_proj"):
                votes += 1 if shape[1] == variant.text_encoders[target.component].hidden_size else -1
                continue   # the same rule as the SD family's, so SDXL and SD3 text encoders weigh alike
            if not target.path.startswith("joint_blocks."):
                continue
            wanted_in = spec.mlp_hidden if target.path.endswith("mlp.fc2") else spec.hidden
            votes += 1 if shape[1] == wanted_in else -1
            if target.kind.endswith("_mod") and target.pieces is None:
                votes += 1 if shape[0] == target.rows else -1
        return votes if own else votes - 1

    def denoiser_words(self):
        return ("joint_blocks", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer",
                "pos_embed", "transformer_blocks", "time_text_embed", "norm_out", "proj_out")

    def explain(self, km, name: str, rest: str) -> Optional[str]:
        spec = km.config
        if not isinstance(spec, SD3Spec):
            return None
        title = km.arch.title if km.arch is not None else self.title
        m = re.search(r"(?:^|[._])(?:joint_blocks|transformer_blocks)[._](\d+)[._](.*)", rest)
        if m:
            index, tail = int(m.group(1)), m.group(2)
            if index >= spec.blocks:
                return (f"{name!r}: key for joint block {index}, but this {title} model has {spec.blocks} joint "
                        f"blocks (0-{spec.blocks - 1}): this LoRA was made for a deeper model (SD3 / SD3.5 Medium "
                        f"have 24, SD3.5 Large 38)")
            if re.match(r"(x_block[._])?attn2[._]", tail) and index not in spec.attn2:
                return (f"{name!r}: key for the second image self-attention (attn2) of block {index}, which this "
                        f"{title} model does not have (SD3.5 Medium has it in blocks 0-12): this LoRA was made for "
                        f"SD3.5 Medium")
            if index == spec.pre_only and re.match(r"(context_block[._](attn[._]proj|mlp)|ff_context|attn[._]"
                                                   r"to_add_out)", tail):
                return (f"{name!r}: key for the text stream's attention output / MLP of block {index}, but that is "
                        f"this model's last block, whose text stream is pre-only (attention inputs and modulation "
                        f"only): this LoRA was made for a deeper model")
            if re.search(r"(ln_q|ln_k|norm_q|norm_k|norm_added_q|norm_added_k)$", tail) and not spec.qk_norm:
                return (f"{name!r}: q/k-norm key, but this {title} model has no q/k norms (SD3.5 added them): "
                        f"this LoRA was made for SD3.5")
        return (f"{name!r}: SD3-style key that names no module of this {title} model; check the LoRA's base model "
                "(or the module is not a weight)")

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config=None) -> TrainSpec:
        """kohya sd-scripts' SD3 training (networks/lora_sd3.py, docs/sd3_train_network.md): LoRA on every Linear
        of the joint blocks' image and text streams (SD3_TARGET_REPLACE_MODULE = SingleDiTBlock: attn.qkv whole,
        attn.proj, mlp.fc1/fc2, adaLN_modulation.1; 3.5 Medium's attn2 too), named lora_unet_<path _>; with text
        encoder training kohya trains CLIP-L (lora_te1_) and CLIP-G (lora_te2_), T5 (lora_te3_) only with
        train_t5xxl. No guidance input; flow matching at the model's own shift (ComfyUI's ModelSamplingDiscreteFlow:
        SD3 3.0), logit-normal like the SD3 paper; no resolution-dependent shift."""
        return TrainSpec(kinds=SD3_TRAIN_KINDS, target_sets=SD3_TARGET_SETS, conv_kinds=(),
                         text_encoders=("te1", "te2"), guidance_input=False,
                         timestep_sampling="logit-normal, model shift", resolution_shift=None,
                         block_lists=("joint_blocks",))

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        layout = self._layouts.get(variant.layout_key)
        if layout is not None:
            return layout
        full = variant.config
        te_blocks = tuple(c.block for c in variant.components.values() if c.is_text_encoder)
        joints = tuple(_jb(i) for i in range(full.blocks))
        descriptions = {IN: "input embeddings (x_embedder, t_embedder, y_embedder, context_embedder)",
                        OUT: "final layer"}
        descriptions.update(text_encoder_descriptions(variant))
        for i, b in enumerate(joints):
            what = "image and text streams, joint attention"
            if i in full.attn2:
                what += ", image attn2"
            if i == full.pre_only:
                what += "; text stream pre-only"
            descriptions[b] = f"joint block {i} ({what})"
        layout = BlockLayout(
            key=variant.layout_key, blocks=te_blocks + (IN,) + joints + (OUT,), te_blocks=te_blocks,
            other_blocks=(IN, OUT), descriptions=descriptions, groups={BASE: te_blocks, "JB": joints},
            a1111={}, a1111_missing=0.0,
            # Inspire Pack gives joint_blocks no slots: BASE is its one position on SD3
            inspire_groups=(), inspire_layouts={1: [BASE]}, inspire_preset_prefixes=(),
            element_kinds=ELEMENT_KINDS, element_groups=ELEMENT_GROUPS,
        )
        self._layouts[variant.layout_key] = layout
        return layout


# Training kinds -> element kinds (the train node's target choices name training kinds).
SD3_TRAIN_KINDS = {
    "attn": frozenset({"x_attn", "ctx_attn", "x_attn2"}),
    "mlp": frozenset({"x_mlp", "ctx_mlp"}),
    "mod": frozenset({"x_mod", "ctx_mod"}),
    "embed": frozenset({"x_embed", "t_embed", "y_embed", "context_embed"}),
    "final": frozenset({"final", "final_mod"}),
}
# The first (the node's default) is kohya's default, every Linear of the joint blocks, modulation included;
# "attn+ff" leaves modulation out; "all layers" adds the embedders (x_embedder's patch conv too: kohya's emb_dims)
# and the final layer. An MMDiT has no SD-style proj_in/out: "attn+proj" is "attn".
SD3_TARGET_SETS = {
    "attn+ff+proj": ("attn", "mlp", "mod"),
    "attn+proj": ("attn",),
    "attn+ff": ("attn", "mlp"),
    "attn": ("attn",),
    "all layers": tuple(SD3_TRAIN_KINDS),
}


FAMILY = SD3Family()
SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE = FAMILY.MEDIUM, FAMILY.MEDIUM35, FAMILY.LARGE35
