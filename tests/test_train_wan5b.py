"""DiT training on Wan 2.2 TI2V-5B with the real host, following tests/test_train_wan.py: ComfyUI's own WAN22 model
class (supported_models.WAN22_T2V: WanModel with 48 latent channels in and out, the Wan22 latent format, flow at
shift 8 / multiplier 1000), videos encoded by ComfyUI's Wan 2.2 VAE (48 channels, 16x spatial), the backend calling
the model as the sampler does (WAN22.process_timestep: one timestep per video, equal to the per-token path with a
full denoise mask), the loss falling, and the saved file in musubi-tuner's Wan naming (`lora_unet_<path _>`, its
`--task ti2v-5B` trains the same WanAttentionBlock Linears) with the Wan header naming the 5B (`ss_model_type`),
loading in core with no key left and in ours with every module matched, the returned MODEL equal to core's loader.

Hosts: tests/tiny_wan.comfy_wan("5b") (dim 64, 2 blocks), tests/tiny_wan.comfy_wan22_vae (base width 8, latents
standardised on the training videos like test_train_wan's StandardVAE), the tokenizing tiny UMT5 CLIP.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import input_folder
from tests import tiny_wan as tw
from tests.test_train_dit import LOSS_RATIO_MAX
from tests.test_train_flux import (FamilyHost, core_loads_every_key, file_metadata, file_modules, flow_error,
                                   patched_state, sampler_call, single_thread)  # noqa: F401 (single_thread: a fixture)
from tests.test_train_nodes import DATASET_DEFAULTS, train_nodes
from tests.test_train_wan import CAPTIONS, FRAMES, StandardVAE, moving_square, musubi_targets, save_frames

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.arch.registry import arch_of_metadata, detect_lora  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402

nt = train_nodes()
host_module = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"])
loader_module = __import__(nt.__name__.rsplit(".", 1)[0] + ".loader", fromlist=["apply_requests"])

STEPS = 40
LR = 1e-2
RANK = 4
SIZE = (128, 64)               # (w, h): the Wan 2.2 VAE's 16x gives latents 8 x 4, as the 2.1 test's 64 x 32 at 8x
DATASET = {**DATASET_DEFAULTS, "resolution": 96, "bucket_step": 16, "min_bucket": 16, "max_bucket": 128,
           "caption": "", "frames": FRAMES}
LEARN_MIN = 0.2


class Host(FamilyHost):
    steps, rank, lr, train_defaults = STEPS, RANK, LR, {"save_precision": "fp32"}

    def __init__(self, root):
        self.model, self.clip = tw.comfy_wan("5b"), tw.comfy_clip_wan_tokenizing()
        self.videos = {"red_right": moving_square(FRAMES, SIZE, (0.9, 0.1, 0.1), "right", 1),
                       "blue_down": moving_square(FRAMES, SIZE, (0.1, 0.2, 0.9), "down", 2)}
        folder = root / "wan5b_videos"
        for name, frames in self.videos.items():
            save_frames(folder, name, frames, CAPTIONS[name])
        self.vae = StandardVAE(self.model, list(self.videos.values()), tw.comfy_wan22_vae())
        with input_folder(root):
            self.dataset, self.summary = nt.LoRACoreTrainDataset().build(**{**DATASET, "folder": "wan5b_videos"})
        self.latents = {os.path.basename(s.source): self.model.model.process_latent_in(
            self.vae.encode(s.image.movedim(0, -1))).detach() for s in self.dataset.samples}

    def conds(self, name: str) -> dict:
        return super().conds(CAPTIONS[name])


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("wan5b_data"))


@pytest.fixture(scope="module")
def run(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan5b_loras")
    model, clip, lora, curve, name, report, *_ = host.train(folder)
    state = lt.load_state(os.path.join(folder, "sq.state.pt"))
    return dict(model=model, lora=lora, losses=state["losses"], path=lora.path)


def test_host_is_comfys_ti2v_5b_with_48_channel_video_latents(host):
    import comfy.latent_formats
    import comfy.model_base

    arch, spec = nt.model_train_spec(host.model)
    assert arch.name == "Wan2.2-TI2V-5B" and spec.latent_dims == 3 and spec.block_lists == ("blocks",)
    assert type(host.model.model) is comfy.model_base.WAN22
    assert isinstance(host.model.model.latent_format, comfy.latent_formats.Wan22)
    assert host.vae.vae.latent_channels == 48
    assert "2 videos (5 frames)" in host.summary
    assert [tuple(s.image.shape) for s in host.dataset.samples] == [(3, FRAMES, 64, 128)] * 2
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    latent = backend.encode_images(host.dataset.samples[0].image[None], host.vae)
    assert tuple(latent.shape) == (1, 48, 2, 4, 8)   # (B, 48, (F - 1) / 4 + 1, h / 16, w / 16)
    assert torch.allclose(latent, host.latents[os.path.basename(host.dataset.samples[0].source)], atol=1e-5)
    objective = backend.objective
    assert objective.is_flow and objective.shift == pytest.approx(8.0, rel=1e-5)
    assert objective.multiplier == pytest.approx(1000.0)
    key_map = host_module.HostModels(host.model).key_map
    default = {t.name for t in lt.find_denoiser_targets(host.model.model.diffusion_model, key_map, spec,
                                                         spec.target_sets["attn+ff+proj"])}
    assert default == musubi_targets(host.model.model.diffusion_model) and len(default) == 2 * 10


def test_backend_calls_the_5b_the_way_the_sampler_does_with_one_timestep_per_video(host):
    """The sampler's call (BaseModel.apply_model; no concat channels: in_dim = the latent's 48) equals ours; and
    WAN22's per-token timesteps (process_timestep with a denoise mask, image-to-video's clean first frame) give
    the same output for a full mask: text-to-video training's one timestep per video is that case."""
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    conds = host.conds("red_right")
    x = torch.randn((2, 48, 2, 4, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    mm.load_models_gpu([host.model], force_full_load=True)
    with torch.no_grad():
        out = backend.denoise(x, backend.objective.model_timesteps(sigma), {"context": conds["cond"].expand(2, -1, -1)})
    ours = backend.sampling.calculate_denoised(sigma, out.float(), x)
    assert torch.allclose(ours, sampler_call(host.model, x, sigma, conds), atol=1e-5)
    per_token = sampler_call(host.model, x, sigma, {**conds, "denoise_mask": torch.ones(2, 1, 2, 4, 8)})
    assert torch.allclose(ours, per_token, atol=1e-5)
    timesteps = host.model.model.process_timestep(sigma * 1000, x=x, denoise_mask=torch.ones(2, 1, 2, 4, 8))
    assert timesteps.shape == (2, 2) and torch.allclose(timesteps, (sigma * 1000)[:, None].expand(2, 2))
    assert not torch.allclose(ours, sampler_call(host.model, x, sigma, host.conds("blue_down")), atol=1e-4)


def test_loss_falls(host, run):
    before = {n: flow_error(host.model, host.latents[n], host.conds(n)) for n in CAPTIONS}
    after = {n: flow_error(run["model"], host.latents[n], host.conds(n)) for n in CAPTIONS}
    total_before = sum(sum(v) for v in before.values())
    total_after = sum(sum(v) for v in after.values())
    per_level = [1 - a / b for n in CAPTIONS for a, b in zip(after[n], before[n])]
    mean = 1 - total_after / total_before
    losses = run["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"wan 5b: velocity error {total_before / 12:.4f} -> {total_after / 12:.4f} ({100 * mean:.1f}%), per level "
          f"{' '.join(f'{100 * r:.1f}' for r in per_level)}; training loss first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == STEPS and all(v == v for v in losses)
    assert mean > LEARN_MIN and min(per_level) > 0
    assert last < LOSS_RATIO_MAX * first


def test_saved_file_has_musubi_names_and_the_5b_header(host, run):
    assert file_modules(run["path"]) == musubi_targets(host.model.model.diffusion_model)
    meta = file_metadata(run["path"])
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"]) == \
        ("wan", "wan2.1/lora", "networks.lora_wan")                       # musubi's, as every Wan file
    assert meta["ss_model_type"] == "wan2.2-ti2v-5b"                      # names the variant
    assert meta["modelspec.prediction_type"] == "flow" and meta["ss_discrete_flow_shift"] == "8"
    assert "modelspec.timestep_range" not in meta
    assert arch_of_metadata(meta).name == "Wan2.2-TI2V-5B"
    assert detect_lora(read_lora_file(run["path"])).name == "Wan2.2-TI2V-5B"
    assert detect_lora(read_lora_file(run["path"]), use_metadata=False).family.name == "wan"


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_saved_file_loads_fully_in_core_and_ours_and_equals_the_model(host, run, strength, caplog):
    modules = file_modules(run["path"])
    core_model = core_loads_every_key(host.model, host.clip, run["path"], caplog, strength)
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
        assert float((mine[key] - theirs[key]).abs().max()) <= 1e-5 * max(1.0, float(delta.abs().max())), key
        changed += bool(delta.abs().max() > 0)
    assert changed == len(modules)
    if strength == 1.0:   # the MODEL the train node returned is the file applied
        returned = patched_state(run["model"])
        assert all(torch.allclose(returned[k], theirs[k], atol=1e-5) for k in base)


def test_named_expert_ranges_are_refused_on_the_5b_and_numeric_ones_kept(host, tmp_path):
    """The 5B is one model, not a high / low-noise pair: "high noise" is refused naming the numeric form, which
    trains and is written (musubi's --min_timestep / --max_timestep)."""
    from lora_core.errors import LoraValueError

    with pytest.raises(LoraValueError, match="timestep range 'high noise': give 'min,max'"):
        host.train(tmp_path, steps=1, timestep_range="high noise", output_name="r")
    _, _, lora, *_ = host.train(tmp_path, steps=2, timestep_range="0,500", output_name="r")
    assert file_metadata(lora.path)["modelspec.timestep_range"] == "0,500"
