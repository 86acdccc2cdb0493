"""The Wan 2.2 pair loader: one node for the high-noise and the low-noise expert of Wan 2.2 T2V-A14B / I2V-A14B.

Public contract (saved workflows store widgets by position): the node id, input names and widget order below
never change; new inputs go at the end. Which file is which expert is decided in lora_core.pairs.
"""
from __future__ import annotations

from lora_core import pairs

from ._host import NONE_NAMES, load_lora, lora_names
from .block_weight import BlockSettings, apply_rows, make_row
from .loader import CATEGORY, CLIP_TIP, STRENGTH


class LoRACoreWanPairLoader:
    """Load a Wan 2.2 A14B LoRA pair: the high-noise file onto the high-noise model, the low-noise file onto the
    low-noise model, each exactly as the LoRA loader would."""

    @classmethod
    def INPUT_TYPES(cls):
        names = lora_names()
        return {
            "required": {
                "model_high_noise": ("MODEL", {"tooltip": "The Wan 2.2 high-noise expert (the early, noisy steps)."}),
                "model_low_noise": ("MODEL", {"tooltip": "The Wan 2.2 low-noise expert (the later steps)."}),
                "lora_1": (names, {"tooltip": "A LoRA of the pair (either expert's)."}),
                "lora_2": (["None"] + names, {"tooltip": "The other LoRA of the pair. None: the file whose name is "
                                                         "lora_1's with high / low swapped (x_high_noise -> "
                                                         "x_low_noise, x_HIGH -> x_LOW)."}),
                "strength_high": ("FLOAT", {**STRENGTH, "tooltip": "Strength on the high-noise model."}),
                "strength_low": ("FLOAT", {**STRENGTH, "tooltip": "Strength on the low-noise model."}),
                "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": CLIP_TIP}),
                "assign": (list(pairs.ASSIGN_CHOICES), {
                    "default": pairs.ASSIGN_AUTO,
                    "tooltip": "Which file is which expert. auto: musubi's modelspec.timestep_range metadata, "
                               "then the file names (_high_noise / _low_noise, HIGH / LOW); or set it here."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The UMT5 text encoder (optional; both files' text-encoder parts "
                                             "apply to it, as two chained LoRA loaders would)."}),
                "block_vector": ("STRING", {"default": "", "multiline": False,
                                            "tooltip": "Named block weights for both experts, e.g. "
                                                       "'B00-B19=0.5, B*.cross_attn=0' (empty: none)."}),
                "block_vector_low": ("STRING", {"default": "", "multiline": False,
                                                "tooltip": "Named block weights for the low-noise expert only, "
                                                           "e.g. 'B*.self_attn=0.5'; block_vector then holds for "
                                                           "the high-noise expert alone. Empty: block_vector for "
                                                           "both."}),
            },
        }

    RETURN_TYPES = ("MODEL", "MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model_high_noise", "model_low_noise", "CLIP", "report")
    OUTPUT_TOOLTIPS = ("The patched high-noise model.", "The patched low-noise model.",
                       "The patched CLIP (None when none was given).", "Which file went where, and why; then the "
                       "report of each load.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a Wan 2.2 A14B LoRA pair to the high-noise and low-noise experts. The pair is told "
                   "apart by musubi's timestep-range metadata or the file names; when neither tells, the error "
                   "names both files and the assign input decides.")

    def load(self, model_high_noise, model_low_noise, lora_1, lora_2, strength_high, strength_low, strength_clip,
             assign, clip=None, block_vector="", block_vector_low=""):
        second = None if lora_2 in NONE_NAMES else lora_2
        if second is None and assign != pairs.ASSIGN_SAME:
            second = pairs.partner_name(lora_1, lora_names())
        first_file = load_lora(lora_1)
        second_meta = load_lora(second).metadata if second is not None else None
        decision = pairs.decide_pair((lora_1, first_file.metadata),
                                     (second, second_meta) if second is not None else None, assign)
        settings = BlockSettings("named", block_vector or "")
        low_settings = BlockSettings("named", block_vector_low) if (block_vector_low or "").strip() else settings
        high, clip_out, high_report = apply_rows(
            model_high_noise, clip, [make_row(decision.high, strength_high, strength_clip, settings)])
        # the same file on both experts: its text-encoder part applies once
        clip_strength = 0.0 if decision.low == decision.high else strength_clip
        low, clip_out, low_report = apply_rows(
            model_low_noise, clip_out, [make_row(decision.low, strength_low, clip_strength, low_settings)])
        report = (f"Wan 2.2 pair: high noise <- {decision.high}, low noise <- {decision.low} ({decision.how})\n\n"
                  f"[high noise]\n{high_report}\n\n[low noise]\n{low_report}")
        return high, low, clip_out, report


NODE_CLASS_MAPPINGS = {"LoRACoreWanPairLoader": LoRACoreWanPairLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRACoreWanPairLoader": "Load Wan 2.2 LoRA Pair (LoRA Core)"}
