"""Block selection for training: "IN04-IN08, M00, OUT03" lists and "IN04=0.5, OUT00-OUT02=2" LR factors.

Block ids are the model family's (lora_core.arch: SD's IN00.., M00, OUT00.., OTHER; Flux's IN, DB00.., SB00.., OUT,
Chroma's MOD). Ids are case-insensitive and numbers may drop their leading zero (IN4 = IN04, db3 = DB03); SD's
middle block is also M or MID.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from lora_core.errors import LoraValueError

_ID_RE = re.compile(r"^([A-Z]+)(\d{0,2})$")


def _describe(valid: Sequence[str]) -> str:
    """'IN00..IN11, M00, OUT00..OUT11' for a layout's ids (runs of one prefix shortened)."""
    runs: list[list[str]] = []
    for block in valid:
        prefix = _ID_RE.match(block).group(1) if _ID_RE.match(block) else block
        if runs and runs[-1][0] == prefix and _ID_RE.match(block).group(2):
            runs[-1].append(block)
        else:
            runs.append([prefix, block])
    return ", ".join(run[1] if len(run) == 2 else f"{run[1]}..{run[-1]}" for run in runs)


def _normalise(token: str, valid: Sequence[str]) -> str:
    token = token.strip().upper()
    if token in valid:
        return token
    m = _ID_RE.match(token)
    prefixes = {_ID_RE.match(b).group(1) for b in valid if _ID_RE.match(b)}
    if m and m.group(1) in ("M", "MID") and "M00" in valid and not m.group(2).strip("0"):
        return "M00"
    if not m or m.group(1) not in prefixes | {"M", "MID"}:
        numbered = [b for b in valid if _ID_RE.match(b) and _ID_RE.match(b).group(2)]
        by_prefix: dict = {}
        for b in numbered:
            by_prefix.setdefault(_ID_RE.match(b).group(1), []).append(b)
        same = max(by_prefix.values(), key=len) if by_prefix else []
        example = f" (ranges like {same[min(4, len(same) - 2)]}-{same[-1]})" if len(same) > 1 else ""
        raise LoraValueError(f"{token!r} is not a block id. Use {_describe(valid)}{example}.")
    return f"{m.group(1)}{int(m.group(2)):02d}" if m.group(2) else m.group(1)


def _expand(item: str, valid: Sequence[str]) -> list[str]:
    if "-" in item:
        first, last = (_normalise(p, valid) for p in item.split("-", 1))
        if first not in valid or last not in valid:
            bad = first if first not in valid else last
            raise LoraValueError(f"Block {bad} does not exist in this model; its blocks are {list(valid)}.")
        i, j = valid.index(first), valid.index(last)
        if i > j:
            raise LoraValueError(f"Block range {item!r} runs backwards; write it as {last}-{first}.")
        return list(valid[i:j + 1])
    block = _normalise(item, valid)
    if block not in valid:
        raise LoraValueError(f"Block {block} does not exist in this model; its blocks are {list(valid)}.")
    return [block]


def parse_block_list(text: str, valid: Sequence[str]) -> Optional[list[str]]:
    """"" or "all" -> None (every block); otherwise the listed ids, ranges expanded in layout order."""
    text = (text or "").strip()
    if not text or text.lower() == "all":
        return None
    valid = list(valid)
    chosen: set = set()
    for item in re.split(r"[,\s]+", text):
        if item:
            chosen.update(_expand(item, valid))
    return [b for b in valid if b in chosen]


def parse_block_lr(text: str, valid: Sequence[str]) -> dict[str, float]:
    """"IN04=0.5, OUT00-OUT02=2" -> {block: factor}; unlisted blocks keep factor 1; 0 freezes a block."""
    text = (text or "").strip()
    factors: dict[str, float] = {}
    if not text:
        return factors
    valid = list(valid)
    for item in re.split(r"[,;]+", text):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise LoraValueError(f"Block LR entry {item!r} needs the form BLOCK=factor, e.g. IN04=0.5 or OUT00-OUT02=2.")
        blocks, value = item.split("=", 1)
        try:
            factor = float(value)
        except ValueError:
            raise LoraValueError(f"Block LR factor {value.strip()!r} in {item!r} is not a number.") from None
        if not math.isfinite(factor) or factor < 0:
            raise LoraValueError(f"Block LR factor in {item!r} must be a finite number >= 0.")
        for block in _expand(blocks.strip(), valid):
            factors[block] = factor
    return factors
