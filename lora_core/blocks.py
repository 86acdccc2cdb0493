"""Block-weight vectors -> a per-block factor table (`BlockWeights`).

Four front ends, one result:

* **a1111** (hako-mikan's sd-webui-lora-block-weight): vectors by fixed block id, 17/26 values on SD1/SD2,
  12/20 on SDXL, or one of its presets. Ids a short (17/12) vector does not list get **0** (the extension's
  `to26` does this, so a 17-vector silences LoCon's conv-only blocks). `BASE` = the text encoders only; the
  non-block UNet modules (`OTHER`: time_embed, label_emb, out) keep 1, as A1111 never touches them.
  Letters: `R` = round(uniform 0..1, 3), `U` = round(uniform -0.5..1.5, 3) (the code's range, the README says
  otherwise), `X`, `X+d`, `X-d` = A (+/- d). Draws come from `random.Random(seed)` in vector order (A1111
  itself is unseeded).
* **inspire** (ComfyUI-Inspire-Pack, LoRA Loader (Block Weight)): ordinal. Entry 0 is BASE (text encoders and
  every non-block key: TE1, TE2, OTHER); entry i is the i-th *slot* the file has, in the order input blocks,
  middle block parts, output blocks. A slot is one `input_blocks.N` / `middle_block.N` / `output_blocks.N`
  number, so the middle block is three slots (`M00.0`, `M00.1`, `M00.2`) when a LoCon touches all of it. When
  the vector is shorter, the last value carries on; extra values are ignored; consecutive slots with the same
  number share one entry (Inspire compares only the number). Letters `R r` = uniform(0, 3) and `U u` =
  uniform(-1.5, 1.5) rounded to 2 places, drawn from numpy's legacy generator seeded `seed % 2**31`, in slot
  order, BASE last (exactly Inspire's sequence); `A`, `a` = A, A/2; `B`, `b` = B, B/2. An entry may be a
  space-separated sub-vector (one value per key of the block, in the file's key order; then the last carries
  on). `%` specs (`%default=0,in=1,out3-5=0.5,base=1`) are expanded against the present slots. `inverse`
  gives 1 - factor everywhere, BASE included. At least 12 values, at most one per possible slot + 1
  (SD 28, SDXL 22); the standard lengths are 17/27 (SD) and 12/21 (SDXL).
* **named** (ours): `IN04-IN08=0.5, M00=1, OUT*=0, TE2=0, *=1`. Entries are separated by `,`, `;` or new
  lines and applied in order, later entries overriding earlier ones. Unnamed blocks keep **1**. A selector is
  a block id, `BASE` (all text encoders), a range `IN04-OUT02` in layout order (either direction), or an
  fnmatch pattern (`OUT*`, `IN0?`, `*`); a `.element` suffix narrows it to one element group
  (`OUT03.attn2=0`, `IN*.ff=0.5`, `*.resnet=0`). Values: numbers (negative allowed), `A`, `B`, and A1111's
  `R`/`U`.
* **diffusers** `set_adapters` scale dicts: `parse_diffusers_scales`.

Element overrides (`element=`, all modes) use A1111's lbwe form, `BLOCKS:ELEMENTS:VALUE` directives separated
by commas or new lines, or an lbwe preset name (ATTNDEEPON, ...). BLOCKS and ELEMENTS are space-separated,
may start with `NOT`, may be empty (= all); an override *replaces* the block factor for matching elements.
Elements are matched by the element kinds of `lora_core.arch` (see `ELEMENT_GROUPS`), not by raw key
substrings as A1111 does.

`BlockWeights.factor(block_id, element=None, path=None)`: `element` is a `lora_core.arch` element kind
(attn1, attn2, ff, proj, norm, resnet_conv, emb, downsample, upsample, ...), `path` the module's canonical
path (LDM `middle_block.1.proj_in`). `path` is needed only for Inspire sub-vectors and for Inspire's three
middle-block slots when they differ in a way the element kind cannot tell apart; without it such a query
raises instead of guessing.

User presets: a JSON file `{"version": 1, "presets": {"NAME": {"mode": "a1111", "vector": "..."}}}`, written
atomically by `save_user_preset`. `load_user_presets` also reads A1111 `lbwpresets.txt` and Inspire
`lbw-preset*.txt` files (`NAME:VECTOR` lines; `#` comments and Inspire's `@` XY specs are skipped).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from .errors import LoraValueError

MODES = ("a1111", "inspire", "named")
PRESET_DIR = Path(__file__).resolve().parent / "presets"
OTHER = "OTHER"
MID = "M00"
BASE = "BASE"
INSPIRE_MIN_LENGTH = 12  # Inspire's validate() rejects shorter vectors
A1111_FLUX_LENGTH = 61


def _layouts() -> dict:
    """layout key ("sd1", "sdxl", "flux", "chroma", ...) -> BlockLayout, from every family (lora_core.arch)."""
    from .arch import ARCHS

    found: dict = {}
    for arch in ARCHS.values():
        found.setdefault(arch.layout_key, arch.layout)
    return found


def _layout(key: str):
    return _layouts()[key]


def _family_layouts(key: str) -> list[str]:
    """Layout keys of the family `key` belongs to (SD: sd1, sd2, sdxl), for "exists on ..." hints."""
    from .arch import ARCHS

    family = next(a.family for a in ARCHS.values() if a.layout_key == key)
    return list(dict.fromkeys(v.layout_key for v in family.variants))


def _family_label(key: str) -> str:
    """How users name the family of layout `key` in messages ("SD", "Flux")."""
    return {"flux": "Flux", "chroma": "Flux"}.get(key, key)


ARCH_NAMES = tuple(_layouts())
# Views of the family layouts under the names this module has always exported (lists, positions as data).
BLOCK_IDS: dict[str, list[str]] = {k: list(v.blocks) for k, v in _layouts().items()}
TEXT_ENCODER_BLOCKS = {k: tuple(v.te_blocks) for k, v in _layouts().items()}
A1111_LAYOUTS: dict[str, dict[int, list]] = {k: {n: list(ids) for n, ids in v.a1111.items()}
                                             for k, v in _layouts().items()}
INSPIRE_LAYOUTS: dict[str, dict[int, list]] = {k: {n: list(ids) for n, ids in v.inspire_layouts.items()}
                                               for k, v in _layouts().items()}
# BASE + every slot block + the extra middle parts: the longest vector with a meaning.
INSPIRE_MAX_LENGTH = {k: v.inspire_max_length for k, v in _layouts().items()}

# The SD element kinds and groups, under their old names (every layout carries its own: BlockLayout).
from .arch.families.sd import ELEMENT_GROUPS, ELEMENT_KINDS  # noqa: E402

_ATTENTION_KINDS = frozenset({"attn1", "attn2", "ff", "proj"})
_RESNET_KINDS = frozenset({"resnet_conv", "emb"})


# ---------------------------------------------------------------------------------------------- result

@dataclass
class BlockWeights:
    """Factor per block id of `arch` (a layout key: every block of its family layout is present), plus finer
    overrides."""

    arch: str
    factors: dict[str, float]
    element_factors: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> kind -> factor
    sub_factors: dict[str, float] = field(default_factory=dict)   # Inspire middle parts "M00.k" -> factor
    key_factors: dict[str, float] = field(default_factory=dict)   # Inspire sub-vectors: path -> factor
    absent: frozenset = frozenset()   # Inspire: blocks the file does not have (factor left at 1, never used)
    mode: str = ""
    vector: str = ""
    populated_vector: str = ""        # Inspire's populated_vector output for the same input
    notes: list = field(default_factory=list)

    def factor(self, block_id: str, element: Optional[str] = None, path: Optional[str] = None) -> float:
        """Factor of one module: its block id, element kind (optional) and canonical path (optional)."""
        if block_id not in self.factors:
            raise LoraValueError(f"unknown block id {block_id!r} for {self.arch}: known ids are "
                                 f"{', '.join(_layout(self.arch).blocks)}")
        if element is not None and element in self.element_factors.get(block_id, {}):
            return self.element_factors[block_id][element]
        if path is not None and path in self.key_factors:
            return self.key_factors[path]
        if self.sub_factors and block_id == _layout(self.arch).mid_block:
            return self._middle_factor(element, path)
        return self.factors[block_id]

    def _middle_factor(self, element: Optional[str], path: Optional[str]) -> float:
        """Inspire's middle block is up to three slots; pick the part by path, else by element kind."""
        if path is not None:
            m = re.match(r"middle_block\.(\d+)", path)
            if m and f"{MID}.{m.group(1)}" in self.sub_factors:
                return self.sub_factors[f"{MID}.{m.group(1)}"]
        values = set(self.sub_factors.values())
        if len(values) == 1:
            return values.pop()
        if element in _ATTENTION_KINDS and "M00.1" in self.sub_factors:
            return self.sub_factors["M00.1"]
        if element in _RESNET_KINDS:
            resnets = {v for k, v in self.sub_factors.items() if k != "M00.1"}
            if len(resnets) == 1:
                return resnets.pop()
        raise LoraValueError(
            f"the middle block has different Inspire factors per part ({self._sub_text()}); pass the module "
            f"path (middle_block.N...) to BlockWeights.factor to pick the part (element {element!r}, path {path!r})")

    def _sub_text(self) -> str:
        return ", ".join(f"middle_block.{k[-1]}={_fmt(v)}" for k, v in sorted(self.sub_factors.items()))

    def table(self) -> str:
        """One line per block: id, factor, what the block is; then element overrides and notes."""
        layout = _layout(self.arch)
        names = layout.descriptions
        base = layout.te_blocks
        lines = [f"Block weights ({self.mode or 'factors'}, {self.arch}):"]
        for block in layout.blocks:
            if block in self.absent:
                value = "-"
            elif block == layout.mid_block and self.sub_factors and len(set(self.sub_factors.values())) > 1:
                value = self._sub_text()
            else:
                value = _fmt(self.factors[block])
            tag = " [BASE]" if block in base else ""
            lines.append(f"  {block:<6} {value:<8} {names.get(block, '')}{tag}")
            for kind, v in sorted(self.element_factors.get(block, {}).items()):
                lines.append(f"         .{kind} = {_fmt(v)}")
        if self.absent:
            lines.append("  (-: not in this LoRA file, so no Inspire position maps to it)")
        if self.key_factors and len(set(self.key_factors.values())) > 1:
            lines.append(f"  sub-vectors: {len(self.key_factors)} modules have their own factor")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:g}"


def _uniform_table(arch: str, value: float, mode: str, vector: str) -> BlockWeights:
    return BlockWeights(arch, {b: float(value) for b in _layout(arch).blocks}, mode=mode, vector=vector)


# ------------------------------------------------------------------------------------------------ arch

def _arch_key(arch) -> str:
    """The layout key ('sd1', 'sd2', 'sdxl', 'flux', 'chroma', ...) of a name/alias ("SD15", "pony", "Flux.1-dev")
    or an ArchSpec."""
    from .arch import ArchSpec, get_arch

    if not isinstance(arch, (str, ArchSpec)):
        raise LoraValueError(f"architecture must be a name or an ArchSpec, got {arch!r}")
    try:
        spec = get_arch(arch)
    except LoraValueError as error:
        raise LoraValueError(f"{error}. Block weights support {', '.join(ARCH_NAMES)}.") from None
    if spec.layout_key not in _layouts():
        raise LoraValueError(f"no block layout for architecture {spec.name}; supported: {', '.join(ARCH_NAMES)}")
    return spec.layout_key


# --------------------------------------------------------------------------------------------- presets

def _read_preset_lines(path: Path) -> dict[str, str]:
    """NAME:VECTOR lines; comments (#), blank lines and Inspire's @ XY specs are skipped."""
    presets: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("@") or ":" not in line:
            continue
        name, _, vector = line.partition(":")
        presets[name.strip()] = vector.strip()
    return presets


def _read_elem_presets(path: Path) -> dict[str, str]:
    """A1111 elempresets.txt: NAME:BLOCKS:ELEMENTS:VALUE entries separated by blank lines."""
    presets: dict[str, str] = {}
    for chunk in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        chunk = chunk.strip()
        if chunk and ":" in chunk:
            name, _, body = chunk.partition(":")
            presets[name.strip()] = body.strip()
    return presets


def _a1111_preset_arch(vector: str) -> Optional[list[str]]:
    n = vector.count(",") + 1
    archs = [a for a in ARCH_NAMES if n in _layout(a).a1111]
    return archs or None


def _inspire_preset_arch(name: str) -> list[str]:
    """The layouts an Inspire preset is for, by its name's prefix (SD-, SDXL-, FLUX-); the longest prefix wins."""
    upper = name.upper()
    best = max((len(p) for a in ARCH_NAMES for p in _layout(a).inspire_preset_prefixes if upper.startswith(p)),
               default=0)
    return [a for a in ARCH_NAMES if any(upper.startswith(p) and len(p) == best
                                         for p in _layout(a).inspire_preset_prefixes)] if best else []


def _inspire_preset_label(name: str) -> str:
    archs = _inspire_preset_arch(name)
    labels = list(dict.fromkeys(_family_label(a) for a in archs))
    return "/".join(labels) or "another model"


_PRESET_CACHE: dict[str, dict[str, str]] = {}


def _shipped(mode: str) -> dict[str, str]:
    if mode not in _PRESET_CACHE:
        if mode == "a1111":
            _PRESET_CACHE[mode] = _read_preset_lines(PRESET_DIR / "a1111_lbwpresets.txt")
        elif mode == "inspire":
            # Inspire lists lbw-preset.txt then the user's lbw-preset.custom.txt; we ship its example file.
            presets = _read_preset_lines(PRESET_DIR / "inspire_lbw-preset.txt")
            presets.update(_read_preset_lines(PRESET_DIR / "inspire_lbw-preset.custom.txt.example"))
            _PRESET_CACHE[mode] = presets
        elif mode == "a1111_elements":
            _PRESET_CACHE[mode] = _read_elem_presets(PRESET_DIR / "a1111_elempresets.txt")
        else:
            _PRESET_CACHE[mode] = {}
    return _PRESET_CACHE[mode]


def _preset_archs(mode: str, name: str, vector: str) -> list[str]:
    if mode == "a1111":
        return _a1111_preset_arch(vector) or []
    if mode == "inspire":
        return _inspire_preset_arch(name)
    return list(ARCH_NAMES)


def list_presets(mode: str, arch=None) -> dict[str, str]:
    """Shipped presets of a mode, name -> vector, usable on `arch` (default: on any supported arch).

    a1111: the extension's defaults (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5).
    inspire: Inspire's lbw-preset.txt and lbw-preset.custom.txt.example (SD-*, SDXL-*, FLUX-*). named: none."""
    _check_mode(mode)
    wanted = [_arch_key(arch)] if arch is not None else list(ARCH_NAMES)
    return {name: vector for name, vector in _shipped(mode).items()
            if any(a in wanted for a in _preset_archs(mode, name, vector))}


def list_element_presets() -> dict[str, str]:
    """A1111's lbwe presets: name -> `BLOCKS:ELEMENTS:VALUE`."""
    return dict(_shipped("a1111_elements"))


def _unknown_preset(mode: str, name: str, arch: str, where: Mapping[str, str]) -> LoraValueError:
    names = list(where)
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    near += [n for n in names if n.lower() == name.lower() and n not in near]
    hint = f"nearest: {', '.join(near)}" if near else f"known: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
    return LoraValueError(f"unknown {mode} block-weight preset {name!r} for {arch} ({hint}); "
                          f"or give a vector ({_lengths_text(mode, arch)})")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise LoraValueError(f"unknown block-weight mode {mode!r}: use one of {', '.join(MODES)}")


def _lengths_text(mode: str, arch: str) -> str:
    if mode == "a1111":
        lengths = list(_layout(arch).a1111)
        if not lengths:
            return f"A1111's extension has no positional layout for {arch}: use named syntax"
        return "A1111 vectors on " + arch + " have " + " or ".join(map(str, lengths)) + " values"
    if mode == "inspire":
        if not _layout(arch).inspire_groups:
            return (f"Inspire Pack has no block layout for {arch} (every module takes the first value); its vectors "
                    f"have at least {INSPIRE_MIN_LENGTH} values")
        std = " or ".join(map(str, _layout(arch).inspire_layouts))
        return (f"Inspire vectors on {arch} have {INSPIRE_MIN_LENGTH} to {INSPIRE_MAX_LENGTH[arch]} values, "
                f"standard {std}")
    return "named syntax: BLOCK=VALUE entries"


# ---------------------------------------------------------------------------------------------- entry

def resolve_vector(arch, mode: str, vector: str, *, present_blocks=None, seed: int = 0, A: float = 1.0,
                   B: float = 1.0, inverse: bool = False, element: str = "") -> BlockWeights:
    """Resolve a block-weight vector (or preset name) to a factor per block of `arch`.

    `present_blocks` (Inspire mode): the blocks the LoRA file has on the model — block ids, optionally with
    `M00.0`/`M00.1`/`M00.2` for the middle-block parts, or a mapping slot -> ordered module paths (needed for
    sub-vectors; see `inspire_present_blocks`). Without it Inspire mode assumes the standard layout of the
    vector's length (17/27 SD, 12/21 SDXL). Ignored by the other modes."""
    _check_mode(mode)
    arch = _arch_key(arch)
    if not isinstance(vector, str):
        raise LoraValueError(f"block vector must be a string, got {type(vector).__name__}: {vector!r}")
    from .engine import MAX_STRENGTH

    for name, value in (("A", A), ("B", B)):
        if not math.isfinite(float(value)) or abs(float(value)) > MAX_STRENGTH:
            raise LoraValueError(f"block-weight variable {name}={value!r} is not a finite number between "
                                 f"{-MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    text = vector.strip()
    if not text:
        raise LoraValueError(f"empty {mode} block vector: give a preset name or values ({_lengths_text(mode, arch)})")
    if mode == "a1111":
        weights = _resolve_a1111(arch, text, seed, float(A), inverse)
    elif mode == "inspire":
        weights = _resolve_inspire(arch, text, present_blocks, seed, float(A), float(B), inverse)
    else:
        weights = _resolve_named(arch, text, seed, float(A), float(B), inverse)
    weights.vector = vector
    if element and element.strip():
        _apply_elements(weights, element.strip())
    return _check_range(weights)


def _check_range(weights: "BlockWeights") -> "BlockWeights":
    """Every factor within +-MAX_STRENGTH: a value like 1e39 fails here, naming the block, not at sampling."""
    from .engine import MAX_STRENGTH

    found = [(b, v) for b, v in weights.factors.items()]
    found += [(f"{b}.{k}", v) for b, kinds in weights.element_factors.items() for k, v in kinds.items()]
    found += [(b, v) for b, v in weights.sub_factors.items()] + [(p, v) for p, v in weights.key_factors.items()]
    for where, value in found:
        if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
            raise LoraValueError(f"block-weight factor {value:g} for {where} ({weights.mode} vector "
                                 f"{weights.vector[:60]!r}) is out of range: use values between {-MAX_STRENGTH:g} "
                                 f"and {MAX_STRENGTH:g}")
    return weights


# ---------------------------------------------------------------------------------------------- A1111

_X_TOKEN = re.compile(r"X(?:([+-])(\d+(?:\.\d*)?|\.\d+))?")


def _a1111_value(token: str, position: int, rng: random.Random, x: float) -> float:
    if token == "R":
        return round(rng.random(), 3)
    if token == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    m = _X_TOKEN.fullmatch(token)
    if m:
        offset = float(m.group(2)) if m.group(2) else 0.0
        return x - offset if m.group(1) == "-" else x + offset
    return _number(token, position, "a1111", "R, U, X, X+d, X-d")


def _number(token: str, position: int, mode: str, letters: str) -> float:
    try:
        value = float(token)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise LoraValueError(f"bad token {token!r} at position {position} of the {mode} block vector: "
                             f"use a number or one of {letters}")
    return value


def _resolve_a1111(arch: str, text: str, seed: int, x: float, inverse: bool) -> BlockWeights:
    vector_text = _a1111_lookup(arch, text)
    tokens = [t.strip() for t in vector_text.split(",")]
    ids = _a1111_ids(arch, len(tokens), text)
    rng = random.Random(seed)
    values = [_a1111_value(t, i + 1, rng, x) for i, t in enumerate(tokens)]
    if inverse:
        values = [1.0 - v for v in values]
    layout = _layout(arch)
    # ids a short layout does not list get 0 (A1111's to26); modules outside the blocks it has no position for
    # (SD's time_embed / label_emb / out) keep 1, as A1111 never touches them
    factors = {b: (1.0 if b in layout.other_blocks else layout.a1111_missing) for b in layout.blocks}
    for block, value in zip(ids, values):
        if block is None:
            continue   # a position this variant has no block for (the CLIP slot of hako's Flux layout on Chroma)
        for target in (layout.te_blocks if block == BASE else (block,)):
            factors[target] = float(value)
    notes = []
    missing = [b for b in layout.blocks if b not in ids and b not in layout.te_blocks + layout.other_blocks]
    if missing:
        notes.append(f"{len(ids)}-value vector: {', '.join(missing)} (conv-only blocks LoCon trains) get 0, "
                     f"as in A1111")
    return BlockWeights(arch, factors, mode="a1111", notes=notes)


def _a1111_lookup(arch: str, text: str) -> str:
    """A preset name -> its vector; `NAME:vector` lines -> the vector; anything with a comma is a vector."""
    if "," in text:
        return text.partition(":")[2] if ":" in text else text
    presets = _shipped("a1111")
    if text in presets:
        return presets[text]
    try:  # a single value is neither a valid length nor a preset: say so as a length error
        float(text)
    except ValueError:
        raise _unknown_preset("a1111", text, arch, list_presets("a1111", arch)) from None
    return text


def _a1111_ids(arch: str, length: int, text: str) -> list[str]:
    layouts = _layout(arch).a1111
    if length in layouts:
        return list(layouts[length])
    same_as_mine = {a for a in ARCH_NAMES if dict(_layout(a).a1111) == dict(layouts)}
    other = [a for a in _family_layouts(arch) if length in _layout(a).a1111 and a not in same_as_mine]
    if other:
        raise LoraValueError(f"the A1111 block vector has {length} values, the length of a {other[0]} vector; "
                             f"this model is {arch}: {_lengths_text('a1111', arch)} ({text[:60]!r})")
    foreign = [a for a in ARCH_NAMES if length in _layout(a).a1111 and a not in same_as_mine]
    if foreign:
        raise LoraValueError(f"the A1111 block vector has {length} values, a {_family_label(foreign[0])} vector; "
                             f"this model is {arch}: {_lengths_text('a1111', arch)}")
    raise LoraValueError(f"wrong A1111 block vector length {length}: {_lengths_text('a1111', arch)} "
                         f"({text[:60]!r})")


# -------------------------------------------------------------------------------------------- Inspire

_INSPIRE_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_INSPIRE_SPEC_GROUPS = ("in", "mid", "out", "double", "single")
_INSPIRE_LETTERS = ("R", "r", "U", "u", "A", "a", "B", "b")


@dataclass
class _Slot:
    """One Inspire position: a block (or middle part), its Inspire group and number, its module paths in order."""

    slot_id: str        # "IN04", "M00", "M00.1", "OUT03", "DB05"
    group: str          # the layout's Inspire group: "in", "mid", "out", "double", "single"
    number: int         # the block number Inspire compares (middle part index for M00.k)
    paths: Optional[list] = None
    rank: int = 0       # the group's place in Inspire's order
    block: str = ""     # the block id the slot belongs to ("M00" for M00.k)

    def __post_init__(self):
        if not self.block:
            self.block = self.slot_id.split(".")[0]


def inspire_present_blocks(targets: Iterable, arch=None) -> dict[str, list[str]]:
    """Inspire slots of a file from its resolved modules: slot id -> module paths, in the given order.

    `targets`: objects with `.block` and `.path` (lora_core.arch Target) or (block, path) pairs, in the order
    Inspire sees the keys (ComfyUI's load_lora order) when sub-vectors must match Inspire. Middle-block
    modules are split by `middle_block.N` into `M00.N`; modules of blocks Inspire gives no slot (text encoders,
    SD's OTHER, a DiT's IN / OUT) go to "BASE". `arch` names the layout (default: decided per block)."""
    layout = _layout(_arch_key(arch)) if arch is not None else None
    slots: dict[str, list[str]] = {}
    for item in targets:
        block, path = (item.block, item.path) if hasattr(item, "block") else item
        slot = block
        if block == MID and (layout is None or layout.mid_block == MID):
            m = re.match(r"middle_block\.(\d+)", path or "")
            slot = f"{MID}.{m.group(1)}" if m else MID
        elif layout is not None and layout.inspire_slot(block) is None:
            slot = BASE
        elif layout is None and (block.startswith("TE") or block in (OTHER, "IN", "OUT", "MOD")):
            slot = BASE
        slots.setdefault(slot, []).append(path)
    return slots


def _parse_slots(arch: str, present) -> list[_Slot]:
    """Ordered Inspire slots from `present_blocks` (ids or a mapping id -> paths)."""
    layout = _layout(arch)
    mapping = present if isinstance(present, Mapping) else {b: None for b in present}
    slots: list[_Slot] = []
    groups = [name for name, _ in layout.inspire_groups]
    for slot_id, paths in mapping.items():
        if slot_id == BASE or slot_id in layout.te_blocks or slot_id in layout.other_blocks:
            continue
        m = re.fullmatch(r"M00\.([0-2])", slot_id) if layout.mid_block else None
        where = layout.inspire_slot(slot_id) if slot_id in layout.blocks else None
        if m:
            rank = groups.index("mid")
            slots.append(_Slot(slot_id, "mid", int(m.group(1)), _list_or_none(paths), rank, MID))
        elif slot_id == layout.mid_block:
            # middle_block.1: a LoRA's attention
            slots.append(_Slot(slot_id, "mid", 1, _list_or_none(paths), groups.index("mid"), MID))
        elif where is not None:
            slots.append(_Slot(slot_id, groups[where[0]], where[1], _list_or_none(paths), where[0]))
        else:
            extra = ", BASE or M00.0/M00.1/M00.2" if layout.mid_block else ", BASE"
            raise LoraValueError(f"unknown block id {slot_id!r} in present_blocks for {arch}: use "
                                 f"{', '.join(layout.blocks)}{extra}")
    if any(s.slot_id == MID for s in slots) and any(s.slot_id.startswith("M00.") for s in slots):
        raise LoraValueError("present_blocks lists both M00 and M00.N parts: give one form")
    slots = _split_middle(slots)
    return sorted(slots, key=lambda s: (s.rank, s.number))


def _split_middle(slots: list[_Slot]) -> list[_Slot]:
    """A plain M00 slot whose paths name middle_block.N parts becomes one slot per part (as Inspire counts)."""
    result = []
    for slot in slots:
        if slot.slot_id == MID and slot.paths:
            parts: dict[int, list] = {}
            for path in slot.paths:
                m = re.match(r"middle_block\.(\d+)", path or "")
                parts.setdefault(int(m.group(1)) if m else 1, []).append(path)
            if len(parts) > 1:
                result += [_Slot(f"{MID}.{k}", "mid", k, v, slot.rank, MID) for k, v in sorted(parts.items())]
                continue
        result.append(slot)
    return result


def _list_or_none(paths) -> Optional[list]:
    if paths is None or isinstance(paths, (bool, int, float)):
        return None
    return list(paths)


def _standard_slots(arch: str, length: int) -> list[_Slot]:
    layouts = _layout(arch).inspire_layouts
    if length not in layouts:
        raise LoraValueError(
            f"Inspire mode is ordinal over the blocks the LoRA file has: pass present_blocks to resolve a "
            f"{length}-value vector, or use a standard length ({' or '.join(map(str, layouts))} on {arch})")
    return _parse_slots(arch, layouts[length][1:])


def _inspire_expand_spec(text: str, slots: list[_Slot]) -> str:
    """Inspire's `%` spec: positions are 1-based among the present blocks of each group; values >= 0."""
    # Inspire's groups, in its order: every layout's slots belong to some of these
    numbers = {g: sorted({s.number for s in slots if s.group == g}) for g in _INSPIRE_SPEC_GROUPS}
    values: dict[str, list] = {}
    items = [x.strip() for x in text[1:].split(",")]
    default, base = 1.0, None
    for item in items:
        m = re.match(r"(default|base)=([0-9.]+)", item)
        if m and m[1] == "base":
            base = m[2]
        elif m:
            default = m[2]
    for g in numbers:
        values[g] = [default] * len(numbers[g])
    for position, item in enumerate(items, 1):
        if not item or re.match(r"(default|base)=([0-9.]+)", item):
            continue
        m = (re.match(r"(in|out|mid|double|single)([0-9]+)-([0-9]+)=([0-9.]+)", item)
             or re.match(r"(in|out|mid|double|single)([0-9]+)=([0-9.]+)", item)
             or re.match(r"(in|out|mid|double|single)=([0-9.]+)", item))
        if not m:
            raise LoraValueError(f"bad token {item!r} at position {position} of the Inspire % spec: use "
                                 f"default=V, base=V, in=V, in3=V, in2-5=V (also mid, out, double, single); V >= 0")
        group = m[1]
        value = _spec_number(m[m.lastindex], item, position)
        if m.lastindex == 4:
            indices = range(int(m[2]) - 1, int(m[3]))
        elif m.lastindex == 3:
            indices = [int(m[2]) - 1]
        else:
            values[group] = [value] * len(values[group])
            continue
        for x in indices:
            if 0 <= x < len(values[group]):
                values[group][x] = value
    if base is None:
        base = default
    return ",".join(str(v) for v in [base] + [v for g in _INSPIRE_SPEC_GROUPS for v in values[g]])


def _spec_number(text: str, item: str, position: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoraValueError(f"bad token {item!r} at position {position} of the Inspire % spec: "
                             f"{text!r} is not a number") from None


def _inspire_token_ok(token: str) -> bool:
    return token in _INSPIRE_LETTERS or _INSPIRE_NUMBER.fullmatch(token) is not None


def _inspire_tokens(arch: str, text: str, slots: Optional[list[_Slot]]) -> tuple[list[str], str]:
    """Split and validate like Inspire (colon, preset lookup); returns (entries, the vector text used)."""
    source = text
    if text.startswith("%"):
        if slots is None:
            raise LoraValueError("an Inspire % spec needs present_blocks (the blocks the LoRA file has)")
        text = _inspire_expand_spec(text, slots)
    parts = text.split(":")
    body = parts[1] if len(parts) > 1 else parts[0]
    entries = body.split(",")
    if len(entries) == 1 and not _inspire_entry_ok(entries[0]):
        name = entries[0].strip()
        presets = _shipped("inspire")
        if name not in presets:
            raise _unknown_preset("inspire", name, arch, list_presets("inspire", arch))
        if arch not in _inspire_preset_arch(name):
            raise LoraValueError(f"Inspire preset {name!r} is for {_inspire_preset_label(name)}, "
                                 f"not {arch}: pick one of {', '.join(list(list_presets('inspire', arch))[:8])} ...")
        body = presets[name]
        entries = body.split(",")
    for position, entry in enumerate(entries, 1):
        if not _inspire_entry_ok(entry):
            raise LoraValueError(f"bad token {entry.strip()!r} at position {position} of the Inspire block "
                                 f"vector: use numbers like -1, 0.5 (no '.5' or '1e-1'), R r U u A a B b, or "
                                 f"a space-separated sub-vector of those")
    n = len(entries)
    # On a family Inspire has no groups for, it reads only the first value (BASE) of any vector it accepts.
    longest = INSPIRE_MAX_LENGTH[arch] if _layout(arch).inspire_groups else n
    if n < INSPIRE_MIN_LENGTH or n > longest:
        what = " (from the % spec " + repr(source[:40]) + ")" if source.startswith("%") else ""
        other = ""
        if n > longest:
            other = (" — a vector for another architecture" + (" (Flux has 58)" if n == 58 and arch not in
                                                                   ("flux", "chroma") else "")
                     + "; this model is " + arch)
        raise LoraValueError(f"wrong Inspire block vector length {n}{what}{other}: {_lengths_text('inspire', arch)}")
    return [e.strip() for e in entries], body


def _inspire_entry_ok(entry: str) -> bool:
    if _inspire_token_ok(entry):
        return True
    return all(_inspire_token_ok(t.strip()) for t in entry.strip().split(" "))


def _inspire_values(entry: str, rng: np.random.RandomState, A: float, B: float) -> list[float]:
    """One entry -> its values, drawing random numbers in Inspire's order (left to right)."""
    def one(token: str) -> float:
        if token in ("U", "u"):
            return float(round(rng.uniform(-1.5, 1.5), 2))
        if token in ("R", "r"):
            return float(round(rng.uniform(0, 3.0), 2))
        return {"A": A, "a": A / 2, "B": B, "b": B / 2}.get(token) if token in _INSPIRE_LETTERS[4:] else float(token)

    if _inspire_token_ok(entry):
        return [one(entry)]
    return [one(t) for t in entry.split(" ")]


def _norm_value(value: float):
    return 1 if value == 1 else 0 if value == 0 else value


def _resolve_inspire(arch: str, text: str, present, seed: int, A: float, B: float,
                     inverse: bool) -> BlockWeights:
    slots = _parse_slots(arch, present) if present is not None else None
    entries, body = _inspire_tokens(arch, text, slots)
    notes = []
    if not _layout(arch).inspire_groups:
        slots = []
        notes.append(f"Inspire Pack has no block layout for {arch}: as in Inspire, every module takes the BASE "
                     f"value (the first one); use named syntax to weight its blocks")
    elif slots is None:
        slots = _standard_slots(arch, len(entries))
        notes.append(f"no present_blocks: assumed the standard {len(entries)}-value Inspire layout")
    rng = np.random.RandomState(int(seed) % (2 ** 31))
    flip = (lambda r: 1 - r) if inverse else (lambda r: r)
    populated: list = []
    slot_factor: dict[str, float] = {}
    key_factors: dict[str, float] = {}
    pending: list[float] = []
    ratio, vector_i, last_number = 1.0, 1, None
    carried = []
    for slot in slots:
        if last_number != slot.number and len(entries) <= vector_i:
            carried.append(slot.slot_id)
        for path in (slot.paths or [None]):
            if last_number != slot.number and len(entries) > vector_i:
                pending = _inspire_values(entries[vector_i], rng, A, B)
                ratio = pending.pop(0)
                populated.append(_norm_value(flip(ratio)))
                if pending and slot.paths is None:
                    raise LoraValueError(
                        f"Inspire sub-vector {entries[vector_i]!r} (position {vector_i + 1}) gives one value per "
                        f"module of {slot.slot_id} in the file's key order: pass present_blocks as a mapping "
                        f"block -> module paths (inspire_present_blocks)")
                vector_i += 1
            elif pending:
                ratio = pending.pop(0)
            last_number = slot.number
            slot_factor.setdefault(slot.slot_id, float(flip(ratio)))
            if path is not None:
                key_factors[path] = float(flip(ratio))
    base_ratio = flip(_inspire_values(entries[0], rng, A, B)[0])
    populated.insert(0, _norm_value(base_ratio))
    ignored = len(entries) - vector_i
    if ignored > 0:
        notes.append(f"{ignored} trailing value(s) ignored: the file has only {vector_i - 1} block position(s)")
    if carried:
        notes.append(f"vector shorter than the file's blocks: {', '.join(carried)} carry the last value")
    return _inspire_table(arch, slots, slot_factor, key_factors, float(base_ratio), populated, notes)


def _inspire_table(arch, slots, slot_factor, key_factors, base, populated, notes) -> BlockWeights:
    layout = _layout(arch)
    factors = {b: 1.0 for b in layout.blocks}
    for block in layout.blocks:   # Inspire's BASE: every key outside its groups (SD3's joint blocks too)
        if block in layout.te_blocks + layout.other_blocks or (layout.inspire_slot(block) is None
                                                               and block != layout.mid_block):
            factors[block] = base
    sub = {}
    for slot in slots:
        if slot.slot_id.startswith("M00."):
            sub[slot.slot_id] = slot_factor[slot.slot_id]
        else:
            factors[slot.block] = slot_factor[slot.slot_id]
    if sub:
        factors[MID] = sub.get("M00.1", next(iter(sub.values())))
    present = {s.block for s in slots}
    absent = frozenset(b for b in layout.blocks if b not in present and layout.inspire_slot(b) is not None)
    if len(set(key_factors.values())) <= 1:
        key_factors = {}  # no sub-vector in effect: the block factors say everything
    return BlockWeights(arch, factors, sub_factors=sub, key_factors=key_factors, absent=absent, mode="inspire",
                        populated_vector=",".join(map(str, populated)), notes=notes)


# ---------------------------------------------------------------------------------------------- named

def _named_entries(text: str) -> list[str]:
    return [e.strip() for e in re.split(r"[,;\n]", text) if e.strip()]


def _select_blocks(arch: str, selector: str, position: int, entry: str) -> list[str]:
    layout = _layout(arch)
    ids = list(layout.blocks)
    sel = selector.strip().upper()
    if sel in layout.groups:
        return list(layout.groups[sel])
    if any(c in sel for c in "*?["):
        found = [b for b in ids if fnmatch.fnmatchcase(b, sel)]
        if not found:
            raise LoraValueError(f"pattern {selector!r} (entry {position}, {entry!r}) matches no {arch} block: "
                                 f"known ids are {', '.join(ids)}")
        return found
    if "-" in sel:
        first, _, last = sel.partition("-")
        for end in (first, last):
            _check_block_id(arch, end, position, entry)
        i, j = sorted((ids.index(first), ids.index(last)))
        return ids[i:j + 1]
    _check_block_id(arch, sel, position, entry)
    return [sel]


def _check_block_id(arch: str, block: str, position: int, entry: str) -> None:
    layout = _layout(arch)
    if block not in layout.blocks:
        elsewhere = [a for a in _family_layouts(arch) if block in _layout(a).blocks]
        hint = f" ({block} exists on {'/'.join(elsewhere)})" if elsewhere else ""
        near = difflib.get_close_matches(block, layout.blocks, n=3, cutoff=0.5)
        groups = ", ".join(layout.groups)
        raise LoraValueError(f"unknown block id {block!r} in entry {position} ({entry!r}) for {arch}{hint}"
                             + (f"; nearest: {', '.join(near)}" if near else "")
                             + f"; known ids: {', '.join(layout.blocks)}, {groups}")


def _select_elements(arch: str, name: str, position: int, entry: str) -> frozenset:
    groups = _layout(arch).element_groups
    key = name.strip().lower()
    if key not in groups:
        raise LoraValueError(f"unknown element {name!r} in entry {position} ({entry!r}) for {arch}: use one of "
                             f"{', '.join(sorted(groups))}")
    return groups[key]


def _named_value(token: str, position: int, rng: random.Random, A: float, B: float) -> float:
    if token == "A":
        return A
    if token == "B":
        return B
    if token == "R":
        return round(rng.random(), 3)
    if token == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    return _number(token, position, "named", "A, B, R, U")


def _resolve_named(arch: str, text: str, seed: int, A: float, B: float, inverse: bool) -> BlockWeights:
    rng = random.Random(seed)
    rules: list[tuple[list[str], Optional[frozenset], float]] = []
    for position, entry in enumerate(_named_entries(text), 1):
        selector, eq, value_text = entry.partition("=")
        if not eq or not selector.strip() or not value_text.strip():
            raise LoraValueError(f"bad token {entry!r} at position {position} of the named block vector: "
                                 f"write SELECTOR=VALUE, e.g. IN04-IN08=0.5, OUT*=0, OUT03.attn2=0, *=1")
        block_part, dot, element_part = selector.strip().partition(".")
        blocks = _select_blocks(arch, block_part, position, entry)
        elements = _select_elements(arch, element_part, position, entry) if dot else None
        value = _named_value(value_text.strip(), position, rng, A, B)
        rules.append((blocks, elements, 1.0 - value if inverse else value))
    default = 0.0 if inverse else 1.0
    layout = _layout(arch)
    factors = {b: default for b in layout.blocks}
    for blocks, elements, value in rules:
        if elements is None:
            for b in blocks:
                factors[b] = float(value)
    element_factors: dict[str, dict[str, float]] = {}
    for block in layout.blocks:
        for kind in layout.element_kinds:
            touched, value = False, None
            for blocks, elements, v in rules:
                if block in blocks and (elements is None or kind in elements):
                    value, touched = v, touched or elements is not None
            if touched:
                element_factors.setdefault(block, {})[kind] = float(value)
    return BlockWeights(arch, factors, element_factors=element_factors, mode="named")


# ------------------------------------------------------------------------------------ element (lbwe)

def _apply_elements(weights: BlockWeights, spec: str) -> None:
    """A1111 lbwe directives `BLOCKS:ELEMENTS:VALUE` (or an lbwe preset name) override matching elements."""
    arch = weights.arch
    presets = list_element_presets()
    if ":" not in spec:
        if spec not in presets:
            near = difflib.get_close_matches(spec, list(presets), n=5, cutoff=0.4)
            raise LoraValueError(f"unknown element preset {spec!r} (nearest: {', '.join(near) or ', '.join(presets)}); "
                                 f"or write BLOCKS:ELEMENTS:VALUE, e.g. IN05-OUT05:attn:0")
        spec = presets[spec]
    for position, directive in enumerate([d.strip() for d in spec.replace("\n", ",").split(",") if d.strip()], 1):
        if directive.count(":") != 2:
            raise LoraValueError(f"bad token {directive!r} at position {position} of the element spec: write "
                                 f"BLOCKS:ELEMENTS:VALUE (blocks and elements space-separated, may start with NOT)")
        block_text, element_text, value_text = directive.split(":")
        blocks = _lbwe_blocks(arch, block_text, position, directive)
        kinds = _lbwe_elements(arch, element_text, position, directive)
        value = _number(value_text.strip(), position, "element", "a number")
        every = frozenset(_layout(arch).element_kinds)
        for block in blocks:
            if kinds == every:
                weights.factors[block] = value  # every element: the block factor itself
                if block == MID:
                    weights.sub_factors = {k: value for k in weights.sub_factors}
            for kind in kinds:
                weights.element_factors.setdefault(block, {})[kind] = value


def _negated(text: str) -> tuple[bool, list[str]]:
    words = text.split()
    if words and words[0] == "NOT":
        return True, words[1:]
    return False, words


def _lbwe_blocks(arch: str, text: str, position: int, directive: str) -> list[str]:
    ids = list(_layout(arch).blocks)
    negate, words = _negated(text)
    chosen: list[str] = []
    for word in words:
        chosen += _select_blocks(arch, word, position, directive)
    if not words:
        chosen = list(ids)
    return [b for b in ids if (b in chosen) != negate]


def _lbwe_elements(arch: str, text: str, position: int, directive: str) -> frozenset:
    every = frozenset(_layout(arch).element_kinds)
    negate, words = _negated(text)
    chosen = frozenset().union(*(_select_elements(arch, w, position, directive) for w in words)) if words \
        else every
    return every - chosen if negate else chosen


# ----------------------------------------------------------------------------------------- diffusers

# diffusers UNet2DConditionModel: which down/up blocks have attention, and how many layers each.
_DIFFUSERS_ATTENTION = {"sd1": {"down": (0, 1, 2), "up": (1, 2, 3)}, "sd2": {"down": (0, 1, 2), "up": (1, 2, 3)},
                        "sdxl": {"down": (1, 2), "up": (0, 1)}}
_DIFFUSERS_UNET_KEYS = ("down", "mid", "up")


def parse_diffusers_scales(arch, scales: Union[dict, float]) -> BlockWeights:
    """diffusers `set_adapters` weights -> block factors, with diffusers' own expansion rules.

    A float scales everything. A dict has `text_encoder`, `text_encoder_2` (SDXL), and the UNet part either
    under `unet` or at the top level: `down` / `up` = scalar or {"block_i": scalar | [one per layer]}, `mid` =
    scalar or [scalar]; missing parts are 1. `down.block_i[j]` is IN(3i+j+1), `up.block_i[j]` is OUT(3i+j).
    Like diffusers' fallback, a block's resnets share its attention's scale and its down/upsampler takes
    layer 0's scale; blocks without attention, conv_in and OTHER stay 1. Where diffusers silently drops a
    scale (a block without attention, an unknown key) this raises. UNet models only (diffusers' block dicts
    exist for UNets)."""
    arch = _arch_key(arch)
    if arch not in _DIFFUSERS_ATTENTION:
        raise LoraValueError(f"diffusers set_adapters block scales exist for UNet models (sd1, sd2, sdxl), not {arch}; "
                             f"use named syntax for {arch} (e.g. 'DB00-DB09=0.5, SB*=0')")
    if not isinstance(scales, dict):
        value = _finite(scales, "scale")
        return _check_range(_uniform_table(arch, value, "diffusers", repr(scales)))
    top = dict(scales)
    unet = top.pop("unet", None)
    unet_parts = {k: top.pop(k) for k in _DIFFUSERS_UNET_KEYS if k in top}
    if unet is not None and unet_parts:
        raise LoraValueError("diffusers scales give the UNet both under 'unet' and as top-level down/mid/up: use one")
    te_keys = {"text_encoder": "TE1", "text_encoder_2": "TE2"}
    for key in top:
        if key not in te_keys or te_keys[key] not in BLOCK_IDS[arch]:
            raise LoraValueError(f"unknown diffusers scale key {key!r} for {arch}: use "
                                 f"{', '.join(k for k, b in te_keys.items() if b in BLOCK_IDS[arch])}, unet, "
                                 f"down, mid, up")
    factors = {b: 1.0 for b in BLOCK_IDS[arch]}
    for key, block in te_keys.items():
        if key in top:
            factors[block] = _finite(top[key], key)
    weights = BlockWeights(arch, factors, mode="diffusers", vector=json.dumps(scales, default=str))
    if unet is not None and not isinstance(unet, dict):
        value = _finite(unet, "unet")
        for block in factors:
            if block not in te_keys.values():
                factors[block] = value
        return _check_range(weights)
    _apply_unet_scales(weights, unet if unet is not None else unet_parts)
    return _check_range(weights)


def _finite(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoraValueError(f"diffusers scale {what}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise LoraValueError(f"diffusers scale {what}={value!r} is not finite")
    return number


def _apply_unet_scales(weights: BlockWeights, unet: dict) -> None:
    arch = weights.arch
    unknown = [k for k in unet if k not in _DIFFUSERS_UNET_KEYS]
    if unknown:
        raise LoraValueError(f"unknown diffusers UNet scale key(s) {unknown}: use down, mid, up")
    mid = unet.get("mid", 1.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise LoraValueError(f"diffusers 'mid' takes 1 scale, got {len(mid)}: {mid!r}")
        mid = mid[0]
    if isinstance(mid, dict):
        raise LoraValueError("diffusers 'mid' must be a number or a 1-element list, not a dict (diffusers #9184)")
    weights.factors[MID] = _finite(mid, "mid")
    for side, per_block, first in (("down", 2, 1), ("up", 3, 0)):
        _apply_side(weights, side, unet.get(side, 1.0), per_block, first, _DIFFUSERS_ATTENTION[arch][side])


def _apply_side(weights: BlockWeights, side: str, value, per_block: int, first: int, attention: tuple) -> None:
    blocks = value if isinstance(value, dict) else {f"block_{i}": value for i in attention}
    for name in blocks:
        m = re.fullmatch(r"block_(\d+)", name)
        if not m:
            raise LoraValueError(f"bad diffusers key {side}.{name!r}: use block_0, block_1, ...")
        if int(m.group(1)) not in attention:
            raise LoraValueError(f"diffusers {side}.{name} has no attention on {weights.arch}, so diffusers would "
                                 f"ignore its scale; blocks with attention: "
                                 f"{', '.join(f'block_{i}' for i in attention)}")
    for i in attention:
        layer_values = blocks.get(f"block_{i}", 1.0)
        if not isinstance(layer_values, (list, tuple)):
            layer_values = [layer_values] * per_block
        elif len(layer_values) == 1:
            layer_values = list(layer_values) * per_block
        if len(layer_values) != per_block:
            raise LoraValueError(f"diffusers {side}.block_{i} takes {per_block} scales (one per layer), got "
                                 f"{len(layer_values)}: {layer_values!r}")
        layer_values = [_finite(v, f"{side}.block_{i}") for v in layer_values]
        if side == "down":
            for j, v in enumerate(layer_values):
                weights.factors[f"IN{3 * i + j + 1:02d}"] = v
            sampler = f"IN{3 * i + 3:02d}"
            if i != _levels(weights.arch) - 1:  # the deepest level has no downsampler
                weights.factors[sampler] = layer_values[0]  # downsamplers.0 falls back to attentions.0
        else:
            for j, v in enumerate(layer_values):
                weights.factors[f"OUT{3 * i + j:02d}"] = v
            if i != _levels(weights.arch) - 1:  # the last up block has no upsampler
                weights.element_factors.setdefault(f"OUT{3 * i + 2:02d}", {})["upsample"] = layer_values[0]


def _levels(arch: str) -> int:
    """UNet resolution levels: SD1/SD2 have 4, SDXL 3."""
    return 3 if arch == "sdxl" else 4


# ------------------------------------------------------------------------------------- user presets

USER_PRESET_VERSION = 1


def load_user_presets(path, mode: Optional[str] = None) -> dict[str, dict]:
    """User presets: name -> {"mode": ..., "vector": ...}.

    `.json`: our store (see the module docstring). `.txt`: A1111 lbwpresets.txt / Inspire lbw-preset*.txt
    lines `NAME:VECTOR`; their mode is `mode`, else "inspire" for files named lbw-preset*, else "a1111"."""
    path = Path(path)
    if not path.is_file():
        raise LoraValueError(f"block preset file {str(path)!r} does not exist")
    if path.suffix.lower() == ".txt":
        txt_mode = mode or ("inspire" if path.name.lower().startswith("lbw-preset") else "a1111")
        _check_mode(txt_mode)
        return {name: {"mode": txt_mode, "vector": vector} for name, vector in _read_preset_lines(path).items()}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraValueError(f"block preset file {str(path)!r} is not valid JSON ({error}); fix or delete it") from None
    presets = data.get("presets") if isinstance(data, dict) else None
    if not isinstance(presets, dict):
        raise LoraValueError(f"block preset file {str(path)!r} has no \"presets\" object: expected "
                             f"{{\"version\": 1, \"presets\": {{\"NAME\": {{\"mode\": \"a1111\", \"vector\": \"...\"}}}}}}")
    result = {}
    for name, entry in presets.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("vector"), str) or entry.get("mode") not in MODES:
            raise LoraValueError(f"block preset {name!r} in {str(path)!r} needs \"mode\" (one of "
                                 f"{', '.join(MODES)}) and a string \"vector\", got {entry!r}")
        result[name] = {"mode": entry["mode"], "vector": entry["vector"]}
    return result


def check_vector(mode: str, vector: str) -> None:
    """Raise unless `vector` resolves in `mode` on at least one supported architecture."""
    _check_mode(mode)
    errors = []
    for arch in ("sd1", "sdxl", "flux"):
        present = None
        if mode == "inspire":
            present = INSPIRE_LAYOUTS[arch][max(INSPIRE_LAYOUTS[arch])][1:]
        try:
            resolve_vector(arch, mode, vector, present_blocks=present)
            return
        except LoraValueError as error:
            errors.append(f"{arch}: {error}")
    raise LoraValueError(f"{mode} vector {vector!r} does not resolve on any architecture: " + " | ".join(errors))


def save_user_preset(path, name: str, vector: str, mode: str) -> None:
    """Add or replace one preset in the JSON store at `path`, atomically (temp file + rename)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        raise LoraValueError(f"cannot save to {str(path)!r}: .txt preset files are read-only imports; "
                             f"save to a .json file")
    name = (name or "").strip()
    if not name or any(c in name for c in "/:\n"):
        raise LoraValueError(f"block preset name {name!r} must be non-empty and contain no '/', ':' or newline")
    check_vector(mode, vector)
    presets = load_user_presets(path) if path.is_file() else {}
    presets[name] = {"mode": mode, "vector": vector}
    text = json.dumps({"version": USER_PRESET_VERSION, "presets": presets}, indent=2, ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------ one vector, one file, one model

def touched_blocks(key_map, lora_file) -> tuple[str, ...]:
    """The blocks a LoRA file touches on the model of `key_map`, in layout order."""
    from .formats import parse_modules

    found = {t.block for t in (key_map.resolve(n) for n in parse_modules(lora_file).modules) if t is not None}
    order = {block: i for i, block in enumerate(getattr(key_map.arch, "blocks", ()))}
    return tuple(sorted(found, key=lambda b: (order.get(b, len(order)), b)))


def inspire_slots(key_map, lora_file) -> dict:
    """Inspire's present slots of a file on the model of `key_map`: slot -> module paths in file order (the
    middle block split into its parts, as Inspire counts them)."""
    from .formats import parse_modules

    targets = [key_map.resolve(name) for name in parse_modules(lora_file).modules]
    return inspire_present_blocks([t for t in targets if t is not None], key_map.arch)


def resolve_for_lora(key_map, lora_file, mode: str, vector: str, *, seed: int = 0, A: float = 1.0, B: float = 1.0,
                     inverse: bool = False, element: str = "") -> Optional[BlockWeights]:
    """What `vector` does to `lora_file` on the model of `key_map`: the one resolution every loader, stack,
    merge, sweep, hook and info node uses, so a vector means the same thing everywhere (Inspire's ordinal
    positions follow the blocks this file has on this model, its middle-block parts included). None for an
    empty vector (factor 1 everywhere)."""
    if not (vector or "").strip():
        return None
    if key_map.arch is None:
        raise LoraValueError("block weights need the model's architecture: connect the MODEL (or choose the "
                             "architecture)")
    present = inspire_slots(key_map, lora_file) if mode == "inspire" else None
    return resolve_vector(key_map.arch, mode, vector, present_blocks=present, seed=seed, A=A, B=B, inverse=inverse,
                          element=element)
