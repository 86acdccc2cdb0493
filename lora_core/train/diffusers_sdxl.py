"""SDXL on diffusers' classes for `python -m lora_core.train`: the two text encoders' conditioning and the UNet
call with SDXL's size conditioning.

* Text (as diffusers' StableDiffusionXLPipeline.encode_prompt and kohya's sdxl_train_util compute it): each
  caption goes through both tokenizers; the context is the penultimate hidden states of CLIPTextModel (te1,
  CLIP-L) and CLIPTextModelWithProjection (te2, OpenCLIP-G) concatenated on the channel axis (768 + 1280 = 2048 on
  the real model), the pooled output is te2's projected `text_embeds`. The conditioning is the dict
  {"context", "pooled_output"} the training loop batches and shards like any other.
* UNet: `unet(noisy, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids":
  ids})` with ids = (original_h, original_w, crop_top, crop_left, target_h, target_w) in pixels. The ids are the
  ones the in-graph trainer gives ComfyUI's SDXL (nodes/train.py: `encode_adm` with original = target = the
  batch's pixel size, crop 0): images are fitted to their bucket before caching, so the bucket size is the size
  the model sees, and a file trained here and one trained in the node see the same size conditioning.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .backends import DiffusersBackend


def add_time_ids(height: int, width: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning for images of (height, width) pixels, uncropped: (B, 6)."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
    return ids.expand(batch, 6)


class SDXLDiffusersBackend(DiffusersBackend):
    """DiffusersBackend for an SDXL UNet (addition_embed_type "text_time"): `cond` is {"context",
    "pooled_output"}; the time ids come from the latent size x the VAE's scale factor."""

    def __init__(self, unet: nn.Module, alphas_cumprod=None, prediction_type: str = "epsilon",
                 text_encoders: Sequence[nn.Module] = (), vae_scale: int = 8):
        super().__init__(unet, alphas_cumprod, prediction_type, text_encoders)
        self.vae_scale = int(vae_scale)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        if not isinstance(cond, dict) or "pooled_output" not in cond:
            raise ValueError("SDXL training needs the conditioning dict {'context', 'pooled_output'} of "
                             "sdxl_text_encoder; got " + type(cond).__name__)
        pooled = cond["pooled_output"].to(dtype)
        height, width = noisy.shape[-2] * self.vae_scale, noisy.shape[-1] * self.vae_scale
        extra = {"text_embeds": pooled, "time_ids": add_time_ids(height, width, noisy.shape[0], noisy.device, dtype)}
        out = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond["context"].to(dtype),
                        added_cond_kwargs=extra)
        return out.sample if hasattr(out, "sample") else out[0]


def sdxl_text_encoder(tokenizers: Sequence, text_encoders: Sequence[nn.Module], max_length: int = 77) -> Callable:
    """encode(captions) -> {"context": (B, 77, D1 + D2), "pooled_output": (B, P)} on the encoders' device."""
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError("SDXL has two tokenizers and two text encoders")

    def encode(captions: list[str]) -> dict:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
            device = next(encoder.parameters()).device
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]            # te2 (CLIPTextModelWithProjection): text_embeds
        return {"context": torch.cat(hidden, dim=-1), "pooled_output": pooled}

    return encode
