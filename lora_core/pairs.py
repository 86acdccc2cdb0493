"""Which LoRA of a pair is for which expert of a two-expert model (Wan 2.2 A14B: high noise, low noise).

Wan 2.2's T2V-A14B and I2V-A14B run a high-noise expert for the early (noisy) steps and a low-noise expert for the
rest; the two have the same modules and shapes, so a LoRA's keys cannot tell which expert it was trained on
(dit-families.md §3.5). What does tell:

* musubi-tuner's `modelspec.timestep_range` = "min,max" (written with --min_timestep / --max_timestep,
  `training/trainer_base.py`; timesteps 0-1000, `docs/wan.md`: high noise e.g. "875,1000" for T2V, "900,1000" for
  I2V; low noise "0,875" / "0,900"). A range that covers both ends ("0,1000") is one LoRA trained on both experts;
* the file name: ai-toolkit saves `<name>_high_noise.safetensors` / `<name>_low_noise.safetensors` for a 2.2 14B run
  (`split_multistage_loras`), lightx2v and most uploads use `high_noise` / `low_noise` or `HIGH` / `LOW`.

Metadata wins over the name when both speak. `decide_pair` returns the assignment or raises naming both files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .errors import LoraValueError

HIGH, LOW, BOTH = "high", "low", "both"
ASSIGN_AUTO = "auto (metadata, then file names)"
ASSIGN_FIRST_HIGH = "lora_1 high noise, lora_2 low noise"
ASSIGN_FIRST_LOW = "lora_1 low noise, lora_2 high noise"
ASSIGN_SAME = "lora_1 on both experts"
ASSIGN_CHOICES = (ASSIGN_AUTO, ASSIGN_FIRST_HIGH, ASSIGN_FIRST_LOW, ASSIGN_SAME)
# the midpoint of the timestep scale: a high-noise range starts above it, a low-noise range ends below the top
_MID, _TOP = 500.0, 950.0
_NAME = re.compile(r"(?<![a-z])(high|low)(?:[_\- ]?noise)?(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Expert:
    """What one file says about its expert: `expert` high / low / both / None, and how that was found."""

    expert: Optional[str]
    source: str = ""          # "metadata" | "name" | ""
    detail: str = ""


def timestep_range(metadata: Mapping[str, str]) -> Optional[tuple[float, float]]:
    """musubi's `modelspec.timestep_range` as (min, max) on the 0-1000 scale, or None (absent or unreadable)."""
    value = str((metadata or {}).get("modelspec.timestep_range") or "").strip()
    parts = [p for p in re.split(r"[,\s]+", value.strip("[]()")) if p]
    if len(parts) != 2:
        return None
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    if hi <= 1.0:   # a 0-1 fraction
        lo, hi = lo * 1000.0, hi * 1000.0
    return (lo, hi) if lo < hi else None


def expert_of_metadata(metadata: Mapping[str, str]) -> Optional[str]:
    found = timestep_range(metadata)
    if found is None:
        return None
    lo, hi = found
    if lo >= _MID:
        return HIGH
    if hi <= _TOP:
        return LOW
    return BOTH


def expert_of_name(name: str) -> Optional[str]:
    """high / low from a file name's `high_noise` / `low_noise` / `HIGH` / `LOW` token; None when it has none or
    both."""
    stem = os.path.splitext(os.path.basename(str(name).replace("\\", "/")))[0]
    words = {m.group(1).lower() for m in _NAME.finditer(stem)}
    return next(iter(words)) if len(words) == 1 else None


def expert_of(name: str, metadata: Mapping[str, str]) -> Expert:
    by_meta = expert_of_metadata(metadata)
    if by_meta is not None:
        return Expert(by_meta, "metadata", f"modelspec.timestep_range {metadata.get('modelspec.timestep_range')}")
    by_name = expert_of_name(name)
    if by_name is not None:
        return Expert(by_name, "name", "file name")
    return Expert(None)


def partner_name(name: str, names: Sequence[str]) -> Optional[str]:
    """The other file of a pair in `names`: `name` with its high / low token swapped (case kept:
    `x_high_noise` -> `x_low_noise`, `x_HIGH` -> `x_LOW`), or None when no such file exists."""
    matches = list(_NAME.finditer(name))
    if not matches:
        return None
    m = matches[-1]
    word = m.group(1)
    other = "low" if word.lower() == "high" else "high"
    if word.isupper():
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    candidate = name[:m.start(1)] + other + name[m.end(1):]
    wanted = candidate.replace("\\", "/").lower()
    for n in names:
        if n.replace("\\", "/").lower() == wanted:
            return n
    return None


@dataclass(frozen=True)
class PairDecision:
    high: str
    low: str
    how: str


def decide_pair(first: tuple[str, Mapping[str, str]], second: Optional[tuple[str, Mapping[str, str]]],
                assign: str = ASSIGN_AUTO) -> PairDecision:
    """Which file goes to the high-noise expert and which to the low-noise one. `first` / `second`: (file name,
    metadata); `second` None means one file for both (only with `ASSIGN_SAME`, or when its metadata says it was
    trained on both experts). Raises LoraValueError naming both files when it cannot tell."""
    if assign not in ASSIGN_CHOICES:
        raise LoraValueError(f"assign {assign!r} is unknown: use one of {', '.join(map(repr, ASSIGN_CHOICES))}")
    name1 = first[0]
    if second is None or assign == ASSIGN_SAME:
        if assign == ASSIGN_SAME:
            return PairDecision(name1, name1, "one LoRA on both experts (assign)")
        e = expert_of(name1, first[1])
        if e.expert == BOTH:
            return PairDecision(name1, name1, f"one LoRA trained on both experts ({e.detail})")
        said = f" (its {e.detail} says {e.expert} noise)" if e.expert else ""
        raise LoraValueError(
            f"only one LoRA given ({name1!r}){said}, and no partner file with the opposite high / low noise name "
            f"was found: pick the second file in lora_2, or set assign to {ASSIGN_SAME!r} to use this one on both "
            "experts")
    name2 = second[0]
    if assign == ASSIGN_FIRST_HIGH:
        return PairDecision(name1, name2, "assign: lora_1 high noise")
    if assign == ASSIGN_FIRST_LOW:
        return PairDecision(name2, name1, "assign: lora_1 low noise")
    e1, e2 = expert_of(name1, first[1]), expert_of(name2, second[1])
    if {e1.expert, e2.expert} == {HIGH, LOW}:
        high, low = (name1, name2) if e1.expert == HIGH else (name2, name1)
        return PairDecision(high, low, f"{name1}: {e1.detail}; {name2}: {e2.detail}")
    for (n, e), (other, o) in (((name1, e1), (name2, e2)), ((name2, e2), (name1, e1))):
        if e.expert in (HIGH, LOW) and o.expert is None:
            high, low = (n, other) if e.expert == HIGH else (other, n)
            return PairDecision(high, low, f"{n}: {e.detail} says {e.expert} noise; {other} is the other expert")

    def said(name, e):
        return f"{name!r}: " + (f"{e.detail} says {e.expert}" if e.expert else
                                "no modelspec.timestep_range and no high / low noise in its name")

    raise LoraValueError(
        f"cannot tell which of {name1!r} and {name2!r} is the high-noise LoRA ({said(name1, e1)}; "
        f"{said(name2, e2)}): set assign to {ASSIGN_FIRST_HIGH!r} or {ASSIGN_FIRST_LOW!r}")
