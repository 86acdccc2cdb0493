"""Load this repository as a ComfyUI custom-node pack, the way ComfyUI does, from inside a test.

`import nodes` in a ComfyUI process means ComfyUI's own nodes.py, so the pack is imported by path under a
package name of its own; its node modules are then `lora_core_pack.nodes.<family>`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

from tests.comfy_host import REPO, import_comfy

PACK_NAME = "lora_core_pack"


def load_pack():
    """Import the pack (after the real ComfyUI) and return its top-level module."""
    import_comfy()
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def node_module(family: str):
    """A node family module of the pack, e.g. node_module("loader")."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.{family}")


def host(model, clip=None):
    """The pack's view of a MODEL / CLIP pair (nodes/_host.HostModels)."""
    return node_module("_host").HostModels(model, clip)


def core_drops(model, clip, state) -> list[str]:
    """The keys core 0.3.75 reports as not loaded for `state` (it logs them and goes on)."""
    import logging

    import comfy.sd

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        comfy.sd.load_lora_for_models(model, clip, state, 1.0, 1.0)
    finally:
        root.removeHandler(handler)
    return [r.getMessage() for r in records if "not loaded" in r.getMessage().lower()]


def block_stack_rows(**rows) -> dict:
    """The widget values of LoRACoreBlockStack's five rows, all off (named mode, empty vector), with `rows`
    (`enabled_1=True, lora_1=..., vector_1=...`) on top."""
    out = {}
    for i in range(1, 6):
        out.update({f"enabled_{i}": False, f"lora_{i}": "None", f"strength_model_{i}": 1.0,
                    f"strength_clip_{i}": 0.0, f"mode_{i}": "named", f"preset_{i}": "custom", f"vector_{i}": ""})
    out.update(rows)
    return out


@contextlib.contextmanager
def loras_folder(path: Path):
    """Point ComfyUI's `loras` folder at `path` for the duration of a test."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(path)], saved[1])
    folder_paths.filename_list_cache.clear()
    try:
        yield Path(path)
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved
        folder_paths.filename_list_cache.clear()


@contextlib.contextmanager
def input_folder(path: Path):
    """Point ComfyUI's input folder at `path` for the duration of a test."""
    import folder_paths

    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(path))
    try:
        yield Path(path)
    finally:
        folder_paths.set_input_directory(saved)


def diffusers_fuse_reference(mixin, path, transformer, scale: float, **attributes) -> dict:
    """diffusers' own answer for a LoRA file on a diffusers transformer: `mixin`'s (e.g. `FluxLoraLoaderMixin`)
    `load_lora_weights` + `fuse_lora(lora_scale=scale)` on a copy of `transformer`, the fused state dict.
    `attributes`: further pipeline attributes the mixin reads (SD3's `text_encoder=None`)."""
    import copy

    class TinyPipeline(mixin):
        """Just enough of a pipeline for diffusers' LoRA loader: the transformer as an attribute."""

        def __init__(self, transformer):
            self.transformer = transformer
            self.hf_device_map = None
            for name, value in attributes.items():
                setattr(self, name, value)

        @property
        def components(self):
            return {"transformer": self.transformer}

    pipe = TinyPipeline(copy.deepcopy(transformer))
    pipe.load_lora_weights(path, adapter_name="lora")
    pipe.fuse_lora(lora_scale=scale, components=["transformer"])
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()
