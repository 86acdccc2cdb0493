"""DiT training on Wan 2.1 / 2.2 video latents with the real host, following tests/test_train_dit.py: the model's own
flow-matching objective from ComfyUI's model_sampling (WAN21: ModelSamplingDiscreteFlow, shift 8, multiplier
1000), the backend calling WanModel as the sampler does on 5-D latents, the loss falling on a tiny Wan trained from
a dataset folder of two videos given as frames sub-folders, the saved file in musubi-tuner's naming
(`lora_unet_<native path _>`, networks/lora_wan.py) with the Wan family's metadata, loading in core's loader with
no key left and in ours with every module matched and the same weights, one Wan 2.2 expert's timestep range
respected and written (`modelspec.timestep_range`, read by lora_core.pairs), and video bucketing.

Hosts (ComfyUI's own classes, tests/tiny_wan.py): WanModel at dim 64, 2 blocks, text width 32 (supported_models.
WAN21_T2V, the structure of Wan 2.1 T2V and of each Wan 2.2 T2V-A14B expert); ComfyUI's Wan 2.1 VAE (WanVAE) at
base width 8, its latents standardised per channel on the training videos through the model's latent format;
ComfyUI's Wan text encoder (WanTEModel, UMT5) shrunk to width 32. Text: UMT5's SentencePiece model ships inside the
UMT5-XXL checkpoint, not with ComfyUI, so the tiny CLIP tokenizes with the T5 tokenizer ComfyUI ships (its ids are a
subset of UMT5's vocabulary; tests/tiny_wan.comfy_clip_wan_tokenizing) - the captions then go the node's own way
(CLIP.tokenize, encode_from_tokens). A real Wan needs its UMT5-XXL CLIP (umt5_xxl_fp8 / fp16) loaded by core.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import input_folder, loras_folder
from tests import tiny_wan as tw
from tests.test_train_dit import LOSS_RATIO_MAX
from tests.test_train_flux import (ConcatRecorder, FamilyHost, core_loads_every_key, file_metadata, file_modules,
                                   flow_error, patched_state, sampler_call, single_thread)  # noqa: F401 (single_thread: a fixture)
from tests.test_train_nodes import DATASET_DEFAULTS, train_kwargs, train_nodes

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core import pairs  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.errors import LoraFileError, LoraValueError  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402
from lora_core.train import video  # noqa: E402

nt = train_nodes()
host_module = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"])
loader_module = __import__(nt.__name__.rsplit(".", 1)[0] + ".loader", fromlist=["apply_requests"])

STEPS = 40
LR = 1e-2
RANK = 4
FRAMES = 5                     # 4k + 1: two latent frames
SIZE = (64, 32)                # (w, h) of the training videos: bucket 64x32 at resolution 48 (about 48² pixels)
DATASET = {**DATASET_DEFAULTS, "resolution": 48, "bucket_step": 16, "min_bucket": 16, "max_bucket": 64,
           "caption": "", "frames": FRAMES}
CAPTIONS = {"red_right": "sks red square moving right", "blue_down": "sks blue square moving down"}
# calibrated (seed 0, 40 steps, rank 4, batch 2, lr 1e-2): mean velocity-error reduction 33.5% (per level and
# video 25.1-38.8%), training loss first-10 mean 2.95 -> last-10 2.11
LEARN_MIN = 0.2


# ------------------------------------------------------------------------------------------ data

def moving_square(frames: int, size: tuple, colour, direction: str, seed: int) -> torch.Tensor:
    """(frames, h, w, 3) in [0, 1]: grey with a coloured square moving one step per frame."""
    w, h = size
    gen = torch.Generator().manual_seed(seed)
    side = h // 2
    video = torch.full((frames, h, w, 3), 0.5)
    for f in range(frames):
        x, y = (4 + 6 * f, 4) if direction == "right" else (w // 2 - side // 2, 1 + 3 * f)
        video[f, y:y + side, x:x + side] = torch.tensor(colour)
    return (video + 0.02 * torch.randn(video.shape, generator=gen)).clamp(0, 1)


def save_frames(folder, name: str, frames: torch.Tensor, caption: str = None) -> str:
    """A frames sub-folder `folder/name/0000.png ...` and its caption `folder/name.txt`."""
    from PIL import Image

    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray((frame * 255).round().byte().numpy()).save(os.path.join(path, f"{i:04d}.png"))
    if caption is not None:
        with open(path + ".txt", "w") as handle:
            handle.write(caption)
    return path


def save_clip(path: str, frames: torch.Tensor, codec: str = "libx264") -> str:
    """An .mp4 clip of `frames` (F, h, w, 3) through PyAV (near-lossless H.264)."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=16)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        stream.options = {"crf": "0"} if codec == "libx264" else {}
        for frame in frames:
            image = av.VideoFrame.from_ndarray((frame * 255).round().byte().numpy(), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def training_videos() -> dict:
    return {"red_right": moving_square(FRAMES, SIZE, (0.9, 0.1, 0.1), "right", 1),
            "blue_down": moving_square(FRAMES, SIZE, (0.1, 0.2, 0.9), "down", 2)}


class StandardVAE:
    """ComfyUI's Wan VAE (tests/tiny_wan.comfy_wan_vae) whose latents are standardised per channel on the training
    videos through the model's latent format: process_latent_in of what encode returns has mean 0, std 1 (what the
    real Wan VAE gives real videos; a random tiny VAE's raw latents are far from Wan 2.1's statistics). `vae`: another
    video VAE (the TI2V-5B's Wan 2.2 VAE, tests/tiny_wan.comfy_wan22_vae)."""

    def __init__(self, model, videos, vae=None):
        self.vae, self.model = vae if vae is not None else tw.comfy_wan_vae(), model
        raw = torch.cat([self.vae.encode(v) for v in videos])
        self.mean = raw.mean(dim=(0, 2, 3, 4), keepdim=True)
        self.std = raw.std(dim=(0, 2, 3, 4), keepdim=True)

    def encode(self, pixels):
        return self.model.model.process_latent_out((self.vae.encode(pixels) - self.mean) / self.std)


class Host(FamilyHost):
    steps, rank, lr, train_defaults = STEPS, RANK, LR, {"save_precision": "fp32"}

    def __init__(self, root):
        self.model, self.clip = tw.comfy_wan("t2v"), tw.comfy_clip_wan_tokenizing()
        self.videos = training_videos()
        self.root = root
        folder = root / "wan_videos"
        for name, frames in self.videos.items():
            save_frames(folder, name, frames, CAPTIONS[name])
        self.vae = StandardVAE(self.model, list(self.videos.values()))
        with input_folder(root):
            self.dataset, self.summary = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": "wan_videos"})
        # the latents the training sees: the dataset's frames (read back from the PNGs) through the VAE
        self.latents = {os.path.basename(s.source): self.model.model.process_latent_in(
            self.vae.encode(s.image.movedim(0, -1))).detach() for s in self.dataset.samples}

    def conds(self, name: str) -> dict:
        return super().conds(CAPTIONS[name])


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("wan_data"))


@pytest.fixture(scope="module")
def run(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_loras")
    model, clip, lora, curve, name, report, *_ = host.train(folder)
    state = lt.load_state(os.path.join(folder, "sq.state.pt"))
    return dict(model=model, lora=lora, report=report, losses=state["losses"], path=lora.path)


# ------------------------------------------------------------------------------------------ spec and objective

MUSUBI_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"


def musubi_targets(unet) -> set:
    """What musubi-tuner's networks/lora_wan.py trains, by its own rule: every nn.Linear inside a
    WanAttentionBlock (WAN_TARGET_REPLACE_MODULES), named `lora_unet_<path _>` (networks/lora.py: prefix + the
    module path with '.' -> '_'), minus its default exclude pattern matched on the original name."""
    import re

    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ != "WanAttentionBlock":
            continue
        for sub, child in module.named_modules():
            if isinstance(child, torch.nn.Linear) and not re.match(MUSUBI_EXCLUDE, f"{path}.{sub}"):
                names.add("lora_unet_" + f"{path}.{sub}".replace(".", "_"))
    return names


def test_train_spec_targets_are_musubis_and_all_layers_every_linear(host):
    unet = host.model.model.diffusion_model
    arch, spec = nt.model_train_spec(host.model)
    assert arch.family.name == "wan" and spec.latent_dims == 3 and spec.block_lists == ("blocks",)
    key_map = host_module.HostModels(host.model).key_map
    default = {t.name for t in lt.find_denoiser_targets(unet, key_map, spec, spec.target_sets["attn+ff+proj"])}
    expected = musubi_targets(unet)
    assert len(expected) == 2 * 10 and default == expected        # q k v o twice + ffn.0 / ffn.2, per block
    every = {t.name for t in lt.find_denoiser_targets(unet, key_map, spec, spec.target_sets["all layers"])}
    linears = {"lora_unet_" + p.replace(".", "_") for p, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert every == linears and every - default == {
        "lora_unet_text_embedding_0", "lora_unet_text_embedding_2", "lora_unet_time_embedding_0",
        "lora_unet_time_embedding_2", "lora_unet_time_projection_1", "lora_unet_head_head"}


def test_objective_is_wan21_model_sampling(host):
    """Flow matching at the shift ComfyUI samples Wan with (supported_models.WAN21_T2V: shift 8.0, multiplier
    1000); the noised input and the timestep input are the sampler's own (noise_scaling, timestep), on 5-D
    latents; the family's default sampling is musubi's `shift` (logit-normal shifted by the model's shift)."""
    arch, spec = nt.model_train_spec(host.model)
    objective = nt.ComfyBackend(host.model, host.clip, train_spec=spec).objective
    sampling = host.model.get_model_object("model_sampling")
    assert objective.is_flow and objective.shift == pytest.approx(8.0, rel=1e-5)
    assert objective.multiplier == pytest.approx(1000.0)
    assert objective.resolve_sampling("auto") == "logit-normal, model shift"
    sigma = torch.tensor([0.2, 0.7])
    x0, noise = torch.randn(2, 16, 2, 4, 8), torch.randn(2, 16, 2, 4, 8)
    assert torch.allclose(objective.noisy(x0, noise, sigma), sampling.noise_scaling(sigma, noise, x0), atol=1e-6)
    assert torch.allclose(objective.model_timesteps(sigma).float(), sampling.timestep(sigma).float())


def test_backend_calls_wan_the_way_the_sampler_does(host):
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    conds = host.conds("red_right")
    x = torch.randn((2, 16, 2, 4, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    mm.load_models_gpu([host.model], force_full_load=True)
    with torch.no_grad():
        out = backend.denoise(x, backend.objective.model_timesteps(sigma), {"context": conds["cond"].expand(2, -1, -1)})
    ours = backend.sampling.calculate_denoised(sigma, out.float(), x)
    assert torch.allclose(ours, sampler_call(host.model, x, sigma, conds), atol=1e-5)
    other = sampler_call(host.model, x, sigma, host.conds("blue_down"))
    assert not torch.allclose(ours, other, atol=1e-4)   # the text is live


# ------------------------------------------------------------------------------------------ the training run

def test_dataset_is_two_videos_encoded_to_video_latents(host):
    assert "2 videos (5 frames)" in host.summary
    assert [tuple(s.image.shape) for s in host.dataset.samples] == [(3, FRAMES, 32, 64)] * 2
    assert sorted(s.caption for s in host.dataset.samples) == sorted(CAPTIONS.values())
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    latent = backend.encode_images(host.dataset.samples[0].image[None], host.vae)
    assert tuple(latent.shape) == (1, 16, 2, 4, 8)   # (B, C, (F - 1) / 4 + 1, h / 8, w / 8): Wan 2.1's VAE
    name = os.path.basename(host.dataset.samples[0].source)
    assert torch.allclose(latent, host.latents[name], atol=1e-5)


def test_loss_falls(host, run):
    before = {n: flow_error(host.model, host.latents[n], host.conds(n)) for n in CAPTIONS}
    after = {n: flow_error(run["model"], host.latents[n], host.conds(n)) for n in CAPTIONS}
    total_before = sum(sum(v) for v in before.values())
    total_after = sum(sum(v) for v in after.values())
    per_level = [1 - a / b for n in CAPTIONS for a, b in zip(after[n], before[n])]
    mean = 1 - total_after / total_before
    losses = run["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"wan: velocity error {total_before / 12:.4f} -> {total_after / 12:.4f} ({100 * mean:.1f}%), per level "
          f"{' '.join(f'{100 * r:.1f}' for r in per_level)}; training loss first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == STEPS and all(v == v for v in losses)
    assert mean > LEARN_MIN and min(per_level) > 0
    assert last < LOSS_RATIO_MAX * first


def test_saved_file_has_musubi_names_and_wan_metadata(host, run):
    modules = file_modules(run["path"])
    assert modules == musubi_targets(host.model.model.diffusion_model)
    meta = file_metadata(run["path"])
    assert meta["ss_base_model_version"] == "wan"                       # musubi dataset/architectures.py
    assert meta["modelspec.architecture"] == "wan2.1/lora"              # musubi utils/sai_model_spec.py ARCH_WAN
    assert meta["modelspec.implementation"] == "https://github.com/Wan-Video/Wan2.1"
    assert meta["ss_network_module"] == "networks.lora_wan"
    assert meta["ss_network_dim"] == str(RANK) and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_timestep_sampling"] == "logit-normal, model shift" and meta["ss_discrete_flow_shift"] == "8"
    assert "modelspec.timestep_range" not in meta
    from lora_core.arch.registry import detect_lora

    assert detect_lora(read_lora_file(run["path"])).family.name == "wan"          # from its metadata
    assert detect_lora(read_lora_file(run["path"]), use_metadata=False).family.name == "wan"   # from its names


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_saved_file_loads_fully_in_core_and_ours_with_the_same_weights(host, run, strength, caplog):
    tensors = comfy.utils.load_torch_file(run["path"], safe_load=True)
    modules = file_modules(run["path"])
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        core_model, _ = comfy.sd.load_lora_for_models(host.model, host.clip, tensors, strength, strength)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(core_model.patches) == len(modules)
    lora = read_lora_file(run["path"])
    plan = host_module.HostModels(host.model, host.clip).plan([LoraRequest(lora, strength, strength)])
    report = plan.reports[0]
    assert report.unmatched == [] and report.unused_keys == [] and report.skipped == {}
    assert report.applied["transformer"] == len(modules) == report.matched
    ours, _, _ = loader_module.apply_requests(host.model, host.clip, [LoraRequest(lora, strength, strength)])
    base, mine, theirs = patched_state(host.model), patched_state(ours), patched_state(core_model)
    changed = 0
    for key in base:
        delta = theirs[key] - base[key]
        scale = max(1e-8, float(delta.abs().max()))
        assert float((mine[key] - theirs[key]).abs().max()) <= 1e-5 * max(1.0, scale), key
        changed += bool(delta.abs().max() > 0)
    assert changed == len(modules)
    if strength == 1.0:   # the MODEL the train node returned is the file applied
        returned = patched_state(run["model"])
        assert all(torch.allclose(returned[k], theirs[k], atol=1e-5) for k in base)


# ------------------------------------------------------------------------------------------ one Wan 2.2 expert

def test_timestep_range_draws_only_inside_and_keeps_the_shape(host):
    arch, spec = nt.model_train_spec(host.model)
    objective = nt.ComfyBackend(host.model, host.clip, train_spec=spec).objective
    assert arch.family.timestep_ranges(arch) == {"high noise": (875, 1000), "low noise": (0, 875)}
    full = objective.sample(20000, torch.Generator().manual_seed(3))
    for lo, hi in ((875, 1000), (0, 875), (300, 400)):
        ranged = objective.with_timestep_range((lo, hi)).sample(4000, torch.Generator().manual_seed(4))
        assert ranged.shape == (4000,) and bool(((ranged >= lo / 1000) & (ranged <= hi / 1000)).all())
        inside = full[(full >= lo / 1000) & (full <= hi / 1000)]
        # musubi's preserve_distribution_shape: the same distribution, cut to the range (medians agree)
        assert abs(float(ranged.median()) - float(inside.median())) < 0.02 * (hi - lo) / 1000 + 0.002
    with pytest.raises(LoraValueError, match="0 <= min < max <= 1000"):
        lt.parse_timestep_range("900,875")
    with pytest.raises(LoraValueError, match="875,1000"):
        lt.parse_timestep_range("highest", arch.family.timestep_ranges(arch))


@pytest.mark.parametrize("expert", ["high noise", "low noise"])
def test_one_expert_trains_inside_its_range_and_the_pair_loader_tells_which(expert, host, tmp_path, monkeypatch):
    seen = []
    denoise = nt.ComfyBackend.denoise

    def recording(self, noisy, timesteps, cond):
        seen.extend((timesteps.detach().float() / self.objective.multiplier).tolist())
        return denoise(self, noisy, timesteps, cond)

    monkeypatch.setattr(nt.ComfyBackend, "denoise", recording)
    model, clip, lora, curve, name, report, *_ = host.train(tmp_path, steps=6, timestep_range=expert,
                                                        output_name=f"wan_{expert.split()[0]}_noise")
    lo, hi = {"high noise": (0.875, 1.0), "low noise": (0.0, 0.875)}[expert]
    assert len(seen) == 12 and all(lo <= t <= hi for t in seen)
    meta = file_metadata(lora.path)
    assert meta["modelspec.timestep_range"] == {"high noise": "875,1000", "low noise": "0,875"}[expert]
    assert pairs.expert_of_metadata(meta) == ("high" if expert == "high noise" else "low")


# ------------------------------------------------------------------------------------------ video data, buckets

def test_video_folder_buckets_by_aspect_frames_and_clips(tmp_path):
    """Frames folders and an .mp4 clip in one folder: each video's bucket is chosen from its aspect (kohya's buckets
    of about resolution² pixels), frames are the first `frames` ones, batches come from one bucket and one frame
    count, and the plan is a function of the seed."""
    wide, tall = moving_square(9, (64, 32), (0.9, 0.1, 0.1), "right", 1), moving_square(9, (32, 64), (0.1, 0.8,
                                                                                                    0.2), "down", 2)
    save_frames(tmp_path, "wide_a", wide, "wide a")
    save_frames(tmp_path, "wide_b", wide.flip(0), "wide b")
    save_frames(tmp_path, "tall_a", tall, "tall a")
    save_clip(str(tmp_path / "tall_clip.mp4"), tall)
    (tmp_path / "tall_clip.txt").write_text("tall clip")
    options = dict(resolution=48, bucket_step=16, min_bucket=16, max_bucket=64, repeats=2)
    dataset = lt.load_folder(str(tmp_path), frames=5, **options)
    shapes = {os.path.basename(s.source): tuple(s.image.shape) for s in dataset.samples}
    assert shapes == {"wide_a": (3, 5, 32, 64), "wide_b": (3, 5, 32, 64), "tall_a": (3, 5, 64, 32),
                      "tall_clip.mp4": (3, 5, 64, 32)}
    assert dataset.bucket_counts() == {(32, 64): 4, (64, 32): 4}      # same pixel count, both aspects
    clip = next(s for s in dataset.samples if s.source.endswith(".mp4")).image
    framed = next(s for s in dataset.samples if s.source.endswith("tall_a")).image
    assert float((clip - framed).abs().mean()) < 0.02                 # the clip decodes to the same frames
    plan = lt.BatchPlan(dataset, 2, seed=5)
    batches = [plan.batch(i) for i in range(2 * plan.batches_per_epoch)]
    for batch in batches:
        assert len({dataset.samples[i].batch_key for i in batch}) == 1
    assert batches == [lt.BatchPlan(dataset, 2, seed=5).batch(i) for i in range(len(batches))]
    assert batches != [lt.BatchPlan(dataset, 2, seed=6).batch(i) for i in range(len(batches))]
    every = lt.load_folder(str(tmp_path), frames=-1, **options)         # -1: each video's own 4k + 1 (9 frames)
    assert {s.image.shape[1] for s in every.samples} == {9}
    # frames 0 (the default) is an image dataset, as before: a folder of videos only is refused naming `frames`
    with pytest.raises(LoraValueError, match=r"4 video\(s\) \(tall_a, tall_clip.mp4, wide_a, \.\.\.\) and no images: "
                                             r"set `frames`"):
        lt.load_folder(str(tmp_path), **options)


def test_video_data_errors_name_the_file_and_the_fix(tmp_path, host):
    save_frames(tmp_path, "short", moving_square(3, (64, 32), (0.9, 0.1, 0.1), "right", 1), "short")
    with pytest.raises(LoraFileError, match=r"short has 3 frame\(s\), fewer than frames=5.*e\.g\. 1"):
        lt.load_folder(str(tmp_path), frames=5, resolution=48, bucket_step=16, min_bucket=16)
    with pytest.raises(LoraValueError, match="4k \\+ 1 frames"):
        lt.load_folder(str(tmp_path), frames=4, resolution=48, bucket_step=16, min_bucket=16)
    (tmp_path / "short.txt").unlink()
    with pytest.raises(LoraFileError, match=r"no caption file, e.g. \[.short.\].*short\.txt beside it"):
        lt.load_folder(str(tmp_path), frames=1, resolution=48, bucket_step=16, min_bucket=16)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(LoraFileError, match="broken.mp4 cannot be read"):
        video.load_video(str(tmp_path / "broken.mp4"), 1, 48, True, 16, 16, 64)
    # a video dataset on an image model: refused before training, naming a video
    from lora_core.arch.families import sd3

    spec = sd3.FAMILY.train_spec(sd3.SD35_MEDIUM)
    with pytest.raises(LoraValueError, match="video sample.*image model"):
        nt._check_latent_rank(host.dataset, spec, sd3.SD35_MEDIUM)


def test_text_encoder_training_writes_names_core_reads(host, tmp_path, caplog):
    """With train_text_encoder, Wan's UMT5 (te1) trains too (musubi trains none; its attention / FFN Linears here),
    named as core maps UMT5 (`text_encoders.umt5xxl.transformer.<path>`, comfy.lora.model_lora_keys_clip): the file
    still loads in core with no key left."""
    model, clip, lora, curve, name, report, *_ = host.train(tmp_path, steps=3, train_text_encoder=True,
                                                        output_name="wan_te")
    modules = file_modules(lora.path)
    te = {m for m in modules if m.startswith("text_encoders.umt5xxl.transformer.encoder.block.")}
    assert len(te) == 2 * 7 and len(modules - te) == 20     # q k v o wi_0 wi_1 wo per UMT5 block
    tensors = comfy.utils.load_torch_file(lora.path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        core_model, core_clip = comfy.sd.load_lora_for_models(host.model, host.clip, tensors, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(core_model.patches) == 20 and len(core_clip.patcher.patches) == 14


def test_expert_ranges_per_variant_and_none_for_the_5b():
    """The I2V-A14B experts split at 900 (musubi docs/wan.md: --timestep_boundary 0.9 for I2V), T2V at 875; the
    TI2V-5B is one model, not an expert pair: no named ranges (tests/test_train_wan5b.py trains it)."""
    from lora_core.arch.families import wan

    assert wan.FAMILY.timestep_ranges(wan.WAN22_I2V_A14B) == {"high noise": (900, 1000), "low noise": (0, 900)}
    assert wan.FAMILY.timestep_ranges(wan.WAN_T2V_14B)["high noise"] == (875, 1000)
    assert wan.FAMILY.train_spec(wan.WAN21_T2V_1_3B).latent_dims == 3
    assert wan.FAMILY.timestep_ranges(wan.WAN22_TI2V_5B) == {}
    with pytest.raises(LoraValueError, match="one of \\['high noise', 'low noise'\\]"):
        lt.parse_timestep_range("highest", wan.FAMILY.timestep_ranges(wan.WAN22_I2V_A14B))


def test_images_beside_videos_train_as_one_frame_videos(host, tmp_path):
    from PIL import Image

    save_frames(tmp_path, "clip", training_videos()["red_right"], "a clip")
    Image.fromarray((training_videos()["blue_down"][0] * 255).byte().numpy()).save(tmp_path / "still.png")
    (tmp_path / "still.txt").write_text("a still")
    with input_folder(tmp_path.parent):
        dataset, summary = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": tmp_path.name})
    assert "1 videos (5 frames) + 1 images" in summary
    with input_folder(tmp_path.parent):   # frames 0: the images only, the video left out (with a warning)
        images, summary = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": tmp_path.name, "frames": 0})
    assert summary.startswith("1 images") and [s.source for s in images.samples] == [str(tmp_path / "still.png")]
    shapes = sorted(tuple(s.image.shape) for s in dataset.samples)
    assert shapes == [(3, 5, 32, 64), (3, 32, 64)]
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    still = next(s for s in dataset.samples if s.image.ndim == 3)
    assert tuple(backend.encode_images(still.image[None], host.vae).shape) == (1, 16, 1, 4, 8)
    plan = lt.BatchPlan(dataset, 2, seed=0)
    assert all(len(plan.batch(i)) == 1 for i in range(plan.batches_per_epoch))   # never batched together


@pytest.mark.parametrize("variant", ["i2v", "i2v-a14b"])
def test_i2v_variants_train_on_their_first_frame_and_load_fully(variant, host, tmp_path, caplog):
    """Wan 2.1 I2V (CLIP-image branch: cross_attn.k_img / v_img train too, as musubi's WanAttentionBlock Linears)
    and a Wan 2.2 I2V-A14B expert (36 input channels) train on the same videos conditioned on each clip's first
    frame: the model gets the concat_latent_image / concat_mask ComfyUI's own WanImageToVideo node builds from that
    frame (musubi trains I2V the same way); the file loads in core with no key left."""
    import comfy_extras.nodes_wan as nodes_wan

    model = tw.comfy_wan(variant)
    vae = StandardVAE(model, list(host.videos.values()))
    folder = tmp_path / "loras"
    folder.mkdir()
    kwargs = train_kwargs(steps=3, rank=RANK, alpha=float(RANK), unet_lr=LR, train_text_encoder=False, batch_size=2,
                          output_name=f"wan_{variant}")
    with loras_folder(folder), ConcatRecorder(model) as recorder:
        _, _, lora, *_ = nt.LoRACoreTrain().train(model, host.clip, vae, host.dataset, **kwargs,
                                                       timestep_range="low noise")
    seen = recorder.seen
    # what core's WanImageToVideo gives for each training clip's first frame
    expected = []
    for sample in host.dataset.samples:
        frames = sample.image.movedim(0, -1)                        # (F, H, W, 3)
        positive, _, _ = nodes_wan.WanImageToVideo.execute(
            positive=[[host.conds(next(iter(CAPTIONS)))["cond"], {}]], negative=[], vae=vae,
            width=frames.shape[2], height=frames.shape[1], length=frames.shape[0], batch_size=1,
            start_image=frames[:1])
        expected.append(positive[0][1])
    assert len(seen) == 3 and all(set(s) == {"concat_latent_image", "concat_mask"} for s in seen)
    for step in seen:
        for image, mask in zip(step["concat_latent_image"], step["concat_mask"]):
            errors = [(image - e["concat_latent_image"][0]).abs().max().item() for e in expected]
            best = min(range(len(expected)), key=errors.__getitem__)
            assert errors[best] < 1e-5, errors
            assert torch.equal(mask, expected[best]["concat_mask"][0].to(mask.dtype))
            assert max(errors) > 1e-3   # the clips' first frames differ: the conditioning is each sample's own
    modules = file_modules(lora.path)
    assert modules == musubi_targets(model.model.diffusion_model)
    assert any(m.endswith("cross_attn_k_img") for m in modules) == (variant == "i2v")
    assert file_metadata(lora.path)["modelspec.timestep_range"] == "0,900"   # 36 input channels: I2V's boundary
    core_model = core_loads_every_key(model, host.clip, lora.path, caplog)
    assert len(core_model.patches) == len(modules)


def test_continuing_an_expert_keeps_its_range(host, tmp_path):
    """run=continue resumes the same expert (its range stays in the file); another range is refused by name."""
    host.train(tmp_path, steps=2, timestep_range="high noise", output_name="expert")
    _, _, lora, *_ = host.train(tmp_path, steps=2, timestep_range="875,1000", output_name="expert",
                                     run="continue")
    meta = file_metadata(lora.path)
    assert meta["ss_steps"] == "4" and meta["modelspec.timestep_range"] == "875,1000"
    with pytest.raises(LoraValueError, match=r"timestep_range=\(875.0, 1000.0\).*timestep_range=\(0.0, 875.0\)"):
        host.train(tmp_path, steps=2, timestep_range="low noise", output_name="expert", run="continue")


def test_gradient_checkpointing_wraps_the_blocks_and_changes_nothing(host, tmp_path):
    """Gradient checkpointing wraps the WanAttentionBlocks (TrainSpec.block_lists): the same losses and file."""
    runs = {}
    for flag in (False, True):
        host.train(tmp_path / str(flag), steps=3, gradient_checkpointing=flag, output_name="ckpt")
        runs[flag] = lt.load_state(str(tmp_path / str(flag) / "ckpt.state.pt"))
    assert runs[True]["losses"] == pytest.approx(runs[False]["losses"], rel=1e-5)
    for key, value in runs[False]["lora"].items():
        assert torch.allclose(runs[True]["lora"][key], value, atol=1e-6), key
    arch, spec = nt.model_train_spec(host.model)
    blocks = nt.ComfyBackend(host.model, host.clip, train_spec=spec).checkpoint_modules()
    assert [type(b).__name__ for b in blocks] == ["WanAttentionBlock"] * 2
