"""kohya-format saving: metadata (`ss_*`, `modelspec.*`), atomic writes, save-every-N keeping the last K.

A file is never overwritten unless the caller allows it, with one exception: a file written earlier by the
same training session (same `ss_session_id`), which is what continuing a run in chunks does.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from lora_core.errors import LoraFileError, LoraValueError
from lora_core.paths import output_path

from .algorithms import LYCORIS_ALGORITHMS, NETWORK_ARGS

IMPLEMENTATION_VERSION = "lora_core.train/1"
_STEP_FILE = "{name}-step{step:08d}.safetensors"
_STEP_RE = r"^{name}-step(\d{{8}})\.safetensors$"

def save_lora(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
              overwrite: bool = False) -> str:
    """Atomic safetensors write (lora_core.io's writer when present, else our own)."""
    try:
        from lora_core.io import save_lora_file
    except ImportError:  # pragma: no cover - io.py always exists in the assembled pack
        return _save_atomically(path, tensors, metadata, overwrite)
    return save_lora_file(path, tensors, metadata, overwrite=overwrite)


def _save_atomically(path: str, tensors, metadata, overwrite: bool) -> str:
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise LoraFileError(f"{path}: file already exists and overwrite is off. Pick another name or allow overwriting.")
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temp,
                  metadata={k: str(v) for k, v in metadata.items()})
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return os.path.abspath(path)


def read_session_id(path: str) -> Optional[str]:
    """ss_session_id from a safetensors header, or None when the file has none or is unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("ss_session_id")
    except Exception:
        return None


@dataclass
class OutputFiles:
    """Where a run writes: `<folder>/<name>.safetensors`, step files, and `<name>.state.pt`."""

    folder: str
    name: str

    def __post_init__(self):
        if not os.path.isdir(self.folder):
            raise LoraFileError(f"LoRA folder {self.folder} does not exist. Create it or check ComfyUI's "
                                f"models/loras setting.")
        # One rule for every file a run writes (final file, step files, state): inside the loras folder, short
        # enough for the file system with the longest suffix, no '..', no absolute path (lora_core.paths).
        final = output_path(self.folder, self.name, ".safetensors", what="output_name",
                            longest_suffix=_STEP_FILE.format(name="", step=0))
        self.folder = os.path.abspath(self.folder)
        self.name = os.path.relpath(final, self.folder)[: -len(".safetensors")].replace(os.sep, "/")
        os.makedirs(os.path.dirname(self.final), exist_ok=True)

    @property
    def final(self) -> str:
        return os.path.join(self.folder, self.name + ".safetensors")

    @property
    def state(self) -> str:
        return os.path.join(self.folder, self.name + ".state.pt")

    def step_file(self, step: int) -> str:
        return os.path.join(self.folder, _STEP_FILE.format(name=self.name, step=step))

    def step_files(self) -> list[tuple[int, str]]:
        folder = os.path.dirname(self.final)
        pattern = re.compile(_STEP_RE.format(name=re.escape(os.path.basename(self.name))))
        found = []
        for entry in os.listdir(folder):
            match = pattern.match(entry)
            if match:
                found.append((int(match.group(1)), os.path.join(folder, entry)))
        return sorted(found)

    def may_write(self, path: str, session_id: str, overwrite: bool) -> bool:
        if not os.path.exists(path) or overwrite:
            return True
        return read_session_id(path) == session_id

    def check_final(self, session_id: str, overwrite: bool, step_files: Sequence[int] = ()) -> None:
        """Refuse before training starts, not after, when the result could not be saved: the final file, and
        every step file this run will write (`step_files`), must be free or this session's own."""
        if not self.may_write(self.final, session_id, overwrite):
            raise LoraFileError(f"{self.final} already exists (from another training run) and overwrite is off. "
                                f"Choose another output name, continue that run, or allow overwriting.")
        for step in step_files:
            path = self.step_file(step)
            if not self.may_write(path, session_id, overwrite):
                raise LoraFileError(f"{path} already exists (a step file of another training run) and overwrite "
                                    f"is off, so this run could not save step {step}. Choose another output name, "
                                    f"delete that file, or allow overwriting.")

    def prune(self, keep_last: int, session_id: str) -> list[str]:
        """Delete this session's older step files, keeping the newest `keep_last` (0 keeps all)."""
        if keep_last <= 0:
            return []
        ours = [(s, p) for s, p in self.step_files() if read_session_id(p) == session_id]
        removed = []
        for _, path in ours[:-keep_last]:
            os.unlink(path)
            removed.append(path)
        return removed


def kohya_metadata(*, config, network, dataset=None, arch="SD1", prediction_type: str = "epsilon",
                   step: int, session_id: str, started_at: float, output_name: str,
                   base_model_name: str = "", extra: Optional[Mapping[str, Any]] = None, objective=None,
                   guidance: Optional[float] = None) -> dict[str, str]:
    """`ss_*` keys as kohya's train_network writes them, plus the `modelspec.*` header for a LoRA. The strings that
    name the model (ss_base_model_version, modelspec.architecture / implementation, ss_network_module, ss_v2,
    native resolution) are the family's (`Family.training_metadata`); `arch` is an ArchSpec or a variant name.
    Flow-matching objectives add kohya's flow keys (timestep sampling, shift, prediction type raw) and, for a
    guidance-distilled model, ss_guidance_scale."""
    from lora_core.arch import get_arch

    variant = get_arch(arch)
    names = variant.family.training_metadata(variant, prediction_type)
    flow = prediction_type == "flow"
    v_pred = prediction_type.startswith("v")
    network_args = {}
    spatial = any(isinstance(t.module, torch.nn.Conv2d) and tuple(t.module.kernel_size) != (1, 1)
                  for t in getattr(network, "targets", {}).values())
    if config.algorithm == "LoCon" or spatial:
        network_args = {"conv_dim": str(config.conv_rank or config.rank), "conv_alpha": str(config.conv_alpha or config.alpha)}
    network_module = names["ss_network_module"]
    if config.algorithm in LYCORIS_ALGORITHMS:   # what LyCORIS's kohya network (lycoris.kohya) writes
        network_module = "lycoris.kohya"
        network_args = {**NETWORK_ARGS[config.algorithm], **network_args}
    resolution = dataset.resolution if dataset is not None else int(names["resolution"])
    meta = {
        "ss_session_id": session_id,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": output_name,
        "ss_v2": names["ss_v2"],
        "ss_base_model_version": names["ss_base_model_version"],
        "ss_sd_model_name": base_model_name,
        "ss_network_module": network_module,
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_dropout": "None",
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_learning_rate": str(config.unet_lr),
        "ss_unet_lr": str(config.unet_lr),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0.0),
        "ss_optimizer": config.optimizer,
        "ss_lr_scheduler": config.scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_max_train_steps": str(config.total_steps),
        "ss_steps": str(step),
        "ss_seed": str(config.seed),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision,
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_min_snr_gamma": str((config.min_snr_gamma if not flow else 0) or None),
        "ss_debiased_estimation": str(not flow and config.loss_weighting == "debiased"),
        "ss_noise_offset": str(config.noise_offset or None),
        "ss_loss_type": "l2",
        "ss_cache_latents": str(config.cache_latents),
        "ss_clip_skip": "None",
        "ss_training_comment": f"LoRA Core in-graph training; blocks={config.blocks or 'all'}; "
                               f"targets={'+'.join(config.unet_kinds)}"
                               f"{'+norms/biases' if getattr(config, 'norms_biases', False) else ''}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": names["modelspec.architecture"],
        "modelspec.implementation": names["modelspec.implementation"],
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "flow" if flow else "v" if v_pred else "epsilon",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if "ss_model_type" in names:
        meta["ss_model_type"] = names["ss_model_type"]
    if objective is not None:
        meta.update(objective.metadata(getattr(config, "timestep_sampling", "auto")))
    if guidance is not None:
        meta["ss_guidance_scale"] = str(float(guidance))
    if dataset is not None:
        meta.update({
            "ss_num_train_images": str(len(dataset)),
            "ss_resolution": f"({resolution}, {resolution})",
            "ss_enable_bucket": str(len(dataset.bucket_counts()) > 1),
            "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(k), "count": v} for i, (k, v) in
                                                      enumerate(sorted(dataset.bucket_counts().items()))}}),
            "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
            "ss_shuffle_caption": str(dataset.captions.shuffle),
            "ss_keep_tokens": str(dataset.captions.keep_tokens),
            "ss_caption_dropout_rate": str(dataset.captions.dropout),
            "ss_num_epochs": str(max(1, -(-config.total_steps * config.batch_size * config.grad_accum // len(dataset)))),
        })
        trigger = dataset.samples[0].caption.split(",")[0].strip() if dataset.samples else ""
        if trigger:
            meta["modelspec.trigger_phrase"] = trigger
    if config.block_lr:
        meta["lora_core.block_lr"] = json.dumps(config.block_lr)
    weighting = getattr(config, "loss_weighting", "min-snr")
    if not flow and weighting != "min-snr":
        meta["lora_core.loss_weighting"] = weighting
    if extra:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
