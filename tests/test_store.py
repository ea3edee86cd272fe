"""The activation store (data/store.py): extraction matches the model, the cache round-trips and
rejects corrupt or mismatched folders, batches cover every activation once per epoch and resume."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from switch_sae_core.config import DataConfig
from switch_sae_core.data import lm, store as store_mod, text
from switch_sae_core.data.source import BatchSource
from switch_sae_core.data.store import ActivationStore

N_TRAIN = 1000


@pytest.fixture(scope="module")
def tiny():
    return lm.load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return DataConfig(model="tiny-random", layer=1, context_len=32, n_train_tokens=N_TRAIN, n_eval_tokens=100,
                      model_batch_size=8, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def built(cfg, tiny):
    return ActivationStore.build_or_load(cfg, model=tiny, progress=False)


def test_stored_activations_are_the_models(built, tiny):
    """Every row equals the model's activation at its recorded (context, position); BOS dropped."""
    assert isinstance(built, BatchSource) and built.d_in == tiny.d_model and len(built) == N_TRAIN
    tokens = torch.from_numpy(np.asarray(built.train_tokens, dtype=np.int64))
    acts = tiny.activations(tokens, "blocks.1.hook_resid_post")
    rows = np.array(built.train_rows)
    torch.testing.assert_close(built.activations(np.arange(N_TRAIN)), acts[rows[:, 0], rows[:, 1]])
    assert (tokens[rows[:, 0], rows[:, 1]] != tiny.tokenizer.bos_token_id).all()
    assert (np.diff(rows[:, 0] * 32 + rows[:, 1]) > 0).all()  # rows in stream order, no repeats
    # held-out split: its activations match too
    ev = built.eval_tokens
    assert ev.shape == (4, 32)  # ceil(100 / 32) contexts
    ev_acts = tiny.activations(ev, "blocks.1.hook_resid_post")
    ev_rows = np.array(built.eval_rows)
    torch.testing.assert_close(built.eval_activations(), ev_acts[ev_rows[:, 0], ev_rows[:, 1]])
    assert len(built.eval_activations(10)) == 10


def test_eval_and_train_are_consecutive_disjoint_parts_of_the_stream(built, tiny, cfg):
    reference = text.contexts(text.documents(cfg.dataset, cfg.seed), tiny.tokenizer, 32, True)
    expected = torch.stack([next(reference) for _ in range(4 + len(built.train_tokens))])
    got = torch.cat([built.eval_tokens, torch.from_numpy(np.asarray(built.train_tokens, dtype=np.int64))])
    assert torch.equal(got, expected)


def test_manifest_records_what_was_built(built):
    m = built.manifest
    assert (m["model"], m["hook"], m["n_train_tokens"], m["d_model"], m["dtype"]) == (
        "tiny-random", "blocks.1.hook_resid_post", N_TRAIN, 64, "float32")
    assert sum(s["rows"] for s in m["shards"]) == N_TRAIN and m["versions"]["torch"]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_second_call_loads_the_cache(built, cfg):
    again = ActivationStore.build_or_load(cfg, progress=False)
    assert again.path == built.path
    assert again.manifest["created"] == built.manifest["created"]


def test_context_of_shows_the_rows_token(built, tiny):
    strs, pos = built.context_of(123)
    ids, pos2 = built.context_ids(123)
    ctx, p = (int(v) for v in built.train_rows[123])
    assert pos == pos2 == p and len(strs) == 32 and strs[0] == "<bos>"
    assert strs[pos] == tiny.tokenizer.str_tokens([built.train_tokens[ctx, p]])[0]
    assert built.decode(ids) == tiny.tokenizer.decode(ids)


# --- batches ------------------------------------------------------------------------------------------


def test_every_activation_exactly_once_per_epoch(built):
    bs = 96  # does not divide 1000: batches straddle epoch boundaries
    rows = np.concatenate([built.batch_rows(bs, seed=3, index=i) for i in range(3 * N_TRAIN // bs + 1)])
    for epoch in range(3):
        assert sorted(rows[epoch * N_TRAIN : (epoch + 1) * N_TRAIN]) == list(range(N_TRAIN))
    assert not np.array_equal(rows[:N_TRAIN], rows[N_TRAIN : 2 * N_TRAIN])  # a new permutation each epoch
    assert not np.array_equal(rows[:N_TRAIN], np.arange(N_TRAIN))  # shuffled


def test_batches_resume_identically_and_depend_on_the_seed(built):
    stream = built.batches(128, seed=1)
    first = [next(stream) for _ in range(12)]
    resumed = built.batches(128, seed=1, start=9)
    for k in range(9, 12):
        assert torch.equal(next(resumed), first[k])
    assert torch.equal(first[2], built.activations(built.batch_rows(128, 1, 2)))
    assert not torch.equal(next(built.batches(128, seed=2)), first[0])
    assert first[0].shape == (128, 64) and first[0].dtype == torch.float32


# --- corrupt and mismatched caches ---------------------------------------------------------------------


def _rebuild_warns(cfg, match):
    with pytest.warns(UserWarning, match=match):
        return ActivationStore.build_or_load(cfg, progress=False)


def test_flipped_bytes_are_detected_and_rebuilt(built, cfg):
    original = built.activations(np.arange(N_TRAIN)).clone()
    shard = built.path / "train_acts_000.npy"
    data = bytearray(shard.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    shard.write_bytes(bytes(data))
    rebuilt = _rebuild_warns(cfg, "train_acts_000.npy does not match its sha256 checksum")
    torch.testing.assert_close(rebuilt.activations(np.arange(N_TRAIN)), original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is valid again
        ActivationStore.build_or_load(cfg, progress=False)


def test_truncated_file_and_missing_manifest_are_detected(cfg):
    path = ActivationStore.build_or_load(cfg, progress=False).path
    with open(path / "train_rows.npy", "r+b") as f:
        f.truncate(100)
    _rebuild_warns(cfg, "train_rows.npy has 100 bytes")
    (path / "manifest.json").unlink()  # as after an interrupted build
    _rebuild_warns(cfg, "no readable manifest.json")


def test_manifest_for_another_config_is_detected(cfg):
    path = ActivationStore.build_or_load(cfg, progress=False).path
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["content"]["n_train_tokens"] = 5
    (path / "manifest.json").write_text(json.dumps(manifest))
    store = _rebuild_warns(cfg, "its manifest was made for")
    assert store.manifest["content"]["n_train_tokens"] == N_TRAIN


def test_keep_special_tokens_and_float16(cfg, tiny):
    kept = ActivationStore.build_or_load(cfg.replace(drop_special_tokens=False, store_dtype="float16", n_train_tokens=200),
                                         model=tiny, progress=False)
    rows = np.array(kept.train_rows)
    assert rows[0].tolist() == [0, 0]  # the BOS position is kept
    tokens = torch.from_numpy(np.asarray(kept.train_tokens, dtype=np.int64))
    ref = tiny.activations(tokens, "blocks.1.hook_resid_post")[rows[:, 0], rows[:, 1]]
    torch.testing.assert_close(kept.activations(np.arange(200)), ref.half().float())


def test_cache_key_changes_with_content_not_with_batch_size(cfg):
    assert store_mod.cache_key(cfg) == store_mod.cache_key(cfg.replace(model_batch_size=3, device="cpu"))
    assert store_mod.cache_key(cfg) != store_mod.cache_key(cfg.replace(layer=0))
    assert store_mod.cache_key(cfg) != store_mod.cache_key(cfg.replace(n_train_tokens=N_TRAIN + 1))


def test_too_small_corpus_is_explained(cfg, tiny, tmp_path):
    (tmp_path / "small.txt").write_text("a short text " * 20)
    small = cfg.replace(dataset=str(tmp_path / "small.txt"), n_eval_tokens=32)
    with pytest.raises(text.DataUnavailableError, match="ran out after .* lower n_train_tokens"):
        ActivationStore.build_or_load(small, model=tiny, progress=False)


def test_abandoned_partial_builds_are_removed(built, cfg):
    dead = built.path.with_name(built.path.name + ".building-999999999")  # no such process
    alive = built.path.with_name(built.path.name + f".building-{__import__('os').getpid()}")
    dead.mkdir()
    alive.mkdir()
    ActivationStore.build_or_load(cfg, progress=False)
    assert not dead.exists() and alive.exists()
    alive.rmdir()
