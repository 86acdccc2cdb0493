"""Bad input through the loader nodes: a clear error that names the file and the cause, and MODEL/CLIP untouched."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import tiny_models as tm

comfy = import_comfy()
from lora_core.errors import LoraCoreError, LoraFileError, LoraMatchError, LoraValueError  # noqa: E402

ATTN = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def host():
    return tm.comfy_sd15(), tm.comfy_clip_sd15()


@pytest.fixture()
def loras(tmp_path):
    with loras_folder(tmp_path) as folder:
        yield folder


def snapshot(model, clip):
    return ({k: v.clone() for k, v in model.model.state_dict().items()},
            {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()},
            dict(model.patches), model.patches_uuid, dict(clip.patcher.patches), clip.patcher.patches_uuid)


def assert_untouched(before, model, clip):
    after = snapshot(model, clip)
    for old, new in zip(before[:2], after[:2]):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert before[2:] == after[2:]


def kohya_pair(in_features: int, out_features: int, rank: int = 4, name: str = ATTN, value=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(rank, in_features, generator=gen)
    if value is not None:
        down[0, 0] = value
    return {f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": torch.randn(out_features, rank, generator=gen),
            f"{name}.alpha": torch.tensor(float(rank))}


def good_lora(model) -> dict:
    weight = model.model.state_dict()["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    return kohya_pair(weight.shape[1], weight.shape[0])


def load(model, clip, name, strength_model=1.0, strength_clip=1.0):
    return node_module("loader").LoRACoreLoader().load(model, name, strength_model, strength_clip, clip=clip)


def expect_error(host, name, error_type, *fragments, **strengths):
    model, clip = host
    before = snapshot(model, clip)
    with pytest.raises(error_type) as caught:
        load(model, clip, name, **strengths)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert_untouched(before, model, clip)
    return message


def test_missing_file(host, loras):
    expect_error(host, "no_such_lora.safetensors", LoraFileError, "no_such_lora", "models/loras")


def test_empty_file(host, loras):
    (loras / "empty.safetensors").write_bytes(b"")
    expect_error(host, "empty.safetensors", LoraFileError, "empty.safetensors", "empty")


def test_truncated_file(host, loras):
    model, _ = host
    save_file(good_lora(model), str(loras / "whole.safetensors"))
    data = (loras / "whole.safetensors").read_bytes()
    (loras / "cut.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(host, "cut.safetensors", LoraFileError, "cut.safetensors")


def test_corrupt_header(host, loras):
    (loras / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    expect_error(host, "garbage.safetensors", LoraFileError, "garbage.safetensors")


def test_full_checkpoint_is_refused(host, loras):
    model, _ = host
    state = {f"model.{k}": v.contiguous() for k, v in list(model.model.state_dict().items())[:20]}
    save_file(state, str(loras / "checkpoint.safetensors"))
    expect_error(host, "checkpoint.safetensors", LoraCoreError, "checkpoint.safetensors", "checkpoint")


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED_MARKER', 'w').write('x')",))


def test_pickle_with_code_is_refused_and_not_executed(host, loras, monkeypatch):
    monkeypatch.chdir(loras)
    with open(loras / "evil.pt", "wb") as handle:
        pickle.dump({"x": _Payload()}, handle)
    expect_error(host, "evil.pt", LoraFileError, "evil.pt")
    assert not (loras / "PWNED_MARKER").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_tensor(host, loras, bad):
    model, _ = host
    weight = model.model.state_dict()["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(kohya_pair(weight.shape[1], weight.shape[0], value=bad), str(loras / "nan.safetensors"))
    expect_error(host, "nan.safetensors", LoraFileError, "nan.safetensors", ATTN)


def test_shape_mismatch_is_an_error_not_a_silent_skip(host, loras):
    # A cross-attention LoRA made for a 1280-wide context on a 768-wide model: core skips it silently.
    model, _ = host
    weight = model.model.state_dict()["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(kohya_pair(1280, weight.shape[0]), str(loras / "wide.safetensors"))
    expect_error(host, "wide.safetensors", LoraMatchError, ATTN, "1280", str(weight.shape[1]))


def test_wrong_architecture(host, loras):
    # An SDXL LoRA (second text encoder, deeper UNet levels) matches nothing on SD1.5.
    state = {}
    for layer in range(2):
        state.update(kohya_pair(32, 32, name=f"lora_te2_text_model_encoder_layers_{layer}_mlp_fc1"))
    state.update(kohya_pair(640, 640, name="lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q"))
    save_file(state, str(loras / "sdxl_only.safetensors"))
    message = expect_error(host, "sdxl_only.safetensors", LoraMatchError, "sdxl_only.safetensors", "0 of 3")
    assert "SDXL" in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["strength_model", "strength_clip"])
def test_non_finite_strength(host, loras, bad, which):
    model, _ = host
    save_file(good_lora(model), str(loras / "ok.safetensors"))
    expect_error(host, "ok.safetensors", LoraValueError, which, **{which: bad})


def test_good_file_still_loads_after_errors(host, loras):
    model, clip = host
    save_file(good_lora(model), str(loras / "ok.safetensors"))
    new_model, new_clip, report = load(model, clip, "ok.safetensors")
    assert new_model is not model and len(new_model.patches) == 1
    assert "applied modules: unet 1" in report


def test_model_only_load_reports_text_encoder_modules_as_not_applied(host, loras):
    model, clip = host
    state = good_lora(model)
    for layer in range(2):
        state.update(kohya_pair(32, 32, name=f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"))
        state.update(kohya_pair(32, 32, name=f"lora_te_text_model_encoder_layers_{layer}_self_attn_q_proj"))
    save_file(state, str(loras / "with_te.safetensors"))
    new_model, report = node_module("loader").LoRACoreLoaderModelOnly().load(model, "with_te.safetensors", 1.0)
    assert len(new_model.patches) == 1
    assert "not applied: te1 4 (no CLIP connected)" in report and "unmatched" not in report, report


def test_stack_names_outside_the_loras_folders_read_nothing_and_reveal_nothing(host, loras, tmp_path_factory):
    """Another pack's free-text stack node can hand us any string: only files under ComfyUI's loras folders
    are read, and "outside", "missing" and "not a file" give the same text (no probing of the server's disk)."""
    import os

    model, clip = host
    outside = tmp_path_factory.mktemp("elsewhere")
    save_file(good_lora(model), str(outside / "secret.safetensors"))
    save_file(good_lora(model), str(loras / "inside.safetensors"))
    (loras / "linked").mkdir()
    os.symlink(outside / "secret.safetensors", loras / "linked" / "admin_link.safetensors")
    os.mkfifo(loras / "pipe.safetensors")
    apply_stack = node_module("loader").LoRACoreApplyStack().apply

    def message(name):
        with pytest.raises(LoraFileError) as caught:
            apply_stack(model, [(name, 1.0, 1.0)], clip)
        return str(caught.value).replace(repr(name), "<name>")

    texts = {message(n) for n in (str(outside / "secret.safetensors"), str(outside / "nothing.safetensors"),
                                  str(loras / ".." / outside.name / "secret.safetensors"), "../elsewhere/secret",
                                  str(loras / "pipe.safetensors"), "/etc/passwd")}
    assert len(texts) == 1, texts
    assert "models/loras" in texts.pop()
    # inside the folder: absolute paths and links an administrator put there still load
    assert len(apply_stack(model, [(str(loras / "inside.safetensors"), 1.0, 1.0)], clip)[0].patches) == 1
    assert len(apply_stack(model, [("linked/admin_link.safetensors", 1.0, 1.0)], clip)[0].patches) == 1


@pytest.mark.parametrize("filename", ["a\x00b", "../x", "/abs/x", "n" * 300])
def test_merge_and_resize_filenames_are_checked_with_one_rule(host, loras, filename):
    model, _ = host
    save_file(good_lora(model), str(loras / "ok.safetensors"))
    mix_nodes = node_module("mix")
    with pytest.raises(LoraValueError, match="not a usable file name"):
        mix_nodes.LoRACoreMergeSave().merge("exact", 32, 0.0, filename, False, "auto", "fp32",
                                            lora_stack=[("ok.safetensors", 1.0, 1.0)])
    with pytest.raises(LoraValueError, match="not a usable file name"):
        mix_nodes.LoRACoreResize().resize("ok.safetensors", 2, 0.0, filename, False, "auto", "fp32")
    assert sorted(p.name for p in loras.iterdir()) == ["ok.safetensors"]


def test_shape_error_inside_a_stack_names_the_file(host, loras):
    model, clip = host
    weight = model.model.state_dict()["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(good_lora(model), str(loras / "fine.safetensors"))
    save_file(kohya_pair(1280, weight.shape[0]), str(loras / "misfit.safetensors"))
    before = snapshot(model, clip)
    with pytest.raises(LoraMatchError) as caught:
        node_module("loader").LoRACoreApplyStack().apply(model, [("fine.safetensors", 1.0, 1.0),
                                                                 ("misfit.safetensors", 1.0, 1.0)], clip)
    assert "misfit.safetensors" in str(caught.value) and "fine.safetensors" not in str(caught.value)
    assert_untouched(before, model, clip)


def test_large_file_that_cannot_fit_is_refused_from_its_header(host, loras, monkeypatch):
    """A file past the preflight size is planned from its header (shapes only) first: a tensor that fits no
    weight fails before the file's data is read."""
    from lora_core import io as lora_io

    model, clip = host
    weight = model.model.state_dict()["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(kohya_pair(4096, weight.shape[0], rank=64), str(loras / "wide_big.safetensors"))
    host_module = node_module("_host")
    monkeypatch.setattr(host_module, "PREFLIGHT_BYTES", 0)
    reads = []
    original = lora_io.read_lora_file
    monkeypatch.setattr(lora_io, "read_lora_file", lambda path: reads.append(path) or original(path))
    lora_io.default_cache.clear()
    with pytest.raises(LoraMatchError, match="wide_big.safetensors.*does not fit"):
        load(model, clip, "wide_big.safetensors")
    assert reads == [], "the data was read although the header already showed the file cannot fit"
    save_file(good_lora(model), str(loras / "ok_big.safetensors"))
    new_model, _, _ = load(model, clip, "ok_big.safetensors")
    assert len(reads) == 1 and len(new_model.patches) == 1
