"""What training teaches the model, against ComfyUI core's Train LoRA node on the same model, images, steps,
learning rate and rank: the denoising error on the training images (tests/train_quality.py: fixed noise, eight
fixed sigmas, through ComfyUI's apply_model, x0 space and eps space), and that the MODEL the train node returns
is exactly the saved file applied by core's LoRA loader.

The host is a tiny SD1.5 + CLIP + TAESD whose UNet is first made a working denoiser (60 full fine-tuning steps on
generic images); the training images are six 64 px squares given to the dataset node at its defaults
(resolution 512), as a new user would. Margins calibrated on this machine (seeds 0-3, 60 steps, rank 4, lr 1e-3):
core reduces the x0 error by 7.7-10.8% and the eps error by 3.2-4.3%; ours with the default (kohya) targets by
5.0-6.5% / 5.4-6.1%, with "all layers" by 9.7-12.2% / 10.4-10.7%. Before the dataset stopped enlarging small
images, the same run trained on 8x-enlarged images and made the error on the real ones worse.
"""
from __future__ import annotations

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import train_quality as tq

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

nt = node_module("train")

STEPS = 60
SEEDS = (0, 1)
RANK, LR = 4, 1e-3


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def host():
    return tq.build_host(pretrain_steps=60, pretrain_batch=4)


def dataset_at_node_defaults(images, **overrides):
    required = nt.LoRACoreTrainDataset.INPUT_TYPES()["required"]
    kwargs = {name: spec[1]["default"] for name, spec in required.items()}
    kwargs.update(caption="sks square", **overrides)
    return nt.LoRACoreTrainDataset().build(images=images, **kwargs)


def train_kwargs(**overrides):
    """LoRACoreTrain at its widget defaults, with `overrides`."""
    required = nt.LoRACoreTrain.INPUT_TYPES()["required"]
    kwargs = {name: spec[1]["default"] for name, spec in required.items()
              if name not in ("model", "clip", "vae", "dataset")}
    kwargs.update(overrides)
    return kwargs


def train_ours(host, folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    dataset, _ = dataset_at_node_defaults(host.images)
    with loras_folder(folder):
        return nt.LoRACoreTrain().train(host.model, host.clip, host.vae, dataset, **train_kwargs(**overrides))


def patched_state(patcher) -> dict:
    """The weights a sampler runs with: the patcher loaded the way ComfyUI loads it, its state dict copied."""
    mm.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}


def test_dataset_keeps_small_images_at_their_size():
    images = tq.target_images(3)
    dataset, summary = dataset_at_node_defaults(images)
    assert {s.bucket for s in dataset.samples} == {(64, 64)}
    assert torch.allclose(dataset.samples[0].image, images[0].movedim(-1, 0), atol=1e-6)
    assert "3 image(s) too small for a 512 px bucket train at their own size (64x64)" in summary
    square, summary = dataset_at_node_defaults(images, bucketing=False)
    assert {s.bucket for s in square.samples} == {(512, 512)}
    assert "enlarged up to 8.0x" in summary
    large, summary = dataset_at_node_defaults(torch.rand(2, 600, 500, 3))
    assert {s.bucket for s in large.samples} == {(576, 448)} and "note" not in summary  # as before: downscaled


def test_model_output_equals_saved_file_in_core_loader(host, tmp_path):
    """Every weight of the returned MODEL and CLIP equals core's LoraLoader applying the saved file to the input
    model, and the file changes exactly the modules it names (all layers: every UNet Linear/Conv weight)."""
    model, clip, lora, _, _, report, *_ = train_ours(host, tmp_path, steps=3, rank=RANK, unet_lr=LR,
                                                 unet_targets="all layers", train_text_encoder=True,
                                                 text_encoder_lr=1e-3, save_precision="fp32")
    tensors = comfy.utils.load_torch_file(lora.path, safe_load=True)
    core_model, core_clip = comfy.sd.load_lora_for_models(host.model, host.clip, tensors, 1.0, 1.0)
    modules = {k.split(".")[0] for k in tensors}
    unet = host.model.model.diffusion_model
    n_weights = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
    assert len({m for m in modules if m.startswith("lora_unet_")}) == n_weights
    unet_map = comfy.lora.model_lora_keys_unet(host.model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(host.clip.cond_stage_model, {})
    for ours_patcher, core_patcher, base_patcher, key_map in ((model, core_model, host.model, unet_map),
                                                              (clip.patcher, core_clip.patcher, host.clip.patcher,
                                                               clip_map)):
        ours, core, base = patched_state(ours_patcher), patched_state(core_patcher), patched_state(base_patcher)
        assert ours.keys() == core.keys() == base.keys()
        for key in ours:
            tolerance = 1e-6 * max(1.0, core[key].abs().max().item())
            assert torch.allclose(ours[key], core[key], rtol=0, atol=tolerance), key
        changed = {k for k in ours if not torch.equal(ours[k], base[k])}
        expected = {key_map[m] for m in modules if m in key_map}
        assert changed == expected and changed, f"{len(changed)} weights changed, the file names {len(expected)}"
    assert {key_map for key_map in modules if key_map not in unet_map and key_map not in clip_map} == set()


def test_training_learns_the_training_images_at_least_as_much_as_core(host, tmp_path):
    base = host.error(host.model)
    reductions = {"core": [], "attn+ff+proj": [], "all layers": []}
    for seed in SEEDS:
        core_model, _ = tq.train_core(host.model, host.latents, host.context, STEPS, LR, RANK, seed)
        reductions["core"].append(base.reduction(host.error(core_model)))
        for targets in ("attn+ff+proj", "all layers"):
            model = train_ours(host, tmp_path / f"{targets}-{seed}", steps=STEPS, rank=RANK, unet_lr=LR,
                               unet_targets=targets, seed=seed)[0]
            reductions[targets].append(base.reduction(host.error(model)))
    mean = {name: {space: sum(r[space] for r in runs) / len(runs) for space in ("x0", "pred")}
            for name, runs in reductions.items()}
    print({name: {space: f"{100 * v:.1f}%" for space, v in values.items()} for name, values in mean.items()})
    core, default, every = mean["core"], mean["attn+ff+proj"], mean["all layers"]
    # ours learns the images in both spaces...
    assert default["x0"] > 0.03 and default["pred"] > 0.04
    assert every["x0"] > 0.08 and every["pred"] > 0.08
    # ...at least as much as core per step: all layers in both spaces, kohya's targets in the model's own space
    # (core's x0-space loss puts its weight on the highest sigmas, which x0 error is mostly made of)
    assert every["x0"] >= core["x0"] and every["pred"] >= 2 * core["pred"]
    assert default["pred"] >= 1.2 * core["pred"]
