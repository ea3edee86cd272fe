"""Fault injection (issue 24; docs/guarantees.md): kill -9 at random points of a cache build, a sweep and a
checkpoint write, a torn last line, two processes on one sweep and a full disk. Each compares the final
activations / table / SAEs with an uninterrupted run: nothing lost, nothing duplicated, nothing stale.

The faulty runs are forked children (no re-import: each costs milliseconds) killed with SIGKILL after a random
delay drawn from [0, the uninterrupted run's duration]; $SWITCH_SAE_FAULT_SEED picks the draws (printed on a
failure). Tiny sizes (`tiny-random`, a few hundred tokens): the module runs in well under 2 minutes."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from switch_sae_core import cache, durable, results, sweep
from switch_sae_core.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from switch_sae_core.config import DataConfig, TrainConfig
from switch_sae_core.data import extract, lm
from switch_sae_core.data.store import ActivationStore
from switch_sae_core.profiles import Profile
from switch_sae_core.saes.base import load_sae

from test_integrity import write_corpus
from test_train import SparseDirections, make_sae, quick_cfg

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py
SEED = int(os.environ.get("SWITCH_SAE_FAULT_SEED", "24"))
FORK = multiprocessing.get_context("fork")
VOLATILE = {"train_seconds", "eval_seconds", "wall_clock_s", "finished_at", "git_commit"}  # times, not results




@pytest.fixture
def draws(request):
    rng = random.Random(f"{SEED}-{request.node.name}")
    print(f"fault seed {SEED}")
    return rng


def killed(target, delay: float) -> bool:
    """Run `target()` in a forked child and SIGKILL it after `delay` seconds; True if it was killed (False: it had
    finished). The child never runs the parent's exit handlers."""
    def child():
        target()
        os._exit(0)

    p = FORK.Process(target=child)
    p.start()
    p.join(delay)
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        return True
    assert p.exitcode == 0, f"the child failed before its kill (exit code {p.exitcode})"
    return False


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of killed writers still under `root`."""
    return sorted(str(p) for p in root.rglob(f"*{durable.TMP_TAG}*")) + sorted(str(p) for p in root.rglob("*.building-*"))


# --- kill -9 during a cache build -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return lm.load_model("tiny-random", device="cpu")


def test_a_cache_build_killed_anywhere_ends_identical_to_an_uninterrupted_one(tiny, tmp_path, draws, monkeypatch):
    monkeypatch.setattr(extract, "PROGRESS_EVERY_S", 0.0)  # a progress point after every batch: kills land between
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, words=6000)
    cfg = DataConfig(model="tiny-random", layer=1, dataset=str(corpus), context_len=32, n_train_tokens=3000,
                     n_eval_tokens=200, device="cpu", model_batch_size=4, cache_dir=str(tmp_path / "ref"))
    ref, seconds = timed(lambda: ActivationStore.build_or_load(cfg, model=tiny, progress=False))
    faulty = cfg.replace(cache_dir=str(tmp_path / "faulty"))
    kills = [draws.uniform(0, 0.8 * seconds) for _ in range(4)]
    hits = []
    for delay in kills:  # each kill on the build the last one left (it resumes from its last progress point)
        hits.append(killed(lambda: ActivationStore.build_or_load(faulty, model=tiny, progress=False), delay))
        if not hits[-1]:
            shutil.rmtree(tmp_path / "faulty" / "activations" / ref.path.name)
    assert any(hits), f"no kill landed before the build finished: {kills}"
    store = ActivationStore.build_or_load(faulty, model=tiny, progress=False)  # verify="full": every checksum
    assert store.path.name == ref.path.name, kills
    assert torch.equal(store.activations(np.arange(len(ref))), ref.activations(np.arange(len(ref)))), kills
    assert torch.equal(store.eval_activations(), ref.eval_activations()), kills
    assert np.array_equal(store.train_tokens, ref.train_tokens) and np.array_equal(store.eval_tokens, ref.eval_tokens)
    assert leftovers(tmp_path / "faulty") == [], kills


def test_two_processes_building_one_cache_build_it_once(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, words=3000)
    cfg = DataConfig(model="tiny-random", layer=1, dataset=str(corpus), context_len=32, n_train_tokens=1500,
                     n_eval_tokens=100, device="cpu", cache_dir=str(tmp_path / "shared"))
    procs = [FORK.Process(target=lambda: ActivationStore.build_or_load(cfg, model=tiny, progress=False))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ref = ActivationStore.build_or_load(cfg.replace(cache_dir=str(tmp_path / "ref")), model=tiny, progress=False)
    store = ActivationStore.build_or_load(cfg, model=tiny, progress=False)
    assert torch.equal(store.activations(np.arange(len(ref))), ref.activations(np.arange(len(ref))))
    assert leftovers(tmp_path / "shared") == []


# --- sweeps: kill -9, a torn last line, two processes -------------------------------------------------------------
def sweep_profile(corpus: Path, activations: Path) -> Profile:
    return Profile(
        name="faults",
        data=DataConfig(model="tiny-random", layer=1, dataset=str(corpus), context_len=32, n_train_tokens=1024,
                        n_eval_tokens=128, device="cpu", model_batch_size=8, cache_dir=str(activations)),
        train=TrainConfig(steps=24, batch_size=64, log_every=4, progress=False, geometric_median_batch=128,
                          device="cpu", checkpoint_every=6),
        width_multiple=1, ks=(4,), relu_l1_coeffs=(2.0,), gated_l1_coeffs=(2.0,), fixed_width_experts=(2,),
        flop_matched_experts=(2,), eval_every=4, n_heldout=128,
    )


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory, tiny):
    """The profile, its activations (shared by every run: the faults here are the sweep's) and the reference
    records and SAEs of an uninterrupted sweep."""
    root = tmp_path_factory.mktemp("sweep")
    corpus = root / "corpus.txt"
    write_corpus(corpus, words=3000)
    profile = sweep_profile(corpus, root / "activations")
    ActivationStore.build_or_load(profile.data, model=tiny, progress=False)
    records, seconds = timed(lambda: in_cache(root / "ref", lambda: run(profile, root / "ref")))
    return profile, root, records, seconds


def in_cache(folder: Path, fn):
    old = os.environ.get("SWITCH_SAE_CACHE")
    os.environ["SWITCH_SAE_CACHE"] = str(folder / "cache")
    try:
        return fn()
    finally:
        os.environ.pop("SWITCH_SAE_CACHE") if old is None else os.environ.__setitem__("SWITCH_SAE_CACHE", old)


def run(profile: Profile, folder: Path) -> list[dict]:
    return sweep.run_sweep(profile, ["fixed_width"], root=folder / "results", with_lm=False, log=lambda s: None)


def assert_same_table_and_saes(folder: Path, setup, note) -> None:
    profile, root, reference, _ = setup
    lines = results.load_records(folder / "results" / results.RESULTS_FILE)
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == len(reference), (note, keys)  # nothing lost, nothing duplicated
    mine = {r["key"]: r for r in lines}
    for ref in reference:
        got = mine[ref["key"]]
        for field in ref:
            if field not in VOLATILE and field != "continued_from_step":
                assert got[field] == ref[field], (note, ref["name"], field)
    for r in reference:  # the SAEs themselves, bit for bit
        entry = cache.entry_name(r["key"], r["data_content"])
        a = load_sae(folder / "cache" / "saes" / entry / "final")
        b = load_sae(root / "ref" / "cache" / "saes" / entry / "final")
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), (note, r["name"], name)
    assert leftovers(folder) == [], note


def test_a_sweep_killed_anywhere_ends_with_the_uninterrupted_table(sweep_setup, tmp_path, draws):
    profile, _, _, seconds = sweep_setup
    kills = [draws.uniform(0, seconds) for _ in range(5)]
    hits = [in_cache(tmp_path, lambda: killed(lambda: run(profile, tmp_path), d)) for d in kills]
    assert any(hits), f"no kill landed before the sweep finished: {kills}"
    in_cache(tmp_path, lambda: run(profile, tmp_path))
    assert_same_table_and_saes(tmp_path, sweep_setup, f"kills after {kills} s (seed {SEED})")


def test_a_torn_last_line_is_repaired_by_the_next_sweep(sweep_setup, tmp_path, draws):
    profile, _, _, _ = sweep_setup
    table = tmp_path / "results" / results.RESULTS_FILE
    in_cache(tmp_path, lambda: run(profile, tmp_path))
    lines = table.read_bytes().splitlines(keepends=True)
    cut = draws.randrange(1, len(lines[-1]) - 1)
    table.write_bytes(b"".join(lines[:-1]) + lines[-1][:cut])  # the last record cut where a full disk stopped it
    with pytest.warns(UserWarning, match="torn"):
        assert len(results.load_records(table)) == len(lines) - 1  # readable at once
    with pytest.warns(UserWarning, match="removed a last line torn"):
        in_cache(tmp_path, lambda: run(profile, tmp_path))  # records the lost one again (its SAE is cached)
    assert_same_table_and_saes(tmp_path, sweep_setup, f"cut at byte {cut}")
    in_cache(tmp_path, lambda: run(profile, tmp_path))  # and every later sweep is a no-op
    assert len(results.load_records(table)) == len(lines)


def test_two_processes_on_one_sweep_share_it(sweep_setup, tmp_path):
    profile, _, _, seconds = sweep_setup
    procs = [FORK.Process(target=lambda: in_cache(tmp_path, lambda: run(profile, tmp_path))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60 + 10 * seconds)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_same_table_and_saes(tmp_path, sweep_setup, "two processes")


# --- kill -9 during checkpoint writes ---------------------------------------------------------------------------
def test_training_killed_while_writing_checkpoints_resumes_to_the_same_sae(tmp_path, draws):
    cfg = quick_cfg(steps=30, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))  # a write every step
    source = SparseDirections()
    from switch_sae_core.train import train_sae

    ref, seconds = timed(lambda: train_sae(make_sae("switch", n_features=1024), source,
                                           cfg.replace(checkpoint_dir=str(tmp_path / "ref"))).sae)
    kills = [draws.uniform(0.05, 0.5) * seconds for _ in range(4)]
    hits = [killed(lambda: train_sae(make_sae("switch", n_features=1024), source, cfg, resume=True), d) for d in kills]
    assert any(hits), f"no kill landed before the training finished: {kills}"
    assert list_checkpoints(tmp_path / "ckpt"), kills  # some state survived every kill
    sae = train_sae(make_sae("switch", n_features=1024), source, cfg, resume=True).sae
    for name, t in ref.state_dict().items():
        assert torch.equal(t, sae.state_dict()[name]), (kills, name)
    assert leftovers(tmp_path / "ckpt") == [], kills


# --- a full disk ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and mount; skipped, saying so, where the machine does not allow it)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"no full disk to test on: mounting a small tmpfs needs root ({done.stderr.decode().strip()[:120]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_leaves_no_temporary_folder(small_disk, tmp_path, tiny):
    from switch_sae_core.metrics import DeadFeatureTracker
    from switch_sae_core.train import make_optimizer

    sae = make_sae("topk", n_features=2048)  # ~1.3 MB a checkpoint with its Adam moments: two do not fit
    cfg = quick_cfg(steps=2)
    optimizer, tracker = make_optimizer(sae, cfg), DeadFeatureTracker(sae.n_latents, 1000, "cpu")
    sum(sae.losses(x := torch.randn(8, sae.cfg.d_in), sae(x)).values()).backward()
    optimizer.step()
    root = small_disk / "ckpt"
    first = save_checkpoint(root, 1, sae, optimizer, tracker, cfg, keep=0)
    with pytest.raises(durable.DiskFullError, match=rf"^disk full at {root}, need ~[0-9.]+ GB \([0-9.e-]+ GB free\)"):
        save_checkpoint(root, 2, sae, optimizer, tracker, cfg, keep=0)
    assert latest_checkpoint(root) == first and load_sae(first).cfg == sae.cfg  # the previous one survives
    assert leftovers(small_disk) == [] and [p.name for p in root.iterdir()] == ["step_00000001"]
    # an activation cache that cannot fit is refused before the model runs, in the same one line
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, words=6000)
    data = DataConfig(model="tiny-random", layer=1, dataset=str(corpus), context_len=32, n_train_tokens=20_000,
                      n_eval_tokens=200, device="cpu", cache_dir=str(small_disk / "cache"))
    with pytest.raises(durable.DiskFullError, match=r"^disk full at .*activations, need ~0\.0[0-9]+ GB"):
        ActivationStore.build_or_load(data, model=tiny, progress=False)
    assert leftovers(small_disk) == []
    # a disk that fills during the build (the estimate passed, another process wrote meanwhile): the shard files
    # are allocated up front, so it is the same line, not a SIGBUS from a write into a memory map
    import switch_sae_core.data.store as store

    real_check = durable.check_free_space
    store.durable.check_free_space = lambda path, need: None
    try:
        with pytest.raises(durable.DiskFullError, match=r"^disk full at .*activations"):
            ActivationStore.build_or_load(data, model=tiny, progress=False)
    finally:
        store.durable.check_free_space = real_check
    assert leftovers(small_disk) == []
    # and a table append on a full disk: the table is left whole, without a torn line
    table = small_disk / "results" / results.RESULTS_FILE
    results.append_record(table, {"key": "a"})
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to its last byte
        for chunk in (65536, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    with pytest.raises(durable.DiskFullError, match="disk full at"):
        results.append_record(table, {"key": "b", "curve": list(range(10_000))})
    filler.unlink()
    results.append_record(table, {"key": "c"})
    assert [r["key"] for r in results.load_records(table)] == ["a", "c"]
    json.loads(table.read_text().splitlines()[-1])
