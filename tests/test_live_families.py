"""Live LoRA mode on every DiT family and SDXL, in the real ComfyUI 0.3.75 host (tiny models built with ComfyUI's
own classes, tests/tiny_*.py).

Per family, the merged nodes are the reference (they equal core's loader: tests/test_parity_core.py and each
family's test file), and the live nodes must give the same denoiser prediction (`BaseModel.apply_model` after
ComfyUI loads the MODEL as a sampler does, with the family's own `extra_conds`) and the same text-encoder
hidden states (every encoder of the family's CLIP) to fp32 rounding:

* one LoRA on every Linear / Conv layer of the denoiser and of every text encoder, at 1.0 and -0.6;
* a block stack of two: the first LoRA block-weighted by a named vector that addresses the *element kinds* of
  the family's fused weights (Flux / Chroma / Flux.2 / HunyuanVideo single blocks: linear1's attention and MLP
  rows, linear2's attention and MLP columns; SD3's x / context blocks; Lumina's GQA qkv), the second a
  *row-slice* LoRA (diffusers' `to_q` alone: only the q rows of the fused qkv / linear1), which must go live;
* a plain stack of the same two, then Bake: its weights equal the merged stack's bit for bit.

LoRA names: ComfyUI's generic keys (comfy/lora.py `model_lora_keys_unet`: `diffusion_model.<weight path>`;
`model_lora_keys_clip`: `text_encoders.<weight path>`, "generic lora format without any weird key names") with
kohya's `lora_up` / `lora_down` / `alpha` suffixes; the row-slice LoRA uses diffusers / PEFT names
(`transformer.<diffusers path>.lora_A.weight`, the family file's own alias of that fused part).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests import lora_writers as lw
from tests import tiny_flux2 as tf2
from tests import tiny_hidream as thd
from tests import tiny_hunyuan_video as thv
from tests import tiny_lumina as tl
from tests import tiny_models as tm
from tests import tiny_qwen_image as tq
from tests import tiny_sd3 as t3
from tests import tiny_wan as tw
from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from lora_core.arch.bindings import bind_comfy_model  # noqa: E402
from lora_core.live import module_key  # noqa: E402

live = node_module("live")
loader = node_module("loader")
bw = node_module("block_weight")

# of the output's largest value: fp32 rounding of W x + U(D x) against (W + U D) x through a whole model. CPUs'
# fp32 kernels round differently (the deepest case, Lumina 2's Gemma-2 text encoder in a block stack: under 1e-5 on an
# Intel Xeon, 1.25e-5 on an AMD EPYC); a wrong live path is off by about the LoRA's effect (6.6 there, against 1.9e-4)
TOLERANCE = 3e-5


def _r(gen, *shape):
    return torch.randn(*shape, generator=gen)


# family -> (model, clip, conditioning kwargs for extra_conds, latent frames (video) or None)
FAMILIES = {
    "sdxl": (tm.comfy_sdxl, tm.comfy_clip_sdxl,
             lambda g: dict(cross_attn=_r(g, 1, 6, 2048), pooled_output=_r(g, 1, 1280), width=64, height=64), None),
    "sd3": (t3.comfy_sd3, t3.comfy_clip_sd3, lambda g: dict(cross_attn=_r(g, 1, 6, 32), pooled_output=_r(g, 1, 48)),
            None),
    "qwen_image": (tq.comfy_qwen_image, tq.comfy_clip_qwen_image, lambda g: dict(cross_attn=_r(g, 1, 6, 32)), 1),
    "chroma": (tm.comfy_chroma, tm.comfy_clip_chroma,
               lambda g: dict(cross_attn=_r(g, 1, 6, 32), pooled_output=_r(g, 1, 32)), None),
    "flux2": (tf2.comfy_flux2, tf2.comfy_clip_flux2,
              lambda g: dict(cross_attn=_r(g, 1, 6, 32), pooled_output=_r(g, 1, 32), guidance=3.5), None),
    "wan": (tw.comfy_wan, tw.comfy_clip_wan, lambda g: dict(cross_attn=_r(g, 1, 6, 32)), 2),
    # Z-Image's adaLN reads min(dim, 256) features of a 256-wide time embedding: a forward needs dim 256.
    "z_image": (lambda: tl.comfy_z_image(dim=256), tl.comfy_clip_z_image, lambda g: dict(cross_attn=_r(g, 1, 6, 32)),
                None),
    "lumina2": (tl.comfy_lumina2, tl.comfy_clip_lumina2, lambda g: dict(cross_attn=_r(g, 1, 6, 32)), None),
    "hunyuan_video": (thv.comfy_hunyuan_video, thv.comfy_clip_hunyuan_video,
                      lambda g: dict(cross_attn=_r(g, 1, 6, 32), pooled_output=_r(g, 1, 32), guidance=6.0), 2),
    "hidream": (thd.comfy_hidream, thd.comfy_clip_hidream,
                lambda g: dict(cross_attn=_r(g, 1, 6, 32), pooled_output=_r(g, 1, 64),
                               conditioning_llama3=_r(g, 1, 2, 6, 32)), None),
}

# Families whose denoiser has a weight fused over parts of different element kinds (rows and columns).
MIXED_KIND_FUSED = {"chroma", "flux2", "hunyuan_video"}
FUSED = MIXED_KIND_FUSED | {"sd3", "z_image", "lumina2"}


# ------------------------------------------------------------------------------------------- LoRA files

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def generic_lora(root: torch.nn.Module, prefix: str, rank: int, seed: int, alpha: float = 2.0) -> dict:
    """`<prefix><path>.lora_up/lora_down.weight` + `.alpha` for every Linear and (ungrouped) Conv layer."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, layer in root.named_modules():
        if isinstance(layer, torch.nn.Linear):
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        elif isinstance(layer, _CONVS) and layer.groups == 1:
            kernel = tuple(layer.weight.shape[2:])
            down, up = (rank, layer.in_channels) + kernel, (layer.out_channels, rank) + (1,) * len(kernel)
        else:
            continue
        state[f"{prefix}{path}.lora_down.weight"] = 0.1 * torch.randn(*down, generator=gen)
        state[f"{prefix}{path}.lora_up.weight"] = 0.1 * torch.randn(*up, generator=gen)
        state[f"{prefix}{path}.alpha"] = torch.tensor(float(alpha))
    return state


def binding(model):
    sd = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    return bind_comfy_model(sd, model.model.model_config.unet_config,
                            config_name=type(model.model.model_config).__name__)


def fused_target(bound):
    """(module, alias of its first part) of the denoiser's first fused weight, preferring one whose parts have
    different element kinds; None when the family fuses nothing."""
    fused = [(c, m) for (c, _), m in bound.modules.items() if len(m.parts) > 1]
    if not fused:
        return None
    mixed = [(c, m) for c, m in fused if len({p.kind for p in m.parts}) > 1]
    component, module = (mixed or fused)[0]
    first = module.parts[0]
    for alias in bound.aliases_of(component, module):
        if alias.name.startswith("transformer.") and alias.pieces == ((first.start, 0, first.length),):
            return module, alias
    raise AssertionError(f"{module.path}: no diffusers alias for its rows {first}")


def row_slice_lora(model, module, alias, rank: int = 4, seed: int = 0) -> dict:
    """A PEFT LoRA on one part of a fused weight only (diffusers `to_q` = the q rows of ComfyUI's qkv)."""
    gen = torch.Generator().manual_seed(seed)
    weight = comfy.utils.get_attr(model.model.diffusion_model, module.path + ".weight")
    rows = alias.rows or alias.pieces[0][2]
    return {f"{alias.name}.lora_A.weight": 0.1 * torch.randn(rank, weight.shape[1], generator=gen),
            f"{alias.name}.lora_B.weight": 0.1 * torch.randn(rows, rank, generator=gen)}


def element_vector(bound, module) -> str:
    """A named vector that gives blocks and element kinds their own factors: one block (the fused module's)
    gets one factor per element kind of its modules (the fused module's part kinds first, then linear2's
    column kinds, then the others: SD3's x / context streams), the last block 0.5, the one before 0."""
    layout = bound.arch.layout
    present = {m.block for m in bound.modules.values()}
    blocks = [b for b in layout.blocks if b in present and b not in layout.te_blocks and b not in layout.other_blocks]
    block = module.block if module is not None else blocks[0]
    entries = [f"{blocks[-1]}=0.5", f"{blocks[-2]}=0"]
    kinds = [p.kind for p in module.parts] if module is not None else []
    in_block = [m for m in bound.modules.values() if m.block == block]
    kinds += [p.kind for m in in_block for p in m.col_parts] + [m.kind for m in in_block]
    kinds = list(dict.fromkeys(kinds))
    entries += [f"{block}.{kind}={value}" for kind, value in zip(kinds, (0.3, -0.5, 1.5, 0.25))]
    return ", ".join(entries)


# -------------------------------------------------------------------------------------------- outputs

def prediction(name: str, patcher) -> torch.Tensor:
    """The denoiser's output for fixed inputs after ComfyUI loads `patcher` as a sampler does."""
    with torch.no_grad():
        mm.load_models_gpu([patcher], force_full_load=True)
    base = patcher.model
    gen = torch.Generator().manual_seed(3)
    frames = FAMILIES[name][3]
    x = _r(gen, 1, base.latent_format.latent_channels, *(() if frames is None else (frames,)), 8, 8)
    extra = base.extra_conds(noise=x, device=x.device, **FAMILIES[name][2](gen))
    kwargs = {k: c.process_cond(batch_size=1, area=None, device=x.device).cond for k, c in extra.items()}
    with torch.inference_mode():
        return base.apply_model(x, torch.tensor([0.7]), **kwargs).clone()


TOKENS = torch.arange(77).remainder(200).add(1).unsqueeze(0)   # below every tiny vocabulary's size


def encoded(clip) -> torch.Tensor:
    """The last hidden states of every text encoder of the CLIP, concatenated, after ComfyUI loads it."""
    with torch.no_grad():
        mm.load_models_gpu([clip.patcher], force_full_load=True)
    outs = []
    with torch.inference_mode():
        for _, encoder in clip.cond_stage_model.named_modules():
            if isinstance(encoder, comfy.sd1_clip.SDClipModel):
                outs.append(encoder.transformer(TOKENS, None)[0].float().reshape(-1))
    assert outs, "no text encoder found"
    return torch.cat(outs)


def assert_equal(got, want, base, what):
    effect = (want - base).abs().max().item()
    error = (got - want).abs().max().item()
    assert effect > 1e-3, f"{what}: the LoRA barely changes the output ({effect:.3g}); the test proves nothing"
    scale = want.abs().max().item()
    assert error <= TOLERANCE * scale, (f"{what}: live differs from merged by {error:.3g} (LoRA effect {effect:.3g}, "
                                        f"outputs up to {scale:.3g})")


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    with loras_folder(tmp_path_factory.mktemp("live_families")) as path:
        yield path


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, folder):
    name = request.param
    make_model, make_clip, _, _ = FAMILIES[name]
    model, clip = make_model(), make_clip()
    bound = binding(model)
    target = fused_target(bound)
    assert (target is not None) == (name in FUSED), (name, target)
    full = {**generic_lora(model.model.diffusion_model, "diffusion_model.", 4, 1),
            **generic_lora(clip.cond_stage_model, "text_encoders.", 4, 2)}
    lw.save_safetensors(full, folder / f"{name}_full.safetensors")
    if target is not None:
        second = row_slice_lora(model, *target, seed=5)
    else:   # no fused weight: a rank-8 LoRA on the denoiser's Linear layers only
        second = {k: v for k, v in generic_lora(model.model.diffusion_model, "diffusion_model.", 8, 5).items()
                  if not k.startswith(("diffusion_model.input_blocks.0.", "diffusion_model.out."))}
    lw.save_safetensors(second, folder / f"{name}_second.safetensors")
    folder_paths.filename_list_cache.clear()
    base = prediction(name, model), encoded(clip)
    mm.unload_all_models()
    yield SimpleNamespace(name=name, model=model, clip=clip, bound=bound, target=target, base=base,
                          full=f"{name}_full.safetensors", second=f"{name}_second.safetensors")
    mm.unload_all_models()


def _live_layers(patcher):
    return {name[:-len(".forward")]: f for name, f in live._live_forwards(patcher).items()}


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("strength", (1.0, -0.6))
def test_single_lora_with_clip_equals_merged(fam, strength):
    merged, merged_clip, _ = loader.LoRACoreLoader().load(fam.model, fam.full, strength, strength, fam.clip)
    ours, ours_clip, report = live.LoRACoreLoaderLive().load(fam.model, fam.full, strength, strength, fam.clip)
    assert "merged instead" not in report, report
    assert not ours.patches and not ours_clip.patcher.patches, "every layer of a plain LoRA must go live"
    # Every patched tensor of the merged loader is a live layer (same key set, nothing dropped).
    layers = set(_live_layers(ours)) | set(_live_layers(ours_clip.patcher))
    merged_modules = {module_key(k) for k in merged.patches} | \
        {module_key(k) for k in merged_clip.patcher.patches}
    assert layers == merged_modules, sorted(layers ^ merged_modules)[:5]
    assert_equal(prediction(fam.name, ours), prediction(fam.name, merged), fam.base[0], f"{fam.name} denoiser")
    assert_equal(encoded(ours_clip), encoded(merged_clip), fam.base[1], f"{fam.name} text encoders")
    mm.unload_all_models()
    # The input model is untouched once the live clone is unloaded (ComfyUI restores the object patches).
    assert torch.equal(prediction(fam.name, fam.model), fam.base[0])
    assert torch.equal(encoded(fam.clip), fam.base[1])
    mm.unload_all_models()


def test_block_weighted_stack_with_element_kinds_and_row_slice_equals_merged(fam):
    vector = element_vector(fam.bound, fam.target[0] if fam.target else None)
    rows = [bw.make_row(fam.full, 0.9, 0.7, bw.BlockSettings("named", vector)),
            bw.make_row(fam.second, -0.8, 0.0, bw.BlockSettings())]
    merged, merged_clip, _ = bw.LoRACoreApplyBlockStack().apply(fam.model, rows, fam.clip)
    ours, ours_clip, table = live.LoRACoreApplyBlockStackLive().apply(fam.model, rows, fam.clip)
    assert "merged instead" not in table and not ours.patches, table
    layers = _live_layers(ours)
    if fam.target is not None:
        module, alias = fam.target
        # The row-slice LoRA is live on the fused weight: its up factor is zero outside the q rows.
        fused = layers[f"diffusion_model.{module.path}"]
        part = module.parts[0]
        terms = {}   # LoRA module name -> its columns of the layer's concatenated up factor
        for group in (g for layer in fused.layers for g in layer.groups):
            offsets = [0] + list(torch.tensor(group.factors.ranks).cumsum(0).tolist())
            for lora_module, start, stop in zip(group.factors.keep, offsets, offsets[1:]):
                terms[lora_module.name] = group.factors.up[:, start:stop]
        up = terms.get(alias.name)
        assert up is not None, f"{module.path}: the row-slice LoRA {alias.name} is not live ({sorted(terms)})"
        assert up[part.stop:].abs().sum() == 0 and up[:part.stop].abs().min() > 0, f"{alias.name}: not q rows only"
    if fam.name in MIXED_KIND_FUSED:
        # The vector gives linear2's attention and MLP columns their own factors: a column-factor group.
        assert any(g.cols_at is not None for f in layers.values() for layer in f.layers for g in layer.groups)
    # The vector changes the outputs (it is not all ones where the LoRA is).
    plain, _, _ = live.LoRACoreApplyStackLive().apply(fam.model, [(fam.full, 0.9, 0.7), (fam.second, -0.8, 0.0)])
    weighted = prediction(fam.name, ours)
    assert (weighted - prediction(fam.name, plain)).abs().max() > 1e-3, f"{vector}: no effect"
    assert_equal(weighted, prediction(fam.name, merged), fam.base[0], f"{fam.name} block stack ({vector})")
    assert_equal(encoded(ours_clip), encoded(merged_clip), fam.base[1], f"{fam.name} text encoders, block stack")
    mm.unload_all_models()


def test_stack_equals_merged_and_bake_equals_merged_weights(fam):
    stack = [(fam.full, 0.6, -0.4), (fam.second, 1.1, 0.0)]
    merged, merged_clip, _ = loader.LoRACoreApplyStack().apply(fam.model, stack, fam.clip)
    ours, ours_clip, report = live.LoRACoreApplyStackLive().apply(fam.model, stack, fam.clip)
    assert "merged instead" not in report and not ours.patches, report
    assert_equal(prediction(fam.name, ours), prediction(fam.name, merged), fam.base[0], f"{fam.name} stack")
    assert_equal(encoded(ours_clip), encoded(merged_clip), fam.base[1], f"{fam.name} text encoders, stack")
    baked, baked_clip, report = live.LoRACoreBakeLive().bake(ours, ours_clip)
    assert not live._live_forwards(baked) and not live._live_forwards(baked_clip.patcher), report
    pairs = (("MODEL", baked, merged), ("CLIP", baked_clip.patcher, merged_clip.patcher))
    for what, got_patcher, want_patcher in pairs:
        mm.load_models_gpu([want_patcher], force_full_load=True)
        want = {k: v.clone() for k, v in want_patcher.model.state_dict().items()}
        mm.load_models_gpu([got_patcher], force_full_load=True)
        got = got_patcher.model.state_dict()
        changed = [k for k in want if not torch.equal(want[k], got[k])]
        assert not changed, f"{fam.name} {what}: baked weights differ from the merged stack's at {changed[:3]}"
        mm.unload_all_models()
    assert torch.equal(prediction(fam.name, baked), prediction(fam.name, merged))
    mm.unload_all_models()
