"""The training loop, built around a small interface so it runs on ComfyUI's model and on diffusers alike.

A backend gives:
    denoise(noisy_latents, timesteps, cond) -> prediction   (in the model's own space: eps, v or velocity;
                     `timesteps` is what the objective's model_timesteps gives: DDPM indices or sigma * multiplier)
    objective        (objective.Objective: the model's own noising / target / timestep sampling), or, for DDPM
                     backends, alphas_cumprod (1-D, one entry per discrete timestep) and prediction_type
                     ("epsilon" or "v_prediction") from which the loop builds it
    device
    modules()        the frozen nn.Modules being adapted (their requires_grad is restored afterwards)
    checkpoint_modules()  (optional) blocks to wrap in activation checkpointing
    in_place_modules()    (optional) modules whose residual adds (`x += f(x)`) run in place; made out of place
                     while training (injection.OutOfPlaceAdds), which autograd needs once a LoRA feeds them
    group_by_text_length  (optional, default False) conditionings of different token lengths are not batched
                     by repeating tokens (SD's CLIP-chunk rule) but denoised in groups of equal length (T5)
    guidance         (optional) the guidance value a guidance-distilled model is fed, for the metadata

Latents are (batch, channels, *spatial) of any rank: images (B, C, H, W), video (B, C, frames, H, W).

Hooks (lora_core.train.hooks: sample previews, validation loss) run beside the loop, outside autograd and with the
global RNG restored, so they never change what is trained; their state goes into the resume state.

Everything random in a step (batch, caption augmentation, noise, timesteps, noise offset) is drawn from
generators seeded by (seed, micro-batch index); together with the saved optimizer state this makes
"N steps, stop, resume N more" equal to "2N steps".
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from lora_core.errors import LoraValueError

from .algorithms import ALGORITHMS
from .dataset import BatchPlan, TrainDataset, process_caption
from .injection import LoRANetwork, OutOfPlaceAdds
from .objective import TIMESTEP_SAMPLING, Objective
from .quant import LORA_DTYPES
from .save import OutputFiles, kohya_metadata, save_lora
from .state import load_state, restore_rng, save_state

log = logging.getLogger("lora_core.train")

OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor", "Lion")
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Backend(Protocol):
    device: torch.device

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor: ...

    def modules(self) -> Sequence[torch.nn.Module]: ...


@dataclass
class TrainConfig:
    steps: int = 1000                 # steps to run in this call (a chunk when continuing)
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    algorithm: str = "LoRA"           # "LoRA" (Linear + 1x1 conv), "LoCon" (+ resnet/sampler convs), or LyCORIS's
                                      # "LoHa" / "LoKr" / "DoRA" (lora_core.train.algorithms) on the same targets
    rank: int = 16
    alpha: float = 8.0
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    unet_kinds: tuple = ("attn", "ff", "proj")
    norms_biases: bool = False        # also the adapted layers' biases and the norms, as full diffs (full_diffs.py)
    blocks: Optional[list] = None     # train only these UNet block ids (None = all)
    block_lr: dict = field(default_factory=dict)  # block id -> LR factor
    unet_lr: float = 1e-4
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0              # scheduler horizon; 0 = the step this call ends at
    min_snr_gamma: float = 5.0        # 0 = off; DDPM objectives only (flow matching trains unweighted)
    loss_weighting: str = "min-snr"   # DDPM objectives: LOSS_WEIGHTINGS (see loss_weights); flow: "min-snr" only
    timestep_sampling: str = "auto"   # objective.TIMESTEP_SAMPLING; "auto" = the objective's default
    timestep_range: Optional[tuple] = None   # flow models: (min, max) on musubi's 0-1000 scale (one Wan 2.2 expert)
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0        # 0 = off
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True
    save_every: int = 0               # 0 = only at the end
    keep_last: int = 3                # step files kept (0 = all)
    save_dtype: str = "fp16"
    overwrite: bool = False
    lora_dtype: str = "fp32"          # the trained weights' dtype (quant.LORA_DTYPES: fp32 or bf16)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be >= 1, got {self.grad_accum}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.alpha >= 0, f"alpha must be >= 0 (0 = rank), got {self.alpha}"),
            (math.isfinite(self.unet_lr) and self.unet_lr >= 0, f"UNet learning rate must be >= 0, got {self.unet_lr}"),
            (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr >= 0,
             f"text-encoder learning rate must be >= 0, got {self.text_encoder_lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, f"LR scheduler {self.scheduler!r} is not one of {list(SCHEDULERS)}"),
            (self.mixed_precision in PRECISIONS, f"mixed precision {self.mixed_precision!r} is not one of {list(PRECISIONS)}"),
            (self.algorithm in ALGORITHMS, f"algorithm {self.algorithm!r} is not one of {list(ALGORITHMS)}"),
            (self.warmup_steps >= 0, f"warmup steps must be >= 0, got {self.warmup_steps}"),
            (self.min_snr_gamma >= 0, f"min-SNR gamma must be >= 0 (0 = off), got {self.min_snr_gamma}"),
            (self.loss_weighting in LOSS_WEIGHTINGS,
             f"loss weighting {self.loss_weighting!r} is not one of {list(LOSS_WEIGHTINGS)}"),
            (self.save_dtype in SAVE_DTYPES, f"save dtype {self.save_dtype!r} is not one of {list(SAVE_DTYPES)}"),
            (self.lora_dtype in LORA_DTYPES, f"LoRA dtype {self.lora_dtype!r} is not one of {list(LORA_DTYPES)}"),
            (self.timestep_sampling in TIMESTEP_SAMPLING,
             f"timestep sampling {self.timestep_sampling!r} is not one of {list(TIMESTEP_SAMPLING)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoraValueError(message + ".")

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["unet_kinds"] = list(self.unet_kinds)
        return data


@dataclass
class TrainResult:
    step: int                      # global step reached (counting earlier chunks)
    losses: list                   # one mean loss per optimizer step, whole run
    final_path: Optional[str]
    state_path: Optional[str]
    interrupted: bool
    seconds: float
    steps_done: int
    session_id: str

    @property
    def steps_per_second(self) -> float:
        return self.steps_done / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------ schedules

def lr_factor(step: int, scheduler: str, warmup: int, total: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, then constant/cosine/linear decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma loss weights: min(SNR, g)/SNR for eps, min(SNR, g)/(SNR+1) for v."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type.startswith("v") else clipped / snr


LOSS_WEIGHTINGS = ("min-snr", "debiased", "x0")


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str, gamma: float,
                 prediction_type: str) -> Optional[torch.Tensor]:
    """Per-sample weights of the DDPM loss in the model's prediction space (None: unweighted).

    * "min-snr": min-SNR-gamma (Hang et al. 2023; kohya --min_snr_gamma), off at gamma 0;
    * "debiased": kohya's --debiased_estimation_loss, 1/sqrt(SNR) (SNR capped at 1000 as kohya does), times the
      min-SNR weight when gamma > 0 (kohya applies both);
    * "x0": the MSE of the denoised estimate x0, what ComfyUI core's Train LoRA node minimises: 1/SNR on eps models,
      1/(SNR + 1) on v models (x0 = sqrt(a) x_t - sqrt(1 - a) v); gamma is not used. Nearly all of its weight is on
      the noisiest timesteps."""
    if weighting == "x0":
        ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = ac / (1 - ac)
        return 1 / (snr + 1) if prediction_type.startswith("v") else 1 / snr
    weights = snr_weights(timesteps, alphas_cumprod, gamma, prediction_type) if gamma > 0 else None
    if weighting == "debiased":
        ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
        debiased = 1 / torch.sqrt(torch.clamp(ac / (1 - ac), max=1000.0))
        weights = debiased if weights is None else weights * debiased
    return weights


def sd_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """The SD1/SD2/SDXL "scaled_linear" DDPM schedule."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32 (always on CPU: CPU autocast is slow and imprecise)."""
    if device.type != "cuda" or name == "fp32":
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_optimizer(name: str, groups: list, weight_decay: float) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "Adam":
        return torch.optim.Adam(groups)
    if name == "SGD":
        return torch.optim.SGD(groups, momentum=0.9)
    if name == "Adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise LoraValueError("Adafactor needs torch >= 2.5; pick AdamW.")
        return torch.optim.Adafactor(groups, weight_decay=weight_decay)
    if name == "Lion":
        return Lion(groups, weight_decay=weight_decay)
    raise LoraValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}.")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; one state tensor per parameter.
    Use ~3-10x smaller LR than AdamW."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(avg * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return None


# ------------------------------------------------------------------------------------------ conditioning

def objective_of(backend) -> Objective:
    """The backend's objective, or the DDPM one its alphas_cumprod / prediction_type describe."""
    objective = getattr(backend, "objective", None)
    if objective is not None:
        return objective
    return Objective.ddpm(backend.alphas_cumprod, backend.prediction_type)


def text_length(cond) -> int:
    """Token length of a conditioning (its context), 0 when it has none."""
    context = cond.get("context") if isinstance(cond, dict) else cond
    return int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim >= 3 else 0


def cat_cond(conds: list):
    """Batch per-sample conditionings (tensors or dicts of tensors); token lengths are matched by repeating
    to their least common multiple, like ComfyUI does for prompts longer than 77 tokens."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: cat_cond([c[k] for c in conds]) if isinstance(first[k], (torch.Tensor, dict)) else first[k]
                for k in first}
    if first.ndim >= 3:
        lengths = {c.shape[1] for c in conds}
        if len(lengths) > 1:
            target = math.lcm(*lengths)
            conds = [c.repeat(1, target // c.shape[1], *([1] * (c.ndim - 2))) for c in conds]
    return torch.cat(conds, 0)


def _to_device(cond, device, dtype=None):
    if isinstance(cond, dict):
        return {k: _to_device(v, device, dtype) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor):
        return cond.to(device=device, dtype=dtype if (dtype and cond.is_floating_point()) else cond.dtype)
    return cond


def _detach(cond):
    if isinstance(cond, dict):
        return {k: _detach(v) for k, v in cond.items()}
    return cond.detach() if isinstance(cond, torch.Tensor) else cond


# ------------------------------------------------------------------------------------------ checkpointing

class _Checkpointing:
    """Wrap blocks' forwards in torch.utils.checkpoint (non-reentrant: keyword arguments are fine)."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.previous = []

    def __enter__(self):
        from torch.utils.checkpoint import checkpoint

        for module in self.modules:
            self.previous.append(module.__dict__.get("forward"))
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            module.forward = forward
        return self

    def __exit__(self, *exc):
        for module, previous in zip(self.modules, self.previous):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self.previous.clear()
        return False


# ------------------------------------------------------------------------------------------ the trainer

class LoraTrainer:
    """Train `network` (already built on the backend's modules) on `dataset`.

    `encode_images(images (B,3,H,W) in [0,1]) -> latents` is needed when samples carry images only;
    `encode_text(captions) -> cond` when samples carry no precomputed `cond`. Both run on the caller's
    models. `output` (OutputFiles) enables saving: the final file, step files and the state file.
    """

    def __init__(self, backend: Backend, network: LoRANetwork, dataset: TrainDataset, config: TrainConfig,
                 encode_images: Optional[Callable] = None, encode_text: Optional[Callable] = None,
                 output: Optional[OutputFiles] = None, arch: str = "SD1", base_model_name: str = "",
                 checkpoint_modules: Sequence[torch.nn.Module] = (), hooks: Sequence = (),
                 encode_conditioning: Optional[Callable] = None):
        config.validate()
        self.backend, self.network, self.dataset, self.config = backend, network, dataset, config
        self.encode_images, self.encode_text = encode_images, encode_text
        # per-sample conditioning from the sample's own pixels (an image-to-video model's first frame): image (1, ...)
        # -> dict of (1, ...) tensors merged into the sample's text conditioning; None = the model needs none
        self.encode_conditioning = encode_conditioning
        self._sample_conds: dict[int, dict] = {}
        self.output, self.arch, self.base_model_name = output, arch, base_model_name
        self.checkpoint_modules = list(checkpoint_modules)
        # beside the loop (hooks.TrainHook): previews, validation loss; their state is saved and resumed with ours
        self.hooks = list(hooks)
        self.device = torch.device(backend.device)
        self.objective = objective_of(backend)
        if config.timestep_range is not None:   # objective.py: redrawn inside the range, written to the file
            self.objective = self.objective.with_timestep_range(config.timestep_range)
        self.objective.resolve_sampling(config.timestep_sampling)   # refuse a choice that does not apply, now
        if self.objective.is_flow and config.loss_weighting != "min-snr":
            raise LoraValueError(f"loss weighting {config.loss_weighting!r} is for DDPM models (SD1/SD2/SDXL); this "
                                 f"flow-matching model trains on the plain velocity MSE: use 'min-snr' (not applied "
                                 f"to flow models).")
        self.group_by_length = bool(getattr(backend, "group_by_text_length", False))
        self.autocast_dtype = resolve_precision(config.mixed_precision, self.device)
        self.plan = BatchPlan(dataset, config.batch_size, config.seed)
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.step = 0
        self.losses: list[float] = []
        self._latents: dict[int, torch.Tensor] = {}
        self._text_cache: dict = {}
        self._check_data_sources()
        network.to(self.device, LORA_DTYPES[config.lora_dtype])
        te_lr = config.text_encoder_lr if config.train_text_encoder else None
        self.train_names = network.trainable_names(config.train_text_encoder)
        groups = network.param_groups(config.unet_lr, te_lr, config.block_lr)
        if not groups:
            raise LoraValueError("Every learning rate is 0 (or every selected block has LR factor 0): nothing would "
                                 "train. Raise the learning rate or the block factors.")
        for g in groups:
            g["base_lr"] = g["lr"]
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(config.optimizer, groups, config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

    # -------------------------------------------------------------- setup
    def _check_data_sources(self) -> None:
        if any(s.latent is None for s in self.dataset.samples) and self.encode_images is None:
            raise LoraValueError("The dataset has images but no VAE was given to encode them: connect a VAE.")
        if any(s.cond is None for s in self.dataset.samples) and self.encode_text is None:
            raise LoraValueError("The dataset has captions but no text encoder was given: connect a CLIP.")
        if self.config.train_text_encoder and self.encode_text is None:
            raise LoraValueError("Training the text encoder needs a CLIP/text encoder: connect one or turn it off.")

    def resume(self, state_path: str) -> None:
        """Continue a run: weights, optimizer, step, losses, session id and RNG from a state file."""
        state = load_state(state_path)
        saved = state["config"]
        # a key an older state lacks is the setting's default (the option did not exist: the run trained as that)
        defaults = TrainConfig().as_dict()
        for key in ("algorithm", "rank", "alpha", "unet_kinds", "norms_biases", "blocks", "train_text_encoder",
                    "batch_size", "seed", "timestep_range"):
            mine = self.config.as_dict()[key]
            if saved.get(key, defaults[key]) != mine:
                raise LoraValueError(f"Cannot continue {state_path}: it was trained with {key}={saved.get(key)!r}, this "
                                     f"run has {key}={mine!r}. Use the same setting, or start a new run (another "
                                     f"output name).")
        self.network.load_kohya_state_dict(state["lora"], source=state_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.session_id = state["session_id"]
        self.started_at = state["started_at"]
        restore_rng(state["rng"])
        for hook in self.hooks:
            hook.load_state_dict((state.get("extra") or {}).get(hook.name) or {}, state_path)
        log.info("LoRA Core: continuing %s from step %d", state_path, self.step)

    def _cache_latents(self) -> None:
        missing = [i for i, s in enumerate(self.dataset.samples) if s.latent is None and i not in self._latents]
        for start in range(0, len(missing), 4):
            chunk = missing[start:start + 4]
            for i in chunk:  # one at a time per bucket shape is simplest and VAE-memory friendly
                image = self.dataset.samples[i].image[None]
                with torch.no_grad():
                    self._latents[i] = self.encode_images(image)[0].detach().to("cpu", torch.float32)

    def _latent(self, index: int) -> torch.Tensor:
        sample = self.dataset.samples[index]
        if sample.latent is not None:
            return sample.latent.float()
        if index in self._latents:
            return self._latents[index]
        with torch.no_grad():
            latent = self.encode_images(sample.image[None])[0].detach().to("cpu", torch.float32)
        if self.config.cache_latents:
            self._latents[index] = latent
        return latent

    def sample_conditioning(self, sample, key=None) -> dict:
        """The conditioning a sample's own pixels give (`encode_conditioning`; {} when there is none), cached under
        `key` (a dataset index) when latents are cached. The validation loss asks for its samples here too."""
        if self.encode_conditioning is None or sample.image is None:
            return {}
        if key is not None and key in self._sample_conds:
            return self._sample_conds[key]
        with torch.no_grad():
            cond = _detach(self.encode_conditioning(sample.image[None]))
        cond = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        if key is not None and self.config.cache_latents:
            self._sample_conds[key] = cond
        return cond

    def _with_sample_conditioning(self, cond, indices: list[int]):
        """`cond` (per-sample list or batched dict, in the order of `indices`) with each sample's own conditioning."""
        if self.encode_conditioning is None:
            return cond
        extras = [self.sample_conditioning(self.dataset.samples[i], i) for i in indices]
        if not any(extras):
            return cond
        if isinstance(cond, list):
            return [{**c, **e} for c, e in zip(cond, extras)]
        return {**cond, **cat_cond(extras)}

    def _cond(self, indices: list[int], micro: int, rows: Optional[Sequence[int]] = None):
        mine = indices if rows is None else [indices[r] for r in rows]
        return self._with_sample_conditioning(self._text_cond(indices, micro, rows), mine)

    def _text_cond(self, indices: list[int], micro: int, rows: Optional[Sequence[int]] = None):
        """Per-sample captions (augmented with this micro-batch's RNG) through the text encoder, or the
        samples' precomputed conds. `rows` (positions in `indices`; None = all) is the part of the batch this
        process trains (distributed runs): captions are augmented for the whole batch, then the rows taken, so
        each sample sees the caption a one-process run gives it."""
        samples = [self.dataset.samples[i] for i in indices]
        if all(s.cond is not None for s in samples):
            samples = samples if rows is None else [samples[r] for r in rows]
            return [s.cond for s in samples] if self.group_by_length else cat_cond([s.cond for s in samples])
        rng = random.Random((self.config.seed * 7_919 + micro) * 104_729)
        captions = [process_caption(s.caption, self.dataset.captions, rng) for s in samples]
        if rows is not None:
            captions = [captions[r] for r in rows]
        if self.config.train_text_encoder:
            if self.group_by_length:
                return [self.encode_text([caption]) for caption in captions]
            return self.encode_text(captions)
        use_cache = self.config.cache_text_encoder_outputs
        conds = []
        for caption in captions:
            if use_cache and caption in self._text_cache:
                conds.append(self._text_cache[caption])
                continue
            with torch.no_grad():
                cond = _detach(self.encode_text([caption]))
            if use_cache:
                self._text_cache[caption] = cond
            conds.append(cond)
        return conds if self.group_by_length else cat_cond(conds)

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """The backend's prediction; per-sample conds (grouping backends) are denoised in groups of equal token
        length, each group batched, and put back in batch order."""
        if not isinstance(cond, list):
            return self.backend.denoise(noisy, timesteps, _to_device(cond, self.device))
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cond):
            groups.setdefault(text_length(c), []).append(i)
        if len(groups) == 1:
            return self.backend.denoise(noisy, timesteps, _to_device(cat_cond(cond), self.device))
        order, outputs = [], []
        for members in groups.values():
            index = torch.tensor(members, device=noisy.device)
            group_cond = _to_device(cat_cond([cond[i] for i in members]), self.device)
            outputs.append(self.backend.denoise(noisy[index], timesteps[index], group_cond))
            order += members
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outputs, 0)[inverse.to(noisy.device)]

    # -------------------------------------------------------------- one step
    def _shard(self, batch: int):
        """(rows, weights): which rows of a global batch of `batch` samples this process trains, and each row's
        weight in the loss (padding rows weigh 0). One process: every row, None weights (a plain mean). The
        distributed trainer (lora_core.train.distributed) splits the batch over its processes."""
        return None, None

    def sample_losses(self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, cond) -> torch.Tensor:
        """The training loss of each sample (B,): `latents` noised with `noise` at `levels` (the objective's noise
        levels), denoised with `cond`, MSE against the objective's target in the model's prediction space, min-SNR
        weighted on DDPM models. The training step and the validation loss both compute it here."""
        objective = self.objective
        noisy = objective.noisy(latents, noise, levels)
        target = objective.target(latents, noise, levels)
        t_dev = objective.model_timesteps(levels).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self._denoise(noisy, t_dev, cond)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, latents.ndim)))
        if not objective.is_flow:
            weights = loss_weights(t_dev, objective.alphas_cumprod.float().cpu(), self.config.loss_weighting,
                                   self.config.min_snr_gamma, objective.prediction)
            if weights is not None:
                loss = loss * weights
        return loss

    def _micro_loss(self, micro: int) -> torch.Tensor:
        indices = self.plan.batch(micro)
        rows, weights = self._shard(len(indices))
        mine = indices if rows is None else [indices[r] for r in rows]
        latents = torch.stack([self._latent(i) for i in mine]).to(self.device)
        cond = self._cond(indices, micro, rows)
        if not isinstance(cond, list):
            cond = _to_device(cond, self.device)
        # Noise, offset and levels are drawn for the whole global batch, then this process's rows are taken.
        shape = (len(indices),) + tuple(latents.shape[1:])
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + micro * 7 + 1)
        noise = torch.randn(shape, generator=gen)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2),
                                                                   generator=gen)
        objective = self.objective
        levels = objective.sample(shape[0], gen, self.config.timestep_sampling, shape)
        if rows is not None:
            noise, levels = noise[list(rows)], levels[list(rows)]
        loss = self.sample_losses(latents, noise.to(self.device), levels, cond)
        if weights is not None:   # this process's share of the global batch mean
            return (loss * weights.to(loss.device)).sum() / len(indices)
        return loss.mean()

    def _backward_micro(self, micro: int, last: bool) -> float:
        """Forward and backward of one micro-batch (`last`: the step's final one); returns its loss share. The
        distributed trainer runs this through DistributedDataParallel."""
        loss = self._micro_loss(micro) / self.config.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return float(loss.detach())

    def _optimizer_step(self, step: int) -> float:
        """One optimizer step; the weights change only when the whole step succeeded with a finite loss, so an
        exception anywhere in here (an interrupt raised inside the forward pass, a non-finite loss, out of
        memory) leaves the LoRA exactly as it was after `step` steps."""
        cfg = self.config
        factor = lr_factor(step, cfg.scheduler, cfg.warmup_steps, cfg.total_steps or self._end_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss_sum = 0.0
        try:
            for k in range(cfg.grad_accum):
                try:
                    loss_sum += self._backward_micro(step * cfg.grad_accum + k, k == cfg.grad_accum - 1)
                finally:   # a fused weight's side-path output kept for parts that never read it (none expected)
                    self.network.release()
            if not math.isfinite(loss_sum):
                raise LoraValueError(f"The loss became {loss_sum} at step {step + 1}: the learning rate is too high "
                                     f"for this setup (or fp16 overflowed). Lower the LR or use bf16/fp32.")
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    # -------------------------------------------------------------- saving
    def metadata(self) -> dict:
        cfg = dataclasses.replace(self.config, total_steps=self.config.total_steps or self._end_step)
        extra = {}
        for hook in self.hooks:
            extra.update(hook.metadata())
        return kohya_metadata(config=cfg, network=self.network, dataset=self.dataset, arch=self.arch,
                              prediction_type=self.objective.prediction, step=self.step,
                              session_id=self.session_id, started_at=self.started_at,
                              output_name=self.output.name if self.output else "lora",
                              base_model_name=self.base_model_name, objective=self.objective,
                              guidance=getattr(self.backend, "guidance", None), extra=extra or None)

    def lora_tensors(self) -> dict:
        return self.network.kohya_state_dict(SAVE_DTYPES[self.config.save_dtype], self.train_names)

    def save(self, final: bool) -> Optional[str]:
        if self.output is None:
            return None
        path = self.output.final if final else self.output.step_file(self.step)
        overwrite = self.output.may_write(path, self.session_id, self.config.overwrite)
        written = save_lora(path, self.lora_tensors(), self.metadata(), overwrite=overwrite)
        save_state(self.output.state, lora=self.network.kohya_state_dict(torch.float32),
                   optimizer=self.optimizer.state_dict(), scheduler={"name": self.config.scheduler, "step": self.step},
                   step=self.step, config=self.config.as_dict(), session_id=self.session_id,
                   started_at=self.started_at, losses=self.losses,
                   extra={hook.name: hook.state_dict() for hook in self.hooks})
        if not final:
            self.output.prune(self.config.keep_last, self.session_id)
        return written

    # -------------------------------------------------------------- run
    def run(self, should_stop: Optional[Callable[[], bool]] = None,
            on_step: Optional[Callable[[int, int, float], None]] = None) -> TrainResult:
        """Train `config.steps` more steps. `should_stop()` is polled between steps (ComfyUI's interrupt flag);
        when it fires, the LoRA reached so far is saved (file + state) before returning.

        Whatever raises out of the loop - ComfyUI's InterruptProcessingException from its progress hook or from
        the per-op check inside the forward pass, KeyboardInterrupt, an out-of-memory error, a non-finite loss -
        the steps finished so far are saved first (the final file and a resumable state, as a normal end would),
        then the exception is re-raised unchanged. A run that finished no step saves nothing."""
        cfg = self.config
        self._end_step = self.step + cfg.steps
        if self.output is not None:
            first = self.step
            step_files = [s for s in range(first + 1, self._end_step) if cfg.save_every and s % cfg.save_every == 0]
            self.output.check_final(self.session_id, cfg.overwrite, step_files)
        if cfg.cache_latents:
            self._cache_latents()
        frozen = self._freeze()
        interrupted = False
        steps_done = 0
        failure: Optional[BaseException] = None
        begin = time.perf_counter()
        self.network.inject()
        try:
            in_place = getattr(self.backend, "in_place_modules", None)
            with _Checkpointing(self.checkpoint_modules if cfg.gradient_checkpointing else ()), torch.enable_grad(), \
                    OutOfPlaceAdds(in_place() if in_place is not None else ()):
                for hook in self.hooks:
                    hook.begin(self)
                while self.step < self._end_step:
                    if should_stop is not None and should_stop():
                        interrupted = True
                        break
                    loss = self._optimizer_step(self.step)
                    self.step += 1
                    steps_done += 1
                    self.losses.append(loss)
                    for hook in self.hooks:
                        hook.after_step(self)
                    if on_step is not None:
                        on_step(self.step, self._end_step, loss)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self._end_step:
                        self.save(final=False)
        except BaseException as error:  # noqa: B902 - saved below, then re-raised unchanged
            failure = error
        finally:
            self.network.restore()
            self._unfreeze(frozen)
        seconds = time.perf_counter() - begin
        if failure is not None:
            if steps_done > 0:
                self._save_after_failure(failure)
            raise failure
        final = self.save(final=True)
        return TrainResult(self.step, list(self.losses), final, self.output.state if self.output else None,
                           interrupted, seconds, steps_done, self.session_id)

    def _save_after_failure(self, failure: BaseException) -> None:
        """Save the finished steps before `failure` leaves run(); a save error is logged, never masks it."""
        try:
            path = self.save(final=True)
        except Exception as error:  # the original exception matters more; report both
            log.error("LoRA Core: training stopped at step %d by %s, and saving the finished steps failed: %s",
                      self.step, type(failure).__name__, error)
            return
        if path is not None:
            log.warning("LoRA Core: training stopped at step %d by %s: %s; saved %s and its state (continue with "
                        "run='continue').", self.step, type(failure).__name__, failure, path)
        self.saved_on_failure = path

    saved_on_failure: Optional[str] = None

    def _freeze(self) -> list:
        flags = []
        for module in self.backend.modules():
            for p in module.parameters():
                flags.append((p, p.requires_grad))
                p.requires_grad_(False)
        return flags

    @staticmethod
    def _unfreeze(flags: list) -> None:
        for p, flag in flags:
            # ComfyUI creates weights under inference mode; those can never carry gradients again, so their
            # flag stays off rather than raising "Setting requires_grad=True on inference tensor".
            if p.requires_grad != flag and not (flag and p.is_inference()):
                p.requires_grad_(flag)

    _end_step = 0
