"""Backends for the training loop that need no ComfyUI: a diffusers UNet2DConditionModel and a
transformers CLIP text encoder. (ComfyUI's model is adapted in nodes/train.py.)"""
from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .loop import sd_alphas_cumprod


class DiffusersBackend:
    """`denoise` = `unet(noisy, t, encoder_hidden_states=cond).sample`; `cond` is a tensor or a dict with
    "context" (+ "added_cond_kwargs" for SDXL)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Optional[torch.Tensor] = None,
                 prediction_type: str = "epsilon", text_encoders: Sequence[nn.Module] = ()):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()
        self.prediction_type = prediction_type
        self.text_encoders = list(text_encoders)
        self.device = next(unet.parameters()).device

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        extra = {}
        if isinstance(cond, dict):
            extra = cond.get("added_cond_kwargs") or {}
            cond = cond["context"]
        out = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype),
                        added_cond_kwargs=extra or None)
        return out.sample if hasattr(out, "sample") else out[0]

    def modules(self) -> list[nn.Module]:
        return [self.unet, *self.text_encoders]

    def checkpoint_modules(self) -> list[nn.Module]:
        unet = self.unet
        blocks = list(getattr(unet, "down_blocks", [])) + list(getattr(unet, "up_blocks", []))
        if getattr(unet, "mid_block", None) is not None:
            blocks.append(unet.mid_block)
        return blocks


def transformers_text_encoder(tokenizer, text_encoder: nn.Module, max_length: int = 77) -> Callable:
    """encode(captions) -> last hidden states (B, 77, D), on the encoder's device."""

    def encode(captions: list[str]) -> torch.Tensor:
        tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
        device = next(text_encoder.parameters()).device
        return text_encoder(tokens.input_ids.to(device))[0]

    return encode


def diffusers_ldm_namer(unet: nn.Module) -> Optional[Callable[[str], Optional[str]]]:
    """Module path (diffusers naming) -> LDM path, so a diffusers-trained file uses the same
    `lora_unet_input_blocks_...` names (and block ids) as one trained in ComfyUI. None if the layout
    is not recognised (then diffusers names are kept; ComfyUI reads those too)."""
    from lora_core.arch import diffusers_to_ldm, spec_from_diffusers_keys

    state = unet.state_dict()
    spec = spec_from_diffusers_keys(list(state), {k: tuple(v.shape) for k, v in state.items()})
    if spec is None:
        return None
    table = diffusers_to_ldm(spec)
    return table.get


def unlock_inference_params(module: nn.Module) -> int:
    """Replace parameters created under torch.inference_mode (ComfyUI loads models inside it) with
    ordinary tensors, one at a time: autograd cannot save inference tensors for backward. Values are
    unchanged; returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    replaced += 1
    return replaced


def read_json(path: str) -> dict:
    """A JSON object file (a diffusers config / model_index.json), or {} when it is missing or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
