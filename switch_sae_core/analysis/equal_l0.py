"""Equal-L0 comparisons of a baseline family's frontier (ReLU, Gated, JumpReLU: no k) with a TopK or Switch curve
over k, in BOTH interpolation directions (issue 23 item 3: "FLOP-matched Switch beats Gated 6/6" depended on which
curve was interpolated), and the sentence that reports them."""
from __future__ import annotations

import math
from typing import Any

from ..checks import seed_stats
from ..keys import sae_identity

EQUAL_L0_INTERPOLATION = ("piecewise linear in log L0 between the two nearest points of a curve, each point the mean "
                          "over its seeds; never extrapolated (a point outside the other curve's L0 range is not compared)")


def l0_nodes(records: list[dict], metric: str) -> list[dict[str, Any]]:
    """One point per SAE config (its records = its seeds), sorted by L0: {'l0' (mean over seeds), 'value' (mean of
    `metric`), 'std' (seed std, ddof=1; None for one seed), 'n', 'name'}. Records without `metric` are left out."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if r.get(metric) is not None and r.get("l0") is not None:
            by.setdefault(sae_identity(r["sae_config"]), []).append(r)
    nodes = []
    for rs in by.values():
        stats = seed_stats([float(r[metric]) for r in rs])
        nodes.append({"l0": sum(float(r["l0"]) for r in rs) / len(rs), "value": stats["mean"],
                      "std": stats["std"] if stats["n"] > 1 else None, "n": stats["n"], "name": rs[0].get("name")})
    return sorted(nodes, key=lambda node: node["l0"])


def _at_l0(nodes: list[dict], l0: float) -> dict[str, Any] | None:
    """A curve of `l0_nodes` read at `l0` (EQUAL_L0_INTERPOLATION): {'value', 'std' (the two points' seed stds
    interpolated alike, None unless both have seeds), 'between' (their L0s)}; None outside the curve's range."""
    for a, b in zip(nodes, nodes[1:]):
        if a["l0"] <= l0 <= b["l0"] and b["l0"] > a["l0"]:
            t = (math.log(l0) - math.log(a["l0"])) / (math.log(b["l0"]) - math.log(a["l0"]))
            std = None if a["std"] is None or b["std"] is None else a["std"] + t * (b["std"] - a["std"])
            return {"value": a["value"] + t * (b["value"] - a["value"]), "std": std, "between": (a["l0"], b["l0"])}
    exact = next((node for node in nodes if node["l0"] == l0), None)
    return None if exact is None else {"value": exact["value"], "std": exact["std"], "between": (l0, l0)}


def _direction(points: list[dict], curve: list[dict], points_are: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """Each of `points` against `curve` read at its L0; `points_are` 'curve' (the TopK/Switch points) or 'frontier'."""
    read_as = "frontier" if points_are == "curve" else "curve"
    rows = []
    for node in points:
        other = _at_l0(curve, node["l0"])
        if other is None:
            continue
        mine = {"value": node["value"], "std": node["std"], "n": node["n"], "name": node["name"]}
        row = {"l0": node["l0"], points_are: mine, read_as: {**other, "interpolated": other["between"][0] != other["between"][1]}}
        diff = row["curve"]["value"] - row["frontier"]["value"]
        stds = [v for v in (row["curve"]["std"], row["frontier"]["std"]) if v is not None]
        spread = max(stds) if stds else None
        row.update(diff=diff, curve_better=(diff > 0) if higher_is_better else (diff < 0), spread=spread,
                   beyond_spread=None if spread is None else abs(diff) > spread)
        rows.append(row)
    return rows


def _who_wins(rows: list[dict]) -> str | None:
    wins = sum(r["curve_better"] for r in rows)
    return None if not rows else "curve" if wins == len(rows) else "frontier" if wins == 0 else "mixed"


def equal_l0_comparison(frontier: list[dict], curve: list[dict], metric: str = "mse",
                        higher_is_better: bool = False) -> dict[str, Any]:
    """A baseline family's frontier (`frontier`: e.g. Gated records over its coefficients, some at several seeds)
    against a TopK or Switch SAE over k (`curve`: its records over k and seeds), compared at equal L0 in BOTH
    directions, since reading one curve at the other's points can decide the verdict (issue 23: Gated at its own
    L0 37.4 equals TopK, while TopK read at k = 32 beats interpolated Gated):
    - 'at_curve_l0': at each TopK/Switch point's L0 (= k), the frontier interpolated in log L0;
    - 'at_frontier_l0': at each frontier point's L0, the TopK/Switch curve interpolated over k in log L0.
    Interpolation: EQUAL_L0_INTERPOLATION. Each row: {'l0', 'curve', 'frontier' (each {'value', 'std', ...}: the
    measured point's mean, seed std and n, or the interpolated value with 'between' and 'interpolated'), 'diff'
    (curve - frontier), 'curve_better' (lower `metric` is better unless `higher_is_better`), 'spread' (the larger
    seed std known on either side; None with one seed on both), 'beyond_spread'}. Summary: 'winner_at_curve_l0' /
    'winner_at_frontier_l0' ('curve' better at every compared point, 'frontier' at none, 'mixed'; None: nothing
    comparable), 'curve_wins_at_curve_l0' / 'curve_wins_at_frontier_l0' ([wins, compared]), 'directions_agree'
    (False: the two directions give different winners; None: a direction compared nothing)."""
    f_nodes, c_nodes = l0_nodes(frontier, metric), l0_nodes(curve, metric)
    at_curve = _direction(c_nodes, f_nodes, "curve", higher_is_better)
    at_frontier = _direction(f_nodes, c_nodes, "frontier", higher_is_better)
    win_c, win_f = _who_wins(at_curve), _who_wins(at_frontier)
    return {"metric": metric, "higher_is_better": higher_is_better, "interpolation": EQUAL_L0_INTERPOLATION,
            "at_curve_l0": at_curve, "at_frontier_l0": at_frontier,
            "curve_wins_at_curve_l0": [sum(r["curve_better"] for r in at_curve), len(at_curve)],
            "curve_wins_at_frontier_l0": [sum(r["curve_better"] for r in at_frontier), len(at_frontier)],
            "winner_at_curve_l0": win_c, "winner_at_frontier_l0": win_f,
            "directions_agree": None if win_c is None or win_f is None else win_c == win_f}



def equal_l0_report(comparison: dict[str, Any], frontier: str, curve: str) -> str:
    """One sentence per direction of a `checks.equal_l0_comparison` (`frontier`, `curve`: the two families' names),
    saying how each interpolates, and whether the two directions agree."""
    def part(rows: list[dict], at: str, read: str, how: str) -> str:
        if not rows:
            return f"at {at}'s L0s nothing is comparable (no point inside {read}'s L0 range)"
        l0s = ", ".join(f"{r['l0']:.1f}" for r in rows)
        wins = sum(r["curve_better"] for r in rows)
        real = sum(bool(r["beyond_spread"]) for r in rows if r["curve_better"])
        spread = f", {real} of them beyond the seed spread" if any(r["spread"] is not None for r in rows) else ""
        return (f"at {at}'s L0s ({l0s}; {read} {how}) {curve} has the better {comparison['metric']} at {wins} of "
                f"{len(rows)}{spread}")
    text = (part(comparison["at_curve_l0"], curve, frontier, "interpolated in log L0") + "; "
            + part(comparison["at_frontier_l0"], frontier, curve, "interpolated over k in log L0") + ".")
    agree = comparison["directions_agree"]
    if agree is False:
        text += " **The two directions disagree**: the verdict depends on which curve is interpolated."
    elif agree:
        text += " Both directions agree."
    return text[0].upper() + text[1:]
