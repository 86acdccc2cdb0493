"""Block-weight nodes: one LoRA or a stack of LoRAs with a factor per UNet/text-encoder block, as MODEL/CLIP
patches or as ComfyUI HOOKS (for step scheduling and masks), plus the user preset store.

Public contract (saved workflows store widget values by position): node ids, input names and widget order
below never change; new inputs go at the end.

Semantics decided here (the math itself lives in lora_core.blocks and lora_core.api):

* final strength of a target = strength_model|strength_clip x factor(block, element kind), exactly like the
  plain loaders: linear for every algorithm (DoRA interpolates between W and W_dora) except OFT/BOFT, where
  it is LyCORIS's multiplier on the rotation (lora_core.adapters.delta_at).
* An empty `vector` with preset "custom" means "no block weighting": factor 1 everywhere.
* A preset ("a1111/ALL", "inspire/SD-ALL", "user/NAME") carries its own mode and vector; the `mode` and
  `vector` widgets are then ignored and the resolved table says so. In a LORA_CORE_BLOCK_STACK row a shipped
  preset is kept as its name in `vector` (lora_core.blocks resolves names per architecture); a user preset
  is expanded to its stored vector, so the row works on any machine.
* Inspire mode is ordinal: its "present blocks" are the blocks the file touches *on this model* (unmatched
  modules are not counted), in layout order.
* The `seed` widget (only used by random R/U tokens) has `control_after_generate: False`, so the frontend
  adds no hidden "randomize" widget after it: a saved workflow's widgets_values are exactly the widgets
  listed here, in order, and a seed never changes on its own (which would re-patch the model every run).
* Bad input (wrong vector length for the mode, bad token, unknown preset, a vector for another
  architecture) raises lora_core's LoraValueError unchanged, before anything is cloned or patched.

User presets live in `<ComfyUI user directory>/lora_core/block_presets.json` (see `user_presets_path`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Sequence

import comfy.hooks
import folder_paths

from lora_core import blocks
from lora_core.api import LoraRequest
from lora_core.errors import LoraValueError
from lora_core.formats import parse_modules

from ._host import NONE_NAMES, HostModels, load_lora, log_report, lora_names
from ._patches import to_comfy_patches
from .loader import CLIP_TIP, MODEL_TIP, STRENGTH, lora_inputs, normalise_stack

log = logging.getLogger("lora_core")

CATEGORY = "LoRA Core/block weight"
MODES = ("a1111", "inspire", "named")
CUSTOM = "custom"
USER = "user"
BLOCK_STACK = "LORA_CORE_BLOCK_STACK"
STACK_ROWS = 4
# LORA_CORE_BLOCK_STACK entry keys. `vector` is authoritative (a preset is resolved into it when the row is
# built); `preset` only records where the vector came from ("custom" when typed in).
ROW_KEYS = ("name", "strength_model", "strength_clip", "mode", "vector", "seed", "A", "B", "inverse", "preset")

MODE_TIP = ("How `vector` is read. a1111: fixed block ids (17/26 for SD1/SD2, 12/20 for SDXL; BASE = text "
            "encoders). inspire: Inspire Pack's ordinal vectors (one value per block the LoRA touches on this "
            "model, last value carries on). named: `IN04=0.5, OUT03-OUT05=0, TE1=1`.")
PRESET_TIP = ("A shipped (a1111/…, inspire/…) or saved (user/…) block vector; it brings its own mode. "
              "'custom' uses the mode and vector widgets.")
VECTOR_TIP = ("Block weights in the chosen mode's syntax, e.g. `1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0`. Tokens R "
              "and U are random (seeded), A and B are the variables below. Empty = factor 1 everywhere.")
SEED_TIP = "Seed for the random R/U tokens (fixed: it does not change after each run)."
A_TIP = "Value of the token A in the vector."
B_TIP = "Value of the token B in the vector."
INVERSE_TIP = "Use 1 - factor for every block (Inspire's inverse)."
TABLE_TIP = "The resolved factor of every block (with block names), then the load report."


# ------------------------------------------------------------------------------------------------ presets

def user_presets_path() -> str:
    """The user's preset file: <ComfyUI user dir>/lora_core/block_presets.json (JSON, written atomically by
    lora_core.blocks.save_user_preset; safe to edit by hand)."""
    return os.path.join(folder_paths.get_user_directory(), "lora_core", "block_presets.json")


def _preset_items(presets) -> list[tuple[str, str, str]]:
    """(name, mode, vector) from whatever lora_core.blocks returns for a preset collection."""
    items = []
    entries = presets.items() if isinstance(presets, dict) else ((getattr(p, "name", None), p) for p in presets)
    for name, value in entries:
        if isinstance(value, str):
            items.append((name, None, value))
        elif isinstance(value, dict):
            items.append((value.get("name", name), value.get("mode"), value.get("vector")))
        elif isinstance(value, (tuple, list)) and len(value) == 2 and name is not None:
            mode, vector = value
            items.append((name, mode, vector))
        else:
            items.append((getattr(value, "name", name), getattr(value, "mode", None), getattr(value, "vector", None)))
    return items


def shipped_presets(mode: str) -> list[tuple[str, str]]:
    return [(name, vector) for name, _, vector in _preset_items(blocks.list_presets(mode))]


def user_presets() -> list[tuple[str, str, str]]:
    """(name, mode, vector) of the user's presets; an absent file means none."""
    path = user_presets_path()
    if not os.path.isfile(path):
        return []
    return [(name, mode or "a1111", vector) for name, mode, vector in _preset_items(blocks.load_user_presets(path))]


def preset_choices() -> list[str]:
    """The `preset` combo: "custom", then every shipped preset as "<mode>/<name>", then "user/<name>"."""
    choices = [CUSTOM]
    for mode in MODES:
        choices += [f"{mode}/{name}" for name, _ in shipped_presets(mode)]
    try:
        choices += [f"{USER}/{name}" for name, _, _ in user_presets()]
    except Exception as error:  # a broken user file must not take the node list down; using it still raises
        log.warning("LoRA Core: cannot list user block presets from %s: %s", user_presets_path(), error)
    return list(dict.fromkeys(choices))


def resolve_preset(choice: str) -> tuple[str, str]:
    """(mode, vector) of a preset combo value.

    Shipped presets stay names ("a1111/OUTALL" -> ("a1111", "OUTALL")): lora_core.blocks resolves preset names
    itself, checks them against the model's architecture and raises its own LoraValueError (with the nearest
    names) for unknown ones. User presets are expanded to their stored mode and vector."""
    group, _, name = choice.partition("/")
    if group in ("a1111", "inspire") and name:
        return group, name
    if group == USER and name:
        found = {n: (m, v) for n, m, v in user_presets()}
        if name in found:
            return found[name]
        raise LoraValueError(
            f"unknown user block-weight preset {name!r}: {user_presets_path()} holds "
            f"{', '.join(sorted(found)) or 'no presets'}. Save it with 'Save Block Preset (LoRA Core)' or pick "
            f"another preset.")
    raise LoraValueError(
        f"unknown block-weight preset {choice!r}: use 'custom' (the vector widget), 'a1111/NAME', "
        f"'inspire/NAME' or 'user/NAME' from the preset list.")


# ------------------------------------------------------------------------------------------ block settings

@dataclass(frozen=True)
class BlockSettings:
    """The block-weight widgets of one LoRA, with a preset already resolved to its mode and vector."""

    mode: str = "a1111"
    vector: str = ""
    seed: int = 0
    A: float = 1.0
    B: float = 1.0
    inverse: bool = False
    preset: str = CUSTOM
    note: str = ""

    @classmethod
    def from_widgets(cls, mode: str, preset: str, vector: str, seed: int = 0, A: float = 1.0, B: float = 1.0,
                     inverse: bool = False) -> "BlockSettings":
        if preset not in (None, "", CUSTOM):
            preset_mode, preset_vector = resolve_preset(preset)
            note = f"preset {preset}" + (f" (its mode {preset_mode} replaces the mode widget {mode})"
                                         if preset_mode != mode else "")
            return cls(preset_mode, preset_vector, int(seed), float(A), float(B), bool(inverse), preset, note)
        if mode not in MODES:
            raise LoraValueError(f"unknown block-weight mode {mode!r}: use one of {', '.join(MODES)}.")
        return cls(mode, vector or "", int(seed), float(A), float(B), bool(inverse))

    @classmethod
    def from_row(cls, row: dict) -> "BlockSettings":
        settings = cls.from_widgets(row.get("mode", "a1111"), CUSTOM, row.get("vector", ""), row.get("seed", 0),
                                    row.get("A", 1.0), row.get("B", 1.0), row.get("inverse", False))
        preset = row.get("preset") or CUSTOM
        return settings if preset == CUSTOM else replace(settings, preset=preset, note=f"preset {preset}")

    @property
    def weighted(self) -> bool:
        return bool(self.vector.strip())


def touched_blocks(key_map, lora_file) -> tuple[str, ...]:
    """The blocks a LoRA file touches on this model, in layout order (lora_core.blocks)."""
    return blocks.touched_blocks(key_map, lora_file)


def resolve_block_weights(host: HostModels, lora_file, settings: BlockSettings):
    """lora_core.blocks.BlockWeights for one LoRA on this host, or None for "factor 1 everywhere" (the one
    resolution lora_core.blocks.resolve_for_lora that every node uses)."""
    return resolve_with_key_map(host.key_map, lora_file, settings)


def resolve_with_key_map(key_map, lora_file, settings: BlockSettings):
    if not settings.weighted:
        return None
    return blocks.resolve_for_lora(key_map, lora_file, settings.mode, settings.vector, seed=settings.seed,
                                   A=settings.A, B=settings.B, inverse=settings.inverse)


def describe(label: str, settings: BlockSettings, weights) -> str:
    head = f"Block weights for {label}: "
    if weights is None:
        return head + "none (factor 1 on every block)."
    lines = [head + f"mode {settings.mode}, vector {settings.vector!r}"
             + (f", seed {settings.seed}" if any(t in settings.vector.upper() for t in "RU") else "")
             + (f", A={settings.A:g}, B={settings.B:g}" if any(t in settings.vector.upper() for t in "AB") else "")
             + (", inverse" if settings.inverse else "")]
    if settings.note:
        lines.append(f"  from {settings.note}")
    table = weights.table()
    lines.append(table if isinstance(table, str) else _format_table(table))
    return "\n".join(lines)


def _format_table(table) -> str:
    rows = table.items() if isinstance(table, dict) else table
    return "\n".join(f"  {block:<6} {float(value):g}" for block, value in rows)


# ------------------------------------------------------------------------------------------------- rows

def make_row(name: str, strength_model: float, strength_clip: float, settings: BlockSettings) -> dict:
    """One LORA_CORE_BLOCK_STACK entry (a plain dict, so other packs can build and read it)."""
    return {"name": name, "strength_model": float(strength_model), "strength_clip": float(strength_clip),
            "mode": settings.mode, "vector": settings.vector, "seed": settings.seed, "A": settings.A,
            "B": settings.B, "inverse": settings.inverse, "preset": settings.preset}


def check_row(row) -> dict:
    if not isinstance(row, dict) or "name" not in row:
        raise LoraValueError(f"{BLOCK_STACK} entry {row!r} is not a dict with at least 'name' "
                             f"(keys: {', '.join(ROW_KEYS)}). Build it with 'LoRA Block Stack (LoRA Core)'.")
    return row


def build_requests(host: HostModels, rows: Sequence[dict]) -> tuple[list[LoraRequest], list[str]]:
    """Resolve every row's vector first (may raise: nothing has been patched yet)."""
    requests, tables = [], []
    for row in map(check_row, rows):
        strength_model = float(row.get("strength_model", 1.0))
        strength_clip = float(row.get("strength_clip", 1.0))
        if row["name"] in NONE_NAMES or (strength_model == 0 and strength_clip == 0):
            continue
        lora_file = load_lora(row["name"], host)
        settings = BlockSettings.from_row(row)
        weights = resolve_block_weights(host, lora_file, settings)
        requests.append(LoraRequest(lora_file, strength_model, strength_clip, block_weights=weights,
                                    name=row["name"]))
        tables.append(describe(row["name"], settings, weights))
    return requests, tables


def apply_rows(model, clip, rows: Sequence[dict]):
    """Plan the whole stack (may raise; MODEL/CLIP untouched), then clone and patch once."""
    host = HostModels(model, clip)
    requests, tables = build_requests(host, rows)
    if not requests:
        return model, clip, "No LoRA applied (empty stack or all strengths are 0)."
    plan = host.plan(requests)
    new_model, new_clip = host.apply(plan)
    return new_model, new_clip, "\n\n".join(tables + [log_report(plan)])


def hooks_for_rows(model, clip, rows: Sequence[dict], prev_hooks=None):
    """A HookGroup with one WeightHook carrying the block-weighted patches (strength x factor folded in)."""
    host = HostModels(model, clip)
    requests, tables = build_requests(host, rows)
    if not requests:
        return prev_hooks if prev_hooks is not None else comfy.hooks.HookGroup(), "No LoRA in the hook."
    plan = host.plan(requests)
    hook = comfy.hooks.WeightHook(strength_model=1.0, strength_clip=1.0)
    loaded_keys: set = set()
    # need_weight_init=False: core then registers `weights` on the MODEL and `weights_clip` on the CLIP as
    # they are (already keyed by host tensor), instead of running its own key map and load_lora.
    hook.weights = to_comfy_patches({k: v for k, v in plan.patches.items() if k in host.model_shapes}, loaded_keys)
    hook.weights_clip = to_comfy_patches({k: v for k, v in plan.patches.items() if k in host.clip_shapes},
                                         loaded_keys)
    hook.need_weight_init = False
    group = comfy.hooks.HookGroup()
    group.add(hook)
    if prev_hooks is not None:
        group = prev_hooks.clone_and_combine(group)
    return group, "\n\n".join(tables + [log_report(plan)])


# ------------------------------------------------------------------------------------------------- nodes

def _block_widgets() -> dict:
    return {
        "mode": (list(MODES), {"default": "a1111", "tooltip": MODE_TIP}),
        "preset": (preset_choices(), {"default": CUSTOM, "tooltip": PRESET_TIP}),
        "vector": ("STRING", {"default": "", "multiline": False, "tooltip": VECTOR_TIP}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                         "tooltip": SEED_TIP}),
        "A": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": A_TIP}),
        "B": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": B_TIP}),
        "inverse": ("BOOLEAN", {"default": False, "tooltip": INVERSE_TIP}),
    }


def _single_lora_inputs() -> dict:
    return lora_inputs(**_block_widgets())


def _single_row(lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse) -> dict:
    return make_row(lora_name, strength_model, strength_clip,
                    BlockSettings.from_widgets(mode, preset, vector, seed, A, B, inverse))


class LoRACoreBlockWeight:
    """Load one LoRA with a factor per block (A1111, Inspire or named syntax); replaces Inspire's
    "LoRA Loader (Block Weight)"."""

    @classmethod
    def INPUT_TYPES(cls):
        return _single_lora_inputs()

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "block_table")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched CLIP (None when none was given).", TABLE_TIP)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoRA with per-block strengths: strength x block factor on every targeted weight, "
                   "linear for every algorithm (LoRA, LoCon, LoHa, LoKr, DoRA, ...) except OFT/BOFT, where it is "
                   "LyCORIS's own multiplier on the rotation. The table output names every block and its factor.")

    def load(self, model, lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse,
             clip=None):
        row = _single_row(lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse)
        return apply_rows(model, clip, [row])


class LoRACoreBlockWeightHooks:
    """The same block-weighted LoRA as ComfyUI HOOKS, for Set Hook Keyframes / Cond Set Props / Set CLIP Hooks."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _single_lora_inputs()
        inputs["optional"]["prev_hooks"] = ("HOOKS", {"tooltip": "Hooks to combine with (like core's Create "
                                                                 "Hook LoRA)."})
        return inputs

    RETURN_TYPES = ("HOOKS", "STRING")
    RETURN_NAMES = ("HOOKS", "block_table")
    OUTPUT_TOOLTIPS = ("A hook group with one weight hook: attach it to conditioning (Cond Set Props) or CLIP "
                       "(Set CLIP Hooks); schedule it with Set Hook Keyframes.", TABLE_TIP)
    FUNCTION = "create"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Builds a block-weighted LoRA as a HOOKS object. The MODEL (and CLIP) inputs only resolve "
                   "the file's keys and blocks against the model; they are not patched. Keyframe strengths "
                   "scale the whole block-weighted delta linearly.")

    def create(self, model, lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse,
               clip=None, prev_hooks=None):
        row = _single_row(lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse)
        return hooks_for_rows(model, clip, [row], prev_hooks)


class LoRACoreBlockStack:
    """Build or extend a LORA_CORE_BLOCK_STACK: rows of LoRA + strengths + vector or preset."""

    @classmethod
    def INPUT_TYPES(cls):
        names = ["None"] + lora_names()
        presets = preset_choices()
        required = {}
        for i in range(1, STACK_ROWS + 1):
            required[f"enabled_{i}"] = ("BOOLEAN", {"default": i == 1, "tooltip": f"Use row {i}."})
            required[f"lora_{i}"] = (names, {"tooltip": f"LoRA of row {i} (None to leave the row empty)."})
            required[f"strength_model_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": MODEL_TIP})
            required[f"strength_clip_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": CLIP_TIP})
            required[f"mode_{i}"] = (list(MODES), {"default": "a1111", "tooltip": MODE_TIP})
            required[f"preset_{i}"] = (presets, {"default": CUSTOM, "tooltip": PRESET_TIP})
            required[f"vector_{i}"] = ("STRING", {"default": "", "multiline": False, "tooltip": VECTOR_TIP})
        shared = _block_widgets()
        for name in ("seed", "A", "B", "inverse"):
            required[name] = shared[name]
        return {"required": required,
                "optional": {
                    "block_stack": (BLOCK_STACK, {"tooltip": "An upstream block stack to extend."}),
                    "lora_stack": ("LORA_STACK", {"tooltip": "An upstream plain LORA_STACK; its LoRAs get "
                                                             "factor 1 on every block."}),
                }}

    RETURN_TYPES = (BLOCK_STACK,)
    RETURN_NAMES = ("block_stack",)
    OUTPUT_TOOLTIPS = ("Entries in order: upstream block stack, upstream LORA_STACK, then these rows.",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Collects LoRAs with their own block vectors or presets (seed, A, B and inverse are shared "
                   "by the rows of this node). Presets are resolved to their vector when the stack is built.")

    def build(self, seed, A, B, inverse, block_stack=None, lora_stack=None, **rows):
        stack = [dict(check_row(row)) for row in block_stack or ()]
        for name, strength_model, strength_clip in normalise_stack(lora_stack):
            stack.append(make_row(name, strength_model, strength_clip, BlockSettings()))
        for i in range(1, STACK_ROWS + 1):
            name = rows[f"lora_{i}"]
            if not rows[f"enabled_{i}"] or name in NONE_NAMES:
                continue
            settings = BlockSettings.from_widgets(rows[f"mode_{i}"], rows[f"preset_{i}"], rows[f"vector_{i}"],
                                                  seed, A, B, inverse)
            stack.append(make_row(name, rows[f"strength_model_{i}"], rows[f"strength_clip_{i}"], settings))
        return (stack,)


class LoRACoreApplyBlockStack:
    """Apply a whole block stack as one patch set (one plan, one patch per weight)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the stack is applied to."}),
                "block_stack": (BLOCK_STACK, {"tooltip": "Rows from 'LoRA Block Stack (LoRA Core)'."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "The text encoder(s) the stack is applied to."})},
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "block_table")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched CLIP (None when none was given).", TABLE_TIP)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies every LoRA of a block stack in one pass; every vector is checked before patching."

    def apply(self, model, block_stack, clip=None):
        return apply_rows(model, clip, block_stack)


class LoRACoreBlockStackHooks:
    """A whole block stack as one HOOKS object."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the keys are resolved against (not patched)."}),
                "block_stack": (BLOCK_STACK, {"tooltip": "Rows from 'LoRA Block Stack (LoRA Core)'."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP the text-encoder keys are resolved against."}),
                "prev_hooks": ("HOOKS", {"tooltip": "Hooks to combine with."}),
            },
        }

    RETURN_TYPES = ("HOOKS", "STRING")
    RETURN_NAMES = ("HOOKS", "block_table")
    FUNCTION = "create"
    CATEGORY = CATEGORY
    DESCRIPTION = "Builds one weight hook carrying every LoRA of a block stack."

    def create(self, model, block_stack, clip=None, prev_hooks=None):
        return hooks_for_rows(model, clip, block_stack, prev_hooks)


class LoRACoreBlockStackToLoraStack:
    """Convert a block stack to a plain LORA_STACK for other packs; the block vectors are DROPPED (every LoRA
    then acts at full strength on every block)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"block_stack": (BLOCK_STACK, {"tooltip": "The block stack to convert."})}}

    RETURN_TYPES = ("LORA_STACK", "STRING")
    RETURN_NAMES = ("lora_stack", "dropped")
    OUTPUT_TOOLTIPS = ("(lora_name, strength_model, strength_clip) entries.",
                       "Which rows lost a block vector in the conversion.")
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Block stack -> LORA_STACK (name, strength_model, strength_clip). Block vectors cannot be "
                   "expressed in a LORA_STACK and are dropped; the second output lists them.")

    def convert(self, block_stack):
        stack, dropped = [], []
        for row in map(check_row, block_stack or ()):
            stack.append((row["name"], float(row.get("strength_model", 1.0)), float(row.get("strength_clip", 1.0))))
            if str(row.get("vector", "")).strip():
                dropped.append(f"{row['name']}: {row.get('mode', 'a1111')} vector {row['vector']!r} dropped")
        return stack, "\n".join(dropped) or "No block vectors were dropped."


class LoRACoreSaveBlockPreset:
    """Save a block vector as a user preset (it appears as user/NAME in every preset list after a refresh)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "my-preset", "tooltip": "Preset name (saving the same name replaces it)."}),
            "mode": (list(MODES), {"default": "a1111", "tooltip": MODE_TIP}),
            "vector": ("STRING", {"default": "", "multiline": False, "tooltip": VECTOR_TIP}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("message",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Stores name -> (mode, vector) in <ComfyUI user dir>/lora_core/block_presets.json. Press R "
                   "(refresh node definitions) to see it in the preset lists.")

    def save(self, name, mode, vector):
        name = (name or "").strip()
        if not name or "/" in name:
            raise LoraValueError(f"block preset name {name!r} must be non-empty and contain no '/'.")
        if mode not in MODES:
            raise LoraValueError(f"unknown block-weight mode {mode!r}: use one of {', '.join(MODES)}.")
        path = user_presets_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blocks.save_user_preset(path, name, vector, mode)
        message = f"Saved block preset {USER}/{name} ({mode}: {vector}) to {path}."
        return {"ui": {"text": [message]}, "result": (message,)}


NODE_CLASS_MAPPINGS = {
    "LoRACoreBlockWeight": LoRACoreBlockWeight,
    "LoRACoreBlockWeightHooks": LoRACoreBlockWeightHooks,
    "LoRACoreBlockStack": LoRACoreBlockStack,
    "LoRACoreApplyBlockStack": LoRACoreApplyBlockStack,
    "LoRACoreBlockStackHooks": LoRACoreBlockStackHooks,
    "LoRACoreBlockStackToLoraStack": LoRACoreBlockStackToLoraStack,
    "LoRACoreSaveBlockPreset": LoRACoreSaveBlockPreset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreBlockWeight": "Load LoRA, Block Weight (LoRA Core)",
    "LoRACoreBlockWeightHooks": "Create Hook LoRA, Block Weight (LoRA Core)",
    "LoRACoreBlockStack": "LoRA Block Stack (LoRA Core)",
    "LoRACoreApplyBlockStack": "Apply LoRA Block Stack (LoRA Core)",
    "LoRACoreBlockStackHooks": "Create Hook LoRA Block Stack (LoRA Core)",
    "LoRACoreBlockStackToLoraStack": "Block Stack to LORA_STACK (LoRA Core)",
    "LoRACoreSaveBlockPreset": "Save Block Preset (LoRA Core)",
}
