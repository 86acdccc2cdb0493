"""HunyuanVideo 1.5 block weights and merges on a tiny `supported_models.HunyuanVideo15` (tests/tiny_hunyuan_video.py):
named syntax over its double blocks and its 1.5 input modules (`byt5_in`, `vision_in`, `cond_type_embedding` in
`IN`), and a merge of a musubi 1.5 split-q/k/v file plus a block-weighted native file, which core and our loader
read back to the source's weights, with musubi's 1.5 metadata.
"""
from __future__ import annotations

import pytest

from tests.comfy_host import import_comfy
from tests.pack import loras_folder, node_module
from tests import hunyuan_video_writers as hw
from tests import lora_writers as lw
from tests import tiny_hunyuan_video as th
from tests.test_flux import assert_same, bake

comfy = import_comfy()
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


@pytest.fixture(scope="module")
def hv15():
    return th.comfy_hunyuan_video_15()


def test_named_block_weights_on_15(hv15, tmp_path):
    native = hw.comfy_native(hv15, seed=1)
    lw.save_safetensors(native, tmp_path / "n.safetensors")
    bw = node_module("block_weight").LoRACoreBlockWeight()
    with loras_folder(tmp_path):
        ours = bw.load(hv15, "n.safetensors", 1.0, 0.0, "named", "custom", "DB00=0, IN=0", 0, 1.0, 1.0, False)[0]
    keys = set(ours.patches)
    assert not any(k.startswith(("diffusion_model.double_blocks.0.", "diffusion_model.byt5_in.",
                                 "diffusion_model.vision_in.", "diffusion_model.img_in.")) for k in keys)
    assert any(k.startswith("diffusion_model.double_blocks.1.") for k in keys)
    assert any(k.startswith("diffusion_model.final_layer.") for k in keys)


def test_merge_of_musubi_15_and_block_weighted_native_reads_back(hv15, tmp_path):
    split, _ = hw.musubi_split_qkv(hv15, seed=2)
    lw.save_safetensors(split, tmp_path / "a.safetensors", {"ss_base_model_version": "hunyuan_video_1_5"})
    lw.save_safetensors(hw.comfy_native(hv15, seed=3), tmp_path / "b.safetensors")
    loader = node_module("loader").LoRACoreLoaderModelOnly()
    base = {k: v.clone() for k, v in hv15.model.state_dict().items()}
    with loras_folder(tmp_path):
        path, text = node_module("mix").LoRACoreMergeSave().merge(
            "exact", 0, 0.0, "hm", False, "auto", "fp32", lora_stack=[("a.safetensors", 0.8, 0.0),
                                                                  ("b.safetensors", -0.5, 0.0)], model=hv15)["result"]
        a, _ = loader.load(hv15, "a.safetensors", 0.8)
        both, _ = loader.load(a, "b.safetensors", -0.5)
        merged_ours, _ = loader.load(hv15, "hm.safetensors", 1.0)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert "HunyuanVideo 1.5" in text and meta["ss_base_model_version"] == "hunyuan_video_1_5", meta
    merged = comfy.utils.load_torch_file(path, safe_load=True)
    assert any("byt5_in" in k for k in merged) and any("double_blocks_0_img_attn_qkv" in k for k in merged)
    core, _ = comfy.sd.load_lora_for_models(hv15, None, merged, 1.0, 0.0)
    want = bake(both)
    assert_same(bake(merged_ours), want, base, "merged file in our loader")
    assert_same(bake(core), want, base, "merged file in core's loader")
