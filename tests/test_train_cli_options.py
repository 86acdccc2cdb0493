"""The command-line trainer's config takes the nodes' options: every LoRACoreTrainDataset / LoRACoreTrain input
(minus the model / clip / vae / dataset / images sockets and the in-graph-only previews) is a config key with the
node's name, default, choices and range, compared with the nodes' own INPUT_TYPES so a new node input cannot be
forgotten; previews are refused with the reason; nf4 without bitsandbytes and a DDPM timestep_range are
refused before anything is written; the validation loss runs in the CLI and writes its curve to the file's
metadata and the state as the node does, and two gloo processes compute the same curve as one (rank 0 writes).

The model is tests/test_train_distributed.py's tiny diffusers SD1 folder.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.test_train_distributed import (SGD, lora_tensors, max_diff, save_images, save_tiny_sd, torchrun, writes,
                                          write_config)
from tests.test_train_nodes import nt

from lora_core.errors import LoraValueError
from lora_core.train import config as cfgmod

SOCKETS = {"model", "clip", "vae", "dataset", "images"}
CONFIG_ONLY = {"model", "model_config", "output_dir", "architecture", "max_grad_norm"}
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def node_options() -> dict:
    """{name: (type or choices, options)} of both training nodes' widget inputs."""
    out = {}
    for node in (nt.LoRACoreTrainDataset, nt.LoRACoreTrain):
        types = node.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, spec in types.get(group, {}).items():
                if name in SOCKETS or name.startswith("preview_"):
                    continue
                out[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return out


def config_options() -> dict:
    return {**{k: v for k, v in cfgmod.TOP.items()}, **cfgmod.DATASET, **cfgmod.TRAIN}


def test_every_node_option_is_a_config_key_with_the_nodes_default_choices_and_range():
    node, config = node_options(), config_options()
    assert set(node) == set(config) - CONFIG_ONLY, (
        f"node inputs missing from the config: {sorted(set(node) - set(config))}; config keys no node has: "
        f"{sorted(set(config) - CONFIG_ONLY - set(node))}")
    kinds = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
    for name, (kind, options) in node.items():
        option = config[name]
        if isinstance(kind, (list, tuple)):
            assert option.kind is str and list(option.choices) == list(kind), name
        else:
            assert option.kind is kinds[kind], name
        if name != "folder":   # the CLI requires the dataset folder; the node's "" means "connect images"
            assert option.default == options.get("default"), (name, option.default, options.get("default"))
        if "min" in options:
            assert option.low == options["min"] and option.high == options["max"], (name, option, options)
    # the preview inputs the node has are exactly the ones the config refuses
    previews = [n for n in nt.LoRACoreTrain.INPUT_TYPES()["optional"] if n.startswith("preview_")]
    assert sorted(previews) == sorted(cfgmod.PREVIEW_KEYS)


def test_preview_keys_are_refused_as_in_graph_only():
    for table in ({"model": "m", "dataset": {"folder": "d"}, "train": {"preview_every": 10}},
                  {"model": "m", "dataset": {"folder": "d"}, "preview_prompts": "a cat"}):
        with pytest.raises(LoraValueError, match="previews are in-graph only") as error:
            cfgmod.parse(table, "c.toml")
        assert "preview_" in str(error.value) and "validation_split" in str(error.value)
    with pytest.raises(LoraValueError, match=r"validation_split = 0\.9 is above the maximum 0\.5"):
        cfgmod.parse({"model": "m", "dataset": {"folder": "d"}, "train": {"validation_split": 0.9}}, "c.toml")
    with pytest.raises(LoraValueError, match="base_quant = 'int8' is not one of"):
        cfgmod.parse({"model": "m", "dataset": {"folder": "d"}, "train": {"base_quant": "int8"}}, "c.toml")
    with pytest.raises(LoraValueError, match="loss_weighting = 'x1' is not one of"):
        cfgmod.parse({"model": "m", "dataset": {"folder": "d"}, "train": {"loss_weighting": "x1"}}, "c.toml")
    run = cfgmod.parse({"model": "m", "dataset": {"folder": "d"}, "train": {"loss_weighting": "x0"}}, "c.toml")
    assert run.train["loss_weighting"] == "x0"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-options")
    save_tiny_sd(str(root / "tiny-sd"))
    save_images(str(root / "images"), n=6)
    return root


def run_main(workspace, config: str, name: str):
    from lora_core.train.__main__ import main

    summary = str(workspace / f"{name}.json")
    code = main([config, "--summary", summary])
    if code != 0:
        return code, None
    with open(summary) as handle:
        return code, json.load(handle)


def test_nf4_and_ddpm_timestep_range_are_refused_before_anything_is_written(workspace, capsys, monkeypatch):
    for name, options, message in (
            ("nf4", dict(base_quant="nf4"), "import bitsandbytes failed"),
            ("range", dict(timestep_range="0,500"), "timestep_range applies to flow models")):
        with monkeypatch.context() as patch:
            if name == "nf4":   # bitsandbytes not installed (it is a test dependency: NF4 runs on the CPU too)
                patch.setitem(sys.modules, "bitsandbytes", None)
                patch.delitem(sys.modules, "bitsandbytes.functional", raising=False)
            code, _ = run_main(workspace, write_config(workspace, name, batch_size=2, output=f"out-{name}",
                                                       **options), name)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not os.path.exists(workspace / f"out-{name}" / f"{name}.safetensors")


def validation_curve(path: str) -> list:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["lora_core.validation_images"] == "2"
    return json.loads(meta["lora_core.validation_loss"])


VALIDATION = dict(validation_split=0.34, validate_every=2, lora_dtype="fp32", guidance=1.0,
                  text_encoders="all", **SGD)


def test_validation_loss_curve_in_file_and_state_and_two_processes_agree(workspace):
    code, one = run_main(workspace, write_config(workspace, "val-one", batch_size=2, **VALIDATION), "val-one")
    assert code == 0
    curve = validation_curve(one["final_path"])
    # evaluated at the start, every 2 steps and at the end (4 steps): 0, 2, 4
    assert [s for s, _ in curve] == [0, 2, 4]
    assert all(v > 0 for _, v in curve) and curve[0][1] != curve[-1][1]
    state = torch.load(one["state_path"], map_location="cpu", weights_only=True)
    assert [s for s, _ in state["extra"]["validation"]["curve"]] == [0, 2, 4]
    assert len(state["extra"]["validation"]["sources"]) == 2
    # 4 of 6 images train (split 0.34 holds out 2): one epoch of batch 2 is 2 steps
    log = str(workspace / "writes-val.log")
    two = torchrun(write_config(workspace, "val-two", batch_size=1, **VALIDATION), str(workspace / "val-two.json"),
                   log)
    assert two["world_size"] == 2 and two["global_batch"] == 2
    assert max_diff(lora_tensors(two["final_path"]), lora_tensors(one["final_path"])) <= PARITY_ATOL
    two_curve = validation_curve(two["final_path"])
    assert [s for s, _ in two_curve] == [0, 2, 4]
    assert [v for _, v in two_curve] == pytest.approx([v for _, v in curve], abs=1e-5)
    assert {rank for rank, _, _ in writes(log)} == {"0"}
