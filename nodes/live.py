"""Live LoRA nodes: the LoRA is applied at forward time (`W x + s·B(A x)`) instead of merged into the weights, so
changing a strength or a block vector and queueing again only changes scalars: ComfyUI restores, recomputes and
moves no weight (the MODEL keeps its `patches_uuid`).

How it goes through ComfyUI (0.3.75 and later), never by patching ComfyUI itself: every live module gets a
ModelPatcher *object patch* of its own `forward` attribute (`<module path>.forward`), which ComfyUI sets when it
loads the clone and restores from its backup when another clone is loaded (`patch_model` / `unpatch_model`).
The new forward is the module's class forward (so ComfyUI's casting, lowvram offload, fp8 / GGUF dequantisation
and weight hooks run unchanged) followed by lora_core.live's terms in the compute dtype. Modules whose LoRA has
no factored form (LoHa, LoKr, DoRA, OFT, ...) are merged as ordinary patches and listed in the report.

Factors are kept per model in a lora_core.live.FactorStore, so a new strength builds only a new scalar table.
`LoRACoreBakeLive` turns the live set back into merged patches (same weights as the merged loaders), for a final
render or Save Checkpoint.

Public contract: these node ids and their inputs (in order) are new; the merged nodes are unchanged.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import comfy.utils

from lora_core import api, live
from lora_core.api import LoraRequest

from ._host import HostModels, load_lora, log_report
from ._patches import to_comfy_patches
from .block_weight import _single_lora_inputs, _single_row, build_requests
from .block_weight import BLOCK_STACK, TABLE_TIP
from .loader import CATEGORY, REPORT_TIP, lora_inputs, normalise_stack

log = logging.getLogger("lora_core")

LIVE_CATEGORY = f"{CATEGORY}/live"
LIVE_TIP = ("Applied at forward time: queueing again with another strength or block vector changes only "
            "scalars (no weight is restored, recomputed or moved). Bake it for a final render or Save Checkpoint.")

_stores: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_shape_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_form_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class LiveHost(HostModels):
    """HostModels whose tensor shapes are read once per model: re-running a live node after a strength change
    then costs the plan and the scalar table, not a walk over every tensor of the model (~20 ms on SD1.5)."""

    def __init__(self, model, clip=None):
        self.model = model
        self.clip = clip
        self.model_shapes = _cached_shapes(model.model) if model is not None else {}
        self.clip_shapes = _cached_shapes(clip.cond_stage_model) if clip is not None else {}
        self.key_map = self._key_map()


def _cached_shapes(owner) -> dict:
    from ._host import _shapes

    shapes = _shape_cache.get(owner)
    if shapes is None:
        shapes = _shape_cache[owner] = _shapes(owner)
    return shapes


def _module_form(owner, mkey: str):
    forms = _form_cache.get(owner)
    if forms is None:
        forms = _form_cache[owner] = {}
    got = forms.get(mkey)
    if got is None:
        try:
            module = comfy.utils.get_attr(owner, mkey)
        except AttributeError:
            got = (None, "no module of that name")
        else:
            got = live.layer_form(module)
        forms[mkey] = got
    return got


def factor_store(owner) -> live.FactorStore:
    """The FactorStore of one model (a BaseModel or a CLIP's cond_stage_model), kept while the model lives."""
    store = _stores.get(owner)
    if store is None:
        store = _stores[owner] = live.FactorStore()
    return store


class LiveForward:
    """The object patch put on `<module>.forward`: the module's class forward, then every live layer's terms.

    Holds its layers (each knows its LiveSet, hence its plan entries) so a chain of live nodes composes on one
    module and Bake can find what to merge."""

    def __init__(self, module, layers):
        self.module = module
        self.base = type(module).forward
        self.layers = tuple(layers)

    def __call__(self, *args, **kwargs):
        out = self.base(self.module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        for layer in self.layers:
            out = layer.add(x, out)
        return out


def _live_forwards(patcher) -> dict:
    return {name: value for name, value in patcher.object_patches.items() if isinstance(value, LiveForward)}


def _add_live(patcher, owner, liveset: live.LiveSet, keys) -> int:
    """Object patches on `patcher` for the live layers of `liveset` whose module is in `keys` (composing with
    the live layers an upstream live node put there)."""
    added = 0
    for mkey, layer in liveset.layers.items():
        if mkey not in keys:
            continue
        name = mkey + ".forward"
        previous = patcher.object_patches.get(name)
        module = comfy.utils.get_attr(owner, mkey)
        layers = (previous.layers if isinstance(previous, LiveForward) else ()) + (layer,)
        patcher.add_object_patch(name, LiveForward(module, layers))
        added += 1
    return added


def apply_live(model, clip, requests, host: Optional[HostModels] = None):
    """Plan the requests (may raise; nothing changed), then clones of MODEL / CLIP with the factored layers as
    object patches and the rest as merged patches. Returns (model, clip, report)."""
    requests = [r for r in requests if r.strength_model != 0 or r.strength_clip != 0]
    if not requests:
        return model, clip, "No LoRA applied (all strengths are 0)."
    host = host or LiveHost(model, clip)
    plan = host.plan(requests)
    owners = {}
    if model is not None:
        owners["model"] = model.model
    if clip is not None:
        owners["clip"] = clip.cond_stage_model

    def where(mkey: str) -> Optional[str]:
        key = mkey + ".weight"
        if key in host.model_shapes:
            return "model"
        if key in host.clip_shapes:
            return "clip"
        return None

    def form_of(mkey: str):
        side = where(mkey)
        if side not in owners:
            return None, "no weight" if side is None else f"no {side.upper()} given"
        return _module_form(owners[side], mkey)

    split = live.split_plan(plan.patches, host.shapes, form_of)
    new_model, new_clip = host.apply(api.Plan(split.merged, plan.reports)) if split.merged else (model, clip)
    model_keys = {k for k in split.live if where(k) == "model"}
    clip_keys = {k for k in split.live if where(k) == "clip"}
    if model_keys:
        liveset = live.LiveSet(_subset(split, model_keys), host.shapes, factor_store(owners["model"]))
        new_model = new_model.clone() if new_model is model else new_model
        _add_live(new_model, owners["model"], liveset, model_keys)
    if clip_keys:
        liveset = live.LiveSet(_subset(split, clip_keys), host.shapes, factor_store(owners["clip"]))
        new_clip = new_clip.clone() if new_clip is clip else new_clip
        _add_live(new_clip.patcher, owners["clip"], liveset, clip_keys)
    text = log_report(plan) + "\n\n" + split.text()
    return new_model, new_clip, text


def _subset(split: live.LiveSplit, keys) -> live.LiveSplit:
    return live.LiveSplit({k: v for k, v in split.live.items() if k in keys}, {}, split.fallback,
                          {k: v for k, v in split.forms.items() if k in keys})


def bake(model, clip=None):
    """Clones of MODEL / CLIP where every live layer is replaced by merged patches (LoRA Core's weight adapter,
    the merged loaders' math); what was merged already stays. Returns (model, clip, report)."""
    lines = []
    outputs = []
    for what, item in (("MODEL", model), ("CLIP", clip)):
        if item is None:
            outputs.append(None)
            continue
        patcher = item if what == "MODEL" else item.patcher
        forwards = _live_forwards(patcher)
        if not forwards:
            outputs.append(item)
            lines.append(f"{what}: no live LoRA layers (nothing to bake).")
            continue
        # One merged patch set per live node, in graph order (upstream first): what the same chain of merged
        # loaders adds to ModelPatcher, so the baked weights equal theirs bit for bit.
        per_set: dict = {}
        for layers in (f.layers for f in forwards.values()):
            for layer in layers:
                entries = per_set.setdefault(id(layer.owner), (layer.owner, {}))[1]
                for key, patches in layer.owner.patches.items():
                    if live.module_key(key) == layer.key:
                        entries[key] = patches
        clone = item.clone()
        clone_patcher = clone if what == "MODEL" else clone.patcher
        for name in forwards:
            del clone_patcher.object_patches[name]
        merged = 0
        for _, entries in per_set.values():
            added = clone_patcher.add_patches(to_comfy_patches(entries, set()), 1.0)
            missing = set(entries) - set(added)
            if missing:
                raise RuntimeError(f"LoRA Core: ComfyUI refused baked patches for {len(missing)} {what} tensors, "
                                   f"e.g. {sorted(missing)[:3]}")
            merged += len(entries)
        lines.append(f"{what}: baked {len(forwards)} live layers of {len(per_set)} live node(s) into {merged} "
                     f"merged patches.")
        outputs.append(clone)
    return outputs[0], outputs[1], "\n".join(lines)


# ------------------------------------------------------------------------------------------------- nodes

class LoRACoreLoaderLive:
    """Load one LoRA onto MODEL and (optionally) CLIP in live mode."""

    @classmethod
    def INPUT_TYPES(cls):
        return lora_inputs()

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = ("The model with the LoRA live.", "The CLIP with the LoRA live (None when none was given).",
                       REPORT_TIP)
    FUNCTION = "load"
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = "Like Load LoRA (LoRA Core), live. " + LIVE_TIP

    def load(self, model, lora_name, strength_model, strength_clip, clip=None):
        return apply_live_named(model, clip, [(lora_name, strength_model, strength_clip)])


class LoRACoreLoaderModelOnlyLive:
    """Load one LoRA onto MODEL only, in live mode."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = lora_inputs()
        del inputs["required"]["strength_clip"]
        return {"required": inputs["required"]}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    FUNCTION = "load"
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = "Like Load LoRA, Model Only (LoRA Core), live. " + LIVE_TIP

    def load(self, model, lora_name, strength_model):
        model, _, report = apply_live_named(model, None, [(lora_name, strength_model, 0.0)])
        return model, report


class LoRACoreApplyStackLive:
    """Apply a whole LORA_STACK in live mode (one concatenated low-rank term per layer for the whole stack)."""

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
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = "Like Apply LoRA Stack (LoRA Core), live. " + LIVE_TIP

    def apply(self, model, lora_stack, clip=None):
        return apply_live_named(model, clip, list(normalise_stack(lora_stack)))


class LoRACoreBlockWeightLive:
    """One LoRA with a factor per block, in live mode: a new vector changes only the scalar table."""

    @classmethod
    def INPUT_TYPES(cls):
        return _single_lora_inputs()

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "block_table")
    OUTPUT_TOOLTIPS = ("The model with the LoRA live.", "The CLIP with the LoRA live.", TABLE_TIP)
    FUNCTION = "load"
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = "Like Load LoRA, Block Weight (LoRA Core), live. " + LIVE_TIP

    def load(self, model, lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse,
             clip=None):
        row = _single_row(lora_name, strength_model, strength_clip, mode, preset, vector, seed, A, B, inverse)
        return apply_live_rows(model, clip, [row])


class LoRACoreApplyBlockStackLive:
    """A whole block stack in live mode (each LoRA keeps its own factors and block vector)."""

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
    FUNCTION = "apply"
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = "Like Apply LoRA Block Stack (LoRA Core), live. " + LIVE_TIP

    def apply(self, model, block_stack, clip=None):
        return apply_live_rows(model, clip, block_stack)


class LoRACoreBakeLive:
    """Turn live LoRA layers into merged patches (the merged loaders' weights), e.g. before Save Checkpoint."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "A model with live LoRA layers."})},
                "optional": {"clip": ("CLIP", {"tooltip": "A CLIP with live LoRA layers."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    FUNCTION = "bake"
    CATEGORY = LIVE_CATEGORY
    DESCRIPTION = ("Replaces every live LoRA layer by an ordinary merged patch: the weights equal those of the "
                   "merged loaders with the same strengths and block vectors. Use it for final renders and "
                   "Save Checkpoint; keep the live model for tuning.")

    def bake(self, model, clip=None):
        return bake(model, clip)


def apply_live_named(model, clip, rows):
    rows = [(n, sm, sc) for n, sm, sc in rows if sm != 0 or sc != 0]
    if not rows:
        return model, clip, "No LoRA applied (all strengths are 0)."
    host = LiveHost(model, clip)
    requests = [LoraRequest(load_lora(name, host), sm, sc, name=name) for name, sm, sc in rows]
    return apply_live(model, clip, requests, host)


def apply_live_rows(model, clip, rows):
    host = LiveHost(model, clip)
    requests, tables = build_requests(host, rows)
    if not requests:
        return model, clip, "No LoRA applied (empty stack or all strengths are 0)."
    new_model, new_clip, report = apply_live(model, clip, requests, host)
    return new_model, new_clip, "\n\n".join(tables + [report])


NODE_CLASS_MAPPINGS = {
    "LoRACoreLoaderLive": LoRACoreLoaderLive,
    "LoRACoreLoaderModelOnlyLive": LoRACoreLoaderModelOnlyLive,
    "LoRACoreApplyStackLive": LoRACoreApplyStackLive,
    "LoRACoreBlockWeightLive": LoRACoreBlockWeightLive,
    "LoRACoreApplyBlockStackLive": LoRACoreApplyBlockStackLive,
    "LoRACoreBakeLive": LoRACoreBakeLive,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRACoreLoaderLive": "Load LoRA, Live (LoRA Core)",
    "LoRACoreLoaderModelOnlyLive": "Load LoRA, Model Only, Live (LoRA Core)",
    "LoRACoreApplyStackLive": "Apply LoRA Stack, Live (LoRA Core)",
    "LoRACoreBlockWeightLive": "Load LoRA, Block Weight, Live (LoRA Core)",
    "LoRACoreApplyBlockStackLive": "Apply LoRA Block Stack, Live (LoRA Core)",
    "LoRACoreBakeLive": "Bake Live LoRA (LoRA Core)",
}
