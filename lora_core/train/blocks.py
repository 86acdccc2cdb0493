"""Block selection for training: "IN04-IN08, M00, OUT03" lists and "IN04=0.5, OUT00-OUT02=2" LR factors.

Block ids follow the LDM layout: input_blocks.N -> INnn, middle_block -> M00, output_blocks.N -> OUTnn.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

from lora_core.errors import LoraValueError

_ID_RE = re.compile(r"^(IN|OUT)(\d{1,2})$|^(M|MID)(\d{0,2})$")


def _normalise(token: str) -> str:
    token = token.strip().upper()
    m = _ID_RE.match(token)
    if not m:
        raise LoraValueError(f"{token!r} is not a block id. Use IN00..IN11, M00, OUT00..OUT11 (ranges like IN04-IN08).")
    if m.group(1):
        return f"{m.group(1)}{int(m.group(2)):02d}"
    return "M00"


def _expand(item: str, valid: Sequence[str]) -> list[str]:
    if "-" in item:
        first, last = (_normalise(p) for p in item.split("-", 1))
        if first not in valid or last not in valid:
            bad = first if first not in valid else last
            raise LoraValueError(f"Block {bad} does not exist in this model; its blocks are {list(valid)}.")
        i, j = valid.index(first), valid.index(last)
        if i > j:
            raise LoraValueError(f"Block range {item!r} runs backwards; write it as {last}-{first}.")
        return list(valid[i:j + 1])
    block = _normalise(item)
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
