"""Resumable training state: LoRA weights, optimizer, scheduler, step, RNG states, loss history, config.

Written atomically (temp file + rename) next to the LoRA; read back with `torch.load(weights_only=True)`
so a state file can never run code.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Optional

import torch

from lora_core.errors import LoraFileError

STATE_FORMAT = "lora_core.train.state/1"


def rng_snapshot() -> dict:
    snap = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore_rng(snap: dict) -> None:
    if "torch" in snap:
        torch.set_rng_state(snap["torch"])
    if "python" in snap:
        random.setstate((snap["python_version"], tuple(snap["python"]), snap["python_gauss"]))
    if "cuda" in snap and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(snap["cuda"])
        except RuntimeError:  # a different GPU count: the run stays valid, only global CUDA RNG differs
            pass


def save_state(path: str, *, lora: dict, optimizer: dict, scheduler: dict, step: int, config: dict,
               session_id: str, started_at: float, losses: list, extra: Optional[dict] = None) -> str:
    payload = {
        "format": STATE_FORMAT, "lora": lora, "optimizer": optimizer, "scheduler": scheduler, "step": int(step),
        "config": config, "session_id": session_id, "started_at": float(started_at),
        "losses": [float(x) for x in losses], "rng": rng_snapshot(), "extra": extra or {},
    }
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return os.path.abspath(path)


def load_state(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise LoraFileError(f"Training state {path} does not exist: there is nothing to continue. Train a first "
                            f"chunk with the same output name, or start a new run.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LoraFileError(f"Training state {path} cannot be read ({type(error).__name__}: {error}). It may be "
                            f"truncated or from another tool; start a new run.") from error
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise LoraFileError(f"{path} is not a LoRA Core training state (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__}).")
    return payload
