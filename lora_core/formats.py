"""Group a LoRA file's tensor keys into writer-independent ModuleLora objects.

Every writer (kohya, diffusers, PEFT, LyCORIS, ComfyUI's own trainer) names a module's tensors
`<module prefix><suffix>`. We strip the known suffixes, give each tensor a role (types.py), and decide the
algorithm from the roles present. Module names stay exactly as the file spells them; the key map resolves
them. One exception: diffusers' old attention-processor form (`...attn1.processor.to_q_lora.up.weight`) names
processor attributes, not modules, so it becomes the module it patches (`...attn1.to_q`; `to_out_lora` ->
`to_out.0` in a UNet, `to_q/k/v/out_lora` -> `q/k/v/out_proj` in a text encoder, as diffusers converts it).

Nothing is dropped silently: a key we cannot use goes to `ParsedLora.unused` with a reason. A dangling
partner (an up without its down) is *not* an error: the module is left out and both the key and the reason
are listed, so the rest of the file still loads and the report shows what was skipped. A rank mismatch
between up and down is an error (LoraFormatError): the file is broken, not merely partial.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .errors import LoraFormatError
from .types import LoraFile, ModuleLora

# (suffix, role, style). Longest suffixes are tried first, so `.lora_B.default.weight` wins over `.weight`.
# style names the writer convention the suffix belongs to (feeds detect_writer).
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_up.weight", "up", "kohya"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    ("_lora.up.weight", "up", "diffusers_old"),
    ("_lora.down.weight", "down", "diffusers_old"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".lora_A", "down", "peft"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_magnitude_vector.default.weight", "magnitude", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".alpha", "alpha", ""),
    (".dora_scale", "dora_scale", ""),
    (".reshape_weight", "reshape", "comfyui"),
    (".hada_w1_a", "w1a", "lycoris"),
    (".hada_w1_b", "w1b", "lycoris"),
    (".hada_w2_a", "w2a", "lycoris"),
    (".hada_w2_b", "w2b", "lycoris"),
    (".hada_t1", "t1", "lycoris"),
    (".hada_t2", "t2", "lycoris"),
    (".lokr_w1", "lokr_w1", "lycoris"),
    (".lokr_w1_a", "lokr_w1a", "lycoris"),
    (".lokr_w1_b", "lokr_w1b", "lycoris"),
    (".lokr_w2", "lokr_w2", "lycoris"),
    (".lokr_w2_a", "lokr_w2a", "lycoris"),
    (".lokr_w2_b", "lokr_w2b", "lycoris"),
    (".lokr_t2", "lokr_t2", "lycoris"),
    (".a1.weight", "a1", "lycoris"),
    (".a2.weight", "a2", "lycoris"),
    (".b1.weight", "b1", "lycoris"),
    (".b2.weight", "b2", "lycoris"),
    (".bm.weight", "glora_bm", "lycoris"),
    (".on_input", "on_input", "lycoris"),
    (".oft_blocks", "blocks", "lycoris"),
    (".oft_diag", "oft_diag", "lycoris"),
    (".rescale", "rescale", "lycoris"),
    (".diff_b", "diff_b", "lycoris"),
    (".diff", "diff", "lycoris"),
    (".w_norm", "w_norm", "lycoris"),
    (".b_norm", "b_norm", "lycoris"),
    (".set_weight", "set_weight", "comfyui"),
    (".q_layer.weight", "tlora", "lycoris"),
    (".p_layer.weight", "tlora", "lycoris"),
    (".lambda_layer", "tlora", "lycoris"),
    (".lora_embedding_A", "peft_embedding", "peft"),
    (".lora_embedding_B", "peft_embedding", "peft"),
    (".weight", "weight", ""),  # (IA)^3 vector, only valid next to `.on_input`
)
_SUFFIXES_LONGEST_FIRST = tuple(sorted(_SUFFIXES, key=lambda item: -len(item[0])))

# Which roles make which weight adapter, checked in this order (first complete match wins).
_LOKR_ROLES = {"lokr_w1": "w1", "lokr_w1a": "w1a", "lokr_w1b": "w1b", "lokr_w2": "w2", "lokr_w2a": "w2a",
               "lokr_w2b": "w2b", "lokr_t2": "t2"}
# Roles that are modifiers of a module rather than its weight adapter.
_MODIFIER_ROLES = {"alpha", "dora_scale", "magnitude", "reshape", "diff_b", "b_norm", "on_input"}

_OLD_PROCESSOR_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

WRITER_STYLES = ("kohya", "diffusers", "peft", "lycoris", "comfyui", "xlabs", "mixed", "unknown")


@dataclass
class ParsedLora:
    """The modules of one LoRA file plus every key that could not be used, with the reason."""

    modules: dict[str, ModuleLora]
    unused: list[tuple[str, str]] = field(default_factory=list)
    writer: str = "unknown"


@dataclass
class _Group:
    """The raw tensors of one module prefix, by role, before they become a ModuleLora."""

    name: str
    tensors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)  # role -> (file key, tensor)
    styles: set = field(default_factory=set)


# --------------------------------------------------------------------------------------------- key splitting


# XLabs x-flux LoRA processors (src/flux/modules/layers.py): `<block>.processor.qkv_lora1.down.weight`, ... The
# module is the processor attribute (the key map resolves it to the weight it adapts); without this rule the
# single-block form `qkv_lora.down.weight` would read as diffusers' old processor form.
_XLABS = re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")


def split_key(key: str) -> Optional[tuple[str, str, str]]:
    """(module name, role, style) of a file key, or None when no known suffix matches."""
    xlabs = _XLABS.match(key)
    if xlabs:
        return xlabs.group(1), xlabs.group(2), "xlabs"
    if key.endswith(".diff_m") and len(key) > len(".diff_m"):
        # lightx2v's full diff of a block's `modulation` parameter (`blocks.0.diff_m`): the module is the
        # parameter, `blocks.0.modulation`, as ComfyUI names it (core 0.3.75 expects `...modulation.diff`)
        return key[: -len(".diff_m")] + ".modulation", "diff", "lycoris"
    for suffix, role, style in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix) and len(key) > len(suffix):
            module = key[: -len(suffix)]
            if style == "diffusers_old":
                module = _module_of_processor_form(module)
                style = "diffusers"
            return module, role, style
    return None


def _module_of_processor_form(module: str) -> str:
    """`x.attn1.processor.to_q` -> `x.attn1.to_q`; `to_out` -> `to_out.0` (UNet) / `out_proj` (text encoder)."""
    parts = [p for p in module.split(".") if p != "processor"]
    last = parts[-1]
    is_text_encoder = "self_attn" in parts or any(p.startswith("text_encoder") for p in parts[:1])
    if is_text_encoder and last in _OLD_PROCESSOR_TE:
        parts[-1] = _OLD_PROCESSOR_TE[last]
    elif last == "to_out":
        parts.append("0")
    return ".".join(parts)


# A PEFT model's own state dict names its adapter in every key: `...q_proj.lora_A.<adapter>.weight`.
_PEFT_NAMED = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.weight$")


def _peft_adapter_keys(keys: Iterable[str], unused: list) -> tuple[dict[str, str], set[str]]:
    """(file key -> key without its PEFT adapter name, keys to leave out). One adapter is read from a file:
    `default` when present, else the first one in the file; keys of other adapters are reported as unused."""
    keys = list(keys)
    named = {key: match for key in keys if (match := _PEFT_NAMED.search(key)) and match.group(2) != "default"}
    if not named:
        return {}, set()
    adapters = list(dict.fromkeys(match.group(2) for match in named.values()))
    has_default = any(".default.weight" in key for key in keys)
    chosen = None if has_default else adapters[0]
    renamed = {}
    for key, match in named.items():
        if match.group(2) == chosen:
            renamed[key] = key[: match.start()] + f".{match.group(1)}.weight"
        else:
            unused.append((key, f"PEFT adapter '{match.group(2)}': this file holds several adapters and one LoRA is "
                                f"read from it ('{chosen or 'default'}'); save each adapter as its own file to use "
                                f"the others"))
    return renamed, set(named) - set(renamed)


def _group_keys(lora: LoraFile, unused: list) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    renamed, other_adapters = _peft_adapter_keys(lora.tensors.keys(), unused)
    for key, tensor in lora.tensors.items():
        if key in other_adapters:
            continue  # already reported
        split = split_key(renamed.get(key, key))
        if split is None:
            unused.append((key, "unknown key: no LoRA/LyCORIS suffix this loader knows"))
            continue
        module, role, style = split
        group = groups.setdefault(module, _Group(module))
        if role in group.tensors:
            unused.append((key, f"duplicate {role} tensor for module {module} (already have "
                                f"{group.tensors[role][0]}); the first one is used"))
            continue
        group.tensors[role] = (key, tensor)
        if style:
            group.styles.add(style)
        if module.startswith("lycoris_"):
            group.styles.add("lycoris")  # LyCORIS' generic wrapper prefix, whatever the tensor names
    return groups


# --------------------------------------------------------------------------------------------- parsing


def parse_modules(lora: LoraFile) -> ParsedLora:
    """Turn a LoraFile into ModuleLora objects keyed by the file's module prefix (see module docstring).

    Parsed once per file: the result is kept on the LoraFile and returned again while its tensors and metadata
    are the same objects, so a strength or block change does not re-parse, and the engine sees the same
    ModuleLora objects again. The result is shared: treat it as read-only."""
    fingerprint = (tuple((key, id(t), t.data_ptr(), t.shape) for key, t in lora.tensors.items()),
                   tuple(lora.metadata.items()))
    cached = lora.__dict__.get("_parsed")
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    parsed = _parse_modules(lora)
    lora.__dict__["_parsed"] = (fingerprint, parsed)
    return parsed


def _parse_modules(lora: LoraFile) -> ParsedLora:
    unused: list[tuple[str, str]] = []
    groups = _group_keys(lora, unused)
    adapter_alphas = _alphas_from_adapter_metadata(lora.metadata)
    modules: dict[str, ModuleLora] = {}
    styles: set = set()
    for name, group in groups.items():
        module = _build_module(group, unused, lora.label)
        if module is None:
            continue
        if module.alpha is None and module.algo == "lora":
            module.alpha = _metadata_alpha(adapter_alphas, name, int(module.tensors["down"].shape[0]))
        modules[name] = module
        styles |= group.styles
    writer = _writer_from_styles(styles) if modules else detect_writer(lora.tensors.keys())
    return ParsedLora(modules=modules, unused=unused, writer=writer)


def _build_module(group: _Group, unused: list, label: str) -> Optional[ModuleLora]:
    roles = dict(group.tensors)
    consumed: list[str] = []

    def take(role: str) -> Optional[torch.Tensor]:
        item = roles.pop(role, None)
        if item is None:
            return None
        consumed.append(item[0])
        return item[1]

    algo, tensors, flags = _take_weight_adapter(group, roles, take, unused, label)
    if algo is None:
        _list_leftovers(group.name, roles, unused, "no weight adapter for this module "
                                                   "(its partner tensors are missing)")
        return None
    alpha_tensor = take("alpha")
    alpha = _scalar(alpha_tensor, group, "alpha", label) if alpha_tensor is not None else None
    dora_scale = take("dora_scale")
    magnitude = take("magnitude")
    if dora_scale is None and magnitude is not None:
        # PEFT's DoRA magnitude is the same per-output-row norm, stored 1-D: give it LyCORIS's (out, 1, ...) shape.
        reference = tensors.get("up", next(iter(tensors.values())))
        dora_scale = magnitude.reshape(magnitude.shape[0], *([1] * (reference.ndim - 1)))
    elif magnitude is not None:
        unused.append((group.tensors["magnitude"][0], "module has both dora_scale and lora_magnitude_vector; "
                                                       "dora_scale is used"))
    bias_diff = take("diff_b")
    b_norm = take("b_norm")
    if bias_diff is None:
        bias_diff = b_norm
    elif b_norm is not None:
        unused.append((group.tensors["b_norm"][0], "module has both diff_b and b_norm; diff_b is used"))
    reshape = take("reshape")
    if reshape is not None:
        flags["reshape_weight"] = [int(v) for v in reshape.flatten().tolist()]
    _list_leftovers(group.name, roles, unused, f"not used by the {algo} adapter of this module")
    return ModuleLora(name=group.name, algo=algo, tensors=tensors, alpha=alpha, dora_scale=dora_scale,
                      bias_diff=bias_diff, flags=flags, source_keys=tuple(consumed), source=label)


def _take_weight_adapter(group: _Group, roles: dict, take, unused: list, label: str):
    """Pick the module's weight adapter from its roles: (algo, tensors, flags) or (None, {}, {})."""
    flags: dict = {}
    if "up" in roles or "down" in roles:
        if "up" in roles and "down" in roles:
            up, down, mid = take("up"), take("down"), take("mid")
            _check_rank(group, up, down, mid, label)
            tensors = {"up": up, "down": down}
            if mid is not None:
                tensors["mid"] = mid
            return "lora", tensors, flags
        present, missing = ("lora_up", "lora_down") if "up" in roles else ("lora_down", "lora_up")
        key = roles.pop("up" if "up" in roles else "down")[0]
        unused.append((key, f"{present} without {missing}"))
    if all(r in roles for r in ("w1a", "w1b", "w2a", "w2b")):
        tensors = {r: take(r) for r in ("w1a", "w1b", "w2a", "w2b")}
        for optional in ("t1", "t2"):
            if optional in roles:
                tensors[optional] = take(optional)
        return "loha", tensors, flags
    lokr = _take_lokr(group, roles, take, unused)
    if lokr is not None:
        return "lokr", lokr, flags
    if all(r in roles for r in ("a1", "a2", "b1", "b2")):
        return "glora", {r: take(r) for r in ("a1", "a2", "b1", "b2")}, flags
    if "oft_diag" in roles and "blocks" not in roles:
        # Early LyCORIS OFT stored the rotation matrices themselves (no Cayley transform at load time).
        roles["blocks"] = roles.pop("oft_diag")
        flags["oft_rotation"] = True
    if "blocks" in roles:
        blocks = take("blocks")
        tensors = {"blocks": blocks}
        if "rescale" in roles:
            tensors["rescale"] = take("rescale")
        if blocks.ndim not in (3, 4):
            raise LoraFormatError(f"{label}: module {group.name}: oft_blocks has shape {tuple(blocks.shape)}; "
                                  f"OFT needs 3-D (n_blocks, b, b) and BOFT 4-D blocks. The file is damaged.")
        return ("boft" if blocks.ndim == 4 else "oft"), tensors, flags
    if "weight" in roles and "on_input" in roles:
        on_input = take("on_input")
        flags["on_input"] = bool(on_input.flatten()[0].item()) if on_input.numel() else False
        return "ia3", {"weight": take("weight")}, flags
    for role, algo in (("diff", "full"), ("w_norm", "norm"), ("set_weight", "set")):
        if role in roles:
            return algo, {role: take(role)}, flags
    return None, {}, flags


def _take_lokr(group: _Group, roles: dict, take, unused: list) -> Optional[dict]:
    has_w1 = "lokr_w1" in roles or ("lokr_w1a" in roles and "lokr_w1b" in roles)
    has_w2 = "lokr_w2" in roles or ("lokr_w2a" in roles and "lokr_w2b" in roles)
    if not (has_w1 and has_w2):
        return None
    tensors = {}
    for whole, a, b in (("lokr_w1", "lokr_w1a", "lokr_w1b"), ("lokr_w2", "lokr_w2a", "lokr_w2b")):
        if whole in roles:
            tensors[_LOKR_ROLES[whole]] = take(whole)
        else:
            tensors[_LOKR_ROLES[a]] = take(a)
            tensors[_LOKR_ROLES[b]] = take(b)
    if "lokr_t2" in roles:
        if "w2a" in tensors:
            tensors["t2"] = take("lokr_t2")
        else:
            unused.append((roles.pop("lokr_t2")[0], "lokr_t2 without lokr_w2_a/lokr_w2_b (Tucker core "
                                                    "needs the decomposed w2)"))
    return tensors


def _check_rank(group: _Group, up: torch.Tensor, down: torch.Tensor, mid: Optional[torch.Tensor],
                label: str) -> None:
    up_rank, down_rank = int(up.shape[1]) if up.ndim > 1 else -1, int(down.shape[0])
    if mid is not None:
        ok = int(mid.shape[0]) == up_rank and int(mid.shape[1]) == down_rank
    else:
        ok = up_rank == down_rank
    if not ok:
        shapes = f"up {tuple(up.shape)}, down {tuple(down.shape)}"
        if mid is not None:
            shapes += f", mid {tuple(mid.shape)}"
        raise LoraFormatError(
            f"{label}: module {group.name}: the ranks of its LoRA factors disagree ({shapes}); up must be "
            f"(out, rank, ...) and down (rank, in, ...). The file is damaged or mixes two LoRAs.")


def _scalar(tensor: torch.Tensor, group: _Group, role: str, label: str) -> float:
    if tensor.numel() != 1:
        raise LoraFormatError(f"{label}: module {group.name}: {role} should be one number but has shape "
                              f"{tuple(tensor.shape)}. The file is damaged.")
    return float(tensor.flatten()[0].item())


_LEFTOVER_REASONS = {
    "tlora": "T-LoRA (timestep-masked LyCORIS) is not supported",
    "peft_embedding": "PEFT embedding LoRA (lora_embedding_A/B) is not supported",
    "glora_bm": "GLoRA bias term bm.weight is not supported (ComfyUI ignores it too)",
    "weight": "plain .weight tensor: only valid as an (IA)^3 vector next to .on_input",
}


def _list_leftovers(module: str, roles: dict, unused: list, reason: str) -> None:
    for role, (key, _) in roles.items():
        unused.append((key, _LEFTOVER_REASONS.get(role, f"{role}: {reason}")))
    roles.clear()


# --------------------------------------------------------------------------------------------- PEFT metadata


def _alphas_from_adapter_metadata(metadata: dict) -> dict:
    """diffusers' `lora_adapter_metadata` header (LoraConfig per component): {component: config}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, TypeError):
        return {}
    configs: dict = {}
    if not isinstance(flat, dict):
        return {}
    for key, value in flat.items():
        component, _, option = key.partition(".")
        if option:
            configs.setdefault(component, {})[option] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _metadata_alpha(configs: dict, module: str, rank: int) -> Optional[float]:
    """Alpha for a module without a `.alpha` key from the saved LoraConfig (lora_alpha, alpha_pattern,
    use_rslora), expressed in kohya's alpha/rank convention."""
    if not configs:
        return None
    component, _, path = module.partition(".")
    config = configs.get(component) or configs.get("")
    if not config or "lora_alpha" not in config:
        return None
    if component not in configs:
        path = module
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(pattern, path or ""):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha = alpha * rank ** 0.5  # rsLoRA scales by alpha/sqrt(r) = (alpha*sqrt(r))/r
    return alpha


# --------------------------------------------------------------------------------------------- writer style


def detect_writer(keys: Iterable[str]) -> str:
    """The naming convention of a set of file keys: kohya, diffusers, peft, lycoris, comfyui, mixed, unknown.

    kohya = `lora_unet_/lora_te*_` names with lora_up/lora_down; lycoris = LyCORIS tensor names (hada_, lokr_,
    oft_blocks, ...) or the generic `lycoris_` prefix; peft = lora_A/lora_B; diffusers = `.lora.up`,
    `lora_linear_layer`, or the old processor form; comfyui = ComfyUI-only keys (set_weight, reshape_weight).
    """
    styles: set = set()
    for key in keys:
        split = split_key(key)
        if split is not None and split[2]:
            styles.add(split[2])
        if key.startswith("lycoris_"):
            styles.add("lycoris")
    return _writer_from_styles(styles)


def _writer_from_styles(styles: set) -> str:
    styles = set(styles)
    if "lycoris" in styles and "kohya" in styles:
        styles.discard("kohya")  # LyCORIS writes lora_up/lora_down too (LoCon / DoRA modules)
    if not styles:
        return "unknown"
    if len(styles) == 1:
        return next(iter(styles))
    if styles == {"peft", "diffusers"}:
        return "diffusers"  # convert_state_dict_to_diffusers leaves unmapped modules as lora_A/lora_B
    if "comfyui" in styles and len(styles) == 2:
        return next(iter(styles - {"comfyui"}))
    return "mixed"
