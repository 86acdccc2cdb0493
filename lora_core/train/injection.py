"""Trainable low-rank side paths hooked onto the Linear/Conv2d modules of a model that already exists.

No second copy of the base weights is made: each target module keeps its weight; its `forward` is
replaced (on the instance) by `original(x) + up(down(x)) * alpha / rank * multiplier`, the way kohya's
LoRAModule does it. `LoRANetwork.restore()` puts the original forwards back exactly.

Naming follows kohya: `lora_unet_<ldm path with _>`, `lora_te_<hf path with _>` (SD1/SD2 single
encoder) or `lora_te1_` / `lora_te2_` (SDXL). Tensor keys append `.lora_down.weight`,
`.lora_up.weight` and `.alpha`.

Targets of any family come from its module list through the host's KeyMap (`find_denoiser_targets`,
`find_key_map_te_targets`): the element kind and block of each module are the family's, the name is the one
LoRA Core's merges write for the family (lora_core.mix.output_name: kohya's `lora_unet_<canonical path _>`,
`lora_te1_` CLIP-L / `lora_te3_` T5 on Flux). `find_unet_targets` / `find_te_targets` remain for diffusers
UNets and transformers CLIPs (module paths in diffusers / HF naming).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from lora_core.arch.families import sd as _sd
from lora_core.errors import LoraFormatError, LoraValueError

# SD UNet training kinds a user can choose (LoCon adds "resnet"). "other" is every Linear/Conv2d none of the others
# names: conv_in, conv_out, the time and label embeddings (with all five kinds, every weight of rank >= 2 in the
# UNet is trained, like ComfyUI core's Train LoRA node, in kohya naming). The rules are the SD family's
# (lora_core.arch.families.sd); other families name their own kinds in their TrainSpec.
UNET_KINDS = tuple(_sd.SD_TRAIN_KINDS)
unet_kind = _sd.train_kind_of_path
_TE_RE = re.compile(r"(^|\.)layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


@dataclass
class Target:
    """One module to adapt: its kohya name, the live module, component ("unet"/"te1"/"te2"), block id, and for a
    LoRA on part of a fused weight (diffusers' to_q of a fused qkv) the output rows (start, length) it covers."""

    name: str
    module: nn.Module
    component: str
    block: str
    kind: str
    rows: Optional[tuple[int, int]] = None
    # A LoRA on a weight the model holds split in several modules that read the same input (diffusers' to_q /
    # to_k / to_v of kohya's fused img_attn.qkv): ((module, rows start in the fused weight, rows start in the
    # module, length), ...); `module` is then the first part's module. None = `module` is the whole weight.
    parts: Optional[tuple] = None
    # also train the module's bias as a full diff (`<name>.diff_b`, full_diffs.BiasDiff); a target of kind "norm"
    # is a GroupNorm / LayerNorm trained as full diffs of its weight and bias (full_diffs.NormDiff)
    bias: bool = False


class RowSlice(nn.Linear):
    """Rows `start:start + length` of a Linear, as the base of a side path that trains only those output rows
    (a part of a fused weight that trainers train as its own module). Holds no parameter: `weight` is a view of
    the live module's rows (what DoRA's magnitude and the LyCORIS deltas read)."""

    def __init__(self, base: nn.Linear, start: int, length: int):
        nn.Module.__init__(self)
        if not isinstance(base, nn.Linear) or start < 0 or length < 1 or start + length > base.out_features:
            raise LoraValueError(f"rows {start}:{start + length} are not rows of this layer "
                                 f"({getattr(base, 'out_features', '?')} outputs).")
        self._parent = (base,)
        self.start, self.length = int(start), int(length)
        self.in_features, self.out_features = base.in_features, int(length)
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self._parent[0].weight[self.start:self.start + self.length]


class FusedParts(nn.Linear):
    """The fused weight several modules hold in parts (rows of each module placed at rows of the fused weight), as
    the base of one side path: kohya's qkv over diffusers' to_q / to_k / to_v. Holds no parameter: `weight`
    assembles the live modules' rows (what DoRA's magnitude and the LyCORIS deltas read)."""

    def __init__(self, parts: tuple, out_features: int):
        nn.Module.__init__(self)
        ins = {int(module.in_features) for module, *_ in parts}
        if len(ins) != 1 or any(not isinstance(module, nn.Linear) for module, *_ in parts):
            raise LoraValueError("the parts of a fused weight must be Linear layers with the same input width.")
        self._parts = tuple(parts)
        self.in_features, self.out_features = ins.pop(), int(out_features)
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        first = self._parts[0][0].weight
        out = torch.zeros((self.out_features, self.in_features), dtype=first.dtype, device=first.device)
        for module, start, host, length in self._parts:
            out[start:start + length] = module.weight[host:host + length]
        return out


def find_unet_targets(unet: nn.Module, kinds: Iterable[str] = ("attn", "ff", "proj"),
                      blocks: Optional[Iterable[str]] = None,
                      ldm_path_of: Optional[Callable[[str], Optional[str]]] = None,
                      block_of: Optional[Callable[[str], str]] = None) -> list[Target]:
    """Every Linear/Conv2d of `unet` whose kind is in `kinds` and whose block is in `blocks` (None = all).

    `ldm_path_of` renames a module path to LDM naming (a diffusers UNet); None means the paths already are
    LDM (ComfyUI's `model.model.diffusion_model`). `block_of` gives the block id of an LDM path.
    """
    kinds = set(kinds)
    unknown = kinds - set(UNET_KINDS)
    if unknown:
        raise LoraValueError(f"Unknown UNet target kind(s) {sorted(unknown)}; choose from {list(UNET_KINDS)}.")
    wanted_blocks = None if blocks is None else set(blocks)
    if block_of is None:
        from lora_core.arch import block_of_ldm_path as block_of
    targets = []
    for path, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kind = unet_kind(path) or "other"
        if kind not in kinds:
            continue
        ldm = ldm_path_of(path) if ldm_path_of is not None else path
        name_path = ldm or path
        block = block_of(ldm) if ldm else "OTHER"
        if wanted_blocks is not None and block not in wanted_blocks:
            continue
        targets.append(Target("lora_unet_" + name_path.replace(".", "_"), module, "unet", block, kind))
    return targets


def find_te_targets(text_encoder: nn.Module, prefix: str = "lora_te", component: str = "te1") -> list[Target]:
    """The q/k/v/out projections and MLP fc1/fc2 of every CLIP layer, named like kohya
    (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`) whatever wrapper holds the encoder."""
    targets = []
    for path, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        match = _TE_RE.search(path)
        if not match:
            continue
        layer, tail = match.group(2), match.group(3)
        hf_path = f"text_model.encoder.layers.{layer}.{tail}"
        block = "TE" + component[-1]
        targets.append(Target(f"{prefix}_{hf_path.replace('.', '_')}", module, component, block, "te"))
    return targets


def find_denoiser_targets(denoiser: nn.Module, key_map, train_spec, kinds: Iterable[str],
                          blocks: Optional[Iterable[str]] = None) -> list[Target]:
    """Every Linear/Conv2d of a ComfyUI-named denoiser (module paths = the family's canonical names, e.g.
    `model.model.diffusion_model`) whose training kind (the family's `train_spec.kinds` of its element kind) is
    in `kinds` and whose block is in `blocks` (None = all), in the module order of `denoiser` (so a seed draws the
    same initial weights for the same targets). Named like the family's merges (kohya)."""
    from lora_core.mix import output_name

    kinds = set(kinds)
    known = set(train_spec.kinds) | {kind for _, kind in train_spec.path_kinds}
    unknown = kinds - known
    if unknown:
        raise LoraValueError(f"Unknown target kind(s) {sorted(unknown)} for this model; choose from "
                             f"{sorted(known)}.")
    wanted_blocks = None if blocks is None else set(blocks)
    component = key_map.denoiser
    family = key_map.arch.family if key_map.arch is not None else None
    targets = []
    for path, module in denoiser.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = key_map.module_target(component, path)
        if target is None:
            continue   # a module the family does not describe (none in SD / Flux; see the family tests)
        kind = train_spec.kind_of_target(target.path, target.kind)
        if kind is None or kind not in kinds:
            continue
        if wanted_blocks is not None and target.block not in wanted_blocks:
            continue
        names = family.train_names(target, key_map.arch, key_map.config) if family is not None else None
        if not names:
            targets.append(Target(output_name(target, key_map), module, "unet", target.block, kind))
            continue
        for name, start, rows in names:   # the family's trainers' names, one LoRA per part of a fused weight
            part = (start, rows) if rows else None
            targets.append(Target(name, module, "unet", target.block, kind, part))
    return targets


def with_norms_biases(targets: list[Target], denoiser: nn.Module, key_map,
                      blocks: Optional[Iterable[str]] = None) -> list[Target]:
    """`targets` with every bias of a whole adapted denoiser layer trained too, plus every GroupNorm / LayerNorm
    with an affine weight of the denoiser the family describes (in `blocks`, None = all) as a "norm" target:
    ComfyUI core's Train LoRA set ("every weight + norms/biases") on top of the low-rank targets. The norms come
    after the layers (their diffs start at zero and draw nothing from the seed: the layers' initial weights are
    those of the same targets without norms)."""
    from dataclasses import replace

    from lora_core.mix import output_name

    from .full_diffs import NORM_TYPES

    out = [replace(t, bias=True) if t.component == "unet" and t.rows is None and t.parts is None and
           getattr(t.module, "bias", None) is not None else t for t in targets]
    taken = {t.name for t in out}
    wanted_blocks = None if blocks is None else set(blocks)
    for path, module in denoiser.named_modules():
        if not isinstance(module, NORM_TYPES) or getattr(module, "weight", None) is None:
            continue
        target = key_map.module_target(key_map.denoiser, path)
        if target is None or (wanted_blocks is not None and target.block not in wanted_blocks):
            continue
        name = output_name(target, key_map)
        if name in taken:
            raise LoraFormatError(f"The norm {path} maps to the LoRA name {name} of another target.")
        taken.add(name)
        out.append(Target(name, module, "unet", target.block, "norm"))
    return out


def find_key_map_te_targets(encoders: nn.Module, key_map, components: Iterable[str],
                            element_kinds: Iterable[str] = ("te_attn", "te_mlp")) -> list[Target]:
    """The attention and MLP Linears (kohya's text-encoder targets: CLIP q/k/v/out/fc1/fc2, T5 q/k/v/o/wi/wo, an
    LLM's q/k/v/o and MLP projections; not a vision tower's) of
    the given text-encoder components, found through the host's KeyMap in `encoders` (ComfyUI's
    `clip.cond_stage_model`, whose state-dict keys are the key map's host keys), in layout order."""
    from lora_core.mix import output_name

    components, element_kinds = set(components), set(element_kinds)
    # an encoder's extra modules (Qwen2.5-VL's vision tower) never see a caption: nothing there could train
    extra = {c: {path for path, _ in spec.encoder.extra_modules} for c, spec in key_map.component_specs.items()
             if spec.encoder is not None}
    targets = []
    for target in key_map.targets:
        if target.component not in components or target.kind not in element_kinds or target.param != "weight":
            continue
        if target.path in extra.get(target.component, ()):
            continue
        module = encoders.get_submodule(target.host_key[: -len(".weight")])
        if not isinstance(module, nn.Linear):
            continue
        spec = key_map.component_specs.get(target.component)
        block = spec.block if spec is not None and spec.block else "TE" + target.component[2:]
        targets.append(Target(output_name(target, key_map), module, target.component, block, "te"))
    return targets


class OutOfPlaceAdds:
    """While active, the residual adds (`x += f(x)`) inside `modules` run out of place, with the same arithmetic.

    DiT blocks (ComfyUI's Flux double/single blocks) and T5 layers add their residuals in place after a norm has
    saved the same tensor for backward, which autograd rejects once a LoRA makes the stream require grad. Each
    module's floating tensor inputs enter as a tensor subclass whose `+=` returns a new tensor (every other op is
    torch's own), and its outputs leave as plain tensors."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = list(modules)
        self.handles: list = []

    def __enter__(self):
        for module in self.modules:
            self.handles.append(module.register_forward_pre_hook(_to_out_of_place, with_kwargs=True))
            self.handles.append(module.register_forward_hook(_from_out_of_place))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return False


class _OutOfPlaceTensor(torch.Tensor):
    def __iadd__(self, other):
        return torch.add(self, other)


def _wrap(value):
    if type(value) is torch.Tensor and value.is_floating_point():
        return value.as_subclass(_OutOfPlaceTensor)
    return value


def _unwrap(value):
    if isinstance(value, _OutOfPlaceTensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _to_out_of_place(module, args, kwargs):
    return tuple(_wrap(a) for a in args), {k: _wrap(v) for k, v in kwargs.items()}


def _from_out_of_place(module, args, output):
    return _unwrap(output)


class LoRASidePath(nn.Module):
    """down (kaiming-uniform, a=sqrt(5)) then up (zeros): the delta is exactly 0 at step 0, like kohya."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise LoraValueError(f"rank must be >= 1, got {rank}.")
        if isinstance(base, nn.Conv2d):
            rank = min(rank, base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels)
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            rank = min(rank, base.in_features, base.out_features)
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        self.rank = rank
        alpha = float(alpha) if alpha and alpha > 0 else float(rank)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.multiplier = 1.0
        self.reset_parameters(generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn from our generator so a
        # seed fixes the initial weights independently of the global RNG.
        fan_in = self.down.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            rand = torch.rand(self.down.weight.shape, generator=generator, dtype=torch.float32)
            self.down.weight.copy_(rand * 2 * bound - bound)
            self.up.weight.zero_()

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype if not torch.is_autocast_enabled(x.device.type) else x.dtype
        return self.up(self.down(x.to(dtype))) * (self.scale * self.multiplier)

    def file_tensors(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"{name}.lora_down.weight": self.down.weight.detach().to("cpu", dtype).clone(),
                f"{name}.lora_up.weight": self.up.weight.detach().to("cpu", dtype).clone(),
                f"{name}.alpha": self.alpha.detach().to("cpu", dtype).clone()}

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], name: str, source: str) -> None:
        with torch.no_grad():
            for part in ("down", "up"):
                saved = tensors[f"{name}.lora_{part}.weight"]
                param = getattr(self, part).weight
                if tuple(saved.shape) != tuple(param.shape):
                    raise LoraFormatError(f"{source}: {name}.lora_{part}.weight has shape {tuple(saved.shape)}, "
                                          f"this run needs {tuple(param.shape)} (different rank?). Use the same "
                                          f"rank to continue, or start a new run.")
                param.copy_(saved.to(param.dtype))
            if f"{name}.alpha" in tensors:
                self.alpha.copy_(tensors[f"{name}.alpha"].to(self.alpha.dtype))

    def weight_delta(self, device=None) -> torch.Tensor:
        """up @ down * scale in the module's weight shape (fp32)."""
        down, up = self.down.weight.float(), self.up.weight.float()
        if down.ndim == 2:
            delta = up @ down * self.scale
        else:   # conv: up is 1x1 -> delta[o, i, kh, kw] = sum_r up[o, r] down[r, i, kh, kw]
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale
        return delta if device is None else delta.to(device)


def _key(name: str) -> str:
    return name.replace(".", ":")


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's in-place version counter (None for an inference tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class SharedPath:
    """One side path's output shared by the modules that hold the parts of its fused weight.

    The modules (diffusers' to_q / to_k / to_v, or a single block's to_q / to_k / to_v / proj_mlp) are called
    apart, each on the same input tensor. The first call computes `path(x)` (LoRA: down then up over all fused
    rows; LoHa / LoKr / DoRA: the fused weight delta, applied once) and keeps it until every other part's module
    has read it; a call on another tensor (by identity and in-place version), a changed side path (a parameter's
    in-place version, the multiplier), another grad / autocast mode, or a module that has read it already computes
    anew. Gradient checkpointing's recomputation feeds new tensors, so it computes anew too. The kept output is
    dropped when the last part reads it, or by `release()` (each micro-batch's end). Same values and gradients as
    computing the path in every module: each reads the same tensor's rows, and autograd sums their gradients.
    `calls` counts the path's evaluations (for tests and profiles)."""

    def __init__(self, path: nn.Module, modules: Iterable):
        self.path = path
        self.modules = frozenset(modules)
        self.calls = 0
        self._entry: Optional[tuple] = None   # (x, x's version, state, output, modules still to read it)

    def _state(self, x: torch.Tensor) -> tuple:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype_of = getattr(torch, "get_autocast_dtype", None)   # torch >= 2.4
        return (tuple(_version(p) for p in self.path.parameters()), getattr(self.path, "multiplier", 1.0),
                torch.is_grad_enabled(), autocast, dtype_of(device) if autocast and dtype_of is not None else None)

    def __call__(self, x: torch.Tensor, module) -> torch.Tensor:
        entry, state = self._entry, self._state(x)
        if (entry is not None and entry[0] is x and module in entry[4] and entry[1] == _version(x)
                and entry[2] == state):
            entry[4].discard(module)
            if not entry[4]:
                self._entry = None
            return entry[3]
        self._entry = None
        out = self.path(x)
        self.calls += 1
        rest = set(self.modules) - {module}
        if rest:
            self._entry = (x, _version(x), state, out, rest)
        return out

    def release(self) -> None:
        self._entry = None


class LoRANetwork(nn.Module):
    """The side paths of one training run, keyed by kohya module name."""

    def __init__(self, targets: list[Target], rank: int, alpha: float, seed: int = 0,
                 conv_rank: Optional[int] = None, conv_alpha: Optional[float] = None, algorithm: str = "LoRA"):
        super().__init__()
        if not targets:
            raise LoraValueError("No module matched the chosen targets/blocks: nothing to train. Widen the "
                                 "target kinds or the block selection.")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise LoraFormatError("Two target modules map to the same LoRA name; the model naming is ambiguous.")
        from .algorithms import ALGORITHMS, make_path
        from .full_diffs import BiasDiff, NormDiff

        if algorithm not in ALGORITHMS:
            raise LoraValueError(f"algorithm {algorithm!r} is not one of {list(ALGORITHMS)}.")
        self.algorithm = algorithm
        generator = torch.Generator().manual_seed(int(seed))
        self.targets = {t.name: t for t in targets}
        self.paths = nn.ModuleDict()
        for t in targets:
            is_spatial_conv = isinstance(t.module, nn.Conv2d) and t.module.kernel_size != (1, 1)
            r = conv_rank if (is_spatial_conv and conv_rank) else rank
            a = conv_alpha if (is_spatial_conv and conv_alpha) else alpha
            if t.parts is not None:
                base = FusedParts(t.parts, t.rows[1] if t.rows is not None else
                                  max(start + length for _, start, _, length in t.parts))
            else:
                base = RowSlice(t.module, *t.rows) if t.rows is not None else t.module
            # ModuleDict keys cannot contain "." (kohya names have none; ComfyUI's generic text-encoder names do)
            if t.kind == "norm":   # full diffs of a norm's weight and bias (full_diffs.NormDiff)
                path = NormDiff(t.module)
            elif algorithm in ("LoRA", "LoCon"):
                path = LoRASidePath(base, r, a, generator)
            else:   # LyCORIS algorithms (lora_core.train.algorithms), in LyCORIS's key format
                path = make_path(algorithm, base, r, a, generator)
            self.paths[_key(t.name)] = BiasDiff(path, t.module) if t.bias else path
        self._originals: dict[str, object] = {}
        self._shared: dict[str, SharedPath] = {}   # the fused weights' shared side-path outputs (inject)

    # ------------------------------------------------------------------ hooking
    def inject(self) -> None:
        """Replace each target's forward with original + side path (idempotent)."""
        for name, target in self.targets.items():
            if name in self._originals:
                continue
            if target.parts is not None:
                self._inject_parts(name, target)
                continue
            module, path = target.module, self.path(name)
            self._originals[name] = module.__dict__.get("forward")
            original = module.forward
            rows = target.rows

            def forward(x, *args, _original=original, _path=path, _rows=rows, **kwargs):
                out = _original(x, *args, **kwargs)
                delta = _path(x).to(out.dtype)
                if _rows is not None:   # a part of a fused weight: its rows only (out of place)
                    delta = torch.nn.functional.pad(delta, (_rows[0], out.shape[-1] - _rows[0] - _rows[1]))
                return out + delta

            module.forward = forward

    def restore(self) -> None:
        """Give every module back its own forward (the instance attribute we set is removed)."""
        # newest first: several parts of one fused weight wrap the same module in turn
        for name, previous in reversed(list(self._originals.items())):
            if self.targets[name].parts is not None:   # [(module, its previous forward)] of each part's module
                for module, before in reversed(previous):
                    if before is None:
                        module.__dict__.pop("forward", None)
                    else:
                        module.forward = before
                self._shared.pop(name).release()
                continue
            module = self.targets[name].module
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._originals.clear()

    def _inject_parts(self, name: str, target: Target) -> None:
        """One side path over a weight held in parts: each part's module adds its rows of the fused delta. The
        modules are called apart on the same input tensor (diffusers' to_q / to_k / to_v of one hidden state), so
        the side path runs once per input (SharedPath): the first part computes it, the others take its rows."""
        path, saved, by_module = self.path(name), [], {}
        for module, start, host, length in target.parts:
            by_module.setdefault(id(module), (module, []))[1].append((start, host, length))
        shared = SharedPath(path, by_module)
        self._shared[name] = shared
        for key, (module, pieces) in by_module.items():
            saved.append((module, module.__dict__.get("forward")))
            original = module.forward

            def forward(x, *args, _original=original, _shared=shared, _key=key, _pieces=tuple(pieces), **kwargs):
                out = _original(x, *args, **kwargs)
                fused = _shared(x, _key).to(out.dtype)
                width = out.shape[-1]
                for start, host, length in _pieces:
                    delta = fused[..., start:start + length]
                    out = out + torch.nn.functional.pad(delta, (host, width - host - length))
                return out

            module.forward = forward
        self._originals[name] = saved

    def release(self) -> None:
        """Drop every side-path output kept for parts of a fused weight that have not read it yet (the loop calls
        this after each micro-batch, so no activation outlives its step)."""
        for shared in self._shared.values():
            shared.release()

    @property
    def injected(self) -> bool:
        return bool(self._originals)

    def set_multiplier(self, value: float) -> None:
        for path in self.paths.values():
            path.multiplier = float(value)

    # ------------------------------------------------------------------ parameters
    def param_groups(self, unet_lr: float, te_lr: Optional[float] = None,
                     block_lr: Optional[Mapping[str, float]] = None) -> list[dict]:
        """One optimizer group per (component, block) so per-block LR factors and the TE LR apply.
        Text-encoder modules are left out when `te_lr` is None (text encoder not trained)."""
        block_lr = dict(block_lr or {})
        groups: dict[tuple, dict] = {}
        for name, target in self.targets.items():
            if target.component != "unet" and te_lr is None:
                continue
            base = unet_lr if target.component == "unet" else te_lr
            factor = block_lr.get(target.block, 1.0) if target.component == "unet" else 1.0
            lr = base * factor
            if lr == 0:
                continue
            key = (target.component, target.block)
            group = groups.setdefault(key, {"params": [], "lr": lr, "name": f"{target.component}/{target.block}"})
            group["params"].extend(self.path(name).parameters())
        return list(groups.values())

    def trainable_names(self, train_te: bool) -> list[str]:
        return [n for n, t in self.targets.items() if train_te or t.component == "unet"]

    # ------------------------------------------------------------------ kohya state dict
    def kohya_state_dict(self, dtype: torch.dtype = torch.float32,
                         names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """The file's tensors: kohya's lora_down/lora_up/alpha, or LyCORIS's keys for LoHa/LoKr/DoRA."""
        out = {}
        for name in (names if names is not None else self.targets):
            out.update(self.path(name).file_tensors(name, dtype))
        return out

    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor], source: str = "state") -> None:
        """Load weights saved by `kohya_state_dict`; every module must be present with the same shapes."""
        missing = [n for n in self.targets if not any(k.startswith(n + ".") and not k.endswith(".alpha")
                                                    for k in tensors)]
        if missing:
            raise LoraFormatError(f"{source}: no weights for {len(missing)} modules of this run (e.g. {missing[:3]}). "
                                  f"The saved run used other targets/blocks/algorithm: use the same settings to "
                                  f"continue, or start a new run.")
        for name in self.targets:
            self.path(name).load_file_tensors(tensors, name, source)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The weight delta this side path adds (for merging / checks), in fp32."""
        return self.path(name).weight_delta().detach()

    def path(self, name: str) -> nn.Module:
        """The side path of the module named `name` (its file name)."""
        return self.paths[_key(name)]
