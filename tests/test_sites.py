"""The sites of issue 23 (docs/sites.md): `scripts/site.sh PROFILE` builds the cache, then sweeps the site's
grids in two shards; killed anywhere and run again, it ends with every SAE recorded once. At the ci profile's sizes
on the tiny random model (profile `ci_site`); Gemma-3-270M's own path at tiny size only under the `slow` marker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switch_sae_core.profiles import PROFILES, SITE_GRIDS, get_profile
from switch_sae_core.results import RESULTS_FILE, load_records

ROOT = Path(__file__).resolve().parents[1]


def expected_runs(profile) -> set[tuple]:
    """(arch, n_experts, seed, steps) of the site's SAEs: TopK and Switch-2/4 at every seed, and TopK and Switch-2
    at twice the steps (the convergence check) at every seed."""
    steps, seeds = profile.train.steps, profile.seeds
    claim = {(arch, n, s, steps) for s in seeds for arch, n in [("topk", 1)] + [("switch", n) for n in profile.flop_matched_experts]}
    longer = {(arch, n, s, 2 * steps) for s in profile.convergence_seeds
              for arch, n in [("topk", 1), ("switch", profile.flop_matched_experts[0])]}
    return claim | longer


def test_site_profiles_differ_from_cpu_only_in_their_site_and_grids():
    cpu = PROFILES["cpu"]
    for name, site in (("cpu_l10", dict(layer=10)), ("cpu_gemma", dict(model="gemma3-270m", layer=9))):
        p = get_profile(name)
        assert p.data == cpu.data.replace(**site, model_batch_size=p.data.model_batch_size)
        assert p.train == cpu.train and p.width_multiple == cpu.width_multiple and p.claim_k == cpu.claim_k == 32
        assert p.flop_matched_experts == cpu.flop_matched_experts == (2, 4) and p.seeds == cpu.seeds == (0, 1, 2)
        assert p.ks == (32,) and p.convergence_seeds == (0, 1, 2) and p.reproduce_grids == SITE_GRIDS
        assert (p.n_heldout, p.ce_contexts, p.eval_every) == (cpu.n_heldout, cpu.ce_contexts, cpu.eval_every)
        assert len(expected_runs(p)) == 15


def run_site(env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "site.sh"), "ci_site"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_site_script_builds_the_cache_then_sweeps_and_resumes_after_a_kill(tmp_path):
    profile = get_profile("ci_site")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "SWITCH_SAE_CACHE": str(tmp_path / "cache"),
           "SWITCH_SAE_RESULTS": str(tmp_path / "results")}
    table = tmp_path / "results" / RESULTS_FILE
    # a kill of the whole process group (the script and both shards) once a few SAEs are recorded
    proc = run_site(env)
    deadline = time.time() + 600
    while len(load_records(table)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the site finished before the kill: " + proc.stdout.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(load_records(table))
    assert 3 <= n_before < 15
    # the same command again finishes the rest
    out, _ = run_site(env).communicate(timeout=900)
    assert "done in" in out, out[-3000:]
    records = load_records(table)
    runs = [(r["arch"], r["n_experts"], r["seed"], r["steps"]) for r in records]
    assert sorted(runs) == sorted(expected_runs(profile)), "every SAE exactly once"
    assert all(r["loss_recovered"] is not None and r["k"] == profile.claim_k for r in records)
    assert all(r["continued_from_step"] for r in records if r["steps"] == 2 * profile.train.steps)
    assert (tmp_path / "cache" / "logs" / "site_ci_site_shard1.log").is_file()
    # and once more: nothing left to train
    out, _ = run_site(env).communicate(timeout=600)
    assert "15 records for profile 'ci_site'" in out and len(load_records(table)) == 15, out[-2000:]


@pytest.mark.slow
def test_gemma_site_at_tiny_size(tmp_path):
    """cpu_gemma's path (Gemma-3-270M layer 9: cache, TopK and Switch-2/4 at k = 32, CE evaluation with its 262k
    vocabulary) at the ci profile's sizes, in this process; the Gemma conversion (once per cache) takes ~2 min."""
    from switch_sae_core import sweep
    from switch_sae_core.profiles import site_profile

    gemma = get_profile("cpu_gemma")
    ci = PROFILES["ci"]
    tiny = site_profile(ci.replace(ks=(32,), claim_k=32, flop_matched_experts=(2, 4), ce_contexts=2,
                                   data=ci.data.replace(cache_dir=str(tmp_path / "activations"))),
                        "ci_gemma", model=gemma.data.model, layer=gemma.data.layer,
                        model_batch_size=gemma.data.model_batch_size)
    records = sweep.run_sweep(tiny, ["flop_matched"], root=tmp_path / "results")
    assert sorted((r["arch"], r["n_experts"]) for r in records) == [("switch", 2), ("switch", 4), ("topk", 1)]
    for r in records:
        assert r["data_config"]["model"] == "gemma3-270m" and r["l0"] <= 32
        assert 1 < r["ce_clean"] < 6 and r["ce_clean"] < r["ce_sae"] < r["ce_zero"], r
