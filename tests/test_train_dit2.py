"""DiT training on Z-Image and Lumina Image 2.0 with the real host, following tests/test_train_dit.py: the model's own
flow-matching objective read from ComfyUI's model_sampling (checked against NextDiT's own t = 1 - sigma convention
with an exact-velocity oracle), the loss falling on tiny models, saved files in each family's common naming with its
metadata, loading in core's loader with no key left and in ours with every module matched, and the returned MODEL
equal to core's loader on the file (strength 1.0 and -0.6).

Hosts (ComfyUI's own classes, tests/tiny_lumina.py): Z-Image (dim 256, 2 heads, 2 layers, 2 + 2 refiners, equal q / k / v
thirds, pad tokens) with the tiny Qwen3-4B CLIP (ComfyUI's own Qwen tokenizer files); Lumina 2 (dim 64, GQA 4 / 2
heads: qkv rows [64 | 32 | 32]) with the tiny Gemma-2-2B CLIP, whose tokenizer is ComfyUI's Gemma2BTokenizer over a
SentencePiece model trained here on the captions (a real checkpoint carries Gemma's; none is installable). Both
use the Flux latent format (16 channels, 2-D): a TAESD-architecture 16-channel VAE scaled to unit-variance latents
(tests/test_train_flux.py's tiny_vae16).

Naming (lora_core/arch/families/lumina.py train_spec / train_names): Z-Image as musubi-tuner trains it (the main
layers' to_q / to_k / to_v / to_out.0 and feed_forward w1-w3, no modulation or refiner) in the names ai-toolkit
writes and core reads (`diffusion_model.layers.N.attention.to_q`, ...); Lumina 2 as kohya sd-scripts does
(`lora_unet_<path _>`, every Linear of JointTransformerBlock, refiners included, fused qkv whole, plus FinalLayer).
"""
from __future__ import annotations

import io
import logging
import math
import os

import pytest
import torch

from tests.comfy_host import import_comfy
from tests import tiny_flux2 as tf2
from tests import tiny_hunyuan_video as th
from tests import tiny_lumina as tl
from tests.test_train_dit import FrameVAE
from tests.test_train_flux import (FamilyHost, file_metadata, file_modules, flow_error, patched_state, sampler_call,
                                   single_thread, target_images, tiny_vae16)  # noqa: F401 (fixture)
from tests.test_train_nodes import train_nodes

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.api import LoraRequest  # noqa: E402
from lora_core.io import read_lora_file  # noqa: E402

nt = train_nodes()
host_module = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"])
loader_module = __import__(nt.__name__.rsplit(".", 1)[0] + ".loader", fromlist=["apply_requests"])

STEPS = 40
RANK = 4
LR = {"zimage": 1e-2, "lumina2": 5e-3, "hunyuan": 5e-3, "flux2": 5e-3}
KINDS = ("zimage", "lumina2", "hunyuan", "flux2")
GUIDED = ("hunyuan", "flux2")
NEXTDIT = ("zimage", "lumina2")
CAPTION = "sks square"
ZIMAGE_DIM = 256


# ------------------------------------------------------------------------------------------ hosts

def spiece_model() -> bytes:
    """A small SentencePiece model (what ComfyUI's Gemma2BTokenizer reads from a checkpoint's `spiece_model`),
    trained on the test captions; ids 0-3 are Gemma's pad / eos / bos / unk roles."""
    import sentencepiece as spm

    text = ["sks square", "a red square on grey", "a green square", "a blue square, photo", "grey background"] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=40, model_type="unigram",
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, hard_vocab_limit=False)
    return out.getvalue()


def comfy_clip_lumina2_tokenized(seed: int = 0):
    """tiny_lumina's Gemma-2-2B CLIP with ComfyUI's own LuminaTokenizer over `spiece_model()`."""
    from comfy.text_encoders import lumina2

    model = spiece_model()

    class Tokenizer(lumina2.LuminaTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory,
                             tokenizer_data={**tokenizer_data, "spiece_model": model})

    return tl._comfy_clip(lumina2.te(), Tokenizer, {"gemma2_2b": tl.tiny_llm_config(32, 3)}, seed)


class CharTokenizer:
    """Stand-in for ComfyUI's Flux2Tokenizer, whose Mistral tekken vocabulary ships only with a checkpoint: one token
    per character (ids 4-253, BOS 1) in the {encoder: [[(token, weight), ...]]} form ComfyUI's tokenizers return.
    Everything after the tokens is ComfyUI's own Flux2TEModel."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        pass

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"mistral3_24b": [[(1, 1.0)] + [(4 + ord(c) % 250, 1.0) for c in text]]}

    def state_dict(self):
        return {}


def comfy_clip_flux2_tokenized(seed: int = 0):
    """The tiny Mistral-3 CLIP of tests/tiny_flux2.py with 31 layers (ComfyUI's Flux.2 text encoder stacks the
    outputs of layers 10, 20 and 30: context width 3 x 32) and CharTokenizer."""
    from comfy.text_encoders import flux

    return tf2._comfy_clip(flux.flux2_te(), CharTokenizer, {"mistral3_24b": tf2.tiny_mistral_config(32, 31)}, seed)


class ChannelVAE:
    """A real comfy.sd.VAE (TAESD architecture, seeded) with Flux.2's 128 latent channels, standardised per channel
    on the training images through the model's latent format (process_latent_in of what encode returns has mean
    0, std 1)."""

    def __init__(self, model, images, channels: int = 128):
        import comfy.taesd.taesd

        taesd = comfy.taesd.taesd.TAESD(latent_channels=channels)
        tl.seed_weights(taesd, 0)
        state = taesd.state_dict()
        state["vae_shift"], state["vae_scale"] = torch.tensor(0.0), torch.tensor(1.0)
        self.vae = comfy.sd.VAE(sd=state)
        self.model = model
        raw = self.vae.encode(images)
        self.mean = raw.mean(dim=(0, 2, 3), keepdim=True)
        self.std = raw.std(dim=(0, 2, 3), keepdim=True)

    def encode(self, images):
        return self.model.model.process_latent_out((self.vae.encode(images) - self.mean) / self.std)


class Host(FamilyHost):
    steps, rank, caption = STEPS, RANK, CAPTION

    def __init__(self, kind: str):
        self.kind, self.lr = kind, LR[kind]
        images = target_images()
        if kind == "zimage":
            # dim 256: NextDiT's Z-Image modulation reads a 256-wide time embedding (min(dim, 256) in its blocks),
            # so a forward needs dim >= 256 (tiny_lumina's dim 48 serves key maps only)
            self.model, self.clip = tl.comfy_z_image(dim=ZIMAGE_DIM, heads=2, kv_heads=2), tl.comfy_clip_z_image()
        elif kind == "lumina2":
            self.model, self.clip = tl.comfy_lumina2(), comfy_clip_lumina2_tokenized()
        elif kind == "hunyuan":
            self.model, self.clip = th.comfy_hunyuan_video(), th.comfy_clip_hunyuan_video()
        else:
            self.model, self.clip = tf2.comfy_flux2(context=96), comfy_clip_flux2_tokenized()
        # HunyuanVideo: image datasets as 1-frame videos, (B, 16, 1, h, w) latents through its own latent format
        self.vae = FrameVAE(self.model, images) if kind == "hunyuan" else \
            ChannelVAE(self.model, images) if kind == "flux2" else tiny_vae16(self.model)
        self.image_dataset(images)


@pytest.fixture(scope="module")
def hosts():
    return {kind: Host(kind) for kind in KINDS}


def _run(host, folder, **overrides):
    model, clip, lora, curve, name, report, *_ = host.train(folder, **overrides)
    state = lt.load_state(os.path.join(folder, "sq.state.pt"))
    return dict(model=model, clip=clip, lora=lora, report=report, losses=state["losses"], path=lora.path)


@pytest.fixture(scope="module")
def runs(hosts, tmp_path_factory):
    return {kind: _run(hosts[kind], tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _cond_kwargs(conds: dict, batch: int) -> dict:
    cond = {"context": conds["cond"].expand(batch, -1, -1)}
    cond.update({k: v.expand(batch, *v.shape[1:]) for k, v in conds.items()
                 if k not in ("cond", "pooled_output") and isinstance(v, torch.Tensor)})
    return cond


# ------------------------------------------------------------------------------------------ objective and call

def test_objective_is_the_models_own_model_sampling(hosts):
    """Flow matching at the shift ComfyUI samples each model with (supported_models: Z-Image 3.0, Lumina 2 6.0,
    multiplier 1; HunyuanVideo 7.0, multiplier 1000; Flux.2 ModelSamplingFlux mu 2.02, s = e^2.02); the noised input and the timestep input are the sampler's own (noise_scaling, timestep)."""
    expected = {"zimage": 3.0, "lumina2": 6.0, "hunyuan": 7.0, "flux2": math.exp(2.02)}
    for kind, host in hosts.items():
        arch, spec = nt.model_train_spec(host.model)
        objective = nt.ComfyBackend(host.model, host.clip, train_spec=spec).objective
        sampling = host.model.get_model_object("model_sampling")
        assert objective.is_flow and objective.shift == pytest.approx(expected[kind], rel=1e-5)
        assert objective.multiplier == pytest.approx(1000.0 if kind == "hunyuan" else 1.0)
        sigma = torch.tensor([0.2, 0.7])
        x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
        assert torch.allclose(objective.noisy(x0, noise, sigma), sampling.noise_scaling(sigma, noise, x0), atol=1e-6)
        assert torch.allclose(objective.model_timesteps(sigma).float(), sampling.timestep(sigma).float())
        assert spec.guidance_input is (kind in GUIDED) and spec.conv_kinds == ()


class VelocityOracle:
    """NextDiT made to predict the exact velocity in Lumina's own convention: x_t = t x0 + (1 - t) noise with t the
    time its t_embedder receives (1 = data), prediction x0 - noise. Its final layer is replaced by one that, from
    the noisy input the model was given and that t, returns the patchified (x0 - noise) of the known clean latent;
    everything before (ComfyUI's 1 - sigma, time_scale) and after (unpatchify, ComfyUI's negation) is the model's
    own. If our objective's sigma, noising or velocity target disagreed with the model's convention, the loss of
    this oracle would not be ~0."""

    def __init__(self, unet, x0):
        self.unet, self.x0, self.seen = unet, x0, {}

    def __enter__(self):
        unet = self.unet
        self.handles = [
            unet.register_forward_pre_hook(self._input, with_kwargs=True),
            unet.t_embedder.register_forward_pre_hook(self._time, with_kwargs=True),
            unet.final_layer.register_forward_hook(self._output),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _input(self, module, args, kwargs):
        self.seen["x"] = (args[0] if args else kwargs["x"]).detach().float()

    def _time(self, module, args, kwargs):
        self.seen["t"] = args[0].detach().float() / self.unet.time_scale

    def _output(self, module, args, output):
        x, t = self.seen["x"], self.seen["t"].view(-1, 1, 1, 1)
        noise = (x - t * self.x0) / (1 - t)
        pred = self.x0 - noise
        p = self.unet.patch_size
        b, c, h, w = pred.shape
        tokens = pred.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        n = tokens.shape[1]
        pad = (-n) % self.unet.pad_tokens_multiple if self.unet.pad_tokens_multiple is not None else 0
        start = output.shape[1] - n - pad
        out = torch.zeros_like(output)
        out[:, start:start + n] = tokens.to(out.dtype)
        return out


@pytest.mark.parametrize("kind", NEXTDIT)
def test_exact_velocity_oracle_has_zero_loss(kind, hosts):
    """The training step's own pieces (objective.sample / noisy / target, backend.denoise through the model's
    extra_conds) give ~0 loss on a model that predicts the truth in NextDiT's convention, and the model saw
    t = 1 - sigma; the untouched model's loss is far from 0 (the oracle is what makes it vanish)."""
    host = hosts[kind]
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    mm.load_models_gpu([host.model], force_full_load=True)
    x0 = host.latents[:2].float()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = backend.objective.sample(2, gen, "auto", x0.shape)
    noisy = backend.objective.noisy(x0, noise, sigma)
    target = backend.objective.target(x0, noise, sigma)
    cond = _cond_kwargs(host.conds(), 2)
    with torch.no_grad():
        plain = backend.denoise(noisy, backend.objective.model_timesteps(sigma), cond).float()
        with VelocityOracle(backend.unet, x0) as oracle:
            out = backend.denoise(noisy, backend.objective.model_timesteps(sigma), cond).float()
    assert torch.allclose(oracle.seen["t"], 1 - sigma, atol=1e-6)
    loss = torch.mean((out - target) ** 2).item()
    assert loss < 1e-10 * max(1.0, target.pow(2).mean().item()), loss
    assert torch.mean((plain - target) ** 2).item() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_backend_calls_the_model_the_way_the_sampler_does(kind, hosts):
    """The backend's raw output through ComfyUI's calculate_denoised equals the sampler's apply_model with the
    model's own extra conds (the text encoder's attention mask -> num_tokens)."""
    host = hosts[kind]
    arch, spec = nt.model_train_spec(host.model)
    backend = nt.ComfyBackend(host.model, host.clip, train_spec=spec)
    assert backend.native_call
    assert backend.guidance == (1.0 if kind in GUIDED else None)   # HunyuanVideo's / Flux.2's distilled guidance
    conds = host.conds()
    shape = (2,) + tuple(host.latents.shape[1:-2]) + (8, 8)   # the model's latent rank and channels
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    mm.load_models_gpu([host.model], force_full_load=True)
    cond = _cond_kwargs(conds, 2)
    if conds.get("pooled_output") is not None:
        cond["pooled_output"] = conds["pooled_output"].expand(2, -1)
    with torch.no_grad():
        out = backend.denoise(x, backend.objective.model_timesteps(sigma), cond)
    ours = backend.sampling.calculate_denoised(sigma, out.float(), x)
    theirs = sampler_call(host.model, x, sigma, conds, guidance=backend.guidance)
    assert torch.allclose(ours, theirs, atol=1e-5)
    if kind in GUIDED:   # the guidance input is live
        other = sampler_call(host.model, x, sigma, conds, guidance=4.0)
        assert not torch.allclose(ours, other, atol=1e-4)


# ------------------------------------------------------------------------------------------ training runs

# calibrated (seed 0, 40 steps, rank 4, batch 2, 1 thread): mean velocity-error reduction Z-Image 41.4% (per level
# 36.9-45.3%) at lr 1e-2 with musubi's set; Lumina 2 58.7% (57.5-59.8%) at lr 5e-3 with kohya's;
# HunyuanVideo 40.6% (36.1-43.1%) at lr 5e-3, guidance 1; Flux.2 25.7% (23.6-28.9%) at lr 5e-3, guidance 1
LEARN_MIN = {"zimage": 0.25, "lumina2": 0.35, "hunyuan": 0.25, "flux2": 0.15}
LOSS_RATIO_MAX = 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls(kind, hosts, runs):
    host, run = hosts[kind], runs[kind]
    conds = host.conds()
    guidance = 1.0 if kind in GUIDED else None
    before = flow_error(host.model, host.latents, conds, guidance)
    after = flow_error(run["model"], host.latents, conds, guidance)
    per_level = [1 - a / b for a, b in zip(after, before)]
    mean = 1 - sum(after) / sum(before)
    losses = run["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"{kind}: velocity error {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f} "
          f"({100 * mean:.1f}%), per level {' '.join(f'{100 * r:.1f}' for r in per_level)}; training loss "
          f"first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == STEPS and all(v == v for v in losses)
    assert mean > LEARN_MIN[kind] and min(per_level) > 0
    assert last < LOSS_RATIO_MAX * first


@pytest.mark.parametrize("kind", KINDS)
def test_saved_file_loads_in_core_and_ours_with_every_module(kind, hosts, runs, caplog):
    host, run = hosts[kind], runs[kind]
    tensors = comfy.utils.load_torch_file(run["path"], safe_load=True)
    modules = file_modules(run["path"])
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        core_model, _ = comfy.sd.load_lora_for_models(host.model, host.clip, tensors, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    # core: one patch per host weight; Z-Image's to_q / to_k / to_v land on the same fused qkv
    unet_map = comfy.lora.model_lora_keys_unet(host.model.model, {})
    assert all(m in unet_map for m in modules)
    hosted = {unet_map[m] if isinstance(unet_map[m], str) else unet_map[m][0] for m in modules}
    assert set(core_model.patches) == hosted
    plan = host_module.HostModels(host.model, host.clip).plan([LoraRequest(read_lora_file(run["path"]), 1.0, 1.0)])
    report = plan.reports[0]
    assert report.unmatched == [] and report.unused_keys == [] and report.skipped == {}
    assert report.matched == len(modules) == report.applied["transformer"]


def _linears(unet, prefix: str) -> list:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]


@pytest.mark.parametrize("kind", KINDS)
def test_family_targets_and_metadata(kind, hosts, runs):
    """Z-Image: musubi's default set (main layers' attention and feed-forward, q / k / v as three modules with the
    host's row widths, no adaLN_modulation, no refiner) in ai-toolkit's names; Lumina 2: kohya's (every Linear of
    the three block stacks and the final layer, fused GQA qkv whole). Metadata names the family and variant as
    musubi / sd-scripts do."""
    host, run = hosts[kind], runs[kind]
    unet = host.model.model.diffusion_model
    modules = file_modules(run["path"])
    tensors = comfy.utils.load_torch_file(run["path"], safe_load=True)
    meta = file_metadata(run["path"])
    dim = unet.dim if kind in NEXTDIT else getattr(unet, "hidden_size", None)
    if kind == "zimage":
        expected = set()
        for i in range(len(unet.layers)):
            p = f"diffusion_model.layers.{i}."
            expected |= {p + n for n in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
        assert modules == expected
        q = "diffusion_model.layers.1.attention.to_k"
        assert tensors[q + ".lora_up.weight"].shape == (dim, RANK)      # one third of the fused qkv
        names = ("z_image", "Z-Image/lora", "networks.lora_zimage", "https://github.com/Tongyi-MAI/Z-Image")
        shift = 3.0
    elif kind == "hunyuan":
        blocks = _linears(unet, "double_blocks.") + _linears(unet, "single_blocks.")
        assert modules == {"lora_unet_" + n.replace(".", "_") for n in blocks if "_mod." not in n
                           and "modulation" not in n}
        assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mlp_0",
                "lora_unet_single_blocks_2_linear1", "lora_unet_single_blocks_0_linear2"} <= modules
        names = ("hunyuan_video", "hunyuan-video/lora", "networks.lora", "https://github.com/Tencent/HunyuanVideo")
        shift = 7.0
        assert meta["ss_guidance_scale"] == "1.0"
    elif kind == "flux2":
        blocks = _linears(unet, "double_blocks.") + _linears(unet, "single_blocks.")
        assert modules == {"lora_unet_" + n.replace(".", "_") for n in blocks}
        assert not any("modulation" in m for m in modules)   # shared, outside the blocks
        mlp = unet.double_blocks[0].img_mlp[0].weight.shape[0]
        assert tensors["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"].shape == (mlp, RANK)  # gate | up whole
        names = ("flux_2_dev", "Flux.2-dev/lora", "networks.lora_flux_2", "https://github.com/black-forest-labs/flux2")
        shift = math.exp(2.02)
        assert meta["ss_guidance_scale"] == "1.0"
    else:
        stacks = [n for n in _linears(unet, "") if n.startswith(("layers.", "noise_refiner.", "context_refiner.",
                                                                   "final_layer."))]
        assert modules == {"lora_unet_" + n.replace(".", "_") for n in stacks}
        assert {"lora_unet_noise_refiner_0_adaLN_modulation_1", "lora_unet_context_refiner_1_attention_qkv",
                "lora_unet_final_layer_linear", "lora_unet_layers_0_feed_forward_w3"} <= modules
        kv = unet.layers[0].attention.n_kv_heads * unet.layers[0].attention.head_dim
        assert tensors["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (dim + 2 * kv, RANK)
        assert kv < dim   # GQA: unequal rows
        names = ("lumina2", "lumina-2/lora", "networks.lora_lumina", "https://github.com/Alpha-VLLM/Lumina-Image-2.0")
        shift = 6.0
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"],
            meta["modelspec.implementation"]) == names
    assert float(meta["ss_discrete_flow_shift"]) == pytest.approx(shift, rel=1e-4)
    assert meta["modelspec.prediction_type"] == "flow" and meta["ss_model_prediction_type"] == "raw"
    assert meta["ss_timestep_sampling"] == "logit-normal, model shift" and meta["ss_steps"] == str(STEPS)


@pytest.mark.parametrize("kind", KINDS)
def test_model_output_equals_saved_file_in_core_loader(kind, hosts, tmp_path):
    """All layers (Z-Image: refiners, modulation, embedders, final layer too; q / k / v still three modules), fp32
    file: every weight of the returned MODEL equals core's loader applying the saved file, the file changes exactly
    the weights it names, and our loader at strength -0.6 equals core's at -0.6 (1e-5 of the delta)."""
    host = hosts[kind]
    run = _run(host, tmp_path, steps=3, unet_targets="all layers", save_precision="fp32")
    tensors = comfy.utils.load_torch_file(run["path"], safe_load=True)
    modules = file_modules(run["path"])
    unet = host.model.model.diffusion_model
    unet_map = comfy.lora.model_lora_keys_unet(host.model.model, {})
    assert all(m in unet_map for m in modules)
    layers = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    hosted = {(unet_map[m] if isinstance(unet_map[m], str) else unet_map[m][0]) for m in modules}
    assert hosted == {f"diffusion_model.{n}.weight" for n in layers}
    base = patched_state(host.model)
    for strength in (1.0, -0.6):
        core_model, _ = comfy.sd.load_lora_for_models(host.model, None, tensors, strength, 0.0)
        if strength == 1.0:
            ours_model = run["model"]
        else:
            ours_model, _, _ = loader_module.apply_requests(
                host.model, None, [LoraRequest(read_lora_file(run["path"]), strength, 0.0)])
        ours, core = patched_state(ours_model), patched_state(core_model)
        assert ours.keys() == core.keys() == base.keys()
        for key in ours:
            delta = (core[key] - base[key]).abs().max().item()
            assert (ours[key] - core[key]).abs().max().item() <= 1e-5 * delta + 1e-7, key
        changed = {k for k in ours if not torch.equal(ours[k], base[k])}
        assert changed == hosted


def test_zimage_split_qkv_trains_each_third_and_restores(hosts):
    """The three LoRAs on Z-Image's fused qkv add their rows only (to_k's delta lives in rows h:2h), and the
    network's restore gives the module its own forward back after three nested wraps."""
    host = hosts["zimage"]
    arch, spec = nt.model_train_spec(host.model)
    key_map = host_module.HostModels(host.model).key_map
    unet = host.model.model.diffusion_model
    targets = lt.find_denoiser_targets(unet, key_map, spec, ("attn",), ["L00"])
    qkv = unet.layers[0].attention.qkv
    parts = [t for t in targets if t.module is qkv]
    h = unet.layers[0].attention.n_local_heads * unet.layers[0].attention.head_dim
    assert [(t.name.rsplit(".", 1)[-1], t.rows) for t in parts] == [("to_q", (0, h)), ("to_k", (h, h)),
                                                                    ("to_v", (2 * h, h))]
    network = lt.LoRANetwork(parts, 2, 2.0)
    with torch.no_grad():
        network.path(parts[1].name).up.weight.fill_(0.5)
    x = torch.randn(3, qkv.in_features)
    plain = qkv(x)
    network.inject()
    try:
        delta = qkv(x) - plain
    finally:
        network.restore()
    assert "forward" not in qkv.__dict__ and torch.equal(qkv(x), plain)
    assert delta[:, :h].abs().max() == 0 and delta[:, 2 * h:].abs().max() == 0 and delta[:, h:2 * h].abs().max() > 0
    expected = x @ network.delta_weight(parts[1].name).T
    assert torch.allclose(delta[:, h:2 * h], expected, atol=1e-6)


def test_lumina2_resolution_shift_is_nextdit_shift():
    """Lumina 2's resolution shift is kohya's nextdit_shift: mu linear in image tokens, 0.5 at 256, 1.15 at 4096
    (latent h w / 2²); Z-Image has none."""
    from lora_core.arch.families import lumina

    spec = lumina.FAMILY.train_spec(lumina.LUMINA2)
    shift = lt.ResolutionShift(*spec.resolution_shift)
    assert shift.shift((1, 16, 32, 32)) == pytest.approx(math.exp(0.5))
    assert shift.shift((1, 16, 128, 128)) == pytest.approx(math.exp(1.15))
    assert lumina.FAMILY.train_spec(lumina.Z_IMAGE).resolution_shift is None
