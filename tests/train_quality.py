"""How much a training run teaches a model its training images, measured the same way for any trainer: the
denoising error on the training latents, with fixed noise at a fixed set of sigmas, through ComfyUI's own
`apply_model` (the path a sampler takes), in x0 space and in the model's own prediction space (eps or v).

Used by tests/test_train_quality.py and bench/train_bench.py. The host is a tiny SD1.5 (comfy.supported_models.SD15,
context 32) + tiny CLIP + a TAESD-architecture VAE, all real ComfyUI objects with seeded random weights, made
into a working denoiser first (`pretrain_unet`): a random UNet's error is dominated by a miscalibration that any
adapter removes in a few steps, which says nothing about learning the images. The VAE's latent scale is set so
that the UNet sees unit-variance latents, as SD1.5 does with its real VAE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.comfy_host import import_comfy
from tests import tiny_models as tm

EVAL_PERCENTS = tuple((k + 0.5) / 8 for k in range(8))   # sigma 10.2 ... 0.26 on SD1.5's schedule
EVAL_SEED = 123


def tiny_vae(latent_std: float = 1.0):
    """A real comfy.sd.VAE (TAESD architecture, random weights) whose latents, after the model's
    process_latent_in, have standard deviation `latent_std` on generic images (None: TAESD's own scale)."""
    comfy = import_comfy()
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    tm.seed_weights(taesd, 0)
    state = taesd.state_dict()
    state["vae_shift"] = torch.tensor(0.0)
    state["vae_scale"] = torch.tensor(1.0)
    if latent_std is not None:
        vae = comfy.sd.VAE(sd=dict(state))
        raw = vae.encode(generic_images(16, seed=99)).std().item() * 0.18215  # SD1.5's process_latent_in
        state["vae_scale"] = torch.tensor(raw / latent_std)
    return comfy.sd.VAE(sd=state)


def tiny_sd15(context_dim: int = 32):
    """Tiny SD1.5 ModelPatcher whose cross-attention width matches the tiny CLIP."""
    comfy = import_comfy()
    config = comfy.supported_models.SD15(tm.unet_config_sd15(context_dim=context_dim))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu")).to(torch.float32)
    tm.seed_weights(model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def generic_images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    """IMAGE batch (n, size, size, 3): random background colour with two random rectangles each."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 1, 3, generator=gen).expand(n, size, size, 3).clone()
    for i in range(n):
        for _ in range(2):
            w, h = (size // 8 + torch.randint(0, size // 2, (2,), generator=gen)).tolist()
            x, y = torch.randint(0, size - size // 8, (2,), generator=gen).tolist()
            images[i, y:y + h, x:x + w] = torch.rand(3, generator=gen)
    return images


def target_images(n: int = 6, size: int = 64) -> torch.Tensor:
    """The images to learn: a grey field with one square, its colour and place changing per image."""
    gen = torch.Generator().manual_seed(0)
    images = torch.full((n, size, size, 3), 0.5)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9]])
    side = size * 7 // 16
    for i in range(n):
        offset = size // 8 + (size // 16) * i
        images[i, offset:offset + side, offset:offset + side] = colours[i % len(colours)]
    return (images + 0.02 * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def pretrain_unet(patcher, vae, clip, steps: int = 300, batch: int = 8, lr: float = 1e-3, images: int = 64,
                  seed: int = 2) -> None:
    """Full fine-tune of the UNet on generic images (eps objective, uniform timesteps): a working denoiser."""
    latents = patcher.model.process_latent_in(vae.encode(generic_images(images)).detach())
    context = clip.encode_from_tokens(clip.tokenize("a photo")).detach()
    unet = patcher.model.diffusion_model
    sigmas = patcher.model.model_sampling.sigmas.float()
    alphas = 1 / (1 + sigmas ** 2)
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters())
    with torch.inference_mode(False), torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            index = torch.randint(0, latents.shape[0], (batch,), generator=gen)
            t = torch.randint(0, sigmas.shape[0], (batch,), generator=gen)
            noise = torch.randn(latents[index].shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents[index] + (1 - a).sqrt() * noise
            pred = unet(noisy, t.float(), context=context.expand(batch, -1, -1), transformer_options={})
            loss = torch.mean((pred - noise) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for p in params:
            p.requires_grad_(False)


@dataclass
class DenoiseError:
    x0: float                 # mean over sigmas of the x0 MSE
    pred: float               # mean over sigmas of the MSE in the model's own prediction space (eps or v)
    x0_per_sigma: list
    pred_per_sigma: list
    sigmas: list

    def reduction(self, after: "DenoiseError") -> dict:
        """Relative reductions (fractions) of `after` against self: x0, prediction space, and the mean of the
        per-sigma reductions (the same in both spaces: one sigma's x0 error is sigma^2 times its eps error)."""
        per_sigma = [1 - a / b for a, b in zip(after.pred_per_sigma, self.pred_per_sigma)]
        return {"x0": 1 - after.x0 / self.x0, "pred": 1 - after.pred / self.pred,
                "per_sigma": sum(per_sigma) / len(per_sigma), "per_sigma_list": per_sigma}


def denoise_error(patcher, latents: torch.Tensor, context: torch.Tensor, percents=EVAL_PERCENTS,
                  seed: int = EVAL_SEED) -> DenoiseError:
    """The denoising error of `patcher` (loaded the way a sampler loads it) on `latents` (VAE output, LATENT
    space), conditioned on `context`, with noise drawn from `seed` at the sigmas of `percents`."""
    import_comfy()
    import comfy.model_management as mm
    import comfy.model_sampling as ms

    mm.load_models_gpu([patcher], force_full_load=True)
    base = patcher.model
    x0 = base.process_latent_in(latents)
    v_pred = isinstance(base.model_sampling, ms.V_PREDICTION)
    gen = torch.Generator().manual_seed(seed)
    x0_errors, pred_errors, sigmas = [], [], []
    for percent in percents:
        sigma = float(base.model_sampling.percent_to_sigma(percent))
        noise = torch.randn(x0.shape, generator=gen)
        noisy = x0 + noise * sigma
        with torch.no_grad():
            denoised = base.apply_model(noisy, torch.full((x0.shape[0],), sigma),
                                        c_crossattn=context.expand(x0.shape[0], -1, -1))
        x0_errors.append(torch.mean((denoised - x0) ** 2).item())
        # the model's output in its own space, recovered from the denoised estimate (ComfyUI's EPS/V formulas)
        if v_pred:
            scale = (sigma ** 2 + 1) ** 0.5
            v_true, v_hat = (noise - sigma * x0) / scale, (noisy - denoised * (sigma ** 2 + 1)) / (sigma * scale)
            pred_errors.append(torch.mean((v_hat - v_true) ** 2).item())
        else:
            pred_errors.append(torch.mean(((noisy - denoised) / sigma - noise) ** 2).item())
        sigmas.append(sigma)
    return DenoiseError(sum(x0_errors) / len(x0_errors), sum(pred_errors) / len(pred_errors), x0_errors,
                        pred_errors, sigmas)


def train_core(patcher, latents: torch.Tensor, context: torch.Tensor, steps: int, lr: float, rank: int,
               seed: int = 0, batch_size: int = 1):
    """ComfyUI core's TrainLoraNode on the same latents (one LATENT per image: 0.3.75 fails on a single batch)
    and conditioning, fp32; its batch order and sigmas use torch's global RNG, seeded here. Returns
    (MODEL, lora state dict)."""
    import_comfy()
    import comfy_extras.nodes_train as nodes_train

    torch.manual_seed(seed)
    out = nodes_train.TrainLoraNode.execute(
        model=[patcher], latents=[{"samples": l[None]} for l in latents], positive=[[[context, {}]]],
        batch_size=[batch_size], steps=[steps], grad_accumulation_steps=[1], learning_rate=[lr], rank=[rank],
        optimizer=["AdamW"], loss_function=["MSE"], seed=[seed], training_dtype=["fp32"], lora_dtype=["fp32"],
        algorithm=["LoRA"], gradient_checkpointing=[False], existing_lora=["[None]"])
    result = out.result if hasattr(out, "result") else out
    return result[0], result[1]


@dataclass
class Host:
    model: object
    clip: object
    vae: object
    images: torch.Tensor
    latents: torch.Tensor      # LATENT space (vae.encode), as core's node and a sampler get them
    context: torch.Tensor

    def error(self, patcher) -> DenoiseError:
        return denoise_error(patcher, self.latents, self.context)


def build_host(pretrain_steps: int = 300, pretrain_batch: int = 8, caption: str = "sks square",
               n_images: int = 6, size: int = 64) -> Host:
    import_comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # core's tqdm bar per step
    model, clip, vae = tiny_sd15(), tm.comfy_clip_sd15(), tiny_vae()
    if pretrain_steps:
        pretrain_unet(model, vae, clip, steps=pretrain_steps, batch=pretrain_batch)
    images = target_images(n_images, size)
    latents = vae.encode(images).detach()
    context = clip.encode_from_tokens(clip.tokenize(caption)).detach()
    return Host(model, clip, vae, images, latents, context)
