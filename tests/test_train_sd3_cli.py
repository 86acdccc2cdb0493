"""`python -m lora_core.train CONFIG` on a diffusers SD3 folder (SD3Transformer2DModel, CLIP-L + CLIP-G
CLIPTextModelWithProjection + T5EncoderModel, a 16-channel AutoencoderKL with SD3's shift / scale factors,
FlowMatchEulerDiscreteScheduler shift 3.0), on SD3 Medium's structure and SD3.5 Medium's (q/k norms, dual attention
attn2 in blocks 0-1, pre-only last context block): the text conditioning is StableDiffusion3Pipeline.encode_prompt's
(also without T5); the transformer call equals ComfyUI's MMDiT on the same weights; the saved file has kohya's SD3
names - the module names the train node gives a ComfyUI SD3 (fused qkv whole, at the same rank) - and the variant's
metadata; it lowers the flow-matching error; core's loader loads it on a ComfyUI SD3 of the same weights with no key
left, ours with every module matched, and both patch the same weights as LoraPatcher on the diffusers model (1e-5),
"all layers" included (the patch conv and diffusers' swapped [scale | shift] halves); option errors are clear and
write nothing.

The transformer's weights are tests.tiny_sd3.comfy_sd3(variant)'s converted with ComfyUI's own map
(comfy.utils.mmdit_to_diffusers); everything is saved with save_pretrained to a temp folder and read back by the
CLI - nothing from a hub.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from tests.comfy_host import HOST_DIR
from tests.test_train_distributed import lora_tensors, save_images
from tests.test_train_flux import core_loads_every_key
from tests.test_train_nodes import nt  # noqa: F401  (the stand-in package of nodes/, for nodes/_host.py)
from tests import tiny_sd3 as ts

import comfy.model_management as mm  # noqa: E402  (tests.test_train_flux imported ComfyUI)
import comfy.utils  # noqa: E402

VARIANTS = ("medium", "3.5-medium")
ARCH = {"medium": ("SD3-Medium", "medium", "stable-diffusion-3-medium/lora"),
        "3.5-medium": ("SD3.5-Medium", "5-medium", "stable-diffusion-3-5-medium/lora")}
T5_TOKENS = 32               # the tiny T5 tokenizer's model_max_length (keeps the test fast)
CLIP_L, CLIP_G, T5_WIDTH = 8, 16, ts.CONTEXT   # hidden widths: L + G = 24 padded to T5's 32 (= joint_attention_dim)
PROJECTION = ts.POOLED // 2  # each CLIP projects to 24: pooled 48 = the transformer's pooled_projection_dim


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def comfy_to_diffusers(model) -> dict:
    """A ComfyUI SD3's state in diffusers' SD3Transformer2DModel names (ComfyUI's own mmdit_to_diffusers)."""
    table = comfy.utils.mmdit_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
    state = model.model.state_dict()
    out = {}
    for dif, target in table.items():
        if isinstance(target, str):
            if target in state:
                out[dif] = state[target]
        elif target[0] in state:
            weight = state[target[0]]
            out[dif] = weight.narrow(*target[1]) if target[1] is not None else target[2](weight)
    return out


def save_tiny_sd3(folder: str, variant: str, t5: bool = True) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    twin = ts.diffusers_sd3_twin(variant)
    base = comfy_to_diffusers(ts.comfy_sd3(variant))
    assert set(base) == set(twin.state_dict())
    twin.load_state_dict(base)
    twin.save_pretrained(os.path.join(folder, "transformer"))
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.5305,
                  shift_factor=0.0609).save_pretrained(os.path.join(folder, "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(str(HOST_DIR / "comfy" / "sd1_tokenizer"), model_max_length=77)
    for index, (sub, hidden, act) in enumerate((("", CLIP_L, "quick_gelu"), ("_2", CLIP_G, "gelu"))):
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer" + sub))
        torch.manual_seed(2 + index)
        CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=PROJECTION, hidden_act=act, vocab_size=len(tokenizer), max_position_embeddings=77)
        ).save_pretrained(os.path.join(folder, "text_encoder" + sub))
    if t5:
        t5_tokenizer = T5TokenizerFast.from_pretrained(str(HOST_DIR / "comfy" / "text_encoders" / "t5_tokenizer"),
                                                       model_max_length=T5_TOKENS)
        t5_tokenizer.save_pretrained(os.path.join(folder, "tokenizer_3"))
        torch.manual_seed(4)
        T5EncoderModel(T5Config(d_model=T5_WIDTH, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                vocab_size=len(t5_tokenizer), feed_forward_proj="gated-gelu",
                                is_encoder_decoder=False)).save_pretrained(os.path.join(folder, "text_encoder_3"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(folder, "scheduler"))
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(index, handle)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-cli")
    for variant in VARIANTS:
        save_tiny_sd3(str(root / f"tiny-{variant}"), variant)
    save_tiny_sd3(str(root / "tiny-no-t5"), "medium", t5=False)
    save_images(str(root / "images"))
    return root


def sd3_config(root, name: str, model: str, batch_size: int = 2, **train) -> str:
    options = dict(steps=4, batch_size=batch_size, rank=4, alpha=2.0, save_precision="fp32", seed=7,
                   optimizer="SGD", unet_lr=0.05, text_encoder_lr=0.05, max_grad_norm=0.0)
    options.update(train)
    architecture, model_config = options.pop("architecture", "auto"), options.pop("model_config", "")
    lines = [f'model = "{model}"', f'model_config = "{model_config}"', f'architecture = "{architecture}"',
             f'output_dir = "out-{name}"',
             f'output_name = "{name}"', "", "[dataset]", 'folder = "images"', "resolution = 64", "repeats = 1",
             "bucketing = false", "", "[train]"]
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
    """Per variant, 30 AdamW steps with the default targets: a LoRA that has learnt something."""
    return {v: run_main(workspace, sd3_config(workspace, f"sd3-{v}", f"tiny-{v}", steps=30, optimizer="AdamW",
                                              unet_lr=2e-3, max_grad_norm=1.0), f"sd3-{v}") for v in VARIANTS}


@pytest.fixture(scope="module")
def all_layers(workspace):
    """Per variant, 2 SGD steps on "all layers" (embedders, the patch conv, the final layer too)."""
    return {v: run_main(workspace, sd3_config(workspace, f"sd3-all-{v}", f"tiny-{v}", steps=2,
                                              unet_targets="all layers"), f"sd3-all-{v}") for v in VARIANTS}


def load(workspace, variant: str = "medium", folder: str = ""):
    from lora_core.train.diffusers_sd3 import load_sd3

    return load_sd3(str(workspace / (folder or f"tiny-{variant}")), torch.device("cpu"))


def encoder_of(model):
    from lora_core.train.diffusers_sd3 import sd3_text_encoder

    return sd3_text_encoder((model.tokenizer, model.tokenizer_2, model.tokenizer_3),
                            (model.text_encoder, model.text_encoder_2, model.text_encoder_3),
                            int(model.transformer.config.joint_attention_dim))


def flow_error(workspace, variant, transformer) -> float:
    """Mean squared velocity error of `transformer` on the training images' latents, at fixed noise and levels."""
    from lora_core.train.__main__ import vae_encoder
    from lora_core.train.dataset import load_folder
    from lora_core.train.diffusers_sd3 import SD3DiffusersBackend, sd3_objective

    model = load(workspace, variant)
    dataset = load_folder(str(workspace / "images"), resolution=64, repeats=1, bucketing=False)
    images = torch.stack([s.image for s in dataset.samples])
    objective = sd3_objective(model.scheduler_config, "logit-normal, model shift")
    backend = SD3DiffusersBackend(transformer, objective)
    with torch.no_grad():
        latents = vae_encoder(model.vae)(images)
        cond = encoder_of(model)([s.caption for s in dataset.samples])
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


def node_module_names(variant: str, choice: str = "attn+ff+proj") -> set:
    """The module names the train node gives the LoRA of a ComfyUI SD3 of this structure."""
    import lora_core.train as lt

    model = ts.comfy_sd3(variant)
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

@pytest.mark.parametrize("folder", ["tiny-medium", "tiny-no-t5"])
def test_text_conditioning_is_the_sd3_pipelines(workspace, folder):
    """CLIP-L | CLIP-G penultimate states padded to T5's width + T5's tokens (zeros without T5), pooled L | G: what
    StableDiffusion3Pipeline.encode_prompt gives for the same folder."""
    from diffusers import StableDiffusion3Pipeline

    model = load(workspace, folder=folder)
    captions = ["sks square, colour 1", "a much longer caption " * 12]
    with torch.no_grad():
        ours = encoder_of(model)(captions)
        dropped = {} if model.text_encoder_3 is not None else dict(text_encoder_3=None, tokenizer_3=None)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(workspace / folder), local_files_only=True, **dropped)
        length = T5_TOKENS if model.text_encoder_3 is not None else 256
        context, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=length)
    assert ours["context"].shape == (2, 77 + length, T5_WIDTH) and ours["pooled_output"].shape == (2, ts.POOLED)
    assert torch.allclose(ours["context"], context, atol=1e-6)
    assert torch.allclose(ours["pooled_output"], pooled, atol=1e-6)
    assert ours["context"][:, :77, CLIP_L + CLIP_G:].abs().max() == 0   # the CLIP states' zero padding
    assert (ours["context"][:, 77:].abs().max() > 0) == (model.text_encoder_3 is not None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backend_call_equals_comfyuis_mmdit_on_the_same_weights(workspace, variant):
    """The diffusers transformer as the backend calls it (timestep sigma * 1000) gives the velocity ComfyUI's MMDiT
    of the same weights gives (its raw output under model_sampling CONST); the objective is the node's."""
    from lora_core.train.diffusers_sd3 import SD3DiffusersBackend, sd3_objective

    model = load(workspace, variant)
    comfy_model = ts.comfy_sd3(variant)
    key_map = host_module().HostModels(comfy_model).key_map
    assert key_map.arch.name == model.arch.name == ARCH[variant][0]
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    node = nt.objective_of_model(comfy_model.get_model_object("model_sampling"), spec)
    ours = sd3_objective(model.scheduler_config, spec.timestep_sampling)
    assert ours.shift == pytest.approx(node.shift, rel=1e-6) == 3.0 and ours.multiplier == node.multiplier == 1000
    assert ours.resolution_shift is node.resolution_shift is None and ours.default_sampling == node.default_sampling
    backend = SD3DiffusersBackend(model.transformer, ours)
    gen = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(2, 16, 8, 8, generator=gen), torch.tensor([0.3, 0.8])
    cond = {"context": torch.randn(2, 40, ts.CONTEXT, generator=gen),
            "pooled_output": torch.randn(2, ts.POOLED, generator=gen)}
    with torch.no_grad():
        velocity = backend.denoise(x, ours.model_timesteps(sigma), cond)
        theirs = comfy_model.model.diffusion_model(x, comfy_model.model.model_sampling.timestep(sigma),
                                                   context=cond["context"], y=cond["pooled_output"])
    assert velocity.abs().max() > 0 and torch.allclose(velocity, theirs, atol=1e-5)


# ------------------------------------------------------------------------------------------ the saved file

@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_file_has_the_nodes_kohya_names_and_metadata_and_lowers_the_error(workspace, trained, variant):
    from diffusers import SD3Transformer2DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    result = trained[variant]
    modules = file_modules(result["final_path"])
    assert modules == node_module_names(variant)
    tensors = lora_tensors(result["final_path"])
    hidden = 64 * ts.VARIANTS[variant][0]
    assert tuple(tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape) == (3 * hidden, 4)
    last = ts.VARIANTS[variant][0] - 1   # the pre-only context block: qkv and a 2h modulation, nothing else
    assert tuple(tensors[f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_up.weight"].shape) \
        == (2 * hidden, 4)
    assert f"lora_unet_joint_blocks_{last}_context_block_mlp_fc1" not in modules
    if variant == "3.5-medium":   # dual attention in blocks 0-1: attn2's fused qkv, 9h modulation
        assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_x_block_attn2_proj"} <= modules
        assert "lora_unet_joint_blocks_2_x_block_attn2_qkv" not in modules
        assert tuple(tensors["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.lora_up.weight"].shape) == \
            (9 * hidden, 4)
    else:
        assert not any("attn2" in m for m in modules)
    meta = file_metadata(result["final_path"])
    _, version, architecture = ARCH[variant]
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"],
            meta["modelspec.implementation"]) == (version, architecture, "networks.lora_sd3", "diffusers")
    assert meta["modelspec.prediction_type"] == "flow" and float(meta["ss_discrete_flow_shift"]) == 3.0
    assert meta["ss_timestep_sampling"] == "logit-normal, model shift" and "ss_guidance_scale" not in meta
    transformer = SD3Transformer2DModel.from_pretrained(str(workspace / f"tiny-{variant}"), subfolder="transformer")
    before = flow_error(workspace, variant, transformer)
    plan = LoraPatcher(transformer=transformer).apply([LoraRequest(read_lora_file(result["final_path"]), 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    after = flow_error(workspace, variant, transformer)
    losses = result["losses"]
    print(f"{variant}: flow error on the training images: base {before:.5f} -> with the LoRA {after:.5f} "
          f"({100 * (1 - after / before):.1f}%); losses first5 {sum(losses[:5]) / 5:.4f} last5 "
          f"{sum(losses[-5:]) / 5:.4f}")
    assert after < 0.9 * before


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_file_patches_a_comfyui_sd3_like_the_diffusers_model(workspace, trained, all_layers, variant, caplog):
    """Core's loader (no key left) and ours (every module matched) on a ComfyUI SD3 of the same weights, and
    LoraPatcher on the diffusers transformer, patch the same weights (compared in diffusers' layout through
    ComfyUI's own map); "all layers" adds the embedders, the patch conv and the final layer."""
    from diffusers import SD3Transformer2DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    core_loads_every_key(ts.comfy_sd3(variant), None, trained[variant]["final_path"], caplog)
    path = all_layers[variant]["final_path"]
    modules = file_modules(path)
    assert modules == node_module_names(variant, "all layers")
    assert {"lora_unet_x_embedder_proj", "lora_unet_final_layer_adaLN_modulation_1",
            "lora_unet_context_embedder"} <= modules
    assert lora_tensors(path)["lora_unet_x_embedder_proj.lora_down.weight"].shape[-2:] == (2, 2)   # a conv LoRA
    core = core_loads_every_key(ts.comfy_sd3(variant), None, path, caplog)
    assert len(core.patches) == len(modules)
    lora = read_lora_file(path)
    model = ts.comfy_sd3(variant)
    host = host_module().HostModels(model)
    plan = host.plan([LoraRequest(lora, 1.0, 0.0)])
    report = plan.reports[0]
    assert not report.unmatched and not report.unused_keys and report.matched == len(modules), plan.text()
    patched, _ = host.apply(plan)
    mm.load_models_gpu([patched], force_full_load=True)
    comfy_after = {k: v.clone() for k, v in comfy_to_diffusers(patched).items()}
    mm.unload_all_models()
    transformer = SD3Transformer2DModel.from_pretrained(str(workspace / f"tiny-{variant}"), subfolder="transformer")
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
    print(f"{variant}: ComfyUI SD3 (our loader) vs diffusers (LoraPatcher), {len(changed)} weights changed, worst "
          f"error / delta {worst:.1e}")
    last = ts.VARIANTS[variant][0] - 1
    assert {"pos_embed.proj.weight", "norm_out.linear.weight", f"transformer_blocks.{last}.norm1_context.linear.weight",
            "transformer_blocks.0.attn.add_k_proj.weight"} <= changed
    if variant == "3.5-medium":
        assert "transformer_blocks.1.attn2.to_v.weight" in changed
    # every Linear / conv of the transformer but the last block's text query: that block's text stream is
    # pre-only (its attention output is dropped), so the q rows of its fused qkv LoRA get no gradient
    layers = {n + ".weight" for n, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert changed == layers - {f"transformer_blocks.{last}.attn.add_q_proj.weight"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_network_is_the_saved_file(workspace, variant):
    """The side paths as training runs them (one LoRA per fused canonical weight over diffusers' split / swapped
    modules, the patch conv) give the transformer output LoraPatcher gives with their kohya tensors merged: every
    row lands where the file says it is. Random up weights, so every module's delta is live."""
    from diffusers import SD3Transformer2DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file
    from lora_core.train.diffusers_sd3 import sd3_targets
    from lora_core.train.injection import LoRANetwork
    from lora_core.train.save import save_lora

    model = load(workspace, variant)
    spec = model.arch.family.train_spec(model.arch, model.spec)
    kinds = spec.target_sets["all layers"]
    network = LoRANetwork(sd3_targets(model.transformer, model.arch, model.spec, spec, kinds), 4, 2.0, seed=3)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for path in network.paths.values():
            path.up.weight.copy_(0.05 * torch.randn(path.up.weight.shape, generator=gen))
    x = torch.randn(2, 16, 8, 8, generator=gen)
    args = dict(timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=torch.randn(2, 20, ts.CONTEXT,
                                                                                        generator=gen),
                pooled_projections=torch.randn(2, ts.POOLED, generator=gen), return_dict=False)
    with torch.no_grad():
        base = model.transformer(hidden_states=x, **args)[0]
        network.inject()
        trained = model.transformer(hidden_states=x, **args)[0]
        network.restore()
    path = str(workspace / f"network-{variant}.safetensors")
    save_lora(path, network.kohya_state_dict(), {}, overwrite=True)
    transformer = SD3Transformer2DModel.from_pretrained(str(workspace / f"tiny-{variant}"), subfolder="transformer")
    plan = LoraPatcher(transformer=transformer).apply([LoraRequest(read_lora_file(path), 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    with torch.no_grad():
        merged = transformer(hidden_states=x, **args)[0]
    print(f"{variant}: injected network vs its saved file merged: max |output diff| "
          f"{(trained - merged).abs().max().item():.1e} (LoRA effect {(trained - base).abs().max().item():.2f})")
    assert (trained - base).abs().max() > 1e-2
    assert torch.allclose(trained, merged, atol=1e-5 * max(1.0, merged.abs().max().item()))


# ------------------------------------------------------------------------------------------ text encoders, no T5

def test_sd3_text_encoders_train_with_kohyas_names_and_match(workspace):
    """train_text_encoder: CLIP-L lora_te1_ + CLIP-G lora_te2_ (kohya's default); text_encoders = "all" adds T5 as
    lora_te3_; every name is one ComfyUI core reads on an SD3 CLIP; LoraPatcher on the diffusers transformer + the
    three encoders matches every module; the validation loss is in the metadata at every step."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    import comfy.lora

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    clip_keys = comfy.lora.model_lora_keys_clip(ts.comfy_clip_sd3().cond_stage_model, {})
    root = str(workspace / "tiny-medium")
    for choice, prefixes in (("kohya default", {"lora_unet", "lora_te1", "lora_te2"}),
                             ("all", {"lora_unet", "lora_te1", "lora_te2", "lora_te3"})):
        name = "sd3-te-" + choice.replace(" ", "-")
        result = run_main(workspace, sd3_config(workspace, name, "tiny-medium", steps=2, train_text_encoder=True,
                                                text_encoders=choice, unet_targets="attn", validation_split=0.2,
                                                validate_every=1), name)
        tensors = lora_tensors(result["final_path"])
        curve = json.loads(file_metadata(result["final_path"])["lora_core.validation_loss"])
        assert [s for s, _ in curve] == [0, 1, 2] and all(v > 0 for _, v in curve)
        assert {"_".join(k.split("_")[:2]) for k in tensors} == prefixes
        te = {k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_te")}
        assert te <= set(clip_keys), sorted(te - set(clip_keys))[:5]
        assert all(tensors[k].abs().max() > 0 for k in tensors if k.startswith("lora_te") and "lora_up" in k)
        patcher = LoraPatcher(transformer=SD3Transformer2DModel.from_pretrained(root, subfolder="transformer"),
                              text_encoder=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder"),
                              text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root,
                                                                                         subfolder="text_encoder_2"),
                              text_encoder_3=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3"))
        plan = patcher.apply([LoraRequest(read_lora_file(result["final_path"]), 1.0, 1.0)])
        assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()


def test_sd3_without_t5_trains_on_zero_t5_tokens(workspace):
    result = run_main(workspace, sd3_config(workspace, "sd3-no-t5", "tiny-no-t5", steps=2, train_text_encoder=True),
                      "sd3-no-t5")
    tensors = lora_tensors(result["final_path"])
    assert {"_".join(k.split("_")[:2]) for k in tensors} == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".lora_up.weight"))


# ------------------------------------------------------------------------------------------ option errors

@pytest.mark.parametrize("name, model, options, message", [
    ("guidance", "tiny-medium", dict(guidance=3.5), "guidance = 3.5: guidance is the input of a guidance-distilled"),
    ("locon", "tiny-medium", dict(algorithm="LoCon"), "LoCon adds the convolution layers of a UNet"),
    ("resolution", "tiny-medium", dict(timestep_sampling="logit-normal, resolution shift"), "resolution-dependent"),
    ("arch", "tiny-3.5-medium", dict(architecture="sd3"), "is SD3.5-Medium but the config says architecture = 'sd3'"),
    ("arch-sdxl", "tiny-medium", dict(architecture="SDXL"), "is SD3-Medium but the config says"),
    ("no-t5", "tiny-no-t5", dict(train_text_encoder=True, text_encoders="all"), "has no text_encoder_3"),
    ("range", "tiny-medium", dict(timestep_range="900,100"), "timestep range '900,100'"),
    ("single-file", "tiny-medium/transformer/diffusion_pytorch_model.safetensors",
     dict(model_config="tiny-medium"), "reads SD3 / SD3.5 from a diffusers folder"),
])
def test_sd3_option_errors_are_clear_and_write_nothing(workspace, capsys, name, model, options, message):
    from lora_core.train.__main__ import main

    code = main([sd3_config(workspace, f"bad-{name}", model, steps=1, **options)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert f"bad-{name}.toml" in err or "Model " in err
    folder = workspace / f"out-bad-{name}"
    assert not folder.exists() or not any(folder.iterdir())


def test_sd3_gradient_checkpointing_trains_the_same_lora(workspace):
    """gradient_checkpointing wraps diffusers' joint blocks (SD3DiffusersBackend.checkpoint_modules): the LoRA is
    the same as without it."""
    runs = [run_main(workspace, sd3_config(workspace, f"sd3-gc{on}", "tiny-3.5-medium", steps=2,
                                           gradient_checkpointing=bool(on)), f"sd3-gc{on}") for on in (0, 1)]
    plain, checkpointed = (lora_tensors(r["final_path"]) for r in runs)
    assert plain.keys() == checkpointed.keys()
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-7
    assert any(v.abs().max() > 0 for k, v in plain.items() if k.endswith(".lora_up.weight"))


def test_sd35_large_structure_gets_its_variant_names_and_metadata(workspace):
    """q/k norms without attn2 is SD3.5 Large (the family's rule): the node's names, `5-large` metadata."""
    save_tiny_sd3(str(workspace / "tiny-3.5-large"), "3.5-large")
    result = run_main(workspace, sd3_config(workspace, "sd3-large", "tiny-3.5-large", steps=1), "sd3-large")
    assert file_modules(result["final_path"]) == node_module_names("3.5-large")
    meta = file_metadata(result["final_path"])
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("5-large",
                                                                               "stable-diffusion-3-5-large/lora")
