"""Training through the node as a hostile client and as a user pressing Cancel would: no file is written
outside models/loras whatever `output_name` says, names that cannot be saved fail before the first step, and
an interrupt raised the way ComfyUI raises it (from the server's progress hook, or from the per-op check inside
the forward pass) or any other exception mid-run saves the finished steps as a resumable run, then re-raises.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from tests.pack import loras_folder
from tests.test_train_nodes import nt, single_thread, square_images, tiny_sd15_for_tiny_clip, tiny_vae, \
    train_kwargs, DATASET_DEFAULTS  # noqa: F401  (single_thread is an autouse fixture)
from tests import tiny_models as tm

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
from lora_core.errors import LoraFileError, LoraValueError  # noqa: E402


@pytest.fixture(scope="module")
def host():
    return tiny_sd15_for_tiny_clip(), tm.comfy_clip_sd15(), tiny_vae()


@pytest.fixture(scope="module")
def dataset():
    return nt.LoRACoreTrainDataset().build(images=square_images(4), **DATASET_DEFAULTS)[0]


def files_under(root) -> set:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("name", ["../../x", "../escape", "a/../../b", "/tmp/lora_core_abs_escape",
                                  "../checkpoints/model", "sub/../../up", "C:/windows/x", "~/x", "a\x00b"])
def test_output_name_never_escapes_the_loras_folder(host, dataset, tmp_path, name):
    model, clip, vae = host
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "model.safetensors").write_bytes(b"precious checkpoint")
    before = files_under(tmp_path)
    with loras_folder(loras):
        with pytest.raises(LoraValueError) as caught:
            nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name=name, steps=2,
                                                                                overwrite=True,
                                                                                train_text_encoder=False))
    message = str(caught.value)
    assert "output_name" in message and "not a usable file name" in message, message
    assert files_under(tmp_path) == before
    assert (checkpoints / "model.safetensors").read_bytes() == b"precious checkpoint"
    assert not os.path.exists("/tmp/lora_core_abs_escape.safetensors")


def test_subfolders_inside_the_loras_folder_still_work(host, dataset, tmp_path):
    model, clip, vae = host
    with loras_folder(tmp_path):
        outputs = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(
            output_name="styles/./mine", steps=1, train_text_encoder=False))
    assert (tmp_path / "styles" / "mine.safetensors").is_file()
    assert outputs[4].replace("\\", "/") == "styles/mine.safetensors"


def test_overlong_name_fails_before_training(host, dataset, tmp_path):
    model, clip, vae = host
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with loras_folder(tmp_path):
            with pytest.raises(LoraValueError, match="too long"):
                nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name="n" * 240, steps=3,
                                                                                    train_text_encoder=False))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert calls == [] and files_under(tmp_path) == set()


def test_step_file_of_another_run_fails_before_training(host, dataset, tmp_path):
    model, clip, vae = host
    (tmp_path / "clash-step00000002.safetensors").write_bytes(b"another run's step file")
    with loras_folder(tmp_path):
        with pytest.raises(LoraFileError, match="step file of another training run"):
            nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name="clash", steps=3,
                                                                                save_every=2,
                                                                                train_text_encoder=False))
    assert files_under(tmp_path) == {"clash-step00000002.safetensors"}


def saved_steps(path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["ss_steps"])


def run_until_raise(host, dataset, folder, name, steps, raise_at):
    """Train with `raise_at(step)` installed where ComfyUI would raise; return the exception that came out."""
    model, clip, vae = host
    with loras_folder(folder):
        with pytest.raises(BaseException) as caught:
            nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(output_name=name, steps=steps,
                                                                                train_text_encoder=False))
    return caught.value


def test_cancel_raised_by_the_servers_progress_hook_saves_the_run(host, dataset, tmp_path):
    # main.py's hook calls throw_exception_if_processing_interrupted() on every progress update.
    def hook(value, total, preview, node_id=None):
        if value >= 3:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        error = run_until_raise(host, dataset, tmp_path, "cancel_hook", 40, None)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
    assert isinstance(error, mm.InterruptProcessingException)
    assert saved_steps(tmp_path / "cancel_hook.safetensors") == 3
    assert (tmp_path / "cancel_hook.state.pt").is_file()
    model, clip, vae = host
    with loras_folder(tmp_path):
        outputs = nt.LoRACoreTrain().train(model, clip, vae, dataset, **train_kwargs(
            output_name="cancel_hook", steps=2, run="continue", train_text_encoder=False))
    assert "steps 5 (this run 2" in outputs[5]


class _RaiseInForward:
    """A forward pre-hook on one UNet layer that raises at the n-th forward call (the 1st call is step 1)."""

    def __init__(self, module, at_call: int, make_error):
        self.calls, self.at_call, self.make_error = 0, at_call, make_error
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at_call:
            raise self.make_error()


@pytest.mark.parametrize("make_error,expected", [
    (lambda: (mm.interrupt_current_processing(True), mm.throw_exception_if_processing_interrupted()),
     mm.InterruptProcessingException),   # ComfyUI's per-op check (comfy.ops.run_every_op)
    (lambda: RuntimeError("CUDA out of memory (simulated)"), RuntimeError),
    (lambda: KeyboardInterrupt(), KeyboardInterrupt),
])
def test_exception_inside_the_forward_pass_saves_the_finished_steps(host, dataset, tmp_path, make_error, expected):
    model, clip, vae = host
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    hook = _RaiseInForward(layer, at_call=5, make_error=make_error)   # batch 2 of 4 images: one call per step
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    modules = [type(m) for m in model.model.diffusion_model.modules()]
    try:
        error = run_until_raise(host, dataset, tmp_path, "cut", 40, None)
    finally:
        hook.handle.remove()
        mm.interrupt_current_processing(False)
    assert isinstance(error, expected)
    assert saved_steps(tmp_path / "cut.safetensors") == 4
    state = torch.load(tmp_path / "cut.state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4
    # the model handed in is left as it was: no side path left in, every requires_grad flag restored
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags
    assert [type(m) for m in model.model.diffusion_model.modules()] == modules


def test_failure_before_the_first_step_saves_nothing(host, dataset, tmp_path):
    model, clip, vae = host
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    hook = _RaiseInForward(layer, at_call=1, make_error=lambda: RuntimeError("boom"))
    try:
        error = run_until_raise(host, dataset, tmp_path, "none", 5, None)
    finally:
        hook.handle.remove()
    assert isinstance(error, RuntimeError) and "boom" in str(error)
    assert files_under(tmp_path) == set()


def test_long_captions_are_cut_to_the_tokenizers_limit(host, caplog):
    """A 200 KB caption would make thousands of 77-token CLIP chunks: training encodes the first one, warns."""
    import logging

    model, clip, _ = host
    backend = nt.ComfyBackend(model, clip)
    long_caption = "sks square, " * 20000
    with caplog.at_level(logging.WARNING):
        long_cond = backend.encode_text([long_caption])["context"]
    short_cond = backend.encode_text(["sks square, " * 5])["context"]
    assert long_cond.shape == short_cond.shape and long_cond.shape[1] == 77
    assert any("longer than the text encoder reads" in r.getMessage() for r in caplog.records)
    tokens = clip.tokenize(long_caption)
    assert len(next(iter(tokens.values()))) > 100   # what would have been encoded without the cut


def test_caption_files_and_images_past_the_limits_are_named(tmp_path, caplog):
    import logging

    from PIL import Image
    from lora_core.train import dataset as ds

    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("word " * 100000)
    with caplog.at_level(logging.WARNING):
        loaded = ds.load_folder(str(tmp_path), resolution=64, min_bucket=32, max_bucket=128, bucket_step=16)
    assert len(loaded.samples[0].caption) <= ds.MAX_CAPTION_CHARS and "ok.txt" in caplog.text
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)   # 81 megapixels: tiny on disk, gigabytes decoded
    (tmp_path / "bomb.txt").write_text("x")
    with pytest.raises(LoraFileError, match=r"bomb.png is 9000x9000 pixels, too large"):
        ds.load_folder(str(tmp_path), resolution=64, min_bucket=32, max_bucket=128, bucket_step=16)
