"""unet_targets "all layers + norms/biases": core's Train LoRA target set (every weight + norms/biases) in the train
node, with the real ComfyUI 0.3.75 host.

* The side paths' maths: a layer with a BiasDiff / a norm with a NormDiff computes what the same layer computes
  with its bias / weight plus the trained diffs (Linear, 1x1 and 3x3 Conv2d, GroupNorm, LayerNorm, 5-D GroupNorm).
* Through the node on a tiny SD1.5: the file holds a `.diff_b` for every adapted layer with a bias and a `.diff`
  (+ `.diff_b`) for every GroupNorm / LayerNorm of the UNet, trained away from zero; core's loader loads it with
  no key left, ours with every module matched; the MODEL output equals core's loader on the file; the same seed's
  low-rank weights start as those of "all layers" (the norms draw nothing from the seed).
* `run = continue` refuses a state of the other target choice; the command-line trainer refuses the choice.
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from tests import tiny_models as tm
from tests.pack import loras_folder, node_module
from tests.test_train_flux import core_loads_every_key
from tests.test_train_nodes import DATASET_DEFAULTS, nt, square_images, tiny_sd15_for_tiny_clip, tiny_vae, train_kwargs

import comfy.model_management as mm  # noqa: E402  (tests.test_train_nodes imported ComfyUI)

from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.train import LoRANetwork, Target  # noqa: E402

CHOICE = "all layers + norms/biases"
KWARGS = dict(steps=8, train_text_encoder=False, unet_lr=2e-3, save_precision="fp32", rank=4)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("make, x_shape", [
    (lambda: nn.Linear(12, 10), (3, 5, 12)),
    (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 5, 5)),
    (lambda: nn.GroupNorm(2, 6), (2, 6, 4, 4)),
    (lambda: nn.GroupNorm(3, 6), (1, 6, 2, 3, 3)),
    (lambda: nn.LayerNorm(12), (3, 5, 12)),
])
def test_full_diffs_compute_the_layer_with_its_diffs(make, x_shape):
    gen = torch.Generator().manual_seed(0)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    kind = "norm" if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) else "all"
    network = LoRANetwork([Target("m", module, "unet", "IN00", kind, bias=kind != "norm")], rank=2, alpha=2.0)
    path = network.path("m")
    with torch.no_grad():
        for p in path.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(x_shape, generator=gen)
    network.inject()
    try:
        ours = module(x)
    finally:
        network.restore()
    tensors = network.kohya_state_dict(torch.float32)
    merged = make()
    merged.load_state_dict(module.state_dict())
    with torch.no_grad():
        if kind == "norm":
            merged.weight += tensors["m.diff"]
            merged.bias += tensors["m.diff_b"]
            assert set(tensors) == {"m.diff", "m.diff_b"}
        else:
            merged.weight += network.delta_weight("m").reshape(merged.weight.shape)
            merged.bias += tensors["m.diff_b"]
            assert {"m.lora_up.weight", "m.lora_down.weight", "m.alpha", "m.diff_b"} == set(tensors)
    torch.testing.assert_close(ours, merged(x), rtol=1e-5, atol=1e-5)
    # half strength (what a validation / preview at another multiplier uses) halves every diff
    network.set_multiplier(0.5)
    network.inject()
    try:
        half = module(x)
    finally:
        network.restore()
    torch.testing.assert_close(half, (module(x) + ours) / 2, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def host():
    return dict(model=tiny_sd15_for_tiny_clip(), clip=tm.comfy_clip_sd15(), vae=tiny_vae())


@pytest.fixture(scope="module")
def dataset():
    return nt.LoRACoreTrainDataset().build(images=square_images(), **DATASET_DEFAULTS)[0]


@pytest.fixture(scope="module")
def trained(host, dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    with loras_folder(folder):
        out = nt.LoRACoreTrain().train(host["model"], host["clip"], host["vae"], dataset,
                                       **train_kwargs(output_name="nb", unet_targets=CHOICE, **KWARGS))
        start = nt.LoRACoreTrain().train(host["model"], host["clip"], host["vae"], dataset,
                                         **train_kwargs(output_name="start", unet_targets=CHOICE,
                                                        **{**KWARGS, "steps": 1}))
        plain = nt.LoRACoreTrain().train(host["model"], host["clip"], host["vae"], dataset,
                                         **train_kwargs(output_name="plain", unet_targets="all layers",
                                                        **{**KWARGS, "steps": 1}))
    return dict(out=out, folder=folder, start=start, plain=plain)


def test_file_holds_every_bias_and_norm_of_core_set(host, trained):
    unet = host["model"].model.diffusion_model
    tensors = safetensors.torch.load_file(str(trained["folder"] / "nb.safetensors"))
    norms = [m for m in unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None]
    layers = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with_bias = [m for m in layers if m.bias is not None]
    diffs = [k for k in tensors if k.endswith(".diff")]
    bias_diffs = [k for k in tensors if k.endswith(".diff_b")]
    ups = [k for k in tensors if k.endswith(".lora_up.weight")]
    assert len(diffs) == len(norms) and len(ups) == len(layers)
    assert len(bias_diffs) == len(norms) + len(with_bias)
    assert all(tensors[k].abs().max() > 0 for k in diffs + bias_diffs), "a diff did not train"
    report = trained["out"][5]
    assert f"{len(layers) + len(norms)} modules" in report, report
    # the same seed gives the low-rank paths the initial weights of "all layers" (the norms draw nothing): after
    # one step (the diffs still zero in its forward) both runs' low-rank tensors are the same
    start, plain = trained["start"][2].tensors, trained["plain"][2].tensors
    low_rank = [k for k in plain if k.endswith(("lora_down.weight", "lora_up.weight"))]
    assert low_rank and all(torch.equal(start[k], plain[k]) for k in low_rank)
    assert set(start) - set(plain) == {k for k in start if k.endswith((".diff", ".diff_b"))}


def test_core_and_ours_load_it_fully_and_model_output_is_core_loader(host, trained, caplog):
    path = str(trained["folder"] / "nb.safetensors")
    core_model = core_loads_every_key(host["model"], host["clip"], path, caplog)
    with loras_folder(trained["folder"]):
        ours, report = node_module("loader").LoRACoreLoaderModelOnly().load(host["model"], "nb.safetensors", 1.0)
    assert "unmatched" not in report and "WARNING" not in report, report
    gen = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([400.0]), torch.randn(1, 77, 32, generator=gen)

    def denoise(patcher):
        mm.load_models_gpu([patcher], force_full_load=True)
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context).clone()

    node_out, core_out, base = denoise(trained["out"][0]), denoise(core_model), denoise(host["model"])
    torch.testing.assert_close(node_out, core_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoise(ours), core_out, rtol=1e-5, atol=1e-5)
    assert (node_out - base).abs().max() > 1e-3


def test_continue_refuses_the_other_target_choice(host, dataset, trained):
    with loras_folder(trained["folder"]):
        with pytest.raises(LoraValueError, match=r"norms_biases=True, this run has norms_biases=False"):
            nt.LoRACoreTrain().train(host["model"], host["clip"], host["vae"], dataset,
                                     **train_kwargs(output_name="nb", run="continue", unet_targets="all layers",
                                                    **KWARGS))
        out = nt.LoRACoreTrain().train(host["model"], host["clip"], host["vae"], dataset,
                                       **train_kwargs(output_name="nb", run="continue", unet_targets=CHOICE,
                                                      **{**KWARGS, "steps": 2}))
    assert "steps 10 (this run 2" in out[5], out[5]


def test_command_line_trainer_refuses_the_choice(tmp_path, capsys):
    from lora_core.train.__main__ import main

    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tmp_path}/none"\noutput_dir = "{tmp_path}/out"\n[dataset]\nfolder = "{tmp_path}"\n[train]\n'
                      f'unet_targets = "{CHOICE}"\n', encoding="utf-8")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "train node's only" in err and '"all layers"' in err, err
    assert not (tmp_path / "out").exists()
