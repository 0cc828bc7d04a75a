"""Host memory of an attached SAE site: steady state, the peak of ``sc.steer()``, and the
peak of a hot swap (``load_sae``), each against the site's own buffers.

The claims under test (hardening issue): an attached site costs its buffers in the model's
dtype plus the row tables (no second copy of the SAE, no fp64 copy of ``W_enc``), at most
1.05x that in steady state and 1.25x at the peak of ``steer()``; a hot swap keeps no backup.

Everything runs in one fresh child process on the CPU. RSS is read from ``/proc/self/status``
(``VmRSS`` now, ``VmHWM`` the peak), and the peak is reset before each step by writing 5 to
``/proc/self/clear_refs``, so each peak is that step's alone; ``malloc_trim`` first returns
the pages glibc caches, so RSS counts what is held. Every figure is the RSS above
the level just before the step, divided by the site's tensor bytes
(``SiteState.weight_bytes() + table_bytes()``):

- ``steady``: after ``steer()``, with the caller's SAE deleted;
- ``steer_peak``: the peak during ``steer()`` (the caller's SAE alive, as it is then);
- ``swap_peak``: the peak during ``load_sae`` of a second SAE of the same size.

Usage::

    PYTHONPATH=. python benchmarks/bench_site_memory.py              # 65536 x 1024 fp32, b_dec folded
    PYTHONPATH=. python benchmarks/bench_site_memory.py --d-sae 16384 --d-in 512 --json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys

from bench_load_memory import child_env
from bench_overhead import machine, save

SITE = "blocks.0.hook_resid_post"


def _mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _release_freed() -> None:
    """Collect garbage and hand glibc's cached free pages back to the OS, so RSS counts what
    is held, not what the allocator keeps around for reuse."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> float:
    _release_freed()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _mib("VmRSS")


def _sae(d_in: int, d_sae: int, seed: int):
    import torch

    from sae_compile import SAE

    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g)
    return SAE(W_enc, W_enc.t().contiguous(), torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g),
               activation="jumprelu", threshold=torch.rand(d_sae, generator=g), apply_b_dec_to_input=True)


def _model(d_in: int):
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=d_in, intermediate_size=2 * d_in, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _child(d_in: int, d_sae: int) -> dict[str, float]:
    """The three measurements, in this (fresh) process."""
    import sae_compile as sc

    model = _model(d_in)
    sc.steer(model, {SITE: _sae(d_in, 8, seed=0)}, backend="aot_eager")  # imports and the probe trace, not measured
    sae = _sae(d_in, d_sae, seed=1)
    before = _reset_peak()
    steered = sc.steer(model, {SITE: sae}, backend="aot_eager")
    steer_peak = _mib("VmHWM") - before
    state = steered._by_name[SITE]
    site_mib = (state.weight_bytes() + state.table_bytes()) / 2**20
    del sae
    _release_freed()
    steady = _mib("VmRSS") - before + _sae_mib(d_in, d_sae)
    replacement = _sae(d_in, d_sae, seed=2)
    before = _reset_peak()
    steered.load_sae(SITE, replacement)
    swap_peak = _mib("VmHWM") - before
    return {"site_mib": site_mib, "steady": steady / site_mib, "steer_peak": steer_peak / site_mib,
            "swap_peak": swap_peak / site_mib, "swap_peak_mib": swap_peak}


def _sae_mib(d_in: int, d_sae: int) -> float:
    """What the deleted SAE held (both matrices and the vectors, fp32): freed memory to add back."""
    return (2 * d_in * d_sae + 3 * d_sae + d_in) * 4 / 2**20


def run(d_in: int, d_sae: int, repeats: int) -> dict:
    """Each figure is the median over ``repeats`` fresh processes: an occasional process shows
    a peak tens of MiB higher than the others for the same work, whatever the SAE size."""
    env = child_env()
    children = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, __file__, "--child", str(d_in), str(d_sae)], check=True,
                              capture_output=True, text=True, env=env)
        children.append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {key: statistics.median(child[key] for child in children) for key in children[0]}
    return {"benchmark": "site_memory", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "machine": machine("cpu"),
            **medians, "runs": children}


def _print(report: dict) -> None:
    print(f"site {report['d_sae']} x {report['d_in']} fp32 JumpReLU (b_dec folded): {report['site_mib']:.0f} MiB of tensors; "
          f"medians of {len(report['runs'])} processes")
    print(f"{'figure':<12}{'x site':>8}{'target':>9}")
    for name, target in (("steady", "<= 1.05"), ("steer_peak", "<= 1.25"), ("swap_peak", "")):
        print(f"{name:<12}{report[name]:>8.3f}{target:>9}")
    print(f"swap peak above the buffers: {report['swap_peak_mib']:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes; each figure is their median")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only; write no file")
    parser.add_argument("--child", nargs=2, type=int, metavar=("D_IN", "D_SAE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    report = run(args.d_in, args.d_sae, args.repeats)
    if args.json:
        print(json.dumps(report))
        return
    _print(report)
    save(report, "site_memory_cpu")


if __name__ == "__main__":
    main()
