"""`switch-sae reproduce`: the sweeps into the user's own table, each SAE compared with the reference table as it
finishes and all of them at the end, then every notebook run headless on that table (`notebook_runner.py`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import durable, paths
from .notebook_runner import _environment, execute_notebook, notebook_paths
from .profiles import Profile


def reproduce(profile: Profile, out: Optional[str] = None, *, from_committed: bool = False, skip_sweep: bool = False,
              reference: Optional[str] = None, update_figures: bool = False,
              notebooks: Optional[Sequence[str]] = None) -> int:
    """Train the sweeps into the user's own table (<out>/records.jsonl), compare it with the committed one,
    then run every notebook on that table; figures go to <out>/figures/ unless `update_figures`. Returns the
    exit status (1 when a notebook failed)."""
    from .results import results_path
    from .sweep import run_sweep

    out_dir = durable.check_writable_dir(Path(out) if out else paths.project_root() / "outputs" / profile.name,
                                         "--out")
    committed_dir = paths.results_root() / profile.name
    table_dir = committed_dir if from_committed else out_dir
    reference_dir = Path(reference) if reference else committed_dir
    update_figures = update_figures or os.environ.get(paths.UPDATE_FIGURES_ENV) == "1"
    env = {paths.RESULTS_ENV: str(table_dir),
           paths.FIGURES_ENV: None if update_figures else str(out_dir / "figures"),
           paths.UPDATE_FIGURES_ENV: "1" if update_figures else None}
    notebooks = notebook_paths(notebooks)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    failed = []
    with _environment(**env):
        if not (from_committed or skip_sweep):
            t0 = time.perf_counter()
            reference = reference_records(profile, reference_dir)
            if reference:
                print(f"each SAE trained is compared with the reference {results_path(profile, reference_dir)} as "
                      "it finishes (largest relative difference over MSE, FVU, L0, CE loss recovered)", flush=True)
            records = run_sweep(profile, profile.reproduce_grids, root=table_dir,  # notebook 07 runs its own grid
                                on_record=lambda record: print_one_comparison(record, reference))
            timings["sweeps"] = time.perf_counter() - t0
            print_comparison(profile, records, reference_dir)  # every SAE, the largest difference first
        for i, nb_path in enumerate(notebooks, 1):
            print(f"[{i}/{len(notebooks)}] executing {nb_path.name} (profile {profile.name}) ...", flush=True)
            try:
                timings[nb_path.name] = execute_notebook(nb_path, out_dir, profile.name)
                print(f"    done in {timings[nb_path.name]:.0f}s -> {out_dir / nb_path.with_suffix('.html').name}",
                      flush=True)
            except Exception as e:  # keep going: one broken notebook should not hide the others' results
                failed.append(nb_path.name)
                print(f"    FAILED: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
        figures = paths.figures_dir(profile.name)
    total = time.perf_counter() - t_start
    _record_timings(out_dir / "timings.json", {**timings, "this_run_total": total})
    print(f"\nreproduction of profile {profile.name!r} finished in {total / 60:.1f} min")
    print(f"  results table : {results_path(profile, table_dir)}")
    print(f"  figures       : {figures}")
    print(f"  notebooks     : {out_dir} (executed .ipynb + .html)")
    if failed:
        print(f"  FAILED notebooks: {failed}")
        return 1
    return 0


def print_comparison(profile: Profile, records: list[dict[str, Any]], reference_dir: Path, show: int = 100) -> None:
    """Print, per SAE in both tables, the largest relative difference of your run from the reference table."""
    from .results import compare_records, results_path

    reference = reference_records(profile, reference_dir)
    if not reference:
        print(f"no reference table to compare with at {results_path(profile, reference_dir)} "
              "(made with this profile's current settings)")
        return
    rows = compare_records(records, reference)
    print(f"your run vs the reference {results_path(profile, reference_dir)}: {len(rows)} SAEs in both "
          f"({len(records) - len(rows)} only in yours); largest relative difference per SAE "
          "over MSE, FVU, L0, CE loss recovered:")
    for row in rows[:show]:
        print(f"  {row['name']:<28} {100 * row['rel_diff']:6.2f}%  {row['metric']}: "
              f"{row['mine']:.5g} (yours) vs {row['reference']:.5g}")


def reference_records(profile: Profile, reference_dir: Path) -> list[dict[str, Any]]:
    """Every SAE of the reference table (seeds and doubled runs included), the latest record per config key;
    SAEs of another profile version have other keys and simply find no partner."""
    from .results import load_records, results_path

    return list({r["key"]: r for r in load_records(results_path(profile, reference_dir))}.values())


def print_one_comparison(record: dict[str, Any], reference: list[dict[str, Any]]) -> None:
    """One line under the sweep's line of an SAE just trained: its largest relative difference from its record
    in `reference` (nothing when it has none)."""
    from .results import compare_records

    for row in compare_records([record], reference):
        print(f"    vs reference: {100 * row['rel_diff']:6.2f}%  {row['metric']}: {row['mine']:.5g} (yours) vs "
              f"{row['reference']:.5g}", flush=True)


def _record_timings(path: Path, timings: dict[str, float]) -> None:
    """Merge seconds per step into timings.json (a partial rerun keeps the other steps' numbers), atomically; a
    torn one (from an older version) is replaced, saying so in one line, never failing the run at its end."""
    old = {}
    if path.is_file():
        try:
            old = durable.read_json(path, "the seconds of earlier runs")
        except durable.TornFileError as e:
            print(f"{e}; writing a new one", flush=True)
    durable.atomic_write_json(path, {**(old if isinstance(old, dict) else {}), **timings}, indent=2)
