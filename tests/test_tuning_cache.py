"""CPU tests of the on-disk autotuning results (``flashserve.kernels.tuning_cache``) and of the prefill config
pruning. Real ``triton.autotune`` objects over trivial kernels, never launched: the tests write their ``cache``
directly; the GPU name is replaced, so a ``cuda`` device persists without a GPU."""
import json
import logging
import os
import threading

import pytest
import torch
import triton
import triton.language as tl

from flashserve.kernels import tuning_cache
from flashserve.kernels.prefill_tuning import TUNED_CONFIGS, prune_configs
from flashserve.kernels.tuning_cache import PersistentTuning

CUDA = torch.device("cuda", 0)
KEY = (0, 2, 128, 2, 1, True, 2, 16, False, True, False, False, "torch.bfloat16", "torch.int32")


def _fill(x_ptr, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 1.0, mask=offs < n)


def _fill_twice(x_ptr, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 2.0, mask=offs < n)


def make_tuner(fn=_fill, blocks=(16, 32, 64)):
    """A fresh Autotuner (fresh Config objects too) over a jit-compiled ``fn``."""
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in blocks]
    return triton.autotune(configs=configs, key=["n", "FLAG"])(triton.jit(fn))


@pytest.fixture(autouse=True)
def _cuda_without_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter never persists
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(tuning_cache, "_REGISTRY", [])  # save_all sees this test's kernels only


def test_round_trip_keeps_key_types():
    tuner = make_tuner()
    other_key = (3, False, "torch.float16")
    tuner.cache[KEY] = tuner.configs[2]
    tuner.cache[other_key] = tuner.configs[0]
    saver = PersistentTuning("fill", tuner)
    assert saver.save(CUDA)
    assert os.path.dirname(saver.path(CUDA)) == os.path.join(os.environ["FLASHSERVE_CACHE_DIR"], "autotune")

    fresh = make_tuner()
    assert PersistentTuning("fill", fresh).load(CUDA) == 2
    assert fresh.cache == {KEY: fresh.configs[2], other_key: fresh.configs[0]}
    assert all(fresh.cache[k] is fresh.configs[i] for k, i in ((KEY, 2), (other_key, 0)))
    for key in fresh.cache:
        original = KEY if key == KEY else other_key
        assert [type(v) for v in key] == [type(v) for v in original]


def test_memory_wins_over_file_and_fallback_configs_are_not_stored():
    tuner = make_tuner()
    tuner.cache[KEY] = tuner.configs[1]
    tuner.cache[(7, True)] = triton.Config({"BLOCK": 8})  # not in the config list: a pruning fallback
    PersistentTuning("fill", tuner).save(CUDA)
    fresh = make_tuner()
    fresh.cache[KEY] = fresh.configs[0]
    assert PersistentTuning("fill", fresh).load(CUDA) == 0
    assert fresh.cache == {KEY: fresh.configs[0]}


def test_any_change_gives_another_file(monkeypatch):
    def path(name="fill", fn=_fill, blocks=(16, 32, 64), depends=()):
        return PersistentTuning(name, make_tuner(fn, blocks), depends).path(CUDA)

    paths = [path(), path(name="other"), path(blocks=(16, 32)), path(blocks=(32, 16, 64)), path(fn=_fill_twice),
             path(depends=[make_tuner])]
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    paths.append(path())
    monkeypatch.setattr(tuning_cache, "gpu_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    paths.append(path())
    assert len(set(paths)) == len(paths)


def test_source_hash_is_the_jit_cache_key():
    jitted = triton.runtime.jit.JITFunction(_fill)
    assert tuning_cache.source_hash(jitted) == jitted.cache_key
    assert tuning_cache.source_hash(_fill) != tuning_cache.source_hash(_fill_twice)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"entries": 3}', '{"entries": [[1, 2, 3], "x"]}',
                                     "\udcff"])
def test_corrupt_file_is_ignored(content):
    tuner = make_tuner()
    saver = PersistentTuning("fill", tuner)
    os.makedirs(os.path.dirname(saver.path(CUDA)))
    with open(saver.path(CUDA), "w", errors="surrogateescape") as f:
        f.write(content)
    assert saver.load(CUDA) == 0 and tuner.cache == {}
    tuner.cache[KEY] = tuner.configs[1]
    assert saver.save(CUDA)
    assert PersistentTuning("fill", make_tuner()).load(CUDA) == 1


def test_out_of_range_and_malformed_entries_are_skipped():
    saver = PersistentTuning("fill", make_tuner())
    os.makedirs(os.path.dirname(saver.path(CUDA)))
    entries = [[[1, True], 3], [[2, True], -1], [[3, True], True], [[4, [5]], 0], [[5, True], 2]]
    with open(saver.path(CUDA), "w") as f:
        json.dump({"entries": entries}, f)
    fresh = make_tuner()
    assert PersistentTuning("fill", fresh).load(CUDA) == 1
    assert fresh.cache == {(5, True): fresh.configs[2]}


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    saver = PersistentTuning("fill", make_tuner())
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert saver.path(CUDA).startswith(os.path.join(str(tmp_path / "elsewhere"), "autotune", "fill-"))
    assert saver.path(CUDA).endswith(".json")
    monkeypatch.delenv("FLASHSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert saver.path(CUDA).startswith(os.path.join(str(tmp_path / "home"), ".cache", "flashserve", "autotune"))


def test_savers_merge():
    first, second = make_tuner(), make_tuner()
    first.cache[(1, True)] = first.configs[0]
    second.cache[(2, False)] = second.configs[1]
    PersistentTuning("fill", first).save(CUDA)
    PersistentTuning("fill", second).save(CUDA)
    fresh = make_tuner()
    PersistentTuning("fill", fresh).load(CUDA)
    assert fresh.cache == {(1, True): fresh.configs[0], (2, False): fresh.configs[1]}


def test_concurrent_savers_keep_every_entry():
    savers = []
    for i in range(8):
        tuner = make_tuner()
        tuner.cache[(i, True)] = tuner.configs[i % 3]
        savers.append(PersistentTuning("fill", tuner))
    threads = [threading.Thread(target=saver.save, args=(CUDA,)) for saver in savers for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fresh = make_tuner()
    assert PersistentTuning("fill", fresh).load(CUDA) == 8
    assert not [name for name in os.listdir(os.path.dirname(savers[0].path(CUDA))) if name.endswith(".tmp")]


def test_unwritable_dir_warns(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLASHSERVE_CACHE_DIR", str(blocker))
    tuner = make_tuner()
    tuner.cache[KEY] = tuner.configs[0]
    saver = PersistentTuning("fill", tuner)
    with caplog.at_level(logging.WARNING, logger="flashserve"):
        assert not saver.save(CUDA)
    assert "could not save the autotuning results of fill" in caplog.text
    assert saver.load(CUDA) == 0


def test_cpu_and_interpreter_do_not_persist(monkeypatch, tmp_path):
    tuner = make_tuner()
    tuner.cache[KEY] = tuner.configs[0]
    saver = PersistentTuning("fill", tuner)
    assert not saver.save(torch.device("cpu")) and saver.load(torch.device("cpu")) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not saver.save(CUDA)
    assert not (tmp_path / "cache").exists()


class _FakeAutotuner:
    """The attributes PersistentTuning uses; a launch tunes the key it is given."""

    def __init__(self):
        self.configs = make_tuner().configs
        self.fn, self.keys, self.cache = _fill, ["n"], {}

    def __getitem__(self, grid):
        def run(key):
            self.cache.setdefault(key, self.configs[1])
        return run


def test_launch_loads_once_and_saves_new_keys(monkeypatch):
    tuner = _FakeAutotuner()
    tuning = PersistentTuning("fake", tuner)
    calls = []
    monkeypatch.setattr(tuning, "load", lambda device: calls.append("load") or tuning.devices.add(device))
    monkeypatch.setattr(tuning, "save", lambda device: calls.append("save"))
    for key in [(1,), (1,), (2,), (1,), (2,)]:
        tuning.launch(CUDA, None, key)
    assert calls == ["load", "save", "save"]


def test_save_all_saves_launched_devices():
    tuner = _FakeAutotuner()
    tuning = PersistentTuning("fake", tuner)
    tuning.load(CUDA)
    tuner.cache[(9,)] = tuner.configs[2]
    tuning_cache.save_all()
    fresh = _FakeAutotuner()
    assert PersistentTuning("fake", fresh).load(CUDA) == 1 and fresh.cache == {(9,): fresh.configs[2]}


def _block_ms(block_d, heads_per_tile, tune_seqlen_q, dtype=torch.bfloat16):
    named_args = {"q_ptr": torch.empty(1, dtype=dtype), "tune_seqlen_q": tune_seqlen_q, "tune_seqlen_k": 0}
    kept = prune_configs(TUNED_CONFIGS, named_args, BLOCK_D=block_d, HEADS_PER_TILE=heads_per_tile)
    return sorted({c.kwargs["BLOCK_M"] for c in kept}), len(kept)


def test_short_queries_without_packing_drop_128_row_tiles():
    assert _block_ms(128, heads_per_tile=1, tune_seqlen_q=0) == ([64], 1)
    assert _block_ms(256, heads_per_tile=1, tune_seqlen_q=0) == ([64], 1)
    assert _block_ms(64, heads_per_tile=1, tune_seqlen_q=0)[0] == [64]
    assert _block_ms(128, heads_per_tile=4, tune_seqlen_q=0)[0] == [64, 128]  # GQA packing fills 128 rows
    assert _block_ms(128, heads_per_tile=1, tune_seqlen_q=1)[0] == [64, 128]
