"""Interleaved throughput measurements and the machine facts to print beside them.

Timings on a shared CPU drift with the load of other processes. Each repeat therefore runs every
case once, in a rotated order, so that all cases see the same load, and ratios are taken between
cases of the same repeat. Besides wall-clock time, each case records the CPU time of this process,
which depends far less on the load of other processes as long as they do not share a core's caches.
"""

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One measured workload.

    `run` does one unit of work (a training step, an evaluation pass) and returns how many items
    (images or list slots) it covered. `prepare`, if given, runs untimed before each repeat.
    """

    name: str
    run: Callable[[], int]
    units: int = 1  # units of work per repeat
    warmup_units: int = 1
    prepare: Callable[[], None] | None = None


@dataclass
class Measurement:
    """Throughput of one case, one value per repeat, in items per second."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # items per second of this process's CPU time

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def measure_interleaved(
    cases: list[Case], repeats: int, *, log: Callable[[str], None] = print
) -> dict[str, Measurement]:
    """Warm every case up, then time `repeats` rounds in which each case runs `units` units.

    The order of the cases rotates by one position every round, so no case always runs right
    after the same neighbour.
    """
    for case in cases:
        started = time.perf_counter()
        for _ in range(case.warmup_units):
            case.run()
        log(f"warm-up {case.name}: {time.perf_counter() - started:.1f} s")

    results = {case.name: Measurement(case.name) for case in cases}
    for round_index in range(repeats):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if case.prepare is not None:
                case.prepare()
            items = 0
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(case.units):
                items += case.run()
            wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
            results[case.name].wall.append(items / wall)
            results[case.name].cpu.append(items / cpu if cpu > 0 else float("nan"))
        log(f"round {round_index + 1}/{repeats} done, load average {os.getloadavg()[0]:.2f}")
    return results


def paired_ratio(numerator: Measurement, denominator: Measurement, clock: str = "wall") -> float:
    """Median over repeats of numerator/denominator throughput, taken within each repeat."""
    top, bottom = getattr(numerator, clock), getattr(denominator, clock)
    return statistics.median(a / b for a, b in zip(top, bottom, strict=True))


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    """Return the commit of the checkout, with `+changes` when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def machine_facts() -> dict[str, str]:
    """Facts that decide how comparable a measurement is: hardware, software, load."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "CPU": cpu_model(),
        "logical cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch intra-op threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "checkout": git_revision(),
        "load average (1, 5, 15 min) at start": load,
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
