"""DiT training on HunyuanVideo 1.5 with the real host, following tests/test_train_dit2.py: ComfyUI's own
HunyuanVideo15 model class (flow at shift 7 / multiplier 1000, no guidance input, 32-channel HunyuanVideo15 latent
format, 65 input channels = latent + its own empty concat conditioning, ComfyUI's text-to-video mode) called the way
the sampler calls it, the loss falling on a tiny model trained on images as 1-frame videos, the saved file in the
ComfyUI names core reads (`lora_unet_double_blocks_N_img_attn_qkv`, the double blocks' attention and MLP Linears,
no modulation) with musubi's `hunyuan_video_1_5` header, loading in core with no key left and in ours with every
module matched, and with all layers the returned MODEL equal to core's loader on the file.

Hosts (tests/tiny_hunyuan_video.py): HunyuanVideo 1.5 at width 64 (2 double blocks), its Qwen2.5-VL CLIP with
ComfyUI's own HunyuanVideo15Tokenizer, a 32-channel TAESD-architecture VAE giving (B, 32, 1, h, w) latents
(tests/test_train_dit.FrameVAE).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.comfy_host import import_comfy
from tests import tiny_hunyuan_video as th
from tests.test_train_dit import FrameVAE
from tests.test_train_dit2 import LOSS_RATIO_MAX
from tests.test_train_flux import (FamilyHost, file_metadata, file_modules, flow_error, patched_state, sampler_call,
                                   single_thread, target_images)  # noqa: F401 (fixture)
from tests.test_train_nodes import train_nodes

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.arch.registry import detect_lora  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402

nt = train_nodes()
host_module = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"])
loader_module = __import__(nt.__name__.rsplit(".", 1)[0] + ".loader", fromlist=["apply_requests"])

STEPS = 40
RANK = 4
LR = 5e-3
CAPTION = "sks square"
LEARN_MIN = 0.2


class Host(FamilyHost):
    steps, rank, lr, caption = STEPS, RANK, LR, CAPTION

    def __init__(self):
        images = target_images()
        self.model, self.clip = th.comfy_hunyuan_video_15(), th.comfy_clip_hunyuan_video_15()
        self.vae = FrameVAE(self.model, images, channels=32)
        self.image_dataset(images)


@pytest.fixture(scope="module")
def host():
    return Host()


@pytest.fixture(scope="module")
def run(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hv15")
    model, clip, lora, curve, name, report, *_ = host.train(folder)
    state = lt.load_state(os.path.join(folder, "sq.state.pt"))
    return dict(model=model, lora=lora, losses=state["losses"], path=lora.path)


def _linears(unet, prefix: str = "") -> list:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]


def test_objective_and_backend_are_the_models_own(host):
    """Flow at HunyuanVideo15's shift 7 (supported_models.HunyuanVideo15), no guidance input; the backend's output
    through calculate_denoised equals the sampler's apply_model, whose concat conditioning (65 = 32 + 32 + 1 input
    channels) is the model's own empty one."""
    import comfy.model_base

    arch, spec = nt.model_train_spec(host.model)
    assert arch.name == "HunyuanVideo-1.5" and type(host.model.model) is comfy.model_base.HunyuanVideo15
    assert spec.latent_dims == 3 and not spec.guidance_input
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    objective = backend.objective
    assert backend.native_call and backend.guidance is None
    assert objective.is_flow and objective.shift == pytest.approx(7.0, rel=1e-5)
    assert objective.multiplier == pytest.approx(1000.0)
    assert tuple(host.latents.shape) == (4, 32, 1, 8, 8)
    x = torch.randn((2, 32, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    concat = backend.base.concat_cond(noise=x, device=x.device)
    assert tuple(concat.shape) == (2, 33, 1, 8, 8) and not concat.any()
    conds = host.conds()
    mm.load_models_gpu([host.model], force_full_load=True)
    with torch.no_grad():
        out = backend.denoise(x, objective.model_timesteps(sigma), {"context": conds["cond"].expand(2, -1, -1)})
    ours = backend.sampling.calculate_denoised(sigma, out.float(), x)
    assert torch.allclose(ours, sampler_call(host.model, x, sigma, conds), atol=1e-5)


def test_loss_falls(host, run):
    conds = host.conds()
    before = flow_error(host.model, host.latents, conds)
    after = flow_error(run["model"], host.latents, conds)
    per_level = [1 - a / b for a, b in zip(after, before)]
    mean = 1 - sum(after) / sum(before)
    losses = run["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"hunyuan 1.5: velocity error {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f} "
          f"({100 * mean:.1f}%), per level {' '.join(f'{100 * r:.1f}' for r in per_level)}; training loss "
          f"first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == STEPS and all(v == v for v in losses)
    assert mean > LEARN_MIN and min(per_level) > 0
    assert last < LOSS_RATIO_MAX * first


def test_saved_file_names_and_header(host, run):
    unet = host.model.model.diffusion_model
    modules = file_modules(run["path"])
    assert modules == {"lora_unet_" + n.replace(".", "_") for n in _linears(unet, "double_blocks.")
                       if "_mod." not in n}
    assert "lora_unet_double_blocks_1_img_attn_qkv" in modules and not unet.single_blocks
    meta = file_metadata(run["path"])
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("hunyuan_video_1_5",
                                                                               "hunyuan-video-1.5/lora")
    assert meta["modelspec.prediction_type"] == "flow" and meta["ss_discrete_flow_shift"] == "7"
    assert "ss_guidance_scale" not in meta
    assert detect_lora(read_lora_file(run["path"])).name == "HunyuanVideo-1.5"


def test_saved_file_loads_in_core_and_ours_with_every_module(host, run, caplog):
    tensors = comfy.utils.load_torch_file(run["path"], safe_load=True)
    modules = file_modules(run["path"])
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        core_model, _ = comfy.sd.load_lora_for_models(host.model, host.clip, tensors, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(core_model.patches) == len(modules)
    plan = host_module.HostModels(host.model, host.clip).plan([LoraRequest(read_lora_file(run["path"]), 1.0, 1.0)])
    report = plan.reports[0]
    assert report.unmatched == [] and report.unused_keys == [] and report.skipped == {}
    assert report.matched == len(modules) == report.applied["transformer"]


def test_model_output_equals_saved_file_in_core_loader(host, tmp_path):
    """All layers (+ modulation, token refiner, embedders incl. the ByT5 glyph projection, final layer; not the
    SigLIP projection `vision_in`, which training never feeds: no image), fp32 file: the returned MODEL equals
    core's loader on the file, which changes exactly the weights it names; ours at -0.6 equals core's at -0.6."""
    model, _, lora, *_ = host.train(tmp_path, steps=3, unet_targets="all layers", save_precision="fp32",
                                    output_name="all")
    tensors = comfy.utils.load_torch_file(lora.path, safe_load=True)
    unet_map = comfy.lora.model_lora_keys_unet(host.model.model, {})
    hosted = {unet_map[m] for m in file_modules(lora.path)}
    assert hosted == {f"diffusion_model.{n}.weight" for n in _linears(host.model.model.diffusion_model)
                      if not n.startswith("vision_in.")}
    assert "diffusion_model.byt5_in.fc1.weight" in hosted
    base = patched_state(host.model)
    for strength in (1.0, -0.6):
        core_model, _ = comfy.sd.load_lora_for_models(host.model, None, tensors, strength, 0.0)
        ours_model = model if strength == 1.0 else loader_module.apply_requests(
            host.model, None, [LoraRequest(read_lora_file(lora.path), strength, 0.0)])[0]
        ours, core = patched_state(ours_model), patched_state(core_model)
        for key in ours:
            delta = (core[key] - base[key]).abs().max().item()
            assert (ours[key] - core[key]).abs().max().item() <= 1e-5 * delta + 1e-7, key
        # what no gradient reaches stays as it was (its LoRA up is still zero): the glyph projection, fed only by
        # quoted text through the ByT5 encoder (none here), and the last double block's text-stream output (1.5 has
        # no single blocks after it, so it never reaches the image tokens); everything else changes
        last = f"diffusion_model.double_blocks.{len(host.model.model.diffusion_model.double_blocks) - 1}"
        unfed = {f"diffusion_model.byt5_in.fc{i}.weight" for i in (1, 2, 3)} | \
            {f"{last}.{p}.weight" for p in ("txt_attn.proj", "txt_mlp.0", "txt_mlp.2")}
        assert {k for k in ours if not torch.equal(ours[k], base[k])} == hosted - unfed
        assert unfed <= hosted


def test_hunyuan_video_i2v_is_refused_naming_why():
    with pytest.raises(LoraValueError, match="Training does not support HunyuanVideo I2V"):
        nt.model_train_spec(th.comfy_hunyuan_video("i2v"))
