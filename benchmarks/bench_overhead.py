"""What steering costs: compiled steered vs unsteered, vs eager hooks, vs compiled hooks.

Model: a random Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8192) with a
JumpReLU SAE of width 8192 at ``blocks.4.hook_resid_post``; batch 8. Two measurements:
decode-step latency on a static KV cache, and prefill throughput at 8x128. Configurations:

  a   compiled, unsteered (plain torch.compile)
  b   compiled, steered: 4 clamps per row (error-preserving delta)
  c8  compiled, Reconstruct on all 8 rows
  c1  compiled, Reconstruct on 1 of the 8 rows
  d   eager HF model + a forward hook doing the same clamp the SAELens way (full encode/decode)
  e   torch.compile of the model with that forward hook
  f   the bare SAE encode + decode matmuls (with their biases) for the same tokens, alone:
      called back to back, so the SAE's weights stay in the CPU's cache
  af  the compiled unsteered step followed by the same matmuls. Inside a step the model's
      own weights evict the SAE's, so af - a is what the SAE arithmetic costs in a step
  af1 the same with one row's tokens: what c1 cannot avoid. At decode the matmuls mostly
      read the SAE's weights, so (c1-a)/(c8-a) is bounded below by about (af1-a)/(af-a)
  s0  compiled, steered model called through ``__call__`` (the path ``record=`` takes), nothing steered
  r8  the same, recording the top 16 features of all 8 rows (``record=[sc.Features(SITE, top_k=16)]``)
  ae  the compiled unsteered step followed by the bare encode matmul (``x @ W_enc + b_enc``) of the
      same tokens: (r8-s0)/(ae-a) is what reading features costs in a step, per encode it needs

Everything is measured in one run, in rounds: each round times every configuration (a
block of back-to-back decode steps, or one prefill) in a fresh random order, after an
untimed call. Times are medians over rounds; each ratio is the median of that ratio's
value within each round, so slow drift of the machine (a shared VM) cancels out, and the
table adds the quartiles of those values. On CUDA the compiled configurations use CUDA
graphs (mode="reduce-overhead"). Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters

import sae_compile as sc

SITE, LAYER = "blocks.4.hook_resid_post", 4
FEATURES = (11, 222, 333, 444)
RESULTS = Path(__file__).resolve().parent / "results"


def build(device: torch.device, dtype: torch.dtype, small: bool) -> tuple[torch.nn.Module, sc.SAE]:
    """The benchmark's model and SAE (``small``: a quick smoke-test size)."""
    torch.manual_seed(0)
    hidden, layers, inter, vocab, width = (128, 6, 344, 1024, 1024) if small else (512, 8, 1376, 8192, 8192)
    config = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=1024,
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    sae = sc.SAE(
        torch.randn(hidden, width, generator=g) / hidden**0.5, torch.randn(width, hidden, generator=g) / hidden**0.5,
        torch.zeros(width), torch.zeros(hidden), activation="jumprelu", threshold=0.1 * torch.rand(width, generator=g),
        hook_name=SITE,
    ).to(device=device, dtype=dtype)
    return model, sae


def saelens_hook(sae: sc.SAE) -> Callable:
    """The usual eager approach: encode everything, clamp, decode, keep the SAE error."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = output[0] if isinstance(output, tuple) else output
        f = sae.encode(x)
        error = x - sae.decode(f)
        f[..., list(FEATURES)] = 5.0
        steered = sae.decode(f) + error
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def sae_matmuls(sae: sc.SAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's arithmetic with nothing else: ``(x @ W_enc + b_enc) @ W_dec + b_dec`` for ``x [n, D]``."""
    return torch.addmm(sae.b_dec, torch.addmm(sae.b_enc, x, sae.W_enc), sae.W_dec)


def encode_matmul(sae: sc.SAE, x: torch.Tensor) -> torch.Tensor:
    """The encode alone: ``x @ W_enc + b_enc`` for ``x [n, D]``."""
    return torch.addmm(sae.b_enc, x, sae.W_enc)


def then(step: Callable[[], object], fn: Callable[..., object], *args: object) -> object:
    """``step()``, then ``fn(*args)``."""
    step()
    return fn(*args)


def block_ms(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Mean time of ``calls`` back-to-back calls: one sample of a block, in ms per call."""
    fn()  # the first call after switching configuration pays for cold caches; not timed
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / calls


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, sae = build(device, dtype, args.small)
    batch, prefill_len = 8, 128
    mode = "reduce-overhead" if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    block = {"decode": args.block, "prefill": 1}
    cache_len = 8 + (args.warmup + args.repeats * (args.block + 1)) + 8

    plain = torch.compile(model, mode=mode, dynamic=False)
    steered = sc.steer(model, {SITE: sae}, mode=mode, dynamic=False, max_batch=batch, max_tokens=batch * prefill_len)
    # Configurations b, c8 and c1 share one steered model, as requests in a server do: each
    # is a batch assignment of admitted requests, written before its forward (the real
    # per-step cost), so interleaving them never re-admits anything.
    steered.slots.admit("clamp", sc.Steering(*(sc.Clamp(SITE, f, 5.0) for f in FEATURES)), prefill_len)
    steered.slots.admit("recon", sc.Steering(sc.Reconstruct(SITE)), prefill_len)
    configs = {
        "a": (plain, None),
        "b": (steered, ["clamp"] * batch),
        "c8": (steered, ["recon"] * batch),
        "c1": (steered, ["recon"] + [None] * (batch - 1)),
    }
    # The hooked model is a copy, so the compiled configurations above never see the hook.
    # Dynamo does not guard on module hooks by default, so without this the compiled hooked
    # copy would reuse the plain model's compiled code (same class, same forward) and skip the hook.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    hooked_model = copy.deepcopy(model)
    hooked_model.model.layers[LAYER].register_forward_hook(saelens_hook(sae))
    configs["e"] = (torch.compile(hooked_model, mode=mode, dynamic=False), None)
    configs["d"] = (hooked_model, None)
    configs["af"] = configs["af1"] = configs["ae"] = (plain, None)  # matmuls added below; own decode caches
    configs["s0"] = (steered, "call")
    configs["r8"] = (steered, [sc.Features(SITE, top_k=16)])
    prompts = torch.randint(0, model.config.vocab_size, (batch, prefill_len), device=device)
    step_ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def forward(name: str) -> Callable[..., object]:
        fn, requests = configs[name]
        if fn is not steered:
            return fn
        if requests == "call" or isinstance(requests[0], sc.Features):
            record = None if requests == "call" else requests
            return lambda *args, **kwargs: steered(*args, record=record, **kwargs)

        def steered_step(*args: object, **kwargs: object) -> object:
            steered.slots.assign(requests)
            return steered.step(*args, **kwargs)

        return steered_step

    def prefill(name: str) -> Callable[[], object]:
        fn = forward(name)
        return lambda: fn(prompts, use_cache=False)

    def decoder(name: str) -> Callable[[], object]:
        """A decode step on a static cache primed with an 8-token prompt."""
        fn = forward(name)
        print(f"priming the decode cache for {name} ...", flush=True)
        cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len)
        with torch.no_grad():
            # Allocate the cache eagerly: tensors first created inside a CUDA-graphed call
            # would live in (and be overwritten through) that graph's memory pool.
            model(prompts[:, :1], past_key_values=cache)
            cache.reset()
            fn(prompts[:, :8], past_key_values=cache)
        return lambda: fn(step_ids, past_key_values=cache)

    x_pre = torch.randn(batch, prefill_len, model.config.hidden_size, device=device, dtype=dtype)
    x_dec = x_pre[:, :1]
    timings: dict[str, dict[str, list[float]]] = {"decode": {}, "prefill": {}}
    with torch.no_grad():
        steps = {"decode": {name: decoder(name) for name in configs}, "prefill": {name: prefill(name) for name in configs}}
        for phase, x in (("decode", x_dec), ("prefill", x_pre)):
            tokens = x.flatten(0, 1)  # [B*S, D]
            steps[phase]["f"] = functools.partial(sae_matmuls, sae, tokens)
            steps[phase]["af"] = functools.partial(then, steps[phase]["af"], sae_matmuls, sae, tokens)
            steps[phase]["af1"] = functools.partial(then, steps[phase]["af1"], sae_matmuls, sae, x[0])
            steps[phase]["ae"] = functools.partial(then, steps[phase]["ae"], encode_matmul, sae, tokens)
        for phase, fns in steps.items():
            for name, fn in fns.items():
                print(f"warming up {phase} {name} ...", flush=True)
                for _ in range(args.warmup):
                    fn()
        graphs = counters["stats"]["unique_graphs"]
        order = random.Random(0)
        for _ in range(args.repeats):
            for phase, fns in steps.items():
                # A fresh random order each round, so no configuration always follows another.
                for name in order.sample(list(fns), len(fns)):
                    timings[phase].setdefault(name, []).append(block_ms(fns[name], block[phase], sync))
    recompiles = counters["stats"]["unique_graphs"] - graphs
    if args.profile:
        with torch.no_grad():
            profile(steps, args.profile, device)
    medians = {phase: {name: statistics.median(ts) for name, ts in t.items()} for phase, t in timings.items()}
    rounds = {phase: [dict(zip(t, ms, strict=True)) for ms in zip(*t.values(), strict=True)] for phase, t in timings.items()}
    # Per ratio: the quartiles of its per-round values, so the table shows how far to trust it.
    per_round = {phase: [ratios(r) for r in rs] for phase, rs in rounds.items()}
    quartiles = {phase: {key: statistics.quantiles([r[key] for r in rs], n=4) for key in RATIOS}
                 for phase, rs in per_round.items()}
    paired = {phase: {key: q[1] for key, q in qs.items()} for phase, qs in quartiles.items()}
    spread = {phase: {key: [q[0], q[2]] for key, q in qs.items()} for phase, qs in quartiles.items()}
    return {"medians_ms": medians, "ratios": paired, "ratio_quartiles": spread, "rounds_ms": rounds,
            "recompiles_during_timing": recompiles}


def profile(steps: dict[str, dict[str, Callable[[], object]]], names: list[str], device: torch.device) -> None:
    """Print where the time of configurations ``names`` goes, per phase, for a few calls each."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # On CUDA the host side matters too: a step is host-bound when its GPU work is this small.
    sorts = ["self_cuda_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for phase, fns in steps.items():
        for name in names:
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(5):
                    fns[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            for sort in sorts:
                print(f"\n== profile: {phase} {name} (5 calls), by {sort}")
                print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


RATIOS = ("b/a", "d/b", "e/b", "(c8-a)/f", "(c8-a)/(af-a)", "(c1-a)/(c8-a)", "(af1-a)/(af-a)", "(r8-s0)/(ae-a)")


def ratios(m: dict[str, float]) -> dict[str, float]:
    """Every ratio in ``RATIOS``, from one time in ms per configuration."""
    return {
        "b/a": m["b"] / m["a"],
        "d/b": m["d"] / m["b"],
        "e/b": m["e"] / m["b"],
        "(c8-a)/f": (m["c8"] - m["a"]) / m["f"],
        "(c8-a)/(af-a)": (m["c8"] - m["a"]) / (m["af"] - m["a"]),
        "(c1-a)/(c8-a)": (m["c1"] - m["a"]) / (m["c8"] - m["a"]),
        "(af1-a)/(af-a)": (m["af1"] - m["a"]) / (m["af"] - m["a"]),
        "(r8-s0)/(ae-a)": (m["r8"] - m["s0"]) / (m["ae"] - m["a"]),
    }


TARGETS = {
    ("decode", "b/a"): ("<=", 1.03), ("prefill", "b/a"): ("<=", 1.03), ("decode", "d/b"): (">=", 1.5),
    ("decode", "(c8-a)/f"): ("<=", 1.25), ("prefill", "(c8-a)/f"): ("<=", 1.25),
    ("decode", "(c8-a)/(af-a)"): ("<=", 1.25), ("prefill", "(c8-a)/(af-a)"): ("<=", 1.25),
    ("decode", "(c1-a)/(c8-a)"): ("<=", 0.25), ("prefill", "(c1-a)/(c8-a)"): ("<=", 0.25),
    ("decode", "(r8-s0)/(ae-a)"): ("<=", 1.25), ("prefill", "(r8-s0)/(ae-a)"): ("<=", 1.25),
}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block", type=int, default=5, help="decode steps per timed block")
    parser.add_argument("--small", action="store_true", help="a small model, for a quick smoke test")
    parser.add_argument("--profile", nargs="*", default=[], metavar="CONFIG", help="after timing, profile these configurations")
    args = parser.parse_args()
    result = run(args)
    result["machine"] = machine(args.device)
    result["config"] = vars(args)
    print(f"\nmachine: {result['machine']}")
    print(f"{'config':8}" + "".join(f"{p + ' ms':>14}" for p in result["medians_ms"]))
    for name in result["medians_ms"]["decode"]:
        print(f"{name:8}" + "".join(f"{result['medians_ms'][p][name]:14.3f}" for p in result["medians_ms"]))
    print(f"\n{'ratio (median [q1, q3] over rounds)':36}{'decode':>23}{'prefill':>23}   target")
    for key in result["ratios"]["decode"]:
        target = " / ".join(f"{p}: {TARGETS[(p, key)][0]} {TARGETS[(p, key)][1]}" for p in ("decode", "prefill") if (p, key) in TARGETS)
        cells = "".join(
            f"{result['ratios'][p][key]:8.3f} [{result['ratio_quartiles'][p][key][0]:5.2f}, {result['ratio_quartiles'][p][key][1]:5.2f}]"
            for p in ("decode", "prefill")
        )
        print(f"{key:36}{cells}   {target}")
    print(f"recompiles while timing: {result['recompiles_during_timing']}")
    save(result, f"overhead_{args.device.split(':')[0]}{'_small' if args.small else ''}")


def save(result: dict, name: str) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
