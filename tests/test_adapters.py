"""lora_core.adapters against two independent references: ComfyUI 0.3.75 core's weight adapters and
lycoris-lora's own modules (the trainer that writes LoHa/LoKr/IA3/OFT/BOFT/GLoRA files).

Where core has a known bug (see the adapters.py docstring) the core parity test is restricted to the
inputs where core is right, and the trainer is the reference for the rest.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.comfy_host import import_comfy

import_comfy()
import comfy.lora  # noqa: E402
import comfy.weight_adapter as core_adapters  # noqa: E402
import lycoris.modules as lyco  # noqa: E402

from lora_core import adapters  # noqa: E402
from lora_core.engine import PatchEngine, WeightPatch, patch_weight  # noqa: E402
from lora_core.errors import LoraFormatError, LoraMatchError  # noqa: E402
from lora_core.formats import parse_modules  # noqa: E402
from lora_core.types import LoraFile, ModuleLora  # noqa: E402
from tests import lora_writers as lw  # noqa: E402

STRENGTHS = (1.0, 0.5, -0.7)
LINEAR = (64, 48)
CONV = (32, 16, 3, 3)


def rand(*shape, seed=[0], std=0.1):
    # A fresh, deterministic stream per call so every case gets distinct non-zero tensors.
    seed[0] += 1
    gen = torch.Generator().manual_seed(1000 + seed[0])
    return torch.randn(*shape, generator=gen) * std


def weight_of(shape):
    return rand(*shape, std=0.2)


def ours(module: ModuleLora, weight: torch.Tensor, strength: float) -> torch.Tensor:
    return weight + adapters.delta_at(module, weight, strength)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------------------------- core parity

def core_weight(adapter_cls, file_tensors, alpha, dora_scale, weight, strength):
    adapter = adapter_cls.load("m", {f"m.{k}": v for k, v in file_tensors.items()}, alpha, dora_scale, set())
    assert adapter is not None, f"{adapter_cls.__name__} did not recognise {sorted(file_tensors)}"
    out = adapter.calculate_weight(weight.clone(), "m.weight", strength, 1.0, None, lambda a: a, torch.float32)
    # core logs and returns the weight untouched when its math raises: make sure it really patched.
    assert not torch.equal(out, weight), "core did not patch the weight (it logged an error?)"
    return out


def lora_case(shape, alpha, mid=False, rank=4):
    if len(shape) == 2:
        up, down = rand(shape[0], rank), rand(rank, shape[1])
    elif mid:
        up, down = rand(shape[0], rank, 1, 1), rand(rank, shape[1], 1, 1)
    else:
        up, down = rand(shape[0], rank, 1, 1), rand(rank, *shape[1:])
    file = {"lora_up.weight": up, "lora_down.weight": down}
    roles = {"up": up, "down": down}
    if mid:
        file["lora_mid.weight"] = roles["mid"] = rand(rank, rank, *shape[2:])
    return core_adapters.LoRAAdapter, file, roles


def loha_case(shape, alpha, tucker=False, rank=4):
    out, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    if tucker:
        t = {"t1": rand(rank, rank, *shape[2:]), "t2": rand(rank, rank, *shape[2:])}
        w = {"w1a": rand(rank, out), "w1b": rand(rank, shape[1]), "w2a": rand(rank, out), "w2b": rand(rank, shape[1])}
    else:
        t = {}
        w = {"w1a": rand(out, rank), "w1b": rand(rank, cols), "w2a": rand(out, rank), "w2b": rand(rank, cols)}
    roles = {**w, **t}
    file = {f"hada_{k[:2]}_{k[2:]}" if k.startswith("w") else f"hada_{k}": v for k, v in roles.items()}
    return core_adapters.LoHaAdapter, file, roles


def lokr_case(variant):
    """LoKr factor layouts: w1 full|decomposed x w2 full|decomposed|tucker|flat-conv."""
    rank = 2
    if variant.startswith("linear"):   # (64, 48) = (8*8, 6*8)
        # When both halves are decomposed, give w1 another rank: core divides alpha by w2's rank then.
        rank1 = 3 if variant == "linear_both" else rank
        w1 = {"w1": rand(8, 6)} if "w1full" in variant else {"w1a": rand(8, rank1), "w1b": rand(rank1, 6)}
        w2 = {"w2": rand(8, 8)} if "w2full" in variant else {"w2a": rand(8, rank), "w2b": rand(rank, 8)}
        shape = LINEAR
    else:                               # (32, 16, 3, 3) = (4*8, 4*4, 3, 3)
        w1 = {"w1": rand(4, 4)}
        if variant == "conv_w2full":
            w2 = {"w2": rand(8, 4, 3, 3)}
        elif variant == "conv_tucker":
            w2 = {"w2a": rand(rank, 8), "w2b": rand(rank, 4), "t2": rand(rank, rank, 3, 3)}
        else:                           # conv_flat: w2b stored (rank, in * k * k)
            w2 = {"w2a": rand(8, rank), "w2b": rand(rank, 4 * 9)}
        shape = CONV
    roles = {**w1, **w2}
    file = {"lokr_" + (k if len(k) == 2 else f"{k[:2]}_{k[2:]}"): v for k, v in roles.items()}
    return core_adapters.LoKrAdapter, file, roles, shape


def glora_case(shape, old=False, rank=4):
    out, inp = shape[0], shape[1]
    if old:
        roles = {"a1": rand(rank, inp), "a2": rand(inp, rank), "b1": rand(rank, inp), "b2": rand(out, rank)}
    elif len(shape) == 2:
        roles = {"a1": rand(inp, rank), "a2": rand(rank, inp), "b1": rand(out, rank), "b2": rand(rank, inp)}
    else:
        roles = {"a1": rand(inp, rank, 1, 1), "a2": rand(rank, inp, 1, 1), "b1": rand(out, rank, 1, 1),
                 "b2": rand(rank, *shape[1:])}
    return core_adapters.GLoRAAdapter, {f"{k}.weight": v for k, v in roles.items()}, roles


def core_cases():
    """(id, adapter class, file tensors, our roles, algo, alpha, weight shape, dora axis, strengths)."""
    cases = []
    for shape_name, shape in (("linear", LINEAR), ("conv", CONV)):
        for alpha in (2.0, None):
            cls, file, roles = lora_case(shape, alpha)
            cases.append((f"lora-{shape_name}-alpha{alpha}", cls, file, roles, "lora", alpha, shape, None))
        cls, file, roles = loha_case(shape, 3.0)
        cases.append((f"loha-{shape_name}", cls, file, roles, "loha", 3.0, shape, None))
        cls, file, roles = glora_case(shape)
        cases.append((f"glora-new-{shape_name}", cls, file, roles, "glora", 2.0, shape, None))
        for dora_cls, dora_algo, make in (("lora", "lora", lora_case), ("loha", "loha", loha_case)):
            cls, file, roles = make(shape, 2.0)
            cases.append((f"dora-in-{dora_cls}-{shape_name}", cls, file, roles, dora_algo, 2.0, shape, "in"))
    cls, file, roles = lora_case(CONV, 4.0, mid=True)
    cases.append(("lora-tucker-mid", cls, file, roles, "lora", 4.0, CONV, None))
    cls, file, roles = loha_case(CONV, 3.0, tucker=True)
    cases.append(("loha-tucker", cls, file, roles, "loha", 3.0, CONV, None))
    # LoKr with a Tucker t2 is checked against LyCORIS only: core 0.3.75 under torch 2.14 logs an error and
    # skips it (torch.kron rejects its non-contiguous einsum result).
    for variant in ("linear_w1full_w2full", "linear_w1full", "linear_w2full", "linear_both",
                    "conv_w2full", "conv_flat"):
        cls, file, roles, shape = lokr_case(variant)
        cases.append((f"lokr-{variant}", cls, file, roles, "lokr", 1.5, shape, None))
    cls, file, roles, shape = lokr_case("linear_both")
    cases.append(("dora-in-lokr-linear", cls, file, roles, "lokr", 1.5, shape, "in"))
    cls, file, roles, shape = lokr_case("conv_flat")
    cases.append(("dora-in-lokr-conv", cls, file, roles, "lokr", 1.5, shape, "in"))
    cls, file, roles = glora_case(LINEAR, old=True)
    cases.append(("glora-old-linear", cls, file, roles, "glora", 2.0, LINEAR, None))
    cls, file, roles = glora_case(LINEAR)
    cases.append(("dora-in-glora-linear", cls, file, roles, "glora", 2.0, LINEAR, "in"))
    return cases


@pytest.mark.parametrize("case", core_cases(), ids=lambda c: c[0])
def test_parity_with_core_weight_adapters(case):
    _, cls, file, roles, algo, alpha, shape, dora_axis = case
    weight = weight_of(shape)
    dora = None
    if dora_axis == "in":   # LyCORIS input-axis layout (1, in, 1, ...): core's input-axis path is correct
        dora = (weight.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
                * (1 + rand(shape[1]))).reshape(1, shape[1], *[1] * (len(shape) - 2))
    module = ModuleLora("m", algo, dict(roles), alpha=alpha, dora_scale=dora)
    adapters.validate(module, torch.Size(shape), "m.weight")
    for strength in STRENGTHS:
        assert_close(ours(module, weight, strength), core_weight(cls, file, alpha, dora, weight, strength))


def oft_blocks(block_num, block_size, stages=None):
    shape = (block_num, block_size, block_size) if stages is None else (stages, block_num, block_size, block_size)
    return rand(*shape, std=0.05)


OFT_MULTIPLIERS = (1.0, 0.5, -0.7, 1.3)


def assert_core_scales_our_change_again(module, core_cls, file, alpha, weight):
    """Core equals us at strength 1; at strength s it applies s once more on top of the trainer's multiplier:
    core(s) = W + s * (ours(s) - W) (OFT: W + s²(R - I)ᵀW; BOFT: s times the stage-interpolated change)."""
    for strength in OFT_MULTIPLIERS:
        expected = core_weight(core_cls, file, alpha, None, weight, strength)
        if strength == 1.0:
            assert_close(ours(module, weight, 1.0), expected)
        else:
            assert_close(expected - weight, strength * (ours(module, weight, strength) - weight))
            assert not torch.allclose(ours(module, weight, strength), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("alpha", [None, 1e3], ids=["no-constraint", "inactive-constraint"])
def test_oft_parity_with_core(shape, alpha):
    # Core and the trainers agree at strength 1 when the constraint does not bite and there is no rescale (core
    # ignores it); at other strengths core applies the strength twice (see adapters.py).
    blocks = oft_blocks(8, shape[0] // 8)
    weight = weight_of(shape)
    module = ModuleLora("m", "oft", {"blocks": blocks}, alpha=alpha)
    assert_core_scales_our_change_again(module, core_adapters.OFTAdapter, {"oft_blocks": blocks}, alpha, weight)


@pytest.mark.parametrize("shape,block_size,stages", [(LINEAR, 8, 2), (CONV, 4, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("rescaled", [False, True])
def test_boft_parity_with_core(shape, block_size, stages, rescaled):
    blocks = oft_blocks(shape[0] // block_size, block_size, stages)
    file, roles = {"oft_blocks": blocks}, {"blocks": blocks}
    if rescaled:
        file["rescale"] = roles["rescale"] = 1 + rand(shape[0], *[1] * (len(shape) - 1))
    weight = weight_of(shape)
    module = ModuleLora("m", "boft", roles, alpha=0.0)
    assert_core_scales_our_change_again(module, core_adapters.BOFTAdapter, file, 0.0, weight)


def core_tuple_patch(patch, weight, strength):
    return comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], weight.clone(), "m.weight")


@pytest.mark.parametrize("algo,shape", [("full", LINEAR), ("full", CONV), ("norm", (64,))])
def test_full_and_norm_parity_with_core(algo, shape):
    diff, weight = rand(*shape), weight_of(shape)
    module = ModuleLora("m", algo, {"diff" if algo == "full" else "w_norm": diff})
    for strength in STRENGTHS:
        assert_close(ours(module, weight, strength), core_tuple_patch(("diff", (diff,)), weight, strength))


def test_set_parity_with_core_and_interpolation():
    new, weight = rand(*LINEAR), weight_of(LINEAR)
    module = ModuleLora("m", "set", {"set_weight": new})
    assert_close(ours(module, weight, 1.0), core_tuple_patch(("set", (new,)), weight, 1.0))
    # core ignores strength for "set"; ours interpolates linearly between W and set_weight.
    assert_close(ours(module, weight, 0.25), 0.75 * weight + 0.25 * new)


def test_core_output_axis_dora_divides_by_unpatched_norm():
    """Pins the core bug we deliberately do not copy (Comfy-Org/ComfyUI#15458): on the output axis core
    normalises by ||W||, the DoRA paper and LyCORIS by ||W + dW||. Our output-axis math is checked against
    LyCORIS in test_dora_output_axis_matches_lycoris."""
    cls, file, roles = lora_case(LINEAR, 2.0)
    weight = weight_of(LINEAR)
    dora = weight.norm(dim=1, keepdim=True) * (1 + rand(64, 1))
    module = ModuleLora("m", "lora", dict(roles), alpha=2.0, dora_scale=dora)
    plain = adapters.delta(ModuleLora("m", "lora", dict(roles), alpha=2.0), weight)
    eps = torch.finfo(torch.float32).eps
    core_formula = (weight + plain) * dora / (weight.norm(dim=1, keepdim=True) + eps)
    assert_close(core_weight(cls, file, 2.0, dora, weight, 1.0), core_formula)
    paper = (weight + plain) * dora / ((weight + plain).norm(dim=1, keepdim=True) + eps)
    assert_close(ours(module, weight, 1.0), paper)
    assert not torch.allclose(paper, core_formula, rtol=1e-4, atol=1e-5)


def test_peft_style_1d_dora_scale_broadcasts_per_row():
    # A 1-D magnitude (PEFT's lora_magnitude_vector) on a non-square weight: per output row, like (out, 1).
    _, _, roles = lora_case(LINEAR, 2.0)
    weight = weight_of(LINEAR)
    magnitude = weight.norm(dim=1) * (1 + rand(64))
    one_d = ModuleLora("m", "lora", dict(roles), alpha=2.0, dora_scale=magnitude)
    two_d = ModuleLora("m", "lora", dict(roles), alpha=2.0, dora_scale=magnitude.reshape(64, 1))
    adapters.validate(one_d, torch.Size(LINEAR), "m.weight")
    assert_close(adapters.delta(one_d, weight), adapters.delta(two_d, weight))


# --------------------------------------------------------------------------------- LyCORIS parity

def randomize(module: nn.Module) -> None:
    """LyCORIS zero-initialises one factor; give every adapter parameter random non-zero values."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name == "dora_scale":
                param.mul_(1 + rand(*param.shape).abs())
            elif name == "rescale":
                param.copy_(1 + rand(*param.shape))
            else:
                param.copy_(rand(*param.shape, std=0.2 if "oft" not in name else 0.05))


def layer(shape):
    torch.manual_seed(7)
    if len(shape) == 2:
        base = nn.Linear(shape[1], shape[0], bias=False)
    else:
        base = nn.Conv2d(shape[1], shape[0], shape[2], padding=1, bias=False)
    with torch.no_grad():
        base.weight.copy_(weight_of(shape))
    return base


def apply_weight(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, padding=1)


def lyco_input(shape):
    return rand(5, shape[1]) if len(shape) == 2 else rand(2, shape[1], 6, 6)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def from_locon(sd):
    roles = {"up": sd["lora_up.weight"], "down": sd["lora_down.weight"]}
    if "lora_mid.weight" in sd:
        roles["mid"] = sd["lora_mid.weight"]
    return ModuleLora("m", "lora", roles, alpha=float(sd["alpha"]), dora_scale=sd.get("dora_scale"))


def from_loha(sd):
    roles = {k: sd[f"hada_{k[:2]}_{k[2:]}"] for k in ("w1a", "w1b", "w2a", "w2b")}
    roles.update({k: sd[f"hada_{k}"] for k in ("t1", "t2") if f"hada_{k}" in sd})
    return ModuleLora("m", "loha", roles, alpha=float(sd["alpha"]), dora_scale=sd.get("dora_scale"))


def from_lokr(sd):
    names = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2",
             "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2"}
    roles = {role: sd[key] for role, key in names.items() if key in sd}
    return ModuleLora("m", "lokr", roles, alpha=float(sd["alpha"]), dora_scale=sd.get("dora_scale"))


LYCO_FORWARD_CASES = [
    ("locon-linear", lyco.LoConModule, LINEAR, dict(lora_dim=4, alpha=2), from_locon),
    ("locon-conv", lyco.LoConModule, CONV, dict(lora_dim=4, alpha=2), from_locon),
    ("locon-tucker", lyco.LoConModule, CONV, dict(lora_dim=4, alpha=3, use_tucker=True), from_locon),
    ("loha-linear", lyco.LohaModule, LINEAR, dict(lora_dim=4, alpha=2), from_loha),
    ("loha-conv", lyco.LohaModule, CONV, dict(lora_dim=4, alpha=2), from_loha),
    ("loha-tucker", lyco.LohaModule, CONV, dict(lora_dim=4, alpha=3, use_tucker=True), from_loha),
    ("lokr-linear", lyco.LokrModule, LINEAR, dict(lora_dim=2, alpha=1.5, factor=8), from_lokr),
    ("lokr-linear-both", lyco.LokrModule, LINEAR, dict(lora_dim=2, alpha=1.5, factor=8, decompose_both=True),
     from_lokr),
    ("lokr-conv-tucker", lyco.LokrModule, CONV, dict(lora_dim=2, alpha=1.5, factor=4, use_tucker=True), from_lokr),
    ("lokr-conv-flat", lyco.LokrModule, CONV, dict(lora_dim=2, alpha=1.5, factor=4), from_lokr),
]


@pytest.mark.parametrize("case", LYCO_FORWARD_CASES, ids=lambda c: c[0])
def test_parity_with_lycoris_forward(case):
    """LyCORIS's (non-bypass) forward is what the adapter was trained with: output(x) with the merged weight."""
    _, module_cls, shape, kwargs, convert = case
    base = layer(shape)
    net = module_cls("m", base, multiplier=1.0, bypass_mode=False, **kwargs)
    randomize(net)
    module = convert(state(net))
    x = lyco_input(shape)
    weight = base.weight.detach()
    with torch.no_grad():
        for multiplier in (1.0, 0.5):
            net.multiplier = multiplier
            assert_close(apply_weight(base, ours(module, weight, multiplier), x), net(x))


@pytest.mark.parametrize("module_cls,convert,kwargs", [
    (lyco.LoConModule, from_locon, dict(lora_dim=4, alpha=2)),
    (lyco.LohaModule, from_loha, dict(lora_dim=4, alpha=2)),
    (lyco.LokrModule, from_lokr, dict(lora_dim=2, alpha=1.5, factor=8, decompose_both=True)),
], ids=["lora", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out-axis", "in-axis"])
@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
def test_dora_matches_lycoris(module_cls, convert, kwargs, wd_on_out, shape):
    if module_cls is lyco.LokrModule and len(shape) == 4:
        kwargs = dict(lora_dim=2, alpha=1.5, factor=4, use_tucker=True)
    base = layer(shape)
    net = module_cls("m", base, multiplier=1.0, bypass_mode=False, weight_decompose=True, wd_on_out=wd_on_out,
                     **kwargs)
    randomize(net)
    module = convert(state(net))
    assert module.dora_scale is not None
    x = lyco_input(shape)
    with torch.no_grad():   # LyCORIS interpolates DoRA differently at other multipliers; we follow core there
        assert_close(apply_weight(base, ours(module, base.weight.detach(), 1.0), x), net(x))


@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True], ids=["out", "in"])
def test_ia3_matches_lycoris(shape, on_input):
    base = layer(shape)
    net = lyco.IA3Module("m", base, train_on_input=on_input)
    randomize(net)
    sd = state(net)
    assert bool(sd["on_input"]) == on_input
    module = ModuleLora("m", "ia3", {"weight": sd["weight"]}, flags={"on_input": sd["on_input"]})
    adapters.validate(module, base.weight.shape, "m.weight")
    with torch.no_grad():
        for multiplier in (1.0, 0.5, -0.7):
            expected, _ = net.get_merged_weight(multiplier=multiplier)
            assert_close(ours(module, base.weight.detach(), multiplier), expected)


def oft_from_lycoris(algo: str, sd: dict) -> ModuleLora:
    roles = {"blocks": sd["oft_blocks"]}
    if "rescale" in sd:
        roles["rescale"] = sd["rescale"]
    return ModuleLora("m", algo, roles, alpha=float(sd["alpha"]))


def change_error(actual, expected, weight) -> float:
    """Max error relative to the largest change of the weight (a tolerance on W alone could hide a wrong
    formula when the change is small, as under a biting constraint)."""
    return ((actual - expected).abs().max() / (expected - weight).abs().max()).item()


def assert_merged_like_lycoris(net, module, weight):
    """Ours at each multiplier equals LyCORIS's merged weight (its make_weight(scale=multiplier))."""
    with torch.no_grad():
        for multiplier in OFT_MULTIPLIERS:
            expected, _ = net.get_merged_weight(multiplier=multiplier)
            actual = ours(module, weight, multiplier)
            assert_close(actual, expected)
            assert change_error(actual, expected, weight) < 1e-4, multiplier


@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("constraint", [0.0, 1e-3], ids=["free", "constrained"])
@pytest.mark.parametrize("rescaled", [False, True], ids=["plain", "rescaled"])
def test_diag_oft_matches_lycoris(shape, constraint, rescaled):
    base = layer(shape)
    net = lyco.DiagOFTModule("m", base, lora_dim=8 if len(shape) == 2 else 4, constraint=constraint,
                             rescaled=rescaled, bypass_mode=False)
    randomize(net)
    module = oft_from_lycoris("oft", state(net))
    weight = base.weight.detach()
    assert_merged_like_lycoris(net, module, weight)
    if constraint:   # the clamp bites here: core (which clamps at alpha, not alpha*out_dim) would differ
        unclamped = ModuleLora("m", "oft", dict(module.tensors), alpha=None)
        assert not torch.allclose(adapters.delta(module, weight), adapters.delta(unclamped, weight), atol=1e-4)


@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("constraint", [0.0, 1e-3], ids=["free", "constrained"])
@pytest.mark.parametrize("rescaled", [False, True], ids=["plain", "rescaled"])
def test_boft_matches_lycoris(shape, constraint, rescaled):
    base = layer(shape)
    net = lyco.ButterflyOFTModule("m", base, lora_dim=8 if len(shape) == 2 else 4, constraint=constraint,
                                  rescaled=rescaled, bypass_mode=False)
    randomize(net)
    sd = state(net)
    assert sd["oft_blocks"].dim() == 4 and sd["oft_blocks"].shape[0] > 1
    assert_merged_like_lycoris(net, oft_from_lycoris("boft", sd), base.weight.detach())


class TwoLayers(nn.Module):
    """A Linear and a 3x3 conv with biases: the layer kinds OFT/BOFT adapt in a UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.proj = nn.Linear(48, 64)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)


WRAPPER_CASES = [(algo, constraint, rescaled) for algo in ("diag-oft", "boft")
                 for constraint in (0.0, 0.01) for rescaled in (False, True)]


@pytest.mark.parametrize("algo,constraint,rescaled", WRAPPER_CASES,
                         ids=[f"{a}-{'constrained' if c else 'free'}-{'rescaled' if r else 'plain'}"
                              for a, c, r in WRAPPER_CASES])
def test_oft_multiplier_matches_lycoris_wrapper(algo, constraint, rescaled):
    """A model wrapped by LyCORIS's own network (create_lycoris) at multiplier s, against the same model
    patched by our engine from the LyCORIS state dict at strength s: merged weights and layer outputs."""
    wrapped = TwoLayers()
    patched = TwoLayers()   # same seed: the same weights, patched by us
    network = lw.lycoris_network(wrapped, algo, prefix="lycoris", rank=4, seed=5, constraint=constraint,
                                 rescaled=rescaled)
    network.eval()
    lycoris_of = {lora.lora_name: lora for lora in network.loras}
    assert sorted(lycoris_of) == ["lycoris_conv", "lycoris_proj"]
    parsed = parse_modules(LoraFile(None, state(network)))
    modules = {name: parsed.modules[f"lycoris_{name}"] for name in ("proj", "conv")}
    for name, module in modules.items():
        assert module.algo == ("oft" if algo == "diag-oft" else "boft")
        assert ("rescale" in module.tensors) is rescaled
        if constraint:   # the clamp really bites on every layer
            lora = lycoris_of[f"lycoris_{name}"]
            assert torch.linalg.vector_norm(lora.oft_blocks - lora.oft_blocks.transpose(-1, -2)) > lora.constraint
    originals = {name: getattr(TwoLayers(), name).weight.detach() for name in modules}
    inputs = {"proj": rand(5, 48), "conv": rand(2, 16, 6, 6)}
    engine = PatchEngine.for_module(patched)
    for multiplier in OFT_MULTIPLIERS:
        network.set_multiplier(multiplier)
        engine.apply({f"{name}.weight": [WeightPatch(module, multiplier)] for name, module in modules.items()})
        with torch.no_grad():
            for name in modules:
                ours_weight = getattr(patched, name).weight
                expected, _ = lycoris_of[f"lycoris_{name}"].get_merged_weight(multiplier=multiplier)
                assert_close(ours_weight, expected)
                assert change_error(ours_weight, expected, originals[name]) < 1e-5, (name, multiplier)
                x = inputs[name]
                assert_close(getattr(patched, name)(x), getattr(wrapped, name)(x))   # LyCORIS's own forward
    network.restore()


@pytest.mark.parametrize("module_cls,algo", [(lyco.DiagOFTModule, "oft"), (lyco.ButterflyOFTModule, "boft")],
                         ids=["diag-oft", "boft"])
def test_oft_strength_zero_is_off_where_lycoris_would_still_rescale(module_cls, algo):
    """Strength 0 (or a block factor of 0) switches a LoRA off for every algorithm. LyCORIS's formula at
    multiplier 0 still multiplies the rows by `rescale`; the engine deliberately does not (README)."""
    base = layer(LINEAR)
    net = module_cls("m", base, lora_dim=8, rescaled=True, bypass_mode=False)
    randomize(net)
    module = oft_from_lycoris(algo, state(net))
    weight = base.weight.detach()
    assert torch.equal(patch_weight(weight.clone(), [WeightPatch(module, 0.0)]), weight)
    with torch.no_grad():
        at_zero, _ = net.get_merged_weight(multiplier=0.0)
    assert_close(at_zero, weight * module.tensors["rescale"])
    assert not torch.allclose(at_zero, weight, atol=1e-3)
    assert_close(ours(module, weight, 0.0), at_zero)   # delta_at itself is LyCORIS's formula


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_oft_dora_keeps_the_linear_dora_rule(algo):
    """LyCORIS trains no DoRA on OFT/BOFT (its modules ignore dora_wd), so there is no trainer multiplier to
    follow: an OFT/BOFT module with a dora_scale keeps the DoRA rule, W + s * (W_dora - W), W_dora normalising the
    rotated weight (strength 1)."""
    wrapped = TwoLayers()
    network = lw.lycoris_network(wrapped, algo, prefix="lycoris", rank=4, dora=True)
    sd = state(network)
    network.restore()
    assert sd and not any(key.endswith("dora_scale") for key in sd)
    plain = oft_from_lycoris("oft" if algo == "diag-oft" else "boft",
                             {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("lycoris_proj.")})
    weight = wrapped.proj.weight.detach()
    magnitude = weight.norm(dim=1, keepdim=True) * (1 + rand(64, 1))
    module = ModuleLora("m", plain.algo, dict(plain.tensors), alpha=plain.alpha, dora_scale=magnitude)
    assert adapters.strength_is_linear(module) and not adapters.strength_is_linear(plain)
    rotated = weight + adapters.delta(plain, weight)
    dora = magnitude * rotated / (rotated.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    for strength in OFT_MULTIPLIERS:
        expected = weight + strength * (dora - weight)
        assert_close(patch_weight(weight.clone(), [WeightPatch(module, strength)]), expected)
        assert_close(ours(module, weight, strength), expected)


@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
def test_glora_matches_lycoris(shape):
    base = layer(shape)
    net = lyco.GLoRAModule("m", base, lora_dim=4, alpha=2, bypass_mode=False)
    randomize(net)
    sd = state(net)
    module = ModuleLora("m", "glora", {k: sd[f"{k}.weight"] for k in ("a1", "a2", "b1", "b2")},
                        alpha=float(sd["alpha"]))
    with torch.no_grad():
        for multiplier in (1.0, -0.7):
            expected, _ = net.get_merged_weight(multiplier=multiplier)
            assert_close(ours(module, base.weight.detach(), multiplier), expected)


# ----------------------------------------------------------------------------- engine-facing helpers

@pytest.mark.parametrize("shape,mid", [(LINEAR, False), (CONV, False), (CONV, True)],
                         ids=["linear", "locon", "tucker"])
@pytest.mark.parametrize("alpha", [2.0, None])
def test_lowrank_factors_reproduce_delta(shape, mid, alpha):
    _, _, roles = lora_case(shape, alpha, mid=mid)
    module = ModuleLora("m", "lora", roles, alpha=alpha)
    up, down = adapters.lowrank_factors(module, torch.Size(shape))
    assert up.dtype == down.dtype == torch.float32 and up.shape[1] == down.shape[0] == 4
    weight = weight_of(shape)
    assert_close((up @ down).reshape(shape), adapters.delta(module, weight))


def test_lowrank_factors_not_applicable():
    _, _, roles = lora_case(LINEAR, 2.0)
    dora = ModuleLora("m", "lora", dict(roles), alpha=2.0, dora_scale=torch.ones(1, 48))
    assert adapters.lowrank_factors(dora, torch.Size(LINEAR)) is None
    _, _, loha_roles = loha_case(LINEAR, 2.0)
    assert adapters.lowrank_factors(ModuleLora("m", "loha", loha_roles, alpha=2.0), torch.Size(LINEAR)) is None


def test_is_additive_per_algorithm():
    additive = {"lora": True, "loha": True, "lokr": True, "full": True, "norm": True,
                "glora": False, "ia3": False, "oft": False, "boft": False, "set": False}
    for algo, expected in additive.items():
        assert adapters.is_additive(ModuleLora("m", algo, {})) is expected, algo
    for algo in ("lora", "loha", "lokr"):
        assert not adapters.is_additive(ModuleLora("m", algo, {}, dora_scale=torch.ones(4, 1)))


def test_strength_is_linear_for_every_algorithm_but_oft_and_boft():
    for algo in ("lora", "loha", "lokr", "glora", "ia3", "full", "norm", "set"):
        assert adapters.strength_is_linear(ModuleLora("m", algo, {})), algo
    for algo in ("oft", "boft"):
        assert not adapters.strength_is_linear(ModuleLora("m", algo, {})), algo
        assert adapters.strength_is_linear(ModuleLora("m", algo, {}, dora_scale=torch.ones(4, 1))), algo
    _, _, roles = loha_case(LINEAR, 2.0)
    loha, weight = ModuleLora("m", "loha", roles, alpha=2.0), weight_of(LINEAR)
    assert torch.equal(adapters.delta_at(loha, weight, -0.7), -0.7 * adapters.delta(loha, weight))


def test_additive_deltas_ignore_weight_and_weight_dependent_do_not():
    weight_a, weight_b = weight_of(LINEAR), weight_of(LINEAR)
    _, _, roles = loha_case(LINEAR, 2.0)
    loha = ModuleLora("m", "loha", roles, alpha=2.0)
    assert_close(adapters.delta(loha, weight_a), adapters.delta(loha, weight_b))
    _, _, groles = glora_case(LINEAR)
    glora = ModuleLora("m", "glora", groles, alpha=2.0)
    assert not torch.allclose(adapters.delta(glora, weight_a), adapters.delta(glora, weight_b))


def test_delta_is_fp32_on_weight_device_and_does_not_alias_inputs():
    diff = rand(*LINEAR)
    module = ModuleLora("m", "full", {"diff": diff})
    weight = weight_of(LINEAR)
    out = adapters.delta(module, weight)
    assert out.dtype == torch.float32 and out.shape == weight.shape
    out.mul_(0)
    assert diff.abs().sum() > 0, "delta returned the module's own storage"
    half = ModuleLora("m", "lora", {k: v.half() for k, v in lora_case(LINEAR, 2.0)[2].items()}, alpha=2.0)
    assert adapters.delta(half, weight).dtype == torch.float32


def test_bias_delta():
    bias = rand(64)
    diff_b = rand(64)
    module = ModuleLora("m", "full", {"diff": rand(*LINEAR)}, bias_diff=diff_b)
    assert_close(adapters.bias_delta(module, bias), diff_b)
    assert adapters.bias_delta(ModuleLora("m", "lora", {}), bias) is None
    with pytest.raises(LoraMatchError, match="m"):
        adapters.bias_delta(module, rand(32))


def test_validate_refuses_wrong_width_cross_attention_lora():
    # An SDXL cross-attention to_k LoRA (context 2048) on an SD1.x to_k (640 x 768).
    module = ModuleLora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora",
                        {"up": torch.zeros(640, 8), "down": torch.zeros(8, 2048)}, alpha=8.0)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(LoraMatchError) as err:
        adapters.validate(module, torch.Size([640, 768]), key)
    message = str(err.value)
    for fragment in (module.name, key, "(640, 2048)", "(640, 768)"):
        assert fragment in message
    adapters.validate(module, torch.Size([640, 2048]), key)


@pytest.mark.parametrize("algo,roles,extra", [
    ("loha", lambda: loha_case(LINEAR, 1.0)[2], {}),
    ("lokr", lambda: lokr_case("linear_both")[2], {}),
    ("glora", lambda: glora_case(LINEAR)[2], {}),
    ("ia3", lambda: {"weight": rand(64)}, {}),
    ("oft", lambda: {"blocks": oft_blocks(8, 8)}, {}),
    ("boft", lambda: {"blocks": oft_blocks(8, 8, 2)}, {}),
    ("full", lambda: {"diff": rand(*LINEAR)}, {}),
    ("set", lambda: {"set_weight": rand(*LINEAR)}, {}),
])
def test_validate_other_algorithms(algo, roles, extra):
    module = ModuleLora("m", algo, roles(), alpha=1.0, **extra)
    adapters.validate(module, torch.Size(LINEAR), "k.weight")
    with pytest.raises(LoraMatchError, match=r"k\.weight"):
        adapters.validate(module, torch.Size([96, 48]), "k.weight")


def test_validate_linear_lora_on_1x1_conv_and_dora_shapes():
    _, _, roles = lora_case((32, 16), 1.0)
    module = ModuleLora("m", "lora", roles, alpha=1.0)
    adapters.validate(module, torch.Size([32, 16, 1, 1]), "k")
    assert adapters.delta(module, weight_of((32, 16, 1, 1))).shape == (32, 16, 1, 1)
    with pytest.raises(LoraMatchError, match="dora_scale"):
        adapters.validate(ModuleLora("m", "lora", roles, alpha=1.0, dora_scale=torch.ones(1, 20)),
                          torch.Size([32, 16]), "k")
    with pytest.raises(LoraFormatError):
        adapters.validate(ModuleLora("m", "lora", {"up": torch.zeros(32, 4), "down": torch.zeros(5, 16)}),
                          torch.Size([32, 16]), "k")
    with pytest.raises(LoraFormatError, match="up"):
        adapters.validate(ModuleLora("m", "lora", {"down": torch.zeros(4, 16)}), torch.Size([32, 16]), "k")
