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


def check_preview_image(image) -> None:
    """preview_image must be a ComfyUI IMAGE: (batch, height, width, channels >= 3)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] < 3 \
            or min(image.shape[1:3]) < 1:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise LoraValueError(f"preview_image must be an IMAGE (batch, height, width, 3), got {got}: connect an "
                             f"image output (e.g. Load Image's IMAGE) or leave preview_image unconnected.")


def first_frame(dataset) -> tuple[torch.Tensor, str]:
    """The first frame of the dataset's first sample as a (1, H, W, 3) IMAGE, and where it comes from."""
    sample = dataset.samples[0] if dataset.samples else None
    if sample is None or sample.image is None:
        where = f"the dataset's first sample {sample.source!r}" if sample is not None else "the dataset"
        raise LoraValueError(f"Image-to-video previews start from the first frame of the dataset's first sample, "
                             f"but {where} has no image: connect preview_image (the start frame of the previews).")
    frame = sample.image[:, 0] if sample.image.ndim == 4 else sample.image   # (3, F, H, W) video or (3, H, W)
    return frame[:3].movedim(0, -1)[None].float(), f"the first frame of {os.path.basename(sample.source) or 'sample 0'}"


class StartImage:
    """The start frame of an image-to-video model's previews, as ComfyUI's WanImageToVideo / HunyuanImageToVideo
    take their start_image: `image` (1, H, W, 3) is resized to the preview size (comfy.utils.common_upscale,
    bilinear, center crop) and given to `encode` (the training's start-image conditioning,
    ComfyBackend.start_image_conditioning_of, of a (1, 3, h, w) image) for one latent frame, the preview's length;
    the result (concat_latent_image, concat_mask) is set on each positive and, when `on_negative` (Wan), each
    negative conditioning (node_helpers.conditioning_set_values, as those nodes do)."""

    def __init__(self, image: torch.Tensor, description: str, encode, on_negative: bool):
        self.image, self.description = image[:1, ..., :3].detach().float().cpu(), description
        self.encode, self.on_negative = encode, bool(on_negative)
        self._values: dict[tuple, dict] = {}

    @property
    def digest(self) -> str:
        """A hash of the image (8-bit, with its size): part of the previews' signature, kept across run=continue."""
        import hashlib

        pixels = (self.image.clamp(0, 1) * 255).round().to(torch.uint8)
        return hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()[:16]

    def values(self, width: int, height: int) -> dict:
        """The conditioning values for a width x height preview (encoded once: the VAE does not train)."""
        import comfy.utils

        key = (int(width), int(height))
        if key not in self._values:
            pixels = comfy.utils.common_upscale(self.image.movedim(-1, 1), key[0], key[1], "bilinear", "center")
            self._values[key] = {k: v.detach() for k, v in self.encode(pixels).items()}
        return self._values[key]

    def condition(self, positive: list, negative: list, width: int, height: int) -> tuple[list, list]:
        import node_helpers

        values = self.values(width, height)
        positive = node_helpers.conditioning_set_values(positive, values)
        if self.on_negative:
            negative = node_helpers.conditioning_set_values(negative, values)
        return positive, negative


class PreviewRenderer:
    """render(step) -> (P, H, W, 3) images: each prompt sampled by ComfyUI's sampler from `model` (the training
    injection live: the LoRA as trained so far) and decoded by `vae`; an image-to-video model's from `start_image`
    (a StartImage)."""

    def __init__(self, model, clip, vae, prompts: list[tuple[str, str]], seed: int, steps: int, cfg: float,
                 sampler: str, scheduler: str, width: int, height: int, text_encoder_trains: bool,
                 start_image: Optional[StartImage] = None):
        self.model, self.clip, self.vae = model, clip, vae
        self.prompts, self.seed, self.steps, self.cfg = prompts, int(seed), int(steps), float(cfg)
        self.sampler, self.scheduler = sampler, scheduler
        self.width, self.height = int(width), int(height)
        self.text_encoder_trains = text_encoder_trains
        self.start_image = start_image
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
            conds = self._encode(positive), self._encode(negative)
            if self.start_image is not None:
                conds = self.start_image.condition(*conds, self.width, self.height)
            samples = comfy.sample.sample(self.model, noise, self.steps, self.cfg, self.sampler, self.scheduler,
                                          *conds, latent, denoise=1.0, seed=self.seed, disable_pbar=True)
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
                 validate_every: int, preview_image: Optional[torch.Tensor] = None):
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
        if preview_image is not None:
            check_preview_image(preview_image)
        self.preview_every = preview_every
        self.preview_image, self.first_sample_set = preview_image, dataset   # the start frame of I2V previews
        self.start_image: Optional[StartImage] = None
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

    def hooks(self, model, clip, vae, text_encoder_trains: bool, start_conditioning=None,
              start_on_negative: bool = True) -> list:
        """The preview and validation hooks. `start_conditioning`: an image-to-video model's start-image
        conditioning of a (1, 3, H, W) image (None for other models): the previews then start from preview_image,
        or the first frame of the dataset's first sample; `start_on_negative`: the negative prompt gets it too."""
        import comfy.model_management as mm

        from lora_core.train.hooks import PreviewHook

        hooks = []
        if self.preview_every > 0:
            settings = {"prompts": self.prompts, **self.preview_options}
            if start_conditioning is not None:
                image, description = (self.preview_image, "preview_image") if self.preview_image is not None \
                    else first_frame(self.first_sample_set)
                self.start_image = StartImage(image, description, start_conditioning, start_on_negative)
                settings["start_image"] = self.start_image.digest
            elif self.preview_image is not None:
                log.info("LoRA Core: preview_image is ignored: the model is not an image-to-video model.")
            renderer = PreviewRenderer(model, clip, vae, self.prompts, text_encoder_trains=text_encoder_trains,
                                       start_image=self.start_image, **self.preview_options)
            signature = json.dumps(settings, sort_keys=True, default=str)
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
            if self.start_image is not None:
                parts.append(f"previews start from {self.start_image.description}")
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
