"""Peak host memory (RSS) of loading a large SAE checkpoint with ``load_sae``.

The claim under test (DESIGN §6, checkpoints issue): a 65536 x 4096 fp32 SAELens checkpoint
(1 GiB per matrix, 2 GiB of weights) loads without a second full host copy, because safetensors
is memory-mapped and tensors are used in place.

Each row runs in a fresh subprocess, so ``ru_maxrss`` is that row's peak alone. Every row reads
every weight page (an ``aminmax`` over each tensor) before measuring, so a lazy mapping cannot
hide pages: the file's pages count in RSS once touched. Columns:

- ``peak_mib``: the child's peak RSS;
- ``over_baseline_mib``: minus the peak of a child that only imports torch and sae_compile;
- ``x_weights``: that excess divided by the weights' size (1.0 = one copy, 2.0 = two copies).

Rows:

- ``load_sae``: ``load_sae(dir)``, the public path (file read + ``SAE`` construction);
- ``readers_only``: the checkpoint readers without constructing the ``SAE`` (isolates
  ``SAE.__init__``'s own validation cost);
- ``load_sae_bf16``: ``load_sae(dir, dtype=torch.bfloat16)``: file pages + a converted copy;
- ``mmap_then_clone``: reference for "a second full copy": mmap every tensor, then ``clone()``.

Usage::

    PYTHONPATH=. python benchmarks/bench_load_memory.py                 # 65536 x 4096
    PYTHONPATH=. python benchmarks/bench_load_memory.py --d-sae 16384 --d-in 2048 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("baseline", "load_sae", "readers_only", "load_sae_bf16", "mmap_then_clone")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "load_memory.json"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _touch(tensors) -> None:
    import torch

    for t in tensors:
        torch.aminmax(t)  # reads every page without allocating a tensor-sized temporary


def _child(row: str, folder: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch

    from sae_compile import checkpoints
    from sae_compile.sae import load_sae

    start = time.perf_counter()
    if row == "load_sae":
        sae = load_sae(folder)
        _touch([sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    elif row == "load_sae_bf16":
        sae = load_sae(folder, dtype=torch.bfloat16)
        _touch([sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    elif row == "readers_only":
        ckpt = checkpoints.read_checkpoint(folder)
        _touch([ckpt.W_enc, ckpt.W_dec, ckpt.b_enc, ckpt.b_dec])
    elif row == "mmap_then_clone":
        from safetensors import safe_open

        with safe_open(str(Path(folder) / checkpoints.SAELENS_WEIGHTS), framework="pt") as f:
            copies = [f.get_tensor(k).clone() for k in f.keys()]
        _touch(copies)
    elif row != "baseline":
        raise ValueError(f"unknown row {row!r}; expected one of {ROWS}")
    return {"peak_mib": _peak_rss_mib(), "seconds": time.perf_counter() - start}


def _write_checkpoint(folder: Path, d_sae: int, d_in: int) -> None:
    """A SAELens checkpoint of the given size, written by a child so its buffers don't linger here."""
    code = (
        "import torch, sys\n"
        "from sae_compile.sae import SAE\n"
        "from sae_compile.checkpoints import save_sae\n"
        "d_sae, d_in = int(sys.argv[2]), int(sys.argv[3])\n"
        "W_enc = torch.full((d_in, d_sae), 0.01)\n"
        "W_dec = torch.full((d_sae, d_in), 0.02)\n"
        "save_sae(SAE(W_enc, W_dec, hook_name='blocks.0.hook_resid_post'), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(d_sae), str(d_in)], check=True, env=child_env())


def child_env() -> dict[str, str]:
    """The environment for a child process that imports sae_compile from this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run(d_sae: int, d_in: int, rows: tuple[str, ...] = ROWS) -> dict:
    """Measure every row on a fresh ``d_sae x d_in`` fp32 checkpoint; returns the JSON-able report."""
    weights_mib = 2 * d_sae * d_in * 4 / 2**20
    with tempfile.TemporaryDirectory(prefix="sae_load_memory_") as tmp:
        folder = Path(tmp) / "sae"
        _write_checkpoint(folder, d_sae, d_in)
        results = {}
        for row in ("baseline", *[r for r in rows if r != "baseline"]):
            out = subprocess.run(
                [sys.executable, __file__, "--child", row, str(folder)],
                check=True, capture_output=True, text=True, env=child_env(),
            )
            results[row] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline"]["peak_mib"]
    for r in results.values():
        r["over_baseline_mib"] = r["peak_mib"] - base
        r["x_weights"] = r["over_baseline_mib"] / weights_mib
    return {
        "benchmark": "load_memory",
        "d_sae": d_sae,
        "d_in": d_in,
        "dtype": "float32",
        "weights_mib": weights_mib,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "torch": _torch_version(),
        "rows": results,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _print_table(report: dict) -> None:
    print(f"SAELens checkpoint {report['d_sae']} x {report['d_in']} fp32, weights {report['weights_mib']:.0f} MiB")
    print(f"{'row':<18}{'peak MiB':>10}{'+base MiB':>11}{'x weights':>11}{'seconds':>9}")
    for name, r in report["rows"].items():
        print(
            f"{name:<18}{r['peak_mib']:>10.0f}{r['over_baseline_mib']:>11.0f}{r['x_weights']:>11.2f}"
            f"{r['seconds']:>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=2, metavar=("ROW", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    report = run(args.d_sae, args.d_in)
    _print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
