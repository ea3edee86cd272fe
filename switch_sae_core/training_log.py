"""What training logs: the numbers of a step (`step_metrics`), where they go (`Logger`: the history, a callback,
wandb) and the smoothed numbers of the progress bar (`Smoothed`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from torch import Tensor

from . import metrics
from .config import SAEConfig, TrainConfig

if TYPE_CHECKING:
    from .train import StepOutput


def step_metrics(x_BD: Tensor, step: StepOutput, tracker: metrics.DeadFeatureTracker,
                 n_experts: int) -> dict[str, Any]:
    """The numbers logged for one step (Python floats; syncs with the device)."""
    out = step.out
    row: dict[str, Any] = {f"loss/{k}": v.item() for k, v in step.losses.items()}
    row["loss"] = step.loss.item()
    row["mse"] = metrics.mse(x_BD, out.x_hat).item()
    row["fvu"] = metrics.fvu(x_BD, out.x_hat).item()
    row["l0"] = metrics.l0(out.latent_acts).item()
    row["dead_frac"] = tracker.dead_fraction().item()
    if hasattr(out, "router_probs"):
        load_N = metrics.expert_load(out.expert_indices, n_experts)
        row["expert_load"] = load_N.tolist()
        row["load_entropy"] = metrics.load_entropy(load_N).item()
        row["router_entropy"] = metrics.router_entropy(out.router_probs).item()
    return row


class Logger:
    """History list + optional callback + optional wandb (imported only when a project is set)."""

    def __init__(self, train_cfg: TrainConfig, sae_cfg: SAEConfig,
                 callback: Optional[Callable[[dict[str, Any]], None]] = None):
        self.history: list[dict[str, Any]] = []
        self.callback = callback
        self.wandb_run = None
        if train_cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                warnings.warn("wandb_project is set but wandb is not installed: logging to history only")
            else:
                self.wandb_run = wandb.init(project=train_cfg.wandb_project,
                                            config={"sae": sae_cfg.to_dict(), "train": train_cfg.to_dict()})

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.callback is not None:
            self.callback(row)
        if self.wandb_run is not None:
            flat = {k: v for k, v in row.items() if not isinstance(v, list)}
            for k, v in row.items():
                if isinstance(v, list):
                    flat.update({f"{k}/{i}": x for i, x in enumerate(v)})
            self.wandb_run.log(flat, step=row["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class Smoothed:
    """Exponential moving averages of the per-batch numbers the progress bar shows (they jump per batch).

    ema <- beta * ema + (1 - beta) * value, bias-corrected by 1 - beta^n (Adam's rule, Kingma & Ba 2015)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.n, self.ema = beta, 0, {}

    def update(self, row: dict[str, Any], names: Iterable[str] = ("loss", "fvu", "l0")) -> dict[str, str]:
        self.n += 1
        for k in names:
            self.ema[k] = self.beta * self.ema.get(k, 0.0) + (1 - self.beta) * row[k]
        corr = 1 - self.beta ** self.n
        return {f"{k} (ema)": f"{v / corr:.4g}" for k, v in self.ema.items()}

