"""The training objective: how a model is noised, what it predicts and how a step's noise level is drawn - the
model's own objective, as ComfyUI's `model_sampling` defines it (nodes/train.py reads it from the MODEL;
lora_core never imports ComfyUI).

* **DDPM** ("epsilon", "v_prediction"; SD1.x/SD2.x/SDXL): a discrete timestep t with cumulative alpha a_t,
  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target eps or v = sqrt(a_t) eps - sqrt(1 - a_t) x0, min-SNR weights.
  Timesteps are drawn uniformly (kohya's and diffusers' default).
* **Flow matching** ("flow"; ComfyUI's CONST: Flux.1, Chroma, SD3, Wan, Qwen-Image, Z-Image, ...): a noise level
  sigma in [0, 1), x_t = (1 - sigma) x0 + sigma eps (CONST.noise_scaling), the model predicts the velocity
  v = eps - x0 (so CONST.calculate_denoised gives x0 = x_t - sigma v), its timestep input is sigma * multiplier
  (model_sampling.timestep). The loss is the plain MSE on v (kohya's `model_prediction_type raw`, weighting
  `none`; min-SNR is a DDPM weighting and does not apply).

The model's own noise schedule is ComfyUI's shifted one, sigma(t) = s t / (1 + (s - 1) t) for t uniform in (0, 1)
(ModelSamplingDiscreteFlow's time_snr_shift; ModelSamplingFlux's exp(mu) / (exp(mu) + 1/t - 1) is the same
curve with s = e^mu): the host reads s from the model, so a MODEL patched by a ModelSampling node trains with
the shift it samples with. How a flow step draws sigma (`TIMESTEP_SAMPLING`):

* "uniform": sigma = u, u ~ U(0, 1) (kohya `uniform`);
* "uniform, model shift": sigma = shift_s(u): the noise levels the model's own sampler schedule spaces evenly;
* "logit-normal": sigma = sigmoid(n), n ~ N(0, 1) (SD3's logit-normal, kohya `sigmoid`, x-flux, ai-toolkit);
* "logit-normal, model shift": sigma = shift_s(sigmoid(n)) (kohya `shift` with `discrete_flow_shift` = the model's
  shift; on Flux.1 s = e^1.15 = 3.158, the setting kohya's Flux guide recommends);
* "logit-normal, resolution shift": s = e^mu with mu linear in the image's token count (BFL's Flux schedule:
  0.5 at 256 tokens, 1.15 at 4096; kohya `flux_shift`), for families that have one;
* "auto": DDPM models uniform timesteps; flow models the family's default (Flux.1 / Chroma: "logit-normal, model
  shift": concentrated on the middle noise levels where the velocity is hardest to predict, and shifted towards
  high noise the way the model is sampled).

A flow objective may be limited to a **timestep range** (musubi-tuner's `--min_timestep` / `--max_timestep`, on the
0-1000 scale of sigma * 1000): one Wan 2.2 expert trains only its share of the noise levels (T2V: high noise
875-1000, low noise 0-875, the boundary 0.875; I2V 0.9). Levels are drawn as above and those outside the range
are drawn again (musubi's `--preserve_distribution_shape`, which its Wan guide recommends for one expert): the
distribution inside the range keeps its shape. The file then carries `modelspec.timestep_range` "min,max", which
lora_core.pairs reads to tell the high-noise file from the low-noise one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lora_core.errors import LoraValueError

TIMESTEP_SAMPLING = ("auto", "uniform", "uniform, model shift", "logit-normal", "logit-normal, model shift",
                     "logit-normal, resolution shift")
PREDICTIONS = ("epsilon", "v_prediction", "flow")
MAX_RANGE_DRAWS = 1000   # rounds of redrawing levels outside a timestep range (musubi's max_loops)


def time_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """ComfyUI's time_snr_shift: s t / (1 + (s - 1) t) (identity at s = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class ResolutionShift:
    """A schedule shift that grows with the image: mu linear in the token count from (tokens_lo, mu_lo) to
    (tokens_hi, mu_hi), shift = e^mu; tokens = latent h * w / patch^2 (times frames for video)."""

    patch: int = 2
    tokens_lo: int = 256
    mu_lo: float = 0.5
    tokens_hi: int = 4096
    mu_hi: float = 1.15

    def shift(self, latent_shape: Sequence[int]) -> float:
        tokens = 1
        for d in latent_shape[2:-2]:
            tokens *= int(d)
        tokens *= math.ceil(latent_shape[-2] / self.patch) * math.ceil(latent_shape[-1] / self.patch)
        slope = (self.mu_hi - self.mu_lo) / (self.tokens_hi - self.tokens_lo)
        return math.exp(self.mu_lo + slope * (tokens - self.tokens_lo))


@dataclass(frozen=True)
class Objective:
    """One model's objective. Build with `Objective.ddpm(alphas_cumprod, prediction)` or
    `Objective.flow(shift, multiplier)`."""

    prediction: str
    alphas_cumprod: Optional[torch.Tensor] = None
    shift: float = 1.0
    multiplier: float = 1.0
    resolution_shift: Optional[ResolutionShift] = None
    default_sampling: str = "logit-normal, model shift"
    timestep_range: Optional[tuple[float, float]] = None   # (min, max) on musubi's 0-1000 scale; None = all

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise LoraValueError(f"prediction {self.prediction!r} is not one of {list(PREDICTIONS)}.")
        if self.prediction != "flow" and self.alphas_cumprod is None:
            raise LoraValueError("a DDPM objective needs the model's alphas_cumprod.")
        if self.prediction == "flow" and not (math.isfinite(self.shift) and self.shift > 0):
            raise LoraValueError(f"flow shift must be a positive number, got {self.shift}.")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            if not self.is_flow:
                raise LoraValueError(f"a timestep range ({lo:g},{hi:g}) is for flow-matching models (Wan 2.2's "
                                     f"experts); this {self.prediction} model trains on every DDPM timestep.")
            if not (0 <= lo < hi <= 1000):
                raise LoraValueError(f"timestep range ({lo:g},{hi:g}) must be 0 <= min < max <= 1000 (musubi's "
                                     f"min_timestep / max_timestep, sigma * 1000).")

    @classmethod
    def ddpm(cls, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> "Objective":
        return cls("v_prediction" if prediction.startswith("v") else "epsilon", alphas_cumprod)

    @classmethod
    def flow(cls, shift: float = 1.0, multiplier: float = 1.0, resolution_shift: Optional[ResolutionShift] = None,
             default_sampling: str = "logit-normal, model shift") -> "Objective":
        return cls("flow", None, float(shift), float(multiplier), resolution_shift, default_sampling)

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    def with_timestep_range(self, timestep_range: Optional[tuple[float, float]]) -> "Objective":
        """This objective limited to (min, max) on the 0-1000 scale (None: the full range)."""
        import dataclasses

        value = None if timestep_range is None else (float(timestep_range[0]), float(timestep_range[1]))
        return dataclasses.replace(self, timestep_range=value)

    # ------------------------------------------------------------------ noise levels
    def resolve_sampling(self, name: str) -> str:
        """The sampling a name stands for on this objective ("auto" -> the default); refuses what does not apply."""
        if name not in TIMESTEP_SAMPLING:
            raise LoraValueError(f"timestep sampling {name!r} is not one of {list(TIMESTEP_SAMPLING)}.")
        if not self.is_flow:
            if name not in ("auto", "uniform"):
                raise LoraValueError(f"timestep sampling {name!r} is for flow-matching models (Flux, Chroma, ...); "
                                     f"this {self.prediction} model trains on uniformly drawn DDPM timesteps: "
                                     f"choose 'auto' or 'uniform'.")
            return "uniform"
        name = self.default_sampling if name == "auto" else name
        if name.endswith("resolution shift") and self.resolution_shift is None:
            raise LoraValueError("'logit-normal, resolution shift' needs a model family with a resolution-dependent "
                                 "schedule (Flux.1); this model has none: use 'logit-normal, model shift'.")
        return name

    def sample(self, batch: int, generator: torch.Generator, sampling: str = "auto",
               latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Per-sample noise levels: DDPM timestep indices (long) or flow sigmas (float32), drawn from
        `generator` (CPU)."""
        name = self.resolve_sampling(sampling)
        if not self.is_flow:
            return torch.randint(0, self.alphas_cumprod.shape[0], (batch,), generator=generator)
        if self.timestep_range is None:
            return self._sample_flow(batch, generator, name, latent_shape)
        # musubi's preserve_distribution_shape: draw, keep the levels inside the range, draw again for the rest
        lo, hi = self.timestep_range[0] / 1000.0, self.timestep_range[1] / 1000.0
        kept: list[torch.Tensor] = []
        count = 0
        for _ in range(MAX_RANGE_DRAWS):
            levels = self._sample_flow(batch, generator, name, latent_shape)
            inside = levels[(levels >= lo) & (levels <= hi)]
            kept.append(inside)
            count += inside.numel()
            if count >= batch:
                return torch.cat(kept)[:batch]
        raise LoraValueError(f"timestep range ({self.timestep_range[0]:g},{self.timestep_range[1]:g}): the "
                             f"'{name}' sampling (shift {self.shift:.4g}) almost never draws a noise level inside it "
                             f"({count} of {batch * MAX_RANGE_DRAWS} draws); widen the range or choose another "
                             f"timestep sampling.")

    def _sample_flow(self, batch: int, generator: torch.Generator, name: str,
                     latent_shape: Optional[Sequence[int]]) -> torch.Tensor:
        if name.startswith("uniform"):
            u = torch.rand((batch,), generator=generator)
        else:
            u = torch.sigmoid(torch.randn((batch,), generator=generator))
        if name.endswith("model shift"):
            return time_shift(self.shift, u)
        if name.endswith("resolution shift"):
            return time_shift(self.resolution_shift.shift(latent_shape), u)
        return u

    def model_sigmas(self, percents: Sequence[float]) -> list[float]:
        """The model's own sigma at sampler progress `percents` (ComfyUI's percent_to_sigma: 0 = pure noise)."""
        return [float(time_shift(self.shift, torch.tensor(1.0 - p, dtype=torch.float64))) for p in percents]

    # ------------------------------------------------------------------ noising, target, timestep input
    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(a_t), sqrt(1 - a_t), computed on the CPU (the schedule's device) and moved to `like`'s."""
        ac = self.alphas_cumprod.float().cpu()[t.cpu()].view(-1, *([1] * (like.ndim - 1)))
        return ac.sqrt().to(like.device), (1 - ac).sqrt().to(like.device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        if self.is_flow:
            s = level.float().view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
            return s * noise + (1.0 - s) * x0
        a, s = self._coefficients(level, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        if self.is_flow:
            return noise - x0
        if self.prediction == "v_prediction":
            a, s = self._coefficients(level, x0)
            return a * noise - s * x0
        return noise

    def model_timesteps(self, level: torch.Tensor) -> torch.Tensor:
        """What the denoiser's timestep input gets: the DDPM index, or sigma * multiplier."""
        return level.float() * self.multiplier if self.is_flow else level

    def metadata(self, sampling: str) -> dict[str, str]:
        """kohya's header keys for the objective (flow models: ss_timestep_sampling, ss_discrete_flow_shift,
        ss_model_prediction_type, ss_weighting_scheme)."""
        if not self.is_flow:
            return {}
        name = self.resolve_sampling(sampling)
        out = {}
        if self.timestep_range is not None:   # musubi's sai_model_spec key, which lora_core.pairs reads
            out["modelspec.timestep_range"] = f"{self.timestep_range[0]:g},{self.timestep_range[1]:g}"
        return {**out, "ss_timestep_sampling": name, "ss_discrete_flow_shift": f"{self.shift:.6g}",
                "ss_model_prediction_type": "raw", "ss_weighting_scheme": "none",
                "ss_sigmoid_scale": "1.0", "ss_logit_mean": "0.0", "ss_logit_std": "1.0"}


def parse_timestep_range(text, named: Optional[dict] = None) -> Optional[tuple[float, float]]:
    """A timestep range option: "" (all), "min,max" on musubi's 0-1000 scale ("875,1000"), or a name the model
    family gives (Wan 2.2: "high noise" / "low noise" -> its experts' ranges). Returns (min, max) or None."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        values = list(text)
    else:
        value = " ".join(str(text).strip().lower().replace("_", " ").replace("-", " ").split())
        if not value:
            return None
        named = {" ".join(k.lower().split()): v for k, v in (named or {}).items()}
        if value in named:
            return tuple(float(v) for v in named[value])
        values = [v for v in str(text).replace(" ", "").split(",")]
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        names = f" or one of {sorted(named)}" if named else ""
        raise LoraValueError(f"timestep range {text!r}: give 'min,max' on the 0-1000 scale (e.g. '875,1000' for a "
                             f"Wan 2.2 T2V high-noise expert, '0,875' for the low-noise one){names}, or leave it "
                             f"empty for every noise level.") from None
    if not (0 <= lo < hi <= 1000):
        raise LoraValueError(f"timestep range {text!r}: needs 0 <= min < max <= 1000 (musubi's min_timestep / "
                             f"max_timestep, sigma * 1000).")
    return (lo, hi)
