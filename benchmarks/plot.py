"""Figures from the overhead benchmark's JSON: per-round ratios against targets, and latencies.

For each ``benchmarks/results/overhead_*.json`` written by ``bench_overhead.py`` (or the files
named on the command line), writes beside it:

- ``<name>_ratios.png``: one panel per targeted ratio and phase, with every round's value,
  the median and its bootstrap 95% interval (as the JSON has them), the target's bound as a
  dashed line, and the verdict in the title. The y range spans the interval, the bound and
  the 10th-90th percentiles of the rounds, so a few wild rounds may lie outside it;
- ``<name>_latency.png``: the median time per configuration, per phase, with the quartiles
  over rounds as whiskers.

Needs matplotlib (``pip install -e '.[bench]'``). Files without per-round data (written by
earlier versions of the benchmark) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from stats import Ratio  # noqa: E402  (beside this script, which Python puts on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"holds": "tab:green", "falls short": "tab:red", "undetermined": "tab:gray"}


def ratio_panel(ax: plt.Axes, assessment: dict, rounds: list[dict[str, float]]) -> None:
    """One ratio in one phase: per-round values, median with interval, target bound."""
    values = [Ratio(assessment["ratio"])(times) for times in rounds]
    colour = COLOURS[assessment["verdict"]]
    xs = [0.15 * math.sin(7.0 * i) for i in range(len(values))]  # a fixed jitter, so points don't overlap
    ax.scatter(xs, values, s=12, color="0.55", zorder=2, label="rounds")
    median, low, high = assessment["median"], assessment["low"], assessment["high"]
    ax.errorbar([0.45], [median], yerr=[[median - low], [high - median]], fmt="o", color=colour, capsize=4, zorder=3,
                label="median, 95% CI")
    bound = float(assessment["target"].split()[1])
    ax.axhline(bound, color="black", linestyle="--", linewidth=1, label=f"target {assessment['target']}")
    ax.set_ylim(*_limits(values, low, high, bound))
    ax.set_xlim(-0.5, 0.8)
    ax.set_xticks([])
    ax.set_title(f"{assessment['ratio']} ({assessment['phase']})\n{assessment['verdict']}", fontsize=9, color=colour)
    ax.tick_params(labelsize=8)


def _limits(values: list[float], low: float, high: float, bound: float) -> tuple[float, float]:
    """Y limits showing the interval, the bound and the middle of the rounds; ratios whose
    denominator nears zero have wild rounds, which would squash everything else."""
    qs = statistics.quantiles(values, n=10) if len(values) > 2 else [min(values), max(values)]
    lo, hi = min(qs[0], low, bound), max(qs[-1], high, bound)
    pad = 0.08 * (hi - lo or abs(bound) or 1.0)
    return lo - pad, hi + pad


def plot_ratios(result: dict, out: Path) -> None:
    """The targeted ratios' figure."""
    targeted = [a for a in result["assessments"] if a["target"]]
    cols = 4
    rows = math.ceil(len(targeted) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax, assessment in zip(axes.flat, targeted, strict=False):
        ratio_panel(ax, assessment, result["rounds_ms"][assessment["phase"]])
    for ax in list(axes.flat)[len(targeted):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Per-round ratios against targets: {_machine(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_latency(result: dict, out: Path) -> None:
    """The latency figure: median ms per configuration, per phase, with quartile whiskers."""
    phases = list(result["rounds_ms"])
    fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 0.32 * len(result["medians_ms"]["decode"]) + 1.5))
    for ax, phase in zip(axes, phases, strict=True):
        rounds = result["rounds_ms"][phase]
        names = sorted(result["medians_ms"][phase], key=result["medians_ms"][phase].get)
        quartiles = [statistics.quantiles([r[name] for r in rounds], n=4) for name in names]
        medians = [q[1] for q in quartiles]
        whiskers = [[m - q[0] for m, q in zip(medians, quartiles, strict=True)],
                    [q[2] - m for m, q in zip(medians, quartiles, strict=True)]]
        ax.barh(names, medians, xerr=whiskers, color="tab:blue", alpha=0.75, capsize=3)
        for y, (m, q) in enumerate(zip(medians, quartiles, strict=True)):
            ax.text(q[2], y, f"  {m:.3g}", va="center", fontsize=7)
        plain = result["medians_ms"][phase]["a"]
        ax.axvline(plain, color="black", linestyle=":", linewidth=1)
        if max(medians) > 10 * plain:
            ax.set_xscale("log")  # eager hooks on a GPU take tens of compiled steps
        ax.set_xlabel(f"{phase}: ms per step (median, quartiles over rounds; dotted: a)")
        ax.tick_params(labelsize=8)
    fig.suptitle(f"Latency per configuration: {_machine(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _machine(result: dict) -> str:
    m, c = result["machine"], result.get("config", {})
    where = m.get("gpu") or f"{m['cpus']}-core CPU"
    return f"{where}, torch {m['torch']}, model {c.get('model', 'default')}, SAE {c.get('sae', '')}, {c.get('repeats')} rounds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="JSON files (default: benchmarks/results/overhead_*.json)")
    args = parser.parse_args()
    for path in args.files or sorted(RESULTS.glob("overhead_*.json")):
        result = json.loads(path.read_text())
        if "assessments" not in result or "rounds_ms" not in result:
            print(f"skipping {path}: no per-round data (written by an earlier bench_overhead.py)")
            continue
        for kind, plot in (("ratios", plot_ratios), ("latency", plot_latency)):
            out = path.with_name(f"{path.stem}_{kind}.png")
            plot(result, out)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
