"""Reading, validating, caching and saving LoRA files; the metadata summary users see.

Safety first: `.safetensors` files are opened with safetensors (memory-mapped, no code), `.pt/.ckpt/.bin/.pth`
files only through `torch.load(weights_only=True)`, which refuses to run pickled code. Every failure is a
`LoraFileError` that names the file, says what is wrong and how to fix it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch

from .errors import LoraFileError, LoraValueError
from .types import LoraFile

log = logging.getLogger("lora_core")

PathLike = Union[str, "os.PathLike[str]"]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".pt", ".ckpt", ".bin", ".pth")
LORA_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS

# Key fragments that only adapter files carry (kohya, diffusers/PEFT, LyCORIS, ComfyUI). A file with none of
# them is not a LoRA. Kept here (not imported from formats.py) because io sits below formats in the layering.
_ADAPTER_MARKERS = ("lora", "hada_", "lokr_", "oft_blocks", "oft_diag", "lycoris_")
_ADAPTER_SUFFIXES = (
    ".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight", ".on_input",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".rescale", ".lambda_layer", ".reshape_weight",
)
# Prefixes of full-checkpoint state dicts (LDM/SGM single files and their parts).
_CHECKPOINT_PREFIXES = (
    "model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.",
    "diffusion_model.", "model_ema.", "text_encoders.", "vae.",
)


# --------------------------------------------------------------------------------------------- reading


def read_lora_file(path: PathLike) -> LoraFile:
    """Read and validate a LoRA file. Raises LoraFileError naming the path, the cause and the fix."""
    path_str = os.fspath(path)
    _check_is_readable_file(path_str)
    extension = os.path.splitext(path_str)[1].lower()
    if extension in SAFETENSORS_EXTENSIONS:
        tensors, metadata = _read_safetensors(path_str)
    elif extension in PICKLE_EXTENSIONS:
        tensors, metadata = _read_pickle(path_str)
    else:
        raise LoraFileError(
            f"{path_str}: unknown LoRA file extension {extension or '(none)'!r}. LoRA files end in "
            f"{', '.join(LORA_EXTENSIONS)}; rename the file if it is one, or pick a LoRA file.")
    _validate_tensors(path_str, tensors)
    return LoraFile(path=path_str, tensors=tensors, metadata=metadata)


_META_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.float16),
                "F8_E5M2": getattr(torch, "float8_e5m2", torch.float16)}


HEADER_SMALL_TENSOR = 64   # elements: scalars and flags (alpha, on_input) are read with the header


def read_lora_header(path: PathLike) -> Optional[LoraFile]:
    """The LoRA file's keys, shapes, dtypes and metadata without its data: a LoraFile whose tensors are on the
    meta device (shape arithmetic works, values do not exist) except tiny ones such as alphas. Lets a caller refuse a file that cannot fit a
    model before reading gigabytes of it. None for pickle files (their layout is only known once loaded)."""
    path_str = os.fspath(path)
    _check_is_readable_file(path_str)
    if os.path.splitext(path_str)[1].lower() not in SAFETENSORS_EXTENSIONS:
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path_str, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                shape = piece.get_shape()
                if math.prod(shape) <= HEADER_SMALL_TENSOR:   # alphas, flags: their values are read
                    tensors[key] = handle.get_tensor(key)
                    continue
                dtype = _META_DTYPES.get(piece.get_dtype(), torch.float32)
                tensors[key] = torch.empty(shape, dtype=dtype, device="meta")
    except SafetensorError as error:
        raise LoraFileError(_explain_safetensors_error(path_str, error)) from error
    except (OSError, ValueError, RuntimeError) as error:
        raise LoraFileError(f"{path_str}: could not read the safetensors header ({error}). The file is damaged; "
                            f"download or copy it again.") from error
    if not tensors:
        raise LoraFileError(f"{path_str}: the file holds no tensors, so there is nothing to apply. "
                            f"The file is empty or was saved wrongly; pick another LoRA file.")
    _refuse_checkpoint(path_str, tensors.keys())
    return LoraFile(path=path_str, tensors=tensors, metadata=metadata)


def _check_is_readable_file(path: str) -> None:
    if not os.path.exists(path):
        raise LoraFileError(f"{path}: LoRA file does not exist. Check the path, or put the file in models/loras.")
    if os.path.isdir(path):
        raise LoraFileError(f"{path}: this is a directory, not a LoRA file. Pick a .safetensors file inside it.")
    if os.path.getsize(path) == 0:
        raise LoraFileError(f"{path}: the file is empty (0 bytes), probably a failed download or copy. "
                            f"Download or copy it again.")


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open memory-maps the file; get_tensor builds each tensor from the mapped bytes.
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise LoraFileError(_explain_safetensors_error(path, error)) from error
    except (OSError, ValueError, RuntimeError) as error:
        raise LoraFileError(f"{path}: could not read the safetensors file ({error}). The file is damaged; "
                            f"download or copy it again.") from error
    return tensors, metadata


def _explain_safetensors_error(path: str, error: Exception) -> str:
    text = str(error)
    size = os.path.getsize(path)
    if "incomplete" in text.lower() or "not fully covered" in text.lower() or "too small" in text.lower() \
            or "out of bounds" in text.lower():
        cause = f"the file is truncated or incomplete ({size} bytes; {text})"
    elif "header" in text.lower() or "deserializ" in text.lower() or "utf" in text.lower():
        cause = f"the safetensors header is corrupt, so this is not a valid .safetensors file ({text})"
    else:
        cause = f"safetensors could not read it ({text})"
    return f"{path}: {cause}. Download or copy the file again (an interrupted download is the usual cause)."


def _read_pickle(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps every failure in "Weights only load failed"; a refused GLOBAL/REDUCE means the file
        # asked to import or call Python code, anything else is damage.
        detail = _weights_only_detail(str(error))
        if any(word in detail.lower() for word in ("global", "reduce", "unsupported class", "build")):
            raise LoraFileError(
                f"{path}: refused to load: the file contains pickled code or Python objects, not just tensors, "
                f"and running it could harm this computer. Get a .safetensors version of this LoRA, or "
                f"convert it on a machine you trust. Detail: {detail}") from error
        raise LoraFileError(f"{path}: the file is corrupt or not a PyTorch file ({detail}). Download it again "
                            f"or pick another file.") from error
    except Exception as error:  # noqa: BLE001 - torch's unpickler raises anything on garbage bytes
        raise LoraFileError(f"{path}: the file is truncated or corrupt and torch could not read it "
                            f"({type(error).__name__}: {error}). Download or copy it again.") from error
    return _unwrap_state_dict(path, loaded)


def _weights_only_detail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "Trying to", "Can only", "Unsupported global")):
            return line
    for index, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[index + 1] if index + 1 < len(lines) else line)
    return lines[-1] if lines else text


def _unwrap_state_dict(path: str, loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Accept a flat {key: tensor} dict or a training checkpoint holding one under `state_dict`."""
    if not isinstance(loaded, Mapping):
        raise LoraFileError(f"{path}: the file holds a {type(loaded).__name__}, not a dict of tensors, so it "
                            f"is not a LoRA. Pick a LoRA file.")
    metadata: dict[str, str] = {}
    if isinstance(loaded.get("state_dict"), Mapping):
        # Siblings such as epoch / global_step are training bookkeeping: keep simple ones as metadata.
        for key, value in loaded.items():
            if key != "state_dict" and isinstance(value, (str, int, float, bool)):
                metadata[str(key)] = str(value)
        loaded = loaded["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise LoraFileError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor, so this is not a LoRA "
                f"state dict (it may be an embedding or a training state). Pick a LoRA file.")
        tensors[str(key)] = value
    return tensors, metadata


def _validate_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise LoraFileError(f"{path}: the file holds no tensors, so there is nothing to apply. "
                            f"The file is empty or was saved wrongly; pick another LoRA file.")
    _refuse_checkpoint(path, tensors.keys())
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not _all_finite(tensor):
            raise LoraFileError(
                f"{path}: tensor {key!r} contains NaN or infinite values (first bad key), so the LoRA would "
                f"destroy the image. The training diverged or the file is damaged; use another epoch or file.")


def _all_finite(tensor: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(tensor).all())
    except (RuntimeError, TypeError):  # dtypes without isfinite kernels (e.g. float8)
        return bool(torch.isfinite(tensor.to(torch.float32)).all())


def looks_like_checkpoint(keys) -> bool:
    """True for full model checkpoints: no adapter key at all, and checkpoint prefixes or plain weights."""
    keys = list(keys)
    if not keys or any(_is_adapter_key(key) for key in keys):
        return False
    if any(key.startswith(_CHECKPOINT_PREFIXES) for key in keys):
        return True
    plain = sum(key.endswith((".weight", ".bias", "running_mean", "running_var")) for key in keys)
    return plain == len(keys)


def _is_adapter_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _ADAPTER_MARKERS) or lowered.endswith(_ADAPTER_SUFFIXES)


def _refuse_checkpoint(path: str, keys) -> None:
    if looks_like_checkpoint(keys):
        example = next(iter(keys))
        raise LoraFileError(
            f"{path}: this looks like a full checkpoint (model weights such as {example!r}), not a LoRA; it has "
            f"no LoRA keys (lora_up/lora_down, lora_A/lora_B, hada_, lokr_, ...). Load it with a checkpoint "
            f"loader (Load Checkpoint / Load Diffusion Model), not a LoRA loader.")


# --------------------------------------------------------------------------------------------- saving


def save_lora_file(path: PathLike, tensors: Mapping[str, torch.Tensor],
                   metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> str:
    """Atomically write a .safetensors LoRA file; returns its absolute path.

    The data goes to a temporary file in the same folder, is fsync'ed and then renamed over the target, so
    the target is either the old file or the complete new one. Without `overwrite` an existing file is never
    replaced. Metadata values are stored as strings: numbers/bools are converted with str(), dicts/lists with
    JSON; anything else is refused.
    """
    path_str = os.path.abspath(os.fspath(path))
    if os.path.splitext(path_str)[1].lower() != ".safetensors":
        raise LoraFileError(f"{path_str}: LoRA files are saved as .safetensors only (safe to share, fast to "
                            f"load). Use a file name ending in .safetensors.")
    folder = os.path.dirname(path_str)
    if not os.path.isdir(folder):
        raise LoraFileError(f"{path_str}: the folder {folder} does not exist. Create it or pick another folder.")
    if os.path.isdir(path_str):
        raise LoraFileError(f"{path_str}: a directory with this name exists. Pick another file name.")
    if os.path.exists(path_str) and not overwrite:
        raise LoraFileError(f"{path_str}: file already exists and overwrite is off. Pick another name or allow "
                            f"overwriting.")
    prepared = _prepare_tensors(path_str, tensors)
    string_metadata = _stringify_metadata(path_str, metadata)
    _write_atomically(path_str, prepared, string_metadata, overwrite)
    return path_str


def _prepare_tensors(path: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not tensors:
        raise LoraValueError(f"{path}: nothing to save: the tensor dict is empty.")
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise LoraValueError(f"{path}: tensor key {key!r} is a {type(key).__name__}; keys must be strings.")
        if not isinstance(value, torch.Tensor):
            raise LoraValueError(f"{path}: value of {key!r} is a {type(value).__name__}, not a torch.Tensor. "
                                 f"Only tensors can be saved in a LoRA file.")
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one buffer): give each its own copy.
        storage = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if tensor.numel() and storage in seen_storage:
            tensor = tensor.clone()
        elif tensor.numel():
            seen_storage.add(storage)
        prepared[key] = tensor
    return prepared


def _stringify_metadata(path: str, metadata: Optional[Mapping[str, Any]]) -> Optional[dict[str, str]]:
    if not metadata:
        return None
    result: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise LoraValueError(f"{path}: metadata key {key!r} is not a string.")
        if isinstance(value, str):
            result[key] = value
        elif value is None or isinstance(value, (bool, int, float)):
            result[key] = str(value)  # kohya's convention: None -> "None", True -> "True"
        elif isinstance(value, (dict, list, tuple)):
            try:
                result[key] = json.dumps(value)
            except (TypeError, ValueError) as error:
                raise LoraValueError(f"{path}: metadata {key!r} cannot be stored as JSON ({error}). "
                                     f"Pass a string.") from error
        else:
            raise LoraValueError(f"{path}: metadata {key!r} is a {type(value).__name__}; metadata values must be "
                                 f"strings (or numbers, bools, lists, dicts that convert to one).")
    return result


def _write_atomically(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]],
                      overwrite: bool) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(path)
    handle, temp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, temp_path, metadata=metadata)
        with open(temp_path, "rb+") as written:
            os.fsync(written.fileno())
        if overwrite:
            os.replace(temp_path, path)
        else:
            _link_without_clobbering(temp_path, path)
        _fsync_folder(folder)
    except LoraFileError:
        raise
    except Exception as error:
        raise LoraFileError(f"{path}: saving failed ({type(error).__name__}: {error}); nothing was written. "
                            f"Check free disk space and folder permissions.") from error
    finally:
        if os.path.exists(temp_path):
            os.unlink(temp_path)


def _link_without_clobbering(temp_path: str, path: str) -> None:
    """Put the file in place only if no file appeared meanwhile (os.link fails on an existing target)."""
    try:
        os.link(temp_path, path)
    except FileExistsError as error:
        raise LoraFileError(f"{path}: file already exists and overwrite is off. Pick another name or allow "
                            f"overwriting.") from error
    except OSError:
        # File systems without hard links (some network/FAT mounts): check, then rename.
        if os.path.exists(path):
            raise LoraFileError(f"{path}: file already exists and overwrite is off. Pick another name or allow "
                                f"overwriting.")
        os.replace(temp_path, path)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable; not possible on every OS, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- cache


def lora_file_bytes(lora: LoraFile) -> int:
    return sum(t.numel() * t.element_size() for t in lora.tensors.values())


class LoraFileCache:
    """A thread-safe LRU of read LoRA files, bounded by total tensor bytes.

    Entries are keyed by (realpath, size, mtime_ns), so a file changed on disk is read again and its old
    entry dropped. A file larger than the whole budget is returned but not kept. Callers share the cached
    LoraFile: they must not modify its tensors in place.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise LoraValueError(f"LoraFileCache: max_bytes must be >= 0, got {max_bytes}.")
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple, tuple[LoraFile, int]]" = OrderedDict()
        self._key_by_path: dict[str, tuple] = {}
        self._lock = threading.RLock()
        self.total_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, path: PathLike) -> LoraFile:
        path_str = os.fspath(path)
        key = self._key(path_str)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        lora = read_lora_file(path_str)  # outside the lock: other files stay servable meanwhile
        self._insert(key, lora)
        return lora

    def _key(self, path: str) -> tuple:
        _check_is_readable_file(path)
        stat = os.stat(path)
        return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)

    def _insert(self, key: tuple, lora: LoraFile) -> None:
        size = lora_file_bytes(lora)
        with self._lock:
            stale = self._key_by_path.get(key[0])
            if stale is not None and stale != key:
                self._drop(stale)
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = (lora, size)
            self._key_by_path[key[0]] = key
            self.total_bytes += size
            while self.total_bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.total_bytes -= entry[1]
            if self._key_by_path.get(key[0]) == key:
                del self._key_by_path[key[0]]

    def __contains__(self, path: PathLike) -> bool:
        try:
            key = self._key(os.fspath(path))
        except LoraFileError:
            return False
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key_by_path.clear()
            self.total_bytes = 0


def _cache_budget_bytes() -> int:
    raw = os.environ.get("LORA_CORE_CACHE_MB", "2048")
    try:
        megabytes = float(raw)
        if megabytes < 0 or not math.isfinite(megabytes):
            raise ValueError
    except ValueError:
        log.warning("LoRA Core: LORA_CORE_CACHE_MB=%r is not a number of megabytes >= 0; using 2048.", raw)
        megabytes = 2048.0
    return int(megabytes * 1024 * 1024)


default_cache = LoraFileCache(_cache_budget_bytes())


# --------------------------------------------------------------------------------------------- metadata

TOP_TAGS = 5


def lora_metadata_summary(lora_file: LoraFile) -> dict:
    """What users want to know about a LoRA, from its header (`ss_*`, `modelspec.*`) and its keys.

    Always present: `base_model` (e.g. "SDXL", "" when unknown), `base_model_source` ("metadata", "keys" or
    ""), `trigger_words` (list). Other keys appear only when the file says something: `architecture`,
    `base_model_version`, `title`, `output_name`, `description`, `author`, `rank`, `alpha`, `network_module`,
    `algorithm`, `network_args`, `top_tags` ([tag, count] pairs), `class_tokens`, `sd_model_name`, `resolution`,
    `steps`, `epochs`, `num_train_images`, `learning_rate`, `unet_lr`, `text_encoder_lr`, `optimizer`,
    `lr_scheduler`, `clip_skip`, `mixed_precision`, `seed`, `noise_offset`, `min_snr_gamma`,
    `prediction_type`, `trained_at`, `training_comment`, `hash`, `tags`, `usage_hint`, `license`.
    """
    # Kept on the LoraFile while its tensors and metadata are the same objects (like formats.parse_modules): a
    # strength change re-plans the file, and recognising its base model from its keys costs ~20 ms on SD1.5.
    import copy

    fingerprint = (tuple((key, id(t)) for key, t in lora_file.tensors.items()),
                   tuple((lora_file.metadata or {}).items()))
    cached = lora_file.__dict__.get("_metadata_summary")
    if cached is not None and cached[0] == fingerprint:
        return copy.deepcopy(cached[1])
    summary = _metadata_summary(lora_file)
    lora_file.__dict__["_metadata_summary"] = (fingerprint, summary)
    return copy.deepcopy(summary)


def _metadata_summary(lora_file: LoraFile) -> dict:
    meta = lora_file.metadata or {}
    summary: dict = {}
    from .arch.registry import base_model_name   # the families know the names (lora_core/arch)

    base, source = base_model_name(lora_file)
    summary["base_model"] = base
    summary["base_model_source"] = source
    _copy_present(summary, meta, {
        "architecture": "modelspec.architecture", "base_model_version": "ss_base_model_version",
        "output_name": "ss_output_name", "description": "modelspec.description", "author": "modelspec.author",
        "network_module": "ss_network_module", "sd_model_name": "ss_sd_model_name",
        "optimizer": "ss_optimizer", "lr_scheduler": "ss_lr_scheduler", "mixed_precision": "ss_mixed_precision",
        "prediction_type": "modelspec.prediction_type", "training_comment": "ss_training_comment",
        "tags": "modelspec.tags", "usage_hint": "modelspec.usage_hint", "license": "modelspec.license",
    })
    title = _present(meta.get("modelspec.title")) or _present(meta.get("ss_output_name"))
    if title:
        summary["title"] = title
    resolution = _present(meta.get("ss_resolution")) or _present(meta.get("modelspec.resolution"))
    if resolution:
        summary["resolution"] = resolution
    for out_key, meta_key in (("rank", "ss_network_dim"), ("steps", "ss_steps"), ("epochs", "ss_epoch"),
                              ("num_train_images", "ss_num_train_images"), ("clip_skip", "ss_clip_skip"),
                              ("seed", "ss_seed")):
        value = _number(meta.get(meta_key), integer=True)
        if value is not None:
            summary[out_key] = value
    for out_key, meta_key in (("alpha", "ss_network_alpha"), ("learning_rate", "ss_learning_rate"),
                              ("unet_lr", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr"),
                              ("noise_offset", "ss_noise_offset"), ("min_snr_gamma", "ss_min_snr_gamma")):
        value = _number(meta.get(meta_key))
        if value is not None:
            summary[out_key] = value
    if summary.get("rank") is None and _present(meta.get("ss_network_dim")):
        summary["rank"] = meta["ss_network_dim"]  # e.g. "Dynamic" after resize_lora
    network_args = _json(meta.get("ss_network_args"))
    if isinstance(network_args, dict) and network_args:
        summary["network_args"] = network_args
    algorithm = _algorithm(meta, network_args)
    if algorithm:
        summary["algorithm"] = algorithm
    trained_at = _timestamp(meta.get("ss_training_finished_at")) or _present(meta.get("modelspec.date"))
    if trained_at:
        summary["trained_at"] = trained_at
    file_hash = _present(meta.get("sshs_model_hash")) or _present(meta.get("modelspec.hash_sha256"))
    if file_hash:
        summary["hash"] = file_hash
    top_tags = _top_tags(meta)
    if top_tags:
        summary["top_tags"] = top_tags
    class_tokens = _class_tokens(meta)
    if class_tokens:
        summary["class_tokens"] = class_tokens
    summary["trigger_words"] = _trigger_words(meta, class_tokens, top_tags)
    return summary


def _present(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = str(value).strip()
    return value if value and value not in ("None", "null") else None


def _copy_present(summary: dict, meta: Mapping[str, str], fields: Mapping[str, str]) -> None:
    for out_key, meta_key in fields.items():
        value = _present(meta.get(meta_key))
        if value is not None:
            summary[out_key] = value


def _number(value: Optional[str], integer: bool = False):
    value = _present(value)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if integer and number.is_integer() else number


def _json(value: Optional[str]):
    value = _present(value)
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return None


def _timestamp(value: Optional[str]) -> Optional[str]:
    number = _number(value)
    if number is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(number))


def _algorithm(meta: Mapping[str, str], network_args) -> Optional[str]:
    if isinstance(network_args, dict) and network_args.get("algo"):
        algo = str(network_args["algo"])
        return algo + ("+dora" if str(network_args.get("dora_wd", "")).lower() == "true" else "")
    module = _present(meta.get("ss_network_module"))
    if module is None:
        return None
    known = {"networks.lora": "lora", "networks.dylora": "dylora", "networks.oft": "oft",
             "networks.lora_fa": "lora-fa", "lycoris.kohya": "lycoris"}
    return known.get(module, module.rsplit(".", 1)[-1])


def _top_tags(meta: Mapping[str, str], limit: int = 20) -> list:
    frequency = _json(meta.get("ss_tag_frequency"))
    if not isinstance(frequency, dict):
        return []
    counts: dict[str, int] = {}
    for folder_tags in frequency.values():
        if not isinstance(folder_tags, dict):
            continue
        for tag, count in folder_tags.items():
            tag = str(tag).strip()
            if tag and isinstance(count, (int, float)):
                counts[tag] = counts.get(tag, 0) + int(count)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [[tag, count] for tag, count in ranked[:limit]]


def _class_tokens(meta: Mapping[str, str]) -> list[str]:
    """Class tokens: the dataset's trigger, from ss_datasets subsets or kohya's `N_token` folder names."""
    tokens: list[str] = []
    datasets = _json(meta.get("ss_datasets"))
    if isinstance(datasets, list):
        for dataset in datasets:
            for subset in (dataset or {}).get("subsets", []) if isinstance(dataset, dict) else []:
                token = subset.get("class_tokens") if isinstance(subset, dict) else None
                if isinstance(token, str) and token.strip():
                    tokens.append(token.strip())
    dirs = _json(meta.get("ss_dataset_dirs"))
    if isinstance(dirs, dict):
        for folder in dirs:
            head, _, token = str(folder).partition("_")
            if head.isdigit() and token.strip():
                tokens.append(token.strip())
    return _unique(tokens)


def _trigger_words(meta: Mapping[str, str], class_tokens: list[str], top_tags: list) -> list[str]:
    """Explicit triggers first (modelspec.trigger_phrase), then class tokens, then the most frequent tags."""
    words: list[str] = []
    phrase = _present(meta.get("modelspec.trigger_phrase"))
    if phrase:
        words.extend(part.strip() for part in phrase.split(",") if part.strip())
    words.extend(class_tokens)
    words.extend(tag for tag, _ in top_tags[:TOP_TAGS])
    return _unique(words)


def _unique(items) -> list:
    seen: set = set()
    return [x for x in items if not (x in seen or seen.add(x))]
