"""`python -m lora_core.train CONFIG` on a diffusers Flux.1 folder (FluxTransformer2DModel, CLIPTextModel +
T5EncoderModel, a 16-channel AutoencoderKL with shift / scale factors, FlowMatchEulerDiscreteScheduler with
dynamic shifting): the saved file has kohya's Flux names - the same module names the train node gives a ComfyUI
Flux (fused `img_attn_qkv`, `linear1`, at the same rank) - and Flux.1 dev metadata; it lowers the flow-matching
error on the training images; it loads with every module matched in our loader on a ComfyUI Flux of the same
weights and in LoraPatcher(transformer=) on the diffusers model, and both patch the same weights; two gloo
processes with a per-process batch of 2 equal one process with a batch of 4; a transformer file with model_config
trains like its folder.

The transformer's weights are tests.tiny_models.comfy_flux()'s, converted with ComfyUI's own map
(comfy.utils.flux_to_diffusers), so a ComfyUI Flux of the same weights exists; everything is saved with
save_pretrained to a temp folder and read back by the CLI - nothing from a hub.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from tests.comfy_host import HOST_DIR
from tests.test_train_distributed import SGD, lora_tensors, max_diff, save_images, torchrun, writes
from tests.test_train_nodes import nt  # noqa: F401  (the stand-in package of nodes/, for nodes/_host.py)
from tests import dit_writers as dw
from tests import tiny_models as tm

STEPS = 4
PARITY_ATOL = 1e-5
HIDDEN = 32                 # CLIP-L width (= the transformer's pooled_projection_dim) and T5 d_model (= joint dim)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def comfy_to_diffusers(model) -> dict:
    import comfy.utils

    table = comfy.utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
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


def save_tiny_flux(folder: str) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    twin = dw.diffusers_flux_twin()
    base = comfy_to_diffusers(tm.comfy_flux())
    assert set(base) == set(twin.state_dict())
    twin.load_state_dict(base)
    twin.save_pretrained(os.path.join(folder, "transformer"))
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
                  shift_factor=0.1159).save_pretrained(os.path.join(folder, "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(str(HOST_DIR / "comfy" / "sd1_tokenizer"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    CLIPTextModel(CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=len(tokenizer), max_position_embeddings=77)
                  ).save_pretrained(os.path.join(folder, "text_encoder"))
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(HOST_DIR / "comfy" / "text_encoders" / "t5_tokenizer"),
                                                   model_max_length=32)   # 32 T5 tokens keep the test fast
    t5_tokenizer.save_pretrained(os.path.join(folder, "tokenizer_2"))
    T5EncoderModel(T5Config(d_model=HIDDEN, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(t5_tokenizer),
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False)
                   ).save_pretrained(os.path.join(folder, "text_encoder_2"))
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096
                                    ).save_pretrained(os.path.join(folder, "scheduler"))
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(index, handle)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-cli")
    save_tiny_flux(str(root / "tiny-flux"))
    save_images(str(root / "images"))
    return root


def flux_config(root, name: str, batch_size: int, model: str = "tiny-flux", model_config: str = "",
                **train) -> str:
    options = dict(steps=STEPS, batch_size=batch_size, rank=4, alpha=2.0, save_precision="fp32", seed=7, **SGD)
    options.update(train)
    lines = [f'model = "{model}"', f'model_config = "{model_config}"', 'output_dir = "out"',
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
def one_process(workspace):
    """Batch 4, 4 SGD steps (the parity reference)."""
    return run_main(workspace, flux_config(workspace, "flux-one", batch_size=4), "flux-one")


@pytest.fixture(scope="module")
def trained(workspace):
    """30 AdamW steps: a LoRA that has learnt something."""
    return run_main(workspace, flux_config(workspace, "flux-trained", batch_size=2, steps=30, optimizer="AdamW",
                                           unet_lr=2e-3, max_grad_norm=1.0), "flux-trained")


def flow_error(workspace, transformer) -> float:
    """Mean squared velocity error of `transformer` on the training images' latents, at fixed noise and levels."""
    from lora_core.train.__main__ import vae_encoder
    from lora_core.train.dataset import load_folder
    from lora_core.train.diffusers_flux import FluxDiffusersBackend, flux_objective, flux_text_encoder, load_flux

    model = load_flux(str(workspace / "tiny-flux"), "", torch.device("cpu"))
    dataset = load_folder(str(workspace / "images"), resolution=64, repeats=1, bucketing=False)
    images = torch.stack([s.image for s in dataset.samples])
    captions = [s.caption for s in dataset.samples]
    objective = flux_objective(model.scheduler_config, "logit-normal, model shift")
    backend = FluxDiffusersBackend(transformer, objective, 1.0)
    with torch.no_grad():
        latents = vae_encoder(model.vae)(images)
        cond = flux_text_encoder(model.tokenizer, model.text_encoder, model.tokenizer_2, model.text_encoder_2)(captions)
        gen = torch.Generator().manual_seed(11)
        total = 0.0
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(latents.shape, generator=gen)
            level = torch.full((latents.shape[0],), sigma)
            out = backend.denoise(objective.noisy(latents, noise, level), objective.model_timesteps(level), cond)
            total += float(((out - objective.target(latents, noise, level)) ** 2).mean())
    return total / 3


def node_module_names() -> set:
    """The module names the train node gives the LoRA of a ComfyUI Flux (attn+ff+proj = kohya's default)."""
    import lora_core.train as lt

    host = importlib.import_module("lora_core_train_nodes._host")
    model = tm.comfy_flux()
    key_map = host.HostModels(model).key_map
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    kinds = spec.target_sets["attn+ff+proj"]
    return {t.name for t in lt.find_denoiser_targets(model.model.diffusion_model, key_map, spec, kinds)}


def test_flux_file_has_the_nodes_kohya_names_and_metadata_and_lowers_the_error(workspace, trained):
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    tensors = lora_tensors(trained["final_path"])
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert modules == node_module_names()
    assert tuple(tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape) == (3 * 64, 4)
    assert tuple(tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape) == (3 * 64 + 256, 4)
    assert tuple(tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape) == (4, 64)
    with safe_open(trained["final_path"], framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    print({k: v for k, v in meta.items() if "shift" in k or "timestep" in k or "guidance" in k})
    transformer = FluxTransformer2DModel.from_pretrained(str(workspace / "tiny-flux"), subfolder="transformer")
    before = flow_error(workspace, transformer)
    patcher = LoraPatcher(transformer=transformer)
    plan = patcher.apply([LoraRequest(read_lora_file(trained["final_path"]), 1.0, 0.0)])
    report = plan.reports[0]
    assert not report.unmatched and not report.unused_keys, plan.text()
    after = flow_error(workspace, transformer)
    print(f"flow error on the training images: base {before:.5f} -> with the LoRA {after:.5f}; "
          f"losses {trained['losses'][:3]} ... {trained['losses'][-3:]}")
    assert after < 0.97 * before


def test_flux_file_patches_a_comfyui_flux_like_the_diffusers_model(workspace, trained):
    """Our loader on a ComfyUI Flux of the same weights (every module matched) and LoraPatcher on the diffusers
    transformer patch the same weights (compared in diffusers' layout through ComfyUI's own map)."""
    import comfy.model_management as mm
    from diffusers import FluxTransformer2DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    host_mod = importlib.import_module("lora_core_train_nodes._host")
    lora = read_lora_file(trained["final_path"])
    model = tm.comfy_flux()
    host = host_mod.HostModels(model)
    plan = host.plan([LoraRequest(lora, 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    patched, _ = host.apply(plan)
    mm.load_models_gpu([patched], force_full_load=True)
    comfy_after = {k: v.clone() for k, v in comfy_to_diffusers(patched).items()}
    mm.unload_all_models()
    transformer = FluxTransformer2DModel.from_pretrained(str(workspace / "tiny-flux"), subfolder="transformer")
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    LoraPatcher(transformer=transformer).apply([LoraRequest(lora, 1.0, 0.0)])
    ours = transformer.state_dict()
    changed = 0
    for key, value in comfy_after.items():
        delta = (value - base[key]).abs().max().item()
        assert (ours[key] - value).abs().max().item() <= 1e-5 * max(delta, 1e-6) + 1e-6, key
        changed += delta > 0
    assert changed >= 40 and any(".attn.to_k." in k and (comfy_after[k] != base[k]).any() for k in comfy_after)


def test_flux_two_processes_equal_one_with_the_same_global_batch(workspace, one_process):
    log = str(workspace / "writes-flux.log")
    two = torchrun(flux_config(workspace, "flux-two", batch_size=2), str(workspace / "flux-two.json"), log)
    assert two["world_size"] == 2 and two["global_batch"] == 4
    diff = max_diff(lora_tensors(two["final_path"]), lora_tensors(one_process["final_path"]))
    print(f"Flux, 2 processes vs 1: max |LoRA diff| {diff:.2e}; losses {two['losses']} vs {one_process['losses']}")
    assert diff <= PARITY_ATOL
    assert max_diff(lora_tensors(one_process["final_path"]), {k: 0 * v for k, v in
                                                              lora_tensors(one_process["final_path"]).items()}) > 0
    assert two["losses"] == pytest.approx(one_process["losses"], abs=1e-6)
    assert {rank for rank, _, _ in writes(log)} == {"0"}


def test_flux_transformer_file_with_model_config_trains_like_its_folder(workspace, one_process):
    from safetensors.torch import save_file

    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(workspace / "tiny-flux"), subfolder="transformer")
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()},
              str(workspace / "flux-transformer.safetensors"))
    single = run_main(workspace, flux_config(workspace, "flux-file", batch_size=4,
                                             model="flux-transformer.safetensors", model_config="tiny-flux"),
                      "flux-file")
    # the same run to fp32 rounding (two in-process runs of the same config differ by ~1e-8 here: the SD
    # single-file test in test_train_distributed.py sees the same)
    assert max_diff(lora_tensors(single["final_path"]), lora_tensors(one_process["final_path"])) <= 1e-7


def test_flux_objective_is_the_nodes_on_the_comfyui_flux(workspace):
    """The scheduler config's shift (dynamic: BFL's resolution shift, e^max_shift fixed) is what the node reads
    from a ComfyUI Flux.1 dev's model_sampling; schnell-style static shift is the scheduler's `shift`."""
    from lora_core.train.diffusers_flux import flux_objective

    model = tm.comfy_flux()
    host = importlib.import_module("lora_core_train_nodes._host")
    key_map = host.HostModels(model).key_map
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    node = nt.objective_of_model(model.get_model_object("model_sampling"), spec)
    with open(workspace / "tiny-flux" / "scheduler" / "scheduler_config.json") as handle:
        ours = flux_objective(json.load(handle), spec.timestep_sampling)
    assert ours.shift == pytest.approx(node.shift, rel=1e-6) and ours.multiplier == node.multiplier
    assert ours.resolution_shift == node.resolution_shift and ours.default_sampling == node.default_sampling
    assert flux_objective({"shift": 1.0, "use_dynamic_shifting": False}, "x").shift == 1.0


def test_flux_text_encoders_train_with_kohyas_names_and_match(workspace):
    """train_text_encoder: CLIP-L as lora_te1_ (kohya's default); text_encoders = "all" adds T5 as lora_te3_;
    LoraPatcher on the diffusers transformer + both encoders matches every module; the validation loss (one of 5
    images held out) is in the file's metadata at every step."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    for choice, prefixes in (("kohya default", {"lora_unet", "lora_te1"}),
                             ("all", {"lora_unet", "lora_te1", "lora_te3"})):
        name = "flux-te-" + choice.replace(" ", "-")
        result = run_main(workspace, flux_config(workspace, name, batch_size=2, steps=2, train_text_encoder=True,
                                                 text_encoders=choice, unet_targets="attn", validation_split=0.2,
                                                 validate_every=1), name)
        tensors = lora_tensors(result["final_path"])
        from safetensors import safe_open

        with safe_open(result["final_path"], framework="pt") as handle:   # the flow validation loss, each step
            curve = json.loads(handle.metadata()["lora_core.validation_loss"])
        assert [s for s, _ in curve] == [0, 1, 2] and all(v > 0 for _, v in curve)
        assert {k.split("_")[0] + "_" + k.split("_")[1] for k in tensors} == prefixes
        te = [k for k in tensors if k.startswith("lora_te") and k.endswith(".lora_up.weight")]
        assert all(tensors[k].abs().max() > 0 for k in te), "a text-encoder LoRA did not train"
        root = str(workspace / "tiny-flux")
        patcher = LoraPatcher(transformer=FluxTransformer2DModel.from_pretrained(root, subfolder="transformer"),
                              text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
                              text_encoder_2=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2"))
        plan = patcher.apply([LoraRequest(read_lora_file(result["final_path"]), 1.0, 1.0)])
        assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()


def test_flux_gradient_checkpointing_trains_the_same_lora(workspace):
    """gradient_checkpointing wraps diffusers' double / single blocks (FluxDiffusersBackend.checkpoint_modules):
    the LoRA is the same as without it."""
    runs = [run_main(workspace, flux_config(workspace, f"flux-gc{on}", batch_size=2, steps=2,
                                            gradient_checkpointing=bool(on)), f"flux-gc{on}") for on in (0, 1)]
    plain, checkpointed = (lora_tensors(r["final_path"]) for r in runs)
    assert max_diff(plain, checkpointed) <= 1e-7
    assert any(v.abs().max() > 0 for k, v in plain.items() if k.endswith(".lora_up.weight"))
