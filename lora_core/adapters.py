"""Per-algorithm LoRA math: pure tensors, no ComfyUI, no file I/O.

Every adapter is reduced to one function D(W), its change of W at strength 1 (``delta``; fp32 on W's device).
For every algorithm but OFT/BOFT the patched weight at strength s is ``W + s * D(W)``; OFT/BOFT follow
LyCORIS's multiplier, which scales the rotation itself (below). ``delta_at(module, W, s)`` gives the change at
any strength for every algorithm, ``strength_is_linear`` says which rule applies. Weight-independent adapters
(plain LoRA/LoCon, LoHa, LoKr, full, norm) ignore W; GLoRA, (IA)^3, OFT, BOFT, ``set`` and anything carrying a
DoRA magnitude depend on it.

Reference behaviour (checked against ComfyUI 0.3.75 ``comfy/weight_adapter`` and lycoris-lora 4.1.3 in
tests/test_adapters.py):

* lora  ``up @ [mid ×] down * alpha/rank`` (rank = down.shape[0]; no alpha -> scale 1), like core.
* loha  ``(w1a @ w1b) ⊙ (w2a @ w2b) * alpha/rank`` (Tucker cores t1/t2 optional), like core.
* lokr  ``kron(w1, w2) * alpha/dim``; the scale applies only when a factor is decomposed, and when both
        are, dim is w2's rank (core's rule).
* glora old and new LyCORIS formulas, told apart exactly like core (shape test, square-weight tie break).
* ia3   ``W ⊙ w`` on the output axis, or the input axis with ``flags["on_input"]``: LyCORIS's own merge
        (core has no (IA)^3).
* oft / boft  Cayley rotations of the output rows, ``D = rescale ⊙ R(W) - W``. Where core and the trainers
        disagree we follow the trainers (LyCORIS and kohya), see the notes below. Strength s is LyCORIS's
        multiplier (its modules' ``make_weight(scale=s)``): every rotation block R becomes
        ``R_s = I + s(R - I)`` and ``rescale`` is not scaled, so the patched weight is
          Diag-OFT  ``rescale ⊙ R_sᵀ W`` per block of output rows, ``= rescale ⊙ (W + s(RᵀW - W))``;
          BOFT      ``rescale ⊙ (B_m,s ∘ ⋯ ∘ B_1,s)(W)``, stage i rotating its row blocks by ``I + s(R_i - I)``.
        Without rescale Diag-OFT is linear in s (kohya's rule too); BOFT is a polynomial of degree m in s.
* full / norm  the stored diff; set  ``set_weight - W``.
* DoRA  ``D = W_dora - W`` with ``W_dora = m ⊙ (W + ΔW) / ‖W + ΔW‖``, so strength interpolates between W and
        W_dora exactly like core's ``weight_decompose``. The norm axis follows core's rule: output rows when
        ``dora_scale.shape[0] == W.shape[0]``, else input columns.

Deliberate differences from ComfyUI core 0.3.75 (each one a known core bug; we follow the trainer):

* DoRA on the output axis: core divides by ‖W‖ (the *unpatched* weight) instead of ‖W + ΔW‖ (open PR
  Comfy-Org/ComfyUI#15458). We use ‖W + ΔW‖ like LyCORIS and the DoRA paper. A 1-D ``dora_scale`` (PEFT
  magnitude vector) is reshaped to broadcast per row instead of core's accidental outer product (#12938).
* OFT/BOFT norm constraint: core clamps ‖Q‖ at ``alpha``; LyCORIS and kohya, which write these files, clamp
  at ``alpha * out_dim`` (open PR #15093). We use ``alpha * out_dim``.
* OFT ``rescale``: core loads but ignores it; LyCORIS multiplies the rotated rows by it. We apply it.
* OFT/BOFT strength: core applies strength twice, once as LyCORIS's multiplier and once more on the result
  (``core(s) = W + s·(lycoris(s) - W)``: OFT ``W + s²(R-I)ᵀW``; BOFT interpolates each stage, then scales the
  change again). We follow LyCORIS (above); all agree at strength 1 (without rescale for core's OFT).
* OFT/BOFT + DoRA: LyCORIS trains no DoRA on OFT/BOFT (its modules ignore ``dora_wd``), so these keep the DoRA
  rule, linear in strength between W and ``W_dora`` built from the strength-1 rotation diff. Core multiplies
  the rotation diff by the constraint value before normalising; we use the plain rotation diff.
* ``set`` at strength != 1: core copies set_weight regardless of strength; we interpolate (equal at 1).

One deliberate difference from LyCORIS: strength 0 (or a block factor of 0) switches any LoRA off, as the
engine skips the patch; LyCORIS's formula at multiplier 0 still multiplies the rows by ``rescale`` (``delta_at``
gives that formula, the engine does not apply it).

Optional flags: ``flags["on_input"]`` ((IA)^3 scales input channels), ``flags["oft_rotation"]`` (the OFT
blocks already are rotation matrices, as in early LyCORIS ``oft_diag`` files, so no Cayley transform).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .errors import LoraFormatError, LoraMatchError
from .types import ModuleLora

F32 = torch.float32
_EPS_F32 = torch.finfo(F32).eps
_ADDITIVE = frozenset({"lora", "loha", "lokr", "full", "norm"})
_DORA_CAPABLE = frozenset({"lora", "loha", "lokr", "glora", "oft", "boft"})


# --------------------------------------------------------------------------------------------- helpers

def _role(module: ModuleLora, role: str) -> torch.Tensor:
    tensor = module.tensors.get(role)
    if tensor is None:
        raise LoraFormatError(
            f"{module.name}: {module.algo} module has no '{role}' tensor (has {sorted(module.tensors)}); "
            f"the file is incomplete or was mis-parsed. Re-export the LoRA.")
    return tensor


def _opt_role(module: ModuleLora, role: str) -> Optional[torch.Tensor]:
    return module.tensors.get(role)


def _f32(tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    # Move first, widen second: torch converts a CPU->GPU copy on the CPU, which would send twice the bytes
    # of an fp16 factor over PCIe and spend CPU time on the conversion.
    if device is not None and tensor.device != torch.device(device):
        tensor = tensor.to(device)
    return tensor.to(dtype=F32)


def _rank_scale(alpha: Optional[float], rank: int) -> float:
    """alpha/rank, or 1 when the file has no alpha (core's rule; alpha 0 really means scale 0 there too)."""
    return 1.0 if alpha is None else float(alpha) / rank


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker-factored conv kernel: core (r1, r2, *k), wa (r1, out), wb (r2, in) -> (out, in, *k)."""
    return torch.einsum("ij...,ip,jr->pr...", core, wa, wb)


def _pad_trailing(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    return tensor.reshape(*tensor.shape, *([1] * (ndim - tensor.dim())))


def _broadcast_on_axis(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-channel vector (any shape holding one value per channel) viewed to broadcast along `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


# ------------------------------------------------------------------------------------- low-rank (lora)

def _lora_parts_on(module: ModuleLora, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up2d, down2d, alpha/rank) on `device` in the file's dtype (views of the file's tensors when already
    there); a Tucker `mid` is folded into down2d, in fp32. up2d.float() * scale @ down2d.float() = ΔW flattened."""
    up, down, mid = _role(module, "up"), _role(module, "down"), _opt_role(module, "mid")
    device = torch.device(device) if device is not None else up.device
    up2d = _as_matrix(up if up.device == device else up.to(device))
    down2d = _as_matrix(down if down.device == device else down.to(device))
    if mid is not None:
        # ΔW[o, i, *k] = Σ_{m,n} up[o, m] mid[m, n, *k] down[n, i]: contract mid with down so the
        # result stays a rank-r product (out, r) @ (r, in * k).
        down2d = torch.einsum("mn...,ni->mi...", _f32(mid, device), down2d.to(F32)).reshape(mid.shape[0], -1)
    return up2d, down2d, _rank_scale(module.alpha, down.shape[0])


def _widened(parts: tuple[torch.Tensor, torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor]:
    up2d, down2d, scale = parts
    return up2d.to(F32) * scale, down2d.to(F32)


def _lora_factors_on(module: ModuleLora, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up2d * alpha/rank, down2d) in fp32 with a Tucker `mid` folded into down2d; up2d @ down2d = ΔW flattened."""
    return _widened(_lora_parts_on(module, device))


def _lora_shape(module: ModuleLora) -> tuple[int, ...]:
    up, down, mid = _role(module, "up"), _role(module, "down"), _opt_role(module, "mid")
    up_inner = _numel(up.shape[1:])
    if mid is None:
        if up_inner != down.shape[0]:
            raise LoraFormatError(
                f"{module.name}: lora up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks; "
                f"the file is corrupt.")
        return (up.shape[0], *down.shape[1:])
    if mid.dim() < 2 or up_inner != mid.shape[0] or mid.shape[1] != down.shape[0]:
        raise LoraFormatError(
            f"{module.name}: lora up {tuple(up.shape)}, mid {tuple(mid.shape)} and down {tuple(down.shape)} "
            f"do not chain; the file is corrupt.")
    return (up.shape[0], down.shape[1], *mid.shape[2:])


def _lora_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    up2d, down2d = _lora_factors_on(module, weight.device)
    return (up2d @ down2d).reshape(weight.shape)


# ------------------------------------------------------------------------------------------------ loha

def _loha_halves(module: ModuleLora, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w1a, w1b = _f32(_role(module, "w1a"), device), _f32(_role(module, "w1b"), device)
    w2a, w2b = _f32(_role(module, "w2a"), device), _f32(_role(module, "w2b"), device)
    t1, t2 = _opt_role(module, "t1"), _opt_role(module, "t2")
    if t1 is not None and t2 is not None:
        return _tucker(_f32(t1, device), w1a, w1b), _tucker(_f32(t2, device), w2a, w2b)
    return _as_matrix(w1a) @ _as_matrix(w1b), _as_matrix(w2a) @ _as_matrix(w2b)


def _loha_shape(module: ModuleLora) -> tuple[int, ...]:
    w1a, w1b = _role(module, "w1a"), _role(module, "w1b")
    w2a, w2b = _role(module, "w2a"), _role(module, "w2b")
    t1, t2 = _opt_role(module, "t1"), _opt_role(module, "t2")
    if t1 is not None and t2 is not None:
        halves = [(wa.shape[1], wb.shape[1], *t.shape[2:]) for wa, wb, t in ((w1a, w1b, t1), (w2a, w2b, t2))]
        chains = all(t.shape[0] == wa.shape[0] and t.shape[1] == wb.shape[0]
                     for wa, wb, t in ((w1a, w1b, t1), (w2a, w2b, t2)))
    else:
        halves = [(wa.shape[0], _numel(wb.shape[1:])) for wa, wb in ((w1a, w1b), (w2a, w2b))]
        chains = all(_numel(wa.shape[1:]) == wb.shape[0] for wa, wb in ((w1a, w1b), (w2a, w2b)))
    if not chains or halves[0] != halves[1]:
        raise LoraFormatError(
            f"{module.name}: LoHa factors do not chain into two equal halves "
            f"({ {k: tuple(v.shape) for k, v in module.tensors.items()} }); the file is corrupt.")
    return halves[0]


def _loha_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    first, second = _loha_halves(module, weight.device)
    scale = _rank_scale(module.alpha, _role(module, "w1b").shape[0])
    return (first * second).mul_(scale).reshape(weight.shape)


# ------------------------------------------------------------------------------------------------ lokr

def _lokr_rank(module: ModuleLora) -> Optional[int]:
    """The rank alpha divides by: that of the decomposed factor (w2's when both are, as core does)."""
    rank = None
    if _opt_role(module, "w1") is None:
        rank = _role(module, "w1b").shape[0]
    if _opt_role(module, "w2") is None:
        rank = _role(module, "w2b").shape[0]
    return rank


def _lokr_w1(module: ModuleLora, device: torch.device) -> torch.Tensor:
    w1 = _opt_role(module, "w1")
    if w1 is not None:
        return _f32(w1, device)
    return _f32(_role(module, "w1a"), device) @ _f32(_role(module, "w1b"), device)


def _lokr_w2(module: ModuleLora, device: torch.device) -> torch.Tensor:
    w2 = _opt_role(module, "w2")
    if w2 is not None:
        return _f32(w2, device)
    w2a, w2b, t2 = _role(module, "w2a"), _role(module, "w2b"), _opt_role(module, "t2")
    if t2 is not None:
        return _tucker(_f32(t2, device), _f32(w2a, device), _f32(w2b, device))
    # A conv w2b may be stored flat (rank, in * k) or shaped (rank, in, *k); keep its trailing layout.
    product = _f32(w2a, device) @ _as_matrix(_f32(w2b, device))
    return product.reshape(w2a.shape[0], *w2b.shape[1:])


def _lokr_factor_shapes(module: ModuleLora) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w1 = _opt_role(module, "w1")
    if w1 is not None:
        w1_shape = tuple(w1.shape)
    else:
        w1a, w1b = _role(module, "w1a"), _role(module, "w1b")
        if w1a.shape[1] != w1b.shape[0]:
            raise LoraFormatError(f"{module.name}: LoKr w1a {tuple(w1a.shape)} and w1b {tuple(w1b.shape)} "
                                  f"have different ranks; the file is corrupt.")
        w1_shape = (w1a.shape[0], *w1b.shape[1:])
    w2 = _opt_role(module, "w2")
    if w2 is not None:
        return w1_shape, tuple(w2.shape)
    w2a, w2b, t2 = _role(module, "w2a"), _role(module, "w2b"), _opt_role(module, "t2")
    if t2 is not None:
        if t2.shape[0] != w2a.shape[0] or t2.shape[1] != w2b.shape[0]:
            raise LoraFormatError(f"{module.name}: LoKr t2 {tuple(t2.shape)} does not chain with w2a "
                                  f"{tuple(w2a.shape)} / w2b {tuple(w2b.shape)}; the file is corrupt.")
        return w1_shape, (w2a.shape[1], w2b.shape[1], *t2.shape[2:])
    if w2a.shape[1] != w2b.shape[0]:
        raise LoraFormatError(f"{module.name}: LoKr w2a {tuple(w2a.shape)} and w2b {tuple(w2b.shape)} "
                              f"have different ranks; the file is corrupt.")
    return w1_shape, (w2a.shape[0], *w2b.shape[1:])


def _lokr_shape(module: ModuleLora) -> tuple[int, ...]:
    w1_shape, w2_shape = _lokr_factor_shapes(module)
    ndim = max(len(w1_shape), len(w2_shape))
    w1_shape = w1_shape + (1,) * (ndim - len(w1_shape))
    w2_shape = w2_shape + (1,) * (ndim - len(w2_shape))
    return tuple(a * b for a, b in zip(w1_shape, w2_shape))


def _lokr_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    w1, w2 = _lokr_w1(module, weight.device), _lokr_w2(module, weight.device)
    ndim = max(w1.dim(), w2.dim())
    # kron pads missing dims at the front; a conv kernel's spatial dims belong at the back. torch.kron
    # fails on some non-contiguous inputs (an einsum result), hence .contiguous().
    product = torch.kron(_pad_trailing(w1, ndim).contiguous(), _pad_trailing(w2, ndim).contiguous())
    rank = _lokr_rank(module)
    scale = _rank_scale(module.alpha, rank) if rank is not None else 1.0
    return product.mul_(scale).reshape(weight.shape)


# ----------------------------------------------------------------------------------------------- glora

def _glora_form(module: ModuleLora, weight_shape) -> tuple[str, int]:
    """('old' | 'new', rank), using core's rules: the old LyCORIS layout wins only when the new layout's
    shape test also passes on a square weight whose size equals a2's first dim."""
    a1, a2, b1, b2 = (_role(module, r).shape for r in ("a1", "a2", "b1", "b2"))
    form, rank = None, None
    if b2[1] == b1[0] == a1[0] == a2[1]:
        form, rank = "old", a1[0]
    if b2[0] == b1[1] == a1[1] == a2[0]:
        square_tie = (form == "old" and len(weight_shape) >= 2 and a2[0] == weight_shape[0]
                      and weight_shape[0] == weight_shape[1])
        if not square_tie:
            form, rank = "new", a2[0]
    if form is None:
        raise LoraFormatError(
            f"{module.name}: GLoRA tensors a1 {tuple(a1)}, a2 {tuple(a2)}, b1 {tuple(b1)}, b2 {tuple(b2)} fit "
            f"neither the old nor the new LyCORIS layout; the file is corrupt or not GLoRA.")
    return form, rank


def _glora_shape_ok(module: ModuleLora, weight_shape) -> bool:
    form, _ = _glora_form(module, weight_shape)
    a1, a2, b1, b2 = (_role(module, r).shape for r in ("a1", "a2", "b1", "b2"))
    out, cols = weight_shape[0], _numel(weight_shape[1:])
    if form == "old":   # W(out, cols) @ a2(cols, r) @ a1(r, cols) + b2(out, r) @ b1(r, cols)
        return (a2[0] == cols and _numel(a1[1:]) == cols and b2[0] == out and _numel(b1[1:]) == cols)
    # new: W ×_in a1(in, r) ×_in a2(r, in) + b1(out, r) @ b2(r, in * k)
    return (len(weight_shape) >= 2 and a1[0] == weight_shape[1] and _numel(a2[1:]) == weight_shape[1]
            and b1[0] == out and _numel(b2[1:]) == cols)


def _glora_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    form, rank = _glora_form(module, weight.shape)
    a1, a2, b1, b2 = (_as_matrix(_f32(_role(module, r), weight.device)) for r in ("a1", "a2", "b1", "b2"))
    if form == "old":
        diff = (b2 @ b1).addmm_(_as_matrix(weight) @ a2, a1).reshape(weight.shape)
    else:
        # Mix W's input channels: (W ×_in a1) ×_in a2, kernel positions untouched.
        mixed = torch.einsum("oi...,ir->or...", weight, a1)
        mixed = torch.einsum("or...,ri->oi...", mixed, a2)
        diff = mixed.add_((b1 @ b2).reshape(weight.shape))
    return diff.mul_(_rank_scale(module.alpha, rank))


# ------------------------------------------------------------------------------------------------- ia3

def _ia3_axis(module: ModuleLora) -> int:
    on_input = module.flags.get("on_input", False)
    if isinstance(on_input, torch.Tensor):
        on_input = bool(on_input.item())
    return 1 if on_input else 0


def _ia3_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    # LyCORIS merges W * (1 + w) along the trained channel axis, so D(W) = W * w.
    scale = _f32(_role(module, "weight"), weight.device)
    return weight * _broadcast_on_axis(scale, _ia3_axis(module), weight.dim())


# -------------------------------------------------------------------------------------------- oft/boft

def _oft_constraint(module: ModuleLora, out_dim: int) -> float:
    """The ‖Q‖ clamp LyCORIS and kohya train with: alpha * out_dim (0 or no alpha: unconstrained)."""
    return 0.0 if not module.alpha else float(module.alpha) * out_dim


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 with Q the skew part of `blocks`, ‖Q‖ (over all blocks) clamped to `constraint`."""
    skew = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(skew) + 1e-8
        # torch.where keeps this on the device (no host sync for the comparison).
        skew = skew * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return torch.linalg.solve(eye - skew, eye + skew, left=False)


def _oft_rotation(module: ModuleLora, device: torch.device, out_dim: int) -> torch.Tensor:
    blocks = _f32(_role(module, "blocks"), device)
    if module.flags.get("oft_rotation", False):
        return blocks
    return _cayley(blocks, _oft_constraint(module, out_dim))


def _apply_rescale(module: ModuleLora, rotated: torch.Tensor) -> torch.Tensor:
    rescale = _opt_role(module, "rescale")
    if rescale is None:
        return rotated
    return rotated * _broadcast_on_axis(_f32(rescale, rotated.device), 0, rotated.dim())


def _toward_identity(rotations: torch.Tensor, strength: float) -> torch.Tensor:
    """LyCORIS's multiplier on rotation blocks: ``I + s·(R - I)`` (R itself at s = 1, I at s = 0)."""
    if strength == 1.0:
        return rotations
    eye = torch.eye(rotations.shape[-1], device=rotations.device, dtype=rotations.dtype)
    return rotations * strength + eye * (1.0 - strength)


def _oft_diff(module: ModuleLora, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """rescale ⊙ (I + s(R - I))ᵀ W per block of output rows, minus W."""
    out = weight.shape[0]
    rotation = _toward_identity(_oft_rotation(module, weight.device, out), strength)
    block_num, block_size = rotation.shape[0], rotation.shape[1]
    rows = weight.reshape(block_num, block_size, -1)
    # Row m of each block becomes Σ_n R[n, m] · row n (LyCORIS/kohya apply R on the right of the output).
    rotated = torch.matmul(rotation.transpose(1, 2), rows).reshape(weight.shape)
    return _apply_rescale(module, rotated).sub_(weight)


def _butterfly_stage(rows: torch.Tensor, rotation: torch.Tensor, span: int) -> torch.Tensor:
    """One BOFT stage on a (out, C) matrix: pair rows `span` apart into blocks, rotate each block, undo."""
    out, cols = rows.shape
    block_num, block_size = rotation.shape[0], rotation.shape[1]
    gathered = rows.reshape(-1, 2, span, cols).transpose(1, 2).reshape(block_num, block_size, cols)
    mixed = torch.matmul(rotation, gathered)
    return mixed.reshape(-1, span, 2, cols).transpose(1, 2).reshape(out, cols)


def _boft_diff(module: ModuleLora, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """rescale ⊙ (every butterfly stage i applied with blocks I + s(R_i - I)) W, minus W."""
    out = weight.shape[0]
    # (stages, block_num, b, b)
    rotations = _toward_identity(_oft_rotation(module, weight.device, out), strength)
    half = rotations.shape[-1] // 2
    rows = weight.reshape(out, -1)
    for stage in range(rotations.shape[0]):   # a handful of stages (log2 of the block count)
        rows = _butterfly_stage(rows, rotations[stage], (2 ** stage) * half)
    return _apply_rescale(module, rows.reshape(weight.shape)).sub_(weight)


def _oft_shape_ok(module: ModuleLora, weight_shape) -> bool:
    blocks = _role(module, "blocks")
    expected_ndim = 3 if module.algo == "oft" else 4
    if blocks.dim() != expected_ndim or blocks.shape[-1] != blocks.shape[-2]:
        raise LoraFormatError(
            f"{module.name}: {module.algo} blocks have shape {tuple(blocks.shape)}, expected "
            f"{expected_ndim}-D with square blocks; the file is corrupt.")
    out = weight_shape[0]
    block_num, block_size = blocks.shape[-3], blocks.shape[-1]
    if block_num * block_size != out:
        return False
    rescale = _opt_role(module, "rescale")
    if rescale is not None and rescale.numel() != out:
        return False
    if module.algo == "boft":
        half = block_size // 2
        return half > 0 and all(out % (2 * (2 ** stage) * half) == 0 for stage in range(blocks.shape[0]))
    return True


# ------------------------------------------------------------------------------------ full/norm/set

def _stored_diff(role: str) -> Callable[[ModuleLora, torch.Tensor], torch.Tensor]:
    def diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
        # copy=True: the caller may modify the result; never hand out the module's own storage.
        return _role(module, role).to(device=weight.device, dtype=F32, copy=True).reshape(weight.shape)
    return diff


def _set_diff(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    return _f32(_role(module, "set_weight"), weight.device).reshape(weight.shape) - weight


# ------------------------------------------------------------------------------------------------ DoRA

def _dora_on_output_axis(dora_scale: torch.Tensor, weight_shape) -> bool:
    return dora_scale.shape[0] == weight_shape[0]   # core's rule


def _dora_delta(dora_scale: torch.Tensor, weight: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """W_dora - W with W_dora = m * (W + ΔW) / ‖W + ΔW‖ (per output row or per input column)."""
    magnitude = _f32(dora_scale, weight.device)
    # Training differentiates through this (lora_core.train.algorithms): out of place when autograd records.
    tracked = torch.is_grad_enabled() and (diff.requires_grad or magnitude.requires_grad or weight.requires_grad)
    # every _DIFFS function returns a fresh tensor, so reuse its memory otherwise
    adapted = diff + weight if tracked else diff.add_(weight)
    if _dora_on_output_axis(magnitude, weight.shape):
        axis = 0
        norm = torch.linalg.vector_norm(adapted.reshape(adapted.shape[0], -1), dim=1)
    else:
        axis = 1
        other_dims = [d for d in range(adapted.dim()) if d != 1]
        norm = torch.linalg.vector_norm(adapted, dim=other_dims)
    norm = _broadcast_on_axis(norm, axis, adapted.dim()) + _EPS_F32
    factor = _broadcast_on_axis(magnitude, axis, adapted.dim()) / norm
    if tracked:
        return adapted * factor - weight
    adapted.mul_(factor)
    return adapted.sub_(weight)


# ---------------------------------------------------------------------------------------- public API

_DIFFS: dict[str, Callable[[ModuleLora, torch.Tensor], torch.Tensor]] = {
    "lora": _lora_diff,
    "loha": _loha_diff,
    "lokr": _lokr_diff,
    "glora": _glora_diff,
    "ia3": _ia3_diff,
    "oft": _oft_diff,
    "boft": _boft_diff,
    "full": _stored_diff("diff"),
    "norm": _stored_diff("w_norm"),
    "set": _set_diff,
}


# Algorithms whose multiplier acts inside the adapter (on the rotation), not on the finished change.
_STRENGTH_INSIDE: dict[str, Callable[[ModuleLora, torch.Tensor, float], torch.Tensor]] = {
    "oft": _oft_diff,
    "boft": _boft_diff,
}


def delta(module: ModuleLora, weight: torch.Tensor) -> torch.Tensor:
    """D(W), the change of W at strength 1: the patched weight is ``W + D(W)`` at strength 1, and
    ``W + strength * D(W)`` at any strength when `strength_is_linear(module)`; `delta_at` gives any strength
    for every algorithm.

    `weight` is the current target weight (fp32 expected; other dtypes are upcast). The result is a fresh fp32
    tensor of weight.shape on weight's device. With a DoRA magnitude, D(W) = W_dora - W.
    """
    diff_of = _DIFFS.get(module.algo)
    if diff_of is None:
        raise LoraFormatError(f"{module.name}: unknown adapter algorithm {module.algo!r}; "
                              f"supported: {', '.join(_DIFFS)}.")
    weight = weight if weight.dtype == F32 else weight.to(F32)
    diff = diff_of(module, weight)
    if module.dora_scale is None:
        return diff
    return _dora_delta(module.dora_scale, weight, diff)


def strength_is_linear(module: ModuleLora) -> bool:
    """True when the patched weight at strength s is ``W + s * delta(module, W)`` for every s: all algorithms
    but plain OFT/BOFT, whose strength is LyCORIS's multiplier on the rotation (see `delta_at`). OFT/BOFT
    with a DoRA magnitude (which LyCORIS does not train) keep the DoRA rule, linear between W and W_dora."""
    return module.algo not in _STRENGTH_INSIDE or module.dora_scale is not None


def delta_at(module: ModuleLora, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """The change of W at `strength`: the patched weight is ``W + delta_at(module, W, strength)``.

    ``strength * delta(module, W)`` for algorithms whose strength is linear; for OFT/BOFT LyCORIS's own
    multiplier (its modules' ``make_weight(scale)``): every rotation block R becomes ``I + s(R - I)`` (each
    butterfly stage for BOFT) and ``rescale`` multiplies the result unscaled, so
    ``W + delta_at = rescale ⊙ R_s(W)``. Fresh fp32 tensor of weight.shape on weight's device.
    """
    if strength_is_linear(module):
        return delta(module, weight).mul_(strength)
    weight = weight if weight.dtype == F32 else weight.to(F32)
    return _STRENGTH_INSIDE[module.algo](module, weight, float(strength))


def is_additive(module: ModuleLora) -> bool:
    """True when D does not depend on W, so patches commute and low-rank ones can be fused."""
    return module.algo in _ADDITIVE and module.dora_scale is None


def lowrank_parts(module: ModuleLora, weight_shape: torch.Size,
                  device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """What lowrank_factors is made of, before widening: (up2d, down2d, alpha/rank) in the file's dtype on
    `device` (no copy when the file's tensors are already there), so they can be kept at the file's size and
    widened when used: `up2d.float() * scale` and `down2d.float()` are exactly lowrank_factors' tensors."""
    if module.algo != "lora" or module.dora_scale is not None:
        return None
    shape = _lora_shape(module)
    if shape[0] != weight_shape[0] or _numel(shape) != _numel(weight_shape):
        return None
    return _lora_parts_on(module, device)


def lowrank_factors(module: ModuleLora, weight_shape: torch.Size,
                    device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up2d, down2d) in fp32 with alpha/rank folded into up2d, ``(up2d @ down2d).reshape(weight_shape)``
    equal to delta; None unless the module is a plain (non-DoRA) LoRA/LoCon whose delta fits weight_shape
    (see lowrank_parts, which this widens)."""
    parts = lowrank_parts(module, weight_shape, device)
    return None if parts is None else _widened(parts)


def bias_delta(module: ModuleLora, bias: torch.Tensor) -> torch.Tensor | None:
    """The bias diff (diff_b / b_norm) as fp32 of bias.shape on bias's device, or None when there is none."""
    if module.bias_diff is None:
        return None
    if module.bias_diff.numel() != bias.numel():
        raise LoraMatchError(
            f"{module.name}: bias delta has {module.bias_diff.numel()} values but the target bias has shape "
            f"{tuple(bias.shape)}; the LoRA was made for a different model.")
    return module.bias_diff.to(device=bias.device, dtype=F32, copy=True).reshape(bias.shape)


def natural_shape(module: ModuleLora) -> tuple[int, ...]:
    """The shape of the delta an adapter produces, from its own tensors (for file-only work without a model).
    For adapters that need W (GLoRA, (IA)^3, OFT) it is the shape of their defining tensor."""
    return _natural_shape_fits(module, ())[1]


def _natural_shape_fits(module: ModuleLora, weight_shape) -> tuple[bool, tuple[int, ...]]:
    """(fits, the shape the adapter produces or needs) from shapes alone."""
    algo = module.algo
    if algo in ("lora", "loha", "lokr", "full", "norm", "set"):
        if algo == "lora":
            shape = _lora_shape(module)
        elif algo == "loha":
            shape = _loha_shape(module)
        elif algo == "lokr":
            shape = _lokr_shape(module)
        else:
            shape = tuple(_role(module, {"full": "diff", "norm": "w_norm", "set": "set_weight"}[algo]).shape)
        # Same output dim and element count: allows a Linear delta on a 1x1 conv and back, refuses the rest.
        fits = (len(shape) > 0 and len(weight_shape) > 0 and shape[0] == weight_shape[0]
                and _numel(shape) == _numel(weight_shape))
        return fits, tuple(shape)
    if algo == "glora":
        return _glora_shape_ok(module, weight_shape), tuple(_role(module, "b1").shape[:1]) + tuple(
            _role(module, "b2").shape[1:])
    if algo == "ia3":
        scale = _role(module, "weight")
        axis = _ia3_axis(module)
        fits = len(weight_shape) > axis and scale.numel() == weight_shape[axis]
        return fits, tuple(scale.shape)
    if algo in ("oft", "boft"):
        return _oft_shape_ok(module, weight_shape), tuple(_role(module, "blocks").shape)
    raise LoraFormatError(f"{module.name}: unknown adapter algorithm {algo!r}; supported: {', '.join(_DIFFS)}.")


def _check_dora(module: ModuleLora, weight_shape, key: str) -> None:
    scale = module.dora_scale
    if module.algo not in _DORA_CAPABLE:
        raise LoraFormatError(
            f"{module.name}: a DoRA magnitude (dora_scale) on a {module.algo} module is not supported "
            f"(only {', '.join(sorted(_DORA_CAPABLE))}); the file is malformed.")
    if scale.dim() == 0 or len(weight_shape) < 2:
        fits = False
    elif _dora_on_output_axis(scale, weight_shape):
        fits = scale.numel() == weight_shape[0]
    else:
        fits = scale.numel() == weight_shape[1]
    if not fits:
        raise LoraMatchError(
            f"{module.name}: DoRA magnitude (dora_scale) of shape {tuple(scale.shape)} does not fit {key} with "
            f"shape {tuple(weight_shape)}; the LoRA was made for a different model. Use a LoRA trained for this "
            f"model.")


def validate(module: ModuleLora, weight_shape: torch.Size, key: str) -> None:
    """Raise LoraMatchError (naming module, key and both shapes) when the adapter cannot produce a delta of
    weight_shape, or LoraFormatError when its own tensors are inconsistent. Shape arithmetic only."""
    fits, lora_shape = _natural_shape_fits(module, weight_shape)
    if not fits:
        origin = f"{module.source}: " if module.source else ""
        raise LoraMatchError(
            f"{origin}{module.name} ({module.algo}) does not fit {key}: the LoRA's tensors give shape "
            f"{tuple(lora_shape)} but the model weight has shape {tuple(weight_shape)}. The LoRA was made for a "
            f"different model (e.g. SD1.x vs SDXL, or another text encoder); use a LoRA trained for this model.")
    if module.dora_scale is not None:
        _check_dora(module, weight_shape, key)


def delta_bound(module: ModuleLora) -> Optional[float]:
    """An upper bound of max|D| from the module's own (small) tensors, without the weight: used to tell cheaply
    that a patch cannot overflow its weight's dtype. None for adapters whose change depends on W (DoRA, OFT,
    BOFT, GLoRA, (IA)^3, set) or that are unknown."""
    if not is_additive(module):
        return None
    cached = module.__dict__.get("_delta_bound")   # a ModuleLora is read-only once parsed
    if cached is not None:
        return cached
    bound = _delta_bound(module)
    module.__dict__["_delta_bound"] = bound
    return bound


def _delta_bound(module: ModuleLora) -> float:
    def peak(role: str) -> float:
        tensor = _opt_role(module, role)
        if tensor is None or not tensor.numel():
            return 0.0
        tensor = tensor.detach()
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            tensor = tensor.float()   # fp8 factors: no min/max kernels
        low, high = torch.aminmax(tensor)   # one pass, no |tensor| copy (NaN and Inf propagate)
        return max(-float(low), float(high))

    def inner(role: str) -> int:   # the summed dimension of a factor product
        tensor = _opt_role(module, role)
        return int(tensor.shape[0]) if tensor is not None and tensor.dim() else 1

    algo = module.algo
    if algo == "lora":
        rank = inner("down")
        bound = peak("up") * peak("down") * rank * _rank_scale(module.alpha, rank)
        if _opt_role(module, "mid") is not None:
            bound *= peak("mid") * rank * _numel(_role(module, "mid").shape[2:])
        return abs(bound)
    if algo == "loha":
        rank = inner("w1b")
        halves = []
        for a, b, t in (("w1a", "w1b", "t1"), ("w2a", "w2b", "t2")):
            half = peak(a) * peak(b) * inner(b)
            if _opt_role(module, t) is not None:
                half *= peak(t) * inner(b) * _numel(_role(module, t).shape[2:])
            halves.append(half)
        return abs(halves[0] * halves[1] * _rank_scale(module.alpha, rank))
    if algo == "lokr":
        w1 = peak("w1") if _opt_role(module, "w1") is not None else peak("w1a") * peak("w1b") * inner("w1b")
        if _opt_role(module, "w2") is not None:
            w2 = peak("w2")
        else:
            w2 = peak("w2a") * peak("w2b") * inner("w2b")
            if _opt_role(module, "t2") is not None:
                w2 *= peak("t2") * inner("w2b") * _numel(_role(module, "t2").shape[2:])
        rank = _lokr_rank(module)
        scale = _rank_scale(module.alpha, rank) if rank is not None else 1.0
        return abs(w1 * w2 * scale)
    return peak({"full": "diff", "norm": "w_norm"}.get(algo, "diff"))
