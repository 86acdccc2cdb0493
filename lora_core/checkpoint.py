"""Model checkpoints as lazy weight sources: one tensor at a time, never the whole file in memory.

`.safetensors` files are opened with safetensors' `safe_open` (memory-mapped: shapes come from the header, a
tensor is read only when asked for); `.ckpt/.pt/.pth/.bin` only through `torch.load(weights_only=True,
mmap=True)`, which refuses pickled code. A `WeightSource` presents the checkpoint in ComfyUI's host naming, so
the architecture layer binds it like a loaded model:

* the denoiser under `model.diffusion_model.` (LDM/SGM single files), `diffusion_model.` (ComfyUI) or bare
  (a diffusion-model-only file), as the file has it;
* text encoders in ComfyUI's CLIP naming `<encoder>.transformer.<HF path>` (clip_l, clip_g, clip_h, t5xxl, ...),
  read from the prefixes single-file checkpoints use for HF-named encoders: SD1's `cond_stage_model.transformer.`
  (CLIP-L), SDXL's `conditioner.embedders.0.transformer.` (CLIP-L), ComfyUI's `text_encoders.<encoder>.` and
  bare `<encoder>.transformer.`; encoders stored in OpenCLIP's own naming (SD2's `cond_stage_model.model.` =
  OpenCLIP-H, SDXL's `conditioner.embedders.1.model.` = OpenCLIP-G) are renamed to HF naming the way ComfyUI's
  checkpoint loader converts them (`comfy.utils.clip_text_transformers_convert`: `resblocks.N` -> `encoder.layers.N`,
  the fused `attn.in_proj_weight` read as its q / k / v thirds, `text_projection` transposed), one tensor at a
  time. Parts of the file that are not presented (VAE, EMA, other keys) are listed in `skipped` with the
  reason, never dropped silently.

`state_dict_source(mapping)` wraps tensors already in memory (ComfyUI MODEL / CLIP state dicts).
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Mapping, Optional

import torch

from .errors import LoraFileError

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")

# single-file checkpoint prefix -> ComfyUI CLIP attribute of an HF-named text encoder stored under it
TE_PREFIXES = (
    ("cond_stage_model.transformer.", "clip_l"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
)
# Encoders in OpenCLIP's naming, renamed to HF naming (`_openclip_names`).
OPENCLIP_PREFIXES = (("cond_stage_model.model.", "clip_h"), ("conditioner.embedders.1.model.", "clip_g"))
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_TOP = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}


def _openclip_names(rest: str, shape) -> list:
    """[(HF path, rows (start, stop) or None, transpose, shape)] of one OpenCLIP text-encoder key (ComfyUI's
    `transformers_convert` rules); [] for keys ComfyUI drops too (logit_scale, attn_mask)."""
    import re

    if rest in _OPENCLIP_TOP:
        return [(_OPENCLIP_TOP[rest], None, False, tuple(shape))]
    if rest == "text_projection":
        return [("text_projection.weight", None, True, tuple(shape)[::-1])]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m and m.group(2) in _OPENCLIP_BLOCK:
        return [(f"text_model.encoder.layers.{m.group(1)}.{_OPENCLIP_BLOCK[m.group(2)]}.{m.group(3)}", None, False,
                 tuple(shape))]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
    if m:
        third = shape[0] // 3
        return [(f"text_model.encoder.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}", (i * third, (i + 1) * third),
                 False, (third, *tuple(shape)[1:])) for i, p in enumerate("qkv")]
    return []
OTHER_PREFIXES = ("first_stage_model.", "vae.", "model_ema.", "conditioner.embedders.")


class WeightSource:
    """Named tensors with shapes known up front and values read one at a time.

    `shapes`: host key (ComfyUI naming, see the module docstring) -> shape; `get(key)` returns that tensor
    (a view of the memory map for safetensors: no copy until the caller converts it); `skipped`: (file
    prefix, why) for parts of the file that are not presented; `metadata`: the file's header strings."""

    def __init__(self, label: str, shapes: Mapping[str, tuple], getter: Callable[[str], torch.Tensor],
                 metadata: Optional[Mapping[str, str]] = None, skipped=(), closer: Optional[Callable] = None,
                 dtypes: Optional[Mapping[str, torch.dtype]] = None):
        self.label = label
        self.shapes = dict(shapes)
        self._get = getter
        self.metadata = dict(metadata or {})
        self.skipped = list(skipped)
        self._closer = closer
        self.dtypes = dict(dtypes or {})

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise LoraFileError(f"{self.label}: has no tensor {key!r}.")
        return self._get(key)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _host_name(key: str, encoders) -> tuple[Optional[str], Optional[str]]:
    """(host key, None) for a key presented as-is or renamed, (None, skipped prefix) for one left out."""
    for prefix, encoder in TE_PREFIXES:
        if key.startswith(prefix):
            return f"{encoder}.transformer.{key[len(prefix):]}", None
    if key.startswith("text_encoders."):
        rest = key[len("text_encoders."):]
        name = rest.split(".", 1)[0]
        if name in encoders and rest.startswith(f"{name}.transformer."):
            return rest, None
        return None, "text_encoders." + name + "."
    for prefix in OTHER_PREFIXES:
        if key.startswith(prefix):
            return None, prefix
    return key, None


_SKIP_REASONS = {
    "openclip": "OpenCLIP text-encoder tensors ComfyUI does not load either (logit_scale, attn_mask)",
    "first_stage_model.": "VAE: a LoRA does not adapt it",
    "vae.": "VAE: a LoRA does not adapt it",
    "model_ema.": "EMA copy of the weights: not read",
}


def _present(label: str, keys, shape_of, getter, metadata, closer, dtype_of=None) -> WeightSource:
    from .arch.text_encoders import ENCODERS

    shapes: dict[str, tuple] = {}
    names: dict[str, str] = {}
    views: dict[str, tuple] = {}
    dtypes: dict = {}
    skipped: dict[str, int] = {}
    for key in keys:
        openclip = next(((p, e) for p, e in OPENCLIP_PREFIXES if key.startswith(p)), None)
        if openclip is not None:
            renamed = _openclip_names(key[len(openclip[0]):], shape_of(key))
            if not renamed:
                skipped["openclip"] = skipped.get("openclip", 0) + 1
            for path, rows, transpose, shape in renamed:
                host = f"{openclip[1]}.transformer.{path}"
                names[host], views[host], shapes[host] = key, (rows, transpose), shape
                if dtype_of is not None:
                    dtypes[host] = dtype_of(key)
            continue
        host, prefix = _host_name(key, ENCODERS)
        if host is None:
            skipped[prefix] = skipped.get(prefix, 0) + 1
            continue
        if host in names:   # two spellings of one tensor: the first wins, the other is listed
            skipped[key] = 1
            continue
        names[host] = key
        shapes[host] = tuple(shape_of(key))
        if dtype_of is not None:
            dtypes[host] = dtype_of(key)
    reasons = [(prefix, f"{count} tensors: " + _SKIP_REASONS.get(prefix, "not a model weight LoRA Core reads"))
               for prefix, count in skipped.items()]
    def get(host):
        tensor = getter(names[host])
        rows, transpose = views.get(host, (None, False))
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]]
        return tensor.T.contiguous() if transpose else tensor

    return WeightSource(label, shapes, get, metadata, reasons, closer, dtypes)


def open_checkpoint(path) -> WeightSource:
    """A lazy WeightSource over a model checkpoint file (see the module docstring). Raises LoraFileError naming
    the file, the cause and the fix."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoraFileError(f"{path}: checkpoint file does not exist. Check the path.")
    if os.path.isdir(path):
        raise LoraFileError(f"{path}: this is a directory, not a checkpoint file. Pick a .safetensors file.")
    if os.path.getsize(path) == 0:
        raise LoraFileError(f"{path}: the file is empty (0 bytes); download or copy it again.")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".safetensors", ".sft"):
        return _open_safetensors(path)
    if extension in CHECKPOINT_EXTENSIONS:
        return _open_pickle(path)
    raise LoraFileError(f"{path}: unknown checkpoint extension {extension or '(none)'!r}; checkpoints end in "
                        f"{', '.join(CHECKPOINT_EXTENSIONS)}.")


def _open_safetensors(path: str) -> WeightSource:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        keys = list(handle.keys())
        metadata = dict(handle.metadata() or {})
        slices = {k: handle.get_slice(k) for k in keys}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        dtypes = {k: s.get_dtype() for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraFileError(f"{path}: could not read the safetensors checkpoint ({error}); the file is damaged or "
                            f"not a safetensors file. Download or copy it again.") from error
    if not keys:
        raise LoraFileError(f"{path}: the checkpoint holds no tensors.")

    def getter(key):
        try:
            return handle.get_tensor(key)
        except Exception as error:   # noqa: BLE001 - a truncated file fails only when the tensor is read
            raise LoraFileError(f"{path}: tensor {key!r} could not be read ({error}); the file is truncated or "
                                f"damaged. Download or copy it again.") from error

    return _present(path, keys, shapes.__getitem__, getter, metadata, lambda: None, dtypes.__getitem__)


def _open_pickle(path: str) -> WeightSource:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:   # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise LoraFileError(f"{path}: refused to load: the file holds pickled Python objects or code, not just "
                            f"tensors ({str(error).splitlines()[0] if str(error) else error}). Use a .safetensors "
                            f"version of this checkpoint.") from error
    except Exception as error:  # noqa: BLE001
        raise LoraFileError(f"{path}: the checkpoint is truncated or corrupt ({type(error).__name__}: {error}). "
                            f"Download or copy it again.") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise LoraFileError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors.")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LoraFileError(f"{path}: the checkpoint holds no tensors.")
    return _present(path, tensors, lambda k: tensors[k].shape, tensors.__getitem__, {}, None,
                    lambda k: tensors[k].dtype)


def state_dict_source(tensors: Mapping[str, torch.Tensor], label: str = "<state dict>",
                      getter: Optional[Callable[[str], torch.Tensor]] = None) -> WeightSource:
    """A WeightSource over tensors already in ComfyUI host naming (a MODEL's `model.state_dict()` and a CLIP's
    `cond_stage_model.state_dict()` merged). `getter` overrides how a value is fetched (e.g. core's backup of a
    patched weight)."""
    from .weights import logical_shape

    shapes = {k: tuple(logical_shape(v)) for k, v in tensors.items() if hasattr(v, "shape")}
    return WeightSource(label, shapes, getter or tensors.__getitem__,
                        dtypes={k: getattr(v, "dtype", None) for k, v in tensors.items()})


def bind_source(source: WeightSource, arch=None):
    """KeyMap of a WeightSource (denoiser and every HF-named text encoder it holds), through the architecture
    layer's ComfyUI bindings. Raises LoraMatchError when it holds no model LoRA Core knows."""
    from .arch import bind_comfy_clip, bind_comfy_model, build_key_map
    from .arch.bindings import COMFY_CLIP_RE
    from .arch.text_encoders import ENCODERS
    from .errors import LoraMatchError

    clip_keys = {k: s for k, s in source.shapes.items()
                 if (m := COMFY_CLIP_RE.match(k)) and m.group(1) in ENCODERS}
    model_keys = {k: s for k, s in source.shapes.items() if k not in clip_keys}
    bindings = []
    model_arch = arch
    if model_keys:
        try:
            binding = bind_comfy_model(model_keys, arch=arch)
        except LoraMatchError:
            if not clip_keys:
                raise LoraMatchError(f"{source.label}: holds no denoiser or text encoder LoRA Core knows (keys such "
                                     f"as {next(iter(model_keys))!r}). Pick a checkpoint of a supported model "
                                     f"family (SD1/SD2/SDXL, Flux.1/Chroma, SD3, Qwen-Image).") from None
            binding = None
        if binding is not None:
            bindings.append(binding)
            model_arch = binding.arch
    if clip_keys:
        bindings.append(bind_comfy_clip(clip_keys, model_arch))
    if not bindings:
        raise LoraMatchError(f"{source.label}: holds no model weights LoRA Core knows.")
    return build_key_map(*bindings)
