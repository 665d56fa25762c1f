"""What a run reports: metrics.jsonl, TensorBoard, W&B, a console progress line with ETA, PNG plots, FLOPs.

Only the logging rank (global rank 0) writes; every rank holds the same reduced metrics.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from wrpo_nemo.models.config import ModelConfig

PLOTTED = ("loss", "rewards/margins", "rewards/accuracies", "alpha")


def model_flops_per_token(cfg: ModelConfig, mean_context: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of a Llama-style decoder.

    Forward: 2 FLOPs per weight of the matmuls (attention projections with grouped KV, SwiGLU MLP, output
    layer) plus the attention scores and values, ``4 * layers * hidden * context`` with causal masking
    counting half of ``context``.
    """
    h, layers = cfg.hidden_size, cfg.num_layers
    kv = cfg.num_query_groups * cfg.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.ffn_hidden_size
    matmul = 2 * (layers * per_layer + h * cfg.vocab_size)
    attention = 4 * layers * h * mean_context / 2
    return 3.0 * (matmul + attention)


class MetricsLogger:
    """Writes one record per step to ``metrics.jsonl`` (and TensorBoard / W&B) and prints progress."""

    def __init__(
        self,
        stage_dir: Path,
        stage: str,
        total_steps: int,
        *,
        enabled: bool,
        log_interval: int,
        tensorboard: bool,
        wandb_project: str | None,
        run_name: str,
        start_step: int = 0,
    ) -> None:
        self.stage, self.total_steps, self.enabled = stage, total_steps, enabled
        self.log_interval = max(1, log_interval)
        self.path = stage_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        self._start = time.perf_counter()
        self._first_step: int | None = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        _truncate(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(stage_dir.parent / "tensorboard" / stage))
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=f"{run_name}-{stage}", reinit=True)

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        """Record ``metrics`` of optimizer step ``step`` (1-based: steps completed)."""
        if not self.enabled:
            return
        record = {"stage": self.stage, "split": split, "step": step, **metrics}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            if self._tb is not None and isinstance(value, int | float):
                self._tb.add_scalar(f"{self.stage}/{split}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{self.stage}/{split}/{k}": v for k, v in metrics.items()}, step=step)
        if split == "train" and (step % self.log_interval == 0 or step == self.total_steps):
            self._print(step, metrics)
        elif split == "eval":
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"[{self.stage}] eval @ step {step}: {shown}", flush=True)

    def _print(self, step: int, metrics: dict[str, Any]) -> None:
        if self._first_step is None:
            self._first_step, self._start = step, time.perf_counter()
            eta = "?"
        else:
            per_step = (time.perf_counter() - self._start) / max(1, step - self._first_step)
            eta = _duration(per_step * (self.total_steps - step))
        width = 24
        done = int(width * step / self.total_steps)
        bar = "#" * done + "." * (width - done)
        keys = ("loss", "rewards/margins", "rewards/accuracies", "alpha", "lr", "grad_norm", "tokens_per_s")
        shown = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in keys if k in metrics)
        print(f"[{self.stage}] [{bar}] {step}/{self.total_steps} ETA {eta}  {shown}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate(path: Path, start_step: int) -> None:
    """Keep only the records of steps up to ``start_step`` (where a resumed run continues; 0 for a fresh one),
    so a resume after a crash never writes a (split, step) twice. Atomic: a new file renamed over the old."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    kept = [line for line in kept if json.loads(line).get("step", 0) <= start_step]
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text("".join(kept), encoding="utf-8")
    os.replace(staging, path)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(run_dir: Path, stages: list[str]) -> list[Path]:
    """PNG plots of loss, reward margins, accuracies and alpha (train and eval) for each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage in stages:
        records = read_metrics(run_dir / stage / "metrics.jsonl")
        names = [n for n in PLOTTED if any(n in r for r in records)]
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for split, style in (("train", "-"), ("eval", "o--")):
                points = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, label=split, markersize=4)
            ax.set_title(f"{stage}: {name}")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = run_dir / f"curves_{stage}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
