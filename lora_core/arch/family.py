"""What an architecture family is, as data: the types every family file fills in, and the base class.

A *family* (`lora_core/arch/families/<name>.py`) describes everything LoRA Core needs to know about one model
family, in one place:

* **recognition** - from a host's state dict (and ComfyUI's `unet_config` when there is one) and from a LoRA
  file's module names, shapes and metadata;
* **components** - the denoiser (`unet` for UNet families, `transformer` for DiTs, diffusers' attribute names)
  and any number of text encoders `te1`, `te2`, ... in diffusers' order (`text_encoder`, `text_encoder_2`,
  ...), each bound to an encoder spec (CLIP-L, T5-XXL, ...) and the attribute ComfyUI's CLIP object keeps it
  under (`clip_l`, `t5xxl`, ...);
* **modules** - every weight of the denoiser in canonical naming (ComfyUI's state-dict names, which are also
  kohya's and the original trainers'), with its block, element kind, and for fused weights its row *parts*
  (Flux `img_attn.qkv` = q | k | v) and column parts;
* **aliases** - every writer's name for a module or for one part of it, as `Alias(name, pieces)`: a diffusers
  `transformer_blocks.0.attn.to_q` is rows (0, h) of the canonical `double_blocks.0.img_attn.qkv`;
* **block layout** - block ids in order, what each is, groups, element kinds, and the A1111 / Inspire
  positional layouts where those tools have one;
* **metadata strings** - kohya's `ss_base_model_version`, SAI's `modelspec.architecture`, ... per variant.

Nothing outside `lora_core/arch/` keeps a table of any of this: blocks, mix, io, train, api and the nodes ask
the family (through `ArchSpec`, one variant of a family, e.g. SDXL or Flux.1-dev).

Row algebra. Every weight is addressed in *canonical rows* (the rows of the canonical module). A LoRA module
(alias) covers canonical rows through its pieces `(canonical start, alias start, length)`; a host weight covers
canonical rows through its own pieces. Their intersection gives the `Piece`s of a `Target`: which rows of the
LoRA module's output land on which rows of which host weight. One rule serves fused hosts (ComfyUI's Flux,
diffusers-named LoRA parts), split hosts (diffusers' Flux, a kohya fused LoRA) and permutations (diffusers'
`norm_out.linear` holds [scale, shift], Flux's final modulation [shift, scale]).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

# ------------------------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class Part:
    """A named row (or column) range of a fused weight, with the element kind block weights address."""

    name: str
    start: int
    length: int
    kind: str

    @property
    def stop(self) -> int:
        return self.start + self.length


def param_key(path: str, param: str) -> str:
    """A module's parameter key: `<path>.<param>`; a parameter of the model itself (Z-Image's `x_pad_token`, SD3's
    `pos_embed`) is a ModuleDef with the key as its path and param "" (the key is then the path)."""
    return f"{path}.{param}" if param else path


@dataclass(frozen=True)
class ModuleDef:
    """One weight-carrying module of a component, in canonical naming.

    `rows` is the weight's output size when the family knows it (needed for parts and aliases of parts);
    `parts` split the rows of a fused weight (each with its own element kind), `col_parts` its input columns
    (Flux's single-block `linear2` reads [attention | MLP]). `param` is the parameter name ("weight"; RMSNorm
    scales are "scale"; "" for a parameter of the model itself, named by `path`: see `param_key`)."""

    path: str
    block: str
    kind: str
    rows: int = 0
    parts: tuple[Part, ...] = ()
    col_parts: tuple[Part, ...] = ()
    param: str = "weight"

    @property
    def key(self) -> str:
        """The parameter's key in the denoiser's state dict (without ComfyUI's `diffusion_model.`)."""
        return param_key(self.path, self.param)

    def kind_at(self, row: int) -> str:
        for part in self.parts:
            if part.start <= row < part.stop:
                return part.kind
        return self.kind


@dataclass(frozen=True)
class Alias:
    """A writer's name for a module or for part of it. `pieces` = ((canonical row start, alias row start,
    length), ...); None = the whole module, row for row. `rows` = the alias module's own output rows (for shape
    checks): 0 = the canonical module's."""

    name: str
    pieces: Optional[tuple[tuple[int, int, int], ...]] = None
    rows: int = 0


@dataclass(frozen=True)
class Piece:
    """Rows `src:src+length` of a LoRA module's output go to rows `dst:dst+length` of host tensor `host_key`;
    `kind` is the element kind of those rows (block weights can give parts different factors)."""

    host_key: str
    dst: int
    src: int
    length: int
    kind: str


def row_pieces(alias_pieces, host_pieces, module: ModuleDef) -> tuple[tuple[str, int, int, int, str], ...]:
    """Intersect an alias' canonical coverage with the host weights' (see the module docstring).

    `alias_pieces`: ((canonical start, alias start, length), ...). `host_pieces`: ((host key, canonical start,
    host start, length), ...). Returns (host key, host start, alias start, length, kind) per overlap, split at
    part boundaries so each piece has one element kind, in alias-row order."""
    cuts = sorted({p.start for p in module.parts} | {p.stop for p in module.parts})
    out = []
    for a_canon, a_start, a_len in alias_pieces:
        for host_key, h_canon, h_start, h_len in host_pieces:
            lo, hi = max(a_canon, h_canon), min(a_canon + a_len, h_canon + h_len)
            if lo >= hi:
                continue
            bounds = [lo] + [c for c in cuts if lo < c < hi] + [hi]
            for x, y in zip(bounds, bounds[1:]):
                out.append((host_key, h_start + (x - h_canon), a_start + (x - a_canon), y - x, module.kind_at(x)))
    merged: list = []
    for piece in sorted(out, key=lambda p: p[2]):
        if merged:
            key, dst, src, n, kind = merged[-1]
            if piece[0] == key and piece[4] == kind and piece[1] == dst + n and piece[2] == src + n:
                merged[-1] = (key, dst, src, n + piece[3], kind)   # contiguous rows of one kind: one piece
                continue
        merged.append(piece)
    return tuple(merged)


# ------------------------------------------------------------------------------------------- components


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a variant: `id` ("unet", "transformer", "te1", ...), its block id, and for a text
    encoder the encoder spec and the kohya prefixes writers use for it."""

    id: str
    block: str
    encoder: Any = None                 # text_encoders.TextEncoderSpec for a text encoder
    kohya_prefixes: tuple[str, ...] = ()
    diffusers_prefix: str = ""          # "text_encoder." / "text_encoder_2." ...

    @property
    def is_text_encoder(self) -> bool:
        return self.id.startswith("te")


# ------------------------------------------------------------------------------------------- block layout


@dataclass(frozen=True)
class BlockLayout:
    """Block ids of a variant in layout order, with what each is and the positional layouts of other tools.

    `te_blocks` are the text-encoder blocks (A1111's / our named syntax's BASE group); `other_blocks` hold the
    denoiser modules outside the repeated blocks (SD's OTHER, a DiT's IN / OUT). `groups` name sets of blocks
    for named syntax (BASE, ...). `a1111`: {vector length: block id per position ("BASE" = te_blocks; None =
    no block of this variant)}; ids a short layout does not list get `a1111_missing`. `inspire_groups`: the
    block groups Inspire Pack's loader gives ordinal slots, in its order, as (group name, block-id regex with
    the block number as group 1); everything else is Inspire's BASE. `inspire_layouts`: standard vector
    lengths -> slot ids (for vectors given without a file). `element_kinds`: every kind this variant's
    targets carry; `element_groups`: named-syntax group -> kinds."""

    key: str
    blocks: tuple[str, ...]
    te_blocks: tuple[str, ...]
    other_blocks: tuple[str, ...]
    descriptions: Mapping[str, str]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    a1111: Mapping[int, Sequence[Optional[str]]] = field(default_factory=dict)
    a1111_missing: float = 0.0
    inspire_groups: tuple[tuple[str, str], ...] = ()
    inspire_layouts: Mapping[int, Sequence[str]] = field(default_factory=dict)
    inspire_preset_prefixes: tuple[str, ...] = ()
    element_kinds: tuple[str, ...] = ()
    element_groups: Mapping[str, frozenset] = field(default_factory=dict)
    mid_block: Optional[str] = None      # SD's M00: Inspire counts its parts middle_block.0/1/2 as slots

    def inspire_slot(self, block: str) -> Optional[tuple[int, int]]:
        """(group index, block number) of a block Inspire gives a slot, or None (Inspire's BASE)."""
        for index, (_, pattern) in enumerate(self.inspire_groups):
            m = re.fullmatch(pattern, block)
            if m:
                return index, int(m.group(1)) if m.groups() and m.group(1) is not None else 0
        return None

    @property
    def inspire_max_length(self) -> int:
        slots = sum(1 for b in self.blocks if self.inspire_slot(b) is not None)
        return 1 + slots + (2 if self.mid_block in self.blocks else 0)


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True, eq=False)
class ArchSpec:
    """One variant of a family (SD1, SDXL, Flux.1-dev, Chroma, ...): what reports, block weights, mixing and
    training ask about a model.

    `config` is the family's structural config of the full-size model (a UNetSpec for SD, a FluxSpec for
    Flux); hosts carry their own (tiny test models, pruned models). `metadata` holds the strings trainers
    write: `ss_base_model_version`, `modelspec.architecture` (without "/lora"), `modelspec.implementation`,
    `ss_network_module`, native `resolution`, and `match` (lower-case prefixes of metadata values that name
    this variant)."""

    name: str
    title: str
    family: "Family"
    config: Any
    components: Mapping[str, ComponentSpec]
    aliases: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    layout_key: str = ""

    def __repr__(self) -> str:
        return f"<ArchSpec {self.name}>"

    @property
    def denoiser(self) -> str:
        return self.family.denoiser

    @property
    def text_encoders(self) -> dict:
        """component id -> TextEncoderSpec, in order (te1, te2, ...)."""
        return {c.id: c.encoder for c in self.components.values() if c.is_text_encoder}

    @property
    def unet(self):
        """The UNet config of a UNet family (kept for SD callers); None for DiTs."""
        return self.config if self.family.denoiser == "unet" else None

    @property
    def layout(self) -> BlockLayout:
        return self.family.block_layout(self)

    @property
    def blocks(self) -> tuple[str, ...]:
        return self.layout.blocks

    @property
    def te_blocks(self) -> tuple[str, ...]:
        return self.layout.te_blocks

    @property
    def block_groups(self) -> Mapping[str, tuple[str, ...]]:
        return self.layout.groups

    def component_of_block(self, block: str) -> Optional[str]:
        for c in self.components.values():
            if c.block == block:
                return c.id
        return None


# ------------------------------------------------------------------------------------------- training


def deeper_block_reason(name: str, rest: str, title: str, stacks, known: str) -> Optional[str]:
    """Why a LoRA module name resolves to nothing when it addresses block `index` of a stack the host has fewer of
    (a LoRA for a deeper model). `stacks`: ((regex alternatives, blocks the host has, what), ...); a stack whose
    `what` is not "single" ignores names whose prefix says single (diffusers' `single_transformer_blocks` holds
    `transformer_blocks`). `known` closes the message with the family's full-size depths."""
    for words, count, what in stacks:
        m = re.search(rf"(?:^|[._])(?:{words})[._](\d+)[._]", rest)
        if m and ("single" in what or "single" not in rest[:m.end()]):
            index = int(m.group(1))
            if index >= count:
                span = f" (0-{count - 1})" if count else ""
                return (f"{name!r}: key for {what} block {index}, but this {title} model has {count} {what} "
                        f"blocks{span}: this LoRA was made for a deeper model ({known})")
    return None


def text_encoder_descriptions(variant: "ArchSpec") -> dict[str, str]:
    """Block descriptions of a variant's text encoders (`TE1` -> "text encoder 1 (CLIP-L)")."""
    return {c.block: f"text encoder {c.id[2:]} ({c.encoder.family})"
            for c in variant.components.values() if c.is_text_encoder}


@dataclass(frozen=True)
class TrainSpec:
    """How LoRAs are trained on a family, as the trainers that name its files do it (the family's half of
    training; the objective itself - eps, v or flow with its shift - is read from the model by the host adapter).

    * `kinds`: training kind -> the element kinds (ModuleDef.kind) it covers. Training kinds are what target
      choices and `TrainConfig.unet_kinds` name (SD: attn, ff, proj, resnet, other; Flux: attn, mlp, mod, ...).
    * `target_sets`: the train node's target choice -> training kinds. "attn+ff+proj" is the family's common
      trainer default (kohya's), "all layers" every weight-carrying Linear/Conv of the denoiser.
    * `conv_kinds`: what LoCon adds (SD's resnet / sampler convolutions; none in a DiT).
    * `text_encoders`: components kohya trains when text-encoder training is on (e.g. Flux: CLIP-L only, T5 on
      request); None = every text encoder of the CLIP.
    * `guidance_input`: the denoiser takes a guidance value (Flux.1 dev's distilled guidance embedding).
    * `timestep_sampling`: the default for flow-matching models ("auto" in the train node).
    * `resolution_shift`: (patch, tokens_lo, mu_lo, tokens_hi, mu_hi) of a resolution-dependent schedule shift
      (BFL's Flux schedule), or None.
    * `block_lists`: attributes of the denoiser whose children (or which themselves) are the repeated blocks,
      in order: what gradient checkpointing wraps and what in-place residual adds are made out-of-place in.
    * `latent_dims`: spatial dims of a latent after (batch, channels): 2 for images; 3 (frames, h, w) for video
      families (Wan), whose datasets carry 5-D latents - the loop is dimension-generic.
    * `path_kinds`: ((regex on the canonical path, training kind), ...) checked before `kinds`: modules whose
      element kind is shared but which trainers choose apart (Z-Image's refiner blocks, which musubi leaves out
      by default, have the same attention / MLP as the main layers).
    """

    kinds: Mapping[str, frozenset]
    target_sets: Mapping[str, tuple[str, ...]]
    conv_kinds: tuple[str, ...] = ()
    text_encoders: Optional[tuple[str, ...]] = None
    guidance_input: bool = False
    timestep_sampling: str = "logit-normal, model shift"
    resolution_shift: Optional[tuple[int, int, float, int, float]] = None
    block_lists: tuple[str, ...] = ()
    latent_dims: int = 2
    path_kinds: tuple[tuple[str, str], ...] = ()

    def kind_of_target(self, path: str, element_kind: str) -> Optional[str]:
        """The training kind of a denoiser module: the first `path_kinds` rule matching its canonical path, else
        the kind its element kind belongs to."""
        for pattern, kind in self.path_kinds:
            if re.search(pattern, path):
                return kind
        return self.kind_of(element_kind)

    def kind_of(self, element_kind: str) -> Optional[str]:
        """The training kind an element kind belongs to (None: no training kind covers it)."""
        for name, members in self.kinds.items():
            if element_kind in members:
                return name
        return None


# ------------------------------------------------------------------------------------------- the base class


class Family:
    """Base class of an architecture family; each family file defines one subclass and one instance.

    Subclasses set `name`, `title`, `denoiser`, `variants` and implement the methods below. Everything takes
    plain data (key lists, shapes, dicts): no ComfyUI import."""

    name = ""
    title = ""
    denoiser = "transformer"
    variants: tuple[ArchSpec, ...] = ()
    # Regexes that mark a LoRA module name as this family's (for "made for another model" errors), most
    # specific first, and the words shown for them.
    markers: tuple[tuple[str, str], ...] = ()
    # Lower-case prefixes of metadata values that name this family but not one of its variants (ai-toolkit's
    # `sd_3` for every SD3): the variant is then read from the file's keys and shapes, among this family's.
    metadata_match: tuple[str, ...] = ()
    # Names of families whose module names and shapes coincide with this one's (HunyuanVideo's blocks are Flux's):
    # a file decisively the other family's (metadata, or names / depths only it has) is refused even when every
    # module fits (registry.confusable_family); the other family's key marks are not read as "made for" it; a file
    # both families read alike is taken as the other family's by `detect_lora` (the declaring family yields).
    confusable_with: tuple[str, ...] = ()
    # Names of families whose block names this one reuses with other shapes (Flux.2 reuses Flux.1's
    # `double_blocks` / `single_blocks`): the other family's key marks are not read as "made for" it on this host.
    shares_names_with: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------- recognition
    def detect_host(self, keys: Sequence[str], shapes: Optional[Mapping[str, tuple]], config: Optional[dict],
                    config_name: str = "") -> Optional[tuple[ArchSpec, Any]]:
        """(variant, structural config of this host) when the denoiser state dict (keys without ComfyUI's
        `diffusion_model.` prefix) is this family's, else None."""
        raise NotImplementedError

    def detect_diffusers(self, keys: Sequence[str], shapes: Optional[Mapping[str, tuple]]
                         ) -> Optional[tuple[ArchSpec, Any]]:
        """Same, for the diffusers class of this family (FluxTransformer2DModel, UNet2DConditionModel)."""
        return None

    # ----------------------------------------------------------------------------- modules
    def modules(self, config: Any, variant: ArchSpec) -> list[ModuleDef]:
        """Every weight-carrying module of the denoiser described by `config`, canonical naming, layout order."""
        raise NotImplementedError

    def aliases(self, module: ModuleDef, config: Any, variant: ArchSpec) -> Iterable[Alias]:
        """Every writer's name for `module` or a part of it (the canonical ComfyUI/kohya forms included). Depends
        on `module` and `config` only: variants with the same layout data share one table (layout_key_map)."""
        raise NotImplementedError

    def diffusers_names(self, config: Any) -> Mapping[str, tuple[str, ...]]:
        """canonical path -> the diffusers class' module name(s) for it (whole or part)."""
        return {}

    def diffusers_host_pieces(self, config: Any, variant: ArchSpec) -> Mapping[str, tuple]:
        """diffusers parameter key -> (canonical path, canonical row start, length or 0 for all, param): how
        the family's diffusers class stores the canonical weights (for LoraPatcher on diffusers models)."""
        return {}

    def variant_of_clip(self, comfy_names: set) -> Optional[ArchSpec]:
        """The variant whose ComfyUI CLIP object holds exactly these encoders (`clip_l`, `t5xxl`, ...), if
        that decides it."""
        return None

    def clip_components(self, comfy_names: set, variant: Optional[ArchSpec]) -> dict[str, str]:
        """ComfyUI CLIP attribute -> component id (te1, te2, ...) for this family."""
        return {}

    def lora_votes(self, modules: Mapping, variant: ArchSpec, key_map) -> int:
        """Tie-break between variants whose layouts resolve the same number of a LoRA file's modules: +1 per
        module whose shape or presence fits `variant`, -1 per one that contradicts it."""
        return 0

    def preferred_variant(self, names: Sequence[str]) -> Optional[str]:
        """Of tied variants of this family (same layout, nothing in the file tells them apart), the one to
        assume, or None when guessing would be wrong (SD1 vs SD2: ask the user)."""
        return None

    def explain(self, key_map, name: str, rest: str) -> Optional[str]:
        """Why a denoiser module name `name` (`rest`: without its writer prefix) names no module of this
        host, in words a user can act on; None when the family has nothing specific to say."""
        return None

    def conv_kernel(self, target, variant: ArchSpec) -> Optional[int]:
        """Kernel size of a denoiser target that is a convolution in this family (None: a linear layer)."""
        return None

    def export_name(self, target) -> Optional[str]:
        """The module name a merged file uses for a denoiser target, when the family's common format differs from
        kohya's `lora_unet_<path _>` (None: kohya's). A parameter of the model itself (param "", see `param_key`)
        has no kohya name: ComfyUI's full key, the one name core reads for it."""
        if target.param == "":
            return f"diffusion_model.{target.path}"
        return None

    def train_names(self, target, variant: ArchSpec, config: Any = None) -> Optional[tuple[tuple[str, int, int], ...]]:
        """The module name(s) a trained LoRA file uses for a denoiser target when the family's trainers name (or
        split) it otherwise than its merges: ((file module name, row start, rows), ...), rows 0 = the whole weight.
        Several entries: the trainers train the fused weight as separate modules (diffusers' to_q / to_k / to_v of
        a fused qkv), one LoRA per row range. `config`: the host's structural config. None: the merge name
        (`export_name` / kohya), one LoRA."""
        return None

    def denoiser_words(self) -> Sequence[str]:
        """Leading words of this family's denoiser module names (for telling a denoiser name from others)."""
        return ()

    # ----------------------------------------------------------------------------- layout
    def block_layout(self, variant: ArchSpec) -> BlockLayout:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- training
    def train_spec(self, variant: ArchSpec, config: Any = None) -> Optional[TrainSpec]:
        """How LoRAs are trained on this family (None: training not supported yet). `config` is the host's
        structural config (e.g. whether this Flux has a guidance input)."""
        return None

    def training_metadata(self, variant: ArchSpec, prediction: str) -> dict[str, str]:
        """The kohya / SAI header strings a trained LoRA of `variant` carries: ss_base_model_version,
        modelspec.architecture (with "/lora"), modelspec.implementation, ss_network_module, ss_v2, native
        resolution. `prediction` is the model's objective ("epsilon", "v_prediction", "flow"); a family whose
        strings depend on it (SD's v-prediction variants) overrides this."""
        meta = variant.metadata
        out = {"ss_base_model_version": str(meta["ss_base_model_version"]),
               "modelspec.architecture": str(meta["modelspec.architecture"]) + "/lora",
               "modelspec.implementation": str(meta.get("modelspec.implementation", "")),
               "ss_network_module": str(meta.get("ss_network_module", "networks.lora")),
               "ss_v2": "False", "resolution": str(meta.get("resolution", 1024))}
        if meta.get("ss_model_type"):
            out["ss_model_type"] = str(meta["ss_model_type"])
        return out

    # ----------------------------------------------------------------------------- helpers for families

    @staticmethod
    def native_aliases(path: str, *, bare: bool = True, prefixes: Sequence[str] = ()) -> list[Alias]:
        """ComfyUI / kohya / LyCORIS forms of a canonical path P: `diffusion_model.P`,
        `model.diffusion_model.P`, `lora_unet_<P_>`, `lycoris_<P_>`, bare `P` (when `bare`), plus
        `<prefix>P` for each extra prefix."""
        under = path.replace(".", "_")
        names = [f"diffusion_model.{path}", f"model.diffusion_model.{path}", f"lora_unet_{under}",
                 f"lycoris_{under}"]
        if bare:
            names.append(path)
        names += [p + path for p in prefixes]
        return [Alias(n) for n in names]

    @staticmethod
    def diffusers_aliases(path: str, pieces=None, rows: int = 0,
                          prefixes: Sequence[str] = ("transformer.", "", "base_model.model.",
                                                     "transformer.base_model.model."),
                          underscored: Sequence[str] = ("lora_transformer_", "lycoris_", "lora_unet_")) -> list[Alias]:
        """diffusers / PEFT / OneTrainer / SimpleTuner-LyCORIS forms of a diffusers module path D."""
        under = path.replace(".", "_")
        return [Alias(p + path, pieces, rows) for p in prefixes] + [Alias(p + under, pieces, rows)
                                                                    for p in underscored]
