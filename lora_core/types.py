"""Plain data types shared by every layer of lora_core (no behaviour, no torch ops)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# Algorithms a ModuleLora can carry, with the tensor roles each uses (see adapters.py for the math).
#   lora : up, down, [mid]                      kohya LoRA/LoCon (mid = Tucker core), PEFT/diffusers
#   loha : w1a, w1b, w2a, w2b, [t1, t2]         LyCORIS LoHa
#   lokr : w1 | (w1a, w1b), w2 | (w2a, w2b), [t2]  LyCORIS LoKr
#   glora: a1, a2, b1, b2                       LyCORIS GLoRA
#   ia3  : weight  (+ flag on_input)            LyCORIS (IA)^3
#   oft  : blocks (3-D) [, rescale]             LyCORIS OFT / Diag-OFT
#   boft : blocks (4-D) [, rescale]             LyCORIS BOFT
#   full : diff                                 full / diff weight
#   norm : w_norm                               LyCORIS norm layers (treated as a diff)
#   set  : set_weight                           replace the weight outright
ALGORITHMS = ("lora", "loha", "lokr", "glora", "ia3", "oft", "boft", "full", "norm", "set")


@dataclass
class ModuleLora:
    """One adapted module of a LoRA file, in a writer-independent form.

    `name` is the module prefix exactly as the file spells it (e.g. "lora_unet_input_blocks_1_1_proj_in",
    "unet.down_blocks.0.attentions.0.proj_in"); key mapping resolves it to a host weight.
    """

    name: str
    algo: str
    tensors: dict[str, torch.Tensor]
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None
    bias_diff: Optional[torch.Tensor] = None   # diff_b / b_norm: a delta for the module's bias
    flags: dict = field(default_factory=dict)  # e.g. {"on_input": True} for (IA)^3
    source_keys: tuple[str, ...] = ()          # every file key this module consumed
    source: str = ""                           # the file it came from (for messages)


@dataclass
class LoraFile:
    """A LoRA file read from disk (or built in memory)."""

    path: Optional[str]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path or "<in-memory LoRA>"
