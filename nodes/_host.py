"""What every LoRA Core node needs from ComfyUI: LoRA names, the key map of a MODEL/CLIP pair, applying a plan.

Kept in one private module so each node family file stays a thin adapter.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Optional, Sequence

import folder_paths

from lora_core import api, paths
from lora_core.arch import bind_comfy_clip, bind_comfy_model, bind_layout, build_key_map
from lora_core.errors import LoraFileError, LoraValueError
from lora_core.io import default_cache, read_lora_header

from ._params import ensure_params_patched
from ._patches import to_comfy_patches

log = logging.getLogger("lora_core")

NONE_NAMES = {"", "none", "None"}
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_folders() -> list[str]:
    return list(folder_paths.get_folder_paths("loras"))


def input_folder_path(folder: str, what: str, example: str) -> str:
    """`folder` (stripped, not empty) inside ComfyUI's input folder: a name below it (subfolders allowed) or an
    absolute path that lies inside it. Nothing outside it is read: link or copy the folder into ComfyUI/input.
    `what` names the input in errors ("dataset folder"), `example` is a name to suggest."""
    root = os.path.abspath(folder_paths.get_input_directory())
    if os.path.isabs(folder):
        if not paths.inside_any(folder, [root]):
            raise LoraValueError(f"{what} {folder!r} is outside ComfyUI's input folder {root}; put (or link) it "
                                 f"there and type its name, e.g. {example!r}.")
        return os.path.normpath(folder)
    return paths.output_path(root, folder, "", what=what)


def resolve_lora_path(name: str) -> str:
    """Accept every name form LORA_STACK producers use: the folder-relative name with either separator, an
    absolute path inside a loras folder, a basename, or a name without extension. Exact matches win; an
    ambiguous basename fails. Nothing outside ComfyUI's loras folders (extra paths included) is ever read, and
    "outside", "not there" and "not a file" give the same message (lora_core.paths.existing_file)."""
    if not isinstance(name, str):
        raise LoraFileError(f"LoRA name must be a string, got {type(name).__name__}.")
    folders = lora_folders()
    if os.path.isabs(name.strip()):
        return paths.existing_file(folders, name, what="LoRA", label="models/loras", extensions=LORA_EXTENSIONS)
    wanted = name.replace("\\", "/")
    names = lora_names()
    by_norm = {n.replace("\\", "/"): n for n in names}
    if wanted in by_norm:
        return paths.existing_file(folders, by_norm[wanted], what="LoRA", label="models/loras")
    stem = lambda n: os.path.splitext(n)[0] if n.lower().endswith(LORA_EXTENSIONS) else n  # noqa: E731
    candidates = [n for norm, n in by_norm.items()
                  if stem(norm) == stem(wanted) or os.path.basename(norm) == os.path.basename(wanted)
                  or stem(os.path.basename(norm)) == stem(os.path.basename(wanted))]
    if len(candidates) == 1:
        return paths.existing_file(folders, candidates[0], what="LoRA", label="models/loras")
    if len(candidates) > 1:
        raise LoraFileError(f"LoRA name {name!r} is ambiguous: it matches {sorted(candidates)}. "
                            f"Use the path relative to models/loras.")
    return paths.existing_file(folders, name, what="LoRA", label="models/loras", extensions=LORA_EXTENSIONS)


# Files larger than this are checked against the model from their header before their data is read, so a file
# that cannot fit (a 2 GiB tensor for another model) fails in milliseconds instead of after reading gigabytes.
PREFLIGHT_BYTES = 64 << 20


def load_lora(name: str, host: Optional["HostModels"] = None):
    """Read (or fetch from the shared RAM cache) the LoRA file behind a node's name. With `host`, a large file
    not yet cached is first planned against that model from its header alone (shapes, no data)."""
    path = resolve_lora_path(name)
    if host is not None and path not in default_cache and os.path.getsize(path) > PREFLIGHT_BYTES:
        header = read_lora_header(path)
        if header is not None:
            host.preflight(header, name)
    return default_cache.get(path)


class HostModels:
    """The MODEL and CLIP a node was given, with the key map and tensor shapes lora_core needs."""

    _key_maps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, model, clip=None):
        self.model = model
        self.clip = clip
        self.model_shapes = _shapes(model.model) if model is not None else {}
        self.clip_shapes = _shapes(clip.cond_stage_model) if clip is not None else {}
        self.key_map = self._key_map()

    def _key_map(self):
        """Build (once per model/CLIP pair) the map from every LoRA naming style to this host's tensors."""
        owner = self.model.model if self.model is not None else self.clip.cond_stage_model
        clip_model = self.clip.cond_stage_model if self.clip is not None else None
        cached = self._key_maps.get(owner)
        # the CLIP by identity (a weak reference): an id() of a freed CLIP can be reused by the next one, which
        # would get the freed CLIP's key map (its encoders)
        if cached is not None and (cached[0] is None if clip_model is None else
                                   cached[0] is not None and cached[0]() is clip_model):
            return cached[1]
        bindings = []
        arch = None
        if self.model is not None:
            model_config = getattr(self.model.model, "model_config", None)
            unet_config = getattr(model_config, "unet_config", None)
            bindings.append(bind_comfy_model(self.model_shapes, unet_config, config_name=type(model_config).__name__
                                             if model_config is not None else ""))
            arch = bindings[0].arch
        absent: dict = {}
        if self.clip is not None:
            bindings.append(bind_comfy_clip(self.clip_shapes, arch))
            missing = [c for c, spec in (arch.components.items() if arch is not None else ())
                       if spec.is_text_encoder and c not in bindings[-1].components]
            if missing:
                # The CLIP lacks some of the model's encoders (SD3 without T5, ...): still recognise their names,
                # so those modules are reported as not applied with the reason instead of counting as mismatches.
                bindings.append(bind_layout(arch, components=missing))
                absent = {c: f"the CLIP has no {arch.components[c].encoder.family}" for c in missing}
        elif arch is not None:
            # No CLIP connected: still recognise the architecture's text-encoder names, so a LoRA's text-encoder
            # modules are reported as "not applied: no CLIP connected" instead of counting as mismatches.
            bindings.append(bind_layout(arch, components=[c for c in arch.components if c.startswith("te")]))
        key_map = build_key_map(*bindings)
        key_map.absent = absent
        self._key_maps[owner] = (weakref.ref(clip_model) if clip_model is not None else None, key_map)
        return key_map

    @property
    def shapes(self) -> dict:
        return {**self.model_shapes, **self.clip_shapes}

    def components(self, include_clip: bool = True) -> tuple[str, ...]:
        present = set(self.key_map.components)
        if self.model is None:
            present = {c for c in present if c.startswith("te")}
        if self.clip is None or not include_clip:
            present = {c for c in present if not c.startswith("te")}
        present -= set(getattr(self.key_map, "absent", {}))
        return tuple(sorted(present))

    def preflight(self, header, name: str) -> None:
        """Plan a LoRA's header (meta tensors: shapes only) against this host: shape and fit errors surface
        before the file's data is read."""
        api.plan_lora(api.LoraRequest(header, 1.0, 1.0 if self.clip is not None else 0.0, name=name),
                      self.key_map, self.shapes, self.components())

    def plan(self, requests: Sequence[api.LoraRequest]) -> api.Plan:
        return api.plan_stack(requests, self.key_map, self.shapes, self.components(), _LiveTensors(self))

    def apply(self, plan: api.Plan):
        """Clones of MODEL and CLIP carrying the plan as ComfyUI patches (one patch per tensor)."""
        model, clip = self.model, self.clip
        model_plan = {k: v for k, v in plan.patches.items() if k in self.model_shapes}
        clip_plan = {k: v for k, v in plan.patches.items() if k in self.clip_shapes}
        loaded_keys: set = set()
        if model is not None and model_plan:
            model = model.clone()
            added = model.add_patches(to_comfy_patches(model_plan, loaded_keys), 1.0)
            _check_added(added, model_plan, "MODEL")
            ensure_params_patched(model)   # Wan's modulation, pad tokens: ModelPatcher.load skips them
        if clip is not None and clip_plan:
            clip = clip.clone()
            added = clip.add_patches(to_comfy_patches(clip_plan, loaded_keys), 1.0)
            _check_added(added, clip_plan, "CLIP")
        return model, clip


def _shapes(module) -> dict:
    """{state-dict key: logical weight shape}. The keys are the ones ModelPatcher.add_patches accepts; the
    shape comes from the module's own tensor (the one ComfyUI's calculate_weight path dequantises), because a
    quantised layer's state_dict() may hold its packed storage or a meta placeholder (ComfyUI-GGUF)."""
    from lora_core.weights import logical_shape

    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {k: logical_shape(tensors.get(k, v)) for k, v in module.state_dict(keep_vars=True).items()}


class _LiveTensors(Mapping):
    """The host's weights by key, looked up when asked (for lora_core's overflow check), never copied."""

    def __init__(self, host: "HostModels"):
        self._modules = [m for m in (host.model.model if host.model is not None else None,
                                     host.clip.cond_stage_model if host.clip is not None else None) if m is not None]
        self._state = None

    def _all(self) -> dict:
        if self._state is None:
            self._state = {}
            for module in self._modules:
                self._state.update(module.state_dict(keep_vars=True))
        return self._state

    def __getitem__(self, key):
        return self._all()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())


def _check_added(added, plan, what: str) -> None:
    missing = set(plan) - set(added)
    if missing:
        # ModelPatcher skips keys silently; we do not.
        raise RuntimeError(f"LoRA Core: ComfyUI refused patches for {len(missing)} {what} tensors, e.g. "
                           f"{sorted(missing)[:3]}")


def log_report(plan: api.Plan) -> str:
    text = plan.text()
    log.info("LoRA Core\n%s", text)
    return text
