"""Independent writers of HiDream-I1 LoRA files, for tests (import: `from tests import hidream_writers as hw`).

Real writers where installable: PEFT on diffusers' own `HiDreamImageTransformer2DModel` (what
`HiDreamImagePipeline.save_lora_weights` and SimpleTuner write), LyCORIS's own wrapper. The others follow their
naming; every rule cites its source (snapshots listed in /work/shared/reference/dit-families.md §8):

* ComfyUI native (comfy/lora.py model_lora_keys_unet's generic map): `diffusion_model.<path>` with lora_up /
  lora_down or lora_A / lora_B (+ alpha); its kohya-style generic `lora_unet_<path _>` (no kohya or musubi
  HiDream-I1 trainer exists; musubi's HiDream-O1 is another model).
* ai-toolkit (`extensions_built_in/diffusion_models/hidream/hidream_model.py`: block list
  `['double_stream_blocks', 'single_stream_blocks']`, `transformer.` -> `diffusion_model.` at save, PEFT lora_A /
  lora_B, no alpha); diffusion-pipe (`models/hidream.py`: PEFT + `diffusion_model.`). Metadata: ai-toolkit's
  `ss_base_model_version` `hidream_i1`.
* diffusers / SimpleTuner (HiDreamImageLoraLoaderMixin, ComfyUI #8318): `transformer.<path>.lora_A.weight`.
* OneTrainer (diffusers `_convert_non_diffusers_hidream_lora_to_diffusers` notes; OneTrainer issue #842):
  `transformer.<path>.lora_down.weight` / `lora_up` + `.alpha`.
* LyCORIS / SimpleTuner LyCORIS (comfy/lora.py HiDream branch, "SimpleTuner lycoris format"): `lycoris_<path _>`.
* bare `<path>` and raw PEFT `base_model.model.<path>` (no trainer we know; core maps neither).
* text encoders: kohya-style `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5) as ComfyUI maps them
  (SD3's numbering); Llama only under ComfyUI's generic `text_encoders.llama.transformer.<path>`.
"""
from __future__ import annotations

from tests import dit_writers as dw
from tests import flux2_writers as f2

AI_TOOLKIT_METADATA = {"ss_base_model_version": "hidream_i1"}


def net(model):
    return model.model.diffusion_model if hasattr(model, "model") else model


def block_linears(model) -> dict:
    return dw.linear_layers(net(model), include=("double_stream_blocks.", "single_stream_blocks."))


def comfy_native(model, seed: int = 0, **kw) -> dict:
    return dw.comfy_native(model, seed=seed, **kw)


def kohya_generic(model, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: "lora_unet_" + p.replace(".", "_"), rank, alpha, seed)


def ai_toolkit(model, rank: int = 4, seed: int = 0) -> dict:
    return dw.lora_pairs(block_linears(model), lambda p: "diffusion_model." + p, rank, None, seed,
                         ".lora_B.weight", ".lora_A.weight", "")


def onetrainer(model, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    return dw.lora_pairs(dw.linear_layers(net(model)), lambda p: "transformer." + p, rank, alpha, seed)


def diffusers_peft(transformer, seed: int = 0, rank: int = 4, alpha: float = 8) -> dict:
    """Real PEFT on diffusers' HiDreamImageTransformer2DModel, every Linear (the MoE gate is a bare weight)."""
    state = f2._peft(transformer, list(dw.linear_layers(transformer)), rank, alpha, seed)
    return {"transformer." + k: v for k, v in state.items()}


def text_encoders(clip, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    state = dw.kohya_text_encoders(clip, {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"},
                                   rank, alpha, seed)
    llama = dw.linear_layers(clip.cond_stage_model.llama.transformer, include=("model.layers.",))
    state.update(dw.lora_pairs(llama, lambda p: "text_encoders.llama.transformer." + p, rank, alpha, seed + 99))
    return state
