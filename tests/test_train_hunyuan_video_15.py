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
from tests.test_train_flux import (ConcatRecorder, FamilyHost, core_loads_every_key, file_metadata, file_modules,
                                   flow_error, patched_state, sampler_call, single_thread, target_images)  # noqa: F401 (single_thread: a fixture)
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
    modules = file_modules(run["path"])
    core_model = core_loads_every_key(host.model, host.clip, run["path"], caplog)
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


@pytest.mark.parametrize("variant", ["i2v", "skyreels"])
def test_hunyuan_video_i2v_trains_on_each_clips_first_frame(variant, tmp_path, caplog):
    """HunyuanVideo 1.0 I2V (image latent + inverted mask in its concat channels) and SkyReels V1 I2V (image latent
    only) train on videos conditioned on each clip's first frame: the model gets the concat_latent_image /
    concat_mask ComfyUI's own HunyuanImageToVideo ("v1 (concat)") builds from that frame, at every step; the file
    loads in core with no key left."""
    import comfy_extras.nodes_hunyuan as nodes_hunyuan
    from tests.pack import input_folder, loras_folder
    from tests.test_train_nodes import train_kwargs
    from tests.test_train_wan import CAPTIONS, DATASET, StandardVAE, save_frames, training_videos

    model, clip = th.comfy_hunyuan_video(variant), th.comfy_clip_hunyuan_video()
    videos = training_videos()
    for name, frames in videos.items():
        save_frames(tmp_path / "hv_videos", name, frames, CAPTIONS[name])
    vae = StandardVAE(model, list(videos.values()))
    with input_folder(tmp_path):
        dataset, _ = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": "hv_videos"})
    folder = tmp_path / "loras"
    folder.mkdir()
    with loras_folder(folder), ConcatRecorder(model) as recorder:
        _, _, lora, *_ = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(
            steps=3, rank=RANK, alpha=float(RANK), unet_lr=LR, train_text_encoder=False, batch_size=2,
            output_name=f"hv_{variant}"))
    seen = recorder.seen
    keys = {"concat_latent_image", "concat_mask"} if variant == "i2v" else {"concat_latent_image"}
    expected = []
    for sample in dataset.samples:
        frames = sample.image.movedim(0, -1)                        # (F, H, W, 3)
        positive, _ = nodes_hunyuan.HunyuanImageToVideo.execute(
            positive=[[torch.zeros(1, 4, 32), {}]], vae=vae, width=frames.shape[2], height=frames.shape[1],
            length=frames.shape[0], batch_size=1, guidance_type="v1 (concat)", start_image=frames[:1])
        expected.append(positive[0][1])
    assert len(seen) == 3 and all(set(step) == keys for step in seen)
    for step in seen:
        for row in range(step["concat_latent_image"].shape[0]):
            errors = [(step["concat_latent_image"][row] - e["concat_latent_image"][0]).abs().max().item()
                      for e in expected]
            best = min(range(len(expected)), key=errors.__getitem__)
            assert errors[best] < 1e-5 and max(errors) > 1e-3, errors   # each sample's own first frame
            if "concat_mask" in keys:
                assert torch.equal(step["concat_mask"][row], expected[best]["concat_mask"][0])
    core_model = core_loads_every_key(model, clip, lora.path, caplog)
    assert len(core_model.patches) == len(file_modules(lora.path)) > 0
