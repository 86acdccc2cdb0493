"""In-graph LoRA training nodes: a dataset node and a train node that trains the MODEL/CLIP already in the
graph (no second copy of the base weights) and returns them with the LoRA applied.

Public contract (saved workflows store widgets by position): node ids, input names and widget order below
never change; new inputs go at the end.
"""
from __future__ import annotations

import logging
import os

import torch

import lora_core.train as lt
from lora_core.errors import LoraValueError
from lora_core.train.blocks import parse_block_list, parse_block_lr
from lora_core.train.config import TARGET_CHOICES, resolve_targets
from lora_core.train.plot import loss_curve_rgb
from lora_core.types import LoraFile

from .train_preview import PREVIEW_DEFAULTS, TrainMonitor, preview_inputs

log = logging.getLogger("lora_core")

CATEGORY = "LoRA Core/Training"
# Target choices; what each trains is the model family's (TrainSpec.target_sets): the first is the family's common
# trainer default (kohya's: SD attn+ff+proj; Flux.1 / Chroma every Linear of the double/single blocks), "all
# layers" every weight-carrying Linear/Conv of the denoiser, "all layers + norms/biases" those with their biases
# and the norms as full diffs (core's Train LoRA node's set): TARGET_CHOICES and resolve_targets in
# lora_core.train.config.
RUN_MODES = ("new run", "continue")
TEXT_ENCODER_CHOICES = ("kohya default", "all")


# ------------------------------------------------------------------------------------------ dataset node

class LoRACoreTrainDataset:
    """A folder of images with same-name .txt captions (or an IMAGE batch), ready for LoRACoreTrain."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": "Folder of training images with same-name .txt "
                                      "captions, inside ComfyUI's input folder (e.g. 'my_dataset'; link a "
                                      "dataset there to use it). Ignored when images are connected."}),
                "caption": ("STRING", {"default": "", "multiline": True, "tooltip": "Caption for images without a "
                                       ".txt file (policy 'use caption widget'), or for connected images: one line "
                                       "per image, or one line for all."}),
                "missing_caption": (list(lt.CAPTION_POLICIES), {"default": "error", "tooltip": "What to do when an "
                                    "image has no .txt caption."}),
                "repeats": ("INT", {"default": 10, "min": 1, "max": 10000, "tooltip": "Times each image appears per epoch."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Training "
                                       "resolution (bucket area = resolution^2)."}),
                "bucketing": ("BOOLEAN", {"default": True, "tooltip": "Aspect-ratio buckets; off = centre-crop every "
                                          "image to a square."}),
                "bucket_step": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8}),
                "min_bucket": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 8}),
                "max_bucket": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
                "shuffle_caption": ("BOOLEAN", {"default": False, "tooltip": "Shuffle comma-separated tags each step."}),
                "keep_tokens": ("INT", {"default": 1, "min": 0, "max": 100, "tooltip": "Leading tags kept in place when "
                                        "shuffling (e.g. the trigger word)."}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Probability to train a sample with an empty caption."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Train on these images instead of a folder."}),
                "frames": ("INT", {"default": 0, "min": -1, "max": 257, "step": 1, "tooltip": "Video models (Wan): "
                           "frames per video sample, 4k+1 (1, 5, 9, ..., 81; the first ones of each clip); -1 = every "
                           "frame, cut to 4k+1; 0 = an image dataset (videos not read). Videos are the folder's "
                           "sub-folders of frames (sorted images) and clips (.mp4/.webm/.mov/.mkv/.avi), captions in "
                           "a same-name .txt beside each; loose images train as one-frame videos. With images "
                           "connected and frames set, the IMAGE batch is one video's frames."}),
            },
        }

    RETURN_TYPES = ("LORA_CORE_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "summary")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads training images and captions, with repeats, caption shuffle/dropout and aspect-ratio buckets."

    def build(self, folder, caption, missing_caption, repeats, resolution, bucketing, bucket_step, min_bucket,
              max_bucket, shuffle_caption, keep_tokens, caption_dropout, images=None, frames=0):
        options = lt.CaptionOptions(shuffle=shuffle_caption, keep_tokens=keep_tokens, dropout=caption_dropout)
        buckets = dict(resolution=resolution, repeats=repeats, bucketing=bucketing, bucket_step=bucket_step,
                       min_bucket=min_bucket, max_bucket=max_bucket)
        if images is not None and frames:
            from lora_core.train.video import from_videos

            lines = [line.strip() for line in caption.splitlines() if line.strip()] or [""]
            dataset = from_videos([images.movedim(-1, 0)[:3]], lines[:1], frames=frames, caption_options=options,
                                  **buckets)
        elif images is not None:
            lines = [line.strip() for line in caption.splitlines() if line.strip()] or [""]
            dataset = lt.from_images([img.movedim(-1, 0)[:3] for img in images], lines, caption_options=options,
                                     **buckets)
        else:
            dataset = lt.load_folder(_resolve_folder(folder), missing_caption=missing_caption, default_caption=caption,
                                     captions=options, frames=frames, **buckets)
        return dataset, _dataset_summary(dataset)


def _resolve_folder(folder: str) -> str:
    """The dataset folder inside ComfyUI's input folder (subfolders allowed; an absolute path must lie inside it
    too). Nothing outside it is read: link or copy a dataset into ComfyUI/input to train on it."""
    from ._host import input_folder_path

    folder = (folder or "").strip().strip('"')
    if not folder:
        raise LoraValueError("No dataset folder given: type the path of a folder of images (or connect images).")
    return input_folder_path(folder, "dataset folder", "my_dataset")


def _dataset_summary(dataset) -> str:
    buckets = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(dataset.bucket_counts().items()))
    videos = [s for s in dataset.samples if s.image is not None and s.image.ndim == 4]
    if videos:
        counts = sorted({int(s.image.shape[1]) for s in videos})
        what = (f"{len(videos)} videos ({'/'.join(map(str, counts))} frames)"
                + (f" + {len(dataset.samples) - len(videos)} images" if len(videos) < len(dataset.samples) else ""))
    else:
        what = f"{len(dataset.samples)} images"
    summary = (f"{what} x {dataset.repeats} repeats = {len(dataset)} samples per epoch; "
               f"buckets {buckets}")
    for note in dataset.size_notes():
        log.info("LoRA Core dataset: %s", note)
        summary += f"\nnote: {note}"
    return summary


# ------------------------------------------------------------------------------------------ ComfyUI backend

def objective_of_model(sampling, train_spec=None) -> "lt.Objective":
    """The model's own objective from ComfyUI's model_sampling: EPS / V_PREDICTION with its discrete DDPM sigmas,
    or CONST (rectified flow) with the shift and timestep multiplier its schedule has. The flow shift s is read
    from the schedule itself (percent_to_sigma(0.5) = s / (1 + s)) and checked against ComfyUI's shifted curve at
    other points, so whatever ModelSampling class (or node patch) the MODEL carries, training uses its shift."""
    import comfy.model_sampling as ms

    name = type(sampling).__name__
    if isinstance(sampling, ms.CONST):
        s = float(sampling.percent_to_sigma(0.5))
        shift = s / (1.0 - s)
        for percent in (0.05, 0.25, 0.75, 0.95):
            mine = float(lt.time_shift(shift, torch.tensor(1.0 - percent, dtype=torch.float64)))
            theirs = float(sampling.percent_to_sigma(percent))
            if abs(mine - theirs) > 1e-5:
                raise LoraValueError(f"This flow model's noise schedule ({name}) is not a shifted linear one "
                                     f"(sigma {theirs:.6f} at {percent:.0%}, a shift-{shift:.4g} schedule has "
                                     f"{mine:.6f}); training cannot follow it.")
        multiplier = float(sampling.timestep(torch.tensor(1.0)))
        if abs(float(sampling.timestep(torch.tensor(0.5))) - 0.5 * multiplier) > 1e-6 * max(1.0, multiplier):
            raise LoraValueError(f"This flow model's timestep input ({name}) is not proportional to sigma.")
        resolution = lt.ResolutionShift(*train_spec.resolution_shift) if train_spec is not None and \
            train_spec.resolution_shift else None
        default = train_spec.timestep_sampling if train_spec is not None else "logit-normal, model shift"
        return lt.Objective.flow(shift, multiplier, resolution, default)
    if isinstance(sampling, ms.X0) or not isinstance(sampling, ms.EPS):
        raise LoraValueError(f"Training supports eps-, v-prediction and flow-matching models; this model uses "
                             f"{name}.")
    prediction = "v_prediction" if isinstance(sampling, ms.V_PREDICTION) else "epsilon"
    if not hasattr(sampling, "sigmas") or sampling.sigmas.ndim != 1:
        raise LoraValueError("This model has no discrete DDPM schedule; training supports DDPM (SD1.x/SD2.x/SDXL) "
                             "and flow-matching models.")
    sigmas = sampling.sigmas.detach().float().cpu()
    return lt.Objective.ddpm(1.0 / (1.0 + sigmas ** 2), prediction)


class ComfyBackend:
    """lora_core.train's backend interface over a ComfyUI ModelPatcher, in the model's own objective (its
    model_sampling: EPS, V_PREDICTION or CONST flow).

    DDPM UNets (SD1/SD2/SDXL) are called directly with DDPM timesteps, as before. Every other model is called
    the way ComfyUI's sampler calls it (BaseModel._apply_model): its extra conditions come from the model's own
    `extra_conds` (Flux: pooled `y` and `guidance`; Chroma: guidance 0; a new family: whatever its model class
    asks for), the timestep from `model_sampling.timestep`, and the raw output (the velocity) is returned."""

    def __init__(self, model, clip=None, train_text_encoder: bool = False, guidance: float = 1.0,
                 train_spec=None):
        self.patcher = model
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.train_spec = train_spec
        self.sampling = model.get_model_object("model_sampling")
        self.objective = objective_of_model(self.sampling, train_spec)
        self.prediction_type = self.objective.prediction
        if self.objective.alphas_cumprod is not None:
            self.alphas_cumprod = self.objective.alphas_cumprod
        # DDPM UNets keep their direct call; others go through the model's own conditioning (extra_conds)
        self.native_call = self.objective.is_flow
        self.group_by_text_length = self.native_call
        self.guidance = float(guidance) if (self.native_call and train_spec is not None
                                            and train_spec.guidance_input) else None
        self.clip = clip
        self.train_text_encoder = train_text_encoder
        self.device = torch.device(model.load_device)
        self.adm = getattr(self.base, "adm_channels", 0) or 0

    def compute_dtype(self) -> torch.dtype:
        return self.base.manual_cast_dtype or self.base.get_dtype()

    def denoise(self, noisy, timesteps, cond):
        if self.native_call:
            return self._denoise_native(noisy, timesteps, cond)
        dtype = self.compute_dtype()
        context = cond["context"].to(self.device, dtype)
        y = None
        if self.adm:
            height, width = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            y = self.base.encode_adm(pooled_output=cond["pooled_output"].to(self.device), width=width, height=height,
                                     target_width=width, target_height=height, crop_w=0, crop_h=0).to(self.device, dtype)
        return self.unet(noisy.to(dtype), timesteps.float(), context=context, y=y, transformer_options={})

    def model_conds(self, noisy, cond) -> dict:
        """The keyword conditions ComfyUI's sampler would give the diffusion model for `cond` (a dict with
        "context" and any other text-encoder outputs, e.g. pooled_output), through the model's extra_conds."""
        extra = {k: v for k, v in cond.items() if k not in ("context", "pooled_output")}
        if self.guidance is not None:
            extra["guidance"] = self.guidance
        conds = self.base.extra_conds(cross_attn=cond["context"], pooled_output=cond.get("pooled_output"),
                                      noise=noisy, device=self.device, **extra)
        batch = noisy.shape[0]
        return {name: c.process_cond(batch_size=batch, area=None, device=self.device).cond
                for name, c in conds.items()}

    def _denoise_native(self, noisy, timesteps, cond):
        """BaseModel._apply_model without its last step (calculate_denoised): the raw model output."""
        import comfy.model_base as mb

        dtype = self.compute_dtype()
        kwargs = self.model_conds(noisy, cond)
        sigma = timesteps.float() / self.objective.multiplier
        xc = self.sampling.calculate_input(sigma, noisy)
        concat = kwargs.pop("c_concat", None)
        if concat is not None:
            xc = torch.cat([xc, concat.to(xc.device, xc.dtype)], dim=1)
        context = kwargs.pop("c_crossattn", None)
        if context is not None:
            context = context.to(self.device, dtype)
        extra = {}
        for name, value in kwargs.items():
            if hasattr(value, "dtype"):
                value = mb.convert_tensor(value, dtype, self.device)
            elif isinstance(value, list):
                value = [mb.convert_tensor(v, dtype, self.device) for v in value]
            extra[name] = value
        t = self.base.process_timestep(timesteps.float(), x=noisy, **extra)
        return self.unet(xc.to(dtype), t, context=context, control=None, transformer_options={}, **extra)

    def modules(self):
        mods = [self.unet]
        if self.clip is not None:
            mods.append(self.clip.cond_stage_model)
        return mods

    def block_modules(self) -> list:
        """The denoiser's repeated blocks, in order (the family's TrainSpec.block_lists)."""
        names = self.train_spec.block_lists if self.train_spec is not None and self.train_spec.block_lists else \
            ("input_blocks", "middle_block", "output_blocks")
        blocks = []
        for name in names:
            part = getattr(self.unet, name, None)
            if part is None:
                continue
            blocks += list(part) if isinstance(part, torch.nn.ModuleList) else [part]
        return blocks

    def checkpoint_modules(self):
        return self.block_modules()

    def in_place_modules(self):
        """Modules whose residual adds run in place (DiT blocks: ComfyUI's Flux/Chroma `img += ...`); the loop
        makes them out of place while it trains. SD's UNet needs none (its CLIP has _OutOfPlaceClipLayers)."""
        return self.block_modules() if self.native_call else []

    @property
    def start_image_conditioning(self) -> "str | None":
        """How an image-to-video model takes its start image through its concat channels: "wan" (Wan 2.1 I2V 14B,
        a Wan 2.2 I2V-A14B expert: 16 noise + 4 mask + 16 image-latent channels), "hunyuan" (HunyuanVideo I2V:
        image latent + inverted mask), "hunyuan-image" (SkyReels V1 I2V: image latent only), or None."""
        import comfy.model_base as mb

        kind = type(self.base)
        # the plain Wan classes only (VACE, Camera, S2V, HuMo, Animate use their concat channels their own way); a
        # 2.2 I2V-A14B expert's mask + image channels are added by WAN21.concat_cond from the channel count alone
        if kind in (mb.WAN21, mb.WAN22):
            latent = self.base.latent_format.latent_channels
            return "wan" if self.unet.patch_embedding.weight.shape[1] == 2 * latent + 4 else None
        if kind is mb.HunyuanVideoI2V:
            return "hunyuan"
        if kind is mb.HunyuanVideoSkyreelsI2V:
            return "hunyuan-image"
        return None

    @property
    def start_image_on_negative(self) -> bool:
        """Whether ComfyUI's start-image node conditions the negative prompt too: WanImageToVideo sets the same
        concat_latent_image / concat_mask on positive and negative; HunyuanImageToVideo takes (and conditions) the
        positive only, the negative's concat channels are then the model's own fill (the sampler's latent)."""
        return self.start_image_conditioning == "wan"

    def start_image_conditioning_of(self, images: torch.Tensor, vae) -> dict:
        """A video sample's image-to-video conditioning from its first frame, as ComfyUI's own nodes build it from a
        start image (musubi trains Wan I2V the same way, the clip's first frame as the image). Wan (WanImageToVideo):
        the first frame followed by grey (0.5) frames, VAE-encoded; HunyuanVideo (HunyuanImageToVideo, "v1
        (concat)"): the first frame alone, VAE-encoded. `concat_latent_image` is raw VAE latents (the model's
        concat_cond scales them); `concat_mask` is 0 on the first latent frame and 1 on the others (SkyReels takes
        no mask). `images`: (1, 3, F, H, W), or one image (1, 3, H, W)."""
        kind = self.start_image_conditioning
        frames = images[0].movedim(0, -1)[..., :3].float()        # (F, H, W, 3), or (H, W, 3) for an image
        if frames.ndim == 3:
            frames = frames[None]
        if kind == "wan":
            pixels = torch.full_like(frames, 0.5)
            pixels[:1] = frames[:1]
        else:
            pixels = frames[:1]
        concat = vae.encode(pixels)
        if kind == "hunyuan-image":
            return {"concat_latent_image": concat}
        latent_frames = (frames.shape[0] - 1) // 4 + 1
        mask = torch.ones((1, 1, latent_frames, concat.shape[-2], concat.shape[-1]), dtype=concat.dtype)
        mask[:, :, :1] = 0.0
        return {"concat_latent_image": concat, "concat_mask": mask}

    def encode_images(self, images: torch.Tensor, vae) -> torch.Tensor:
        if images.ndim == 5:   # videos (B, 3, F, H, W): a video VAE (Wan's) encodes one clip given as (F, H, W, 3)
            latents = torch.cat([vae.encode(video.movedim(0, -1)[..., :3].float()) for video in images])
            return self.base.process_latent_in(latents)
        latents = vae.encode(images.movedim(1, -1)[..., :3].float())
        return self.base.process_latent_in(latents)

    def encode_text(self, captions: list[str]) -> dict:
        conds, pooled, others = [], [], []
        for caption in captions:
            tokens = truncate_tokens(self.clip.tokenize(caption), caption)
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            conds.append(out["cond"])
            if out.get("pooled_output") is not None:
                pooled.append(out["pooled_output"])
            if self.native_call:   # e.g. an attention mask: the model's extra_conds reads it
                others.append({k: v for k, v in out.items() if k not in ("cond", "pooled_output")
                               and isinstance(v, torch.Tensor)})
        result = {"context": lt.cat_cond(conds)}
        if pooled and len(pooled) == len(conds):
            result["pooled_output"] = torch.cat(pooled, 0)
        if others and others[0]:
            result.update(lt.cat_cond(others))
        return result


MAX_T5_TOKENS = 512   # what Flux / SD3 pipelines give T5


def truncate_tokens(tokens: dict, caption: str) -> dict:
    """ComfyUI's tokenizers return every encoder's tokens as chunks (CLIP: 77 each, as many as the text needs;
    T5: one chunk of any length). Training encodes one chunk per encoder, the tokenizer's limit: a 200 KB caption
    would otherwise make thousands of chunks (gigabytes of text-encoder activations). Warns when it cuts."""
    out, cut = {}, False
    for name, chunks in tokens.items():
        if not isinstance(chunks, list) or not chunks:
            out[name] = chunks
            continue
        first = chunks[0]
        if isinstance(first, list) and len(first) > MAX_T5_TOKENS:
            first, cut = first[:MAX_T5_TOKENS], True
        cut = cut or len(chunks) > 1
        out[name] = [first]
    if cut:
        log.warning("LoRA Core: caption %r... is longer than the text encoder reads; training uses its first %s",
                    caption[:60], "77 CLIP tokens" if any(len(c[0]) <= 77 for c in out.values()
                                                        if isinstance(c, list) and c) else "tokens")
    return out


def te_targets_of_clip(clip) -> list:
    """LoRA targets in a ComfyUI CLIP, named like kohya: lora_te (single encoder) or lora_te1/lora_te2 (SDXL)."""
    model = clip.cond_stage_model
    encoders = [name for name in ("clip_l", "clip_h", "clip_g") if getattr(model, name, None) is not None]
    if not encoders:
        raise LoraValueError(f"Cannot train this text encoder ({type(model).__name__}); only CLIP-L/OpenCLIP-H/G are "
                             f"supported. Turn train_text_encoder off.")
    targets = []
    for name in encoders:
        if len(encoders) == 1:
            prefix, component = "lora_te", "te1"
        else:
            prefix, component = ("lora_te1", "te1") if name == "clip_l" else ("lora_te2", "te2")
        targets += lt.find_te_targets(getattr(model, name), prefix, component)
    return targets


class _OutOfPlaceClipLayers:
    """ComfyUI's CLIP layers add their residuals in place (`x += ...`), which autograd rejects once the
    layer-norm input is needed for backward. While the text encoder trains, each layer's residual adds run
    out of place (same maths); the layers' own forwards are put back afterwards."""

    PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")

    def __init__(self, clip, enabled: bool):
        self.layers = []
        if enabled and clip is not None:
            self.layers = [m for m in clip.cond_stage_model.modules() if all(hasattr(m, p) for p in self.PARTS)]

    def __enter__(self):
        for layer in self.layers:
            def forward(x, mask=None, optimized_attention=None, _layer=layer):
                x = x + _layer.self_attn(_layer.layer_norm1(x), mask, optimized_attention)
                return x + _layer.mlp(_layer.layer_norm2(x))

            layer.forward = forward
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        return False


def model_arch(model) -> str:
    """The model's variant name (SD1, SD2, SDXL, Flux.1-dev, Chroma, ...) as its family recognises it."""
    from ._host import HostModels

    arch = HostModels(model).key_map.arch
    if arch is None:
        raise LoraValueError("Cannot tell which model family this MODEL is; training supports SD1.x/SD2.x/SDXL, "
                             "Flux.1, Chroma, SD3/SD3.5, Qwen-Image, Z-Image, Lumina 2, Wan 2.1 / 2.2, HunyuanVideo, "
                             "Flux.2 and HiDream-I1.")
    return arch.name


def model_train_spec(model):
    """(variant, its family's TrainSpec for this host) of a MODEL; refuses families training does not cover."""
    from ._host import HostModels

    key_map = HostModels(model).key_map
    arch = key_map.arch
    if arch is None:
        model_arch(model)
    spec = arch.family.train_spec(arch, key_map.config)
    if spec is None:
        raise LoraValueError(f"Training does not support {arch.title} yet.")
    return arch, spec


def te_components(clip, key_map, spec, choice: str) -> list[str]:
    """Text-encoder components to train: the family's kohya default (Flux: CLIP-L; Chroma: its T5), or all."""
    present = [c for c in key_map.components if c.startswith("te")]
    if choice == "all" or spec.text_encoders is None:
        return present
    return [c for c in spec.text_encoders if c in present]


class _OutOfPlaceT5Layers(lt.OutOfPlaceAdds):
    """T5 blocks add their residuals in place (`x += ...`); while T5 trains they run out of place."""

    def __init__(self, clip, enabled: bool):
        import re

        blocks = []
        if enabled and clip is not None:
            pattern = re.compile(r"(^|\.)encoder\.block\.\d+$")
            blocks = [m for name, m in clip.cond_stage_model.named_modules() if pattern.search(name)]
        super().__init__(blocks)


def model_block_ids(model) -> list[str]:
    """The denoiser blocks this model has, in its family's layout order (for `blocks` / `block_lr`)."""
    from ._host import HostModels

    key_map = HostModels(model).key_map
    present = {t.block for t in key_map.targets if not t.component.startswith("te")}
    return [b for b in key_map.arch.blocks if b in present]


# ------------------------------------------------------------------------------------------ train node

class LoRACoreTrain:
    """Train a LoRA/LoCon (or LyCORIS LoHa/LoKr/DoRA) on the MODEL (and optionally CLIP) already in the graph."""

    @classmethod
    def INPUT_TYPES(cls):
        lr = {"min": 0.0, "max": 1.0, "step": 1e-6, "round": False}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on (SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3/SD3.5, "
                                    "Qwen-Image, Z-Image, Lumina 2, Wan 2.1 / 2.2 incl. TI2V-5B, HunyuanVideo T2V / I2V / 1.5, Flux.2 "
                                    "[dev], HiDream-I1). It is adapted in place during training and restored afterwards: "
                                    "no second copy is made."}),
                "clip": ("CLIP", {"tooltip": "Encodes the captions (and is trained when train_text_encoder is on)."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images to latents."}),
                "dataset": ("LORA_CORE_DATASET", {"tooltip": "From 'LoRA Training Dataset'."}),
                "output_name": ("STRING", {"default": "my_lora", "tooltip": "File name in models/loras (subfolders "
                                           "allowed), without extension."}),
                "run": (list(RUN_MODES), {"default": "new run", "tooltip": "'continue' resumes <output_name>.state.pt "
                                          "for `steps` more steps (chunked training)."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 1000000, "tooltip": "Optimizer steps in this run."}),
                "algorithm": (list(lt.ALGORITHMS), {"default": "LoRA", "tooltip": "LoRA: attention/FF/proj "
                              "layers. LoCon: also the resnet and up/down-sampler convolutions. LoHa / LoKr / DoRA (LyCORIS's "
                              "algorithms, saved in LyCORIS's format): the same layers as LoRA, with a Hadamard "
                              "product of two low-rank pairs, a Kronecker product, or LoRA with a trained weight "
                              "magnitude."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 512}),
                "alpha": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 512.0, "step": 0.5,
                                    "tooltip": "Scale = alpha/rank (0 = rank)."}),
                "unet_targets": (list(TARGET_CHOICES), {"default": "attn+ff+proj", "tooltip": "Denoiser layers to "
                                 "train: kohya's attention/feed-forward/projection sets, or 'all layers' (every "
                                 "Linear/Conv weight; 3x3 convs as LoCon), or 'all layers + norms/biases' (those layers' biases and "
                                 "every GroupNorm/LayerNorm too, as full diffs: the set core's Train LoRA trains; "
                                 "ComfyUI and A1111 read the file, kohya-only tools may not). Flux/Chroma: "
                                 "attn+ff+proj = kohya's default (every double/single block Linear, modulation "
                                 "included), attn+ff = without modulation, all layers = + embeddings, final "
                                 "layer, Chroma's guidance layer."}),
                "blocks": ("STRING", {"default": "", "tooltip": "Train only these blocks, e.g. 'IN04-IN08, M00, OUT03'. "
                                      "Empty = all."}),
                "block_lr": ("STRING", {"default": "", "tooltip": "Per-block LR factors, e.g. 'IN04=0.5, OUT00-OUT02=2'."}),
                "unet_lr": ("FLOAT", {"default": 1e-4, **lr}),
                "train_text_encoder": ("BOOLEAN", {"default": False}),
                "text_encoder_lr": ("FLOAT", {"default": 5e-5, **lr}),
                "optimizer": (list(lt.OPTIMIZERS), {"default": "AdamW"}),
                "lr_scheduler": (list(lt.SCHEDULERS), {"default": "constant"}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                "min_snr_gamma": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                            "tooltip": "0 = off."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "mixed_precision": (list(lt.PRECISIONS), {"default": "auto", "tooltip": "auto: bf16 (or fp16) on GPU, "
                                    "fp32 on CPU."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False}),
                "cache_latents": ("BOOLEAN", {"default": True}),
                "cache_text_encoder_outputs": ("BOOLEAN", {"default": True}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Also save a step file every N "
                                       "steps (0 = only at the end)."}),
                "keep_last": ("INT", {"default": 3, "min": 0, "max": 1000, "tooltip": "Step files kept (0 = all)."}),
                "save_precision": (["fp16", "bf16", "fp32"], {"default": "fp16"}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of another run."}),
            },
            "optional": {
                "timestep_sampling": (list(lt.TIMESTEP_SAMPLING), {"default": "auto", "tooltip": "How each step "
                                      "draws its noise level. auto: SD models uniform DDPM timesteps; flow models "
                                      "(Flux, Chroma) logit-normal shifted by the model's own schedule (kohya's "
                                      "recommended Flux setting). 'resolution shift' = Flux's resolution-dependent "
                                      "schedule (kohya flux_shift)."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance "
                             "input of guidance-distilled models (Flux.1 dev), as kohya trains it (1.0 recommended). "
                             "Ignored by models without one (schnell, Chroma, SD)."}),
                "text_encoders": (list(TEXT_ENCODER_CHOICES), {"default": "kohya default", "tooltip": "Which text "
                                  "encoders train_text_encoder trains: kohya's default (SD: all; Flux: CLIP-L, "
                                  "not T5; Chroma: its T5) or all (Flux: CLIP-L and T5)."}),
                "timestep_range": ("STRING", {"default": "", "tooltip": "Flow models: train only noise levels in "
                                   "'min,max' on the 0-1000 scale (musubi's min/max_timestep; levels outside are "
                                   "drawn again, keeping the sampling's shape). One Wan 2.2 expert: 'high noise' "
                                   "(T2V 875,1000; I2V 900,1000) or 'low noise' (0,875 / 0,900); written to the "
                                   "file as modelspec.timestep_range. Empty = every level."}),
                "base_quant": (list(lt.BASE_QUANT), {"default": "as loaded", "tooltip": "The base's weights while "
                               "training (the QLoRA idea). as loaded: as ComfyUI loaded them; an fp8 model "
                               "(UNETLoader weight_dtype fp8_e4m3fn) stays fp8, each layer cast to the compute "
                               "dtype per call and never kept for the backward pass. nf4: the denoiser's Linears "
                               "quantised to 4-bit NF4 for the run (needs bitsandbytes: on CUDA, or on the CPU with its CPU backend); the MODEL is "
                               "given back unchanged. The saved LoRA loads on any precision of the model."}),
                "lora_dtype": (list(lt.LORA_DTYPES), {"default": "fp32", "tooltip": "dtype of the trained LoRA "
                               "weights (fp32 recommended; bf16 halves their memory and optimizer state)."}),
                **preview_inputs(),
                "loss_weighting": (list(lt.LOSS_WEIGHTINGS), {"default": "min-snr", "tooltip": "SD models' loss "
                                   "weighting over noise levels. min-snr: min-SNR-gamma (min_snr_gamma; 0 = plain "
                                   "MSE). debiased: kohya's debiased estimation (1/sqrt(SNR), times min-SNR when "
                                   "gamma > 0). x0: the error of the denoised image, what core's Train LoRA node "
                                   "minimises (nearly all weight on the noisiest steps). Flow models (Flux, Wan, "
                                   "...) train on the plain velocity MSE: min-snr only."}),
                "preview_image": ("IMAGE", {"tooltip": "Image-to-video models (Wan I2V, HunyuanVideo / SkyReels "
                                  "I2V): the start frame of the previews, resized to the preview size and given to "
                                  "every preview prompt as ComfyUI's WanImageToVideo / HunyuanImageToVideo node "
                                  "gives its start_image (the first image of a batch). Not connected: the first "
                                  "frame of the dataset's first sample (in the dataset's order). Ignored by "
                                  "text-to-image and text-to-video models."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "LORA_CORE_LORA", "IMAGE", "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("MODEL", "CLIP", "lora", "loss_curve", "lora_name", "report", "previews")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Trains a kohya-format LoRA/LoCon (or LyCORIS LoHa/LoKr/DoRA) on the connected model, saves it "
                   "to models/loras with ss_*/modelspec metadata and a resumable state, and returns the model with the "
                   "LoRA applied.")

    def train(self, model, clip, vae, dataset, output_name, run, steps, algorithm, rank, alpha, unet_targets, blocks,
              block_lr, unet_lr, train_text_encoder, text_encoder_lr, optimizer, lr_scheduler, warmup_steps,
              batch_size, grad_accumulation, seed, min_snr_gamma, noise_offset, mixed_precision,
              gradient_checkpointing, cache_latents, cache_text_encoder_outputs, save_every, keep_last,
              save_precision, overwrite, timestep_sampling="auto", guidance=1.0, text_encoders="kohya default",
              timestep_range="", base_quant="as loaded", lora_dtype="fp32",
              **preview_options):
        import comfy.model_management as mm
        import folder_paths

        if run not in RUN_MODES:
            raise LoraValueError(f"run must be one of {list(RUN_MODES)}, got {run!r}.")
        if unet_targets not in TARGET_CHOICES:
            raise LoraValueError(f"unet_targets must be one of {list(TARGET_CHOICES)}, got {unet_targets!r}.")
        if text_encoders not in TEXT_ENCODER_CHOICES:
            raise LoraValueError(f"text_encoders must be one of {list(TEXT_ENCODER_CHOICES)}, got {text_encoders!r}.")
        if not (isinstance(guidance, (int, float)) and 0 <= guidance < float("inf")):
            raise LoraValueError(f"guidance must be a finite number >= 0, got {guidance!r}.")
        if base_quant not in lt.BASE_QUANT:
            raise LoraValueError(f"base_quant must be one of {list(lt.BASE_QUANT)}, got {base_quant!r}.")
        valid_blocks = model_block_ids(model)
        arch, spec = model_train_spec(model)
        ranges = arch.family.timestep_ranges(arch) if hasattr(arch.family, "timestep_ranges") else {}
        t_range = lt.parse_timestep_range(timestep_range, ranges)
        _check_latent_rank(dataset, spec, arch)
        kinds, norms_biases = resolve_targets(spec, unet_targets)
        if not kinds:
            raise LoraValueError(f"unet_targets {unet_targets!r} has no meaning for {arch.title}; choose one of "
                                 f"{list(spec.target_sets)}.")
        if algorithm == "LoCon":
            if not spec.conv_kinds:
                raise LoraValueError(f"LoCon adds the convolution layers of a UNet; {arch.title} has none to train. "
                                     f"Choose LoRA.")
            kinds += tuple(k for k in spec.conv_kinds if k not in kinds)
        config = lt.TrainConfig(
            steps=steps, batch_size=batch_size, grad_accum=grad_accumulation, seed=seed, algorithm=algorithm,
            rank=rank, alpha=alpha, unet_kinds=kinds, norms_biases=norms_biases,
            blocks=parse_block_list(blocks, valid_blocks),
            block_lr=parse_block_lr(block_lr, valid_blocks), unet_lr=unet_lr, train_text_encoder=train_text_encoder,
            text_encoder_lr=text_encoder_lr, optimizer=optimizer, scheduler=lr_scheduler, warmup_steps=warmup_steps,
            min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, cache_latents=cache_latents,
            cache_text_encoder_outputs=cache_text_encoder_outputs, save_every=save_every, keep_last=keep_last,
            save_dtype=save_precision, overwrite=overwrite, timestep_sampling=timestep_sampling,
            timestep_range=t_range, lora_dtype=lora_dtype,
            loss_weighting=preview_options.pop("loss_weighting", "min-snr"))
        config.validate()
        preview_image = preview_options.pop("preview_image", None)
        unknown = set(preview_options) - set(PREVIEW_DEFAULTS)
        if unknown:
            raise LoraValueError(f"LoRACoreTrain has no input(s) {sorted(unknown)}.")
        monitor = TrainMonitor(dataset, seed, steps, **{**PREVIEW_DEFAULTS, **preview_options},
                               preview_image=preview_image)
        dataset = monitor.dataset   # without the held-out validation images
        output = lt.OutputFiles(folder_paths.get_folder_paths("loras")[0], output_name)
        monitor.title = output.name

        # ComfyUI runs nodes under inference_mode; autograd needs it off.
        with torch.inference_mode(False):
            result, trainer = _train(model, clip, vae, dataset, config, output, run == "continue", mm,
                                     guidance=guidance, text_encoders=text_encoders, base_quant=base_quant,
                                     monitor=monitor)
            if result.interrupted:
                log.warning("LoRA Core: training interrupted at step %d; saved %s (continue with run='continue').",
                            result.step, result.final_path)
                mm.throw_exception_if_processing_interrupted()

        from lora_core.io import read_lora_file

        lora = read_lora_file(result.final_path)
        new_model, new_clip = apply_lora(model, clip, lora, output.name)
        curve = _curve_image(result.losses, output.name, monitor.curve)
        lora_name = os.path.relpath(result.final_path, output.folder)
        report = (f"Trained {output.name}: steps {result.step} (this run {result.steps_done}, "
                  f"{result.steps_per_second:.2f} steps/s), {len(trainer.train_names)} modules, rank {rank}, "
                  f"alpha {alpha}; last-20 mean loss {sum(result.losses[-20:]) / max(1, len(result.losses[-20:])):.4f}; "
                  f"saved {result.final_path}")
        base_report = getattr(trainer, "base_report", None)
        if base_report is not None and (base_report.frozen_cast or base_report.nf4 or base_report.own_forward):
            report += f"\nbase: {base_report.describe()}"
        if monitor.report():
            report += "; " + monitor.report()
        log.info("LoRA Core: %s", report)
        return new_model, new_clip, lora, curve, lora_name, report, monitor.grid()


def _check_latent_rank(dataset, spec, arch) -> None:
    """Video samples need a video family (TrainSpec.latent_dims 3: Wan); an image model cannot train on them."""
    videos = [s.source for s in dataset.samples if s.image is not None and s.image.ndim == 4]
    if videos and spec.latent_dims < 3:
        raise LoraValueError(f"The dataset has {len(videos)} video sample(s) (e.g. {videos[0]}), but {arch.title} is an "
                             f"image model. Train videos on a video model (Wan), or give this model images only.")


def _train(model, clip, vae, dataset, config, output, resume, mm, guidance=1.0, text_encoders="kohya default",
           base_quant="as loaded", monitor=None):
    import comfy.utils

    from ._host import HostModels

    arch, spec = model_train_spec(model)
    backend = ComfyBackend(model, clip, config.train_text_encoder, guidance=guidance, train_spec=spec)
    nf4 = lt.resolve_base_quant(base_quant, backend.device)   # refuse nf4 without bitsandbytes (CUDA or its CPU backend), first
    mm.load_models_gpu([model], force_full_load=True)
    lt.unlock_inference_params(backend.unet)
    key_map = HostModels(model, clip).key_map
    targets = lt.find_denoiser_targets(backend.unet, key_map, spec, config.unet_kinds, config.blocks)
    if config.norms_biases:
        targets = lt.with_norms_biases(targets, backend.unet, key_map, config.blocks)
    t5_trained = False
    if config.train_text_encoder:
        if clip is None:
            raise LoraValueError("train_text_encoder is on but no CLIP is connected.")
        mm.load_models_gpu([clip.patcher], force_full_load=True)
        lt.unlock_inference_params(clip.cond_stage_model)
        encoders = {n for n in ("clip_l", "clip_h", "clip_g", "t5xxl")
                    if getattr(clip.cond_stage_model, n, None) is not None}
        if encoders and encoders <= {"clip_l", "clip_h", "clip_g"} and spec.text_encoders is None:
            targets += te_targets_of_clip(clip)   # SD's CLIPs: kohya's lora_te / lora_te1 / lora_te2 names
        else:
            components = te_components(clip, key_map, spec, text_encoders)
            te = lt.find_key_map_te_targets(clip.cond_stage_model, key_map, components)
            if not te:
                raise LoraValueError(f"No trainable text-encoder layer found in this CLIP ({sorted(encoders)}). "
                                     f"Turn train_text_encoder off.")
            targets += te
            t5_trained = any(key_map.component_specs[c].encoder is not None and
                             key_map.component_specs[c].encoder.kind == "t5" for c in components)
    network = lt.LoRANetwork(targets, config.rank, config.alpha, seed=config.seed, algorithm=config.algorithm)
    # image-to-video: each sample's start-image conditioning from its first frame; the previews' from their start
    # image (preview_image, or the dataset's first frame), the same way
    encode_start = (lambda images: backend.start_image_conditioning_of(images, vae)) \
        if backend.start_image_conditioning else None
    hooks = monitor.hooks(model, clip, vae, config.train_text_encoder, start_conditioning=encode_start,
                          start_on_negative=backend.start_image_on_negative) if monitor else ()
    trainer = lt.LoraTrainer(backend, network, dataset, config,
                             encode_images=lambda images: backend.encode_images(images, vae),
                             encode_conditioning=encode_start,
                             encode_text=backend.encode_text if clip is not None else None,
                             output=output, arch=arch.name,
                             checkpoint_modules=backend.checkpoint_modules(),
                             hooks=hooks)
    if resume:
        trainer.resume(output.state)
    elif os.path.exists(output.state) and not config.overwrite:
        raise LoraValueError(f"{output.state} exists: a run named {output.name!r} was started before. Set run to "
                             f"'continue' to resume it, pick another output name, or allow overwriting.")
    pbar = comfy.utils.ProgressBar(config.steps)
    if monitor is not None:
        monitor.pbar, monitor.losses, monitor.first = pbar, lambda: trainer.losses, trainer.step
    first = trainer.step
    every = max(1, config.steps // 20)

    def on_step(step, end, loss):
        done = step - first
        preview = None
        if done % max(every * 5, 50) == 0 or step == end:
            try:
                from PIL import Image

                preview = monitor.ui_preview(trainer.losses) if monitor is not None else \
                    ("PNG", Image.fromarray(loss_curve_rgb(trainer.losses, output.name)), 512)
            except Exception:  # a preview is a nicety; never fail training for it
                preview = None
        pbar.update_absolute(done, config.steps, preview)
        if done % every == 0 or step == end:
            recent = trainer.losses[-every:]
            log.info("LoRA Core train %s: step %d/%d loss %.5f (avg %.5f)", output.name, step, end, loss,
                     sum(recent) / len(recent))

    # T5 layers add their residuals in place (the DiT's blocks too: the loop handles those, see in_place_modules)
    # the base stays as stored (fp8 layers cast per call, NF4 with base_quant nf4): entered before run() injects
    roots = [backend.unet] + ([clip.cond_stage_model] if config.train_text_encoder and clip is not None else [])
    frozen = lt.FrozenBase(roots, nf4=nf4, nf4_roots=[backend.unet] if nf4 is not None else (),
                           compute_dtype=backend.compute_dtype())
    trainer.base_report = frozen.report
    with frozen, _OutOfPlaceClipLayers(clip, config.train_text_encoder), _OutOfPlaceT5Layers(clip, t5_trained):
        result = trainer.run(should_stop=mm.processing_interrupted, on_step=on_step)
    return result, trainer


def apply_lora(model, clip, lora: LoraFile, name: str):
    """MODEL/CLIP clones carrying the trained LoRA, through LoRA Core's loader path (core's as a fallback)."""
    try:
        from lora_core.api import LoraRequest

        from .loader import apply_requests
    except ImportError:  # pragma: no cover - the loader ships with the pack
        import comfy.sd

        return comfy.sd.load_lora_for_models(model, clip, dict(lora.tensors), 1.0, 1.0)
    new_model, new_clip, _ = apply_requests(model, clip, [LoraRequest(lora, 1.0, 1.0, name=name)])
    return new_model, new_clip


def _curve_image(losses, title, validation=()) -> torch.Tensor:
    rgb = loss_curve_rgb(losses, title, validation=validation)
    return torch.from_numpy(rgb).float().div(255.0)[None]


class LoRACoreApplyTrained:
    """Apply a LORA_CORE_LORA value (from LoRACoreTrain) to a MODEL/CLIP at chosen strengths."""

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {"model": ("MODEL",), "lora": ("LORA_CORE_LORA",),
                             "strength_model": ("FLOAT", strength), "strength_clip": ("FLOAT", strength)},
                "optional": {"clip": ("CLIP",)}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a trained LoRA value at any strength (e.g. to compare strengths after training)."

    def apply(self, model, lora, strength_model, strength_clip, clip=None):
        from lora_core.api import LoraRequest

        from .loader import apply_requests

        return apply_requests(model, clip, [LoraRequest(lora, strength_model, strength_clip,
                                                        name=os.path.basename(lora.path or "trained"))])


NODE_CLASS_MAPPINGS = {
    "LoRACoreTrainDataset": LoRACoreTrainDataset,
    "LoRACoreTrain": LoRACoreTrain,
    "LoRACoreApplyTrained": LoRACoreApplyTrained,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreTrainDataset": "LoRA Training Dataset (LoRA Core)",
    "LoRACoreTrain": "Train LoRA (LoRA Core)",
    "LoRACoreApplyTrained": "Apply Trained LoRA (LoRA Core)",
}
