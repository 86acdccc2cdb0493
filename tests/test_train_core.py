"""lora_core.train without ComfyUI nodes: the loop on a real tiny ComfyUI SD1.5 UNet (fixed random
conditioning instead of a CLIP), resume equivalence, kohya files that ComfyUI core loads with every key
matched, the dataset, schedules and the diffusers backend.

Timing: the test machine has 2 contended cores; torch runs single-threaded here (much faster than two
threads fighting) and latents are 8x8.
"""
from __future__ import annotations

import logging
import os
import statistics

import pytest
import torch

from tests.comfy_host import import_comfy
from tests import tiny_models as tm

comfy = import_comfy()
import lora_core.train as lt  # noqa: E402
from lora_core.errors import LoraFileError, LoraValueError  # noqa: E402
from lora_core.train.blocks import parse_block_list, parse_block_lr  # noqa: E402

STEPS = 200
LOSS_RATIO_MAX = 0.75     # mean(last 20 losses) / mean(first 20) must be below this
RESUME_ATOL = 1e-5        # resumed vs uninterrupted LoRA weights (fp32 state)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_sd15():
    return tm.comfy_sd15()


class ComfyUNetBackend:
    """The loop's interface over a ComfyUI ModelPatcher, written here independently of nodes/train.py."""

    def __init__(self, patcher):
        self.unet = patcher.model.diffusion_model
        sigmas = patcher.model.model_sampling.sigmas.float()
        self.alphas_cumprod = 1 / (1 + sigmas ** 2)
        self.prediction_type = "epsilon"
        self.device = torch.device("cpu")

    def denoise(self, noisy, timesteps, cond):
        return self.unet(noisy, timesteps.float(), context=cond["context"], transformer_options={})

    def modules(self):
        return [self.unet]


def square_latents(n=8, size=8, seed=0):
    """One "coloured shape": the same square in every latent, with a little per-image noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.zeros(4, size, size)
    base[:, 2:6, 2:6] = torch.tensor([1.0, -0.5, 0.8, 0.3]).view(4, 1, 1)
    return [base + 0.05 * torch.randn(4, size, size, generator=gen) for _ in range(n)]


def square_dataset():
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    return lt.TrainDataset([lt.Sample("sks square", latent=l, cond={"context": context}) for l in square_latents()])


def config(**overrides):
    base = dict(steps=STEPS, batch_size=2, seed=0, rank=8, alpha=8, unet_lr=1e-3, min_snr_gamma=5.0, save_dtype="fp32")
    base.update(overrides)
    return lt.TrainConfig(**base)


def make_trainer(model, cfg, folder=None, name="run"):
    backend = ComfyUNetBackend(model)
    network = lt.LoRANetwork(lt.find_unet_targets(backend.unet, cfg.unet_kinds, cfg.blocks), cfg.rank, cfg.alpha,
                             seed=cfg.seed)
    output = lt.OutputFiles(str(folder), name) if folder is not None else None
    return lt.LoraTrainer(backend, network, square_dataset(), cfg, output=output)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    model = tiny_sd15()
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.model.diffusion_model.state_dict().items()}
    trainer = make_trainer(model, config(), folder)
    result = trainer.run()
    return dict(model=model, trainer=trainer, result=result, before=before, pointers=pointers, folder=folder)


def test_training_loss_falls(full_run):
    losses = full_run["result"].losses
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    ratio = last / first
    print(f"loss first20 {first:.4f} last20 {last:.4f} ratio {ratio:.3f}")
    assert ratio < LOSS_RATIO_MAX, f"loss did not fall enough: {first:.4f} -> {last:.4f} (ratio {ratio:.3f})"


def test_base_weights_untouched_and_forwards_restored(full_run):
    unet = full_run["model"].model.diffusion_model
    after = unet.state_dict()
    for key, value in full_run["before"].items():
        assert torch.equal(after[key], value), key
        assert after[key].data_ptr() == full_run["pointers"][key], f"{key} was copied"
    assert not any("forward" in m.__dict__ for m in unet.modules()), "a hooked forward was left behind"
    assert all(p.requires_grad for p in unet.parameters()) or not any(p.requires_grad for p in unet.parameters())


def _load_in_core(model, tensors, caplog):
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(dict(tensors), key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    return patches, not_loaded


def test_saved_file_loads_in_comfy_core_with_every_key(full_run, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = full_run["result"].final_path
    assert os.path.basename(path) == "run.safetensors"
    tensors = load_file(path)
    modules = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors}
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    patches, not_loaded = _load_in_core(full_run["model"], tensors, caplog)
    assert not_loaded == []
    assert len(patches) == len(modules) == len(full_run["trainer"].network.paths)
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert meta["ss_steps"] == str(STEPS) and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_session_id"] == full_run["result"].session_id


def test_resume_equals_uninterrupted(full_run, tmp_path):
    model = full_run["model"]
    half = STEPS // 2
    first = make_trainer(model, config(steps=half, total_steps=STEPS), tmp_path, "chunked")
    first.run()
    second = make_trainer(model, config(steps=half, total_steps=STEPS), tmp_path, "chunked")
    second.resume(first.output.state)
    result = second.run()
    assert result.step == STEPS and len(result.losses) == STEPS
    reference = full_run["trainer"].network.kohya_state_dict()
    resumed = second.network.kohya_state_dict()
    worst = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
    print(f"resume max |diff| = {worst:.2e}")
    assert worst <= RESUME_ATOL
    assert result.losses == pytest.approx(full_run["result"].losses, abs=1e-5)
    # chunked saving overwrote its own file (same session), never someone else's
    assert lt.read_session_id(result.final_path) == first.session_id


def test_kohya_init_and_zero_delta_at_start():
    model = tiny_sd15()
    backend = ComfyUNetBackend(model)
    targets = lt.find_unet_targets(backend.unet, ("attn", "ff", "proj", "resnet"))
    network = lt.LoRANetwork(targets, rank=4, alpha=2, seed=3)
    for name, path in network.paths.items():
        bound = 1 / path.down.weight[0].numel() ** 0.5
        assert path.down.weight.abs().max() <= bound and path.down.weight.abs().max() > bound / 2
        assert torch.count_nonzero(path.up.weight) == 0
        assert path.scale == pytest.approx(0.5)
    assert any(isinstance(t.module, torch.nn.Conv2d) and t.module.kernel_size == (3, 3) for t in targets)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    cond = {"context": torch.randn(1, 77, 768)}
    with torch.no_grad():
        base = backend.denoise(x, t, cond)
        network.inject()
        hooked = backend.denoise(x, t, cond)
        for path in network.paths.values():
            path.up.weight.normal_()
        changed = backend.denoise(x, t, cond)
        network.restore()
        restored = backend.denoise(x, t, cond)
    assert torch.equal(base, hooked) and torch.equal(base, restored)
    assert not torch.allclose(base, changed)


def test_side_path_delta_matches_merged_weight():
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    linear = torch.nn.Linear(7, 3)
    for module in (conv, linear):
        target = lt.Target("lora_unet_x", module, "unet", "IN01", "resnet")
        network = lt.LoRANetwork([target], rank=2, alpha=1, seed=0)
        torch.nn.init.normal_(network.paths["lora_unet_x"].up.weight)
        x = torch.randn(2, 6, 4, 4) if module is conv else torch.randn(2, 7)
        network.inject()
        with torch.no_grad():
            hooked = module(x)
        network.restore()
        merged = type(module)(*((6, 5, 3) if module is conv else (7, 3)), **({"padding": 1} if module is conv else {}))
        with torch.no_grad():
            merged.weight.copy_(module.weight + network.delta_weight("lora_unet_x"))
            merged.bias.copy_(module.bias)
            assert torch.allclose(merged(x), hooked, atol=1e-5)


def test_model_built_under_inference_mode_trains():
    """ComfyUI loads models inside torch.inference_mode; autograd cannot save such tensors for backward."""
    with torch.inference_mode():
        model = tiny_sd15()
    unet = model.model.diffusion_model
    assert next(unet.parameters()).is_inference()
    assert lt.unlock_inference_params(unet) > 0
    trainer = make_trainer(model, config(steps=3))
    assert len(trainer.run().losses) == 3


def test_block_selection_and_block_lr():
    model = tiny_sd15()
    unet = model.model.diffusion_model
    targets = lt.find_unet_targets(unet, ("attn",), blocks=["IN01", "OUT05"])
    assert {t.block for t in targets} == {"IN01", "OUT05"}
    assert all(t.name.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_5_")) for t in targets)
    network = lt.LoRANetwork(targets, 4, 4)
    groups = {g["name"]: g["lr"] for g in network.param_groups(1e-3, None, {"IN01": 0.5})}
    assert groups == {"unet/IN01": pytest.approx(5e-4), "unet/OUT05": pytest.approx(1e-3)}
    valid = ["IN00", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01"]
    assert parse_block_list("in01-IN03, m00", valid) == ["IN01", "IN02", "IN03", "M00"]
    assert parse_block_list(" ", valid) is None
    assert parse_block_lr("IN01=0.5; OUT00-OUT01=2", valid) == {"IN01": 0.5, "OUT00": 2.0, "OUT01": 2.0}
    with pytest.raises(LoraValueError, match="IN11 does not exist"):
        parse_block_list("IN11", valid)
    with pytest.raises(LoraValueError, match="not a block id"):
        parse_block_list("INPUT4", valid)
    with pytest.raises(LoraValueError, match="BLOCK=factor"):
        parse_block_lr("IN01", valid)
    with pytest.raises(LoraValueError, match="nothing to train"):
        lt.LoRANetwork(lt.find_unet_targets(unet, ("attn",), blocks=["IN03"]), 4, 4)


def test_lr_schedules_and_snr_weights():
    assert [lt.lr_factor(s, "constant", 4, 20) for s in (0, 3, 10)] == [0.25, 1.0, 1.0]
    assert lt.lr_factor(4, "cosine", 4, 20) == pytest.approx(1.0)
    assert lt.lr_factor(12, "cosine", 4, 20) == pytest.approx(0.5)
    assert lt.lr_factor(20, "cosine", 4, 20) == pytest.approx(0.0)
    assert lt.lr_factor(12, "linear", 4, 20) == pytest.approx(0.5)
    ac = lt.sd_alphas_cumprod()
    t = torch.tensor([0, 500, 999])
    snr = ac[t] / (1 - ac[t])
    expected_eps = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(lt.snr_weights(t, ac, 5.0, "epsilon"), expected_eps)
    assert torch.allclose(lt.snr_weights(t, ac, 5.0, "v_prediction"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_bad_config_messages():
    with pytest.raises(LoraValueError, match="optimizer 'Sophia'"):
        lt.TrainConfig(optimizer="Sophia").validate()
    with pytest.raises(LoraValueError, match="algorithm 'OFT' is not one of .*LoHa"):   # LoHa trains now
        lt.TrainConfig(algorithm="OFT").validate()
    with pytest.raises(LoraValueError, match="steps must be >= 1"):
        lt.TrainConfig(steps=0).validate()


def test_save_every_keeps_last_k_and_never_overwrites(tmp_path):
    model = tiny_sd15()
    trainer = make_trainer(model, config(steps=5, save_every=1, keep_last=2), tmp_path, "ckpt")
    trainer.run()
    steps = [s for s, _ in trainer.output.step_files()]
    assert steps == [3, 4]
    assert os.path.isfile(trainer.output.final) and os.path.isfile(trainer.output.state)
    other = make_trainer(model, config(steps=2), tmp_path, "ckpt")  # another session, same name
    with pytest.raises(LoraFileError, match="already exists"):
        other.run()
    assert lt.read_session_id(trainer.output.final) == trainer.session_id
    overwriting = make_trainer(model, config(steps=1, overwrite=True), tmp_path, "ckpt")
    overwriting.run()
    assert lt.read_session_id(trainer.output.final) == overwriting.session_id
    with pytest.raises(LoraValueError, match="rank=8, this run has rank=4"):
        make_trainer(model, config(steps=1, rank=4), tmp_path, "x").resume(trainer.output.state)


# ------------------------------------------------------------------------------------------ dataset

def _write_png(path, size, color):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_folder_dataset_buckets_and_captions(tmp_path):
    _write_png(tmp_path / "a.png", (128, 64), (255, 0, 0))
    (tmp_path / "a.txt").write_text("sks, red, square\n")
    _write_png(tmp_path / "b.png", (64, 64), (0, 255, 0))
    (tmp_path / "b.txt").write_text("sks, green")
    ds = lt.load_folder(str(tmp_path), resolution=64, repeats=3, bucket_step=16, min_bucket=32, max_bucket=128)
    shapes = sorted(tuple(s.image.shape) for s in ds.samples)
    assert shapes[0][1] * shapes[0][2] <= 64 * 64 and shapes[0][2] > shapes[0][1]  # the wide image got a wide bucket
    assert (3, 64, 64) in shapes
    assert len(ds) == 6 and ds.samples[0].caption == "sks, red, square"
    assert torch.allclose(ds.samples[0].image[:, 10, 10], torch.tensor([1.0, 0.0, 0.0]))
    assert ds.tag_frequency()["dataset"]["sks"] == 6
    plan = lt.BatchPlan(ds, batch_size=2, seed=0)
    for i in range(plan.batches_per_epoch * 2):
        shapes_in_batch = {ds.samples[j].bucket for j in plan.batch(i)}
        assert len(shapes_in_batch) == 1
    epoch = sorted(j for i in range(plan.batches_per_epoch) for j in plan.batch(i))
    assert epoch == [0, 0, 0, 1, 1, 1]


def test_caption_shuffle_keep_tokens_and_dropout():
    import random

    options = lt.CaptionOptions(shuffle=True, keep_tokens=1)
    seen = {lt.process_caption("sks, a, b, c, d", options, random.Random(i)) for i in range(30)}
    assert len(seen) > 3 and all(c.startswith("sks, ") for c in seen)
    assert sorted(seen.pop().split(", ")) == ["a", "b", "c", "d", "sks"]
    dropped = [lt.process_caption("sks", lt.CaptionOptions(dropout=0.5), random.Random(i)) for i in range(200)]
    assert 60 < dropped.count("") < 140


def test_dataset_errors(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        lt.load_folder(str(tmp_path / "nope"))
    with pytest.raises(LoraFileError, match="has no images"):
        lt.load_folder(str(tmp_path))
    _write_png(tmp_path / "ok.png", (32, 32), (1, 2, 3))
    with pytest.raises(LoraFileError, match=r"no caption file.*ok\.txt"):
        lt.load_folder(str(tmp_path), resolution=32, bucket_step=16)
    ds = lt.load_folder(str(tmp_path), resolution=32, bucket_step=16, missing_caption="use caption widget",
                        default_caption="sks")
    assert ds.samples[0].caption == "sks"
    assert lt.load_folder(str(tmp_path), resolution=32, bucket_step=16, missing_caption="use file name").samples[0].caption == "ok"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(LoraFileError, match=r"cannot be read.*broken\.jpg"):
        lt.load_folder(str(tmp_path), resolution=32, bucket_step=16, missing_caption="empty")
    with pytest.raises(LoraValueError, match="2 images but 3 captions"):
        lt.from_images([torch.rand(3, 8, 8)] * 2, ["a", "b", "c"], resolution=64)


# ------------------------------------------------------------------------------------------ diffusers

def test_diffusers_unet_and_text_encoder_backend(tmp_path, caplog):
    """The same loop on a diffusers UNet2DConditionModel + transformers CLIPTextModel (text encoder trained
    with its own LR); the file uses LDM/kohya names that ComfyUI core loads completely."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=100, max_position_embeddings=8))

    def encode(captions):  # a toy tokenizer: one id per word
        ids = torch.tensor([[hash(w) % 100 for w in (c.split() + ["pad"] * 8)[:8]] for c in captions])
        return text(ids)[0]

    backend = lt.DiffusersBackend(unet, text_encoders=[text])
    targets = lt.find_unet_targets(unet, ldm_path_of=lt.diffusers_ldm_namer(unet)) + lt.find_te_targets(text)
    network = lt.LoRANetwork(targets, rank=4, alpha=4)
    cfg = lt.TrainConfig(steps=4, rank=4, alpha=4, train_text_encoder=True, text_encoder_lr=1e-3, unet_lr=1e-3,
                         gradient_checkpointing=True, save_dtype="fp32")
    dataset = lt.TrainDataset([lt.Sample("sks square", latent=l) for l in square_latents(2)])
    trainer = lt.LoraTrainer(backend, network, dataset, cfg, encode_text=encode,
                             output=lt.OutputFiles(str(tmp_path), "diffusers"),
                             checkpoint_modules=backend.checkpoint_modules())
    result = trainer.run()
    assert len(result.losses) == 4
    te_up = [p.up.weight for n, p in network.paths.items() if n.startswith("lora_te_")]
    assert te_up and all(torch.count_nonzero(w) > 0 for w in te_up), "text encoder LoRA did not train"
    from safetensors.torch import load_file

    tensors = load_file(result.final_path)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
    # The same file on a ComfyUI model of the same layout: every UNet key is matched by core.
    comfy_model = tm.comfy_sd15(channel_mult=(1, 2), num_res_blocks=2)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    patches, not_loaded = _load_in_core(comfy_model, unet_only, caplog)
    assert not_loaded == [] and len(patches) == len(unet_only) // 3
