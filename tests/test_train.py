"""The trainer: geometric median, lr schedule, decoder upkeep in the real step, learning on sparse data."""
import math

import pytest
import torch

from switch_sae_core import metrics
from switch_sae_core.config import ConfigError, SAEConfig, TrainConfig
from switch_sae_core.saes import build_sae
from switch_sae_core.train import (TrainingError, base_lr, geometric_median, init_biases, lr_factor,
                                   make_optimizer, resolve_device, train_sae, train_step)

D = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class SparseDirections:
    """Tiny ground truth: 48 random unit directions in 4 groups of 12; each input sums 3 directions of
    one group with positive coefficients, plus an offset (groups give a router something to learn).
    A BatchSource: batch i depends only on (seed, i)."""

    d_in = D

    def __init__(self, n_dirs: int = 48, active: int = 3, groups: int = 4):
        self.dirs = torch.nn.functional.normalize(torch.randn(n_dirs, D, generator=torch.Generator().manual_seed(7)), dim=-1)
        self.active, self.groups = active, groups

    def batch(self, batch_size: int, seed: int, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        per_group = len(self.dirs) // self.groups
        group_B1 = torch.randint(0, self.groups, (batch_size, 1), generator=g)
        idx_BA = torch.rand(batch_size, per_group, generator=g).argsort(-1)[:, : self.active] + group_B1 * per_group
        coef_BA = torch.rand(batch_size, self.active, generator=g) * 2 + 0.5
        return (coef_BA[..., None] * self.dirs[idx_BA]).sum(1) + 1.0

    def batches(self, batch_size: int, seed: int = 0, start: int = 0):
        i = start
        while True:
            yield self.batch(batch_size, seed, i)
            i += 1


def make_sae(arch: str, seed: int = 0, **overrides):
    """A small SAE (d=32, M=128, k=4; Switch: 4 experts) built with a fixed seed."""
    torch.manual_seed(seed)
    defaults = dict(d_in=D, n_features=128, k=4, **({"n_experts": 4} if arch == "switch" else {}))
    return build_sae(SAEConfig(arch=arch, **{**defaults, **overrides}))


def quick_cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=64, lr=3e-3, log_every=5, progress=False, geometric_median_batch=256,
                device="cpu")
    return TrainConfig(**{**base, **kw})


# --- geometric median --------------------------------------------------------------------------------
def sum_of_distances(x, y):
    return (x.double() - y.double()).norm(dim=1).sum().item()


def test_geometric_median_beats_mean_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    x[:25] += 100.0  # 5% far outliers drag the mean, not the median
    med = geometric_median(x)
    assert sum_of_distances(x, med) < sum_of_distances(x, x.mean(0))
    assert med.norm() < 1.0 < x.mean(0).norm()


def test_geometric_median_matches_scipy_minimiser():
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g).double() * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    xn = x.numpy()

    def objective(y):
        import numpy as np
        return np.linalg.norm(xn - y, axis=1).sum()

    ref = optimize.minimize(objective, xn.mean(0), method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    med = geometric_median(x).numpy()
    assert abs(med - ref).max() < 1e-5
    assert objective(med) <= objective(ref) + 1e-9


@pytest.mark.parametrize("arch,biases", [("topk", ["b_pre"]), ("switch", ["b_pre", "b_router"]),
                                          ("relu", ["b_dec"]), ("gated", ["b_dec"])])
def test_init_biases_sets_centring_biases_to_geometric_median(arch, biases):
    sae = make_sae(arch)
    x = SparseDirections().batch(256, 0, 0)
    assert init_biases(sae, x) == biases
    for name in biases:
        assert torch.allclose(getattr(sae, name), geometric_median(x))


def test_trainer_initialises_biases_from_the_first_activations():
    src = SparseDirections()
    res = train_sae(make_sae("switch"), src, quick_cfg(steps=1, lr=1e-12))  # a negligible step
    median = geometric_median(src.batch(256, 0, 0))  # geometric_median_batch=256 rows of the stream, seed 0
    assert torch.allclose(res.sae.b_pre, median, atol=1e-6) and torch.allclose(res.sae.b_router, median, atol=1e-6)


# --- lr schedule -------------------------------------------------------------------------------------
def test_lr_law_and_schedule_values():
    assert base_lr(TrainConfig(), 2**14) == pytest.approx(2e-4)
    assert base_lr(TrainConfig(), 4 * 2**14) == pytest.approx(1e-4)
    assert base_lr(TrainConfig(), 24576) == pytest.approx(2e-4 / math.sqrt(1.5))
    assert base_lr(TrainConfig(lr=1e-3), 24576) == 1e-3
    # the lr_width option: a FLOP-matched Switch SAE (M = 4 * 2**14, 4 experts) at a TopK SAE's lr
    assert base_lr(TrainConfig(), 4 * 2**14, 2**14) == pytest.approx(1e-4)  # the paper: total width
    assert base_lr(TrainConfig(lr_width="expert"), 4 * 2**14, 2**14) == pytest.approx(2e-4)
    assert base_lr(TrainConfig(lr_scale=4.0), 4 * 2**14) == pytest.approx(4e-4)  # a multiple of the law
    assert base_lr(TrainConfig(lr_scale=2.0, lr_width="expert"), 4 * 2**14, 2**14) == pytest.approx(4e-4)
    with pytest.raises(ConfigError, match="lr_scale"):
        TrainConfig(lr=1e-3, lr_scale=2.0)  # an explicit lr is not scaled: refuse the ambiguity
    expected = {0: 1.0, 79: 1.0, 80: 1.0, 90: 0.5, 95: 0.25, 99: 0.05}  # 100 steps, decay over the last 20
    for step, factor in expected.items():
        assert lr_factor(step, 100, 0.2) == pytest.approx(factor)
    assert [lr_factor(s, 10, 0.0) for s in range(10)] == [1.0] * 10


def test_trainer_applies_the_schedule():
    res = train_sae(make_sae("topk"), SparseDirections(), quick_cfg(steps=20, log_every=1, lr=1e-3, lr_decay_frac=0.5))
    lrs = [row["lr"] for row in res.history]  # row for step s+1 holds the lr used by step s
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 20, 0.5) for s in range(20)])
    assert lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)


# --- decoder upkeep inside the real step ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_step_keeps_decoder_unit_norm_and_removes_exactly_the_parallel_grad(arch, monkeypatch):
    from switch_sae_core import train

    sae = make_sae(arch)
    opt = make_optimizer(sae, quick_cfg())
    src = SparseDirections()
    captured = {}
    original = train.fused_step

    def spy(*args, **kwargs):  # record the decoder gradient around the optimizer phase of the real step (the
        captured["w"] = sae.W_dec.detach().clone()  # gradient is left projected, unclipped here: either path)
        captured["before"] = sae.W_dec.grad.clone()
        total = original(*args, **kwargs)
        captured["after"] = sae.W_dec.grad.clone()
        return total

    monkeypatch.setattr(train, "fused_step", spy)
    for i in range(3):
        train_step(sae, opt, src.batch(64, 0, i), grad_clip=1e9)  # no clipping: the projection alone
        norms = sae.W_dec.detach().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        w, g0, g1 = captured["w"], captured["before"], captured["after"]
        assert g0.abs().max() > 0
        assert (g1 * w).sum(-1).abs().max() < 1e-5 * g0.abs().max()  # orthogonal to each (unit) row
        parallel = (g0 * w).sum(-1, keepdim=True) * w
        assert torch.allclose(g0 - g1, parallel, atol=1e-6 * g0.abs().max())  # exactly the parallel component was removed


@pytest.mark.parametrize("arch", ["topk", "switch", "relu"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e9], ids=["clipped", "not_clipped"])
def test_fused_upkeep_equals_projection_then_torch_clip(arch, max_norm):
    """upkeep_gradients == the unfused recipe: project each decoder row's gradient, then torch's
    clip_grad_norm_ (the ReLU SAE keeps its decoder gradient: no unit-norm rows). Decoder rows of a
    real step are unit norm."""
    sae = make_sae(arch)
    sae.normalize_decoder()
    x = SparseDirections().batch(64, 0, 0)
    sae.zero_grad(set_to_none=True)
    sum(sae.losses(x, sae(x)).values()).backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    if sae.unit_norm_decoder:
        w = sae.W_dec.detach()
        grads["W_dec"] -= (grads["W_dec"] * w).sum(-1, keepdim=True) * w
    leaves = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for leaf, g in zip(leaves, grads.values()):
        leaf.grad = g  # clip_grad_norm_ scales these in place
    expected_norm = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    norm = sae.upkeep_gradients(max_norm)
    torch.testing.assert_close(norm.float(), expected_norm, rtol=1e-5, atol=0)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7 * float(grads[name].abs().max()), msg=name)
    if max_norm < 1:
        assert abs(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in sae.parameters()]))) - max_norm) < 1e-6


# --- learning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
def test_short_run_cuts_mse(arch):
    src = SparseDirections()
    cfg = quick_cfg(steps=100, batch_size=128, lr=1e-2, log_every=50, seed=3)
    # alpha * d * L_aux is sized for GPT-2 activations (MSE ~ 1000); this toy's MSE is ~ 5, so a smaller alpha
    scale = dict(top_e=2, global_topk=True, feature_scaling=True)  # the Scale SAE (Xu et al. 2025)
    sae = make_sae("switch" if arch == "scale" else arch,
                   **({"aux_alpha": 0.01, **(scale if arch == "scale" else {})} if arch != "topk" else {}))
    x_eval = src.batch(1024, seed=99, i=0)
    init_biases(sae, src.batch(256, cfg.seed, 0))  # what the trainer does first
    with torch.no_grad():
        mse0 = metrics.mse(x_eval, sae(x_eval).x_hat).item()
    res = train_sae(sae, src, cfg)
    with torch.no_grad():
        mse1 = metrics.mse(x_eval, res.sae(x_eval).x_hat).item()
    assert mse1 < 0.3 * mse0, (mse0, mse1)
    last = res.history[-1]
    assert last["step"] == 100 and last["l0"] <= 4
    assert 0 < last["fvu"] < 0.5 and last["dead_frac"] >= 0
    if arch != "topk":
        assert len(last["expert_load"]) == 4 and sum(last["expert_load"]) == pytest.approx(1.0)
        assert 0 <= last["router_entropy"] <= math.log(4) + 1e-6


def test_plain_iterator_and_callback():
    src = SparseDirections()
    rows = []
    batches = (src.batch(64, 5, i) for i in range(10))
    res = train_sae(make_sae("topk"), batches, quick_cfg(steps=10, log_every=2), callback=rows.append)
    assert [r["step"] for r in res.history] == [2, 4, 6, 8, 10] and rows == res.history
    assert {"loss", "loss/recon", "mse", "fvu", "l0", "dead_frac", "lr", "tokens"} <= set(rows[0])
    with pytest.raises(TrainingError, match="ran out of batches"):
        train_sae(make_sae("topk"), [src.batch(64, 0, i) for i in range(3)], quick_cfg(steps=5))


# --- in-memory data and token budgets ----------------------------------------------------------------
def test_tensor_source_serves_every_row_once_per_epoch_reproducibly():
    from switch_sae_core.data.source import BatchSource, TensorSource

    x = torch.arange(100 * 3, dtype=torch.float64).reshape(100, 3)  # row r holds 3r, 3r+1, 3r+2
    src = TensorSource(x)
    assert isinstance(src, BatchSource) and src.d_in == 3 and len(src) == 100
    stream = src.batches(30, seed=4)
    batches = [next(stream) for _ in range(10)]  # 300 rows = 3 epochs, batches straddling epoch ends
    assert all(b.shape == (30, 3) and b.dtype == torch.float32 for b in batches)
    rows = torch.cat(batches)[:, 0].long() // 3
    for epoch in range(3):
        assert sorted(rows[100 * epoch: 100 * (epoch + 1)].tolist()) == list(range(100))
    assert not torch.equal(rows[:100], rows[100:200])  # a fresh permutation each epoch
    assert torch.equal(next(src.batches(30, seed=4, start=7)), batches[7])  # resumable: batch 7 directly
    assert not torch.equal(next(src.batches(30, seed=5)), batches[0])
    for bad in (torch.ones(10), torch.ones(0, 3), torch.ones(4, 3, dtype=torch.long), [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="floating-point tensor of shape"):
            TensorSource(bad)


def test_train_on_an_in_memory_tensor_and_a_generator():
    from switch_sae_core.data.source import TensorSource

    src = SparseDirections()
    x_ND = torch.cat([src.batch(64, 1, i) for i in range(20)])  # 1280 rows in memory
    res = train_sae(make_sae("topk"), TensorSource(x_ND), quick_cfg(steps=60, lr=1e-2))
    assert res.history[-1]["fvu"] < 0.5 * res.history[0]["fvu"]  # it learns from them
    again = train_sae(make_sae("topk"), TensorSource(x_ND), quick_cfg(steps=60, lr=1e-2))
    assert torch.equal(again.sae.W_dec, res.sae.W_dec)  # reproducible
    drawn = []

    def simulator():  # e.g. a synthetic benchmark's generator: an endless stream of (B, d) batches
        i = 0
        while True:
            drawn.append(i)
            yield src.batch(64, 2, i)
            i += 1

    res = train_sae(make_sae("topk"), simulator(), quick_cfg(steps=12, geometric_median_batch=128, log_every=4))
    assert res.history[-1]["tokens"] == 12 * 64
    assert len(drawn) == 12  # the median's 2 batches are put back and trained on: none lost, none extra


def test_token_budget():
    cfg = TrainConfig(tokens=64 * 25 + 10, batch_size=64)
    assert cfg.steps == 25 and cfg.tokens is None  # SAELens's rule: tokens // batch size
    assert TrainConfig().steps == 1000 and TrainConfig(steps=7).steps == 7
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg == TrainConfig(steps=25, batch_size=64)
    assert cfg.replace(tokens=6400).steps == 100  # a new token budget replaces the steps
    assert cfg.replace(batch_size=32).steps == 25  # the config keeps steps, not tokens
    with pytest.raises(ConfigError, match="give the budget as steps or as tokens, not both"):
        TrainConfig(steps=10, tokens=6400)
    with pytest.raises(ConfigError, match="less than one batch"):
        TrainConfig(tokens=100, batch_size=4096)
    res = train_sae(make_sae("topk"), SparseDirections(), quick_cfg(steps=None, tokens=64 * 8, log_every=4))
    assert res.steps_done == 8 and res.history[-1]["tokens"] == 64 * 8


def test_token_budget_keeps_the_result_key():
    from switch_sae_core.config import DataConfig
    from switch_sae_core.keys import config_hash

    sae_cfg, data_cfg = SAEConfig(arch="topk"), DataConfig()
    by_tokens = config_hash(sae_cfg, TrainConfig(tokens=4096 * 300), data_cfg)
    assert by_tokens == config_hash(sae_cfg, TrainConfig(steps=300), data_cfg)
    assert by_tokens != config_hash(sae_cfg, TrainConfig(steps=301), data_cfg)
    # and the key of a run configured before `tokens` existed (its dict had no such field) is unchanged
    old_style = {k: v for k, v in TrainConfig(steps=300).to_dict().items() if k != "tokens"}
    assert "tokens" not in old_style and TrainConfig.from_dict(old_style) == TrainConfig(steps=300)


# --- errors and devices ------------------------------------------------------------------------------
def test_nan_batch_raises_naming_the_step():
    src = SparseDirections()
    batches = [src.batch(64, 0, i) for i in range(10)]
    batches[6][3, 2] = float("nan")
    with pytest.raises(TrainingError, match=r"step 6: bad training batch.*NaN"):
        train_sae(make_sae("topk"), batches, quick_cfg(steps=10))


def test_diverged_loss_raises_naming_the_step(monkeypatch):
    sae = make_sae("topk")
    original = sae.losses
    calls = {"n": 0}

    def losses(x, out, dead_mask=None):
        calls["n"] += 1
        terms = original(x, out, dead_mask)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == 4 else terms

    sae.losses = losses
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan"):
        train_sae(sae, SparseDirections(), quick_cfg(steps=10))


def test_wrong_width_batch_is_a_clear_error():
    with pytest.raises(TrainingError, match=r"geometric-median batch.*shape \(batch, 32\)"):
        train_sae(make_sae("topk"), [torch.randn(300, 16)] * 3, quick_cfg(steps=3))


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building the CUDA context on a CPU-only torch
def test_devices_and_autocast_contexts():
    """bf16 autocast on CUDA and CPU (tests/test_precision.py runs it); another device type warns and runs fp32."""
    from switch_sae_core.train import autocast_context

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    for device in ("cpu", "cuda"):
        ctx = autocast_context(torch.device(device), True)
        assert isinstance(ctx, torch.autocast) and (ctx.device, ctx.fast_dtype) == (device, torch.bfloat16)
        assert not isinstance(autocast_context(torch.device(device), False), torch.autocast)
    with pytest.warns(UserWarning, match="autocast_bf16 applies on cuda and cpu; training in full precision on meta"):
        assert not isinstance(autocast_context(torch.device("meta"), True), torch.autocast)


def test_benchmark_script_smoke():
    """benchmarks/bench_train_step.py at tiny sizes, in-process (no timing asserts)."""
    import importlib.util

    from switch_sae_core.paths import project_root

    spec = importlib.util.spec_from_file_location("bench_train_step", project_root() / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    size = bench.SIZES["tiny"]
    wanted = ("topk", "switch-16", "switch-2-flopmatched")
    rows = [bench.run_one(c, size, 64, loop, "cpu", "fp32", repeats=1, warmup=0, threads=0, compile_step=False,
                          floors=loop == "trainer")
            for loop in bench.LOOPS for c in bench.configurations(size["m"]) if c["name"] in wanted]
    assert [(r["loop"], r["name"]) for r in rows] == [(loop, n) for loop in bench.LOOPS for n in wanted]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    topk, fixed, matched = (r["flops"] for r in rows[:3])
    assert topk / fixed > 3 and 0.9 < topk / matched < 1.1  # N=16 at fixed width: fewer FLOPs; matched ~ equal
    rows = bench.with_ratios([dict(r, load_before=0.0, load_after=0.0) for r in rows])
    table = bench.markdown(rows)
    assert "| plain | 64 | switch-16 | 256 | 16 |" in table and "fused Adam" in table
    assert rows[0]["topk_cpu_ratio"] == 1.0


@pytest.mark.parametrize("field,value", [("log_every", 0), ("checkpoint_keep", -1), ("grad_clip", -1.0),
                                         ("dead_window_tokens", 0), ("lr_decay_frac", 1.5)])
def test_bad_train_config_is_refused(field, value):
    from switch_sae_core.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_progress_bar_numbers_are_bias_corrected_moving_averages():
    from switch_sae_core.train import Smoothed

    s = Smoothed(beta=0.9)
    first = s.update({"loss": 2.0, "fvu": 0.5, "l0": 4.0})
    assert first == {"loss (ema)": "2", "fvu (ema)": "0.5", "l0 (ema)": "4"}  # bias correction: no pull to 0
    s.update({"loss": 4.0, "fvu": 0.5, "l0": 4.0})
    got = float(s.update({"loss": 4.0, "fvu": 0.5, "l0": 4.0})["loss (ema)"])
    w = [0.9 ** 2 * 0.1, 0.9 * 0.1, 0.1]  # weights of the three values, normalised by 1 - 0.9^3
    assert got == pytest.approx((w[0] * 2 + (w[1] + w[2]) * 4) / sum(w), rel=1e-3)


def test_geometric_median_refuses_non_finite_rows():
    x = torch.randn(16, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 of 16 rows contain NaN or inf"):
        geometric_median(x)
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        geometric_median(x)
