"""DiT training on HiDream-I1 with the real host, following tests/test_train_dit2.py: ComfyUI's own HiDream model
class (supported_models.HiDream / model_base.HiDream: a flow model, its model_sampling ModelSamplingDiscreteFlow,
the Flux latent format) called the way the sampler calls it (T5 context, pooled CLIP-L + CLIP-G, the Llama's stacked
hidden states as `encoder_hidden_states_llama3`), the loss falling on a tiny model, the saved file in ai-toolkit's
and diffusion-pipe's names (`diffusion_model.<path>`: the stream blocks' attention and feed-forward Linears, the
MoE's shared and routed experts included) with ai-toolkit's `hidream_i1` header, loading in core's loader with no
key left and in ours with every module matched, and the returned MODEL equal to core's loader on the file.

Hosts (tests/tiny_hidream.py): HiDream at width 64 (2 double, 2 single stream blocks, 4 routed experts, 2 active),
its CLIP with ComfyUI's own HiDreamTokenizer (comfy_clip_hidream_tokenizing), the Flux-format tiny 16-channel VAE
(tests/test_train_flux.tiny_vae16).
"""
from __future__ import annotations

import logging
import os
import re

import pytest
import torch

from tests.comfy_host import import_comfy
from tests import tiny_hidream as th
from tests.test_train_dit2 import LOSS_RATIO_MAX
from tests.test_train_flux import (FamilyHost, core_loads_every_key, file_metadata, file_modules, flow_error,
                                   patched_state, sampler_call, single_thread, target_images, tiny_vae16)  # noqa: F401 (single_thread: a fixture)
from tests.test_train_nodes import train_nodes

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.arch.registry import detect_lora  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402

nt = train_nodes()
host_module = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"])
loader_module = __import__(nt.__name__.rsplit(".", 1)[0] + ".loader", fromlist=["apply_requests"])

STEPS = 40
RANK = 4
LR = 5e-3
CAPTION = "sks square"
LEARN_MIN = 0.2
# the trainers' default: every Linear of the stream blocks' attention (attn1) and feed-forward (ff_i, ff_t)
DEFAULT = re.compile(r"^(double|single)_stream_blocks\.\d+\.block\.(attn1|ff_i|ff_t)\.")


class Host(FamilyHost):
    steps, rank, lr, caption = STEPS, RANK, LR, CAPTION

    def __init__(self):
        images = target_images()
        self.model, self.clip = th.comfy_hidream(), th.comfy_clip_hidream_tokenizing()
        self.vae = tiny_vae16(self.model)
        self.image_dataset(images)


@pytest.fixture(scope="module")
def host():
    return Host()


@pytest.fixture(scope="module")
def run(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hidream")
    model, clip, lora, curve, name, report, *_ = host.train(folder)
    state = lt.load_state(os.path.join(folder, "sq.state.pt"))
    return dict(model=model, lora=lora, losses=state["losses"], path=lora.path)


def _linears(unet) -> list:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]


def test_tiny_hidream_forward_runs_with_one_llama_layer_per_block():
    """tests/tiny_hidream's llama_layers lists one Llama layer per stream block (the real model: 48 for 16 + 32),
    which the forward needs (caption_projection[i] per entry): a forward runs and reads the layers it names."""
    config = th.hidream_config()
    assert len(config["llama_layers"]) == th.DEPTH + th.DEPTH_SINGLE
    assert set(config["llama_layers"]) == set(range(th.LLAMA_LAYERS))
    model = th.comfy_hidream()
    gen = torch.Generator().manual_seed(0)
    conds = {"cond": torch.randn(1, 6, 32, generator=gen), "pooled_output": torch.randn(1, 64, generator=gen),
             "conditioning_llama3": torch.randn(1, th.LLAMA_LAYERS, 5, 32, generator=gen)}
    x = torch.randn(1, 16, 8, 8, generator=gen)
    out = sampler_call(model, x, torch.tensor([0.5]), conds)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    other = dict(conds, conditioning_llama3=conds["conditioning_llama3"].flip(1))   # the layers are read
    assert not torch.allclose(out, sampler_call(model, x, torch.tensor([0.5]), other), atol=1e-5)


def test_objective_and_backend_are_the_models_own(host):
    """Flow matching at the model's own schedule (supported_models.HiDream: ModelSamplingDiscreteFlow, its
    sampling_settings empty: shift 1, multiplier 1000); the backend's output through calculate_denoised equals
    the sampler's apply_model with the model's extra conds (T5 context, pooled, the Llama layers)."""
    arch, spec = nt.model_train_spec(host.model)
    assert arch.name == "HiDream-I1" and spec.block_lists == ("double_stream_blocks", "single_stream_blocks")
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    sampling = host.model.get_model_object("model_sampling")
    objective = backend.objective
    assert backend.native_call and backend.guidance is None
    assert objective.is_flow and objective.shift == pytest.approx(1.0, rel=1e-5)
    assert objective.multiplier == pytest.approx(1000.0)
    sigma = torch.tensor([0.3, 0.8])
    x = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(objective.model_timesteps(sigma).float(), sampling.timestep(sigma).float())
    conds = host.conds()
    assert conds["conditioning_llama3"].shape[1] == th.LLAMA_LAYERS
    cond = {"context": conds["cond"].expand(2, -1, -1), "pooled_output": conds["pooled_output"].expand(2, -1),
            "conditioning_llama3": conds["conditioning_llama3"].expand(2, -1, -1, -1)}
    mm.load_models_gpu([host.model], force_full_load=True)
    with torch.no_grad():
        out = backend.denoise(x, objective.model_timesteps(sigma), cond)
    ours = backend.sampling.calculate_denoised(sigma, out.float(), x)
    assert torch.allclose(ours, sampler_call(host.model, x, sigma, conds), atol=1e-5)


def test_targets_are_the_stream_blocks_attention_and_moe_feed_forward(host):
    arch, spec = nt.model_train_spec(host.model)
    unet = host.model.model.diffusion_model
    key_map = host_module.HostModels(host.model).key_map
    default = {t.name for t in lt.find_denoiser_targets(unet, key_map, spec, spec.target_sets["attn+ff+proj"])}
    expected = {f"diffusion_model.{n}" for n in _linears(unet) if DEFAULT.match(n)}
    assert default == expected
    # per double block 8 attention + 3 shared + 4 x 3 routed + 3 text FF; per single block 4 + 3 + 12
    assert len(expected) == th.DEPTH * 26 + th.DEPTH_SINGLE * 19
    assert "diffusion_model.double_stream_blocks.1.block.ff_i.experts.3.w2" in default
    assert "diffusion_model.single_stream_blocks.0.block.attn1.to_out" in default
    assert not any("adaLN" in n or "gate" in n for n in default)
    every = {t.name for t in lt.find_denoiser_targets(unet, key_map, spec, spec.target_sets["all layers"])}
    assert every == {f"diffusion_model.{n}" for n in _linears(unet)}   # every Linear (the router is a bare weight)


def test_loss_falls(host, run):
    conds = host.conds()
    before = flow_error(host.model, host.latents, conds)
    after = flow_error(run["model"], host.latents, conds)
    per_level = [1 - a / b for a, b in zip(after, before)]
    mean = 1 - sum(after) / sum(before)
    losses = run["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"hidream: velocity error {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f} "
          f"({100 * mean:.1f}%), per level {' '.join(f'{100 * r:.1f}' for r in per_level)}; training loss "
          f"first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == STEPS and all(v == v for v in losses)
    assert mean > LEARN_MIN and min(per_level) > 0
    assert last < LOSS_RATIO_MAX * first


def test_saved_file_names_and_hidream_header(host, run):
    unet = host.model.model.diffusion_model
    assert file_modules(run["path"]) == {f"diffusion_model.{n}" for n in _linears(unet) if DEFAULT.match(n)}
    meta = file_metadata(run["path"])
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"],
            meta["modelspec.implementation"]) == ("hidream_i1", "hidream-i1/lora", "networks.lora",
                                                  "https://github.com/HiDream-ai/HiDream-I1")
    assert meta["modelspec.prediction_type"] == "flow" and float(meta["ss_discrete_flow_shift"]) == pytest.approx(1.0)
    assert meta["ss_timestep_sampling"] == "logit-normal, model shift" and meta["ss_steps"] == str(STEPS)
    assert detect_lora(read_lora_file(run["path"])).name == "HiDream-I1"                       # its header
    assert detect_lora(read_lora_file(run["path"]), use_metadata=False).family.name == "hidream"  # its names


def test_saved_file_loads_in_core_and_ours_with_every_module(host, run, caplog):
    modules = file_modules(run["path"])
    core_model = core_loads_every_key(host.model, host.clip, run["path"], caplog)
    assert set(core_model.patches) == {f"{m}.weight" for m in modules}
    plan = host_module.HostModels(host.model, host.clip).plan([LoraRequest(read_lora_file(run["path"]), 1.0, 1.0)])
    report = plan.reports[0]
    assert report.unmatched == [] and report.unused_keys == [] and report.skipped == {}
    assert report.matched == len(modules) == report.applied["transformer"]


def test_model_output_equals_saved_file_in_core_loader(host, tmp_path):
    """All layers, fp32 file: every weight of the returned MODEL equals core's loader applying the saved file, the
    file changes exactly the weights it names, and ours at -0.6 equals core's at -0.6 (1e-5 of the delta)."""
    model, _, lora, *_ = host.train(tmp_path, steps=3, unet_targets="all layers", save_precision="fp32",
                                    output_name="all")
    tensors = comfy.utils.load_torch_file(lora.path, safe_load=True)
    unet_map = comfy.lora.model_lora_keys_unet(host.model.model, {})
    hosted = {unet_map[m] for m in file_modules(lora.path)}
    assert hosted == {f"diffusion_model.{n}.weight" for n in _linears(host.model.model.diffusion_model)}
    base = patched_state(host.model)
    for strength in (1.0, -0.6):
        core_model, _ = comfy.sd.load_lora_for_models(host.model, None, tensors, strength, 0.0)
        ours_model = model if strength == 1.0 else loader_module.apply_requests(
            host.model, None, [LoraRequest(read_lora_file(lora.path), strength, 0.0)])[0]
        ours, core = patched_state(ours_model), patched_state(core_model)
        assert ours.keys() == core.keys() == base.keys()
        for key in ours:
            delta = (core[key] - base[key]).abs().max().item()
            assert (ours[key] - core[key]).abs().max().item() <= 1e-5 * delta + 1e-7, key
        assert {k for k in ours if not torch.equal(ours[k], base[k])} == hosted
