"""Extraction node (Mixing family): a LoRA from the difference of two models, saved into models/loras.

Public contract (saved workflows store widget values by position): node id, input names and widget order never
change; new inputs go at the end as optional.

The math is `lora_core.extract` (truncated SVD per weight, kohya names and metadata), the same the `lora-core
extract` command runs on checkpoint files: given the same weights both write the same tensors. The weights are
the models' as the graph hands them: patches already on a MODEL/CLIP (a LoRA loaded before, a model merge) are
part of it, computed for one weight at a time with core's own `calculate_weight`, so "model + LoRA stack" as
`model_tuned` gives that stack as one LoRA. The file is written like every saver of the pack: under the first
`loras` folder, path-safe (lora_core.paths), atomically, never over an existing file unless `overwrite` is on.
"""
from __future__ import annotations

import os

from lora_core.checkpoint import state_dict_source
from lora_core.errors import LoraValueError
from lora_core.extract import extract_lora

from .mix import CATEGORY, FILENAME_TIP, OVERWRITE_TIP, SAVE_DTYPES, _prepare_output

RANK_TIP = "Rank of every linear (and 1x1 conv) layer of the extracted LoRA."
CONV_RANK_TIP = "Rank of k x k convolutions (LoCon); 0 leaves them out; -1 = the same as rank."
THRESHOLD_TIP = "Leave out weights whose largest |change| is at most this (0: every changed weight)."
ERROR_TIP = ("Per weight, the smallest rank whose relative error is at most this (e.g. 0.05); rank / conv_rank cap "
             "it. 0 = off: the rank decides.")


def _weights(patcher, module, prefix: str = ""):
    """{key: tensor} of a model as the graph sees it, computed one weight at a time on request: the unpatched
    weight (core's backup when patches are applied) with the patcher's own patches computed on top."""
    import comfy.lora
    import comfy.utils

    state = module.state_dict()
    patches = getattr(patcher, "patches", {}) if patcher is not None else {}

    def get(key):
        backup = getattr(patcher, "backup", {}).get(key) if patcher is not None else None
        weight = backup.weight if backup is not None else comfy.utils.get_attr(module, key)
        if key in patches:
            return comfy.lora.calculate_weight(patches[key], weight.detach().float().clone(), key)
        return weight.detach()

    return state, get


def _source(model, clip, label: str):
    tensors, getters = {}, {}
    if model is not None:
        state, get = _weights(model, model.model)
        tensors.update(state)
        getters.update({k: get for k in state})
    if clip is not None:
        state, get = _weights(clip.patcher, clip.cond_stage_model)
        tensors.update(state)
        getters.update({k: get for k in state})
    return state_dict_source(tensors, label, getter=lambda key: getters[key](key))


class LoRACoreExtract:
    """Extract a LoRA (LoCon where convolutions differ) from model_tuned - model_base by truncated SVD."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_base": ("MODEL", {"tooltip": "The base model (what the fine-tune started from)."}),
                "model_tuned": ("MODEL", {"tooltip": "The fine-tuned model (or base + LoRAs / merges)."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 4096, "tooltip": RANK_TIP}),
                "filename": ("STRING", {"default": "lora_core_extracted", "tooltip": FILENAME_TIP}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": OVERWRITE_TIP}),
            },
            "optional": {
                "clip_base": ("CLIP", {"tooltip": "Optional: the base CLIP, to extract the text encoders too."}),
                "clip_tuned": ("CLIP", {"tooltip": "Optional: the fine-tuned CLIP (with clip_base)."}),
                "conv_rank": ("INT", {"default": -1, "min": -1, "max": 4096, "tooltip": CONV_RANK_TIP}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                                        "tooltip": THRESHOLD_TIP}),
                "target_error": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.001,
                                           "tooltip": ERROR_TIP}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "auto", "tooltip": "Tensor dtype of the file; auto: "
                                                   "fp16 for fp16 models, else fp32."}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    OUTPUT_TOOLTIPS = ("Absolute path of the written file.",
                       "Per module group: rank and relative error ||D - D_k|| / ||D||; what was not extracted.")
    FUNCTION = "extract"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Writes a kohya LoRA whose change is the best rank-limited approximation (truncated SVD) of "
                   "model_tuned - model_base per weight, text encoders too when both CLIPs are connected. Same "
                   "result as `lora-core extract` on the two checkpoint files.")

    def extract(self, model_base, model_tuned, rank, filename, overwrite, clip_base=None, clip_tuned=None,
                conv_rank=-1, threshold=0.0, target_error=0.0, save_dtype="auto"):
        if (clip_base is None) != (clip_tuned is None):
            raise LoraValueError("connect both clip_base and clip_tuned to extract the text encoders, or neither.")
        path = _prepare_output(filename, overwrite)
        base = _source(model_base, clip_base, "model_base")
        tuned = _source(model_tuned, clip_tuned, "model_tuned")
        import comfy.model_management
        import comfy.utils

        bar = comfy.utils.ProgressBar(1)
        state = {"total": 0}

        def progress(index, total, _name):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if total != state["total"]:
                state["total"] = total
                bar.total = max(total, 1)
            bar.update_absolute(index, max(total, 1))

        title = os.path.splitext(os.path.basename(path))[0]
        result = extract_lora(base, tuned, rank=rank, conv_rank=None if conv_rank < 0 else conv_rank,
                              threshold=threshold, target_error=target_error or None,
                              device=comfy.model_management.get_torch_device(), save_dtype=SAVE_DTYPES[save_dtype],
                              title=title, progress=progress)
        result.save(path, overwrite=overwrite)
        return {"ui": {"text": [path]}, "result": (path, result.text())}


NODE_CLASS_MAPPINGS = {"LoRACoreExtract": LoRACoreExtract}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRACoreExtract": "Extract LoRA from Models (LoRA Core)"}
