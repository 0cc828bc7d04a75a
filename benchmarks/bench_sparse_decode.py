"""Reconstruct on the CPU with a trained-like sparse SAE: decoding the used rows, or every row.

The SAE is ``bench_overhead``'s (hidden 512, width 8192, JumpReLU) with one threshold for
every feature, set so that the median token fires about ``--l0`` features, as trained SAEs
do (Gemma Scope's fire about 20-150); the benchmark's random SAE fires about 45% of them.
The steering op alone runs Reconstruct on all 8 batch rows (c8) and on 1 of them (c1), at
decode (8x1) and prefill (8x128), twice: with the decode over only the rows of the features
the tokens use (the default, ``torch_path.SPARSE_DECODE_MAX_SHARE``) and over every row.
Both are timed side by side in rounds of shuffled order; each ratio is the median of its
per-round values. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from bench_overhead import SITE, block_ms, build, machine, save

import sae_compile as sc
from sae_compile.lowering.kernels import torch_path
from sae_compile.lowering.kernels.steer import steer_site
from sae_compile.runtime.slots import SlotManager
from sae_compile.runtime.state import Capacity, RoutingState, SiteState

BATCH, PREFILL = 8, 128
CONFIGS = {"c8": ["recon"] * BATCH, "c1": ["recon"] + [None] * (BATCH - 1)}


def sparse_sae(l0: int, x: torch.Tensor) -> sc.SAE:
    """The overhead benchmark's SAE, thresholded so the median token of ``x`` fires about ``l0`` features."""
    _, sae = build(torch.device("cpu"), torch.float32, small=False)
    pre = x.flatten(0, 1) @ sae.W_enc + sae.b_enc  # [N, F]
    theta = pre.kthvalue(sae.d_sae - l0, dim=1).values.median()
    return sc.SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation="jumprelu",
                  threshold=torch.full((sae.d_sae,), float(theta)), hook_name=SITE)


def bare_site(sae: sc.SAE, capacity: Capacity, dtype: torch.dtype, device: torch.device) -> tuple[SiteState, SlotManager]:
    """One steering site holding ``sae`` and its slots, without a model: for timing the op alone."""
    site = SiteState(SITE, sae.d_in, sae, capacity, RoutingState(capacity, dtype, device), dtype, device)
    return site, SlotManager({SITE: site}, site.routing, lambda name: name)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    x_pre = torch.randn(BATCH, PREFILL, 512)  # [B, S, D]
    sae = sparse_sae(args.l0, x_pre)
    capacity = Capacity(max_rows=2, max_clamps=1, max_batch=BATCH, max_tokens=BATCH * PREFILL)
    site, slots = bare_site(sae, capacity, torch.float32, torch.device("cpu"))
    slots.admit("recon", sc.Steering(sc.Reconstruct(SITE)), 0)
    phases = {"decode": (x_pre[:, :1].contiguous(), args.block), "prefill": (x_pre, 1)}
    decodes = {"used rows": torch_path.SPARSE_DECODE_MAX_SHARE, "every row": 0.0}
    f = sae.encode(x_pre)  # [B, S, F]
    active = {"per token (median)": float((f != 0).sum(-1).float().median()),
              "decode step, union of 8 tokens": int((f[:, 0] != 0).any(0).sum())}

    def case(phase: str, config: str, decode: str) -> float:
        x, calls = phases[phase]
        slots.assign(CONFIGS[config])
        site.routing.route(torch.arange(x.shape[1]), None, BATCH, x.shape[1])
        torch_path.SPARSE_DECODE_MAX_SHARE = decodes[decode]
        try:
            return block_ms(lambda: steer_site(x, site), calls, lambda: None)
        finally:
            torch_path.SPARSE_DECODE_MAX_SHARE = decodes["used rows"]

    keys = [(p, c, d) for p in phases for c in CONFIGS for d in decodes]
    rounds: list[dict[tuple[str, str, str], float]] = []
    order = random.Random(0)
    with torch.no_grad():
        for _ in range(args.repeats):
            rounds.append({key: case(*key) for key in order.sample(keys, len(keys))})
    medians = {f"{p} {c} {d}": statistics.median(r[(p, c, d)] for r in rounds) for p, c, d in keys}
    ratios = {f"{p} {c}": statistics.median(r[(p, c, "used rows")] / r[(p, c, "every row")] for r in rounds)
              for p in phases for c in CONFIGS}
    return {"l0_target": args.l0, "active_features": active, "medians_ms": medians,
            "ratios_used_over_every": ratios, "repeats": args.repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l0", type=int, default=64, help="features the median token fires")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block", type=int, default=20, help="decode calls per timed block")
    args = parser.parse_args()
    result = run(args)
    result["machine"] = machine("cpu")
    print(f"active features: {result['active_features']}")
    print(f"{'case':32}{'used rows ms':>14}{'every row ms':>14}{'ratio':>8}")
    for case, ratio in result["ratios_used_over_every"].items():
        used, every = (result["medians_ms"][f"{case} {d}"] for d in ("used rows", "every row"))
        print(f"{case:32}{used:14.3f}{every:14.3f}{ratio:8.3f}")
    save(result, "sparse_decode_cpu")


if __name__ == "__main__":
    main()
