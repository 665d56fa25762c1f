"""What a run reports: metrics.jsonl, TensorBoard, W&B, a console progress line with ETA, PNG plots, FLOPs.

Only the logging rank (global rank 0) writes; every rank holds the same reduced metrics.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
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
    """Writes one record per step to ``metrics.jsonl`` (and TensorBoard / W&B) and prints progress.

    W&B (``wandb_project``): one W&B run per stage, named ``<run folder>-<stage>`` and grouped by the run
    folder's name, with the run config. Every record of metrics.jsonl becomes one W&B row: its values under
    ``<stage>/<split>/<name>`` and its step under ``<stage>/step``, the x axis of the stage's charts (a row
    per record, so a checkpoint published after later steps is kept: W&B's own step must only grow and would
    drop it). W&B's files go to ``WANDB_DIR``, else to the run folder (a container's working directory is
    not kept), and the run's id to ``<stage>/wandb_run_id``, so a resumed stage (a requeued job) continues
    the same W&B run. ``WANDB_MODE=offline`` writes the runs locally for ``wandb sync``. A W&B failure
    during training (its service process killed by a signal meant for the job, a lost connection) stops W&B
    with one warning and never the training: metrics.jsonl has every record.
    """

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
        config: dict[str, Any] | None = None,
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
            self._wandb = _start_wandb(
                wandb_project, stage_dir, stage, run_name, config, resume=start_step > 0
            )

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
            row = {f"{self.stage}/{split}/{k}": v for k, v in metrics.items()}
            self._call_wandb("log", {f"{self.stage}/step": step, **row})
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

    def _call_wandb(self, method: str, *args: Any) -> None:
        try:
            getattr(self._wandb, method)(*args)
        except Exception as exc:  # W&B is a view of metrics.jsonl: losing it must not end training
            print(
                f"[{self.stage}] warning: W&B stopped ({type(exc).__name__}: {exc}); metrics.jsonl still has "
                "every record",
                file=sys.stderr,
                flush=True,
            )
            self._wandb = None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._call_wandb("finish")
            self._wandb = None


def _start_wandb(
    project: str, stage_dir: Path, stage: str, run_name: str, config: dict[str, Any] | None, resume: bool
) -> Any:
    """The stage's W&B run (see :class:`MetricsLogger`): a new one, or with ``resume`` the one whose id the
    stage folder keeps."""
    import wandb

    id_file = stage_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=project,
        name=f"{run_name}-{stage}",
        group=run_name,
        id=run_id,
        resume="allow",
        dir=os.environ.get("WANDB_DIR") or str(stage_dir.parent),
        config=config,
        reinit="finish_previous",
    )
    run.define_metric(f"{stage}/step")
    run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    return run


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
