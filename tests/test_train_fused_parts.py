"""One side-path evaluation per fused weight on diffusers' Flux (injection.SharedPath): the LoRA of kohya's fused
img_attn.qkv / txt_attn.qkv / linear1 is injected over diffusers' split to_q / to_k / to_v (/ proj_mlp), and the
first part's module computes it for the input all parts read; the others take their rows.

Checked against a reference kept here - the previous injection, which ran the whole side path in every part's
module - on a tiny FluxTransformer2DModel with trained-looking (random, non-zero) side paths, for LoRA, LoHa,
LoKr and DoRA, with and without gradient checkpointing: the transformer's output and every side-path gradient are
the same to fp32 rounding, the LoRA's down projection (LyCORIS: the weight delta) runs once per fused weight per
forward (the reference: once per part), and nothing is kept once the forward is over.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests import dit_writers as dw

from lora_core.train.diffusers_flux import flux_targets
from lora_core.train.injection import LoRANetwork, SharedPath
from lora_core.train.loop import _Checkpointing

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "DoRA")
HIDDEN = 64


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_flux():
    from lora_core.arch.families.flux import FAMILY

    transformer = dw.diffusers_flux_twin(hidden=HIDDEN, depth=1, depth_single=2)
    transformer.requires_grad_(False)
    state = transformer.state_dict()
    arch, spec = FAMILY.detect_diffusers(list(state), {k: tuple(v.shape) for k, v in state.items()})
    return transformer, arch, spec


def network_of(transformer, arch, spec, algorithm: str) -> LoRANetwork:
    train_spec = arch.family.train_spec(arch, spec)
    targets = flux_targets(transformer, arch, spec, train_spec, train_spec.target_sets["attn+ff+proj"])
    network = LoRANetwork(targets, 4, 2.0, seed=3, algorithm=algorithm)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():   # a side path that has trained: every factor non-zero
        for param in network.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return network


def reference_inject(network: LoRANetwork) -> list:
    """The previous injection over parts: every part's module runs the whole side path on its input and keeps its
    rows. Returns [(module, previous forward)] for `reference_restore`."""
    saved = []
    for name, target in network.targets.items():
        path = network.path(name)
        if target.parts is None:
            module, original, rows = target.module, target.module.forward, target.rows
            saved.append((module, module.__dict__.get("forward")))

            def forward(x, *args, _original=original, _path=path, _rows=rows, **kwargs):
                out = _original(x, *args, **kwargs)
                delta = _path(x).to(out.dtype)
                if _rows is not None:
                    delta = F.pad(delta, (_rows[0], out.shape[-1] - _rows[0] - _rows[1]))
                return out + delta

            module.forward = forward
            continue
        by_module = {}
        for module, start, host, length in target.parts:
            by_module.setdefault(id(module), (module, []))[1].append((start, host, length))
        for module, pieces in by_module.values():
            saved.append((module, module.__dict__.get("forward")))
            original = module.forward

            def forward(x, *args, _original=original, _path=path, _pieces=tuple(pieces), **kwargs):
                out = _original(x, *args, **kwargs)
                fused = _path(x).to(out.dtype)
                for start, host, length in _pieces:
                    out = out + F.pad(fused[..., start:start + length], (host, out.shape[-1] - host - length))
                return out

            module.forward = forward
    return saved


def reference_restore(saved: list) -> None:
    for module, before in reversed(saved):
        if before is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = before


def inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(9)
    tokens, text = 16, 8
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // 4
    ids[:, 2] = torch.arange(tokens) % 4
    return dict(hidden_states=torch.randn(batch, tokens, 64, generator=gen),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=gen),
                pooled_projections=torch.randn(batch, 32, generator=gen), timestep=torch.tensor([0.3, 0.7][:batch]),
                img_ids=ids, txt_ids=torch.zeros(text, 3), guidance=torch.ones(batch), return_dict=False)


class Counter:
    """How often each fused target's side path is evaluated: the LoRA's `down` Linear (a forward hook), or a
    LyCORIS path's weight delta (its `weight_delta`, wrapped on the instance)."""

    def __init__(self, network: LoRANetwork):
        self.counts = {name: 0 for name, t in network.targets.items() if t.parts is not None}
        self.undo = []
        for name in self.counts:
            path = network.path(name)
            if hasattr(path, "down") and isinstance(path.down, torch.nn.Module):
                handle = path.down.register_forward_hook(lambda *_, _n=name: self._hit(_n))
                self.undo.append(handle.remove)
            else:
                original = path.weight_delta

                def weight_delta(*args, _original=original, _n=name, **kwargs):
                    self._hit(_n)
                    return _original(*args, **kwargs)

                path.weight_delta = weight_delta
                self.undo.append(lambda _p=path: _p.__dict__.pop("weight_delta"))

    def _hit(self, name):
        self.counts[name] += 1

    def reset(self):
        self.counts = dict.fromkeys(self.counts, 0)

    def close(self):
        for undo in self.undo:
            undo()


def run(transformer, network, checkpointing: bool):
    """(output, {parameter name: gradient}) of one forward + backward through the injected transformer."""
    network.zero_grad(set_to_none=True)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    with _Checkpointing(blocks if checkpointing else ()), torch.enable_grad():
        out = transformer(**inputs())[0]
        stale = [name for name, shared in network._shared.items() if shared._entry is not None]
        (out.square().mean() + out.mean()).backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    return out.detach(), grads, stale


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fused_side_path_runs_once_and_equals_the_per_part_reference(algorithm):
    transformer, arch, spec = tiny_flux()
    network = network_of(transformer, arch, spec, algorithm)
    fused = [name for name, t in network.targets.items() if t.parts is not None]
    parts = {name: len({id(m) for m, *_ in network.targets[name].parts}) for name in fused}
    # the tiny Flux: img/txt qkv of the double block (3 modules each), linear1 of 2 single blocks (4 modules each)
    assert sorted(parts.values()) == [3, 3, 4, 4]
    counter = Counter(network)
    try:
        for checkpointing in (False, True):
            evaluations = 2 if checkpointing else 1   # checkpointing runs each block's forward again in backward
            saved = reference_inject(network)
            try:
                counter.reset()
                want, want_grads, _ = run(transformer, network, checkpointing)
                assert counter.counts == {n: evaluations * parts[n] for n in fused}, counter.counts
            finally:
                reference_restore(saved)
            network.inject()
            try:
                counter.reset()
                got, got_grads, stale = run(transformer, network, checkpointing)
                assert counter.counts == dict.fromkeys(fused, evaluations), counter.counts
                assert not stale, f"kept after the forward: {stale}"
                network.release()
                assert all(shared._entry is None for shared in network._shared.values())
            finally:
                network.restore()
            assert not network._shared
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-6 * scale, "the transformer's output changed"
            assert set(got_grads) == set(want_grads) and len(got_grads) == len(list(network.parameters()))
            for key, grad in want_grads.items():
                assert grad.abs().max() > 0, key
                assert (got_grads[key] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item() + 1e-9, key
    finally:
        counter.close()


def test_shared_path_recomputes_for_another_input_a_changed_path_or_a_second_read():
    """The kept output is used only by the other parts' modules on the very same input tensor, unchanged, with
    the side path unchanged: anything else computes anew (so it can never hand out a stale value)."""
    path = torch.nn.Linear(8, 6, bias=False)
    shared = SharedPath(path, ("q", "k"))
    x = torch.randn(3, 8)
    first = shared(x, "q")
    assert shared(x, "k") is first and shared.calls == 1 and shared._entry is None   # both read: nothing kept
    shared(x, "q")
    assert shared(x.clone(), "k") is not None and shared.calls == 3                 # another tensor: anew
    shared(x, "q")
    shared(x, "q")                                                                  # q again: a new forward
    assert shared.calls == 5
    with torch.no_grad():
        path.weight.mul_(2.0)                                                       # an optimizer step
    out = shared(x, "k")
    assert shared.calls == 6 and torch.allclose(out, path(x))
    assert shared(x, "q") is out and shared.calls == 6                              # k's output, q reads it
    shared(x, "q")
    x.mul_(3.0)                                                                     # the input changed in place
    assert torch.allclose(shared(x, "k"), path(x)) and shared.calls == 8
    shared(x, "q")
    shared.release()
    assert shared._entry is None


def test_fused_side_path_under_bf16_autocast_equals_the_reference():
    """Mixed precision (CPU autocast, bf16): the shared output is the one each part would compute - same dtype,
    same values - and it is still computed once per fused weight."""
    transformer, arch, spec = tiny_flux()
    network = network_of(transformer, arch, spec, "LoRA")
    counter = Counter(network)
    try:
        outputs = []
        for reference in (True, False):
            saved = reference_inject(network) if reference else network.inject()
            try:
                counter.reset()
                with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
                    outputs.append(transformer(**inputs())[0].float())
            finally:
                reference_restore(saved) if reference else network.restore()
            if not reference:
                assert set(counter.counts.values()) == {1}, counter.counts
        assert torch.equal(outputs[0], outputs[1])
    finally:
        counter.close()
