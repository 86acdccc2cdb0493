"""read_lora_file / save_lora_file / LoraFileCache / lora_metadata_summary."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from lora_core import io as lio
from lora_core.errors import LoraFileError, LoraValueError
from lora_core.io import LoraFileCache, lora_metadata_summary, read_lora_file, save_lora_file
from lora_core.types import LoraFile
from tests import lora_writers as lw


def small_lora(seed: int = 0, rank: int = 2) -> dict:
    return lw.kohya_state_dict({"a.to_q": torch.nn.Linear(8, 8), "a.to_k": torch.nn.Linear(8, 4)},
                               rank=rank, seed=seed)


def assert_error(call, path, *phrases):
    with pytest.raises(LoraFileError) as info:
        call()
    message = str(info.value)
    assert os.fspath(path) in message
    for phrase in phrases:
        assert phrase.lower() in message.lower(), (phrase, message)
    return message


def leftover_files(folder) -> list:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------- reading: good


def test_read_safetensors_with_metadata(tmp_path):
    sd = small_lora()
    path = lw.save_safetensors(sd, tmp_path / "x.safetensors", {"ss_network_dim": "2"})
    lora = read_lora_file(path)
    assert lora.path == path and lora.metadata == {"ss_network_dim": "2"}
    assert set(lora.tensors) == set(sd)
    assert all(torch.equal(lora.tensors[k], sd[k]) for k in sd)


@pytest.mark.parametrize("ext", [".pt", ".ckpt", ".bin", ".pth"])
def test_read_pickle_flat_and_nested(tmp_path, ext):
    sd = small_lora()
    flat = tmp_path / f"flat{ext}"
    torch.save(sd, flat)
    assert set(read_lora_file(flat).tensors) == set(sd)
    nested = tmp_path / f"nested{ext}"
    torch.save({"state_dict": sd, "epoch": 3}, nested)
    lora = read_lora_file(nested)
    assert set(lora.tensors) == set(sd) and lora.metadata == {"epoch": "3"}


def test_ia3_file_with_plain_weight_keys_is_not_a_checkpoint(tmp_path):
    sd = lw.lycoris_state_dict(torch.nn.Sequential(torch.nn.Linear(4, 4)), "ia3")
    assert any(k.endswith(".weight") for k in sd)
    path = lw.save_safetensors(sd, tmp_path / "ia3.safetensors")
    assert set(read_lora_file(path).tensors) == set(sd)


# ------------------------------------------------------------------------------------------- reading: bad


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    assert_error(lambda: read_lora_file(path), path, "does not exist")


def test_directory(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert_error(lambda: read_lora_file(folder), folder, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_error(lambda: read_lora_file(path), path, "empty", "download")


def test_truncated_safetensors(tmp_path):
    path = lw.save_safetensors(small_lora(rank=8), tmp_path / "cut.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    assert_error(lambda: read_lora_file(path), path, "truncated", "download")


def test_corrupt_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(16) + b"\x00" * 100)
    assert_error(lambda: read_lora_file(path), path, "download")
    header = tmp_path / "bad_json.safetensors"
    body = b"{not json at all}"
    header.write_bytes(len(body).to_bytes(8, "little") + body)
    assert_error(lambda: read_lora_file(header), header, "header is corrupt")


def test_zero_tensors(tmp_path):
    path = lw.save_safetensors({}, tmp_path / "none.safetensors", {"ss_network_dim": "4"})
    assert_error(lambda: read_lora_file(path), path, "no tensors")


def test_non_tensor_values(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"x.lora_up.weight": torch.ones(2, 2), "step": 5}, path)
    assert_error(lambda: read_lora_file(path), path, "'step'", "not a tensor")
    not_dict = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_dict)
    assert_error(lambda: read_lora_file(not_dict), not_dict, "not a dict")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_names_first_bad_key(tmp_path, bad):
    sd = small_lora()
    key = sorted(sd)[1]
    sd[key] = sd[key].clone()
    sd[key][0, 0] = bad
    path = lw.save_safetensors(sd, tmp_path / "nan.safetensors")
    assert_error(lambda: read_lora_file(path), path, repr(key), "nan or infinite")


@pytest.mark.parametrize("keys", [
    ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
    ["conv_in.weight", "conv_in.bias", "down_blocks.0.resnets.0.norm1.weight"],
])
def test_full_checkpoint_is_refused(tmp_path, keys):
    path = lw.save_safetensors({k: torch.ones(2) for k in keys}, tmp_path / "ckpt.safetensors")
    assert_error(lambda: read_lora_file(path), path, "full checkpoint", "checkpoint loader")


def test_unknown_extension(tmp_path):
    path = tmp_path / "lora.gguf"
    path.write_bytes(b"1234")
    assert_error(lambda: read_lora_file(path), path, "unknown lora file extension", ".safetensors")


class _Payload:
    """Pickling this object stores a call to exec that would write a marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"x.lora_up.weight": torch.ones(1), "payload": _Payload(str(marker))}, path)
    assert_error(lambda: read_lora_file(path), path, "pickled code", "safetensors")
    assert not marker.exists()


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"this is not a torch file at all" * 4)
    assert_error(lambda: read_lora_file(path), path, "corrupt")
    bad_opcode = tmp_path / "opcode.pt"
    bad_opcode.write_bytes(b"\x80\x02\xfe\xfe" + b"\x00" * 32)
    message = assert_error(lambda: read_lora_file(bad_opcode), bad_opcode, "corrupt")
    assert "pickled code" not in message


# ------------------------------------------------------------------------------------------- saving


def test_save_round_trip_with_metadata(tmp_path):
    sd = small_lora()
    sd["a_t.lora_down.weight"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    assert not sd["a_t.lora_down.weight"].is_contiguous()
    meta = {"ss_network_dim": 2, "ss_network_alpha": 1.5, "flag": True, "none": None, "tags": {"a": 1},
            "text": "hello"}
    path = save_lora_file(tmp_path / "out.safetensors", sd, meta)
    assert path == str(tmp_path / "out.safetensors")
    lora = read_lora_file(path)
    assert all(torch.equal(lora.tensors[k], sd[k]) for k in sd)
    assert lora.metadata == {"ss_network_dim": "2", "ss_network_alpha": "1.5", "flag": "True", "none": "None",
                             "tags": json.dumps({"a": 1}), "text": "hello"}
    assert leftover_files(tmp_path) == ["out.safetensors"]


def test_save_shared_storage_tensors(tmp_path):
    base = torch.randn(4, 4)
    path = save_lora_file(tmp_path / "s.safetensors", {"x.lora_up.weight": base, "y.lora_up.weight": base[:2]})
    lora = read_lora_file(path)
    assert torch.equal(lora.tensors["y.lora_up.weight"], base[:2])


def test_save_refuses_overwrite(tmp_path):
    path = tmp_path / "exists.safetensors"
    save_lora_file(path, small_lora(seed=0))
    before = path.read_bytes()
    assert_error(lambda: save_lora_file(path, small_lora(seed=1)), path, "already exists", "overwrite")
    assert path.read_bytes() == before
    save_lora_file(path, small_lora(seed=1), overwrite=True)
    assert path.read_bytes() != before
    assert torch.equal(read_lora_file(path).tensors["lora_unet_a_to_q.lora_up.weight"],
                       small_lora(seed=1)["lora_unet_a_to_q.lora_up.weight"])
    assert leftover_files(tmp_path) == ["exists.safetensors"]


def test_save_bad_tensor_value_leaves_nothing(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(LoraValueError) as info:
        save_lora_file(path, {"x.lora_up.weight": [1.0, 2.0]})
    assert str(path) in str(info.value) and "x.lora_up.weight" in str(info.value)
    with pytest.raises(LoraValueError, match="metadata 'obj'"):
        save_lora_file(path, small_lora(), {"obj": object()})
    assert leftover_files(tmp_path) == []


def test_save_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    path = tmp_path / "fail.safetensors"
    assert_error(lambda: save_lora_file(path, small_lora()), path, "disk full", "nothing was written")
    assert leftover_files(tmp_path) == []
    # an existing file survives a failed overwrite untouched
    monkeypatch.undo()
    save_lora_file(path, small_lora())
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(LoraFileError):
        save_lora_file(path, small_lora(seed=3), overwrite=True)
    assert path.read_bytes() == before and leftover_files(tmp_path) == ["fail.safetensors"]


def test_save_bad_paths(tmp_path):
    assert_error(lambda: save_lora_file(tmp_path / "x.pt", small_lora()), tmp_path / "x.pt", ".safetensors")
    missing = tmp_path / "no_such_dir" / "x.safetensors"
    assert_error(lambda: save_lora_file(missing, small_lora()), missing, "does not exist")


# ------------------------------------------------------------------------------------------- cache


def _write(path, seed, rank=2):
    return lw.save_safetensors(small_lora(seed=seed, rank=rank), path)


def test_cache_hit_miss_and_invalidation(tmp_path):
    path = _write(tmp_path / "a.safetensors", 0)
    cache = LoraFileCache(max_bytes=10 ** 7)
    first = cache.get(path)
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.get(path) is first and cache.hits == 1
    assert path in cache and len(cache) == 1
    _write(path, 1, rank=3)  # same path, new content and size
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    second = cache.get(path)
    assert second is not first and cache.misses == 2
    assert second.tensors["lora_unet_a_to_q.lora_down.weight"].shape[0] == 3
    assert len(cache) == 1  # the stale entry was dropped
    assert cache.total_bytes == lio.lora_file_bytes(second)


def test_cache_lru_eviction_by_bytes(tmp_path):
    paths = [_write(tmp_path / f"{i}.safetensors", i) for i in range(3)]
    size = lio.lora_file_bytes(read_lora_file(paths[0]))
    cache = LoraFileCache(max_bytes=2 * size)
    cache.get(paths[0])
    cache.get(paths[1])
    cache.get(paths[0])  # 0 becomes most recent; 1 is now least recent
    cache.get(paths[2])
    assert paths[0] in cache and paths[2] in cache and paths[1] not in cache
    assert cache.total_bytes == 2 * size
    tiny = LoraFileCache(max_bytes=size - 1)
    assert tiny.get(paths[0]).tensors and len(tiny) == 0  # bigger than the budget: returned, not kept


def test_cache_is_thread_safe(tmp_path):
    paths = [_write(tmp_path / f"{i}.safetensors", i) for i in range(4)]
    size = lio.lora_file_bytes(read_lora_file(paths[0]))
    cache = LoraFileCache(max_bytes=3 * size)
    errors = []

    def worker(offset):
        try:
            for step in range(40):
                lora = cache.get(paths[(step + offset) % 4])
                assert lora.tensors
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.total_bytes <= 3 * size and cache.total_bytes == len(cache) * size
    assert cache.hits + cache.misses == 240


def test_cache_errors_name_the_path(tmp_path):
    cache = LoraFileCache(max_bytes=100)
    path = tmp_path / "gone.safetensors"
    assert_error(lambda: cache.get(path), path, "does not exist")


def test_default_cache_budget_from_env(monkeypatch):
    monkeypatch.setenv("LORA_CORE_CACHE_MB", "16")
    assert lio._cache_budget_bytes() == 16 * 1024 * 1024
    monkeypatch.setenv("LORA_CORE_CACHE_MB", "lots")
    assert lio._cache_budget_bytes() == 2048 * 1024 * 1024
    monkeypatch.delenv("LORA_CORE_CACHE_MB")
    assert lio._cache_budget_bytes() == 2048 * 1024 * 1024
    assert isinstance(lio.default_cache, LoraFileCache)


# ------------------------------------------------------------------------------------------- metadata summary


def test_summary_from_kohya_metadata():
    meta = {
        "ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_network_module": "networks.lora",
        "ss_output_name": "myChar", "ss_steps": "1500", "ss_epoch": "10", "ss_learning_rate": "0.0001",
        "ss_tag_frequency": json.dumps({"10_mychar": {"mychar": 30, "1girl": 28, "smile": 5},
                                        "5_extra": {"1girl": 4, "outdoors": 6}}),
        "ss_dataset_dirs": json.dumps({"10_mychar": {"n_repeats": 10, "img_count": 30}}),
        "modelspec.trigger_phrase": "mychar style, glowing", "ss_training_finished_at": "0",
        "sshs_model_hash": "abc123", "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_clip_skip": "None",
    }
    summary = lora_metadata_summary(LoraFile(path="x", tensors={}, metadata=meta))
    assert summary["base_model"] == "SDXL" and summary["base_model_source"] == "metadata"
    assert summary["rank"] == 16 and summary["alpha"] == 8.0 and summary["algorithm"] == "lora"
    assert summary["title"] == "myChar" and summary["output_name"] == "myChar"
    assert summary["steps"] == 1500 and summary["epochs"] == 10 and summary["learning_rate"] == 1e-4
    assert summary["top_tags"][:2] == [["1girl", 32], ["mychar", 30]]
    assert summary["class_tokens"] == ["mychar"]
    assert summary["trigger_words"][:3] == ["mychar style", "glowing", "mychar"]
    assert "1girl" in summary["trigger_words"]
    assert summary["trained_at"].startswith("1970-01-01")
    assert summary["hash"] == "abc123" and summary["sd_model_name"] == "sd_xl_base_1.0.safetensors"
    assert "clip_skip" not in summary  # "None" means not set


def test_summary_lycoris_args_and_datasets():
    meta = {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": "lokr", "dora_wd": "True", "factor": "8"}),
            "ss_datasets": json.dumps([{"subsets": [{"class_tokens": "ohwx dog"}]}]),
            "ss_network_dim": "Dynamic", "modelspec.title": "Dog"}
    summary = lora_metadata_summary(LoraFile(path="x", tensors={}, metadata=meta))
    assert summary["algorithm"] == "lokr+dora" and summary["network_args"]["factor"] == "8"
    assert summary["trigger_words"] == ["ohwx dog"] and summary["rank"] == "Dynamic" and summary["title"] == "Dog"
    assert summary["base_model"] == ""


def test_summary_base_model_from_keys(unet):
    sd1 = lw.kohya_state_dict(lw.unet_targets(unet, ("attn2.to_k",)))
    assert lora_metadata_summary(LoraFile(None, sd1))[("base_model")] == "SD1.x"
    peft = lw.peft_unet_state_dict(unet, target_modules=("to_k",))
    assert lora_metadata_summary(LoraFile(None, peft))["base_model"] == "SD1.x"
    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(1)}
    summary = lora_metadata_summary(LoraFile(None, sdxl))
    assert summary["base_model"] == "SDXL" and summary["base_model_source"] == "keys"
    assert summary["trigger_words"] == []


@pytest.fixture(scope="module")
def unet():
    return lw.tiny_unet()
