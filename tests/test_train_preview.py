"""Previews and validation loss of LoRACoreTrain, with real ComfyUI objects (tiny SD1.5 + CLIP + TAESD-type VAE):

* previews: rendered by ComfyUI's sampler from the model being trained at the requested steps, output as an IMAGE
  grid (rows = steps, columns = prompts) and sent through ComfyUI's progress channel (captured from
  comfy.utils' global progress hook, which the server turns into its preview messages); the last row equals a
  render from the returned MODEL (the saved file applied), the first one a render from the base model;
* previews and validation do not change training: same LoRA and the same global RNG state with and without them;
* validation: a held-out split (disjoint, deterministic) or a second folder; the curve in the report, the chart,
  the file's metadata and the resume state, equal for 2 + 2 resumed steps and 4 straight ones;
* bad inputs: clear errors.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests import tiny_models as tm
from tests.pack import input_folder, loras_folder
from tests.test_train_nodes import (DATASET_DEFAULTS, nt, square_images, tiny_sd15_for_tiny_clip, tiny_vae,
                                    train_kwargs)

import comfy.utils  # noqa: E402  (ComfyUI is imported by tests.test_train_nodes)
from lora_core.errors import LoraFileError, LoraValueError  # noqa: E402
from lora_core.train.validation import split_dataset  # noqa: E402

tp = sys.modules[nt.__package__ + ".train_preview"]   # nodes/train_preview.py, imported by nodes/train.py

SIZE = 32
PROMPTS = "sks square\nsks square --n blurry"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def host():
    return tiny_sd15_for_tiny_clip(), tm.comfy_clip_sd15(), tiny_vae()


@pytest.fixture(scope="module")
def dataset():
    return nt.LoRACoreTrainDataset().build(images=square_images(), **DATASET_DEFAULTS)[0]


def kwargs(**overrides):
    base = dict(steps=4, train_text_encoder=False, unet_lr=1e-2, save_precision="fp32")
    base.update(overrides)
    return train_kwargs(**base)


PREVIEWS = dict(preview_every=2, preview_prompts=PROMPTS, preview_steps=3, preview_width=SIZE, preview_height=SIZE,
                preview_seed=5)


def run(host, dataset, folder, **overrides):
    model, clip, vae = host
    with loras_folder(folder):
        return nt.LoRACoreTrain().train(model, clip, vae, dataset, **kwargs(**overrides))


def metadata(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def tensors(path):
    return comfy.utils.load_torch_file(path, safe_load=True)


class Messages:
    """comfy.utils' global progress hook (what ComfyUI's server sends as 'progress' and preview messages)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                                 self.calls.append((value, total, preview)))
        return self

    def __exit__(self, *exc):
        comfy.utils.set_progress_bar_global_hook(self.previous)
        return False


def test_node_contract():
    optional = list(nt.LoRACoreTrain.INPUT_TYPES()["optional"])
    assert optional[:3] == ["timestep_sampling", "guidance", "text_encoders"]
    # appended at the end, then the loss weighting and the I2V previews' start image (added after them)
    assert optional[-len(tp.PREVIEW_DEFAULTS) - 2:] == list(tp.PREVIEW_DEFAULTS) + ["loss_weighting", "preview_image"]
    assert nt.LoRACoreTrain.INPUT_TYPES()["optional"]["preview_image"][0] == "IMAGE"
    assert nt.LoRACoreTrain.RETURN_NAMES[-1] == "previews" and nt.LoRACoreTrain.RETURN_TYPES[-1] == "IMAGE"
    assert tp.parse_prompts("a cat\n\n  b --n ugly, blurry \n--n only negative") == [
        ("a cat", ""), ("b", "ugly, blurry"), ("", "only negative")]


def test_previews_grid_messages_and_model(host, dataset, tmp_path):
    model, clip, vae = host
    with Messages() as messages:
        outputs = run(host, dataset, tmp_path, output_name="pv", train_text_encoder=True, text_encoder_lr=1e-2,
                      **PREVIEWS)
    new_model, new_clip, lora, curve, _, report, grid = outputs
    # rows at the start, every 2 steps and the end; one column per prompt
    assert "previews at steps [0, 2, 4] (2 prompt(s) per row)" in report
    assert grid.shape == (1, 3 * SIZE, 2 * SIZE, 3) and grid.dtype == torch.float32
    assert 0 <= float(grid.min()) and float(grid.max()) <= 1
    # the UI got a JPEG preview (samples above the loss chart) at each preview step, progress counted to the end
    previews = [(value, p) for value, total, p in messages.calls if p is not None and p[0] == "JPEG"]
    assert len(previews) >= 3
    assert all(p[1].width == 768 and p[1].height > 432 for _, p in previews)
    assert [v for v, _, _ in messages.calls][-1] == 4 and all(t == 4 for _, t, _ in messages.calls)

    # the last row is what the returned MODEL and CLIP (the saved fp32 file applied) render; the first is the base
    # model's: previews sample the model being trained, its text encoder included
    def render(model, clip):
        with torch.no_grad():
            return tp.PreviewRenderer(model, clip, vae, tp.parse_prompts(PROMPTS), seed=5, steps=3, cfg=7.0,
                                      sampler="euler", scheduler="normal", width=SIZE, height=SIZE,
                                      text_encoder_trains=False)(0)

    final, base = render(new_model, new_clip), render(model, clip)
    rows = grid[0].unflatten(0, (3, SIZE)).unflatten(2, (2, SIZE)).permute(0, 2, 1, 3, 4)  # (row, col, H, W, 3)
    last_error = (rows[2] - final).abs().max().item()
    first_error = (rows[0] - base).abs().max().item()
    change = (rows[2] - rows[0]).abs().max().item()
    print(f"preview vs returned MODEL {last_error:.2e}, vs base {first_error:.2e}; trained vs base {change:.3f}")
    assert last_error < 2e-3 and first_error < 2e-3
    assert change > 50 * max(last_error, first_error, 1e-5)


def test_previews_and_validation_leave_training_unchanged(host, dataset, tmp_path):
    from PIL import Image

    val = tmp_path / "input" / "val"
    val.mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (SIZE * 2, SIZE * 2), colour).save(val / f"v{i}.png")
        (val / f"v{i}.txt").write_text("sks square")
    torch.manual_seed(1234)
    plain = run(host, dataset, tmp_path, output_name="plain")
    rng_plain = torch.get_rng_state()
    torch.manual_seed(1234)
    with input_folder(tmp_path / "input"):
        watched = run(host, dataset, tmp_path, output_name="watched", validation_folder="val", validate_every=2,
                      **PREVIEWS)
    rng_watched = torch.get_rng_state()
    a, b = tensors(plain[2].path), tensors(watched[2].path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_plain, rng_watched)   # ComfyUI's prepare_noise reseeds the global RNG: it was put back
    meta = metadata(watched[2].path)
    assert meta["lora_core.validation_images"] == "2" and "2 image(s) of val" in meta["lora_core.validation_set"]
    assert [s for s, _ in json.loads(meta["lora_core.validation_loss"])] == [0, 2, 4]
    assert meta["ss_num_train_images"] == metadata(plain[2].path)["ss_num_train_images"] == "8"
    assert "lora_core.validation_loss" not in metadata(plain[2].path)


def orange_pixels(image: torch.Tensor) -> int:
    rgb = image[0] * 255
    target = torch.tensor([0xE6, 0x55, 0x0D], dtype=torch.float32)
    return int(((rgb - target).abs().max(dim=-1).values < 30).sum())


def test_validation_split_curve_resume(host, dataset, tmp_path):
    split = dict(validation_split=0.25, validate_every=1)
    straight = run(host, dataset, tmp_path, output_name="straight", **split)
    first = run(host, dataset, tmp_path, output_name="chunked", steps=2, **split)
    part = json.loads(metadata(first[2].path)["lora_core.validation_loss"])
    second = run(host, dataset, tmp_path, output_name="chunked", steps=2, run="continue", **split)

    curve = json.loads(metadata(straight[2].path)["lora_core.validation_loss"])
    assert [s for s, _ in curve] == [0, 1, 2, 3, 4]
    assert curve[-1][1] != curve[0][1]   # it moves as the LoRA trains
    resumed = json.loads(metadata(second[2].path)["lora_core.validation_loss"])
    assert resumed[:3] == part and [s for s, _ in resumed] == [0, 1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in curve], rel=1e-5)   # fixed noise and levels
    state = torch.load(os.path.join(tmp_path, "chunked.state.pt"), weights_only=True)
    assert [s for s, _ in state["extra"]["validation"]["curve"]] == [0, 1, 2, 3, 4]

    # held out: 2 of the 8 images, chosen from the seed, none of them trained on
    train_set, held = split_dataset(dataset, 0.25, seed=0)
    sources = {s.source for s in held}
    assert len(held) == 2 and not sources & {s.source for s in train_set.samples}
    assert sources | {s.source for s in train_set.samples} == {s.source for s in dataset.samples}
    assert state["extra"]["validation"]["sources"] == [s.source for s in held]
    assert metadata(straight[2].path)["ss_num_train_images"] == "6"
    assert [s.source for s in split_dataset(dataset, 0.25, seed=0)[1]] == [s.source for s in held]
    assert "validation loss (2 of 8 dataset images" in straight[5]

    # the loss chart shows the validation curve (orange) beside the training loss; without validation it has none
    assert orange_pixels(straight[3]) > 50
    plain_chart = nt._curve_image([1.0, 0.9, 0.8], "x")
    assert orange_pixels(plain_chart) == 0


def test_bad_inputs(host, dataset, tmp_path):
    (tmp_path / "input").mkdir()
    with input_folder(tmp_path / "input"):
        with pytest.raises(LoraValueError, match="validation_split must be between 0 and 0.5"):
            run(host, dataset, tmp_path, validation_split=0.7)
        with pytest.raises(LoraValueError, match="validation_folder 'nope' does not exist"):
            run(host, dataset, tmp_path, validation_folder="nope")
        with pytest.raises(LoraValueError, match="outside ComfyUI's input folder"):
            run(host, dataset, tmp_path, validation_folder=str(tmp_path))
        with pytest.raises(LoraValueError, match="not a usable file name"):
            run(host, dataset, tmp_path, validation_folder="../x")
        with pytest.raises(LoraValueError, match="preview_prompts is empty"):
            run(host, dataset, tmp_path, preview_every=2)
        (tmp_path / "input" / "empty").mkdir()
        with pytest.raises(LoraFileError, match="validation folder: .*has no images"):
            run(host, dataset, tmp_path, validation_folder="empty")
    one = nt.LoRACoreTrainDataset().build(images=square_images(1), **DATASET_DEFAULTS)[0]
    with pytest.raises(LoraValueError, match="would hold out all 1 image"):
        split_dataset(one, 0.5, seed=0)


def test_validation_folder_must_not_hold_training_images(tmp_path):
    from PIL import Image

    from lora_core.train import load_folder
    from lora_core.train.validation import load_validation_folder

    for i in range(2):
        Image.new("RGB", (64, 64), (10 * i, 0, 0)).save(tmp_path / f"t{i}.png")
        (tmp_path / f"t{i}.txt").write_text("x")
    training = load_folder(str(tmp_path), resolution=64, bucket_step=16, min_bucket=32, max_bucket=128)
    with pytest.raises(LoraValueError, match="holds 2 training image"):
        load_validation_folder(str(tmp_path), training)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_previews_and_validation_on_flow_models(kind, tmp_path):
    """Flux.1 / Chroma (flow matching, guidance input): previews sample the model being trained, the validation
    loss is the flow objective on the held-out image."""
    from tests.test_train_flux import Host

    host = Host(kind)
    options = dict(preview_every=1, preview_prompts="sks square", preview_steps=2, preview_width=SIZE,
                   preview_height=SIZE, preview_cfg=1.0, validation_split=0.25, validate_every=1)
    new_model, new_clip, lora, _, _, report, grid = host.train(tmp_path, steps=2, save_precision="fp32", **options)
    assert grid.shape == (1, 3 * SIZE, SIZE, 3) and "previews at steps [0, 1, 2]" in report
    assert "validation loss (1 of 4 dataset images" in report
    assert [s for s, _ in json.loads(metadata(lora.path)["lora_core.validation_loss"])] == [0, 1, 2]

    def render(model, clip):
        with torch.no_grad():
            return tp.PreviewRenderer(model, clip, host.vae, [("sks square", "")], seed=0, steps=2, cfg=1.0,
                                      sampler="euler", scheduler="normal", width=SIZE, height=SIZE,
                                      text_encoder_trains=False)(0)[0]

    last_error = (grid[0, -SIZE:] - render(new_model, new_clip)).abs().max().item()
    first_error = (grid[0, :SIZE] - render(host.model, host.clip)).abs().max().item()
    change = (grid[0, -SIZE:] - grid[0, :SIZE]).abs().max().item()
    assert last_error < 1e-4 and first_error < 1e-4 and change > 100 * max(last_error, first_error, 1e-5)


def test_previews_are_kept_across_continue(host, dataset, tmp_path):
    """A run trained in chunks (run = continue) shows every chunk's rows in one grid; rows made with other preview
    settings are not mixed in."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    straight = run(host, dataset, tmp_path / "a", output_name="pc", steps=6, **PREVIEWS)
    run(host, dataset, tmp_path / "b", output_name="pc", steps=4, **PREVIEWS)
    resumed = run(host, dataset, tmp_path / "b", output_name="pc", steps=2, run="continue", **PREVIEWS)
    report, grid = resumed[5], resumed[6]
    assert "previews at steps [0, 2, 4, 6]" in report and "previews continued: 3 row(s)" in report
    assert grid.shape == straight[6].shape == (1, 4 * SIZE, 2 * SIZE, 3)
    # the earlier chunk's rows come back as 8-bit images; the resumed run's own row equals the straight run's
    error = (grid - straight[6]).abs().max().item()
    assert error <= 0.5 / 255 + 1e-6, error
    # other settings (another preview seed): the grid starts again from this run, and the report says why
    other = run(host, dataset, tmp_path / "b", output_name="pc", steps=2, run="continue",
                **{**PREVIEWS, "preview_seed": 6})
    assert "previews at steps [6, 8]" in other[5] and "not taken over" in other[5]
    assert other[6].shape == (1, 2 * SIZE, 2 * SIZE, 3)
