"""Errors raised by lora_core.

Every message names the file, key or value at fault and says how to fix it. Raising one of these
never leaves a model half-patched: callers (the patch engine, the nodes) rely on that contract.
"""


class LoraCoreError(Exception):
    """Base class for every error lora_core raises on purpose."""


class LoraFileError(LoraCoreError):
    """A LoRA file is missing, unreadable, corrupt, unsafe or not a LoRA."""


class LoraFormatError(LoraCoreError):
    """A file's tensors do not form a known adapter (missing partner tensor, bad shape)."""


class LoraMatchError(LoraCoreError):
    """A LoRA does not fit the model: wrong architecture, shape mismatch, too few keys matched."""


class LoraValueError(LoraCoreError):
    """A bad argument: NaN/infinite strength, malformed block vector, unknown preset, ..."""
