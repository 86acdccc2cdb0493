"""Previews of image-to-video training start from a start image, as ComfyUI's own I2V nodes render them: every
preview prompt gets the conditioning ComfyUI's WanImageToVideo (Wan 2.1 I2V: positive and negative) or
HunyuanImageToVideo "v1 (concat)" (HunyuanVideo I2V: positive only) builds from that image at the preview's size
and length (one frame, as the previews have always been), through the training's own start-image path
(ComfyBackend.start_image_conditioning_of). The start image is LoRACoreTrain's `preview_image` (its first image,
resized) or, unconnected, the first frame of the dataset's first sample. Captured where the sampler hands it over
during previews: each conditioning's extra_conds (prompt type, concat_latent_image, concat_mask) and each model
call's c_concat. A text-to-video model's previews are unchanged by preview_image; the previews' signature (kept
across run=continue) names the start image, so resumed grids of another start image are not mixed in.

Hosts as tests/test_train_wan.py and tests/test_train_hunyuan_video_15.py build them: tiny Wan 2.1 I2V / T2V
(tests/tiny_wan.py) and HunyuanVideo I2V (tests/tiny_hunyuan_video.py), ComfyUI's Wan VAE standardised on the two
training videos, one training step, previews at steps 0 and 1 with a negative prompt at cfg 2.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests import tiny_hunyuan_video as th
from tests import tiny_wan as tw
from tests.pack import input_folder, loras_folder
from tests.test_train_flux import single_thread  # noqa: F401 (a fixture)
from tests.test_train_nodes import train_kwargs
from tests.test_train_wan import CAPTIONS, DATASET, StandardVAE, nt, save_frames, training_videos

import comfy.sample  # noqa: E402  (ComfyUI is imported by tests.test_train_wan)
import comfy_extras.nodes_hunyuan as nodes_hunyuan  # noqa: E402
import comfy_extras.nodes_wan as nodes_wan  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402

tp = sys.modules[nt.__package__ + ".train_preview"]

WIDTH, HEIGHT = 48, 32            # the previews' size (the training videos are 64 x 32)
PROMPTS = "sks red square --n blurry"
PREVIEWS = dict(preview_every=1, preview_prompts=PROMPTS, preview_steps=2, preview_cfg=2.0, preview_seed=3,
                preview_width=WIDTH, preview_height=HEIGHT)
KEYS = ("concat_latent_image", "concat_mask")


class PreviewVAE(StandardVAE):
    """tests/test_train_wan.StandardVAE that also decodes (its standardisation undone): what previews need."""

    def decode(self, latents):
        raw = self.model.model.process_latent_in(latents) * self.std + self.mean
        return self.vae.decode(raw)

    def spacial_compression_encode(self):
        return self.vae.spacial_compression_encode()


def start_image() -> torch.Tensor:
    """A (1, 50, 70, 4) RGBA IMAGE of another shape and aspect than the previews (resize and centre crop matter):
    a gradient with a green square off centre, made under inference mode as ComfyUI runs the node that loads it."""
    with torch.inference_mode():
        y, x = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 70), indexing="ij")
        image = torch.stack([x, y, 1 - x, torch.ones_like(x)], dim=-1)[None].clone()
        image[0, 10:30, 40:60, :3] = torch.tensor([0.1, 0.9, 0.2])
    assert image.is_inference()
    return image


class Host:
    def __init__(self, root, family: str, variant: str):
        if family == "wan":
            self.model, self.clip = tw.comfy_wan(variant), tw.comfy_clip_wan_tokenizing()
        else:
            self.model, self.clip = th.comfy_hunyuan_video(variant), th.comfy_clip_hunyuan_video()
        videos = training_videos()
        for name, frames in videos.items():
            save_frames(root / "videos", name, frames, CAPTIONS[name])
        self.vae = PreviewVAE(self.model, list(videos.values()))
        with input_folder(root):
            self.dataset, _ = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": "videos"})
        self.root = root

    def train(self, output_name: str, **overrides):
        """One training step with previews at steps 0 and 1; the node's outputs and what the sampler got."""
        folder = self.root / "loras"
        folder.mkdir(exist_ok=True)
        kwargs = train_kwargs(**{"steps": 1, "rank": 4, "alpha": 4.0, "unet_lr": 1e-2, "train_text_encoder": False,
                                 "batch_size": 2, "save_precision": "fp32", "output_name": output_name,
                                 **PREVIEWS, **overrides})
        with loras_folder(folder), PreviewRecorder(self.model) as recorder:
            outputs = nt.LoRACoreTrain().train(self.model, self.clip, self.vae, self.dataset, **kwargs)
        return outputs, recorder

    def signature(self, output_name: str) -> str:
        state = lt.load_state(os.path.join(self.root / "loras", f"{output_name}.state.pt"))
        return state["extra"]["previews"]["signature"]


class PreviewRecorder:
    """While previews sample (comfy.sample.sample, the call PreviewRenderer makes): what each conditioning's
    extra_conds receives (its prompt type and concat keys, as tests/test_train_flux.ConcatRecorder) and each model
    call's noise and c_concat."""

    def __init__(self, model):
        self.base, self.conds, self.calls, self.active = model.model, [], [], False

    def __enter__(self):
        extra_conds, apply_model, sample = self.base.extra_conds, self.base.apply_model, comfy.sample.sample

        def recorded_extra_conds(**kwargs):
            if self.active:
                self.conds.append((kwargs.get("prompt_type"), {k: kwargs[k].detach().clone() for k in KEYS
                                                               if k in kwargs}))
            return extra_conds(**kwargs)

        def recorded_apply_model(x, t, c_concat=None, *args, **kwargs):
            if self.active:
                self.calls.append((x.detach().clone(), None if c_concat is None else c_concat.detach().clone()))
            return apply_model(x, t, c_concat, *args, **kwargs)

        def recorded_sample(*args, **kwargs):
            self.active = True
            try:
                return sample(*args, **kwargs)
            finally:
                self.active = False

        self.base.extra_conds, self.base.apply_model = recorded_extra_conds, recorded_apply_model
        self._sample, comfy.sample.sample = sample, recorded_sample
        return self

    def __exit__(self, *exc):
        del self.base.extra_conds, self.base.apply_model
        comfy.sample.sample = self._sample
        return False


def node_conditioning(host, family: str, image: torch.Tensor):
    """What ComfyUI's own node gives the sampler for `image` at the preview's size and length (1 frame):
    (positive values, negative values or None, the node's latent)."""
    cond = [[torch.zeros(1, 4, 32), {}]]
    if family == "wan":
        positive, negative, latent = nodes_wan.WanImageToVideo.execute(
            positive=cond, negative=cond, vae=host.vae, width=WIDTH, height=HEIGHT, length=1, batch_size=1,
            start_image=image)
        return positive[0][1], negative[0][1], latent["samples"]
    positive, latent = nodes_hunyuan.HunyuanImageToVideo.execute(
        positive=cond, vae=host.vae, width=WIDTH, height=HEIGHT, length=1, batch_size=1,
        guidance_type="v1 (concat)", start_image=image)
    return positive[0][1], None, latent["samples"]


def first_frame(sample) -> torch.Tensor:
    return sample.image[:, 0].movedim(0, -1)[None]          # (3, F, H, W) -> (1, H, W, 3)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def check_previews_got(host, recorder, family: str, expected, previews: int = 2):
    """Every preview conditioning carries the node's values (Wan: the negative too; Hunyuan: the positive only),
    every preview model call the c_concat the model builds from them, on the node's latent size and length."""
    positive, negative, latent = expected
    by_type = {"positive": [v for t, v in host_conds(recorder, "positive")],
               "negative": [v for t, v in host_conds(recorder, "negative")]}
    assert len(by_type["positive"]) == len(by_type["negative"]) == previews   # one prompt per preview row
    for prompt_type, wanted in (("positive", positive), ("negative", negative)):
        for values in by_type[prompt_type]:
            if wanted is None:
                assert values == {}, prompt_type
                continue
            assert set(values) == set(KEYS)
            error = max_error(values["concat_latent_image"], wanted["concat_latent_image"])
            print(f"{family} {prompt_type}: concat_latent_image vs the node's {error:.1e}")
            assert error < 1e-5
            assert torch.equal(values["concat_mask"], wanted["concat_mask"].to(values["concat_mask"].dtype))
    assert recorder.calls and all(tuple(x.shape[2:]) == tuple(latent.shape[2:]) for x, _ in recorder.calls)
    x = recorder.calls[0][0]
    concat = host.model.model.concat_cond(noise=x[:1], device=x.device, latent_image=torch.zeros_like(x[:1]),
                                          **positive)
    assert all(c is not None for _, c in recorder.calls)
    errors = [max_error(row, concat[0]) for _, c_concat in recorder.calls for row in c_concat]
    # cfg 2, euler: a positive and a negative evaluation per sampling step (batched together or not)
    assert len(errors) == 2 * PREVIEWS["preview_steps"] * previews
    print(f"{family}: {len(errors)} preview model evaluations, c_concat vs the node's: "
          f"{min(errors):.1e} (best) {max(errors):.1e} (worst)")
    if family == "wan":
        assert max(errors) < 1e-5, errors
    else:   # the positive carries the start image; the negative's concat is the model's own fill
        matched = [e < 1e-5 for e in errors]
        assert sum(matched) == len(errors) // 2 and all(e > 1e-3 for e in errors if e >= 1e-5), errors


def host_conds(recorder, prompt_type):
    return [(t, v) for t, v in recorder.conds if t == prompt_type]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("i2v_wan"), "wan", "i2v")


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("i2v_hunyuan"), "hunyuan", "i2v")


def test_wan_i2v_previews_start_from_preview_image_or_the_first_frame(wan):
    image = start_image()
    expected = node_conditioning(wan, "wan", image)
    (*_, report, grid), recorder = wan.train("with", preview_image=image)
    check_previews_got(wan, recorder, "wan", expected)
    assert grid.shape == (1, 2 * HEIGHT, WIDTH, 3) and "previews start from preview_image" in report

    # not connected: the first frame of the dataset's first sample (not the other sample's)
    first, other = (first_frame(s) for s in wan.dataset.samples)
    expected = node_conditioning(wan, "wan", first)
    (*_, report, _), recorder = wan.train("without")
    check_previews_got(wan, recorder, "wan", expected)
    name = os.path.basename(wan.dataset.samples[0].source)
    assert f"previews start from the first frame of {name}" in report
    seen = host_conds(recorder, "positive")[0][1]["concat_latent_image"]
    assert max_error(seen, node_conditioning(wan, "wan", other)[0]["concat_latent_image"]) > 1e-3

    # the signature (kept across run=continue) names the start image: rows of another start image are not mixed in
    with_sig, without_sig = (json.loads(wan.signature(n)) for n in ("with", "without"))
    assert with_sig["start_image"] != without_sig["start_image"]
    assert {k: v for k, v in with_sig.items() if k != "start_image"} == \
        {k: v for k, v in without_sig.items() if k != "start_image"}
    (*_, report, grid), _ = wan.train("without", run="continue", preview_image=image)
    assert "not taken over" in report and grid.shape == (1, 2 * HEIGHT, WIDTH, 3)
    (*_, report, grid), _ = wan.train("with", run="continue", preview_image=image)
    assert "previews continued: 2 row(s)" in report and grid.shape == (1, 3 * HEIGHT, WIDTH, 3)


def test_hunyuan_i2v_previews_condition_the_positive_as_hunyuan_image_to_video(hunyuan):
    image = start_image()
    (*_, report, _), recorder = hunyuan.train("with", preview_image=image)
    check_previews_got(hunyuan, recorder, "hunyuan", node_conditioning(hunyuan, "hunyuan", image))
    assert "previews start from preview_image" in report
    (*_, report, _), recorder = hunyuan.train("without")
    first = first_frame(hunyuan.dataset.samples[0])
    check_previews_got(hunyuan, recorder, "hunyuan", node_conditioning(hunyuan, "hunyuan", first))
    assert json.loads(hunyuan.signature("with"))["start_image"] != json.loads(hunyuan.signature("without"))["start_image"]


def test_t2v_previews_are_unchanged_by_preview_image(tmp_path):
    host = Host(tmp_path, "wan", "t2v")
    (*_, plain_report, plain), plain_recorder = host.train("plain")
    (*_, report, grid), recorder = host.train("image", preview_image=start_image())
    assert torch.equal(grid, plain)
    assert recorder.conds and all(values == {} for _, values in recorder.conds + plain_recorder.conds)
    assert all(c is None for _, c in recorder.calls)
    assert host.signature("image") == host.signature("plain") and "start_image" not in host.signature("plain")
    assert "start from" not in report


def test_bad_preview_image_is_refused_before_training(wan):
    for bad, got in ((torch.zeros(8, 8, 3), r"\(8, 8, 3\)"), (torch.zeros(1, 8, 8, 1), r"\(1, 8, 8, 1\)"),
                     ("a.png", "str")):
        with pytest.raises(LoraValueError, match=rf"preview_image must be an IMAGE .*got {got}.*leave preview_image "
                                                 rf"unconnected"):
            wan.train("bad", preview_image=bad)
        assert not (wan.root / "loras" / "bad.safetensors").exists()
