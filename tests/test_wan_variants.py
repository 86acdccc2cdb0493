"""Wan's other model classes in the real host (ComfyUI 0.3.75, tiny models from its own classes: tests/
tiny_wan_variants.py): VACE, Fun Camera (2.1 and 2.2), S2V, HuMo, Animate.

* recognition of each as its own variant (ComfyUI's model_detection markers), with the key map a superset of core's
  and every host tensor addressable (no tensor of the model is left without a name);
* ComfyUI-native LoRAs on every Linear and full diffs on every tensor (core reads both: its generic map) equal
  core (1e-5 of the delta at 1.0 and -0.6, same patched keys; the modulations, which ComfyUI's ModelPatcher never
  writes, against core's own patch math: tests/test_flux.py `bake`);
* DiffSynth-Studio's bare VACE names (`--lora_base_model vace`, PEFT adapter names kept) and PEFT on diffusers'
  own WanVACETransformer3DModel, which core cannot read, equal core on the same tensors under `diffusion_model.`;
* a VACE LoRA on a plain Wan model applies its base-block modules and reports the VACE ones as made for VACE;
  without a model its VACE names make it a VACE file;
* block layouts: VACE blocks `V00`-..., the adapters' `AUX`, HuMo's `audio_attn` kind, in named syntax;
* a merge of a VACE file keeps its VACE modules (kohya names core reads).
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.comfy_host import import_comfy
from tests.pack import core_drops, host, loras_folder, node_module
from tests import dit_writers as dw
from tests import lora_writers as lw
from tests import tiny_wan as tw
from tests import tiny_wan_variants as tv
from tests import wan_writers as ww
from tests.test_flux import assert_same, bake, compare

comfy = import_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_core.arch import registry  # noqa: E402
from lora_core.arch.families.wan import (WAN21_CAMERA, WAN22_ANIMATE, WAN22_CAMERA, WAN22_S2V,  # noqa: E402
                                         WAN_HUMO, WAN_VACE_1_3B, WAN_VACE_14B, WAN_T2V_14B, WAN21_T2V_1_3B)
from lora_core.io import read_lora_file  # noqa: E402

VARIANTS = {"vace": WAN_VACE_14B, "camera": WAN21_CAMERA, "camera-2.2": WAN22_CAMERA, "s2v": WAN22_S2V,
            "humo": WAN_HUMO, "animate": WAN22_ANIMATE}


class _NoClip:
    class cond_stage_model:   # noqa: N801
        @staticmethod
        def state_dict():
            return {}


_MODELS: dict = {}


def model_of(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = tv.comfy_wan_variant(kind)
    return _MODELS[kind]


@pytest.fixture(scope="module")
def vace():
    return model_of("vace")


@pytest.fixture(scope="module")
def t2v():
    return tw.comfy_wan("t2v")


# ------------------------------------------------------------------------------------- recognition, key map

@pytest.mark.parametrize("kind", list(KINDS := tv.KINDS))
def test_variant_key_map_is_a_superset_of_cores_and_names_every_tensor(kind):
    model = model_of(kind)
    km = host(model).key_map
    assert km.arch is VARIANTS[kind] and km.conflicts == []
    sd = model.model.state_dict()
    theirs = comfy.lora.model_lora_keys_unet(model.model, {})
    checked = 0
    for alias, key in theirs.items():
        key = key if isinstance(key, str) else key[0]
        if key in sd:
            ours = km.resolve(alias)
            assert ours is not None and key in ours.host_keys and ours.pieces is None, (alias, key)
            checked += 1
    assert checked > 100
    hosted = {k for t in km.targets for k in t.host_keys} | {t.host_key for t in km.param_targets}
    params = {key for key in sd if km.resolve(key) is not None}
    left = [k for k in sd if k.startswith("diffusion_model.") and k not in hosted and k not in params]
    assert left == [], f"{kind}: tensors with no name: {left[:5]}"


def test_variant_specific_modules_blocks_and_kinds():
    cases = {
        "vace": [("diffusion_model.vace_blocks.1.self_attn.q", "V01", "self_attn"),
                 ("vace_blocks.0.before_proj", "V00", "vace_proj"),
                 ("transformer.vace_blocks.1.proj_out", "V01", "vace_proj"),
                 ("transformer.vace_blocks.0.attn2.to_k", "V00", "cross_attn"),
                 ("diffusion_model.vace_blocks.1.modulation", "V01", "mod"),
                 ("lora_unet_vace_patch_embedding", "IN", "vace_embed")],
        "camera": [("lora_unet_control_adapter_conv", "AUX", "control"),
                   ("diffusion_model.control_adapter.residual_blocks.0.conv2", "AUX", "control")],
        "s2v": [("diffusion_model.audio_injector.injector.1.q", "AUX", "audio"),
                ("diffusion_model.casual_audio_encoder.encoder.padding_tokens", "AUX", "audio"),
                ("cond_encoder", "AUX", "cond"), ("lora_unet_trainable_cond_mask", "AUX", "cond")],
        "humo": [("diffusion_model.blocks.1.audio_cross_attn_wrapper.audio_cross_attn.k", "B01", "audio_attn"),
                 ("lora_unet_audio_proj_audio_proj_glob_2_layer", "AUX", "audio")],
        "animate": [("diffusion_model.face_adapter.fuser_blocks.0.linear1_kv", "AUX", "face"),
                    ("diffusion_model.motion_encoder.enc.fc.0", "AUX", "motion"),
                    ("diffusion_model.pose_patch_embedding", "AUX", "pose")],
    }
    for kind, rows in cases.items():
        km = host(model_of(kind)).key_map
        for name, block, element in rows:
            target = km.resolve(name)
            assert target is not None, (kind, name)
            assert (target.block, target.kind) == (block, element), (kind, name, target)
    assert WAN_VACE_14B.blocks[-10:] == tuple(f"V{i:02d}" for i in range(8)) + ("OUT",) or \
        WAN_VACE_14B.blocks[-9:] == tuple(f"V{i:02d}" for i in range(8)) + ("OUT",)
    assert len(WAN_VACE_1_3B.block_groups["V"]) == 15 and WAN_VACE_1_3B.blocks[-2:] == ("V14", "OUT")
    assert WAN22_S2V.blocks[-2:] == ("AUX", "OUT") and "AUX" not in WAN_T2V_14B.blocks
    assert WAN_T2V_14B.blocks == ("TE1", "IN") + tuple(f"B{i:02d}" for i in range(40)) + ("OUT",)


# ------------------------------------------------------------------------------------- writers core reads

def _native_all(model, seed):
    """ComfyUI-native LoRA on every Linear of the model (base blocks, VACE blocks, adapters)."""
    return dw.comfy_native(model, seed=seed)


def _diffs_all(model, seed, only=None):
    state = ww.full_diffs(model, seed=seed)
    if only is not None:
        state = {k: v for k, v in state.items() if re.search(only, k)}
    return state


# the adapters' full diffs on the two big fixed-size models are limited to the modules of interest
DIFF_SUBSETS = {"humo": r"blocks\.|audio_proj\.audio_proj_glob_[23]|head", "animate": r"blocks\.1\.|face_adapter|"
                r"pose_patch|motion_encoder\.enc\.fc\.[01]\.|motion_encoder\.dec\.direction|head"}


@pytest.mark.parametrize("kind", list(tv.KINDS))
def test_native_and_full_diffs_equal_core(kind, tmp_path, caplog):
    model = model_of(kind)
    native = _native_all(model, seed=1)
    if kind in ("humo", "animate"):
        native = {k: v for k, v in native.items() if re.search(DIFF_SUBSETS[kind], k)}
    reports = compare((model, _NoClip), tmp_path, caplog, native)
    assert VARIANTS[kind].title.split(" (")[0] in reports[0]
    diffs = _diffs_all(model, seed=2, only=DIFF_SUBSETS.get(kind))
    assert not core_drops(model, None, diffs)
    compare((model, _NoClip), tmp_path, caplog, diffs)


# ------------------------------------------------------------------------------------- writers core cannot read

def _diffsynth_vace(model, seed=3):
    """DiffSynth's VACE LoRA: PEFT (adapter name kept) on its VACE model's `vace_blocks` q/k/v/o/ffn.0/ffn.2,
    saved bare (remove_prefix_in_ckpt "pipe.vace.")."""
    vace_net = torch.nn.ModuleDict({"vace_blocks": ww.net(model).vace_blocks})
    return ww.peft_on(vace_net, r"vace_blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|vace_blocks\.\d+\.ffn\.[02]",
                      rank=4, alpha=4, seed=seed, adapter_names=True)


def test_diffsynth_vace_lora_core_cannot_read_equals_core_renamed(vace, tmp_path, caplog):
    state = _diffsynth_vace(vace)
    assert any(k.startswith("vace_blocks.1.self_attn.q.lora_A.default.") for k in state)
    assert core_drops(vace, None, state)
    truth = {"diffusion_model." + k.replace(".default.", "."): v for k, v in state.items()}
    compare((vace, _NoClip), tmp_path, caplog, state, core_state=truth)


def _diffusers_vace_twin():
    from diffusers import WanVACETransformer3DModel

    from tests.tiny_models import CPU, seed_weights

    model = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=tw.HEADS,
                                      attention_head_dim=tw.DIM // tw.HEADS, in_channels=16, out_channels=16,
                                      text_dim=tw.TEXT, freq_dim=256, ffn_dim=tw.FFN, num_layers=tw.DEPTH,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", vace_layers=[0, 1],
                                      vace_in_channels=96)
    return seed_weights(model.to(CPU, torch.float32), 4).eval()


def _original_vace(diffusers_path: str) -> str:
    m = re.match(r"vace_blocks\.(\d+)\.(.+)$", diffusers_path)
    if m:
        proj = {"proj_in": "before_proj", "proj_out": "after_proj"}.get(m.group(2))
        if proj:
            return f"vace_blocks.{m.group(1)}.{proj}"
        return "vace_" + ww.original_name(f"blocks.{m.group(1)}.{m.group(2)}")
    return ww.original_name(diffusers_path)


def test_diffusers_vace_peft_equals_core_on_original_names(vace, tmp_path, caplog):
    twin = _diffusers_vace_twin()
    state = ww.diffusers_peft(twin, seed=5, targets=("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                      "ffn.net.2", "proj_in", "proj_out"))
    state = {k: v for k, v in state.items() if ".vace_blocks." in k or ".blocks." in k}
    assert any(".vace_blocks.0.proj_in." in k for k in state) and any(".vace_blocks.1.proj_out." in k for k in state)
    assert core_drops(vace, None, state)
    truth = {}
    for key, value in state.items():
        module, _, suffix = key[len("transformer."):].partition(".lora_")
        truth[f"diffusion_model.{_original_vace(module)}.lora_{suffix}"] = value
    compare((vace, _NoClip), tmp_path, caplog, state, core_state=truth)


# ------------------------------------------------------------------------------------- fit, blocks, merge

def test_vace_lora_on_plain_wan_applies_the_base_blocks_and_says_why(vace, t2v, tmp_path):
    """A file of base-block modules with a few VACE ones: the base blocks apply, the VACE modules are reported as
    made for VACE. A file of VACE modules only is refused, naming VACE. Without a model, VACE names make a VACE
    file and a file without them is a plain Wan one."""
    base_blocks = {k: v for k, v in ww.musubi(vace, seed=6).items() if "vace" not in k}
    few = {k: v for k, v in _diffsynth_vace(vace, seed=7).items() if k.startswith("vace_blocks.0.self_attn.")}
    lw.save_safetensors({**base_blocks, **few}, tmp_path / "v.safetensors")
    lw.save_safetensors(_diffsynth_vace(vace, seed=8), tmp_path / "mostly.safetensors")
    lw.save_safetensors(base_blocks, tmp_path / "p.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    with loras_folder(tmp_path):
        ours, report = loader.load(t2v, "v.safetensors", 1.0)
        with pytest.raises(Exception, match="made for Wan VACE"):
            loader.load(t2v, "mostly.safetensors", 1.0)
    assert "made for Wan VACE" in report and "vace_blocks" in report
    assert any(".blocks.0.self_attn.q." in k for k in ours.patches)
    assert not any("vace" in k for k in ours.patches)
    assert registry.detect_lora(read_lora_file(tmp_path / "v.safetensors")) is WAN_VACE_14B
    assert registry.detect_lora(read_lora_file(tmp_path / "p.safetensors")) is WAN_T2V_14B


def test_named_syntax_on_vace_and_aux_blocks(vace, tmp_path):
    state = {**dw.comfy_native(vace, seed=9)}
    lw.save_safetensors(state, tmp_path / "n.safetensors")
    bw = node_module("block_weight").LoRACoreBlockWeight()
    with loras_folder(tmp_path):
        off = bw.load(vace, "n.safetensors", 1.0, 0.0, "named", "custom", "V*=0, V00.vace_proj=0.5", 0, 1.0, 1.0,
                      False)[0]
    keys = set(off.patches)
    assert not any(k.startswith("diffusion_model.vace_blocks.1.") for k in keys)
    assert "diffusion_model.vace_blocks.0.before_proj.weight" in keys
    assert "diffusion_model.vace_blocks.0.self_attn.q.weight" not in keys
    assert "diffusion_model.blocks.1.self_attn.q.weight" in keys
    camera = model_of("camera")
    gen = torch.Generator().manual_seed(10)
    diff = {f"diffusion_model.control_adapter.{p}.diff": 0.01 * torch.randn(w.shape, generator=gen)
            for p, w in ((n.rpartition(".")[0], t) for n, t in ww.net(camera).control_adapter.named_parameters()
                         if n.endswith("weight"))}
    diff.update(dw.comfy_native(camera, seed=11, layers=dw.linear_layers(ww.net(camera), include=("blocks.0.",))))
    lw.save_safetensors(diff, tmp_path / "c.safetensors")
    with loras_folder(tmp_path):
        aux_off = bw.load(camera, "c.safetensors", 1.0, 0.0, "named", "custom", "AUX=0", 0, 1.0, 1.0, False)[0]
    assert not any("control_adapter" in k for k in aux_off.patches) and aux_off.patches


def test_merge_keeps_vace_modules(vace, tmp_path):
    state = {**{k: v for k, v in ww.musubi(vace, seed=12).items() if "vace" not in k}, **_diffsynth_vace(vace, seed=13),
             **_diffs_all(vace, seed=14, only=r"vace_blocks\.0\.modulation|vace_patch_embedding")}
    lw.save_safetensors(state, tmp_path / "s.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    base = {k: v.clone() for k, v in vace.model.state_dict().items()}
    with loras_folder(tmp_path):
        path, text = node_module("mix").LoRACoreMergeSave().merge("exact", 0, 0.0, "vm", False, "auto", "fp32",
                                                                  lora_stack=[("s.safetensors", 0.8, 0.0)],
                                                                  model=vace)["result"]
        source, _ = loader.load(vace, "s.safetensors", 0.8)
        merged_ours, _ = loader.load(vace, "vm.safetensors", 1.0)
    merged = comfy.utils.load_torch_file(path, safe_load=True)
    assert any(k.startswith("lora_unet_vace_blocks_1_self_attn_q.") for k in merged)
    assert "diffusion_model.vace_blocks.0.modulation.diff" in merged
    core, _ = comfy.sd.load_lora_for_models(vace, None, merged, 1.0, 0.0)
    want = bake(source)
    assert "diffusion_model.vace_patch_embedding.weight" in want
    assert_same(bake(merged_ours), want, base, "merged file in our loader")
    assert_same(bake(core), want, base, "merged file in core's loader")
