"""Validation loss: the training objective on images the LoRA does not train on, at fixed noise and noise levels,
so the curve is comparable from one evaluation to the next and a LoRA that starts to overfit (training loss
still falling, validation loss rising) shows while it trains.

* The held-out images are a share of the dataset (`split_dataset`: drawn from the seed, so the same seed holds out
  the same images, and the training set is the rest) and/or a second folder (`load_validation_folder`: fitted to
  the training dataset's buckets the way its own images were).
* Each evaluation runs every validation image at `LEVELS` fixed noise levels (DDPM timesteps at the 1/8, 3/8, 5/8,
  7/8 points of the schedule; flow sigmas at the same points of the model's shifted schedule), each with its own
  fixed noise (a generator seeded by (seed, image, level)), the caption as written (no shuffle / dropout), and the
  loss of a training step (MSE in the model's prediction space, min-SNR weighted like training for DDPM models).
  Latents are encoded once; text encodings once unless the text encoder trains.
* It runs through `hooks.outside_training` (no grad, eval mode, RNG restored): with or without validation the
  trained LoRA is the same.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from typing import Optional, Sequence

import torch

from lora_core.errors import LoraFileError, LoraValueError

from .dataset import Sample, TrainDataset, load_folder
from .hooks import TrainHook, due, outside_training

log = logging.getLogger("lora_core.train")

LEVELS = (0.125, 0.375, 0.625, 0.875)
MAX_SPLIT = 0.5


def split_dataset(dataset: TrainDataset, share: float, seed: int) -> tuple[TrainDataset, list[Sample]]:
    """(training dataset without the held-out images, held-out samples). `share` of the images (at least one when
    > 0, rounded), chosen by a generator seeded from `seed`; 0 holds out nothing."""
    if not (isinstance(share, (int, float)) and 0.0 <= share <= MAX_SPLIT):
        raise LoraValueError(f"validation_split must be between 0 and {MAX_SPLIT} (the share of the dataset's images "
                             f"held out for the validation loss), got {share!r}.")
    if share == 0:
        return dataset, []
    n = len(dataset.samples)
    k = max(1, round(share * n))
    if k >= n:
        raise LoraValueError(f"validation_split {share} would hold out all {n} image(s) of the dataset and leave none "
                             f"to train on: add images, lower the split, or give a validation_folder instead.")
    order = list(range(n))
    random.Random(int(seed) * 2_654_435_761 + 97).shuffle(order)
    held = set(order[:k])
    train = dataclasses.replace(dataset, samples=[s for i, s in enumerate(dataset.samples) if i not in held])
    return train, [s for i, s in enumerate(dataset.samples) if i in held]


def load_validation_folder(folder: str, like: TrainDataset) -> list[Sample]:
    """The images of `folder` (with same-name .txt captions), fitted to `like`'s buckets the way its own images
    were. Refuses a folder that holds training images (the loss would not be held out)."""
    fit = dict(getattr(like, "fit", None) or {})
    if not fit:
        fit = {"resolution": like.resolution, "bucketing": len(like.buckets) > 1}
    try:
        samples = load_folder(folder, missing_caption="error", **fit).samples
    except LoraFileError as error:
        raise LoraFileError(f"validation folder: {error}") from None
    training = {os.path.realpath(s.source) for s in like.samples if s.source and os.path.isfile(s.source)}
    shared = [os.path.basename(s.source) for s in samples if os.path.realpath(s.source) in training]
    if shared:
        raise LoraValueError(f"validation folder {folder} holds {len(shared)} training image(s), e.g. {shared[:3]}: a "
                             f"validation loss must come from images the LoRA does not train on. Use a separate folder "
                             f"(or validation_split).")
    return samples


def fixed_levels(objective) -> torch.Tensor:
    """The evaluation's noise levels: DDPM timestep indices, or flow sigmas on the model's own schedule."""
    if objective.is_flow:
        from .objective import time_shift

        return time_shift(objective.shift, torch.tensor(LEVELS, dtype=torch.float32))
    n = objective.alphas_cumprod.shape[0]
    return torch.tensor([min(n - 1, int(q * n)) for q in LEVELS], dtype=torch.long)


class ValidationLoss(TrainHook):
    """The validation-loss curve [(step, loss)]: evaluated at the start of each run (unless the curve already has
    that step), every `every` steps and at the run's last step."""

    name = "validation"

    def __init__(self, samples: Sequence[Sample], every: int, seed: int = 0, description: str = ""):
        if not samples:
            raise LoraValueError("The validation set is empty.")
        if every < 1:
            raise LoraValueError(f"validate_every must be >= 1, got {every}.")
        self.samples, self.every, self.seed, self.description = list(samples), int(every), int(seed), description
        self.curve: list[tuple[int, float]] = []
        self._latents: dict[int, torch.Tensor] = {}
        self._conds: dict[int, object] = {}

    @property
    def sources(self) -> list[str]:
        return [s.source or f"sample {i}" for i, s in enumerate(self.samples)]

    # -------------------------------------------------------------- hook
    def begin(self, trainer) -> None:
        if not self.curve or self.curve[-1][0] != trainer.step:
            self.evaluate(trainer)

    def after_step(self, trainer) -> None:
        if due(trainer.step, self.every, trainer._end_step):
            self.evaluate(trainer)

    def state_dict(self) -> dict:
        return {"curve": [[int(s), float(v)] for s, v in self.curve], "sources": self.sources}

    def load_state_dict(self, state: dict, source: str = "") -> None:
        if not state:
            return
        if list(state.get("sources", [])) != self.sources:
            log.warning("LoRA Core: %s was validated on other images; its validation curve is not comparable and "
                        "starts again from this run.", source or "the resumed run")
            return
        self.curve = [(int(s), float(v)) for s, v in state.get("curve", [])]

    def metadata(self) -> dict:
        return {"lora_core.validation_loss": json.dumps([[s, round(v, 6)] for s, v in self.curve]),
                "lora_core.validation_images": str(len(self.samples)),
                "lora_core.validation_set": self.description or "held-out images",
                "lora_core.validation_levels": json.dumps(list(LEVELS))}

    # -------------------------------------------------------------- evaluation
    def evaluate(self, trainer) -> float:
        """The validation loss of the model as it is now; appended to the curve."""
        levels = fixed_levels(trainer.objective)
        total, count = 0.0, 0
        with outside_training(trainer):
            for i in range(len(self.samples)):
                latent = self._latent(trainer, i)
                cond = self._cond(trainer, i)
                for j in range(len(levels)):
                    level = levels[j:j + 1]
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 1_009 + j + 17)
                    noise = torch.randn((1,) + tuple(latent.shape), generator=gen).to(trainer.device)
                    loss = trainer.sample_losses(latent[None].to(trainer.device), noise, level,
                                                 [cond] if trainer.group_by_length else cond)
                    total += float(loss[0])
                    count += 1
        value = total / count
        self.curve = [(s, v) for s, v in self.curve if s != trainer.step] + [(trainer.step, value)]
        return value

    def _latent(self, trainer, i: int) -> torch.Tensor:
        if i not in self._latents:
            sample = self.samples[i]
            if sample.latent is not None:
                self._latents[i] = sample.latent.float()
            else:
                if trainer.encode_images is None:
                    raise LoraValueError("The validation images need a VAE to encode them: connect one.")
                self._latents[i] = trainer.encode_images(sample.image[None])[0].detach().to("cpu", torch.float32)
        return self._latents[i]

    def _cond(self, trainer, i: int):
        """The sample's text conditioning and, for a model that needs one, the conditioning of its own pixels
        (an image-to-video model's first frame)."""
        sample = self.samples[i]
        extra = trainer.sample_conditioning(sample, ("validation", i))
        cond = self._text_cond(trainer, i)
        return {**cond, **extra} if extra and isinstance(cond, dict) else cond

    def _text_cond(self, trainer, i: int):
        sample = self.samples[i]
        if sample.cond is not None:
            return sample.cond
        if i in self._conds:
            return self._conds[i]
        if trainer.encode_text is None:
            raise LoraValueError("The validation captions need a text encoder: connect a CLIP.")
        cond = trainer.encode_text([sample.caption])
        cond = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in cond.items()} \
            if isinstance(cond, dict) else cond.detach()
        if not trainer.config.train_text_encoder:   # a trained text encoder changes the encoding every step
            self._conds[i] = cond
        return cond


def validation_set(dataset: TrainDataset, share: float, folder: Optional[str], seed: int
                   ) -> tuple[TrainDataset, list[Sample], str]:
    """(training dataset, validation samples, description) from a split share and/or a folder path."""
    train, held = split_dataset(dataset, share, seed)
    parts = [f"{len(held)} of {len(dataset.samples)} dataset images (split {share:g}, seed {seed})"] if held else []
    if folder:
        extra = load_validation_folder(folder, dataset)
        parts.append(f"{len(extra)} image(s) of {os.path.basename(os.path.normpath(folder))}")
        held = held + extra
    return train, held, "; ".join(parts)
