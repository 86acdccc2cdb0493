"""`python -m lora_core.train CONFIG` on a diffusers SDXL folder: the two text encoders (CLIPTextModel +
CLIPTextModelWithProjection), the pooled output and SDXL's add_time_ids, kohya SDXL names (`lora_unet_*` in LDM
layout, `lora_te1_*` / `lora_te2_*`) and sdxl metadata; the saved file applied by our loader to the diffusers
UNet and both encoders with every module matched lowers the denoising error on the training images; two gloo
processes with a per-process batch of 2 train the same LoRA as one process with a batch of 4; configs naming an
unknown / untrainable architecture are refused with the fix.

The model is a tiny diffusers SDXL pipeline (UNet2DConditionModel with addition_embed_type "text_time", AutoencoderKL,
CLIPTextModel, CLIPTextModelWithProjection, ComfyUI's own CLIP tokenizer files for both tokenizers, DDPMScheduler)
saved with save_pretrained to a temp folder and read back by the CLI with from_pretrained - nothing from a hub.
The images, config writer and torchrun harness are tests/test_train_distributed.py's.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.comfy_host import HOST_DIR
from tests.test_train_distributed import SGD, lora_tensors, max_diff, save_images, torchrun, write_config

from lora_core.errors import LoraValueError  # noqa: E402

STEPS = 4
PARITY_ATOL = 1e-5          # 2 processes vs 1 (LoRA tensors, fp32)
LOSS_ATOL = 1e-6
TIME_DIM = 8                # addition_time_embed_dim
HIDDEN = 32                 # both encoders' width (context = 32 + 32)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_tiny_sdxl(folder: str) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    # SDXL's UNet shape in small: no attention at the first level, linear proj_in/out, text_time size conditioning
    # (pooled width + 6 ids x addition_time_embed_dim into add_embedding).
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * HIDDEN,
                         attention_head_dim=4, norm_num_groups=32, use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                         projection_class_embeddings_input_dim=6 * TIME_DIM + HIDDEN
                         ).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64).save_pretrained(os.path.join(folder, "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(str(HOST_DIR / "comfy" / "sd1_tokenizer"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer_2"))
    text = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=77)
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(os.path.join(folder, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=HIDDEN)
                                ).save_pretrained(os.path.join(folder, "text_encoder_2"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(os.path.join(folder, "scheduler"))
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "force_zeros_for_empty_prompt": True}
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(index, handle)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cli")
    save_tiny_sdxl(str(root / "tiny-sdxl"))
    save_images(str(root / "images"))
    return root


def sdxl_config(root, name: str, batch_size: int, architecture: str = "", **train) -> str:
    path = write_config(root, name, batch_size, **train)
    text = open(path).read().replace('model = "tiny-sd"', 'model = "tiny-sdxl"')
    if architecture:
        text = f'architecture = "{architecture}"\n' + text
    open(path, "w").write(text)
    return path


def run_main(workspace, config: str, name: str) -> dict:
    from lora_core.train.__main__ import main

    summary = str(workspace / f"{name}.json")
    assert main([config, "--summary", summary]) == 0
    with open(summary) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def one_process(workspace):
    """Batch 4, 4 SGD steps (the parity reference)."""
    return run_main(workspace, sdxl_config(workspace, "xl-one", batch_size=4, architecture="SDXL", **SGD), "xl-one")


def denoise_error(model, workspace, generator_seed: int = 11) -> float:
    """Mean squared eps error of the (patched) diffusers UNet on the training images' latents, fixed noise and
    timesteps, with the captions through both (patched) encoders - what training lowers."""
    from lora_core.train import config as cfgmod
    from lora_core.train.__main__ import vae_encoder
    from lora_core.train.dataset import load_folder
    from lora_core.train.diffusers_sdxl import SDXLDiffusersBackend, sdxl_text_encoder

    dataset = load_folder(str(workspace / "images"), resolution=64, repeats=1, bucketing=False)
    images = torch.stack([s.image for s in dataset.samples])
    captions = [s.caption for s in dataset.samples]
    with torch.no_grad():
        latents = vae_encoder(model.vae)(images)
        cond = sdxl_text_encoder([model.tokenizer, model.tokenizer_2], [model.text_encoder, model.text_encoder_2])(
            captions)
        backend = SDXLDiffusersBackend(model.unet, model.alphas_cumprod, "epsilon")
        gen = torch.Generator().manual_seed(generator_seed)
        total = 0.0
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=gen)
            a = model.alphas_cumprod[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            timesteps = torch.full((len(latents),), t, dtype=torch.long)
            total += float(((backend.denoise(noisy, timesteps, cond) - noise) ** 2).mean())
    del cfgmod
    return total / 5


# ------------------------------------------------------------------------------------------ one process

def test_sdxl_file_has_kohya_sdxl_names_and_lowers_the_error_with_every_module_matched(workspace):
    from safetensors import safe_open

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file
    from lora_core.train.__main__ import load_model

    result = run_main(workspace, sdxl_config(workspace, "xl-learn", batch_size=4, steps=60, unet_lr=1e-2,
                                             text_encoder_lr=1e-2, min_snr_gamma=0.0, rank=8, alpha=8.0,
                                             unet_targets="all layers"),
                      "xl-learn")
    assert result["step"] == 60 and all(0 < x < 10 for x in result["losses"])
    path = result["final_path"]
    tensors = lora_tensors(path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == result["modules"] and len(tensors) == 3 * len(modules)
    prefixes = {m.split("_")[0] + "_" + m.split("_")[1] for m in modules}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}, prefixes
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in modules        # LDM layout names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in modules
    assert not any(m.startswith("lora_te_") for m in modules)
    # te1's last layer is not in the context (penultimate hidden states): no module for it; te2's is (pooled).
    assert not any(m.startswith("lora_te1_text_model_encoder_layers_1_") for m in modules)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules
    # Cross-attention k/v read the 64-wide concatenated context (te1 32 + te2 32).
    assert tensors["lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[1] == 2 * HIDDEN
    for component in ("lora_te1_", "lora_te2_"):
        assert any(torch.count_nonzero(v) for k, v in tensors.items() if k.startswith(component) and "lora_up" in k)
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0", meta["ss_base_model_version"]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"   # sd-scripts sai_model_spec
    assert meta["ss_sd_model_name"] == "tiny-sdxl" and meta["ss_steps"] == "60"

    model = load_model(str(workspace / "tiny-sdxl"), "", torch.device("cpu"))
    assert model.arch.name == "SDXL" and model.sdxl
    before = denoise_error(model, workspace)
    patcher = LoraPatcher(unet=model.unet, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2)
    plan = patcher.apply([LoraRequest(read_lora_file(path), 1.0, 1.0)])
    report = plan.reports[0]
    assert report.unmatched == [] and report.unused_keys == [], report.text()
    assert sum(report.applied.values()) == len(modules), report.text()
    after = denoise_error(model, workspace)
    print(f"SDXL CLI, 60 steps: denoising error on the training images {before:.5f} -> {after:.5f} "
          f"({(1 - after / before) * 100:.1f}% lower); train loss first 5 "
          f"{sum(result['losses'][:5]) / 5:.4f}, last 5 {sum(result['losses'][-5:]) / 5:.4f}")
    assert after < 0.97 * before, (before, after)

    # One te2 module by hand: the patched weight moved by up @ down * alpha / rank.
    name = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    down, up = tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"]
    fresh = load_model(str(workspace / "tiny-sdxl"), "", torch.device("cpu"))
    key = "text_model.encoder.layers.0.self_attn.v_proj.weight"
    moved = model.text_encoder_2.state_dict()[key] - fresh.text_encoder_2.state_dict()[key]
    expected = up @ down * (float(tensors[name + ".alpha"]) / down.shape[0])
    assert torch.count_nonzero(expected) > 0 and torch.allclose(moved, expected, atol=1e-6, rtol=1e-5)


def test_sdxl_time_ids_and_pooled_reach_the_unet(workspace):
    """The UNet sees the pooled te2 embedding and the size ids: changing either changes the prediction, and the
    ids are (h, w, 0, 0, h, w) in pixels (latent x the VAE's scale)."""
    from lora_core.train.__main__ import load_model
    from lora_core.train.diffusers_sdxl import SDXLDiffusersBackend, add_time_ids

    model = load_model(str(workspace / "tiny-sdxl"), "", torch.device("cpu"))
    assert add_time_ids(64, 96, 2, "cpu", torch.float32).tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    seen = {}
    backend = SDXLDiffusersBackend(model.unet, model.alphas_cumprod, "epsilon", vae_scale=8)
    original = model.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        seen.update(added_cond_kwargs)
        return original(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    model.unet.forward = spy
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 8, 12, generator=gen)
    cond = {"context": torch.randn(1, 77, 2 * HIDDEN, generator=gen), "pooled_output": torch.randn(1, HIDDEN, generator=gen)}
    t = torch.tensor([500])
    with torch.no_grad():
        base = backend.denoise(noisy, t, cond)
        assert seen["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
        assert torch.equal(seen["text_embeds"], cond["pooled_output"])
        other_pooled = backend.denoise(noisy, t, {**cond, "pooled_output": cond["pooled_output"] + 1})
        backend.vae_scale = 16
        other_size = backend.denoise(noisy, t, cond)
    assert (base - other_pooled).abs().max() > 1e-4 and (base - other_size).abs().max() > 1e-4


def test_sdxl_architecture_errors(workspace, tmp_path, capsys):
    from lora_core.train import config as cfgmod
    from lora_core.train.__main__ import load_model, main

    good = {"model": "m", "dataset": {"folder": "imgs"}}
    assert cfgmod.parse({**good, "architecture": "pony"}, "c.toml").architecture == "pony"
    for name, fragments in (("sdxxl", ["architecture = 'sdxxl' is not an architecture", "Did you mean 'sdxl'?"]),
                            ("qwen-image", ["architecture = 'qwen-image' is Qwen-Image, which this trainer does "
                                            "not train",
                                        "SD1 / SD2 / SDXL / Flux.1-dev", "LoRA Core Train node"])):
        with pytest.raises(LoraValueError) as info:
            cfgmod.parse({**good, "architecture": name}, "c.toml")
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(LoraValueError, match=r"tiny-sdxl is SDXL but the config says architecture = 'sd15' \(SD1\)"):
        load_model(str(workspace / "tiny-sdxl"), "", torch.device("cpu"), "sd15")
    # Flux.1 is trained (tests/test_train_flux_cli.py), but not from an SD folder
    assert cfgmod.parse({**good, "architecture": "flux"}, "c.toml").architecture == "flux"
    with pytest.raises(LoraValueError, match=r"tiny-sdxl is SDXL but the config says architecture = 'flux'"):
        load_model(str(workspace / "tiny-sdxl"), "", torch.device("cpu"), "flux")
    # Through the CLI: exit code 2 and the message on stderr.
    config = tmp_path / "c.toml"
    config.write_text(f'model = "{workspace / "tiny-sdxl"}"\narchitecture = "hunyuan-video"\n[dataset]\n'
                      f'folder = "imgs"\n')
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "architecture = 'hunyuan-video' is HunyuanVideo" in err and "SD1 / SD2 / SDXL" in err
    # A half SDXL folder (text_encoder_2 without tokenizer_2) is named as such.
    broken = tmp_path / "half-sdxl"
    broken.mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2"):
        (broken / sub).mkdir()
    with pytest.raises(Exception, match="has text_encoder_2 but not tokenizer_2"):
        load_model(str(broken), "", torch.device("cpu"))


# ------------------------------------------------------------------------------------------ two processes

def test_sdxl_two_processes_equal_one_with_the_same_global_batch(workspace, one_process):
    two = torchrun(sdxl_config(workspace, "xl-two", batch_size=2, **SGD), str(workspace / "xl-two.json"),
                   str(workspace / "writes-xl-two.log"))
    assert two["world_size"] == 2 and two["global_batch"] == 4
    mine, reference = lora_tensors(two["final_path"]), lora_tensors(one_process["final_path"])
    assert any(k.startswith("lora_te2_") for k in mine)
    diff = max_diff(mine, reference)
    print(f"SDXL, 2 processes vs 1: max |LoRA diff| {diff:.2e}; losses {two['losses']} vs {one_process['losses']}")
    assert diff <= PARITY_ATOL
    assert two["losses"] == pytest.approx(one_process["losses"], abs=LOSS_ATOL)
    assert max(abs(v.float()).max().item() for k, v in reference.items() if "lora_up" in k) > 0
