"""Parity with ComfyUI core's LoraLoader: same patched keys, same weights (1e-5 relative, fp32).

For SD1.5, SD2 and SDXL tiny models and LoRA files written by independent writers (our kohya writer in LDM
and diffusers naming with LoCon and Tucker convs, LyCORIS for LoRA/LoHa/LoKr/GLoRA/full, PEFT + diffusers
for diffusers files, with and without alphas), at strengths 1.0, 0.5 and -0.7, `LoRACoreLoader` gives the
same MODEL and CLIP weights as core's `load_lora_for_models`.

Not compared with core (documented in README, "Where LoRA Core differs from core"): output-axis DoRA, OFT/BOFT
constraints and strengths, (IA)^3 — those are checked against LyCORIS in test_adapters.py.
"""
from __future__ import annotations

import logging

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import lora_writers as lw
from tests import tiny_models as tm

comfy = import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402

from lora_core.arch import bind_comfy_model  # noqa: E402

STRENGTHS = (1.0, 0.5, -0.7)
# (kohya prefix, ComfyUI CLIP attribute) of each text encoder.
TEXT_ENCODERS = {"sd15": [("lora_te", "clip_l")], "sd2": [("lora_te", "clip_h")],
                 "sdxl": [("lora_te1", "clip_l"), ("lora_te2", "clip_g")]}
BUILDERS = {"sd15": (tm.comfy_sd15, tm.comfy_clip_sd15), "sd2": (tm.comfy_sd2, tm.comfy_clip_sd2),
            "sdxl": (tm.comfy_sdxl, tm.comfy_clip_sdxl)}
KOHYA_UNET = ("transformer_blocks", "proj_in", "proj_out", "in_layers.2", "out_layers.3", "skip_connection",
              "emb_layers.1", "op", "conv")


@pytest.fixture(scope="module")
def hosts():
    cache = {}

    def get(kind):
        if kind not in cache:
            model_builder, clip_builder = BUILDERS[kind]
            cache[kind] = (model_builder(), clip_builder())
        return cache[kind]

    return get


def _is_layer(module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def unet_layers(model) -> dict:
    """The modules kohya's LoRA/LoCon trains: attention, feed-forward, projections, resnet convs."""
    return {name: m for name, m in model.model.diffusion_model.named_modules()
            if _is_layer(m) and any(part in name for part in KOHYA_UNET)}


def te_layers(clip, attribute) -> dict:
    encoder = getattr(clip.cond_stage_model, attribute).transformer
    return {name: m for name, m in encoder.named_modules() if _is_layer(m) and ".encoder.layers." in name}


def kohya_file(kind, model, clip, naming="ldm", tucker=False) -> dict:
    layers = unet_layers(model)
    if tucker:
        layers = {n: m for n, m in layers.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    if naming == "diffusers":
        binding = bind_comfy_model(model.model.state_dict())
        layers = {binding.diffusers[n][0]: m for n, m in layers.items()}
    state = lw.kohya_state_dict(layers, "lora_unet", rank=4, alpha=2.0, seed=1, tucker=tucker)
    for prefix, attribute in TEXT_ENCODERS[kind]:
        state.update(lw.kohya_state_dict(te_layers(clip, attribute), prefix, rank=4, alpha=3.0, seed=2))
    return state


def lycoris_file(kind, model, clip, algo) -> dict:
    state = lw.lycoris_state_dict(model.model.diffusion_model, algo, prefix="lora_unet", rank=4, alpha=2.0, seed=3)
    for prefix, attribute in TEXT_ENCODERS[kind]:
        encoder = getattr(clip.cond_stage_model, attribute).transformer
        te_state = lw.lycoris_state_dict(encoder, algo, prefix=prefix, rank=4, alpha=2.0, seed=4)
        # Core has no alias for text_projection LoRAs (we do); leave them out so the comparison is fair.
        state.update({k: v for k, v in te_state.items() if "text_projection" not in k})
    return state


def diffusers_file(kind, layout, alpha_keys) -> dict:
    state = lw.peft_unet_state_dict(tm.diffusers_twin(kind), rank=4, alpha=8, seed=5, layout=layout,
                                    alpha_keys=alpha_keys)
    encoders = {"sd15": [("text_encoder", 2, "quick_gelu")], "sd2": [("text_encoder", 3, "gelu")],
                "sdxl": [("text_encoder", 3, "quick_gelu"), ("text_encoder_2", 3, "gelu")]}[kind]
    for prefix, layers, act in encoders:
        state.update(lw.peft_text_encoder_state_dict(tm.transformers_clip_twin(32, layers, act), rank=4, alpha=8,
                                                     seed=6, layout=layout, alpha_keys=alpha_keys, prefix=prefix))
    return state


def core_view(state: dict) -> dict:
    """The same tensors under names core 0.3.75 understands. Core only maps diffusers UNet attention LoRAs in
    the old attention-processor spelling (`attn1.processor.to_q`, `to_out` without `.0`), so it cannot read
    PEFT-layout files (`attn1.to_q.lora_A`); we can. Core gets the renamed copy, we get the real file."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("unet."):
            for proj in ("to_q", "to_k", "to_v"):
                key = key.replace(f".{proj}.", f".processor.{proj}.")
            key = key.replace(".to_out.0.", ".processor.to_out.")
        renamed[key] = value
    return renamed


SOURCES = {
    "kohya-ldm": lambda kind, m, c: kohya_file(kind, m, c),
    "kohya-diffusers-names": lambda kind, m, c: kohya_file(kind, m, c, naming="diffusers"),
    "kohya-locon-tucker": lambda kind, m, c: kohya_file(kind, m, c, tucker=True),
    "lycoris-locon": lambda kind, m, c: lycoris_file(kind, m, c, "locon"),
    "lycoris-loha": lambda kind, m, c: lycoris_file(kind, m, c, "loha"),
    "lycoris-lokr": lambda kind, m, c: lycoris_file(kind, m, c, "lokr"),
    "lycoris-glora": lambda kind, m, c: lycoris_file(kind, m, c, "glora"),
    "lycoris-full": lambda kind, m, c: lycoris_file(kind, m, c, "full"),
    "peft": lambda kind, m, c: diffusers_file(kind, "peft", False),
    "diffusers-with-alphas": lambda kind, m, c: diffusers_file(kind, "diffusers", True),
}
# Every writer on SD1.5 and SD2; on SDXL (25 M parameters even when tiny, because core detects SDXL by its exact
# depth lists) the writers that exercise its two text encoders and both UNet namings, to keep CI short.
SDXL_SOURCES = ("kohya-ldm", "kohya-diffusers-names", "lycoris-loha", "lycoris-lokr", "peft", "diffusers-with-alphas")
CASES = [(kind, source) for kind in ("sd15", "sd2") for source in SOURCES] + [("sdxl", s) for s in SDXL_SOURCES]


def bake(patcher) -> dict:
    """Let ComfyUI apply a patcher's patches the way sampling does; return the patched tensors."""
    mm.load_models_gpu([patcher], force_full_load=True)
    state = {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k in patcher.patches}
    mm.unload_all_models()
    return state


def assert_same(ours: dict, core: dict, base: dict, what: str) -> None:
    assert ours.keys() == core.keys(), f"{what}: patched keys differ: {sorted(ours.keys() ^ core.keys())[:5]}"
    changed = 0
    for key in core:
        # 1e-5 relative to the tensor's magnitude (fp32 rounding of two different summation orders).
        scale = core[key].abs().max().item() or 1.0
        error = (ours[key] - core[key]).abs().max().item()
        assert error <= 1e-5 * scale, f"{what}: {key}: max error {error:.3g} vs magnitude {scale:.3g}"
        changed += not torch.equal(core[key], base[key])
    assert changed, f"{what}: the LoRA changed no weight, so the comparison proves nothing"


@pytest.mark.parametrize("kind,source", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_loader_matches_core(hosts, tmp_path, caplog, kind, source):
    model, clip = hosts(kind)
    state = SOURCES[source](kind, model, clip)
    lw.save_safetensors(state, tmp_path / "lora.safetensors")
    base_model = {k: v.clone() for k, v in model.model.state_dict().items()}
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    loader = node_module("loader").LoRACoreLoader()
    with loras_folder(tmp_path):
        for strength in STRENGTHS:
            with caplog.at_level(logging.WARNING):
                caplog.clear()
                core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, core_view(state), strength,
                                                                      strength)
                not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
            assert not_loaded == [], f"core left keys unloaded, the file is not a fair comparison: {not_loaded[:3]}"
            our_model, our_clip, report = loader.load(model, "lora.safetensors", strength, strength, clip=clip)
            assert "unmatched" not in report and "WARNING" not in report, report
            assert_same(bake(our_model), bake(core_model), base_model, f"{kind}/{source}/MODEL@{strength}")
            assert_same(bake(our_clip.patcher), bake(core_clip.patcher), base_clip, f"{kind}/{source}/CLIP@{strength}")
    # The inputs are untouched: loaders return clones and sampling-time patches are undone.
    assert all(torch.equal(v, base_model[k]) for k, v in model.model.state_dict().items())
    assert all(torch.equal(v, base_clip[k]) for k, v in clip.cond_stage_model.state_dict().items())


def test_stack_matches_chained_core_loaders(hosts, tmp_path):
    """ApplyStack (one patch per weight, ranks fused) equals core's LoraLoader chained three times."""
    model, clip = hosts("sd15")
    files = {"a.safetensors": SOURCES["kohya-ldm"]("sd15", model, clip),
             "b.safetensors": SOURCES["lycoris-loha"]("sd15", model, clip),
             "c.safetensors": SOURCES["peft"]("sd15", model, clip)}
    for name, state in files.items():
        lw.save_safetensors(state, tmp_path / name)
    stack = [("a.safetensors", 0.8, 0.6), ("b.safetensors", -0.5, 1.0), ("c.safetensors", 1.2, 0.3)]
    core_model, core_clip = model, clip
    for name, sm, sc in stack:
        core_model, core_clip = comfy.sd.load_lora_for_models(core_model, core_clip, core_view(files[name]), sm, sc)
    with loras_folder(tmp_path):
        our_model, our_clip, report = node_module("loader").LoRACoreApplyStack().apply(model, stack, clip=clip)
    assert report.count("LoRA: ") == 3
    assert all(len(p) == 1 for p in our_model.patches.values()), "a stack must be one patch per weight"
    base = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert_same(bake(our_model), bake(core_model), base, "stack/MODEL")
    base_clip = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    assert_same(bake(our_clip.patcher), bake(core_clip.patcher), base_clip, "stack/CLIP")
