"""The Triton kernels against the torch path on a GPU, at Gemma-2-2B-like shapes.

The steering op alone, each implementation captured in its own CUDA graph (as it runs under
``mode="reduce-overhead"``) and timed by replays, in rounds of shuffled order; each ratio
is the median of its per-round values (Triton time / torch time: below 1, the kernels win).

- ``reconstruct``: Reconstruct on every token, ``triton_sae.full_path`` vs
  ``torch_path.full_path`` (what runs on CUDA without Triton), for a JumpReLU SAE (width
  16384) and a TopK SAE (width 65536, k 64), where the Triton path selects and decodes only
  each token's k features.
- ``clamps``: 16 clamps per row with the error term kept (JumpReLU), ``triton_sae.sparse_delta``
  vs ``torch_path.sparse_delta``.

Each at decode (8 tokens) and prefill (8x256), in bf16. ``--small`` runs tiny shapes, on
the CPU under ``TRITON_INTERPRET=1`` when there is no GPU: a smoke test whose times mean
nothing. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from bench_overhead import SITE, block_ms, machine, save  # noqa: E402
from bench_sparse_decode import bare_site  # noqa: E402

import sae_compile as sc  # noqa: E402
from sae_compile.lowering.kernels import torch_path, triton_sae  # noqa: E402
from sae_compile.runtime.capture import capture  # noqa: E402
from sae_compile.runtime.state import Capacity, SiteState  # noqa: E402

BATCH = 8


def random_sae(activation: str, d_in: int, d_sae: int, k: int, device: torch.device, dtype: torch.dtype) -> sc.SAE:
    g = torch.Generator().manual_seed(0)
    threshold = 0.1 * torch.rand(d_sae, generator=g) if activation == "jumprelu" else None
    return sc.SAE(
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5, torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        torch.zeros(d_sae), torch.zeros(d_in), activation=activation, threshold=threshold,
        k=k if activation == "topk" else None,
    ).to(device=device, dtype=dtype)


def cases(small: bool, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """Per case, its two implementations as calls on fixed inputs."""
    d_in, widths, k, prefill = (64, {"jumprelu": 256, "topk": 512}, 8, 8) if small else (
        2304, {"jumprelu": 16384, "topk": 65536}, 64, 256)
    out = {}
    for activation, d_sae in widths.items():
        capacity = Capacity(max_rows=2, max_clamps=16, max_batch=BATCH, max_tokens=BATCH * prefill)
        site, slots = bare_site(random_sae(activation, d_in, d_sae, k, device, dtype), capacity, dtype, device)
        steerings = {"reconstruct": sc.Steering(sc.Reconstruct(SITE))}
        if activation == "jumprelu":  # clamps on a TopK SAE take the full path: nothing new to time
            steerings["clamps"] = sc.Steering(*(sc.Clamp(SITE, 97 * i % d_sae, 4.0) for i in range(16)))
        for kind, steering in steerings.items():
            slots.admit(kind, steering, 0)
            slots.assign([kind] * BATCH)
            for phase, seq in (("decode", 1), ("prefill", prefill)):
                site.routing.route(torch.arange(seq, device=device), None, BATCH, seq)
                # The routing buffers are rewritten per case; each case keeps its own copy.
                rows, mask, weight = (t.clone() for t in site.routing.view(BATCH, seq))
                x = torch.randn(BATCH, seq, d_in, device=device, dtype=dtype)
                out[f"{activation} {kind} {phase}"] = implementations(kind, x, rows, mask, weight, site)
    return out


def implementations(kind: str, x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                    site: SiteState) -> dict[str, Callable[[], object]]:
    if kind == "reconstruct":
        full = mask & site.full_row[rows][:, None]  # [B, S], as steer_site passes it
        return {"triton": lambda: triton_sae.full_path(x, rows, full, site),
                "torch": lambda: torch_path.full_path(x, rows, full, site)}
    return {"triton": lambda: triton_sae.sparse_delta(x, rows, mask, site),
            "torch": lambda: torch_path.sparse_delta(x, rows, weight, site)}


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph: the call replays it."""
    graph, _ = capture(fn)
    return graph.replay


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = {(name, impl): graphed(fn) if device.type == "cuda" else fn
             for name, impls in cases(args.small, device, dtype).items() for impl, fn in impls.items()}
    keys = list(calls)
    order = random.Random(0)
    rounds = []
    with torch.no_grad():
        for _ in range(args.repeats):
            rounds.append({key: block_ms(calls[key], args.block, sync) for key in order.sample(keys, len(keys))})
    names = sorted({name for name, _ in keys})
    return {
        "machine": machine(device.type), "dtype": str(dtype),
        "medians_ms": {f"{name} {impl}": statistics.median(r[(name, impl)] for r in rounds) for name, impl in keys},
        "ratios_triton_over_torch": {name: statistics.median(r[(name, "triton")] / r[(name, "torch")] for r in rounds)
                                     for name in names},
        "config": {"small": args.small, "repeats": args.repeats, "block": args.block},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test (the CPU runs the interpreter)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block", type=int, default=20, help="calls per timed block")
    args = parser.parse_args()
    if not (torch.cuda.is_available() or args.small):
        parser.error("this benchmark needs a GPU; --small runs a smoke test of it on the CPU")
    result = run(args)
    print(f"machine: {result['machine']}, {result['dtype']}")
    print(f"{'case':34}{'triton ms':>12}{'torch ms':>12}{'ratio':>10}")
    for name, ratio in result["ratios_triton_over_torch"].items():
        triton_ms, torch_ms = (result["medians_ms"][f"{name} {impl}"] for impl in ("triton", "torch"))
        print(f"{name:34}{triton_ms:12.4f}{torch_ms:12.4f}{ratio:10.3f}")
    save(result, f"kernels_{'cuda' if torch.cuda.is_available() else 'cpu'}{'_small' if args.small else ''}")


if __name__ == "__main__":
    main()
