"""Aggregate finished runs into the paper's results table: mean and std over seeds per model and k.

A run is a directory holding metrics.json from train_addition.py. Runs are grouped by model and by
every command-line override except `seed` (read from Hydra's .hydra/overrides.yaml), so an
ablation sweep yields one row per setting and a seed sweep one row per model.
"""

import json
import math
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any

import yaml

from estinet.errors import ConfigError

# MAE on the test lists reported by Jacovi et al. (ICLR 2019) for image addition, trained on k=10.
PAPER_MAE = {"estinet": {10: 0.42, 100: 3.3}, "nalu": {10: 1.42, 100: 7.88}}
DISPLAY_NAMES = {
    "estinet": "EstiNet",
    "nalu": "NALU",
    "reinforce": "REINFORCE",
    "oracle": "Oracle (digit labels)",
}
# Overrides that never define a different experiment, so runs differing only in them are pooled.
POOLED_OVERRIDES = ("seed", "num_threads", "device", "train.progress", "data.root", "resume")
# Per-epoch history entries drawn as learning curves, with their axis labels.
CURVE_METRICS = {
    "val_mae": "validation MAE of the sum",
    "val_digit_accuracy": "validation digit accuracy",
}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (those with metrics.json) under the given sweep or run directories."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"runs: {path} does not exist. Pass a run or multirun directory")
        runs.extend(sorted(metrics.parent for metrics in path.rglob("metrics.json")))
    if not runs:
        raise ConfigError(
            f"runs: no metrics.json found under {', '.join(map(str, paths))}. "
            "Finished train_addition.py runs write one into their run directory"
        )
    return sorted(set(runs))


def run_label(run_dir: Path, metrics: dict[str, Any]) -> str:
    """Group label: the model, then the overrides other than the pooled ones, e.g. `estinet lr=...`."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if overrides_file.exists():
        overrides = yaml.safe_load(overrides_file.read_text()) or []
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in POOLED_OVERRIDES or key in ("model", "experiment") or key.startswith("hydra."):
            continue
        kept.append(override)
    return " ".join([metrics["model"], *sorted(kept)])


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate(run_dirs: list[Path]) -> dict[str, Any]:
    """Group the runs and compute mean and std of every test metric; returns results.json content."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["run_dir"] = str(run_dir)
        groups.setdefault(run_label(run_dir, metrics), []).append(metrics)

    results: dict[str, Any] = {"groups": {}}
    for label, runs in sorted(groups.items()):
        keys = sorted(
            key for key in runs[0]
            if re.fullmatch(r"test_\w+", key) and all(isinstance(r.get(key), (int, float)) for r in runs)
        )
        summary = {key: dict(zip(("mean", "std"), mean_std([r[key] for r in runs]))) for key in keys}
        results["groups"][label] = {
            "model": runs[0]["model"],
            "uses_digit_labels": runs[0].get("uses_digit_labels", False),
            "seeds": sorted(r["seed"] for r in runs),
            "runs": [r["run_dir"] for r in runs],
            "train_seconds": statistics.fmean(r.get("train_seconds", math.nan) for r in runs),
            "metrics": summary,
            "histories": [r.get("history", []) for r in runs],
            "learning_curve": learning_curve([r.get("history", []) for r in runs]),
        }
    return results


def learning_curve(histories: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Summarize histories as the mean and std over runs of each CURVE_METRICS value per lists seen.

    Entries of different runs are matched by `lists_seen`. Non-finite values are left out, and
    `runs` counts the runs behind each point, which is fewer than the group's when some runs
    stopped early or were trained for fewer epochs.
    """
    points: dict[int, dict[str, list[float]]] = {}
    for history in histories:
        for entry in history:
            if "lists_seen" not in entry:
                continue
            values = points.setdefault(int(entry["lists_seen"]), {})
            for key in CURVE_METRICS:
                value = entry.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    values.setdefault(key, []).append(float(value))

    curve = []
    for lists_seen, values in sorted(points.items()):
        if not values:
            continue
        point: dict[str, float] = {"lists_seen": lists_seen}
        for key, samples in values.items():
            point[f"{key}_mean"], point[f"{key}_std"] = mean_std(samples)
        point["runs"] = max(len(samples) for samples in values.values())
        curve.append(point)
    return curve


def display_name(label: str, model: str) -> str:
    """Return the group label with the model's display name in place of its config name."""
    return label.replace(model, DISPLAY_NAMES.get(model, model), 1)


def _cell(summary: dict[str, Any], key: str, digits: int) -> str:
    if key not in summary:
        return "n/a"
    return f"{summary[key]['mean']:.{digits}f} ± {summary[key]['std']:.{digits}f}"


def test_lengths(results: dict[str, Any]) -> list[int]:
    lengths = set()
    for group in results["groups"].values():
        for key in group["metrics"]:
            match = re.fullmatch(r"test_mae_k(\d+)", key)
            if match:
                lengths.add(int(match.group(1)))
    return sorted(lengths)


def markdown_table(results: dict[str, Any]) -> str:
    """The results table (mean ± std over seeds) with the paper's MAE beside ours."""
    lengths = test_lengths(results)
    header = ["Model", "Seeds"]
    for k in lengths:
        header += [f"MAE k={k}", f"paper k={k}", f"exact k={k}"]
    header.append("digit accuracy")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group in results["groups"].items():
        model = group["model"]
        row = [display_name(label, model), str(len(group["seeds"]))]
        for k in lengths:
            paper = PAPER_MAE.get(model, {}).get(k)
            row += [
                _cell(group["metrics"], f"test_mae_k{k}", 3),
                "" if paper is None else f"{paper}",
                _cell(group["metrics"], f"test_exact_k{k}", 3),
            ]
        row.append(_cell(group["metrics"], "test_digit_accuracy", 4))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_mae(results: dict[str, Any], path: Path) -> None:
    """Bar chart of test MAE by group and k with std error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = test_lengths(results)
    labels = list(results["groups"])
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 + 1.2 * len(labels), 4), squeeze=False)
    for axis, k in zip(axes[0], lengths):
        means, stds = [], []
        for label in labels:
            summary = results["groups"][label]["metrics"].get(f"test_mae_k{k}")
            means.append(summary["mean"] if summary else math.nan)
            stds.append(summary["std"] if summary else 0.0)
        axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color="tab:blue")
        for index, label in enumerate(labels):
            paper = PAPER_MAE.get(results["groups"][label]["model"], {}).get(k)
            if paper is not None:
                axis.plot([index - 0.4, index + 0.4], [paper, paper], color="tab:red", lw=2,
                          label="paper" if index == 0 or "paper" not in
                          axis.get_legend_handles_labels()[1] else None)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        axis.set_title(f"test MAE, k={k}")
        axis.set_ylabel("mean absolute error of the sum")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _legend_label(label: str, group: dict[str, Any]) -> str:
    text = f"{display_name(label, group['model'])} (n={len(group['seeds'])})"
    return textwrap.fill(text, width=130, subsequent_indent="    ")


def plot_learning_curves(results: dict[str, Any], path: Path) -> None:
    """Plot validation MAE and digit accuracy against training lists seen, as PNG.

    Each group gets a line of means with a band of ± one std over its runs. Groups whose runs have
    no history entries are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results["groups"]
    # One legend for both panels, below them: group labels with overrides can be long.
    legend_lines = sum(len(_legend_label(label, group).splitlines()) for label, group in groups.items())
    legend_inches = 0.3 + 0.17 * legend_lines
    height = 4.2 + legend_inches
    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(11, height), squeeze=False)
    for axis, (key, axis_label) in zip(axes[0], CURVE_METRICS.items()):
        for color_index, (label, group) in enumerate(groups.items()):
            points = [point for point in group.get("learning_curve", []) if f"{key}_mean" in point]
            if not points:
                continue
            lists_seen = [point["lists_seen"] for point in points]
            means = [point[f"{key}_mean"] for point in points]
            stds = [point[f"{key}_std"] for point in points]
            color = f"C{color_index % 10}"  # the same color for a group in both panels
            axis.plot(lists_seen, means, marker="o", markersize=3, color=color,
                      label=_legend_label(label, group))
            axis.fill_between(lists_seen, [m - s for m, s in zip(means, stds)],
                              [m + s for m, s in zip(means, stds)], color=color, alpha=0.2,
                              linewidth=0)
        axis.set_title(f"{axis_label} (mean ± std over seeds)", fontsize=10)
        axis.set_xlabel("training lists seen")
        axis.set_ylabel(axis_label)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, legend_inches / height, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
