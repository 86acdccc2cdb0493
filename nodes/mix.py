"""Mix nodes: merge a LoRA stack into one kohya-format file (exact or SVD), and resize one LoRA by SVD.

Public contract (saved workflows store widget values by position): node ids, input names and widget order
below never change; new inputs go at the end.

Behaviour decided here (the math lives in lora_core.mix):

* Files are written under the first `loras` folder (`folder_paths.get_folder_paths("loras")[0]`), as
  `<filename>.safetensors` (subfolders allowed, never outside that folder), atomically; an existing file is
  only replaced with `overwrite` on.
* Without MODEL/CLIP the merge works on the files alone, on the full-size layout of `arch` (auto = read off
  the files' metadata and keys). With MODEL and/or CLIP connected their key map and shapes are used, and
  adapters whose change depends on the base weights (DoRA, OFT, BOFT, GLoRA, (IA)^3) are exported as exact
  diffs against those weights; without a model such LoRAs are refused with an error that says so. The
  connected MODEL's own patches (e.g. a LoRA loaded before) are not part of the merge: its unpatched
  weights are the base.
* Both stack types are accepted: `block_stack` (LORA_CORE_BLOCK_STACK, rows with block vectors) and a plain
  `lora_stack` (LORA_STACK tuples, factor 1 on every block); block-stack rows come first, as in
  'LoRA Block Stack (LoRA Core)'.
* Baking LoRAs into a checkpoint needs no node of ours: connect a LoRA Core loader's MODEL/CLIP to core's
  Save Checkpoint.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

import folder_paths

from lora_core import blocks, mix, paths
from lora_core.api import LoraRequest
from lora_core.arch import ARCHS, bind_layout, build_key_map, get_arch
from lora_core.errors import LoraFileError, LoraValueError

from ._host import NONE_NAMES, HostModels, load_lora, lora_names
from .block_weight import BLOCK_STACK, BlockSettings, check_row, resolve_with_key_map
from .loader import normalise_stack

CATEGORY = "LoRA Core/Mix"
# new choices go at the end: every layout a family adds after these, in registry order
ARCH_CHOICES = ("auto", "sd1", "sd2", "sdxl", "flux", "chroma")
ARCH_CHOICES += tuple(k for k in dict.fromkeys(a.layout_key for a in ARCHS.values()) if k not in ARCH_CHOICES)
SAVE_DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MODE_TIP = ("exact: lossless; plain LoRAs are concatenated along the rank (file rank = sum of ranks), other "
            "algorithms are stored as full diffs. svd: each layer's merged change reduced to `rank` and/or "
            "`energy`.")
RANK_TIP = "SVD: the most directions kept per layer (0 = no cap, then `energy` decides). Ignored in exact mode."
ENERGY_TIP = ("SVD: keep the fewest directions whose squared singular values reach this share of the layer's "
              "total (e.g. 0.99); 0 = off. With a rank too, the smaller result wins. Ignored in exact mode.")
FILENAME_TIP = "Name of the new file under models/loras (subfolders allowed; .safetensors is added)."
OVERWRITE_TIP = "Replace an existing file of that name. Off: an existing file is never touched."
ARCH_TIP = "Base model of the LoRAs when no MODEL/CLIP is connected; auto reads it from the files."
DTYPE_TIP = "Tensor dtype of the written file; auto keeps the widest dtype of the sources (fp32 is lossless)."
REPORT_TIP = "What was written: mode, stored ranks, kept energy per layer, every source's load report."


def _output_path(filename: str) -> str:
    """The absolute .safetensors path for `filename` inside the first loras folder (lora_core.paths' rules:
    no absolute path, no '..', no NUL, not too long)."""
    return paths.output_path(folder_paths.get_folder_paths("loras")[0], filename, ".safetensors", what="filename")


def _prepare_output(filename: str, overwrite: bool) -> str:
    """Check the target before any work: an existing file without `overwrite` fails fast."""
    path = _output_path(filename)
    if os.path.exists(path) and not overwrite:
        raise LoraFileError(f"{path} already exists and overwrite is off. Pick another filename or turn "
                            f"overwrite on.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class _BaseWeights(Mapping):
    """The connected MODEL/CLIP's unpatched weights by host key (core's backup when a patch is applied)."""

    def __init__(self, model, clip):
        self._sources = []
        if model is not None:
            self._sources.append((model, model.model))
        if clip is not None:
            self._sources.append((clip.patcher, clip.cond_stage_model))
        self._keys = {k: i for i, (_, module) in enumerate(self._sources) for k in module.state_dict()}

    def __getitem__(self, key):
        patcher, module = self._sources[self._keys[key]]
        backup = getattr(patcher, "backup", {}).get(key)
        if backup is not None:
            return backup.weight
        import comfy.utils

        return comfy.utils.get_attr(module, key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class _Context:
    """Key map, shapes and base weights for a merge: from the connected MODEL/CLIP, or none (file level)."""

    def __init__(self, model, clip, arch_choice: str, loras):
        self.loras = loras
        self.kwargs: dict = {}
        explicit = None if arch_choice in (None, "", "auto") else get_arch(arch_choice)
        if model is None and clip is None:
            self.arch = explicit or mix.detect_lora_arch(loras)
            self.key_map = mix.cached_layout_key_map(self.arch.name)
            self.kwargs = {"arch": self.arch}
            return
        host = HostModels(model, clip)
        self.arch = host.key_map.arch or explicit or mix.detect_lora_arch(loras)
        if explicit is not None and explicit is not self.arch:
            raise LoraValueError(f"arch is set to {arch_choice} but the connected model is {self.arch.name}; set "
                                 f"arch to auto (the connected model decides).")
        bindings = list(host.key_map.bindings)
        if model is None or clip is None:
            # The missing half (denoiser or text encoders) is exported on the layout's names from the files alone.
            missing = [c for c in self.arch.components if c.startswith("te") == (clip is None)]
            bindings.append(bind_layout(self.arch, components=missing))
        self.key_map = build_key_map(*bindings)
        self.kwargs = {"key_map": self.key_map, "shapes": host.shapes, "base_weights": _BaseWeights(model, clip)}


def _rows(block_stack, lora_stack) -> list[dict]:
    rows = [dict(check_row(row)) for row in block_stack or ()]
    rows += [{"name": n, "strength_model": sm, "strength_clip": sc} for n, sm, sc in normalise_stack(lora_stack)]
    return [r for r in rows if r["name"] not in NONE_NAMES
            and (float(r.get("strength_model", 1.0)) != 0 or float(r.get("strength_clip", 1.0)) != 0)]


def _requests(rows: list[dict], context: _Context) -> tuple[list[LoraRequest], list[dict]]:
    requests, notes = [], []
    for row, lora in zip(rows, context.loras):
        settings = BlockSettings.from_row(row)
        weights = None
        note = {}
        if settings.weighted:
            weights = resolve_with_key_map(context.key_map, lora, settings)
            note = {"block_mode": settings.mode, "block_vector": settings.vector, "seed": settings.seed,
                    "A": settings.A, "B": settings.B, "inverse": settings.inverse}
        requests.append(LoraRequest(lora, float(row.get("strength_model", 1.0)),
                                    float(row.get("strength_clip", 1.0)), block_weights=weights, name=row["name"]))
        notes.append(note)
    return requests, notes


def _compute_device(mode: str):
    if mode != "svd":
        return None
    import comfy.model_management

    return comfy.model_management.get_torch_device()


class LoRACoreMergeSave:
    """Merge a LoRA stack (strengths and block vectors baked in) into one standard kohya LoRA file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (list(mix.MODES), {"default": "exact", "tooltip": MODE_TIP}),
                "rank": ("INT", {"default": 32, "min": 0, "max": 4096, "tooltip": RANK_TIP}),
                "energy": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": ENERGY_TIP}),
                "filename": ("STRING", {"default": "lora_core_merge", "tooltip": FILENAME_TIP}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": OVERWRITE_TIP}),
                "arch": (list(ARCH_CHOICES), {"default": "auto", "tooltip": ARCH_TIP}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
            },
            "optional": {
                "lora_stack": ("LORA_STACK", {"tooltip": "(lora_name, strength_model, strength_clip) entries."}),
                "block_stack": (BLOCK_STACK, {"tooltip": "Rows with block vectors from 'LoRA Block Stack "
                                                         "(LoRA Core)'; they come before the lora_stack entries."}),
                "model": ("MODEL", {"tooltip": "Optional: the base model (architecture, shapes, and base weights "
                                               "for DoRA/OFT-style LoRAs). Not modified."}),
                "clip": ("CLIP", {"tooltip": "Optional: the base CLIP, like model."}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    OUTPUT_TOOLTIPS = ("Absolute path of the written file.", REPORT_TIP)
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Writes one LoRA equal to the whole stack: exact (ranks concatenated, lossless) or SVD "
                   "(per-layer rank / kept energy). Loads in any LoRA loader; metadata records the sources, "
                   "strengths and block vectors.")

    def merge(self, mode, rank, energy, filename, overwrite, arch, save_dtype, lora_stack=None, block_stack=None,
              model=None, clip=None):
        path = _prepare_output(filename, overwrite)
        rows = _rows(block_stack, lora_stack)
        if not rows:
            raise LoraValueError("nothing to merge: connect a lora_stack or block_stack with at least one LoRA "
                                 "whose strengths are not both 0.")
        loras = [load_lora(row["name"]) for row in rows]
        context = _Context(model, clip, arch, loras)
        requests, notes = _requests(rows, context)
        title = os.path.splitext(os.path.basename(path))[0]
        result = mix.merge_loras(requests, mode=mode, rank=rank, energy=energy, save_dtype=SAVE_DTYPES[save_dtype],
                                 title=title, device=_compute_device(mode), source_notes=notes, **context.kwargs)
        mix.save_mix(result, path, overwrite=overwrite)
        text = result.text()
        return {"ui": {"text": [path]}, "result": (path, text)}


class LoRACoreResize:
    """SVD rank reduction of one LoRA (any format in, kohya out)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_names(), {"tooltip": "A file in models/loras (subfolders included)."}),
                "rank": ("INT", {"default": 16, "min": 0, "max": 4096, "tooltip": RANK_TIP}),
                "energy": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": ENERGY_TIP}),
                "filename": ("STRING", {"default": "lora_core_resized", "tooltip": FILENAME_TIP}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": OVERWRITE_TIP}),
                "arch": (list(ARCH_CHOICES), {"default": "auto", "tooltip": ARCH_TIP}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Optional base model (needed only for DoRA/OFT-style LoRAs)."}),
                "clip": ("CLIP", {"tooltip": "Optional base CLIP, like model."}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "report")
    OUTPUT_TOOLTIPS = ("Absolute path of the written file.", "Per layer: kept rank / full rank and kept energy.")
    FUNCTION = "resize"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Reduces a LoRA's rank per layer by SVD to `rank` and/or a kept-energy share; the report "
                   "lists how much of each layer's change was kept.")

    def resize(self, lora_name, rank, energy, filename, overwrite, arch, save_dtype, model=None, clip=None):
        path = _prepare_output(filename, overwrite)
        lora = load_lora(lora_name)
        context = _Context(model, clip, arch, [lora])
        title = os.path.splitext(os.path.basename(path))[0]
        request = LoraRequest(lora, 1.0, 1.0, name=lora_name)
        result = mix.merge_loras([request], mode="svd", rank=rank, energy=energy,
                                 save_dtype=SAVE_DTYPES[save_dtype], title=title, device=_compute_device("svd"),
                                 **context.kwargs)
        mix.save_mix(result, path, overwrite=overwrite)
        return {"ui": {"text": [path]}, "result": (path, result.text())}


NODE_CLASS_MAPPINGS = {
    "LoRACoreMergeSave": LoRACoreMergeSave,
    "LoRACoreResize": LoRACoreResize,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreMergeSave": "Merge LoRAs and Save (LoRA Core)",
    "LoRACoreResize": "Resize LoRA (LoRA Core)",
}
