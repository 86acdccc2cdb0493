"""`python -m lora_core.train CONFIG` on a diffusers Wan 2.1 T2V folder (WanTransformer3DModel, UMT5EncoderModel,
AutoencoderKLWan, UniPCMultistepScheduler with flow_shift 8 = ComfyUI's WAN21 default), trained on two 5-frame
videos given as frames sub-folders: the text conditioning is WanPipeline.encode_prompt's (512 tokens, padding
zeroed); the transformer call equals ComfyUI's WanModel on the same weights and the objective is the node's; the
saved file has musubi's names - the module names the train node gives a ComfyUI Wan - and the node's Wan metadata;
it lowers the flow-matching error; core's loader loads it on a ComfyUI Wan of the same weights with no key left,
ours with every module matched, and both patch the same weights as LoraPatcher on the diffusers model (1e-5),
"all layers" included; other Wans (I2V / FLF2V, VACE, Wan 2.2 pairs / TI2V-5B / I2V-A14B) and options that do not
apply are refused clearly, writing nothing.

The transformer's weights are tests.tiny_wan.comfy_wan("t2v")'s converted to diffusers' names through the Wan
family's diffusers_host_pieces; everything is saved with WanPipeline.save_pretrained to a temp folder and read back
by the CLI - nothing from a hub.
"""
from __future__ import annotations

import importlib
import json
import os
import types

import pytest
import torch

from tests.comfy_host import HOST_DIR
from tests.test_train_distributed import lora_tensors
from tests.test_train_flux import core_loads_every_key
from tests.test_train_nodes import nt  # noqa: F401  (the stand-in package of nodes/, for nodes/_host.py)
from tests import tiny_wan as tw

import comfy.model_management as mm  # noqa: E402  (tests.test_train_flux imported ComfyUI)

FRAMES = 5                    # 4k + 1: two latent frames
SIZE = 64                     # the videos' width and height (resolution 64, no bucketing)
CAPTIONS = {"red_right": "sks red square moving right", "blue_down": "sks blue square moving down"}
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pieces():
    from lora_core.arch.families.wan import FAMILY, WanSpec

    spec = WanSpec(dim=tw.DIM, depth=tw.DEPTH, ffn=tw.FFN, text_dim=tw.TEXT)
    return FAMILY.diffusers_host_pieces(spec)


def comfy_to_diffusers(model) -> dict:
    """A ComfyUI Wan's state in diffusers' WanTransformer3DModel names, through the family's diffusers_host_pieces
    (diffusers key -> canonical path; a module's bias goes with its weight)."""
    state = {k[len("diffusion_model."):]: v for k, v in model.model.state_dict().items()
             if k.startswith("diffusion_model.")}
    out = {}
    for key, (canonical, _, param) in pieces().items():
        if param == "weight":
            out[key] = state[canonical + ".weight"]
            if canonical + ".bias" in state:
                out[key[:-len("weight")] + "bias"] = state[canonical + ".bias"]
        else:   # blocks.N.modulation / head.modulation = scale_shift_table
            out[key] = state[f"{canonical}.{param}"]
    return out


def moving_square(colour, direction: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    side = SIZE // 2
    video = torch.full((FRAMES, SIZE, SIZE, 3), 0.5)
    for f in range(FRAMES):
        x, y = (4 + 6 * f, 8) if direction == "right" else (16, 4 + 6 * f)
        video[f, y:y + side, x:x + side] = torch.tensor(colour)
    return (video + 0.02 * torch.randn(video.shape, generator=gen)).clamp(0, 1)


def save_videos(folder: str) -> dict:
    from PIL import Image

    videos = {"red_right": moving_square((0.9, 0.1, 0.1), "right", 1),
              "blue_down": moving_square((0.1, 0.2, 0.9), "down", 2)}
    for name, frames in videos.items():
        path = os.path.join(folder, name)
        os.makedirs(path)
        for i, frame in enumerate(frames):
            Image.fromarray((frame * 255).round().byte().numpy()).save(os.path.join(path, f"{i:04d}.png"))
        with open(path + ".txt", "w") as handle:
            handle.write(CAPTIONS[name])
    return videos


def save_tiny_wan(folder: str, videos: dict, shift: float = 8.0) -> None:
    """A WanPipeline folder: the tiny ComfyUI Wan's weights in a WanTransformer3DModel, a tiny UMT5 over the T5
    tokenizer ComfyUI ships (its ids are inside UMT5's vocabulary), a tiny AutoencoderKLWan whose latents_mean /
    latents_std are its latents' statistics on the training videos (as the real VAE's are on real videos)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    twin = tw.diffusers_wan_twin("t2v")
    base = comfy_to_diffusers(tw.comfy_wan("t2v"))
    assert set(base) == set(twin.state_dict())
    twin.load_state_dict(base)
    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():
        raw = torch.cat([vae.encode(v.permute(3, 0, 1, 2)[None] * 2 - 1).latent_dist.mean for v in videos.values()])
    vae.register_to_config(latents_mean=raw.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=raw.std(dim=(0, 2, 3, 4)).tolist())
    tokenizer = T5TokenizerFast.from_pretrained(str(HOST_DIR / "comfy" / "text_encoders" / "t5_tokenizer"),
                                                model_max_length=512)
    torch.manual_seed(4)
    text_encoder = UMT5EncoderModel(UMT5Config(d_model=tw.TEXT, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                               vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
                                               is_encoder_decoder=False))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=twin,
                scheduler=scheduler).save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-cli")
    videos = save_videos(str(root / "videos"))
    save_tiny_wan(str(root / "tiny-wan"), videos)
    return root


def wan_config(root, name: str, model: str = "tiny-wan", batch_size: int = 2, **train) -> str:
    options = dict(steps=4, batch_size=batch_size, rank=4, alpha=4.0, save_precision="fp32", seed=7,
                   optimizer="SGD", unet_lr=0.05, max_grad_norm=0.0)
    options.update(train)
    architecture = options.pop("architecture", "auto")
    lines = [f'model = "{model}"', f'architecture = "{architecture}"', f'output_dir = "out-{name}"',
             f'output_name = "{name}"', "", "[dataset]", 'folder = "videos"', "resolution = 64", "repeats = 1",
             "bucketing = false", f"frames = {FRAMES}", "", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines += ["", "[distributed]", 'backend = "gloo"', 'device = "cpu"']
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_main(workspace, config: str, name: str) -> dict:
    from lora_core.train.__main__ import main

    summary = str(workspace / f"{name}.json")
    assert main([config, "--summary", summary]) == 0
    with open(summary) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def trained(workspace):
    """40 AdamW steps with the default targets: a LoRA that has learnt something."""
    return run_main(workspace, wan_config(workspace, "wan", steps=40, optimizer="AdamW", unet_lr=1e-2,
                                          max_grad_norm=1.0), "wan")


@pytest.fixture(scope="module")
def all_layers(workspace):
    """2 SGD steps on "all layers" (text / time embeddings, time_projection, head.head too)."""
    return run_main(workspace, wan_config(workspace, "wan-all", steps=2, unet_targets="all layers"), "wan-all")


def load(workspace, folder: str = "tiny-wan"):
    from lora_core.train.diffusers_wan import load_wan

    return load_wan(str(workspace / folder), torch.device("cpu"))


def training_latents(workspace, model):
    """The training videos as the CLI reads and encodes them, and their captions."""
    from lora_core.train.dataset import load_folder
    from lora_core.train.diffusers_wan import wan_vae_encoder

    dataset = load_folder(str(workspace / "videos"), resolution=SIZE, repeats=1, bucketing=False, frames=FRAMES)
    videos = torch.stack([s.image for s in dataset.samples])
    return wan_vae_encoder(model.vae)(videos), [s.caption for s in dataset.samples]


def flow_error(workspace, transformer) -> float:
    """Mean squared velocity error of `transformer` on the training videos' latents, at fixed noise and levels."""
    from lora_core.train.diffusers_wan import WanDiffusersBackend, wan_objective, wan_text_encoder

    model = load(workspace)
    objective = wan_objective(model.scheduler_config, "logit-normal, model shift")
    backend = WanDiffusersBackend(transformer, objective)
    with torch.no_grad():
        latents, captions = training_latents(workspace, model)
        cond = wan_text_encoder(model.tokenizer, model.text_encoder)(captions)
        gen = torch.Generator().manual_seed(11)
        total = 0.0
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(latents.shape, generator=gen)
            level = torch.full((latents.shape[0],), sigma)
            out = backend.denoise(objective.noisy(latents, noise, level), objective.model_timesteps(level), cond)
            total += float(((out - objective.target(latents, noise, level)) ** 2).mean())
    return total / 3


def host_module():
    return importlib.import_module("lora_core_train_nodes._host")


def node_module_names(choice: str = "attn+ff+proj") -> set:
    """The module names the train node gives the LoRA of a ComfyUI Wan of this structure."""
    import lora_core.train as lt

    model = tw.comfy_wan("t2v")
    key_map = host_module().HostModels(model).key_map
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    return {t.name for t in lt.find_denoiser_targets(model.model.diffusion_model, key_map, spec,
                                                     spec.target_sets[choice])}


def file_modules(path: str) -> set:
    return {k.rsplit(".", 2)[0] for k in lora_tensors(path) if k.endswith(".lora_down.weight")}


def file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


# ------------------------------------------------------------------------------------------ conditioning and call

def test_text_conditioning_is_the_wan_pipelines(workspace, monkeypatch):
    """UMT5's last hidden states over 512 tokens with the padded positions zeroed: WanPipeline.encode_prompt's for
    the same folder (ftfy, which diffusers' prompt_clean calls, is not installed here: an identity stands in, as
    ours skips it)."""
    from diffusers import WanPipeline
    from diffusers.pipelines.wan import pipeline_wan

    from lora_core.train.diffusers_wan import wan_text_encoder

    monkeypatch.setattr(pipeline_wan, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    model = load(workspace)
    captions = ["sks red  square &amp; moving right ", "a much longer caption " * 150]
    with torch.no_grad():
        ours = wan_text_encoder(model.tokenizer, model.text_encoder)(captions)["context"]
        pipe = WanPipeline.from_pretrained(str(workspace / "tiny-wan"), local_files_only=True)
        theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
    assert ours.shape == (2, 512, tw.TEXT) and torch.allclose(ours, theirs, atol=1e-6)
    length = len(model.tokenizer("sks red square & moving right").input_ids)
    assert ours[0, length:].abs().max() == 0 and ours[0, :length].abs().min(dim=-1).values.gt(0).all()
    assert ours[1].abs().amax(dim=-1).gt(0).all()   # the long caption fills all 512 tokens (truncated)


def test_backend_call_equals_comfyuis_wan_on_the_same_weights(workspace, monkeypatch):
    """The diffusers transformer as the backend calls it (timestep sigma * 1000) gives the velocity ComfyUI's
    WanModel of the same weights gives on 5-D latents; the objective (shift 8, multiplier 1000, default sampling)
    is the node's on that ComfyUI Wan. The one difference is the sinusoidal timestep embedding, which ComfyUI
    computes in float64 (comfy/ldm/wan/model.py sinusoidal_embedding_1d) and diffusers in float32: with ComfyUI's
    embedding in diffusers' place the outputs agree to 1e-5; as shipped, to 1e-5 of the output's size."""
    from comfy.ldm.wan.model import sinusoidal_embedding_1d

    from lora_core.train.diffusers_wan import WanDiffusersBackend, wan_objective

    model = load(workspace)
    comfy_model = tw.comfy_wan("t2v")
    key_map = host_module().HostModels(comfy_model).key_map
    assert key_map.arch.name == model.arch.name == "Wan-T2V-14B"
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    node = nt.objective_of_model(comfy_model.get_model_object("model_sampling"), spec)
    ours = wan_objective(model.scheduler_config, spec.timestep_sampling)
    assert ours.shift == pytest.approx(node.shift, rel=1e-6) == 8.0 and ours.multiplier == node.multiplier == 1000
    assert ours.resolution_shift is node.resolution_shift is None and ours.default_sampling == node.default_sampling
    backend = WanDiffusersBackend(model.transformer, ours)
    gen = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(2, 16, 2, 8, 8, generator=gen), torch.tensor([0.3, 0.8])
    context = torch.randn(2, 512, tw.TEXT, generator=gen)
    context[:, 20:] = 0
    with torch.no_grad():
        theirs = comfy_model.model.diffusion_model(x, comfy_model.model.model_sampling.timestep(sigma),
                                                   context=context)
        shipped = backend.denoise(x, ours.model_timesteps(sigma), {"context": context})
        proj = model.transformer.condition_embedder.timesteps_proj
        monkeypatch.setattr(proj, "forward", lambda t: sinusoidal_embedding_1d(proj.num_channels, t))
        same_embedding = backend.denoise(x, ours.model_timesteps(sigma), {"context": context})
    error, shipped_error = ((v - theirs).abs().max().item() for v in (same_embedding, shipped))
    size = theirs.abs().max().item()
    print(f"diffusers Wan vs ComfyUI WanModel, same weights (|velocity| up to {size:.2f}): max difference "
          f"{error:.1e} with ComfyUI's float64 timestep embedding, {shipped_error:.1e} with diffusers' float32 one")
    assert size > 0 and error <= PARITY_ATOL and shipped_error <= PARITY_ATOL * size


# ------------------------------------------------------------------------------------------ the saved file

def test_wan_file_has_the_nodes_musubi_names_and_metadata_and_lowers_the_error(workspace, trained):
    from diffusers import WanTransformer3DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    path = trained["final_path"]
    modules = file_modules(path)
    assert modules == node_module_names()
    assert {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_1_cross_attn_o", "lora_unet_blocks_1_ffn_2"} <= modules
    assert len(modules) == tw.DEPTH * 10   # self / cross attention q k v o, ffn.0 / ffn.2 per block
    tensors = lora_tensors(path)
    assert tuple(tensors["lora_unet_blocks_0_ffn_0.lora_up.weight"].shape) == (tw.FFN, 4)
    meta = file_metadata(path)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"],
            meta["modelspec.implementation"]) == ("wan", "wan2.1/lora", "networks.lora_wan",
                                                  "https://github.com/Wan-Video/Wan2.1")
    assert meta["modelspec.prediction_type"] == "flow" and meta["ss_discrete_flow_shift"] == "8"
    assert meta["ss_timestep_sampling"] == "logit-normal, model shift" and "modelspec.timestep_range" not in meta
    transformer = WanTransformer3DModel.from_pretrained(str(workspace / "tiny-wan"), subfolder="transformer")
    before = flow_error(workspace, transformer)
    plan = LoraPatcher(transformer=transformer).apply([LoraRequest(read_lora_file(path), 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    after = flow_error(workspace, transformer)
    losses = trained["losses"]
    print(f"flow error on the training videos: base {before:.5f} -> with the LoRA {after:.5f} "
          f"({100 * (1 - after / before):.1f}%); losses first10 {sum(losses[:10]) / 10:.4f} last10 "
          f"{sum(losses[-10:]) / 10:.4f}")
    assert after < 0.9 * before
    assert sum(losses[-10:]) < sum(losses[:10])


def test_wan_file_patches_a_comfyui_wan_like_the_diffusers_model(workspace, trained, all_layers, caplog):
    """Core's loader (no key left) and ours (every module matched) on a ComfyUI Wan of the same weights, and
    LoraPatcher on the diffusers transformer, patch the same weights (compared in diffusers' layout); "all layers"
    adds the text / time embeddings, time_projection and head.head."""
    from diffusers import WanTransformer3DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    core_loads_every_key(tw.comfy_wan("t2v"), None, trained["final_path"], caplog)
    path = all_layers["final_path"]
    modules = file_modules(path)
    assert modules == node_module_names("all layers")
    assert {"lora_unet_text_embedding_0", "lora_unet_time_projection_1", "lora_unet_head_head"} <= modules
    core = core_loads_every_key(tw.comfy_wan("t2v"), None, path, caplog)
    assert len(core.patches) == len(modules)
    lora = read_lora_file(path)
    model = tw.comfy_wan("t2v")
    host = host_module().HostModels(model)
    plan = host.plan([LoraRequest(lora, 1.0, 0.0)])
    report = plan.reports[0]
    assert not report.unmatched and not report.unused_keys and report.matched == len(modules), plan.text()
    patched, _ = host.apply(plan)
    mm.load_models_gpu([patched], force_full_load=True)
    comfy_after = {k: v.clone() for k, v in comfy_to_diffusers(patched).items()}
    mm.unload_all_models()
    transformer = WanTransformer3DModel.from_pretrained(str(workspace / "tiny-wan"), subfolder="transformer")
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    LoraPatcher(transformer=transformer).apply([LoraRequest(lora, 1.0, 0.0)])
    ours = transformer.state_dict()
    changed, worst = set(), 0.0
    for key, value in comfy_after.items():
        delta = (value - base[key]).abs().max().item()
        error = (ours[key] - value).abs().max().item()
        assert error <= 1e-5 * max(delta, 1e-6) + 1e-6, key
        if delta > 0:
            changed.add(key)
            worst = max(worst, error / delta)
    print(f"ComfyUI Wan (our loader) vs diffusers (LoraPatcher), {len(changed)} weights changed, worst error / "
          f"delta {worst:.1e}")
    linears = {n + ".weight" for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert changed == linears


# ------------------------------------------------------------------------------------------ refusals

def fake_folder(root, name: str, transformer: dict, index: dict = None, transformer_2: bool = False) -> str:
    """A folder with the configs alone: refusals read them before loading anything."""
    folder = root / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                                    **transformer}))
    if transformer_2:
        (folder / "transformer_2").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **(index or {})}))
    return name


@pytest.mark.parametrize("name,transformer,index,second,message", [
    ("i2v", {"image_dim": 1280, "added_kv_proj_dim": 5120, "in_channels": 36}, {"_class_name": "WanImageToVideoPipeline"},
     False, "Wan 2.1 I2V 14B"),
    ("flf2v", {"image_dim": 1280, "added_kv_proj_dim": 5120, "pos_embed_seq_len": 514, "in_channels": 36}, None, False,
     "Wan 2.1 FLF2V 14B"),
    ("vace", {"_class_name": "WanVACETransformer3DModel"}, {"_class_name": "WanVACEPipeline"}, False, "Wan VACE"),
    ("a14b", {}, {"boundary_ratio": 0.875}, True, "Wan 2.2 A14B pair"),
    ("ti2v-5b", {"in_channels": 48, "out_channels": 48}, {"expand_timesteps": True}, False, "Wan 2.2 TI2V-5B"),
    ("i2v-a14b", {"in_channels": 36, "out_channels": 16}, None, False, "Wan 2.2 I2V-A14B"),
])
def test_other_wans_are_refused_by_name(workspace, capsys, name, transformer, index, second, message):
    from lora_core.train.__main__ import main

    model = fake_folder(workspace, f"fake-{name}", transformer, index, second)
    assert main([wan_config(workspace, f"refused-{name}", model=model)]) == 2
    err = capsys.readouterr().err
    assert message in err and "LoRA Core Train node" in err, err
    assert not (workspace / f"out-refused-{name}").exists()


@pytest.mark.parametrize("options,message", [
    ({"train_text_encoder": True}, "train_text_encoder = true"),
    ({"algorithm": "LoCon"}, "LoCon"),
    ({"guidance": 3.5}, "guidance = 3.5"),
    ({"timestep_sampling": "logit-normal, resolution shift"}, "resolution shift"),
    ({"architecture": "Wan2.1-T2V-1.3B"}, "is Wan-T2V-14B but the config says"),
])
def test_wan_options_that_do_not_apply_are_refused(workspace, capsys, options, message):
    from lora_core.train.__main__ import main

    name = "bad-" + "-".join(options).replace("_", "")
    assert main([wan_config(workspace, name, **options)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(workspace / f"out-{name}" / f"{name}.safetensors")


def test_scheduler_shift_reads_unipc_and_flowmatch_configs():
    from lora_core.errors import LoraValueError
    from lora_core.train.diffusers_wan import scheduler_shift

    assert scheduler_shift({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "use_flow_sigmas": True}) == 3.0
    assert scheduler_shift({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}) == 5.0
    assert scheduler_shift({}) == 8.0   # ComfyUI's WAN21 default
    with pytest.raises(LoraValueError, match="use_dynamic_shifting"):
        scheduler_shift({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})


# ------------------------------------------------------------------------------------------ runs that must agree

@pytest.fixture(scope="module")
def one_process(workspace):
    """4 SGD steps, global batch 2 (both videos) in one process."""
    return run_main(workspace, wan_config(workspace, "wan-one", batch_size=2), "wan-one")


def test_wan_two_processes_equal_one_with_the_same_global_batch(workspace, one_process):
    from tests.test_train_distributed import max_diff, torchrun, writes

    log = str(workspace / "writes-wan.log")
    two = torchrun(wan_config(workspace, "wan-two", batch_size=1), str(workspace / "wan-two.json"), log)
    assert two["world_size"] == 2 and two["global_batch"] == 2
    ones = lora_tensors(one_process["final_path"])
    diff = max_diff(lora_tensors(two["final_path"]), ones)
    print(f"Wan, 2 gloo processes vs 1: max |LoRA diff| {diff:.2e}; losses {two['losses']} vs "
          f"{one_process['losses']}")
    assert diff <= PARITY_ATOL and max_diff(ones, {k: 0 * v for k, v in ones.items()}) > 0
    assert two["losses"] == pytest.approx(one_process["losses"], abs=1e-6)
    assert {rank for rank, _, _ in writes(log)} == {"0"}


def test_wan_gradient_checkpointing_trains_the_same_lora(workspace, one_process):
    from tests.test_train_distributed import max_diff

    checkpointed = run_main(workspace, wan_config(workspace, "wan-ckpt", gradient_checkpointing=True), "wan-ckpt")
    diff = max_diff(lora_tensors(checkpointed["final_path"]), lora_tensors(one_process["final_path"]))
    assert diff <= PARITY_ATOL, diff


def test_wan_validation_loss_goes_to_the_file(workspace):
    """validation_split holds one of the two videos out; its curve is in the header as the node writes it."""
    result = run_main(workspace, wan_config(workspace, "wan-val", steps=2, batch_size=1, validation_split=0.5,
                                            validate_every=1), "wan-val")
    meta = file_metadata(result["final_path"])
    curve = json.loads(meta["lora_core.validation_loss"])
    assert meta["lora_core.validation_images"] == "1" and [step for step, _ in curve] == [0, 1, 2]   # step 0: the base model
    assert all(value > 0 for _, value in curve)


def test_wan_1_3b_width_is_the_1_3b_variant(workspace):
    """A transformer 1536 wide (Wan 2.1 T2V 1.3B's width; one block, a narrow FFN to stay small) is the 1.3B
    variant: `architecture = "Wan2.1-T2V-1.3B"` is accepted and the file has the blocks' musubi names."""
    import shutil

    from diffusers import WanTransformer3DModel

    folder = workspace / "tiny-wan-1.3b"
    shutil.copytree(workspace / "tiny-wan", folder, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(6)
    WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=tw.TEXT, ffn_dim=64, num_layers=1).save_pretrained(str(folder / "transformer"))
    assert load(workspace, "tiny-wan-1.3b").arch.name == "Wan2.1-T2V-1.3B"
    result = run_main(workspace, wan_config(workspace, "wan-13b", model="tiny-wan-1.3b", steps=1,
                                            architecture="Wan2.1-T2V-1.3B"), "wan-13b")
    modules = file_modules(result["final_path"])
    assert modules == {f"lora_unet_blocks_0_{m}" for m in ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
                                                           "cross_attn_q", "cross_attn_k", "cross_attn_v",
                                                           "cross_attn_o", "ffn_0", "ffn_2")}
    assert file_metadata(result["final_path"])["ss_base_model_version"] == "wan"


def test_wan_timestep_range_names_one_expert(workspace):
    """timestep_range "high noise" (a Wan 2.2 T2V-A14B expert has the 14B layout): its range is written as the node
    writes it (modelspec.timestep_range, read by lora_core.pairs)."""
    result = run_main(workspace, wan_config(workspace, "wan-high", steps=1, timestep_range="high noise"), "wan-high")
    assert file_metadata(result["final_path"])["modelspec.timestep_range"] == "875,1000"
