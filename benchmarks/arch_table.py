"""The "Supported architectures" table: runs the architecture sweep's checks
(``tests/test_architecture_sweep.py``) on every text decoder-only entry of the installed
transformers' causal-LM mapping, and writes a Markdown table plus the raw results as JSON.

    PYTHONPATH=. python benchmarks/arch_table.py [--only ARCH ...] [--out benchmarks/results/architectures.md] [--readme README.md]
    PYTHONPATH=. python benchmarks/arch_table.py --from-json benchmarks/results/architectures.json --readme README.md

``--readme`` rewrites the README's "Supported architectures" table (between its
``<!-- architectures -->`` markers): architectures grouped by the sites they expose.

Status: ``pass`` (every site the reference finds is exposed and steers like it, unsteered
logits equal the plain model's, no recompiles), ``partial`` (the same, but some sites the
reference finds are not exposed), ``fail`` (an error, no sites, or a check that failed),
``wrong`` (steer() accepted a site whose steered logits differ from the reference: silent).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

from tests.test_architecture_sweep import ARCHS, KNOWN_FAILURES, SKIPPED, SweepResult, sweep_one

RESULTS = Path(__file__).parent / "results"
# Short names of the hooks in the sites column, in forward order.
SHORT = {
    "hook_resid_pre": "pre", "attn.hook_z": "z", "hook_attn_out": "attn", "hook_resid_mid": "mid",
    "hook_mlp_in": "mlp_in", "hook_mlp_out": "mlp", "hook_resid_post": "post",
}


def sites_cell(sites: tuple[str, ...], by_layer: bool = False) -> str:
    """The hooks named, once if every layer has the same ones (and not ``by_layer``), else per layer."""
    per_layer: dict[int, list[str]] = {}
    for name in sites:
        _, layer, hook = name.split(".", 2)
        per_layer.setdefault(int(layer), []).append(SHORT.get(hook, hook))
    if not per_layer:
        return "none"
    kinds = {tuple(v) for v in per_layer.values()}
    if len(kinds) == 1 and not by_layer:
        return " ".join(next(iter(kinds)))
    return "; ".join(f"L{layer}: {' '.join(v)}" for layer, v in sorted(per_layer.items()))


def notes_cell(result: SweepResult) -> str:
    """Why an architecture is not ``pass`` (the test's KNOWN_FAILURES diagnosis where it has one),
    and the sites missing or not checked by the reference."""
    notes = [] if result.fullgraph else ["steered with fullgraph=False: the model itself breaks the graph"]
    if result.status != "pass":
        notes.append(KNOWN_FAILURES.get(result.arch) or result.details())
    if result.missing:
        notes.append("missing " + sites_cell(tuple(result.missing), by_layer=True))
    if result.unverified:
        notes.append("not checked (the reference finds no such branch): " + sites_cell(tuple(result.unverified), True))
    return "; ".join(notes).replace("|", "/")


def markdown(results: list[SweepResult]) -> str:
    """The table of built architectures, then the unbuildable and skipped entries with reasons."""
    built = [r for r in results if r.build_error is None]
    counts = Counter(r.status for r in built)
    lines = [
        "## Supported architectures",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; tiny random models (2 layers, "
        "hidden 64), `backend=\"aot_eager\"`, checked against the eager hook reference of "
        "`tests/test_architecture_sweep.py`. Sites: pre/post = resid_pre/resid_post, attn/mlp = attn_out/mlp_out, "
        "mid = resid_mid, z = attn.hook_z, mlp_in = hook_mlp_in.",
        "",
        f"{len(built)} built: " + ", ".join(f"{counts[s]} {s}" for s in ("pass", "partial", "fail", "wrong"))
        + f" ({sum(r.status == 'pass' and bool(r.unverified) for r in built)} pass with sites the reference cannot check).",
        "",
        "| architecture | sites found | status | notes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.arch} | {sites_cell(r.sites)} | {r.status} | {notes_cell(r)} |" for r in built]
    lines += ["", "### Not built offline", ""]
    lines += [f"- `{r.arch}`: {r.build_error}" for r in results if r.build_error is not None]
    lines += ["", "### Not text decoder-only (skipped)", ""]
    lines += [f"- `{name}`: {why}" for name, why in sorted(SKIPPED.items())]
    return "\n".join(lines) + "\n"


def as_json(result: SweepResult) -> dict:
    """Everything the sweep recorded on one architecture."""
    return {
        "arch": result.arch, "status": result.status, "build_error": result.build_error, "sites": list(result.sites),
        "failures": result.failures, "wrong": result.wrong, "missing": result.missing,
        "unverified": result.unverified, "checked": len(result.checked),  # site x edit pairs that matched
        "fullgraph": result.fullgraph,
    }


README_START, README_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def readme_table(results: list[SweepResult]) -> str:
    """The README's table: passing architectures grouped by the sites they expose, then each other
    built architecture with its status and why."""
    built = [r for r in results if r.build_error is None]
    groups: dict[str, list[str]] = {}
    for r in (r for r in built if r.status == "pass"):
        groups.setdefault(sites_cell(r.sites), []).append(r.arch)
    passing = sum(len(names) for names in groups.values())
    lines = [
        f"{passing} of {len(built)} text decoder-only architectures built from transformers {transformers.__version__}'s "
        f"causal-LM mapping pass ({100 * passing / len(built):.0f}%), {sum(r.status == 'wrong' for r in built)} steer "
        "silently wrong (`benchmarks/results/architectures.md` has every row).",
        "",
        "| sites (every layer, unless per layer) | architectures |",
        "|---|---|",
    ]
    lines += [f"| {cell} | {', '.join(sorted(names))} |" for cell, names in sorted(groups.items(), key=lambda g: -len(g[1]))]
    lines += ["", "| not passing | status | sites found | why |", "|---|---|---|---|"]
    lines += [f"| {r.arch} | {r.status} | {sites_cell(r.sites)} | {notes_cell(r)} |" for r in built if r.status != "pass"]
    return "\n".join(lines)


def write_readme(path: Path, results: list[SweepResult]) -> None:
    """Replace the text between the README's architecture markers with ``readme_table``."""
    text = path.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise SystemExit(f"{path} has no {README_START} ... {README_END} markers")
    path.write_text(f"{head}{start}\n{readme_table(results)}\n{end}{tail}")


def from_json(path: Path) -> list[SweepResult]:
    """The results an earlier run wrote (``as_json``), to rewrite the tables without a new sweep."""
    results = []
    for row in json.loads(path.read_text())["results"]:
        fields = {k: row[k] for k in ("build_error", "failures", "wrong", "missing", "unverified")}
        results.append(SweepResult(row["arch"], sites=tuple(row["sites"]), fullgraph=row.get("fullgraph", True), **fields))
    return results


def run_sweep(only: list[str] | None) -> tuple[list[SweepResult], float]:
    """Every check on every architecture (or those in ``only``), printing one line each."""
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    transformers.logging.set_verbosity_error()  # the tiny configs trip many harmless config warnings
    start, results = time.perf_counter(), []
    for arch in (a for a in ARCHS if not only or a.name in only):
        t0 = time.perf_counter()
        results.append(sweep_one(arch))
        print(f"{arch.name:28s} {results[-1].status:11s} {time.perf_counter() - t0:5.1f}s", flush=True)
    return results, time.perf_counter() - start


def main() -> None:
    """Run the sweep (all architectures, or ``--only``) or read ``--from-json``; write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="architecture names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures.md")
    parser.add_argument("--from-json", type=Path, help="rewrite the tables from an earlier run's JSON")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's architecture table")
    args = parser.parse_args()
    if args.from_json is not None:
        results = from_json(args.from_json)
    else:
        results, seconds = run_sweep(args.only)
        machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()}
        payload = {"machine": machine, "seconds": round(seconds, 1), "results": [as_json(r) for r in results]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown(results)
    args.out.write_text(table)
    if args.readme is not None:
        write_readme(args.readme, results)
    print(table)


if __name__ == "__main__":
    main()
