"""Loader and stack nodes: drop-in replacements for core's LoraLoader, with a report and LORA_STACK interop.

Public contract (saved workflows store widgets by position): node ids, input names and widget order below
never change; new inputs go at the end.
"""
from __future__ import annotations

from lora_core.api import LoraRequest

from ._host import NONE_NAMES, HostModels, load_lora, log_report, lora_names

CATEGORY = "LoRA Core"
STACK_ROWS = 5

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
MODEL_TIP = "How strongly to modify the diffusion model. Negative values invert the LoRA."
CLIP_TIP = "How strongly to modify the text encoder(s). Ignored when no CLIP is connected."
REPORT_TIP = "What was applied: format, architecture, rank/alpha, modules per component, unmatched keys, " \
             "trigger words and base model from the file's metadata."


def lora_inputs(**extra_required) -> dict:
    """The inputs of a one-LoRA loader in widget order (model, file, two strengths, then `extra_required`),
    shared by every node that loads a single LoRA so their saved workflows line up."""
    return {
        "required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA is applied to."}),
            "lora_name": (lora_names(), {"tooltip": "A file in models/loras (subfolders included)."}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": MODEL_TIP}),
            "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": CLIP_TIP}),
            **extra_required,
        },
        "optional": {
            "clip": ("CLIP", {"tooltip": "The text encoder(s) the LoRA is applied to (optional)."}),
        },
    }


class LoRACoreLoader:
    """Load one LoRA onto MODEL and (optionally) CLIP, like core's LoraLoader, and report what happened."""

    @classmethod
    def INPUT_TYPES(cls):
        return lora_inputs()

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched CLIP (None when none was given).", REPORT_TIP)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoRA of any common format (kohya, diffusers/PEFT, LyCORIS LoHa/LoKr/(IA)3/OFT/"
                   "BOFT/GLoRA/DoRA, full diff) exactly. A LoRA made for another model is refused with a "
                   "clear error; partial matches are listed in the report.")

    def load(self, model, lora_name, strength_model, strength_clip, clip=None):
        return apply_named(model, clip, [(lora_name, strength_model, strength_clip)])


class LoRACoreLoaderModelOnly:
    """Load one LoRA onto MODEL only (text-encoder modules are reported as not applied)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA is applied to."}),
                "lora_name": (lora_names(), {"tooltip": "A file in models/loras (subfolders included)."}),
                "strength_model": ("FLOAT", {**STRENGTH, "tooltip": MODEL_TIP}),
            }
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a LoRA to the diffusion model only."

    def load(self, model, lora_name, strength_model):
        model, _, report = apply_named(model, None, [(lora_name, strength_model, 0.0)])
        return model, report


class LoRACoreStack:
    """Build or extend a LORA_STACK: a list of (lora_name, strength_model, strength_clip) tuples, the type
    Efficiency, Comfyroll, Easy-Use and LoRA Manager exchange. Upstream entries come first, then these rows."""

    @classmethod
    def INPUT_TYPES(cls):
        names = ["None"] + lora_names()
        required = {}
        for i in range(1, STACK_ROWS + 1):
            required[f"enabled_{i}"] = ("BOOLEAN", {"default": i == 1, "tooltip": f"Use row {i}."})
            required[f"lora_{i}"] = (names, {"tooltip": f"LoRA of row {i} (None to leave the row empty)."})
            required[f"strength_model_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": MODEL_TIP})
            required[f"strength_clip_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": CLIP_TIP})
        return {"required": required,
                "optional": {"lora_stack": ("LORA_STACK", {"tooltip": "An upstream stack to extend."})}}

    RETURN_TYPES = ("LORA_STACK",)
    RETURN_NAMES = ("lora_stack",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Collects up to five LoRAs, each with an on/off toggle, into a LORA_STACK."

    def build(self, lora_stack=None, **rows):
        stack = list(normalise_stack(lora_stack))
        for i in range(1, STACK_ROWS + 1):
            name = rows[f"lora_{i}"]
            if rows[f"enabled_{i}"] and name not in NONE_NAMES:
                stack.append((name, float(rows[f"strength_model_{i}"]), float(rows[f"strength_clip_{i}"])))
        return (stack,)


class LoRACoreApplyStack:
    """Apply a whole LORA_STACK as one patch set: one patch per weight, one re-patch, not N."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the stack is applied to."}),
                "lora_stack": ("LORA_STACK", {"tooltip": "(lora_name, strength_model, strength_clip) entries."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "The text encoder(s) the stack is applied to."})},
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies every LoRA of a LORA_STACK in one pass, with one report per LoRA."

    def apply(self, model, lora_stack, clip=None):
        return apply_named(model, clip, list(normalise_stack(lora_stack)))


def normalise_stack(lora_stack):
    """Drop the 'None'/empty sentinels and all-zero rows other packs emit; keep order."""
    for entry in lora_stack or ():
        if len(entry) < 3:
            raise ValueError(f"LORA_STACK entry {entry!r} is not (lora_name, strength_model, strength_clip).")
        name, strength_model, strength_clip = entry[0], float(entry[1]), float(entry[2])
        if name in NONE_NAMES or (strength_model == 0 and strength_clip == 0):
            continue
        yield name, strength_model, strength_clip


def apply_named(model, clip, rows):
    """Load (name, strength_model, strength_clip) rows against this host (a large file is checked against the
    model from its header first) and apply them as one patch set."""
    rows = [(n, sm, sc) for n, sm, sc in rows if sm != 0 or sc != 0]
    if not rows:
        return model, clip, "No LoRA applied (all strengths are 0)."
    host = HostModels(model, clip)
    requests = [LoraRequest(load_lora(name, host), sm, sc, name=name) for name, sm, sc in rows]
    return apply_requests(model, clip, requests, host)


def apply_requests(model, clip, requests, host=None):
    """Shared by every loader: plan first (may raise, nothing changed yet), then clone and patch."""
    requests = [r for r in requests if r.strength_model != 0 or r.strength_clip != 0]
    if not requests:
        return model, clip, "No LoRA applied (all strengths are 0)."
    host = host or HostModels(model, clip)
    plan = host.plan(requests)
    new_model, new_clip = host.apply(plan)
    return new_model, new_clip, log_report(plan)


NODE_CLASS_MAPPINGS = {
    "LoRACoreLoader": LoRACoreLoader,
    "LoRACoreLoaderModelOnly": LoRACoreLoaderModelOnly,
    "LoRACoreStack": LoRACoreStack,
    "LoRACoreApplyStack": LoRACoreApplyStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreLoader": "Load LoRA (LoRA Core)",
    "LoRACoreLoaderModelOnly": "Load LoRA, Model Only (LoRA Core)",
    "LoRACoreStack": "LoRA Stack (LoRA Core)",
    "LoRACoreApplyStack": "Apply LoRA Stack (LoRA Core)",
}
