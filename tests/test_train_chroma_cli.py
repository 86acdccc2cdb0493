"""`python -m lora_core.train CONFIG` on a diffusers Chroma folder (ChromaTransformer2DModel, T5EncoderModel alone,
the 16-channel Flux VAE, FlowMatchEulerDiscreteScheduler with a fixed shift): the saved file has the module names
the train node gives a ComfyUI Chroma (fused `img_attn_qkv`, `linear1`; "all layers" adds the distilled guidance
layer, the input embeddings and the final layer) and Chroma's metadata; it lowers the flow-matching error on the
training images; our loader on a ComfyUI Chroma of the same weights matches every module and patches the same
weights as LoraPatcher(transformer=) on the diffusers model; two gloo processes with a per-process batch of 2
equal one process with a batch of 4; T5 reads each caption as diffusers' ChromaPipeline does.

The transformer's weights are tests.tiny_models.comfy_chroma()'s, converted with diffusers' own single-file map
(convert_chroma_transformer_checkpoint_to_diffusers), so a ComfyUI Chroma of the same weights exists; everything
is saved with save_pretrained to a temp folder and read back by the CLI - nothing from a hub.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from tests.comfy_host import HOST_DIR
from tests.test_train_distributed import lora_tensors, max_diff, save_images, torchrun, writes
from tests.test_train_flux_cli import flux_config, run_main
from tests.test_train_nodes import nt  # noqa: F401  (the stand-in package of nodes/, for nodes/_host.py)
from tests import tiny_models as tm

HIDDEN = 32                 # T5 d_model (= the transformer's joint_attention_dim)
PARITY_ATOL = 1e-5
TARGETS = "all layers"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def comfy_to_diffusers(model) -> dict:
    """A ComfyUI Chroma's weights in diffusers' ChromaTransformer2DModel names: ComfyUI's own Flux map
    (comfy.utils.flux_to_diffusers) for the blocks, and the distilled guidance layer by diffusers' names
    (its single-file converter's: layers.N.in_layer / out_layer -> linear_1 / linear_2, norms.N.scale -> .weight;
    that converter itself assumes Chroma's full width)."""
    import re

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
    for key, value in state.items():
        if key.startswith("diffusion_model.distilled_guidance_layer."):
            name = key[len("diffusion_model."):]
            name = re.sub(r"\.layers\.(\d+)\.in_layer\.", r".layers.\1.linear_1.", name)
            name = re.sub(r"\.layers\.(\d+)\.out_layer\.", r".layers.\1.linear_2.", name)
            out[re.sub(r"\.norms\.(\d+)\.scale$", r".norms.\1.weight", name)] = value
    return out


def chroma_transformer():
    from diffusers import ChromaTransformer2DModel

    cfg = tm.chroma_config()
    head = cfg["hidden_size"] // cfg["num_heads"]
    return ChromaTransformer2DModel(patch_size=1, in_channels=cfg["in_channels"], num_layers=cfg["depth"],
                                    num_single_layers=cfg["depth_single_blocks"], attention_head_dim=head,
                                    num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
                                    axes_dims_rope=tuple(cfg["axes_dim"]), approximator_num_channels=cfg["in_dim"],
                                    approximator_hidden_dim=cfg["hidden_dim"],
                                    approximator_layers=cfg["n_layers"]).eval()


def save_tiny_chroma(folder: str) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    transformer = chroma_transformer()
    base = comfy_to_diffusers(tm.comfy_chroma())
    assert set(base) == set(transformer.state_dict())
    transformer.load_state_dict(base)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
                  shift_factor=0.1159).save_pretrained(os.path.join(folder, "vae"))
    tokenizer = T5TokenizerFast.from_pretrained(str(HOST_DIR / "comfy" / "text_encoders" / "t5_tokenizer"),
                                                model_max_length=32)   # 32 T5 tokens keep the test fast
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    T5EncoderModel(T5Config(d_model=HIDDEN, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(tokenizer),
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False)
                   ).save_pretrained(os.path.join(folder, "text_encoder"))
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False).save_pretrained(
        os.path.join(folder, "scheduler"))
    index = {"_class_name": "ChromaPipeline", "transformer": ["diffusers", "ChromaTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    with open(os.path.join(folder, "model_index.json"), "w") as handle:
        json.dump(index, handle)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma-cli")
    save_tiny_chroma(str(root / "tiny-chroma"))
    save_images(str(root / "images"))
    return root


def chroma_config(root, name: str, batch_size: int, **train) -> str:
    return flux_config(root, name, batch_size, model="tiny-chroma", **{"unet_targets": TARGETS, **train})


@pytest.fixture(scope="module")
def one_process(workspace):
    """Batch 4, 4 SGD steps (the parity reference)."""
    return run_main(workspace, chroma_config(workspace, "chroma-one", batch_size=4), "chroma-one")


@pytest.fixture(scope="module")
def trained(workspace):
    """30 AdamW steps: a LoRA that has learnt something."""
    return run_main(workspace, chroma_config(workspace, "chroma-trained", batch_size=2, steps=30, optimizer="AdamW",
                                             unet_lr=2e-3, max_grad_norm=1.0), "chroma-trained")


def flow_error(workspace, transformer) -> float:
    """Mean squared velocity error of `transformer` on the training images' latents, at fixed noise and levels."""
    from lora_core.train.__main__ import vae_encoder
    from lora_core.train.dataset import load_folder
    from lora_core.train.diffusers_flux import ChromaDiffusersBackend, chroma_text_encoder, flux_objective, load_flux

    model = load_flux(str(workspace / "tiny-chroma"), "", torch.device("cpu"))
    dataset = load_folder(str(workspace / "images"), resolution=64, repeats=1, bucketing=False)
    objective = flux_objective(model.scheduler_config, "logit-normal, model shift")
    backend = ChromaDiffusersBackend(transformer, objective)
    encode = chroma_text_encoder(model.tokenizer, model.text_encoder)
    gen = torch.Generator().manual_seed(11)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in dataset.samples:   # one caption at a time: each its own token length
            latents = vae_encoder(model.vae)(sample.image[None])
            cond = encode([sample.caption])
            for sigma in (0.25, 0.5, 0.75):
                noise = torch.randn(latents.shape, generator=gen)
                level = torch.full((1,), sigma)
                out = backend.denoise(objective.noisy(latents, noise, level), objective.model_timesteps(level), cond)
                total += float(((out - objective.target(latents, noise, level)) ** 2).mean())
                count += 1
    return total / count


def node_module_names() -> set:
    """The module names the train node gives the LoRA of a ComfyUI Chroma with the same target set."""
    import lora_core.train as lt

    host = importlib.import_module("lora_core_train_nodes._host")
    model = tm.comfy_chroma()
    key_map = host.HostModels(model).key_map
    assert key_map.arch.name == "Chroma"
    spec = key_map.arch.family.train_spec(key_map.arch, key_map.config)
    kinds = spec.target_sets[TARGETS]
    return {t.name for t in lt.find_denoiser_targets(model.model.diffusion_model, key_map, spec, kinds)}


def test_chroma_file_has_the_nodes_names_and_metadata_and_lowers_the_error(workspace, trained):
    from diffusers import ChromaTransformer2DModel
    from safetensors import safe_open

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    tensors = lora_tensors(trained["final_path"])
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert modules == node_module_names()
    assert "lora_unet_distilled_guidance_layer_layers_0_in_layer" in modules
    assert tuple(tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape) == (3 * 64, 4)
    assert tuple(tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape) == (3 * 64 + 256, 4)
    with safe_open(trained["final_path"], framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"].startswith("chroma")
    assert "ss_guidance_scale" not in meta or meta["ss_guidance_scale"] in ("", "None")
    print({k: v for k, v in meta.items() if "shift" in k or "guidance" in k or "architecture" in k})
    transformer = ChromaTransformer2DModel.from_pretrained(str(workspace / "tiny-chroma"), subfolder="transformer")
    before = flow_error(workspace, transformer)
    plan = LoraPatcher(transformer=transformer).apply([LoraRequest(read_lora_file(trained["final_path"]), 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    after = flow_error(workspace, transformer)
    print(f"Chroma flow error on the training images: base {before:.5f} -> with the LoRA {after:.5f}; "
          f"losses {trained['losses'][:3]} ... {trained['losses'][-3:]}")
    assert after < 0.97 * before


def test_chroma_file_patches_a_comfyui_chroma_like_the_diffusers_model(workspace, trained):
    """Our loader on a ComfyUI Chroma of the same weights (every module matched) and LoraPatcher on the diffusers
    transformer patch the same weights (compared in diffusers' layout through diffusers' own converter)."""
    import comfy.model_management as mm
    from diffusers import ChromaTransformer2DModel

    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    host_mod = importlib.import_module("lora_core_train_nodes._host")
    lora = read_lora_file(trained["final_path"])
    host = host_mod.HostModels(tm.comfy_chroma())
    plan = host.plan([LoraRequest(lora, 1.0, 0.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()
    patched, _ = host.apply(plan)
    mm.load_models_gpu([patched], force_full_load=True)
    comfy_after = {k: v.clone() for k, v in comfy_to_diffusers(patched).items()}
    mm.unload_all_models()
    transformer = ChromaTransformer2DModel.from_pretrained(str(workspace / "tiny-chroma"), subfolder="transformer")
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    LoraPatcher(transformer=transformer).apply([LoraRequest(lora, 1.0, 0.0)])
    ours = transformer.state_dict()
    changed = 0
    for key, value in comfy_after.items():
        delta = (value - base[key]).abs().max().item()
        assert (ours[key] - value).abs().max().item() <= 1e-5 * max(delta, 1e-6) + 1e-6, key
        changed += delta > 0
    assert any("distilled_guidance_layer.layers.0.linear_1" in k and (comfy_after[k] != base[k]).any()
               for k in comfy_after)
    assert changed >= 40 and any(".attn.to_k." in k and (comfy_after[k] != base[k]).any() for k in comfy_after)


def test_chroma_two_processes_equal_one_with_the_same_global_batch(workspace, one_process):
    log = str(workspace / "writes-chroma.log")
    two = torchrun(chroma_config(workspace, "chroma-two", batch_size=2), str(workspace / "chroma-two.json"), log)
    assert two["world_size"] == 2 and two["global_batch"] == 4
    diff = max_diff(lora_tensors(two["final_path"]), lora_tensors(one_process["final_path"]))
    print(f"Chroma, 2 processes vs 1: max |LoRA diff| {diff:.2e}; losses {two['losses']} vs {one_process['losses']}")
    assert diff <= PARITY_ATOL
    assert any(v.abs().max() > 0 for k, v in lora_tensors(one_process["final_path"]).items()
               if k.endswith(".lora_up.weight"))
    assert two["losses"] == pytest.approx(one_process["losses"], abs=1e-6)
    assert {rank for rank, _, _ in writes(log)} == {"0"}


def test_chroma_text_is_what_chromapipeline_leaves_unmasked(workspace):
    """chroma_text_encoder gives each caption's tokens (EOS included) and the first padding token, with T5's
    states under the tokenizer's mask: diffusers' ChromaPipeline._get_t5_prompt_embeds' embeddings at the positions
    its transformer mask keeps. The objective is the scheduler's fixed shift, no resolution shift."""
    from diffusers import ChromaPipeline

    from lora_core.train.diffusers_flux import chroma_text_encoder, flux_objective, load_flux

    root = str(workspace / "tiny-chroma")
    model = load_flux(root, "", torch.device("cpu"))
    assert model.chroma and model.text_encoder_2 is None and model.arch.name == "Chroma"
    pipe = ChromaPipeline.from_pretrained(root, local_files_only=True)
    encode = chroma_text_encoder(model.tokenizer, model.text_encoder)
    lengths = set()
    for caption in ("sks square, colour 1, plain background", "a", "x " * 40):
        ours = encode([caption])["context"]
        with torch.no_grad():
            want, mask = pipe._get_t5_prompt_embeds(prompt=[caption], max_sequence_length=32,
                                                    device=torch.device("cpu"))
        keep = mask[0].bool()
        assert ours.shape[1] == int(keep.sum()) and bool(keep[:ours.shape[1]].all())
        assert (ours[0] - want[0][keep]).abs().max().item() <= 1e-5
        lengths.add(ours.shape[1])
    assert len(lengths) == 3 and 32 in lengths   # the long caption: 32 tokens, no padding token left
    objective = flux_objective(model.scheduler_config, "logit-normal, model shift")
    assert objective.shift == 3.0 and objective.resolution_shift is None


def test_chroma_t5_trains_with_the_nodes_names_and_matches(workspace):
    """train_text_encoder: Chroma's T5 (its only encoder, ComfyUI's te1) trains as lora_te1_ with the names the
    node gives a ComfyUI Chroma CLIP; LoraPatcher on the diffusers transformer + T5 matches every module."""
    from diffusers import ChromaTransformer2DModel
    from transformers import T5EncoderModel

    import lora_core.train as lt
    from lora_core.api import LoraPatcher, LoraRequest
    from lora_core.io import read_lora_file

    result = run_main(workspace, chroma_config(workspace, "chroma-te", batch_size=2, steps=2, unet_targets="attn",
                                               train_text_encoder=True), "chroma-te")
    tensors = lora_tensors(result["final_path"])
    te = {k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_te") and k.endswith(".lora_down.weight")}
    host = importlib.import_module("lora_core_train_nodes._host")
    clip = tm.comfy_clip_chroma()
    key_map = host.HostModels(tm.comfy_chroma(), clip).key_map
    assert te == {t.name for t in lt.find_key_map_te_targets(clip.cond_stage_model, key_map, ["te1"])}
    assert all(tensors[n + ".lora_up.weight"].abs().max() > 0 for n in te), "a T5 LoRA did not train"
    root = str(workspace / "tiny-chroma")
    patcher = LoraPatcher(transformer=ChromaTransformer2DModel.from_pretrained(root, subfolder="transformer"),
                          text_encoder=T5EncoderModel.from_pretrained(root, subfolder="text_encoder"))
    plan = patcher.apply([LoraRequest(read_lora_file(result["final_path"]), 1.0, 1.0)])
    assert not plan.reports[0].unmatched and not plan.reports[0].unused_keys, plan.text()


def test_chroma_folder_errors(workspace, tmp_path, capsys):
    """A Chroma folder without its T5 tokenizer, or a config naming another architecture, is refused naming the
    folder / the two architectures; nothing is written."""
    import shutil

    from lora_core.errors import LoraFileError
    from lora_core.train.__main__ import main
    from lora_core.train.diffusers_flux import load_flux

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(workspace / "tiny-chroma", broken, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(LoraFileError, match=r"Chroma folder .*no-tokenizer has no tokenizer subfolder\(s\): a "
                                            r"diffusers Chroma folder \(ChromaPipeline.save_pretrained\)"):
        load_flux(str(broken), "", torch.device("cpu"))
    config = chroma_config(workspace, "chroma-wrong-arch", batch_size=2, steps=1)
    with open(config) as handle:
        text = handle.read()
    with open(config, "w") as handle:
        handle.write('architecture = "flux"\n' + text)
    assert main([config]) == 2
    assert "is Chroma but the config says architecture = 'flux' (Flux.1-dev)" in capsys.readouterr().err
    assert not (workspace / "out" / "chroma-wrong-arch.safetensors").exists()
