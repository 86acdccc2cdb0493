"""LyCORIS algorithms in training (LoHa, LoKr, DoRA on LoRA) with the real host and LyCORIS itself.

For each algorithm the train node trains a tiny ComfyUI SD1.5 (tests/test_train_nodes.py's host: UNet + tiny
CLIP-L + TAESD-architecture VAE) and saves a file in LyCORIS's key format. Checked:
* the file's keys are LyCORIS's (lycoris-lora 4.1.3 `custom_state_dict`: hada_w1_a..., lokr_w1 / lokr_w2_a/b,
  lora_down/lora_up + dora_scale) with LyCORIS's kohya metadata (ss_network_module lycoris.kohya, algo);
* core's loader (comfy.lora.load_lora + model_lora_keys_unet/clip, applied by ComfyUI's patcher) and ours give
  the same weights (1e-5 of the delta) at strengths 1.0 and -0.6 with the same key set, no key left over;
* LyCORIS's own modules, given the file (create_lycoris_from_weights for LoHa/LoKr; LoConModule with
  weight_decompose and wd_on_out=False for DoRA, since LyCORIS's loader always builds output-axis DoRA),
  give the same layer outputs as our training-time forward, layer by layer on random inputs;
* training reduces the model's denoising error on its training images (x0 MSE, fixed noise and sigmas);
* the same, module by module, on a Linear / 3x3 / 1x1 conv at several ranks against LyCORIS's modules,
  LyCORIS's factorization, a zero delta at step 0, continuing a run, and a refused algorithm change.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests.test_train_nodes import (DATASET_DEFAULTS, _x0_error, square_images, tiny_sd15_for_tiny_clip, tiny_vae,
                                    train_kwargs, train_nodes)
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.train.algorithms import factorization, make_path  # noqa: E402

from lycoris.functional.general import factorization as lycoris_factorization  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402
from lycoris.wrapper import create_lycoris_from_weights  # noqa: E402

nt = train_nodes()
STEPS = 60
RANK = 4
ALGOS = ("LoHa", "LoKr", "DoRA")
KEYS = {"LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "LoKr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "DoRA": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}
LYCORIS_MODULES = {"LoHa": LohaModule, "LoKr": LokrModule, "DoRA": LoConModule}
STRENGTHS = (1.0, -0.6)
LEARN_MAX = 0.85   # trained x0 error / base x0 error on the training images must be below this


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    comfy.utils.PROGRESS_BAR_ENABLED = False
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def host():
    return tiny_sd15_for_tiny_clip(), tm.comfy_clip_sd15(), tiny_vae()


@pytest.fixture(scope="module")
def dataset():
    return nt.LoRACoreTrainDataset().build(images=square_images(), **DATASET_DEFAULTS)[0]


@pytest.fixture(scope="module")
def trained(host, dataset, tmp_path_factory):
    """One node run per algorithm (LoHa also trains the text encoder), files in fp32."""
    model, clip, vae = host
    runs = {}
    for algo in ALGOS:
        folder = tmp_path_factory.mktemp(algo.lower())
        kwargs = train_kwargs(output_name=algo.lower(), algorithm=algo, steps=STEPS, rank=RANK, alpha=2.0,
                              train_text_encoder=algo == "LoHa", save_precision="fp32", unet_lr=2e-3)
        with loras_folder(folder):
            runs[algo] = dict(outputs=nt.LoRACoreTrain().train(model, clip, vae, dataset, **kwargs), folder=folder)
    return runs


def file_of(run) -> dict:
    return comfy.utils.load_torch_file(run["outputs"][2].path, safe_load=True)


# ------------------------------------------------------------------------------------------ module level

def _layers():
    gen = torch.Generator().manual_seed(3)
    layers = [nn.Linear(48, 32), nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.Conv2d(16, 24, 1)]
    for layer in layers:
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return layers


def _input(layer):
    gen = torch.Generator().manual_seed(4)
    shape = (2, 48) if isinstance(layer, nn.Linear) else (2, 16, 7, 7)
    return torch.randn(shape, generator=gen)


def _lycoris_module(algo, name, layer, rank, alpha):
    kwargs = dict(weight_decompose=True, wd_on_out=False) if algo == "DoRA" else {}
    return LYCORIS_MODULES[algo](name, layer, 1.0, rank, alpha, **kwargs)


@pytest.mark.parametrize("algo", ALGOS)
def test_module_forward_equals_lycoris_module(algo):
    """Our path (trained-looking weights) vs LyCORIS's module loaded with our file tensors: same outputs."""
    for layer in _layers():
        for rank in (2, 8):
            path = make_path(algo, layer, rank, 3.0, torch.Generator().manual_seed(1))
            with torch.no_grad():
                for p in path.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
            tensors = {k.split(".", 1)[1]: v for k, v in path.file_tensors("lycoris_x", torch.float32).items()}
            theirs = _lycoris_module(algo, "lycoris_x", layer, rank, 3.0)
            result = theirs.load_state_dict(tensors, strict=False)
            assert not result.unexpected_keys and not [k for k in result.missing_keys if "scalar" not in k]
            x = _input(layer)
            ours = layer(x) + path(x)
            theirs.apply_to()
            try:
                lyco = theirs(x)
            finally:
                theirs.restore()
            base = layer(x)
            assert not torch.allclose(ours, base, atol=1e-4), "the adapter changed nothing: the check proves nothing"
            error = (ours - lyco).abs().max().item()
            assert error <= 1e-5 * (lyco - base).abs().max().item() + 1e-6, (algo, type(layer).__name__, rank, error)


def test_zero_delta_at_init_and_lycoris_init_shapes():
    for algo in ALGOS:
        for layer in _layers():
            path = make_path(algo, layer, 4, 2.0, torch.Generator().manual_seed(0))
            assert path.weight_delta().abs().max().item() < 1e-6, algo
            theirs = _lycoris_module(algo, "lycoris_x", layer, 4, 2.0)
            mine = {k.split(".", 1)[1]: tuple(v.shape) for k, v in path.file_tensors("x", torch.float32).items()}
            lyco = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            assert mine == lyco, (algo, layer, mine, lyco)
            if algo == "DoRA":   # magnitude starts at the column norms of W
                norm = layer.weight.detach().transpose(0, 1).reshape(layer.weight.shape[1], -1).norm(dim=1)
                assert torch.allclose(path.dora_scale.flatten(), norm)


def test_factorization_is_lycoris():
    for dim in (1, 2, 3, 7, 12, 24, 32, 48, 96, 320, 360, 640, 768, 1280, 3072):
        assert factorization(dim) == lycoris_factorization(dim, -1), dim


def test_gradients_reach_every_parameter():
    layer = _layers()[1]
    for algo in ALGOS:
        path = make_path(algo, layer, 4, 2.0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in path.parameters():
                p.add_(0.1)
        path(_input(layer)).square().mean().backward()
        for name, p in path.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (algo, name)
        assert layer.weight.grad is None, "the base weight must not be trained"
        assert [n for n, _ in path.named_parameters()] == [n for n, p in path.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ trained files

@pytest.mark.parametrize("algo", ALGOS)
def test_file_keys_and_metadata_are_lycoris(trained, algo):
    from safetensors import safe_open

    path = trained[algo]["outputs"][2].path
    with safe_open(path, framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    modules = {k.split(".", 1)[0] for k in keys}
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes <= KEYS[algo] | {"lokr_w2"} and KEYS[algo] - {"lokr_w2_a", "lokr_w2_b"} <= suffixes, suffixes
    assert any(m.startswith("lora_unet_output_blocks_") for m in modules)
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in modules) == (algo == "LoHa")
    assert meta["ss_network_module"] == "lycoris.kohya"
    import json
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"LoHa": "loha", "LoKr": "lokr", "DoRA": "lora"}[algo]
    assert (args.get("dora_wd") == "True") == (algo == "DoRA")
    assert meta["ss_network_dim"] == str(RANK) and meta["modelspec.architecture"].startswith("stable-diffusion-v1")


def _bake(patcher) -> dict:
    mm.load_models_gpu([patcher], force_full_load=True)
    state = {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k in patcher.patches}
    mm.unload_all_models()
    return state


def _core_load(model, clip, tensors: dict, strength: float, caplog):
    """Core's loader: load_lora on model_lora_keys_unet/clip, applied as ComfyUI's patchers apply it."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(dict(tensors), key_map)
        not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not_loaded == [], not_loaded[:3]
    new_model, new_clip = model.clone(), clip.clone()
    model_keys = new_model.add_patches(patches, strength)
    clip_keys = new_clip.add_patches(patches, strength)
    assert set(model_keys) | set(clip_keys) == set(patches), "core found keys it could not place"
    return new_model, new_clip


@pytest.mark.parametrize("algo", ALGOS)
def test_file_loads_the_same_in_core_and_ours(host, trained, algo, caplog):
    model, clip, _ = host
    tensors = file_of(trained[algo])
    base_model = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    loader = node_module("loader").LoRACoreLoader()
    name = trained[algo]["outputs"][4]
    for strength in STRENGTHS:
        core_model, core_clip = _core_load(model, clip, tensors, strength, caplog)
        with loras_folder(trained[algo]["folder"]):
            our_model, our_clip, report = loader.load(model, name, strength, strength, clip=clip)
        assert "unmatched" not in report and "WARNING" not in report, report
        for ours, core, base, what in ((_bake(our_model), _bake(core_model), base_model, "MODEL"),
                                       (_bake(our_clip.patcher), _bake(core_clip.patcher), base_clip, "CLIP")):
            assert ours.keys() == core.keys(), f"{algo}/{what}: patched keys differ"
            if what == "CLIP" and algo != "LoHa":
                assert not core
                continue
            assert core, f"{algo}/{what}: nothing patched"
            for key in core:
                delta = (core[key] - base[key]).abs().max().item()
                assert delta > 0, f"{algo}/{what}/{key}: unchanged"
                error = (ours[key] - core[key]).abs().max().item()
                assert error <= 1e-5 * delta + 1e-7, f"{algo}/{what}@{strength}/{key}: {error:.3g} vs delta {delta:.3g}"
        modules = {k.split(".", 1)[0] for k in tensors}
        assert len(core_model.patches) + len(core_clip.patcher.patches) == len(modules)


def _training_network(model, clip, tensors, algo):
    """Our training-time network for the file's modules (the node's own target search), weights from the file."""
    key_map = host_key_map(model, clip)
    arch, train_spec = nt.model_train_spec(model)
    targets = lt.find_denoiser_targets(model.model.diffusion_model, key_map, train_spec, train_spec.target_sets[
        "attn+ff+proj"])
    if any(k.startswith("lora_te_") for k in tensors):
        targets += nt.te_targets_of_clip(clip)
    modules = {k.split(".", 1)[0] for k in tensors}
    targets = [t for t in targets if t.name in modules]
    assert {t.name for t in targets} == modules, "the file's modules are the training targets"
    network = lt.LoRANetwork(targets, RANK, 2.0, algorithm=algo)
    network.load_kohya_state_dict(tensors, source=algo)
    return network


def host_key_map(model, clip):
    host_models = __import__(nt.__name__.rsplit(".", 1)[0] + "._host", fromlist=["HostModels"]).HostModels
    return host_models(model, clip).key_map


def _lycoris_network(root: nn.Module, tensors: dict, prefix: str, algo: str):
    """LyCORIS's modules on `root` (whose module paths, '.' -> '_', follow `prefix`) from the file's tensors."""
    renamed = {"lycoris_" + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if algo != "DoRA":
        network, _ = create_lycoris_from_weights(1.0, None, root, weights_sd=renamed)
        return {m.lora_name: m for m in network.loras}
    by_name = dict(root.named_modules())
    lookup = {("lycoris_" + n.replace(".", "_")): m for n, m in by_name.items()}
    modules = {}
    for name in {k.split(".", 1)[0] for k in renamed}:
        local = {k.split(".", 1)[1]: v for k, v in renamed.items() if k.startswith(name + ".")}
        module = LoConModule(name, lookup[name], 1.0, local["lora_down.weight"].shape[0], float(local["alpha"]),
                             weight_decompose=True, wd_on_out=False)
        result = module.load_state_dict(local, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "scalar" not in k]
        modules[name] = module
    return modules


@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_given_the_file_gives_our_training_forward(host, trained, algo):
    model, clip, _ = host
    tensors = file_of(trained[algo])
    network = _training_network(model, clip, tensors, algo)
    roots = [(model.model.diffusion_model, "lora_unet_")]
    if algo == "LoHa":
        roots.append((clip.cond_stage_model.clip_l.transformer, "lora_te_"))
    compared = 0
    gen = torch.Generator().manual_seed(9)
    for root, prefix in roots:
        theirs = _lycoris_network(root, tensors, prefix, algo)
        assert len(theirs) == len([n for n in network.targets if n.startswith(prefix)])
        for lyco_name, lyco in theirs.items():
            name = prefix + lyco_name[len("lycoris_"):]
            layer = network.targets[name].module
            if isinstance(layer, nn.Linear):
                x = torch.randn(3, layer.in_features, generator=gen)
            else:
                x = torch.randn(2, layer.in_channels, 6, 6, generator=gen)
            with torch.no_grad():
                base = layer(x)
                network.inject()
                try:
                    ours = layer(x)
                finally:
                    network.restore()
                lyco.apply_to()
                try:
                    lyco_out = layer(x)
                finally:
                    lyco.restore()
            delta = (lyco_out - base).abs().max().item()
            assert delta > 0, f"{algo}/{name}: the trained module changes nothing"
            error = (ours - lyco_out).abs().max().item()
            assert error <= 1e-5 * delta + 1e-6, f"{algo}/{name}: {error:.3g} vs delta {delta:.3g}"
            compared += 1
    assert compared == len(network.targets)


@pytest.mark.parametrize("algo", ALGOS)
def test_training_learns_the_images(host, trained, algo):
    model, clip, vae = host
    new_model, new_clip = trained[algo]["outputs"][:2]
    latents = vae.encode(square_images().float()).detach()
    base_error = _x0_error(model, latents, clip.encode_from_tokens(clip.tokenize("sks square")).detach())
    trained_error = _x0_error(new_model, latents,
                              new_clip.encode_from_tokens(new_clip.tokenize("sks square")).detach())
    print(f"{algo}: x0 MSE vs training latents: base {base_error:.4f}, trained {trained_error:.4f}")
    assert trained_error < LEARN_MAX * base_error


def test_continue_and_algorithm_change(host, dataset, tmp_path):
    model, clip, vae = host
    kwargs = train_kwargs(output_name="cont", algorithm="LoKr", steps=3, rank=RANK, train_text_encoder=False,
                          save_precision="fp32")
    with loras_folder(tmp_path):
        nt.LoRACoreTrain().train(model, clip, vae, dataset, **kwargs)
        first = comfy.utils.load_torch_file(str(tmp_path / "cont.safetensors"))
        out = nt.LoRACoreTrain().train(model, clip, vae, dataset, **{**kwargs, "run": "continue"})
        assert "steps 6" in out[5]
        second = comfy.utils.load_torch_file(str(tmp_path / "cont.safetensors"))
        assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
        with pytest.raises(LoraValueError, match="algorithm='LoKr'"):
            nt.LoRACoreTrain().train(model, clip, vae, dataset, **{**kwargs, "run": "continue", "algorithm": "LoHa"})


def test_node_offers_the_algorithms_without_moving_inputs():
    required = nt.LoRACoreTrain.INPUT_TYPES()["required"]
    assert list(required) == ["model", "clip", "vae", "dataset"] + list(train_kwargs())
    assert required["algorithm"][0] == ["LoRA", "LoCon", "LoHa", "LoKr", "DoRA"]
    assert required["algorithm"][1]["default"] == "LoRA"
