"""The families LoRA Core knows, and the one detector every other module asks.

Adding a family: write `families/<name>.py` (a `Family` subclass and its `FAMILY` instance, see family.py and
the README's "Adding an architecture family"), import it in `families/__init__.py`, add its tests. Nothing
else changes: key maps, block weights, mixing, training metadata, reports and the nodes ask the registry.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import LoraValueError
from .families import FAMILIES
from .family import ArchSpec, Family

ARCHS: dict[str, ArchSpec] = {v.name: v for family in FAMILIES for v in family.variants}
COMFY_DENOISER_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "")


def families() -> tuple[Family, ...]:
    return FAMILIES


def get_arch(name) -> ArchSpec:
    """A variant by name or alias, case-insensitively ("SD15", "pony", "SDXL", "flux", "chroma", ...)."""
    if isinstance(name, ArchSpec):
        return name
    wanted = str(name).strip().lower()
    for arch in ARCHS.values():
        if wanted in (arch.name.lower(), arch.layout_key) or wanted in arch.aliases:
            return arch
    known = ", ".join(sorted({a.name for a in ARCHS.values()} | {x for a in ARCHS.values() for x in a.aliases}))
    raise LoraValueError(f"unknown architecture {name!r}: use one of {known}")


def strip_denoiser_prefix(keys: Sequence[str], shapes: Optional[Mapping] = None, marker: Optional[str] = None):
    """(prefix, {unprefixed key: host key}, shapes by unprefixed key) for ComfyUI model / checkpoint / bare
    denoiser keys. The prefix is the first of `diffusion_model.`, `model.diffusion_model.`, "" under which a
    known family recognises the keys."""
    keys = list(keys)
    for prefix in COMFY_DENOISER_PREFIXES:
        mapping = {k[len(prefix):]: k for k in keys if k.startswith(prefix)} if prefix else {k: k for k in keys}
        if not mapping:
            continue
        sub_shapes = {s: shapes[h] for s, h in mapping.items() if h in shapes} if shapes else None
        for family in FAMILIES:
            if family.detect_host(list(mapping), sub_shapes, None) is not None:
                return prefix, mapping, sub_shapes
    return None, {}, None


def detect_host(keys: Sequence[str], shapes: Optional[Mapping] = None, config: Optional[dict] = None,
                config_name: str = ""):
    """(family, variant or None, structural config) of a denoiser state dict given without prefix, else None.

    `config` / `config_name`: ComfyUI's `model_config.unet_config` and the model config's class name, when the
    host is a ComfyUI model; they make the variant exact (e.g. Kontext vs dev cannot be told from keys)."""
    for family in FAMILIES:
        found = family.detect_host(keys, shapes, config, config_name)
        if found is not None:
            return family, found[0], found[1]
    return None


def detect_diffusers(keys: Sequence[str], shapes: Optional[Mapping] = None):
    """(family, variant or None, config) of a diffusers denoiser state dict (UNet2DConditionModel,
    FluxTransformer2DModel, ...), else None."""
    for family in FAMILIES:
        found = family.detect_diffusers(keys, shapes)
        if found is not None:
            return family, found[0], found[1]
    return None


def arch_of_clip(comfy_names: Iterable[str]) -> Optional[ArchSpec]:
    """The variant a ComfyUI CLIP object belongs to, from the encoders it holds (clip_l + clip_g = SDXL,
    clip_l + t5xxl = Flux.1, t5xxl alone = Chroma, ...), or None when that does not decide it."""
    names = set(comfy_names)
    for family in FAMILIES:
        variant = family.variant_of_clip(names)
        if variant is not None:
            return variant
    return None


def _metadata_matches() -> list[tuple[str, ArchSpec]]:
    pairs = [(m.lower(), v) for v in ARCHS.values() for m in v.metadata.get("match", ())]
    return sorted(pairs, key=lambda item: -len(item[0]))


def arch_of_metadata(metadata: Mapping[str, str]) -> Optional[ArchSpec]:
    """The variant a LoRA's header names (`modelspec.architecture`, `ss_base_model_version`, `ss_model_type`,
    kohya's `ss_v2`), or None. Longest known prefix wins (so `flux_kontext` is Kontext, not Flux.1-dev)."""
    meta = metadata or {}
    pairs = _metadata_matches()
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_model_type"):
        value = str(meta.get(key) or "").strip().lower()
        if not value or value in ("none", "null"):
            continue
        for prefix, variant in pairs:
            if value.startswith(prefix):
                return variant
    if str(meta.get("ss_v2", "")).strip() == "True":
        return ARCHS.get("SD2")
    return None


def family_of_marks(names: Iterable[str]) -> Optional[Family]:
    """The family whose key marks (`Family.markers`) most of these module names carry, or None: names a LoRA's
    family when its variant cannot be told (tiny or pruned shapes)."""
    import re

    counts = {f: sum(1 for n in names if any(re.search(p, n) for p, _ in f.markers)) for f in FAMILIES}
    best = max(counts.values(), default=0)
    winners = [f for f, c in counts.items() if c == best]
    return winners[0] if best and len(winners) == 1 else None


def family_of_metadata(metadata: Mapping[str, str]) -> Optional[Family]:
    """The family a LoRA's header names without naming the variant (a family's `metadata_match`, e.g.
    ai-toolkit's `sd_3`), or None. Only asked when `arch_of_metadata` finds no variant."""
    meta = metadata or {}
    for key in ("modelspec.architecture", "ss_base_model_version", "ss_model_type"):
        value = str(meta.get(key) or "").strip().lower()
        if not value or value in ("none", "null"):
            continue
        for family in FAMILIES:
            if any(value.startswith(prefix) for prefix in family.metadata_match):
                return family
    return None


def base_model_name(lora_file) -> tuple[str, str]:
    """(readable base-model name, source) of a LoRA for reports: ("SDXL", "metadata"), ("Flux.1", "keys"),
    ("SD3", "metadata") for a model named but not described here, ("", "") when nothing tells."""
    variant = arch_of_metadata(lora_file.metadata)
    if variant is not None:
        return variant.metadata.get("short", variant.name), "metadata"
    family = family_of_metadata(lora_file.metadata)
    if family is not None:
        variant = detect_lora(lora_file)
        return (variant.metadata.get("short", variant.name) if variant is not None else family.title), "metadata"
    named = named_base_model(lora_file.metadata)
    if named:
        return named, "metadata"
    variant = detect_lora(lora_file)
    if variant is not None:
        return variant.metadata.get("short", variant.name), "keys"
    return "", ""


def named_base_model(metadata: Mapping[str, str]) -> Optional[str]:
    """A readable base-model name from metadata that names a model LoRA Core does not know (e.g. 'SD3'),
    for reports; None when nothing is named."""
    meta = metadata or {}
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = str(meta.get(key) or "").strip()
        if value and value.lower() not in ("none", "null"):
            return value.split("/")[0]
    return None


@functools.lru_cache(maxsize=None)
def layout_key_map(arch_name: str):
    """KeyMap of a full-size variant from data alone (ComfyUI-style host keys, no weights; built once per
    process, read-only): which block / kind each module of a LoRA file is when no model is loaded.

    Variants whose layouts are the same data (Flux.1-dev / Kontext / Fill, the Qwen-Image editions: same
    family, structural config, modules and components) share one alias table; each keeps
    its own binding (so `KeyMap.arch` is the variant asked for). A family's aliases depend on the module and the
    structural config only (`Family.aliases`)."""
    import gc

    collecting = gc.isenabled()
    gc.disable()   # thousands of small objects, none of them garbage (see keymap.build_key_map)
    try:
        return _layout_key_map(arch_name)
    finally:
        if collecting:
            gc.enable()


def _layout_key_map(arch_name: str):
    from .bindings import bind_layout
    from .keymap import build_key_map

    binding = bind_layout(get_arch(arch_name))
    signature = _layout_signature(binding)
    shared = _LAYOUT_TABLES.get(signature)
    if shared is None:
        shared = _LAYOUT_TABLES[signature] = build_key_map(binding)
        return shared
    return shared.rebound((binding,))


_LAYOUT_TABLES: dict = {}   # layout signature -> the KeyMap built for the first variant with that layout


def _layout_signature(binding) -> tuple:
    """Everything a layout KeyMap is built from, except the variant's identity (hashable; ModuleDefs are frozen)."""
    config = binding.config
    try:
        hash(config)
    except TypeError:
        config = repr(config)
    return (binding.family.name, type(binding.config).__name__, config, tuple(binding.modules.items()),
            tuple(binding.host_pieces.items()), tuple(sorted(binding.params.items())),
            tuple(sorted(binding.component_specs.items())), tuple(sorted(binding.te_layers.items())))


# A layout must resolve at least this share of a file's module names to claim the file by its keys: a few names
# several families share (`final_layer.linear`, `img_in`, `proj_out`) make no file another family's.
MIN_DETECTED_SHARE = 0.5


def detect_lora(lora_file, use_metadata: bool = True) -> Optional[ArchSpec]:
    """The variant a LoRA file was made for: its metadata when that names a known model (unless
    `use_metadata` is False), else the full-size layout that resolves most of its modules, and at least half of
    them (ties broken by each family's shape votes), else None."""
    from ..formats import parse_modules

    from ..formats import split_key

    from_meta = arch_of_metadata(lora_file.metadata) if use_metadata else None
    if from_meta is not None:
        return from_meta
    modules = parse_modules(lora_file).modules
    names = set(modules) | {split[0] for split in map(split_key, lora_file.tensors) if split is not None}
    if not names:
        return None
    family = family_of_metadata(lora_file.metadata)   # the header names the family only: its variants compete
    candidates = [v.name for v in family.variants] if family is not None else list(ARCHS)
    counts = {name: sum(1 for n in names if layout_key_map(name).resolve(n) is not None) for name in candidates}
    best = max(counts.values())
    if best == 0 or best < MIN_DETECTED_SHARE * len(names):
        return None
    winners = [name for name, count in counts.items() if count == best]
    if len(winners) > 1:
        votes = {name: ARCHS[name].family.lora_votes(modules, ARCHS[name], layout_key_map(name)) for name in winners}
        top = max(votes.values())
        winners = [name for name in winners if votes[name] == top]
    if len(winners) > 1:
        # a tie between families that share their names (`Family.confusable_with`, `shares_names_with`): the
        # declaring family yields (a BFL-named block file with nothing only HunyuanVideo or Flux.2 has is taken as
        # Flux.1's, by far the commoner)
        fams = {ARCHS[n].family for n in winners}
        yielding = {f for f in fams if any(o.name in f.confusable_with or o.name in f.shares_names_with
                                           for o in fams if o is not f)}
        if yielding and yielding != fams:
            winners = [n for n in winners if ARCHS[n].family not in yielding]
    if len(winners) > 1:
        # still tied (a file that touches nothing variant-specific): the family's preferred variant, if all
        # winners are of one family; else undecided
        fams = {ARCHS[n].family for n in winners}
        preferred = next(iter(fams)).preferred_variant(winners) if len(fams) == 1 else None
        return ARCHS[preferred] if preferred else None
    return ARCHS[winners[0]]


def _confusable(a: Family, b: Family) -> bool:
    return a is not b and (b.name in a.confusable_with or a.name in b.confusable_with)


def confusable_family(lora_file, host_arch: Optional[ArchSpec]) -> Optional[ArchSpec]:
    """The variant of another family a LoRA file was decisively made for, when that family's names and shapes
    coincide with the host's (`Family.confusable_with`: a Flux.1 LoRA fits HunyuanVideo's blocks), else None.

    Decisive: the file's metadata names that family's variant; or, among the two families' full-size layouts, the
    other one resolves more of the file's module names (Flux's `img_in` / `txt_in`, HunyuanVideo's Tencent names,
    blocks past the other's depth), or as many with more of its shape / depth votes. A file both read alike is
    not decided (None): it loads."""
    if host_arch is None or lora_file is None:
        return None
    host = host_arch.family
    others = [f for f in FAMILIES if _confusable(host, f)]
    if not others:
        return None
    from_meta = arch_of_metadata(lora_file.metadata)
    if from_meta is not None:
        return from_meta if from_meta.family in others else None
    from ..formats import parse_modules

    modules = parse_modules(lora_file).modules
    if not modules:
        return None

    def best(family: Family):
        scored = []
        for variant in family.variants:
            km = layout_key_map(variant.name)
            count = sum(1 for n in modules if km.resolve(n) is not None)
            scored.append((count, variant))
        top = max(c for c, _ in scored)
        if top == 0:
            return 0, 0, None
        tied = [v for c, v in scored if c == top]
        votes = max(family.lora_votes(modules, v, layout_key_map(v.name)) for v in tied)
        return top, votes, tied[0]

    host_count, host_votes, _ = best(host)
    for family in others:
        count, votes, variant = best(family)
        if variant is not None and (count, votes) > (host_count, host_votes):
            return variant
    return None
