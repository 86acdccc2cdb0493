"""Work that runs beside the training loop without changing it: sample previews (the host renders them) and the
validation loss (lora_core.train.validation). No ComfyUI imports: the host passes its renderer in.

A hook is given to `LoraTrainer(hooks=[...])`. The loop calls `begin(trainer)` once per `run()`, inside the
training context (the LoRA injected, so the model computes with it) before the first step, and
`after_step(trainer)` after every optimizer step (`trainer.step` is the step just finished). Its
`state_dict()` is saved in the resume state under its `name` and given back to `load_state_dict` on resume;
`metadata()` adds header keys to the saved file.

Whatever a hook computes runs `outside_training`: no autograd, every adapted module (and the LoRA) in eval mode,
and the global RNG states (torch CPU / CUDA, Python's `random`) put back afterwards - a sampler that seeds the
global generator (ComfyUI's prepare_noise calls torch.manual_seed) leaves no trace on the training run.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Sequence

import torch

from .state import restore_rng, rng_snapshot

log = logging.getLogger("lora_core.train")


class TrainHook:
    """Base class: every method is optional (no-ops here)."""

    name = "hook"

    def begin(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        pass

    def metadata(self) -> dict:
        return {}


def due(step: int, every: int, end: int) -> bool:
    """Whether a periodic hook runs after `step`: every `every` steps (0 = never) and at the run's last step."""
    return every > 0 and (step % every == 0 or step == end)


@contextlib.contextmanager
def outside_training(trainer):
    """No grad, eval mode for the adapted modules and the LoRA, global RNG states restored afterwards."""
    modules = list(trainer.backend.modules()) + [trainer.network]
    modes = [(m, m.training) for module in modules for m in module.modules()]
    rng = rng_snapshot()
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in modes:
            module.training = flag
        restore_rng(rng)


def image_grid(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1, R*H, P*W, 3) grid of R rows, each a (P, H, W, 3) batch (ComfyUI's IMAGE layout), side by side."""
    if not rows:
        raise ValueError("no preview rows")
    return torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)[None]


STATE_ROWS_BYTES = 64 * 1024 * 1024   # preview rows kept in a resume state (uint8), at most


class PreviewHook(TrainHook):
    """Renders sample images every `every` steps (and at the start and the end of each run) with
    `render(step) -> (P, H, W, 3)` float images in [0, 1]; `on_preview(step, images)` is told each new row (the
    host shows it while training runs). Rows form `grid()`.

    The rows are kept in the resume state (as 8-bit images, at most STATE_ROWS_BYTES: the first row and the latest
    ones that fit), so a run continued in chunks (`run = continue`) shows every chunk's rows in one grid. Rows of
    a run with other preview settings (`signature`: prompts, seed, sampler, size...) are not comparable and are
    not taken over.

    An exception from `render` stops training (its finished steps are saved, as for any failure) when it is one
    of `propagate` (the host's interrupt); any other is logged, previews are turned off for the rest of the run
    and `failure` says why - a preview never costs the training run."""

    name = "previews"

    def __init__(self, render: Callable[[int], torch.Tensor], every: int,
                 on_preview: Optional[Callable[[int, torch.Tensor], None]] = None,
                 propagate: tuple = (), at_start: bool = True, signature: str = ""):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.render, self.every, self.on_preview = render, int(every), on_preview
        self.propagate, self.at_start, self.signature = tuple(propagate), at_start, str(signature)
        self.rows: list[tuple[int, torch.Tensor]] = []
        self.failure: Optional[str] = None
        self.resumed: Optional[str] = None   # what happened to a resumed run's rows (None: nothing to resume)

    def begin(self, trainer) -> None:
        if self.at_start:
            self._preview(trainer)

    def after_step(self, trainer) -> None:
        if due(trainer.step, self.every, trainer._end_step):
            self._preview(trainer)

    def _preview(self, trainer) -> None:
        if self.failure is not None or (self.rows and self.rows[-1][0] == trainer.step):
            return
        try:
            with outside_training(trainer):
                images = self.render(trainer.step)
        except self.propagate:
            raise
        except Exception as error:  # noqa: BLE001 - reported, never fatal
            self.failure = f"step {trainer.step}: {type(error).__name__}: {error}"
            log.error("LoRA Core: preview at step %d failed (%s: %s); previews are off for the rest of this run, "
                      "training goes on.", trainer.step, type(error).__name__, error)
            return
        images = images.detach().float().cpu().clamp(0, 1)
        self.rows.append((trainer.step, images))
        if self.on_preview is not None:
            self.on_preview(trainer.step, images)

    def state_dict(self) -> dict:
        rows = [(step, (images * 255).round().to(torch.uint8)) for step, images in self.rows]
        kept, size = [], 0
        for index in [0] + list(range(len(rows) - 1, 0, -1)) if rows else []:
            nbytes = rows[index][1].numel()
            if kept and size + nbytes > STATE_ROWS_BYTES:
                break
            kept.append(index)
            size += nbytes
        kept.sort()
        return {"signature": self.signature, "steps": [int(rows[i][0]) for i in kept],
                "images": [rows[i][1] for i in kept], "dropped": len(rows) - len(kept)}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        if not state or not state.get("steps"):
            return
        where = source or "the resumed run"
        if state.get("signature") != self.signature:
            self.resumed = "not taken over: the earlier chunks previewed with other settings"
            log.warning("LoRA Core: the previews of %s were made with other preview settings; the grid starts "
                        "again from this run.", where)
            return
        rows = [(int(step), images.float() / 255) for step, images in zip(state["steps"], state["images"])]
        if any(images.shape[1:] != rows[0][1].shape[1:] for _, images in rows):
            self.resumed = "not taken over: rows of different sizes"
            return
        self.rows = rows
        dropped = int(state.get("dropped", 0))
        self.resumed = (f"{len(rows)} row(s) of the earlier chunks"
                        + (f" ({dropped} middle row(s) not kept: over {STATE_ROWS_BYTES >> 20} MiB)" if dropped else ""))

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self.rows]

    def grid(self) -> Optional[torch.Tensor]:
        return image_grid([images for _, images in self.rows]) if self.rows else None
