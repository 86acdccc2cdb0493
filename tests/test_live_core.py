"""lora_core.live without ComfyUI: the factored forward equals the merged weight's forward (lora_core.engine's
patch_weight on a copy of W) on plain torch layers, for the layouts the plan produces: a whole Linear, a strided /
padded / dilated Conv2d LoCon, a Tucker conv, rows of a fused weight, column factors, a bias diff, a stack
concatenated into one group; a new LiveSet over the same store builds no factor; what has no factored form is
split off with its reason."""
from __future__ import annotations

import torch

from lora_core import live
from lora_core.engine import WeightPatch, patch_weight
from lora_core.types import ModuleLora


def _lora(name, out_f, in_shape, rank, seed, alpha=None, mid=None, bias=None):
    gen = torch.Generator().manual_seed(seed)
    in_f = in_shape[0]
    kernel = tuple(in_shape[1:])
    tensors = {"up": 0.1 * torch.randn(out_f, rank, *([1] * len(kernel)), generator=gen)}
    if mid is not None:
        tensors["down"] = 0.1 * torch.randn(rank, in_f, *([1] * len(kernel)), generator=gen)
        tensors["mid"] = 0.1 * torch.randn(rank, rank, *kernel, generator=gen)
    else:
        tensors["down"] = 0.1 * torch.randn(rank, in_f, *kernel, generator=gen)
    if not kernel:
        tensors = {k: v.reshape(v.shape[0], -1) for k, v in tensors.items()}
    return ModuleLora(name, "lora", tensors, alpha=alpha, bias_diff=bias)


def _check(layer: torch.nn.Module, patches: list, bias_patches=(), x=None):
    """live(layer)(x) against the layer with patch_weight's merged W (and bias)."""
    key = "m"
    shapes = {"m.weight": layer.weight.shape, "m.bias": layer.bias.shape}
    plan = {"m.weight": patches}
    if bias_patches:
        plan["m.bias"] = list(bias_patches)
    split = live.split_plan(plan, shapes, lambda k: live.layer_form(layer))
    assert key in split.live and not split.merged, split.fallback
    store = live.FactorStore()
    liveset = live.LiveSet(split, shapes, store)
    forward = live.live_forward(type(layer).forward, layer, [liveset.layers[key]])
    merged = type(layer)(*_ctor(layer))
    merged.load_state_dict(layer.state_dict())
    with torch.no_grad():
        patch_weight(merged.weight, patches, "m.weight")
        if bias_patches:
            patch_weight(merged.bias, list(bias_patches), "m.bias")
        got, want, base = forward(x), merged(x), layer(x)
    effect = (want - base).abs().max().item()
    assert effect > 1e-3
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    built = store.built
    again = live.LiveSet(split, shapes, store)
    assert store.built == built and len(again) == 1
    return liveset


def _ctor(layer):
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation)


def test_linear_stack_is_one_group():
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    a, b = _lora("a", 16, (24,), 4, 1, alpha=2.0), _lora("b", 16, (24,), 8, 2)
    liveset = _check(layer, [WeightPatch(a, 0.8), WeightPatch(b, -0.6)], x=torch.randn(3, 5, 24))
    assert len(liveset.layers["m"].groups) == 1 and liveset.layers["m"].groups[0].rank == 12


def test_conv_locon_with_stride_padding_dilation_and_tucker():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2)
    a = _lora("a", 10, (6, 3, 3), 4, 3, alpha=1.0)
    t = _lora("t", 10, (6, 3, 3), 3, 4, mid=True)
    _check(layer, [WeightPatch(a, 1.0), WeightPatch(t, 0.5)], x=torch.randn(2, 6, 11, 9))


def test_rows_columns_and_bias():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 18)
    q = _lora("q", 6, (12,), 2, 5, bias=torch.randn(6))          # a to_q-style module on rows 6..11
    full = _lora("full", 18, (12,), 4, 6)
    rows = WeightPatch(q, 0.7, rows=((6, 0, 6),), module_rows=6)
    cols = WeightPatch(full, 0.9, cols=((0, 4, 1.0), (4, 8, 0.25)))
    liveset = _check(layer, [rows, cols], bias_patches=[WeightPatch(q, 0.7, "bias", ((6, 0, 6),), 6)],
                     x=torch.randn(4, 12))
    layer_live = liveset.layers["m"]
    assert [g.cols_at is not None for g in layer_live.groups] == [False, True]
    assert layer_live.bias_at is not None


def test_algorithms_without_a_factored_form_are_merged_with_the_reason():
    layer = torch.nn.Linear(8, 8)
    loha = ModuleLora("h", "loha", {"w1a": torch.randn(8, 2), "w1b": torch.randn(2, 8), "w2a": torch.randn(8, 2),
                                    "w2b": torch.randn(2, 8)})
    dora = _lora("d", 8, (8,), 2, 7)
    dora.dora_scale = torch.ones(8, 1)
    plain = _lora("p", 8, (8,), 2, 8)
    shapes = {"a.weight": layer.weight.shape, "b.weight": layer.weight.shape, "c.weight": layer.weight.shape}
    plan = {"a.weight": [WeightPatch(plain, 1.0), WeightPatch(loha, 1.0)], "b.weight": [WeightPatch(dora, 1.0)],
            "c.weight": [WeightPatch(plain, 1.0)]}
    split = live.split_plan(plan, shapes, lambda k: live.layer_form(layer))
    assert set(split.live) == {"c"}
    assert set(split.merged) == {"a.weight", "b.weight"}   # a module goes live only as a whole
    assert split.fallback == {"loha (no low-rank factored form)": 1,
                              "lora+DoRA (the magnitude depends on the weight)": 1}
    form, why = live.layer_form(torch.nn.Conv2d(4, 4, 3, groups=2))
    assert form is None and "groups=2" in why
    form, why = live.layer_form(torch.nn.Embedding(4, 4))
    assert form is None and "Embedding" in why
