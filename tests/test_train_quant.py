"""Training on a quantised base (issue 15 item 5) with the real ComfyUI 0.3.75 host.

* fp8: the tiny SD1.5 saved as an fp8 checkpoint and loaded as `comfy.sd.load_diffusion_model_state_dict` does
  with UNETLoader's weight_dtype fp8_e4m3fn (tests/quantized.py `load_unet`: the same dtype choice, manual-cast
  ops, fp32 compute on CPU; core's detection only knows full-size configs). LoRACoreTrain trains on it: the
  weights stay fp8 throughout, no compute-dtype copy of a base weight is saved for backward, the saved file
  loads on the fp32 model in core and in our loader with every module matched and moves it toward the training
  images, and its effect is close to the same LoRA trained on the fp32 base.
* The frozen-cast forward equals ComfyUI's own forward (plain fp8 e4m3fn / e5m2 and scaled fp8), gradients
  included; GGUF-like packed weights keep their own forward.
* NF4: the node refuses it without bitsandbytes (or with one that has no CPU 4-bit ops) with a message naming the
  requirement and the alternative; the real bitsandbytes (its CPU backend, a test dependency) packs weights bit for
  bit as the pure-torch codec written from its documented format (tests/nf4_reference.py); the NF4 maths
  (quantise for the run, dequantise + matmul in both passes, originals back afterwards) is checked with that
  codec, and the node trains through the real bitsandbytes on the CPU to the same LoRA.
"""
from __future__ import annotations

import copy
import logging
import sys

import pytest
import safetensors.torch
import torch

from tests import quantized as q
from tests import tiny_models as tm
from tests.comfy_host import import_comfy
from tests.nf4_reference import NF4_CODE, ReferenceNF4
from tests.pack import loras_folder, node_module
from tests.test_train_nodes import (DATASET_DEFAULTS, _x0_error, nt, square_images, tiny_sd15_for_tiny_clip,
                                    tiny_vae, train_kwargs)

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import lora_core.train as lt  # noqa: E402
from lora_core.errors import LoraValueError  # noqa: E402
from lora_core.train import quant  # noqa: E402

STEPS = 100
FP8 = torch.float8_e4m3fn
KWARGS = dict(steps=STEPS, train_text_encoder=False)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fp8_model(fp32_patcher, tmp_path, dtype=FP8, scaled=False):
    """The fp32 tiny SD1.5 written as an fp8 checkpoint file and loaded back with weight_dtype `dtype`."""
    state = {k: v.detach().clone() for k, v in fp32_patcher.model.diffusion_model.state_dict().items()}
    if scaled:
        linear = {f"{n}.weight" for n, m in fp32_patcher.model.diffusion_model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        file_state = {}
        for key, value in state.items():
            if key in linear:
                scale = (value.abs().amax() / torch.finfo(dtype).max).float()
                file_state[key], file_state[key[:-6] + "scale_weight"] = (value / scale).to(dtype), scale
            else:
                file_state[key] = value
        file_state["scaled_fp8"] = torch.tensor([], dtype=dtype)
    else:
        file_state = {k: v.to(dtype) for k, v in state.items()}
    path = tmp_path / f"unet_{dtype}_{scaled}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in file_state.items()}, str(path))
    loaded = comfy.utils.load_torch_file(str(path), safe_load=True)
    return q.load_unet(loaded, dtype=None if scaled else dtype, unet_config=tm.unet_config_sd15(context_dim=32))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    fp32 = tiny_sd15_for_tiny_clip()
    fp8 = fp8_model(fp32, tmp_path_factory.mktemp("unet"))
    return dict(fp32=fp32, fp8=fp8, clip=tm.comfy_clip_sd15(), vae=tiny_vae())


@pytest.fixture(scope="module")
def dataset():
    return nt.LoRACoreTrainDataset().build(images=square_images(), **DATASET_DEFAULTS)[0]


def param_bytes(module) -> dict:
    out = {}
    for p in module.parameters():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out


@pytest.fixture(scope="module")
def trained(host, dataset, tmp_path_factory):
    """fp8-base LoRA, the same LoRA on the fp32 base, and a control (fp32 base, another seed)."""
    folder = tmp_path_factory.mktemp("loras")
    unet8 = host["fp8"].model.diffusion_model
    stored = param_bytes(unet8)
    seen = []

    def hook(value, total, preview, node_id=None):   # each training step, from the node's progress bar
        seen.append((all(p.dtype == FP8 for p in unet8.parameters()), param_bytes(unet8) == stored))

    out = {}
    with loras_folder(folder):
        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            out["fp8"] = nt.LoRACoreTrain().train(host["fp8"], host["clip"], host["vae"], dataset,
                                                  **train_kwargs(output_name="fp8", **KWARGS))
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        out["fp32"] = nt.LoRACoreTrain().train(host["fp32"], host["clip"], host["vae"], dataset,
                                               **train_kwargs(output_name="fp32", **KWARGS))
        out["control"] = nt.LoRACoreTrain().train(host["fp32"], host["clip"], host["vae"], dataset,
                                                  **train_kwargs(output_name="control", **{**KWARGS, "seed": 1}))
    return dict(outputs=out, folder=folder, seen=seen, stored=stored)


# ------------------------------------------------------------------------------------------ fp8 through the node


def test_fp8_base_stays_fp8_while_training(host, trained):
    seen = trained["seen"]
    assert len(seen) == STEPS and all(dtypes and same for dtypes, same in seen), "the base left fp8 while training"
    unet8 = host["fp8"].model.diffusion_model
    assert set(trained["stored"]) == {FP8} and all(p.dtype == FP8 for p in unet8.parameters())
    assert host["fp8"].model.manual_cast_dtype == torch.float32          # CPU: fp8 stored, fp32 computed
    report = trained["outputs"]["fp8"][5]
    assert "layers cast per call" in report and "float8_e4m3fn" in report, report
    assert "base:" not in trained["outputs"]["fp32"][5]                  # an fp32 base needs no cast path


def test_fp8_trained_file_loads_on_fp32_model_in_core_and_ours(host, trained, caplog):
    lora = trained["outputs"]["fp8"][2]
    state = comfy.utils.load_torch_file(lora.path, safe_load=True)
    modules = {k.split(".")[0] for k in state}
    assert modules and all(m.startswith("lora_unet_") for m in modules)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        core_model, _ = comfy.sd.load_lora_for_models(host["fp32"], host["clip"], state, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(core_model.patches) == len(modules)
    with loras_folder(trained["folder"]):
        ours, report = node_module("loader").LoRACoreLoaderModelOnly().load(host["fp32"], "fp8.safetensors", 1.0)
    assert "unmatched" not in report and "WARNING" not in report, report
    assert set(ours.patches) == set(core_model.patches)


def _latents_and_context(host):
    latents = host["vae"].encode(square_images().float()).detach()
    context = host["clip"].encode_from_tokens(host["clip"].tokenize("sks square")).detach()
    return latents, context


def test_fp8_trained_lora_moves_fp32_model_toward_training_images(host, trained):
    latents, context = _latents_and_context(host)
    state = comfy.utils.load_torch_file(trained["outputs"]["fp8"][2].path, safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(host["fp32"], None, state, 1.0, 0.0)
    base_error, trained_error = _x0_error(host["fp32"], latents, context), _x0_error(model, latents, context)
    state32 = comfy.utils.load_torch_file(trained["outputs"]["fp32"][2].path, safe_load=True)
    error32 = _x0_error(comfy.sd.load_lora_for_models(host["fp32"], None, state32, 1.0, 0.0)[0], latents, context)
    print(f"x0 MSE on the training images, fp32 model: base {base_error:.4f}, + fp8-trained LoRA "
          f"{trained_error:.4f}, + fp32-trained LoRA {error32:.4f}")
    assert trained_error < 0.8 * base_error


def _effect(host, path, x, sigma, context):
    """What the LoRA file changes in the fp32 model's output (ComfyUI's apply_model) on fixed inputs."""
    state = comfy.utils.load_torch_file(path, safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(host["fp32"], None, state, 1.0, 0.0)
    out = []
    for patcher in (model, host["fp32"]):
        mm.load_models_gpu([patcher], force_full_load=True)
        with torch.no_grad():
            out.append(patcher.model.apply_model(x, sigma, c_crossattn=context).clone())
    return out[0] - out[1]


def test_fp8_trained_lora_close_to_fp32_trained_lora(host, trained):
    """The two bases differ by fp8 rounding (e4m3: 3 mantissa bits, a relative step of 1/16 at most, ~3% rms),
    so the two training runs see slightly different gradients and their LoRAs drift apart a little. Measured
    (100 steps, rank 8): the fp8-trained LoRA's effect on the fp32 model is ~10% (relative L2) from the
    fp32-trained one's; the same training on the fp32 base with another seed (another initialisation and noise)
    lands ~50% away. The tolerance (25%, and under half the control's distance) separates "the same LoRA up to
    fp8 noise" from "another LoRA"."""
    latents, context = _latents_and_context(host)
    gen = torch.Generator().manual_seed(5)
    x = latents + torch.randn(latents.shape, generator=gen) * 2.0
    sigma = torch.full((latents.shape[0],), 2.0)
    context = context.expand(latents.shape[0], -1, -1)
    outputs = trained["outputs"]
    e8, e32, ec = (_effect(host, outputs[name][2].path, x, sigma, context) for name in ("fp8", "fp32", "control"))
    rel = ((e8 - e32).norm() / e32.norm()).item()
    control = ((ec - e32).norm() / e32.norm()).item()
    print(f"LoRA effect vs fp32-trained: fp8-trained {rel:.3f}, control (seed 1) {control:.3f}")
    assert e32.norm() > 0 and rel < 0.25 and rel < control / 2


# ------------------------------------------------------------------------------------------ the frozen cast path


def _saved_weight_copies(step, modules) -> int:
    """How many tensors autograd saves for backward during `step()` that are fp32 copies of the weights of
    `modules` (the stored weight cast, or the value the layer computes with: scaled / dequantised), found by
    shape and then by value."""
    references: dict = {}
    stored = {m.weight.untyped_storage().data_ptr() for m in modules}   # the parameters themselves: no copy
    for module in modules:
        with torch.no_grad():
            values = [quant.compute_weight(module, torch.float32, "cpu")]
            if module.weight.is_floating_point():
                values.append(module.weight.detach().float())
        for value in values:
            references.setdefault(tuple(value.shape), []).append(value)
    count = [0]

    def pack(tensor):
        if tensor.dtype != torch.float32 or tensor.untyped_storage().data_ptr() in stored:
            return tensor
        views = [tensor, tensor.t()] if tensor.ndim == 2 else [tensor]   # F.linear saves weight.t()
        if any(torch.equal(v, r) for v in views for r in references.get(tuple(v.shape), ())):
            count[0] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return count[0]


def _network(unet, seed=3):
    targets = lt.find_unet_targets(unet, kinds=("attn", "ff", "proj"))
    network = lt.LoRANetwork(targets, rank=4, alpha=4.0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in network.paths.values():    # a non-zero up so the LoRA's gradients are non-trivial
            path.up.weight.copy_(torch.randn(path.up.weight.shape, generator=gen) * 0.05)
    return network


def _step(unet, network):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([700.0, 150.0])
    context = torch.randn(2, 6, 32, generator=gen)

    def step():
        network.zero_grad(set_to_none=True)
        return unet(x, t, context=context).square().mean()

    return step


def _grads(network):
    return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,scaled", [(FP8, False), (torch.float8_e5m2, False), (FP8, True)],
                         ids=["e4m3fn", "e5m2", "scaled-e4m3fn"])
def test_frozen_cast_equals_comfy_forward_and_keeps_no_weight_copy(host, tmp_path, dtype, scaled):
    patcher = fp8_model(host["fp32"], tmp_path, dtype=dtype, scaled=scaled)
    unet = patcher.model.diffusion_model
    lt.unlock_inference_params(unet)
    unet.requires_grad_(False)
    network = _network(unet)
    step = _step(unet, network)
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    linear = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert {m.weight.dtype for m in (linear if scaled else layers)} == {dtype}   # scaled files: Linears in fp8

    def measure():
        network.inject()                       # after FrozenBase is entered, as the node does
        try:
            copies = _saved_weight_copies(step, layers)
            grads = _grads(network)
            with torch.no_grad():
                out = step()
        finally:
            network.restore()
        return copies, grads, out

    comfy_copies, comfy_grads, comfy_out = measure()       # ComfyUI's own forward, as it is
    with quant.FrozenBase([unet]) as frozen:
        assert frozen.report.frozen_cast == len(layers) and frozen.report.own_forward == 0
        ours_copies, ours_grads, ours_out = measure()
    assert comfy_copies >= len(linear) // 2, "the measurement would not see a saved weight copy"
    assert ours_copies == 0
    torch.testing.assert_close(ours_out, comfy_out, rtol=1e-5, atol=1e-6)
    assert set(ours_grads) == set(comfy_grads) and len(ours_grads) == 2 * len(network.paths)
    for name, grad in comfy_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    assert all(m.__dict__.get("forward") is None for m in unet.modules())   # ComfyUI's forwards are back


def test_packed_gguf_like_weights_keep_their_own_forward():
    patcher = q.gguf_sd15()
    unet = patcher.model.diffusion_model
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 77, 768)
    with torch.no_grad():
        before = unet(x, t, context=context)
        with quant.FrozenBase([unet]) as frozen:
            during = unet(x, t, context=context)
    assert frozen.report.own_forward > 0 and "through their own forward" in frozen.report.describe()
    torch.testing.assert_close(during, before, rtol=0, atol=0)


def test_dora_magnitude_reads_the_scaled_fp8_weight_values(host, tmp_path):
    patcher = fp8_model(host["fp32"], tmp_path, scaled=True)
    layer = patcher.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    reference = host["fp32"].model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    path = lt.DoRAPath(layer, rank=2, alpha=2.0)
    expected = torch.linalg.vector_norm(reference.detach().float(), dim=0)
    torch.testing.assert_close(path.dora_scale.flatten(), expected, rtol=0.07, atol=0)   # fp8's 1/16 step
    raw = torch.linalg.vector_norm(layer.weight.detach().float(), dim=0)
    assert not torch.allclose(raw, expected, rtol=0.5)         # the stored values alone are off by the scale


# ------------------------------------------------------------------------------------------ NF4


def test_nf4_refused_without_bitsandbytes(host, dataset, tmp_path, monkeypatch):
    with loras_folder(tmp_path):
        with pytest.raises(LoraValueError, match=r"base_quant must be one of \['as loaded', 'nf4'\], got 'int4'"):
            nt.LoRACoreTrain().train(host["fp8"], host["clip"], host["vae"], dataset,
                                     **train_kwargs(output_name="n", base_quant="int4", **KWARGS))
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, "bitsandbytes", None)            # bitsandbytes not installed
            patch.delitem(sys.modules, "bitsandbytes.functional", raising=False)
            with pytest.raises(LoraValueError, match=r"'nf4' needs bitsandbytes.*CUDA.*CPU.*pip install bitsandbytes.*"
                                                     r"'as loaded'.*fp8_e4m3fn.*import bitsandbytes failed"):
                nt.LoRACoreTrain().train(host["fp8"], host["clip"], host["vae"], dataset,
                                         **train_kwargs(output_name="n", base_quant="nf4", **KWARGS))
    assert not list(tmp_path.iterdir()), "a refused run wrote files"
    # a bitsandbytes without CPU 4-bit ops (releases before its CPU backend)
    with monkeypatch.context() as patch:
        def no_cpu_kernel(self, weight):
            raise NotImplementedError("quantize_4bit has no CPU kernel")

        patch.setattr(quant.BitsAndBytesNF4, "quantize", no_cpu_kernel)
        with pytest.raises(LoraValueError, match=r"has no working NF4 on the CPU: NotImplementedError.*upgrade it"):
            quant.nf4_codec("cpu")
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(LoraValueError, match=r"on cuda but CUDA is not available"):
            quant.nf4_codec("cuda")
    with pytest.raises(LoraValueError, match=r"on mps, neither CUDA nor the CPU"):
        quant.nf4_codec("mps")
    assert quant.resolve_base_quant("as loaded", "cpu") is None


def test_bitsandbytes_nf4_is_the_reference_format_bit_for_bit():
    """The real bitsandbytes (its CPU backend) against the pure-torch codec in its documented format: the same
    packed bytes, block absmax and dequantised weights, odd sizes and bf16 weights included."""
    real, reference = quant.nf4_codec("cpu"), ReferenceNF4()
    assert isinstance(real, quant.BitsAndBytesNF4)
    gen = torch.Generator().manual_seed(3)
    for shape, dtype in (((64, 128), torch.float32), ((33, 7), torch.float32), ((320, 1280), torch.float32),
                         ((96, 640), torch.bfloat16), ((40, 100), torch.float16)):
        w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        packed, state = real.quantize(w)
        ref_packed, ref_absmax, _ = reference.quantize(w.float())
        assert torch.equal(packed.flatten(), ref_packed.flatten()), shape
        torch.testing.assert_close(state.absmax.float(), ref_absmax, rtol=0, atol=0)
        back = real.dequantize((packed, state), dtype)       # bitsandbytes gives the weight's own dtype
        assert back.shape == w.shape and back.dtype == dtype
        torch.testing.assert_close(back, reference.dequantize((ref_packed, ref_absmax, _), dtype), rtol=0, atol=0)
        assert real.nbytes((packed, state)) == packed.numel() + 4 * ref_absmax.numel()
        assert real.unsupported(w) is None or shape[-1] % quant.NF4_BLOCK
    # bitsandbytes 0.50.2's native CPU dequantize is wrong for rows that are not whole blocks (input width 32, 96:
    # packed right, unpacked wrong); the codec says so and FrozenBase leaves such Linears as loaded
    w = torch.randn(128, 32, generator=gen) * 0.05
    packed, state = real.quantize(w)
    ref_packed, ref_absmax, _ = reference.quantize(w)
    assert torch.equal(packed.flatten(), ref_packed.flatten())
    assert "multiple of 64" in real.unsupported(w) and reference.unsupported(w) is None
    if torch.equal(real.dequantize((packed, state), torch.float32), reference.dequantize((ref_packed, ref_absmax, _),
                                                                                         torch.float32)):
        pytest.fail("bitsandbytes unpacks 32-wide rows right now: drop BitsAndBytesNF4.unsupported's CPU rule")


def test_nf4_base_trains_through_bitsandbytes_on_cpu(host, dataset, tmp_path, monkeypatch):
    """base_quant nf4 through the node with the real bitsandbytes: its Linears in NF4 for the run, the MODEL given
    in untouched, the same LoRA as with the reference codec (bit-identical formats), another LoRA than on the
    full-precision base (NF4 changed what it trained against), and a file that applies to the fp32 model."""
    steps = dict(steps=20, train_text_encoder=False)
    unet = host["fp32"].model.diffusion_model
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    outputs = {}
    with loras_folder(tmp_path):
        outputs["bnb"] = nt.LoRACoreTrain().train(host["fp32"], host["clip"], host["vae"], dataset,
                                                  **train_kwargs(output_name="bnb", base_quant="nf4", **steps))
        after = unet.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), "the MODEL given in was changed"
        with monkeypatch.context() as patch:
            real = lt.resolve_base_quant
            class SameLayers(ReferenceNF4):   # the reference codec on the layers bitsandbytes takes
                unsupported = quant.BitsAndBytesNF4.unsupported

            patch.setattr(lt, "resolve_base_quant",
                          lambda choice, device: SameLayers() if choice == "nf4" else real(choice, device))
            outputs["reference"] = nt.LoRACoreTrain().train(host["fp32"], host["clip"], host["vae"], dataset,
                                                            **train_kwargs(output_name="ref", base_quant="nf4",
                                                                           **steps))
        outputs["fp32"] = nt.LoRACoreTrain().train(host["fp32"], host["clip"], host["vae"], dataset,
                                                   **train_kwargs(output_name="full", **steps))
        ours, load_report = node_module("loader").LoRACoreLoaderModelOnly().load(host["fp32"], "bnb.safetensors", 1.0)
    report = outputs["bnb"][5]
    big = [m for m in unet.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= quant.NF4_MIN_VALUES]
    whole = sum(m.in_features % quant.NF4_BLOCK == 0 for m in big)
    assert 0 < whole < len(big), "the tiny UNet should have Linears of both kinds"
    assert f"{whole} Linear layers in NF4" in report and f"{len(big) - whole} Linear layers left as loaded (on the " \
        f"CPU bitsandbytes' NF4 needs an input width that is a multiple of 64)" in report, report
    bnb, ref, full = (outputs[k][2].tensors for k in ("bnb", "reference", "fp32"))
    assert set(bnb) == set(ref) == set(full)
    for key in bnb:
        torch.testing.assert_close(bnb[key], ref[key], rtol=0, atol=0)
    ups = [k for k in bnb if k.endswith("lora_up.weight")]
    assert max((bnb[k].float() - full[k].float()).abs().max().item() for k in ups) > 1e-4, "NF4 changed nothing"
    assert "unmatched" not in load_report and "WARNING" not in load_report, load_report
    # the MODEL output is the file applied to the fp32 model, as the loader applies it
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, context = torch.tensor([500.0]), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))

    def denoise(patcher):
        mm.load_models_gpu([patcher], force_full_load=True)
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context).clone()

    torch.testing.assert_close(denoise(outputs["bnb"][0]), denoise(ours), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(denoise(ours), denoise(host["fp32"]), atol=1e-5)


def test_reference_nf4_codec_follows_bitsandbytes_format():
    codec = ReferenceNF4()
    # a block whose values are exactly code values * 2 (absmax 2): exact round trip, known packing
    index = torch.arange(128) % 16
    weight = (NF4_CODE[index] * 2.0).reshape(4, 32)
    state = codec.quantize(weight)
    packed, absmax, _ = state
    assert packed.dtype == torch.uint8 and packed.numel() == 64 and absmax.tolist() == [2.0, 2.0]
    assert packed[0].item() == (0 << 4 | 1) and packed[7].item() == (14 << 4 | 15)   # first value: high nibble
    torch.testing.assert_close(codec.dequantize(state, torch.float32), weight, rtol=0, atol=0)
    # random weights: every value within half the widest code gap of its block's absmax; odd sizes padded
    w = torch.randn(33, 7, generator=torch.Generator().manual_seed(0))
    state = codec.quantize(w)
    back = codec.dequantize(state, torch.float32)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    block_absmax = state[1].repeat_interleave(64)[: w.numel()].reshape(w.shape)
    assert back.shape == w.shape and state[0].numel() == (w.numel() + 1) // 2 and state[1].numel() == 4
    assert ((back - w).abs() <= block_absmax * half_gap + 1e-6).all()


def test_nf4_base_computes_through_dequantise_and_restores_the_model():
    patcher = tm.comfy_sd15(seed=2)
    unet = patcher.model.diffusion_model
    lt.unlock_inference_params(unet)
    unet.requires_grad_(False)
    original = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    codec = ReferenceNF4()
    big = [m for m in unet.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= quant.NF4_MIN_VALUES]
    assert big
    # the reference: a copy of the UNet whose large Linears hold the NF4 values as plain fp32 weights
    twin = copy.deepcopy(unet)
    twin_layers = dict(twin.named_modules())
    for name, module in unet.named_modules():
        if module in big:
            with torch.no_grad():
                twin_layers[name].weight.copy_(codec.dequantize(codec.quantize(module.weight), torch.float32))
    gen = torch.Generator().manual_seed(4)
    x, t, context = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([600.0, 90.0]), torch.randn(2, 77, 768,
                                                                                                    generator=gen)
    network, twin_network = _network(unet), _network(twin)

    def run(model, net):
        net.inject()
        try:
            net.zero_grad(set_to_none=True)
            out = model(x, t, context=context)
            out.square().mean().backward()
            return out.detach(), _grads(net)
        finally:
            net.restore()

    with quant.FrozenBase([unet], nf4=codec, nf4_roots=[unet]) as frozen:
        report = frozen.report
        ours, ours_grads = run(unet, network)
        network.inject()
        try:
            copies = _saved_weight_copies(lambda: unet(x, t, context=context).square().mean(), big)
        finally:
            network.restore()
    twin_out, twin_grads = run(twin, twin_network)
    plain_out, _ = run(unet, network)                         # after exit: the original weights again
    assert report.nf4 == len(big) and "Linear layers in NF4" in report.describe()
    nf4_bytes = report.bytes_by_dtype["nf4"]
    fp32_bytes = sum(m.weight.numel() * 4 for m in big)
    assert nf4_bytes <= fp32_bytes / 7                        # 4 bits + one fp32 absmax per 64 values
    assert copies == 0
    torch.testing.assert_close(ours, twin_out, rtol=1e-5, atol=1e-6)
    for name, grad in twin_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    assert not torch.allclose(ours, plain_out, atol=1e-4)                               # NF4 did change the base
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in original.items())                 # the originals are back
    assert all("_lora_core_nf4" not in m.__dict__ and m.__dict__.get("forward") is None for m in unet.modules())


# ------------------------------------------------------------------------------------------ LoRA dtype


def test_lora_dtype_bf16_trains_bf16_weights(host, dataset, tmp_path, monkeypatch):
    made = []

    class Recording(lt.LoraTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(nt.lt, "LoraTrainer", Recording)
    with loras_folder(tmp_path):
        out = nt.LoRACoreTrain().train(host["fp8"], host["clip"], host["vae"], dataset,
                                       **train_kwargs(output_name="b", lora_dtype="bf16",
                                                      **{**KWARGS, "steps": 8}))
    assert {p.dtype for p in made[0].network.parameters()} == {torch.bfloat16}
    assert any(p.abs().sum() > 0 for n, p in made[0].network.named_parameters() if "up" in n)   # it trained
    state = comfy.utils.load_torch_file(out[2].path, safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(host["fp32"], None, state, 1.0, 0.0)
    assert len(model.patches) == len({k.split(".")[0] for k in state})
    with pytest.raises(LoraValueError, match=r"LoRA dtype 'fp16' is not one of \['fp32', 'bf16'\]"):
        lt.TrainConfig(lora_dtype="fp16").validate()


# ------------------------------------------------------------------------------------------ a DiT on fp8


def test_flux_on_an_fp8_base_learns_and_loads_on_the_fp32_model(tmp_path, caplog):
    """Tiny Flux.1-dev (tests/test_train_flux.py's host) loaded with fp8 weights the way ComfyUI loads an fp8
    Flux (manual-cast ops, fp32 compute on CPU): flow-matching training through the node keeps it fp8, its
    training loss falls like the fp32 base's does (test_train_flux: last 10 steps ~0.5x the first 10), and the
    file loads on the fp32 model in core with every module."""
    import tests.test_train_flux as tf

    host = tf.Host("flux")
    config = comfy.supported_models.Flux(tm.flux_config())
    config.set_inference_dtype(FP8, mm.unet_manual_cast(FP8, torch.device("cpu"), config.supported_inference_dtypes))
    model = config.get_model({}, device=torch.device("cpu"))
    state = {k: v.detach().to(FP8) for k, v in host.model.model.diffusion_model.state_dict().items()}
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    fp32_model, host.model = host.model, comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                                         offload_device=torch.device("cpu"))
    unet = host.model.model.diffusion_model
    assert model.manual_cast_dtype == torch.float32 and {p.dtype for p in unet.parameters()} == {FP8}
    result = host.train(tmp_path / "loras")
    losses = lt.load_state(str(tmp_path / "loras" / "sq.state.pt"))["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"fp8 Flux: training loss first10 {first:.4f} last10 {last:.4f}")
    assert len(losses) == tf.STEPS and last < 0.85 * first
    assert {p.dtype for p in unet.parameters()} == {FP8} and "layers cast per call" in result[5]
    file_state = comfy.utils.load_torch_file(result[2].path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patched, _ = comfy.sd.load_lora_for_models(fp32_model, None, file_state, 1.0, 0.0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(patched.patches) == len({k.split(".")[0] for k in file_state}) > 0
