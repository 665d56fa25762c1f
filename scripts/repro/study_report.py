"""The study's outputs: ``results.json``, ``results.md`` (mean ± std over seeds) and two plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROLES = ("source_chosen", "target_chosen", "rejected")
ROLE_NAMES = {"source_chosen": "r(y_ws)", "target_chosen": "r(y_wt)", "rejected": "r(y_l)"}
METRICS = {
    "accuracy": "greedy accuracy",
    "sample_score": "sampled score",
    "sample_accuracy": "sampled accuracy",
    "source_style": "answers in the source's style",
}
"""Per-objective metrics of the table, in order."""


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def final_rewards(curves: dict | None) -> dict[str, float] | None:
    """The held-out implicit rewards at the last evaluation of stage 2."""
    if not curves or len(curves["eval"]) < 2:
        return None
    last = curves["eval"][-1]
    return {role: last[role] for role in ROLES}


def aggregate(per_seed: list[dict], objectives: dict) -> dict[str, dict]:
    """Per objective and metric: the values over seeds, their mean and std."""
    table: dict[str, dict] = {}
    for name in objectives:
        rows = [s["objectives"][name] for s in per_seed]
        values = {m: [r["metrics"][m] for r in rows] for m in METRICS}
        finals = [final_rewards(r["curves"]) for r in rows]
        if all(f is not None for f in finals):
            for role in ROLES:
                values[role] = [f[role] for f in finals]
        table[name] = {
            m: {"values": v, "mean": mean_std(v)[0], "std": mean_std(v)[1]} for m, v in values.items()
        }
    return table


def reference_logps(seed_result: dict) -> dict[str, float] | None:
    """The SFT (reference) model's mean log-probs of the held-out y_ws, y_wt, y_l (any trained objective's run
    gives the same: one reference, one held-out set)."""
    for result in seed_result["objectives"].values():
        if result["curves"]:
            return result["curves"]["reference_logps"]
    return None


def _cell(entry: dict | None, digits: int = 3) -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def markdown(
    target: dict, per_seed: list[dict], objectives: dict, table: dict, wall: float, scale: dict, quick: bool
) -> str:
    seeds = [s["seed"] for s in per_seed]
    lines = [
        f"# WRPO toy study{' (quick)' if quick else ''}: {len(seeds)} seed(s) {seeds}, wall time {wall / 60:.1f} min",
        "",
        f"Stage 2 from each seed's SFT checkpoint: lr {scale['lr_wrpo']:g}, beta {scale['beta']:g}, "
        f"{scale['wrpo_epochs']} epoch(s), {scale['batch']} prompts per step; k = {scale['samples']} samples per "
        f"prompt. Mean ± std over seeds. Accuracy and scores on {scale['test']} held-out test questions; "
        "r(.) = beta x log(pi / pi_SFT) on the held-out split at the end of stage 2.",
        "",
        "| objective | " + " | ".join(METRICS.values()) + " | " + " | ".join(ROLE_NAMES.values()) + " |",
        "|---|" + "---|" * (len(METRICS) + len(ROLES)),
    ]
    t = target["metrics"]
    native = " | ".join(f"{t[m]:.3f}" for m in METRICS)
    lines.append(f"| Target (native, before SFT; one model) | {native} |" + " - |" * len(ROLES))
    for name, (label, _) in objectives.items():
        row = table[name]
        cells = [_cell(row[m]) for m in METRICS] + [_cell(row.get(r)) for r in ROLES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Data per seed: stage-2 and held-out prompts of the pool, the SFT model's k samples each; "
              "log pi_SFT(y) = mean summed log-prob of the held-out records' responses under the SFT model.", "",
              "| seed | selected | left out: target scores tied | target sample accuracy | y_wt correct | "
              "y_l correct | y_wt = y_ws | y_ws scored above y_wt | log pi_SFT(y_ws) | log pi_SFT(y_wt) | "
              "log pi_SFT(y_l) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in per_seed:
        sel = s["selection"]
        tied = sel["skipped_by_cause"].get("target_scores_tied", 0)
        ref = reference_logps(s)
        logps = " | ".join(f"{ref[r]:.2f}" if ref else "-" for r in ROLES)
        lines.append(
            f"| {s['seed']} | {sel['selected']} | {tied} | {sel['sample_accuracy']:.3f} | {sel['wt_accuracy']:.3f} | "
            f"{sel['wl_accuracy']:.3f} | {sel['wt_equals_ws']:.3f} | {sel['ws_scores_above_wt']:.3f} | {logps} |"
        )
    return "\n".join(lines) + "\n"


def plot(out: Path, target: dict, per_seed: list[dict], objectives: dict, table: dict) -> list[Path]:
    """``accuracy.png`` (greedy accuracy and sampled score per objective, seeds as dots) and
    ``rewards.png`` (held-out implicit reward of each role over stage 2, one line per objective)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(objectives)
    labels = [objectives[n][0] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric in zip(axes, ("accuracy", "sample_score"), strict=True):
        means = [table[n][metric]["mean"] for n in names]
        stds = [table[n][metric]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color="#9ecae1", edgecolor="#3182bd", capsize=3)
        for i, n in enumerate(names):
            vals = table[n][metric]["values"]
            ax.plot([i] * len(vals), vals, "k.", markersize=5)
        ax.axhline(target["metrics"][metric], color="grey", linestyle=":", label="target before SFT")
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(METRICS[metric] + " (held-out test questions)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    trained = [n for n in names if objectives[n][1] is not None]
    fig, axes = plt.subplots(1, len(ROLES), figsize=(15, 4.2), sharey=True)
    for ax, role in zip(axes, ROLES, strict=True):
        for n in trained:
            curves = [s["objectives"][n]["curves"]["eval"] for s in per_seed]
            steps = [p["step"] for p in curves[0]]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i][role] for c in curves) for i in range(length)]
            ax.plot(steps[:length], mean, marker="o", markersize=3, label=objectives[n][0])
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"{ROLE_NAMES[role]} on held-out prompts")
        ax.set_xlabel("stage-2 optimizer step")
    axes[0].set_ylabel("implicit reward beta x log(pi / pi_ref), mean over seeds")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "rewards.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write(out: Path, target: dict, per_seed: list[dict], objectives: dict, wall: float, *, scale: dict,
          quick: bool, jobs: int) -> dict:  # fmt: skip
    """Write ``results.json``, ``results.md`` and the plots; returns what ``results.json`` holds."""
    table = aggregate(per_seed, objectives)
    results = {"quick": quick, "scale": scale, "jobs": jobs, "wall_seconds": wall, "target": target,
               "table": table, "per_seed": per_seed,
               "labels": {n: label for n, (label, _) in objectives.items()}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(target, per_seed, objectives, table, wall, scale, quick))
    plot(out, target, per_seed, objectives, table)
    return results
