"""Extract a LoRA from two checkpoints of one model: ΔW = tuned - base per weight, truncated SVD.

For every weight the base model's family knows as a LoRA target (denoiser Linear / Conv layers and the text
encoders' linears), in layout order, one at a time:

1. both tensors are read (memory-mapped for safetensors: only this weight is in memory), the change
   ``D = tuned - base`` is formed in fp32 on the compute device; a weight whose largest |D| is at most
   ``threshold`` is left out (reported as unchanged);
2. ``D`` (a conv flattened to (out, in*k*k)) is factored by its top singular directions (`top_singular`: a thin
   ``torch.linalg.svd``, or for large weights the Gram matrix + Rayleigh-Ritz); the kept rank is ``rank`` for
   linear and 1x1 layers, ``conv_rank`` for k x k convolutions (kohya's ``conv_dim``: LoCon; 0 = leave convs
   out), or, with ``target_error``, the smallest rank whose relative error ``||D - D_k||_F / ||D||_F`` is at
   most that (``rank`` / ``conv_rank`` then cap it when set);
3. the factors are stored kohya-style (``lora_down`` (r, in[, k, k]), ``lora_up`` (out, r[, 1, 1]),
   ``alpha = r``, so the scale is 1), the singular values split evenly (sqrt) between up and down.

By Eckart-Young the stored rank-k product is the best rank-k approximation of D in the Frobenius norm; the
relative error of every module is reported, with a summary per module group (component and element kind).
Parameters that changed but are no LoRA target (norms, biases, embeddings a LoRA does not adapt) are listed,
never dropped silently. Names and metadata are those of `lora_core.mix` (what kohya writes and ComfyUI,
A1111/Forge and kohya read), plus `lora_core.extract` (JSON: options and both sources).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import WeightSource, bind_source, open_checkpoint
from .errors import LoraMatchError, LoraValueError

F32 = torch.float32
# Targets left out (listed when they changed): kohya's extraction trains no embeddings either, and a rank-r SVD of
# a vocabulary table (49408 x 768) is the slowest weight of a CLIP for no use in a style LoRA.
NOT_DEFAULT_KINDS = {"te_embed": "token / position embedding of a text encoder: not a LoRA target (as in kohya's "
                                 "extraction)"}


@dataclass
class ExtractedModule:
    name: str            # output module name (kohya)
    component: str
    path: str
    block: str
    kind: str
    shape: tuple
    rank: int            # stored rank
    full_rank: int       # rank of the change (singular values above fp32 noise)
    rel_error: float     # ||D - D_k||_F / ||D||_F
    norm: float          # ||D||_F


@dataclass
class ExtractResult:
    tensors: dict
    metadata: dict
    modules: list
    arch: object
    unchanged: int = 0
    not_extracted: list = field(default_factory=list)   # (key or group, why)
    skipped: list = field(default_factory=list)          # parts of the files not read, with why
    path: Optional[str] = None
    options: dict = field(default_factory=dict)

    def groups(self) -> list[dict]:
        """Per (component, element kind): modules, ranks, relative error (max and energy-weighted overall)."""
        found: dict = {}
        for m in self.modules:
            g = found.setdefault((m.component, m.kind), {"component": m.component, "kind": m.kind, "modules": 0,
                                                        "ranks": set(), "max_rel_error": 0.0, "_err2": 0.0,
                                                        "_norm2": 0.0})
            g["modules"] += 1
            g["ranks"].add(m.rank)
            g["max_rel_error"] = max(g["max_rel_error"], m.rel_error)
            g["_err2"] += (m.rel_error * m.norm) ** 2
            g["_norm2"] += m.norm ** 2
        out = []
        for g in found.values():
            g["ranks"] = sorted(g["ranks"])
            g["rel_error"] = math.sqrt(g.pop("_err2") / g["_norm2"]) if g["_norm2"] else 0.0
            g.pop("_norm2")
            out.append(g)
        return out

    def as_dict(self) -> dict:
        return {"path": self.path, "arch": self.arch.name if self.arch is not None else None,
                "options": self.options, "modules": len(self.modules), "unchanged": self.unchanged,
                "groups": self.groups(),
                "per_module": [{"name": m.name, "block": m.block, "kind": m.kind, "rank": m.rank,
                                "full_rank": m.full_rank, "rel_error": m.rel_error, "norm": m.norm}
                               for m in self.modules],
                "not_extracted": [list(x) for x in self.not_extracted],
                "skipped": [list(x) for x in self.skipped]}

    def text(self, per_module: bool = False) -> str:
        arch = self.arch.title if self.arch is not None else "unknown"
        lines = [f"LoRA Core extract: {len(self.modules)} modules for {arch}"]
        if self.path:
            lines.append(f"  saved: {self.path}")
        opts = self.options
        lines.append("  options: " + ", ".join(f"{k} {v}" for k, v in opts.items() if v not in (None, "")))
        lines.append(f"  unchanged weights (max |change| <= threshold): {self.unchanged}")
        lines.append("  relative error ||D - D_k|| / ||D|| per module group:")
        for g in self.groups():
            ranks = g["ranks"]
            shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
            lines.append(f"    {g['component']:<11} {g['kind']:<14} {g['modules']:>4} modules, rank {shown:<9} "
                         f"error {g['rel_error']:.4%} (max {g['max_rel_error']:.4%})")
        for what, why in self.not_extracted[:20]:
            lines.append(f"  not extracted: {what}: {why}")
        if len(self.not_extracted) > 20:
            lines.append(f"  ... and {len(self.not_extracted) - 20} more not extracted")
        for what, why in self.skipped:
            lines.append(f"  not read: {what} ({why})")
        if per_module:
            for m in self.modules:
                lines.append(f"    {m.name}: rank {m.rank}/{m.full_rank}, error {m.rel_error:.4%}")
        return "\n".join(lines)

    def save(self, path, overwrite: bool = False) -> str:
        from .io import save_lora_file

        self.path = save_lora_file(path, self.tensors, self.metadata, overwrite=overwrite)
        return self.path


def _check(rank, conv_rank, threshold, target_error):
    try:
        rank = int(rank or 0)
        conv_rank = rank if conv_rank is None else int(conv_rank)
    except (TypeError, ValueError):
        raise LoraValueError(f"rank / conv_rank must be whole numbers, got {rank!r} / {conv_rank!r}.") from None
    if rank < 0 or conv_rank < 0:
        raise LoraValueError(f"rank {rank} / conv_rank {conv_rank}: use 0 or a positive rank such as 32.")
    threshold = float(threshold or 0.0)
    if not math.isfinite(threshold) or threshold < 0:
        raise LoraValueError(f"threshold is {threshold}; use 0 or a small positive number such as 1e-4.")
    if target_error is not None:
        target_error = float(target_error)
        if not (0.0 <= target_error < 1.0):
            raise LoraValueError(f"target_error is {target_error}; use a share in [0, 1), e.g. 0.05 for 5%.")
    elif rank == 0:
        raise LoraValueError("rank is 0 and no target error is set: give a rank (e.g. 32) or a target error.")
    return rank, conv_rank, threshold, target_error


def _kept_rank(s: torch.Tensor, total2: float, cap: int, target_error: Optional[float]) -> int:
    """How many singular directions to keep."""
    eps = torch.finfo(F32).eps
    significant = int((s > s[0] * max(s.numel(), 1) * eps * 4).sum()) if s.numel() else 0
    keep = max(1, significant)
    if target_error is not None:
        tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])   # tail[i] = sum_{j>=i} s_j^2
        allowed = (target_error ** 2) * total2
        # smallest k with sum_{j>=k} s_j^2 <= allowed (k = 0 .. n)
        ok = torch.nonzero(torch.cat([tail, tail.new_zeros(1)]) <= allowed * (1 + 1e-9))
        keep = min(keep, max(1, int(ok[0])))
    if cap:
        keep = min(keep, cap)
    return keep


# Below this smaller side, or when the wanted rank (plus oversampling) reaches it, a thin SVD of the whole matrix.
FAST_SVD_MIN_SIDE = 512


def top_singular(diff: torch.Tensor, rank: int):
    """(U, S, Vh) of the top singular directions of a 2-D fp32 matrix: at least `rank` of them (all of them when
    `rank` is 0 or the matrix is small: a thin `torch.linalg.svd`).

    For large matrices and rank << side: the Gram matrix ``M Mᵀ`` of the short side (one fp32 matmul) is
    diagonalised in fp64 (`eigh`); its top ``q = rank + oversampling`` eigenvectors, after one power step and a QR,
    span a subspace that holds the top singular directions to fp32 precision, and the exact SVD of the small
    projection ``Qᵀ M`` (Rayleigh-Ritz) gives them. Several times faster than the full SVD of, e.g., SD1.5's
    1280 x 23040 convolutions, and the kept rank-k product is the optimal truncation to the precision the
    bench and tests measure (see bench/extract_bench.py)."""
    m, n = diff.shape
    side = min(m, n)
    q = min(side, rank + max(16, rank // 2)) if rank else side
    if side < FAST_SVD_MIN_SIDE or q >= side:
        return torch.linalg.svd(diff, full_matrices=False)
    wide = m <= n
    M = diff if wide else diff.T
    gram = M @ M.T
    _, vectors = torch.linalg.eigh(gram.double())
    basis = vectors[:, -q:].to(diff.dtype)
    basis, _ = torch.linalg.qr(M @ (M.T @ basis))
    ub, values, vh = torch.linalg.svd(basis.T @ M, full_matrices=False)
    u = basis @ ub
    if wide:
        return u, values, vh
    return vh.T, values, u.T


def factor_difference(diff: torch.Tensor, cap: int, target_error: Optional[float] = None):
    """(up, down, kept rank, full rank, relative error, ||D||) of one change (2-D, fp32). With a target error
    the full spectrum decides (thin SVD); with a rank cap only the top directions are computed (`top_singular`)."""
    total2 = float(diff.double().square().sum())
    if total2 == 0.0:
        return None
    u, s, vh = top_singular(diff, 0 if target_error is not None else cap)
    keep = _kept_rank(s, total2, cap, target_error)
    eps = torch.finfo(F32).eps
    full_rank = int((s > s[0] * max(diff.shape) * eps).sum())
    if s.numel() == min(diff.shape):
        tail2 = float(s[keep:].double().square().sum())
    else:   # only the top directions are known: the rest of the energy is what they leave
        tail2 = max(total2 - float(s[:keep].double().square().sum()), 0.0)
        full_rank = min(diff.shape)
    rel_error = math.sqrt(max(tail2, 0.0) / total2)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], keep, full_rank, rel_error, math.sqrt(total2)


def _conv_kernel(shape) -> int:
    return int(shape[2]) if len(shape) == 4 else 0


def extract_lora(base: WeightSource, tuned: WeightSource, *, rank: int = 32, conv_rank: Optional[int] = None,
                 threshold: float = 0.0, target_error: Optional[float] = None, device=None,
                 save_dtype: Optional[torch.dtype] = None, components=None, title: Optional[str] = None,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> ExtractResult:
    """A LoRA whose change at strength 1 is the best rank-limited approximation of `tuned - base` per weight
    (see the module docstring). `components` limits the parts (e.g. ("unet",) or ("te1", "te2")); `save_dtype`
    defaults to fp16 when both sources are half precision, else fp32; `progress(i, total, name)` is called per
    weight."""
    from .mix import output_name

    rank, conv_rank, threshold, target_error = _check(rank, conv_rank, threshold, target_error)
    key_map = bind_source(base)
    tuned_map = bind_source(tuned)
    arch = key_map.arch
    if arch is not None and tuned_map.arch is not None and arch.family is not tuned_map.arch.family:
        raise LoraMatchError(f"{base.label} is {arch.title} but {tuned.label} is {tuned_map.arch.title}: extract "
                             f"from two checkpoints of one model family (the fine-tune and its base).")
    device = torch.device(device) if device is not None else torch.device("cpu")
    wanted = set(components) if components else None
    targets = [t for t in key_map.targets if wanted is None or t.component in wanted]
    # one order whatever the source's key order (a checkpoint's sorted header, a live state dict): the denoiser in
    # its family's layout order, then each text encoder by layer and path
    denoiser = [t for t in targets if not t.component.startswith("te")]
    encoders = sorted((t for t in targets if t.component.startswith("te")), key=lambda t: (t.component,
                      [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t.path)]))
    targets = denoiser + encoders
    missing = [t.host_key for t in targets if t.host_key not in tuned.shapes]
    if missing and len(missing) == len(targets):
        raise LoraMatchError(f"{tuned.label} has none of {base.label}'s weights (e.g. {missing[0]}): they are not "
                             f"two checkpoints of one model.")
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ExtractedModule] = []
    not_extracted: list = [(k, "missing in the tuned checkpoint") for k in missing]
    unchanged = 0
    dtypes = set()
    targeted = set()
    todo = [t for t in targets if t.host_key in tuned.shapes]
    for index, target in enumerate(todo):
        key = target.host_key
        targeted.add(key)
        if progress is not None:
            progress(index, len(todo), key)
        shape = tuple(base.shapes[key])
        if tuple(tuned.shapes[key]) != shape:
            raise LoraMatchError(f"{key}: shape {shape} in {base.label} but {tuple(tuned.shapes[key])} in "
                                 f"{tuned.label}: the checkpoints are different models.")
        if len(shape) not in (2, 4) or target.kind in NOT_DEFAULT_KINDS:
            b, t = base.get(key), tuned.get(key)
            if not torch.equal(b, t):
                why = (NOT_DEFAULT_KINDS.get(target.kind) or
                       f"a {len(shape)}-D weight (norm scale or vector): a LoRA stores no low-rank change for it")
                not_extracted.append((key, why))
            continue
        kernel = _conv_kernel(shape)
        cap = conv_rank if kernel > 1 else rank
        if kernel > 1 and conv_rank == 0:
            b, t = base.get(key), tuned.get(key)
            if not torch.equal(b, t):
                not_extracted.append((key, "convolution changed but conv_rank is 0 (LoCon off)"))
            continue
        b = base.get(key)
        t = tuned.get(key)
        dtypes.update((b.dtype, t.dtype))
        diff = t.to(device, F32) - b.to(device, F32)
        del b, t
        if float(diff.abs().max()) <= threshold:
            unchanged += 1
            continue
        factored = factor_difference(diff.reshape(shape[0], -1), cap, target_error)
        del diff
        if factored is None:
            unchanged += 1
            continue
        up, down, keep, full_rank, rel_error, norm = factored
        name = output_name(target, key_map, arch)
        out_dtype = save_dtype or (torch.float16 if dtypes <= {torch.float16} else F32)
        tensors[f"{name}.lora_up.weight"] = up.reshape(shape[0], keep, *([1] * (len(shape) - 2))).to("cpu", out_dtype)
        tensors[f"{name}.lora_down.weight"] = down.reshape(keep, *shape[1:]).to("cpu", out_dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(keep), dtype=out_dtype)
        modules.append(ExtractedModule(name, target.component, target.path, target.block, target.kind, shape, keep,
                                       full_rank, rel_error, norm))
    if progress is not None:
        progress(len(todo), len(todo), "")
    # Anything else that changed is no LoRA target: list it (norms, biases, embeddings, position tables).
    other_changed = _other_changes(base, tuned, targeted, wanted, key_map)
    not_extracted.extend(other_changed)
    if not tensors:
        raise LoraValueError(f"nothing to extract: no LoRA target weight differs by more than {threshold:g} between "
                             f"{base.label} and {tuned.label}. Are they the same model?")
    options = {"rank": rank, "conv_rank": conv_rank, "threshold": threshold, "target_error": target_error,
               "device": str(device)}
    result = ExtractResult(tensors, {}, modules, arch, unchanged, not_extracted, list(base.skipped), None, options)
    result.metadata = extract_metadata(result, base.label, tuned.label, title)
    return result


def _other_changes(base, tuned, targeted, wanted, key_map) -> list:
    """(key, why) for every changed parameter that is no extracted target: compared one tensor at a time."""
    out = []
    target_components = {t.host_key: t.component for t in key_map.targets}
    for key, shape in base.shapes.items():
        if key in targeted or key not in tuned.shapes:
            continue
        if wanted is not None and target_components.get(key) is not None and target_components[key] not in wanted:
            continue
        if tuple(tuned.shapes[key]) != tuple(shape):
            out.append((key, f"shape differs ({tuple(shape)} vs {tuple(tuned.shapes[key])})"))
            continue
        a, b = base.get(key), tuned.get(key)
        if a.dtype.is_floating_point and not torch.equal(a, b):
            delta = float((b.float() - a.float()).abs().max())
            out.append((key, f"changed (max |change| {delta:.3g}) but is no LoRA target (biases, norms and "
                             f"embeddings are not part of a kohya LoRA)"))
    out.extend((key, "only in the tuned checkpoint") for key in tuned.shapes if key not in base.shapes)
    return out


def extract_metadata(result: ExtractResult, base_label: str, tuned_label: str, title: Optional[str] = None) -> dict:
    spec = result.arch
    ranks = [m.rank for m in result.modules]
    dim = str(max(ranks)) if len(set(ranks)) == 1 or result.options.get("target_error") is None else "Dynamic"
    title = title or "LoRA Core extract"
    info = spec.metadata if spec is not None else {}
    convs = [m for m in result.modules if len(m.shape) == 4 and m.shape[2] > 1]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim if result.options.get("target_error") is None else "Dynamic",
        "ss_network_alpha": dim if result.options.get("target_error") is None else "Dynamic",
        "ss_v2": str(spec is not None and spec.name == "SD2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "lora_core.extract": json.dumps({
            "base": os.path.basename(str(base_label)), "tuned": os.path.basename(str(tuned_label)),
            **result.options, "groups": [{k: v for k, v in g.items()} for g in result.groups()]}),
    }
    if result.options.get("target_error") is None:
        meta["ss_network_dim"] = str(result.options["rank"])
        meta["ss_network_alpha"] = str(result.options["rank"])
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(result.options["conv_rank"]),
                                              "conv_alpha": str(result.options["conv_rank"])})
    if spec is not None:
        meta["ss_base_model_version"] = str(info.get("ss_base_model_version", ""))
        meta["modelspec.architecture"] = str(info.get("modelspec.architecture", "")) + "/lora"
        meta["modelspec.implementation"] = str(info.get("modelspec.implementation", ""))
        if info.get("ss_model_type"):
            meta["ss_model_type"] = str(info["ss_model_type"])
    return meta


def extract_files(base_path, tuned_path, **kwargs) -> ExtractResult:
    """`extract_lora` on two checkpoint files (memory-mapped)."""
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
        return extract_lora(base, tuned, **kwargs)
