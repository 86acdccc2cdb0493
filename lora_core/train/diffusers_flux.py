"""Flux.1 and Chroma on diffusers' classes for `python -m lora_core.train`: FluxTransformer2DModel, CLIPTextModel
(pooled output) + T5EncoderModel (context), AutoencoderKL with 16 latent channels, FlowMatchEulerDiscreteScheduler;
Chroma: ChromaTransformer2DModel + T5EncoderModel alone (ChromaPipeline's folder: text_encoder/, tokenizer/).

* Model: a diffusers Flux folder (model_index.json, transformer/, text_encoder/, text_encoder_2/, vae/,
  tokenizer/, tokenizer_2/, scheduler/), or the transformer alone (a diffusers-named .safetensors file, or a
  transformer/ folder) with `model_config` the Flux folder holding the rest.
* Objective: flow matching (objective.Objective.flow), velocity target noise - x0, the transformer fed sigma
  (it multiplies by 1000 itself, as diffusers' FluxPipeline passes timestep / 1000). The shift is the
  scheduler's: `shift`, or with `use_dynamic_shifting` BFL's resolution-dependent one (base_shift / max_shift over
  base_image_seq_len / max_image_seq_len tokens) whose fixed value e^max_shift is ComfyUI's ModelSamplingFlux
  default - the shift the train node reads from a ComfyUI Flux.1 dev, so both trainers draw the same levels.
* Latents: the VAE's posterior mean, (x - shift_factor) * scaling_factor, packed 2x2 into tokens as diffusers'
  FluxPipeline._pack_latents does (= ComfyUI's "b c (h 2) (w 2) -> b (h w) (c 2 2)"), image ids (0, row, col),
  text ids zeros; guidance (Flux.1 dev, guidance_embeds) the config's `guidance` value.
* Text: each caption through CLIP-L (77 tokens, its pooled output) and T5 (up to 512 tokens, last hidden states),
  as FluxPipeline.encode_prompt.
* Names: one LoRA per module of the family's canonical (ComfyUI / BFL) layout, in kohya's names
  (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...), the file the train node
  writes on a ComfyUI Flux. Where diffusers splits a fused weight (to_q / to_k / to_v of img_attn.qkv; to_q / to_k
  / to_v / proj_mlp of linear1) the one LoRA's output rows are added to each split module
  (injection.Target.parts), so the trained LoRA is the fused one kohya's format holds, at the same rank.
* Chroma (ChromaPipeline's folder): the same blocks without modulation, the distilled guidance layer fed the
  timestep (no guidance or pooled input), flow matching with the scheduler config's shift. Text: T5 alone with
  Chroma's mask rule (diffusers' ChromaPipeline._get_t5_prompt_embeds, lodestone's reference): T5 reads the
  caption's tokens (EOS included) under the tokenizer's mask, and the transformer sees them plus the first padding
  token, every later padding token masked. Here each caption is encoded to exactly those tokens (the masked ones
  are dropped: no key ever attends to them, so the image tokens are the same), and the loop batches captions of
  equal length together (group_by_text_length), so the transformer runs with no mask at all. (ComfyUI's Chroma
  feeds the caption's tokens without any padding token; diffusers 0.36's pipeline passes its mask as a float
  additive bias, which masks nothing: diffusers issues #12116 / #13619.) Names as on a ComfyUI Chroma:
  `lora_unet_double_blocks_N_img_attn_qkv`, ..., `lora_te1_` T5 (ComfyUI's Chroma text encoder is te1);
  metadata ss_base_model_version = chroma.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lora_core.errors import LoraFileError, LoraValueError

from .injection import Target
from .objective import Objective, ResolutionShift

T5_MAX_TOKENS = 512
FLUX_PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler")
CHROMA_PARTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")
TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "Flux.1", "ChromaTransformer2DModel": "Chroma"}


def _class_name(config: str) -> str:
    try:
        with open(config, encoding="utf-8") as handle:
            return str(json.load(handle).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def transformer_kind(path: str) -> Optional[str]:
    """"Flux.1" or "Chroma" for a diffusers folder (its model_index.json's pipeline, or its transformer's config)
    or a transformer folder of either class; None otherwise."""
    if not os.path.isdir(path):
        return None
    name = _class_name(os.path.join(path, "model_index.json"))
    if "Chroma" in name:
        return "Chroma"
    if "Flux" in name:
        return "Flux.1"
    for config in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")):
        kind = TRANSFORMER_CLASSES.get(_class_name(config))
        if kind is not None:
            return kind
    return None


def is_flux_folder(path: str) -> bool:
    """A diffusers Flux or Chroma folder (FluxPipeline's / ChromaPipeline's model_index.json, or a transformer/
    subfolder), or a transformer folder whose config is a FluxTransformer2DModel's / ChromaTransformer2DModel's."""
    return transformer_kind(path) is not None


@dataclass
class DiffusersFlux:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module          # CLIPTextModel (pooled output; kohya's lora_te1); Chroma: T5EncoderModel
    text_encoder_2: Optional[nn.Module]   # T5EncoderModel (context); Chroma: None
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict
    arch: object                     # lora_core ArchSpec (Flux.1-dev / Flux.1-schnell / Chroma)
    spec: object                     # the family's FluxSpec of this transformer

    @property
    def chroma(self) -> bool:
        return self.arch.name == "Chroma"


def load_flux(path: str, model_config: str, device: torch.device) -> DiffusersFlux:
    """A diffusers Flux.1 or Chroma model (folder, or transformer file / folder + model_config), on `device`."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    load = dict(local_files_only=True)
    if os.path.isdir(os.path.join(path, "transformer")):
        root, transformer_dir, transformer_file = path, os.path.join(path, "transformer"), None
    else:   # the transformer alone: a folder of its own, or a .safetensors file; the rest from model_config
        if not model_config or not os.path.isdir(model_config):
            raise LoraValueError(f"Model {path} is a Flux transformer alone: set model_config to a local diffusers "
                                 f"Flux folder with the other parts ({', '.join(FLUX_PARTS[1:])}), or a Chroma folder "
                                 f"({', '.join(CHROMA_PARTS[1:])}).")
        root = model_config
        transformer_dir = path if os.path.isdir(path) else os.path.join(model_config, "transformer")
        transformer_file = path if os.path.isfile(path) else None
    kind = transformer_kind(transformer_dir) or transformer_kind(root) or "Flux.1"
    chroma = kind == "Chroma"
    transformer_class = ChromaTransformer2DModel if chroma else FluxTransformer2DModel
    parts = CHROMA_PARTS if chroma else FLUX_PARTS
    pipeline = "ChromaPipeline" if chroma else "FluxPipeline"
    missing = [sub for sub in parts[1:] if not os.path.isdir(os.path.join(root, sub))]
    if missing:
        raise LoraFileError(f"{kind} folder {root} has no {', '.join(missing)} subfolder(s): a diffusers {kind} "
                            f"folder ({pipeline}.save_pretrained) has {', '.join(parts)}.")
    if transformer_file is not None:
        if not os.path.isfile(os.path.join(transformer_dir, "config.json")):
            raise LoraFileError(f"Model {path} is a transformer file but {transformer_dir} has no config.json: "
                                f"model_config must be a diffusers {kind} folder with transformer/config.json.")
        from safetensors.torch import load_file

        config = transformer_class.load_config(transformer_dir)
        transformer = transformer_class.from_config(config)
        state = load_file(transformer_file)
        expected = transformer.state_dict()
        missing_keys = sorted(set(expected) - set(state))
        if missing_keys or set(state) - set(expected):
            raise LoraFileError(f"Model {path}: not a diffusers {transformer_class.__name__} state dict matching "
                                f"{transformer_dir}/config.json (missing e.g. {missing_keys[:3]}, unexpected e.g. "
                                f"{sorted(set(state) - set(expected))[:3]}). Give a diffusers-named transformer "
                                f"file, or a diffusers {kind} folder.")
        transformer.load_state_dict(state)
    else:
        transformer = transformer_class.from_pretrained(transformer_dir, **load)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **load)
    if int(vae.config.latent_channels) * 4 != int(transformer.config.in_channels):
        raise LoraFileError(f"{kind} folder {root}: the VAE has {vae.config.latent_channels} latent channels but the "
                            f"transformer reads {transformer.config.in_channels} (16 x 2x2 packed = 64 on {kind}).")
    if chroma:   # T5 alone, as text_encoder / tokenizer
        text_encoder = T5EncoderModel.from_pretrained(root, subfolder="text_encoder", **load)
        tokenizer = T5TokenizerFast.from_pretrained(root, subfolder="tokenizer", **load)
        text_encoder_2 = tokenizer_2 = None
    else:
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **load)
        text_encoder_2 = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", **load)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **load)
        tokenizer_2 = T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2", **load)
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), encoding="utf-8") as handle:
        scheduler_config = json.load(handle)
    from lora_core.arch.families.flux import FAMILY

    state = transformer.state_dict()
    found = FAMILY.detect_diffusers(list(state), {k: tuple(v.shape) for k, v in state.items()})
    if found is None:
        raise LoraValueError(f"Model {path}: the transformer's layout is not recognised as {kind}.")
    arch, spec = found
    if arch.name not in ("Flux.1-dev", "Flux.1-schnell", "Chroma"):
        raise LoraValueError(f"Model {path} is {arch.title}; the command-line trainer trains Flux.1 dev / schnell "
                             f"and Chroma.")
    for module in (transformer, vae, text_encoder, text_encoder_2):
        if module is None:
            continue
        module.to(device, torch.float32).eval()
        module.requires_grad_(False)
    return DiffusersFlux(transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config,
                         arch, spec)


def flux_objective(scheduler_config: dict, default_sampling: str) -> Objective:
    """Flow matching with the scheduler config's shift (see the module docstring)."""
    if scheduler_config.get("use_dynamic_shifting"):
        resolution = ResolutionShift(2, int(scheduler_config.get("base_image_seq_len", 256)),
                                     float(scheduler_config.get("base_shift", 0.5)),
                                     int(scheduler_config.get("max_image_seq_len", 4096)),
                                     float(scheduler_config.get("max_shift", 1.15)))
        return Objective.flow(math.exp(resolution.mu_hi), 1.0, resolution, default_sampling)
    return Objective.flow(float(scheduler_config.get("shift", 1.0)), 1.0, None, default_sampling)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxDiffusersBackend:
    """The training loop's backend over a FluxTransformer2DModel: `cond` is {"context": T5 states, "pooled_output":
    CLIP pooled}; returns the velocity in latent layout (B, 16, h, w)."""

    def __init__(self, transformer: nn.Module, objective: Objective, guidance: Optional[float],
                 text_encoders=()):
        self.transformer = transformer
        self.objective = objective
        self.prediction_type = objective.prediction
        self.guidance = float(guidance) if guidance is not None else None
        self.text_encoders = list(text_encoders)
        self.device = next(transformer.parameters()).device

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(cond, dict) or "pooled_output" not in cond:
            raise ValueError("Flux training needs the conditioning dict {'context', 'pooled_output'} of "
                             "flux_text_encoder; got " + type(cond).__name__)
        dtype = next(self.transformer.parameters()).dtype
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise LoraValueError(f"Flux latents must have even height and width (2x2 patches), got {h}x{w}: use "
                                 f"image sizes that are multiples of 16.")
        context = cond["context"].to(self.device, dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=self.device, dtype=dtype)
        out = self.transformer(hidden_states=pack(noisy.to(dtype)), encoder_hidden_states=context,
                               pooled_projections=cond["pooled_output"].to(self.device, dtype),
                               timestep=timesteps.to(self.device, dtype), img_ids=image_ids(h, w, self.device, dtype),
                               txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=dtype),
                               guidance=guidance, return_dict=False)[0]
        return unpack(out, h, w)

    def modules(self) -> list[nn.Module]:
        return [self.transformer, *self.text_encoders]

    def checkpoint_modules(self) -> list[nn.Module]:
        t = self.transformer
        return list(getattr(t, "transformer_blocks", [])) + list(getattr(t, "single_transformer_blocks", []))


def flux_text_encoder(tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                      max_t5_tokens: int = T5_MAX_TOKENS) -> Callable:
    """encode(captions) -> {"context": T5 last hidden states (B, L, D), "pooled_output": CLIP pooled (B, P)}."""
    t5_length = int(min(max_t5_tokens, getattr(tokenizer_2, "model_max_length", max_t5_tokens) or max_t5_tokens))
    clip_length = int(min(77, getattr(tokenizer, "model_max_length", 77) or 77))

    def encode(captions: list[str]) -> dict:
        tokens = tokenizer(list(captions), padding="max_length", max_length=clip_length, truncation=True,
                           return_tensors="pt")
        pooled = text_encoder(tokens.input_ids.to(next(text_encoder.parameters()).device)).pooler_output
        tokens_2 = tokenizer_2(list(captions), padding="max_length", max_length=t5_length, truncation=True,
                               return_tensors="pt")
        context = text_encoder_2(tokens_2.input_ids.to(next(text_encoder_2.parameters()).device))[0]
        return {"context": context, "pooled_output": pooled}

    return encode


class ChromaDiffusersBackend(FluxDiffusersBackend):
    """The loop's backend over a ChromaTransformer2DModel: `cond` is {"context": T5 states of one caption length
    (chroma_text_encoder)}; no guidance or pooled input. Captions of different lengths are denoised apart
    (group_by_text_length), so no attention mask is needed."""

    group_by_text_length = True

    def __init__(self, transformer: nn.Module, objective: Objective, text_encoders=()):
        super().__init__(transformer, objective, None, text_encoders)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(cond, dict) or "context" not in cond:
            raise ValueError("Chroma training needs the conditioning dict {'context'} of chroma_text_encoder; got "
                             + type(cond).__name__)
        dtype = next(self.transformer.parameters()).dtype
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise LoraValueError(f"Chroma latents must have even height and width (2x2 patches), got {h}x{w}: use "
                                 f"image sizes that are multiples of 16.")
        context = cond["context"].to(self.device, dtype)
        out = self.transformer(hidden_states=pack(noisy.to(dtype)), encoder_hidden_states=context,
                               timestep=timesteps.to(self.device, dtype), img_ids=image_ids(h, w, self.device, dtype),
                               txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=dtype),
                               return_dict=False)[0]
        return unpack(out, h, w)


def chroma_text_encoder(tokenizer, text_encoder: nn.Module, max_tokens: int = T5_MAX_TOKENS) -> Callable:
    """encode(captions) -> {"context": T5 last hidden states (B, n + 1, D)}: each caption's n tokens (EOS included)
    and the first padding token, T5 run under the tokenizer's mask (the padding token a query, never a key) - the
    tokens diffusers' ChromaPipeline leaves unmasked (see the module docstring). Captions of different lengths
    are encoded one at a time (the loop does: group_by_text_length)."""
    length = int(min(max_tokens, getattr(tokenizer, "model_max_length", max_tokens) or max_tokens))

    def encode(captions: list[str]) -> dict:
        tokens = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")
        counts = tokens.attention_mask.sum(dim=1)
        keep = {min(int(n) + 1, length) for n in counts}
        if len(keep) != 1:
            raise LoraValueError(f"Chroma captions of different token lengths ({sorted(keep)}) cannot share one "
                                 f"batch: encode them one at a time.")
        keep = keep.pop()
        device = next(text_encoder.parameters()).device
        context = text_encoder(tokens.input_ids[:, :keep].to(device),
                               attention_mask=tokens.attention_mask[:, :keep].to(device))[0]
        return {"context": context}

    return encode


def flux_targets(transformer: nn.Module, arch, spec, train_spec, kinds, blocks=None) -> list[Target]:
    """The kohya-named LoRA targets of a diffusers Flux transformer, one per module of the family's canonical
    layout whose training kind is in `kinds` and block in `blocks` (None = all); fused canonical weights get
    Target.parts over diffusers' split modules."""
    family = arch.family
    modules = dict(transformer.named_modules())
    parts_of: dict[str, list] = {}
    for key, (canonical, pieces, param) in family.diffusers_host_pieces(spec, arch).items():
        if param != "weight" or not key.endswith(".weight"):
            continue
        module = modules.get(key[:-len(".weight")])
        if not isinstance(module, nn.Linear):
            continue
        if pieces is None:
            parts_of.setdefault(canonical, []).append((module, 0, 0, module.out_features))
        else:
            parts_of.setdefault(canonical, []).extend((module, int(c), int(hs), int(n)) for c, hs, n in pieces)
    wanted = None if blocks is None else set(blocks)
    targets = []
    for m in family.modules(spec, arch):
        if m.param != "weight" or m.path not in parts_of:
            continue
        kind = train_spec.kind_of_target(m.path, m.kind)
        if kind is None or kind not in kinds or (wanted is not None and m.block not in wanted):
            continue
        name = family.export_name(m) or "lora_unet_" + m.path.replace(".", "_")
        parts = parts_of[m.path]
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == 0 and parts[0][3] == parts[0][0].out_features:
            targets.append(Target(name, parts[0][0], "unet", m.block, kind))
        else:
            rows = max(start + length for _, start, _, length in parts)
            targets.append(Target(name, parts[0][0], "unet", m.block, kind, rows=(0, rows), parts=tuple(parts)))
    return targets
