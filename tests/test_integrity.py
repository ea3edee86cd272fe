"""Never a silently wrong number, never a blocked table (issue 24): each input that broke it, and its right
behaviour. Tiny sizes (`tiny-random`, a few hundred tokens); the kill -9 / two-process / full-disk runs are in
tests/test_fault_injection.py."""
from __future__ import annotations

import json
import random
import threading
import warnings

import pytest
import torch

from switch_sae_core import cache, cli, durable, keys, results, sweep
from switch_sae_core.config import ConfigError, DataConfig, SAEConfig, TrainConfig
from switch_sae_core.profiles import Profile
from switch_sae_core.saes.base import CheckpointError, WEIGHTS_FILE, load_sae

from test_train import SparseDirections, make_sae, quick_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_corpus(path, seed: int = 0, words: int = 1500) -> None:
    rng = random.Random(seed)
    vocab = ["the", "router", "sends", "each", "input", "to", "one", "expert", "whose", "features", "sparse",
             "dictionary", "learns", "a", "direction", "of", "residual", "stream", "model", "layer"]
    path.write_text(" ".join(rng.choice(vocab) for _ in range(words)) + ".\n")


def corpus_profile(corpus, cache_dir=None) -> Profile:
    return Profile(
        name="unit",
        data=DataConfig(model="tiny-random", layer=0, dataset=str(corpus), context_len=32, n_train_tokens=512,
                        n_eval_tokens=64, device="cpu", model_batch_size=8, cache_dir=cache_dir),
        train=TrainConfig(steps=6, batch_size=32, log_every=2, progress=False, geometric_median_batch=64, device="cpu"),
        width_multiple=1, ks=(4,), relu_l1_coeffs=(2.0,), gated_l1_coeffs=(2.0,), fixed_width_experts=(2,),
        flop_matched_experts=(2,), eval_every=2, n_heldout=64,
    )


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCH_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SWITCH_SAE_RESULTS", raising=False)


# --- 1. a trained SAE and its record never outlive the data they were trained on -------------------------------
def test_an_edited_corpus_retrains_the_sae_and_the_sweep_records_it_again(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, seed=0)
    profile = corpus_profile(corpus)
    cfg = SAEConfig(arch="topk", d_in=64, n_features=64, k=4)
    sae_a, info_a = cache.train_or_load(profile, cfg)
    assert info_a["data_content"] and cache.train_or_load(profile, cfg)[1]["cached"]
    write_corpus(corpus, seed=1)  # edited in place: the activation cache is rebuilt, and so must the SAE be
    sae_b, info_b = cache.train_or_load(profile, cfg)
    assert not info_b["cached"] and info_b["data_content"] != info_a["data_content"]
    assert info_b["key"] == info_a["key"]  # the same configs: the table key is the same, the data is not
    assert not torch.equal(sae_a.W_enc, sae_b.W_enc)
    from switch_sae_core.data.store import ActivationStore  # a built cache names the same content as its config

    assert ActivationStore.build_or_load(profile.data, progress=False).content_digest == info_b["data_content"]

    root = tmp_path / "results"
    write_corpus(corpus, seed=0)
    first = sweep.run_sweep(profile, ["seeds"], root=root, with_lm=False, log=lambda s: None)
    write_corpus(corpus, seed=2)
    logs = []
    second = sweep.run_sweep(profile, ["seeds"], root=root, with_lm=False, log=logs.append)
    assert "0 already in" in logs[0]  # not "already in": the records are of other data
    assert {r["key"] for r in first} == {r["key"] for r in second}
    assert all(a["data_content"] != b["data_content"] and a["mse"] != b["mse"] for a, b in zip(first, second))
    # the table's readers see the records of the data as it is now
    shown = results.profile_records(profile, root, all_seeds=True)
    assert {r["data_content"] for r in shown} == {second[0]["data_content"]}


def test_records_written_before_the_content_was_recorded_still_match_their_settings():
    t, d = TrainConfig(), DataConfig()
    old = {"run_fingerprint": keys.run_fingerprint(t, d)}
    new = {"run_fingerprint": keys.run_fingerprint(t, d, "abc"), "data_content": "abc"}
    assert results.record_matches(old, t, d, "abc") and results.record_matches(new, t, d, "abc")
    assert not results.record_matches(new, t, d, "def")  # trained on other data
    assert results.record_matches(new, t, d, None)  # the content cannot be computed here: settings only
    assert not results.record_matches(new, t.replace(seed=1), d, "abc")


# --- 2. an SAE applied to another model or layer than it was trained on -------------------------------------------
def test_evaluate_refuses_another_layer_and_the_flag_turns_it_into_a_warning(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    profile = corpus_profile(corpus)
    sae, info = cache.train_or_load(profile, SAEConfig(arch="topk", d_in=64, n_features=64, k=4))
    assert load_sae(info["dir"]).trained_on == {"model": "tiny-random", "hook": "blocks.0.hook_resid_post",
                                                "layer": 0, "dataset": str(corpus),
                                                "data_content": info["data_content"]}
    out = tmp_path / "sae"
    load_sae(info["dir"]).save(out)  # a copy keeps where it was trained
    argv = ["evaluate", str(out), "--profile", "ci", "--data-model", "tiny-random", "--data-dataset", str(corpus),
            "--data-context-len", "32", "--data-n-train-tokens", "512", "--data-n-eval-tokens", "64", "--no-lm"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--data-layer", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "hook 'blocks.0.hook_resid_post' (here 'blocks.1.hook_resid_post')" in err and "--data-layer 0" in err
    with pytest.warns(UserWarning, match="evaluating anyway"):
        assert cli.main(argv + ["--data-layer", "1", "--allow-other-site"]) == 0
    assert cli.main(argv + ["--data-layer", "0"]) == 0


# --- 3. train_seconds counts every part of a killed and resumed run --------------------------------------------
def test_train_seconds_counts_the_part_before_a_kill(tmp_path, monkeypatch):
    from switch_sae_core import train

    class Clock:  # 1 s per reading: seconds = readings, wherever they happen
        now = 0.0

        def perf_counter(self):
            Clock.now += 1.0
            return Clock.now

    monkeypatch.setattr(cache, "time", Clock())
    ctx = sweep.SweepContext(SparseDirections(), DataConfig(), torch.randn(64, 32), None)
    profile = corpus_profile("unused").replace(train=quick_cfg(steps=8).replace(log_every=2, checkpoint_every=4))
    cfg = SAEConfig(arch="topk", d_in=32, n_features=64, k=4)
    original = train.guarded_step

    def killed_at_step_6(step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt  # the process dies here (its checkpoint at step 4 and progress at 6 are on disk)
        return original(step, *args, **kwargs)

    monkeypatch.setattr(train, "guarded_step", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        cache.train_or_load(profile, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    before_kill = Clock.now - 0.0
    monkeypatch.setattr(train, "guarded_step", original)
    start = Clock.now
    _, info = cache.train_or_load(profile, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    resumed = Clock.now - start
    assert info["train_seconds"] > resumed  # the part before the kill is counted
    assert info["train_seconds"] >= resumed + before_kill - 4  # all of it but the last readings before the kill


# --- 4. corrupt or non-finite weights never load --------------------------------------------------------------
def test_a_flipped_bit_or_a_nan_in_the_weights_is_refused(tmp_path):
    sae = make_sae("topk")
    sae.save(tmp_path / "ok")
    data = bytearray((tmp_path / "ok" / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data
    (tmp_path / "flipped").mkdir()
    (tmp_path / "flipped" / WEIGHTS_FILE).write_bytes(bytes(data))
    (tmp_path / "flipped" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_sae(tmp_path / "flipped")
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    sae.save(tmp_path / "nan")  # the checksum is right: the save itself held NaN
    with pytest.raises(CheckpointError, match=r"holds NaN or inf in \['W_dec'\]"):
        load_sae(tmp_path / "nan")
    assert torch.equal(load_sae(tmp_path / "ok").W_enc, make_sae("topk").W_enc)


# --- 6. torn meta.json / timings.json: one line, then rebuilt -------------------------------------------------
def test_a_torn_meta_json_retrains_the_entry_saying_so(tmp_path):
    ctx = sweep.SweepContext(SparseDirections(), DataConfig(), torch.randn(64, 32), None)
    profile = corpus_profile("unused").replace(train=quick_cfg(steps=4).replace(log_every=2))
    cfg = SAEConfig(arch="topk", d_in=32, n_features=64, k=4)
    _, info = cache.train_or_load(profile, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    meta = info["dir"].parent / "meta.json"
    meta.write_text(meta.read_text()[:20])
    with pytest.warns(UserWarning, match=r"meta.json \(a trained SAE's numbers\) is unreadable"):
        _, again = cache.train_or_load(profile, cfg, ctx.source, heldout_BD=ctx.heldout_BD)
    assert not again["cached"] and json.loads(meta.read_text())["curve"] == info["curve"]


def test_a_torn_timings_json_is_replaced_not_fatal(tmp_path, capsys):
    path = tmp_path / "timings.json"
    path.write_text('{"sweeps": 12.5, "00_qu')
    cli._record_timings(path, {"this_run_total": 3.0})
    assert json.loads(path.read_text()) == {"this_run_total": 3.0}
    assert "timings.json (the seconds of earlier runs) is unreadable" in capsys.readouterr().out
    cli._record_timings(path, {"sweeps": 1.0})
    assert json.loads(path.read_text()) == {"this_run_total": 3.0, "sweeps": 1.0}


# --- 7. two writers of one file never share a temporary file ------------------------------------------------------
def test_concurrent_atomic_writes_of_one_file_never_collide(tmp_path):
    path, errors = tmp_path / "progress.json", []

    def writer(i):
        try:
            for j in range(50):
                cache._write_json(path, {"writer": i, "n": j, "pad": "x" * 10_000})  # how progress.json is written
        except Exception as e:  # the old shared '.progress.json.tmp' raised FileNotFoundError here
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["n"] == 49
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left


def test_a_lock_names_its_holder_and_is_free_again_when_released(tmp_path):
    import multiprocessing

    lock_path = tmp_path / "x.lock"
    ready, done = multiprocessing.get_context("fork").Event(), multiprocessing.get_context("fork").Event()

    def hold():
        with durable.FileLock(lock_path):
            ready.set()
            done.wait(30)

    p = multiprocessing.get_context("fork").Process(target=hold)
    p.start()
    assert ready.wait(30)
    lock = durable.FileLock(lock_path)
    assert not lock.acquire(blocking=False) and lock.holder() == f"process {p.pid}"
    done.set()
    p.join(30)
    assert lock.acquire(blocking=False)
    lock.release()


# --- 8. a full disk: one line before the work, and no temporary folder left ---------------------------------------
def test_a_cache_that_cannot_fit_is_refused_before_extraction(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from switch_sae_core.data.store import ActivationStore

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    cfg = corpus_profile(corpus, cache_dir=str(tmp_path / "c")).data
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(durable.DiskFullError, match=r"^disk full at .*activations, need ~0\.00[0-9]* GB \(1e-06 GB free\)"):
        ActivationStore.build_or_load(cfg, progress=False)
    assert not [p for p in (tmp_path / "c" / "activations").iterdir() if p.suffix != ".lock"]


# --- 9-12. nonsense is refused in one line, before any work -------------------------------------------------------
@pytest.mark.parametrize("flags,words", [
    (["--l1-coeff", "-1"], "l1_coeff=-1.0 must be >= 0"),
    (["--aux-alpha", "-3"], "aux_alpha=-3.0 must be >= 0"),
    (["--auxk-coeff", "-0.1"], "auxk_coeff=-0.1 must be >= 0"),
    (["--auxk-k", "0"], "auxk_k=0 must be a positive integer"),
    (["--grad-clip", "nan"], "grad_clip=nan must be a finite number"),
    (["--lr", "nan"], "lr=nan must be a finite number"),
    (["--lr-scale", "nan"], "lr_scale=nan must be a finite number"),
    (["--dtype", "foo"], "dtype='foo': choose one of"),
    (["--dtype", "int8"], "dtype='int8': choose one of"),
    (["--dtype", "float16"], "dtype='float16' cannot train"),
    (["--device", "foo"], "device='foo' is not a device"),
    (["--seed", "-1"], "seed=-1 must be an integer"),
    (["--adam-betas", "[1.5, 0.999]"], "adam_betas=[1.5, 0.999] must be two numbers in [0, 1)"),
    (["--adam-betas", "[0.9]"], "adam_betas=[0.9] must be two numbers"),
    (["--k", "100000"], "k=100000 is larger than the dictionary size"),
    (["--data-layer", "-1"], "layer=-1 must be a block index >= 0"),
    (["--data-hook", "blocks.0.hook resid"], "is not a TransformerLens hook name"),
    (["--data-layer", "99"], "tiny-random has no hook 'blocks.99.hook_resid_post': it has 2 layers"),
    (["--data-hook", "blocks.0.hook_nothing"], "has no hook 'blocks.0.hook_nothing'"),
    (["--data-layer", "0", "--data-context-len", "100000"], "context_len=100000 is longer than tiny-random's 256 positions"),
])
def test_a_bad_flag_is_one_line_before_any_work(flags, words, tmp_path, capsys, monkeypatch):
    import switch_sae_core.data.extract as extract

    def no_extraction(*a, **k):
        raise AssertionError("extraction started")

    monkeypatch.setattr(extract, "_extract", no_extraction)
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--profile", "ci", "--data-model", "tiny-random", "--data-dataset", str(corpus),
                  "--arch", "topk", "--no-lm", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert words in err


@pytest.mark.parametrize("variable", ["SWITCH_SAE_CACHE", "SWITCH_SAE_RESULTS"])
@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_environment_folders_that_are_files_or_unwritable_are_one_line_at_the_start(variable, kind, tmp_path,
                                                                                     capsys, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv(variable, str(tmp_path / "f") if kind == "a file" else str(tmp_path / "f" / "sub"))
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--profile", "ci", "--no-lm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and variable in err, err


def test_a_reproduce_output_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "--profile", "ci", "--out", str(tmp_path / "f"), "--skip-sweep", "--notebooks"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--out=" in err and "is a file" in err


def test_activations_far_from_a_sane_scale_warn_with_their_norm_and_overflow_is_refused(tmp_path):
    from switch_sae_core.train import TrainingError, train_sae

    class Scaled(SparseDirections):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def batch(self, batch_size, seed, i):
            return super().batch(batch_size, seed, i) * self.factor

    with pytest.warns(UserWarning, match=r"mean norm [0-9.e-]+ \(d=32, per-coordinate RMS .*multiply them by"):
        train_sae(make_sae("topk"), Scaled(1e-4), quick_cfg(steps=2))
    with pytest.raises(TrainingError, match="squares overflow float32 in the loss, whatever the lr"):
        train_sae(make_sae("topk"), Scaled(1e20), quick_cfg(steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ordinary scale: no word
        train_sae(make_sae("topk"), Scaled(1.0), quick_cfg(steps=2))


def test_a_float16_sae_loads_for_inference_but_is_not_trained():
    from switch_sae_core.train import train_sae

    cfg = SAEConfig(arch="topk", d_in=32, n_features=64, k=4, dtype="float16")  # e.g. an imported SAELens SAE
    with pytest.raises(ConfigError, match="dtype='float16' cannot train.*bfloat16"):
        train_sae(cfg, SparseDirections(), quick_cfg(steps=2))
