"""Aggregate finished runs into the results table of Jacovi et al. (2019): mean and std over seeds.

A run is a directory that contains metrics.json from train_addition.py. Runs are grouped by model and by
their command-line overrides (read from Hydra's .hydra/overrides.yaml) except the pooled ones such
as `seed`, so an ablation sweep yields one row per setting and a seed sweep one row per model.
Other metrics.json files, such as those of pretrain_estimator.py, are skipped with a log line.
"""

import json
import logging
import math
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any

import yaml

from estinet.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# MAE on the test lists reported by Jacovi et al. (ICLR 2019) for image addition, trained on k=10.
PAPER_MAE = {"estinet": {10: 0.42, 100: 3.3}, "nalu": {10: 1.42, 100: 7.88}}
# plot_mae switches a panel to a log axis when its largest mean MAE exceeds its smallest by more.
LOG_SCALE_SPREAD = 30.0
DISPLAY_NAMES = {
    "estinet": "EstiNet",
    "nalu": "NALU",
    "reinforce": "REINFORCE",
    "oracle": "Oracle (digit labels)",
}
# Overrides that never define a different experiment, so runs differing only in them are pooled.
POOLED_OVERRIDES = ("seed", "num_threads", "device", "train.progress", "data.root", "resume")
# Overrides left out of the labels only when every run of the aggregation has the same value, so
# that runs of different presets get their own rows while a one-preset table keeps short labels.
SHARED_OVERRIDES = ("experiment",)
# Per-epoch history entries drawn as learning curves, with their axis labels.
CURVE_METRICS = {
    "val_mae": "validation MAE of the sum",
    "val_digit_accuracy": "validation digit accuracy",
}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Return the train_addition.py run directories under the given sweep or run directories.

    A metrics.json without a `model` key is skipped with a log line. Raises ConfigError when no
    train_addition.py result remains and DataError when a metrics.json cannot be read.
    """
    metrics_files: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"runs: {path} does not exist. Pass a run or multirun directory")
        metrics_files.update(path.rglob("metrics.json"))
    where = ", ".join(map(str, paths))
    if not metrics_files:
        raise ConfigError(
            f"runs: no metrics.json found under {where}. "
            "Finished train_addition.py runs write one into their run directory"
        )
    runs = [path.parent for path in sorted(metrics_files) if read_train_metrics(path) is not None]
    if not runs:
        raise ConfigError(
            f"runs: none of the {len(metrics_files)} metrics.json files under {where} is a "
            "train_addition.py result (none has a `model` key). Pass the directory of "
            "train_addition.py runs"
        )
    return runs


def read_train_metrics(path: Path) -> dict[str, Any] | None:
    """Load a metrics.json of train_addition.py, or log and return None for any other metrics.json.

    Raises DataError naming the file when it cannot be read or is not valid JSON.
    """
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"failed to read {path}: {error}. Repair or delete the file, or leave its run out "
            "of `runs`"
        ) from error
    if not isinstance(metrics, dict) or "model" not in metrics:
        log.info("skipped %s: no `model` key, so it is not a train_addition.py result", path)
        return None
    return metrics


def read_overrides(run_dir: Path) -> list[str]:
    """Return the command-line overrides of a run, from Hydra's .hydra/overrides.yaml."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        return []
    try:
        overrides = yaml.safe_load(overrides_file.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DataError(
            f"failed to read {overrides_file}: {' '.join(str(error).split())}. Repair or delete "
            "the file, or leave its run out of `runs`"
        ) from error
    if not isinstance(overrides, list):
        raise DataError(
            f"{overrides_file} is invalid: expected a list of overrides, as Hydra writes it. "
            "Repair or delete the file"
        )
    return [str(override) for override in overrides]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: list[str], key: str) -> str | None:
    """Return the value that `overrides` give `key`, None when they do not set it."""
    for override in overrides:
        if override_key(override) == key and "=" in override:
            value = override.split("=", 1)[1]
            return None if value == "null" else value
    return None


def run_label(
    run_dir: Path, metrics: dict[str, Any], *, shared_keys: tuple[str, ...] = SHARED_OVERRIDES
) -> str:
    """Return the group label: the model, then the overrides, e.g. `estinet train.lr=1e-3`.

    The model override, the pooled overrides, Hydra's own ones and those in `shared_keys` (keys
    with the same value in every run of the aggregation) are left out.
    """
    kept = []
    for override in read_overrides(run_dir):
        key = override_key(override)
        if key in POOLED_OVERRIDES or key == "model" or key.startswith("hydra."):
            continue
        if key in shared_keys:
            continue
        kept.append(override)
    return " ".join([metrics["model"], *sorted(kept)])


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate(run_dirs: list[Path]) -> dict[str, Any]:
    """Group the runs and compute mean and std of every test metric; returns results.json content.

    Run dirs whose metrics.json is not a train_addition.py result are skipped with a log line.
    """
    run_metrics: dict[Path, dict[str, Any]] = {}
    for run_dir in run_dirs:
        metrics = read_train_metrics(run_dir / "metrics.json")
        if metrics is not None:
            metrics["run_dir"] = str(run_dir)
            run_metrics[run_dir] = metrics
    if not run_metrics:
        raise ConfigError("runs: none of the run directories contains a train_addition.py result")

    shared_keys = tuple(
        key for key in SHARED_OVERRIDES
        if len({override_value(read_overrides(run_dir), key) for run_dir in run_metrics}) == 1
    )
    groups: dict[str, list[dict[str, Any]]] = {}
    for run_dir, metrics in run_metrics.items():
        label = run_label(run_dir, metrics, shared_keys=shared_keys)
        groups.setdefault(label, []).append(metrics)

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


def _cell(summary: dict[str, Any], key: str, digits: int, runs: int) -> str:
    """Format a metric as `mean ± std`, or as the mean alone for one run, which has no std."""
    if key not in summary:
        return "n/a"
    if runs == 1:
        return f"{summary[key]['mean']:.{digits}f}"
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
    """Return the results table (mean ± std over seeds) with the paper's MAE beside ours.

    A row of a single seed shows the mean alone, because one run has no std.
    """
    lengths = test_lengths(results)
    header = ["Model", "Seeds"]
    for k in lengths:
        header += [f"MAE k={k}", f"paper k={k}", f"exact k={k}"]
    header.append("digit accuracy")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, group in results["groups"].items():
        model = group["model"]
        runs = len(group["runs"])
        row = [display_name(label, model), str(len(group["seeds"]))]
        for k in lengths:
            paper = PAPER_MAE.get(model, {}).get(k)
            row += [
                _cell(group["metrics"], f"test_mae_k{k}", 3, runs),
                "" if paper is None else f"{paper}",
                _cell(group["metrics"], f"test_exact_k{k}", 3, runs),
            ]
        row.append(_cell(group["metrics"], "test_digit_accuracy", 4, runs))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def needs_log_scale(means: list[float]) -> bool:
    """Return whether bars of these means need a log axis to stay readable.

    On a linear axis, one model far above the others flattens their bars to zero height.
    """
    positive = [mean for mean in means if math.isfinite(mean) and mean > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SCALE_SPREAD


def plot_mae(results: dict[str, Any], path: Path) -> None:
    """Bar chart of test MAE by group and k with std error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = test_lengths(results)
    labels = list(results["groups"])
    names = [display_name(label, results["groups"][label]["model"]) for label in labels]
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 + 1.2 * len(labels), 4), squeeze=False)
    for axis, k in zip(axes[0], lengths):
        means, stds = [], []
        for label in labels:
            summary = results["groups"][label]["metrics"].get(f"test_mae_k{k}")
            means.append(summary["mean"] if summary else math.nan)
            stds.append(summary["std"] if summary else 0.0)
        axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color="tab:blue")
        if needs_log_scale(means):
            axis.set_yscale("log")
            axis.set_ylim(bottom=min(mean for mean in means if mean > 0) / 4)
        for index, (mean, std) in enumerate(zip(means, stds)):
            if math.isfinite(mean):  # the value above the top of the error bar
                axis.annotate(f"{mean:.3g}", (index, mean + std), xytext=(0, 3),
                              textcoords="offset points", ha="center", va="bottom", fontsize=7)
        for index, label in enumerate(labels):
            paper = PAPER_MAE.get(results["groups"][label]["model"], {}).get(k)
            if paper is not None:
                axis.plot([index - 0.4, index + 0.4], [paper, paper], color="tab:red", lw=2,
                          label="paper" if index == 0 or "paper" not in
                          axis.get_legend_handles_labels()[1] else None)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
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
