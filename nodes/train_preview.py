"""Previews and validation loss for LoRACoreTrain (nodes/train.py): the optional inputs, sample rendering with
ComfyUI's own sampler (comfy.sample.sample, the KSampler path) from the model being trained, and the UI preview
through ComfyUI's progress channel (comfy.utils.ProgressBar.update_absolute(value, total, ("JPEG", image, size)),
the channel core's KSampler previews use; latent_preview.prepare_callback).

lora_core.train.hooks / .validation do the ComfyUI-free part (when, isolation from training, the curve, resume).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from lora_core.errors import LoraValueError

log = logging.getLogger("lora_core")

PREVIEW_MAX_SIZE = 768   # the longest side the UI preview is sent at (the loss chart is 768 px wide)
AUTO_VALIDATIONS = 20    # validate_every 0: about this many evaluations per run


def preview_inputs() -> dict:
    """The optional inputs previews and validation add to LoRACoreTrain, in widget order (appended at its end)."""
    import comfy.samplers

    return {
        "preview_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Render sample images from the "
                          "model being trained every N steps (and at the start and end of the run) with ComfyUI's "
                          "sampler; shown as the node's preview while it trains and output as the 'previews' grid "
                          "(one row per preview step, one column per prompt). 0 = off."}),
        "preview_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "One prompt per line (encoded "
                            "with the connected CLIP, as trained so far); 'prompt --n negative' gives a line its "
                            "own negative prompt (kohya's sample-prompt syntax), otherwise the negative is empty."}),
        "preview_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed of every "
                         "preview (the same at every step, so the rows are comparable)."}),
        "preview_steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
        "preview_cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                        "tooltip": "CFG scale of the previews (1.0 for guidance-distilled models such as Flux.1)."}),
        "preview_sampler": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
        "preview_scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal"}),
        "preview_width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "0 = the dataset's "
                          "resolution."}),
        "preview_height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "0 = the dataset's "
                           "resolution."}),
        "validation_split": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip": "Share of "
                             "the dataset's images held out (chosen from the seed) to compute a validation loss, "
                             "plotted beside the training loss: when it turns up while the training loss still "
                             "falls, the LoRA overfits. 0 = none."}),
        "validation_folder": ("STRING", {"default": "", "tooltip": "A folder of validation images with .txt "
                              "captions, inside ComfyUI's input folder like the dataset folder (e.g. "
                              "'my_dataset_val'). Empty = none; both may be used together."}),
        "validate_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Validation loss every N "
                           "steps (and at the start and end). 0 = about 20 evaluations per run."}),
    }


PREVIEW_DEFAULTS = dict(preview_every=0, preview_prompts="", preview_seed=0, preview_steps=20, preview_cfg=7.0,
                        preview_sampler="euler", preview_scheduler="normal", preview_width=0, preview_height=0,
                        validation_split=0.0, validation_folder="", validate_every=0)


def parse_prompts(text: str) -> list[tuple[str, str]]:
    """(positive, negative) per non-empty line; ' --n ' starts the line's negative prompt."""
    prompts = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        positive, _, negative = line.partition("--n ")
        if line.startswith("--n "):
            positive, negative = "", line[4:]
        prompts.append((positive.strip(), negative.strip()))
    return prompts


def resolve_validation_folder(folder: str) -> Optional[str]:
    """The validation folder inside ComfyUI's input folder (like the dataset folder), or None when empty."""
    import folder_paths

    from ._host import input_folder_path

    folder = (folder or "").strip().strip('"')
    if not folder:
        return None
    path = input_folder_path(folder, "validation_folder", "my_dataset_val")
    if not os.path.isdir(path):
        raise LoraValueError(f"validation_folder {folder!r} does not exist in ComfyUI's input folder "
                             f"{os.path.abspath(folder_paths.get_input_directory())}: create it with validation "
                             f"images and same-name .txt captions, or leave it empty.")
    return path


class PreviewRenderer:
    """render(step) -> (P, H, W, 3) images: each prompt sampled by ComfyUI's sampler from `model` (the training
    injection live: the LoRA as trained so far) and decoded by `vae`."""

    def __init__(self, model, clip, vae, prompts: list[tuple[str, str]], seed: int, steps: int, cfg: float,
                 sampler: str, scheduler: str, width: int, height: int, text_encoder_trains: bool):
        self.model, self.clip, self.vae = model, clip, vae
        self.prompts, self.seed, self.steps, self.cfg = prompts, int(seed), int(steps), float(cfg)
        self.sampler, self.scheduler = sampler, scheduler
        self.width, self.height = int(width), int(height)
        self.text_encoder_trains = text_encoder_trains
        self._conds: dict[str, list] = {}

    def _encode(self, text: str) -> list:
        """CONDITIONING of `text` (CLIPTextEncode's path); cached unless the text encoder trains."""
        if text in self._conds:
            return self._conds[text]
        cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        cond = [[c.detach(), {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}]
                for c, extra in cond]
        if not self.text_encoder_trains:
            self._conds[text] = cond
        return cond

    def latent(self) -> torch.Tensor:
        """An empty latent of the preview size, shaped for this model (EmptyLatentImage + the sampler's fix)."""
        import comfy.sample

        ratio = self.vae.spacial_compression_encode()
        latent = torch.zeros((1, 4, max(1, self.height // ratio), max(1, self.width // ratio)))
        return comfy.sample.fix_empty_latent_channels(self.model, latent)

    def __call__(self, step: int) -> torch.Tensor:
        import comfy.sample

        images = []
        for positive, negative in self.prompts:
            latent = self.latent()
            noise = comfy.sample.prepare_noise(latent, self.seed)
            samples = comfy.sample.sample(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                                          self._encode(positive), self._encode(negative), latent, denoise=1.0,
                                          seed=self.seed, disable_pbar=True)
            decoded = self.vae.decode(samples)
            if decoded.ndim == 5:   # video VAEs: (B, frames, H, W, 3); a preview shows the first frame
                decoded = decoded[:, 0]
            images.append(decoded[:1, ..., :3].float().cpu())
        return torch.cat(images, 0)


def rows_image(images: torch.Tensor):
    """A PIL image of a (P, H, W, 3) batch side by side."""
    from PIL import Image

    row = torch.cat(list(images), dim=1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(row)


def stack_preview(row, chart):
    """The latest preview row above the loss chart (scaled to the chart's width), as one PIL image."""
    from PIL import Image

    if row is None:
        return chart
    scale = chart.width / row.width
    row = row.resize((chart.width, max(1, round(row.height * scale))), Image.BILINEAR)
    out = Image.new("RGB", (chart.width, row.height + chart.height), (255, 255, 255))
    out.paste(row, (0, 0))
    out.paste(chart, (0, row.height))
    return out


class TrainMonitor:
    """The node's previews and validation: builds the hooks from the node's inputs, sends the UI preview (latest
    samples above the loss chart with the validation curve), and gives the outputs."""

    def __init__(self, dataset, seed: int, steps: int, preview_every: int, preview_prompts: str, preview_seed: int,
                 preview_steps: int, preview_cfg: float, preview_sampler: str, preview_scheduler: str,
                 preview_width: int, preview_height: int, validation_split: float, validation_folder: str,
                 validate_every: int):
        from lora_core.train.validation import ValidationLoss, validation_set

        for name, value in (("preview_every", preview_every), ("preview_steps", preview_steps),
                            ("preview_width", preview_width), ("preview_height", preview_height),
                            ("validate_every", validate_every)):
            if not isinstance(value, int) or value < 0:
                raise LoraValueError(f"{name} must be a whole number >= 0, got {value!r}.")
        self.prompts = parse_prompts(preview_prompts)
        if preview_every > 0 and not self.prompts:
            raise LoraValueError(f"preview_every is {preview_every} but preview_prompts is empty: type one prompt per "
                                 f"line to preview, or set preview_every to 0.")
        self.preview_every = preview_every
        self.preview_options = dict(seed=preview_seed, steps=preview_steps, cfg=preview_cfg, sampler=preview_sampler,
                                    scheduler=preview_scheduler, width=preview_width or dataset.resolution,
                                    height=preview_height or dataset.resolution)
        folder = resolve_validation_folder(validation_folder)
        self.dataset, held_out, description = validation_set(dataset, validation_split, folder, seed)
        self.validation = None
        if held_out:
            every = validate_every or max(1, steps // AUTO_VALIDATIONS)
            self.validation = ValidationLoss(held_out, every, seed=seed, description=description)
        self.previews = None
        self.latest_row = None
        self.pbar = None
        self.title = ""
        self.losses = lambda: []   # the trainer's loss list (set by the node once the trainer exists)
        self.first = 0             # the step this run starts at (progress is counted from it)

    def hooks(self, model, clip, vae, text_encoder_trains: bool) -> list:
        import comfy.model_management as mm

        from lora_core.train.hooks import PreviewHook

        hooks = []
        if self.preview_every > 0:
            renderer = PreviewRenderer(model, clip, vae, self.prompts, text_encoder_trains=text_encoder_trains,
                                       **self.preview_options)
            signature = json.dumps({"prompts": self.prompts, **self.preview_options}, sort_keys=True, default=str)
            self.previews = PreviewHook(renderer, self.preview_every, on_preview=self._on_preview,
                                        propagate=(mm.InterruptProcessingException,), signature=signature)
            hooks.append(self.previews)
        if self.validation is not None:
            hooks.append(self.validation)
        return hooks

    @property
    def curve(self) -> list:
        return list(self.validation.curve) if self.validation is not None else []

    def chart(self, losses):
        from PIL import Image

        from lora_core.train.plot import loss_curve_rgb

        return Image.fromarray(loss_curve_rgb(losses, self.title, validation=self.curve))

    def ui_preview(self, losses):
        """(format, image, max size): what the progress channel shows: the latest samples above the loss chart
        (JPEG, as core's sampler previews), or the chart alone as before previews (PNG, 512 px)."""
        if self.latest_row is None:
            return ("PNG", self.chart(losses), 512)
        return ("JPEG", stack_preview(self.latest_row, self.chart(losses)), PREVIEW_MAX_SIZE)

    def _on_preview(self, step, images) -> None:
        try:
            self.latest_row = rows_image(images)
            preview = self.ui_preview(self.losses())
        except Exception as error:  # noqa: BLE001 - the UI image is a nicety; the grid output keeps the row
            log.warning("LoRA Core: cannot show the preview of step %d in the UI: %s", step, error)
            return
        if self.pbar is not None:   # ComfyUI's hook raises here when the run is cancelled: that must propagate
            self.pbar.update_absolute(max(0, step - self.first), None, preview)

    def grid(self) -> torch.Tensor:
        """The `previews` output: one row per preview step, one column per prompt; a small black image when
        previews are off (or failed before the first one)."""
        grid = self.previews.grid() if self.previews is not None else None
        return grid if grid is not None else torch.zeros((1, 64, 64, 3))

    def report(self) -> str:
        parts = []
        if self.previews is not None:
            parts.append(f"previews at steps {self.previews.steps} ({len(self.prompts)} prompt(s) per row)")
            if self.previews.resumed:
                parts.append(f"previews continued: {self.previews.resumed}")
            if self.previews.failure:
                parts.append(f"previews stopped ({self.previews.failure})")
        if self.validation is not None and self.validation.curve:
            curve = self.validation.curve
            best = min(curve, key=lambda p: p[1])
            parts.append(f"validation loss ({self.validation.description}) {curve[0][1]:.5f} at step {curve[0][0]} "
                         f"-> {curve[-1][1]:.5f} at step {curve[-1][0]} (lowest {best[1]:.5f} at step {best[0]})")
        return "; ".join(parts)
