"""What steering costs: compiled steered vs unsteered, vs eager hooks, compiled hooks and nnsight.

Model and SAE: a random Llama of a preset shape (``--model``: ``small``, a smoke test;
``default``, hidden 512, 8 layers, vocab 8192 with a JumpReLU SAE of width 8192 at
``blocks.4.hook_resid_post``; ``gemma2-2b``, Gemma-2-2B's shapes, for a GPU) and a random SAE
(``--sae``: ``jumprelu16k`` or ``topk65k`` beside the presets' own); see
``overhead_configs.py``. Batch 8. Two measurements: decode-step latency on a static KV cache,
and prefill at 8x128. The clamp is 4 features set to 5.0 with the SAE's error term kept.
Configurations:

  a       compiled, unsteered (plain torch.compile)
  s0      the steered model called with steering=None through ``__call__``: the idle cost
  b       compiled, steered through ``slots`` + ``step``: the same 4 clamps on every row
  uniform ``steered(ids, steering=S)``: one 4-clamp steering for all 8 rows, through ``__call__``
  mixed   ``steered(ids, steering=[S0, ..., S7])``: 8 different 4-clamp steerings, one per row
  c8      compiled, Reconstruct on all 8 rows
  c1      compiled, Reconstruct on 1 of the 8 rows
  d       eager HF model + a forward hook doing the clamp the SAELens way (full encode/decode)
  ds      eager HF model + a forward hook doing the sparse clamp (only the clamped features'
          encoder columns and decoder rows): what a careful user writes
  e       torch.compile of the model with the dense hook
  es      torch.compile of the model with the sparse hook
  nn      nnsight (eager) doing the sparse clamp in a trace; skipped when nnsight is absent
  f       the bare SAE encode + decode matmuls (with their biases) for the same tokens, alone
  af      the compiled unsteered step followed by the same matmuls: inside a step the model's
          own weights evict the SAE's, so af - a is what the SAE arithmetic costs in a step
  af1     the same with one row's tokens: what c1 cannot avoid
  r0      a steered model of its own (compiled without CUDA graph trees) stepped with nothing
          steered or recorded (``record_steps(None)``, ``step``)
  r8      like r0, recording the top 16 features of all 8 rows (``record_steps``, then
          ``step_features`` copies the record out); on CUDA r0 and r8 replay the idle and the
          recording graph that ``capture_steps`` captured of that model's step
  ae      the compiled unsteered step followed by the bare encode matmul of the same tokens

Everything is measured in one run, in rounds: each round times every configuration (a
block of back-to-back decode steps, or one prefill) in a fresh random order, after an
untimed call. Each ratio's figure is the median of its per-round values, so slow drift of
the machine cancels, with a bootstrap 95% interval over rounds (``stats.py``); each target
prints as holds / falls short. On CUDA the compiled configurations use CUDA graphs
(mode="reduce-overhead"); graph trees hold no record path, so r0 and r8 capture their own.

Host cost: the µs per decode step that a steered configuration spends in ``SteeredModel``
outside its compiled callable (routing, slot assignment, argument handling), measured
after the rounds by timing the callable from inside (two ``perf_counter`` calls per step,
which are counted as host cost) and subtracting it from the step's wall time. It leaves out
Dynamo's guards and the graph's launch, which plain ``torch.compile`` pays as well; the
wall-time difference b - a per round is printed beside it.

Before timing, the clamping configurations' prefill logits are checked against the eager
dense hook (they must agree far better than the unsteered logits do), so a hook that did
not run cannot pass as fast. Prints tables and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import overhead_configs as oc  # beside this script, which Python puts on sys.path
import torch
import transformers
from stats import Assessment, Ratio, Target, assess
from torch._dynamo.utils import counters

import sae_compile as sc

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, PREFILL = 8, 128
RECORD_TOP_K = 16  # features r8 records per token
Step = Callable[[], object]
# transformers 5 renamed the forward keyword past_key_values to cache; the old name warns on each call.
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"

TARGETED = ("s0/a", "b/a", "mixed/uniform", "d/b", "(c8-a)/(af-a)", "(c1-a)/(af1-a)", "(c1-a)/(c8-a)", "(r8-r0)/(ae-a)")
INFORMATIVE = ("ds/b", "es/b", "nn/b", "e/b", "nn/ds", "(c8-a)/f", "(af1-a)/(af-a)")


def targets(device: str) -> dict[tuple[str, str], Target]:
    """Each ratio's target per (phase, ratio); the GPU's differ where a step is short."""
    gpu = device == "cuda"
    le, ge = functools.partial(Target, "<="), functools.partial(Target, ">=")
    found = {("decode", "s0/a"): le(1.01), ("decode", "d/b"): ge(5.0 if gpu else 1.5),
             ("decode", "(c1-a)/(af1-a)"): le(1.25), ("prefill", "(c1-a)/(c8-a)"): le(0.5 if gpu else 0.25)}
    for phase in ("decode", "prefill"):
        found[(phase, "b/a")] = le(1.05 if gpu else 1.03)
        found[(phase, "mixed/uniform")] = le(1.03)
        found[(phase, "(c8-a)/(af-a)")] = le(1.25)
        found[(phase, "(r8-r0)/(ae-a)")] = le(1.25)
    return found


@dataclass
class Bench:
    """Everything the configurations share."""

    model: torch.nn.Module
    sae: sc.SAE
    preset: oc.ModelPreset
    device: torch.device
    mode: str | None
    plain: Callable[..., object]
    steered: sc.SteeredModel
    prompts: torch.Tensor  # [B, PREFILL]
    step_ids: torch.Tensor  # [B, 1]
    cache_len: int

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def setup(args: argparse.Namespace) -> Bench:
    """Build the model, the SAE, the plain compiled model and the steered one."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = oc.MODELS[args.model]
    model = oc.build_model(preset, device, dtype)
    sae = oc.build_sae(oc.SAES[args.sae or preset.sae], preset.hidden, preset.site, device, dtype)
    mode = "reduce-overhead" if device.type == "cuda" else None
    plain = torch.compile(model, mode=mode, dynamic=False)
    steered = sc.steer(model, {preset.site: sae}, mode=mode, dynamic=False, max_batch=BATCH, max_tokens=BATCH * PREFILL)
    prompts = torch.randint(0, preset.vocab, (BATCH, PREFILL), device=device)
    step_ids = torch.randint(0, preset.vocab, (BATCH, 1), device=device)
    # Decode steps per cache: the prompt, warm-up, the rounds, the host-cost blocks, a profile, spare.
    cache_len = 8 + args.warmup + (args.repeats + 3) * (args.block + 1) + 5 + 8
    return Bench(model, sae, preset, device, mode, plain, steered, prompts, step_ids, cache_len)


def clamp(site: str, features: tuple[int, ...]) -> sc.Steering:
    return sc.Steering(*(sc.Clamp(site, f, oc.CLAMP_VALUE) for f in features))


def steered_forwards(bench: Bench) -> dict[str, Callable[..., object]]:
    """The steered model's configurations. b, c8 and c1 share admitted requests, as a server's
    steps do: each is a batch assignment written before its forward (the real per-step cost)."""
    steered, site = bench.steered, bench.preset.site
    steered.slots.admit("clamp", clamp(site, oc.FEATURES), PREFILL)
    steered.slots.admit("recon", sc.Steering(sc.Reconstruct(site)), PREFILL)
    # Row i clamps 4 features of its own; row 0's are b's, so uniform and b clamp alike.
    rows = [clamp(site, tuple((f + 97 * i) % bench.sae.d_sae for f in oc.FEATURES)) for i in range(BATCH)]

    def slot_step(requests: list[str | None]) -> Callable[..., object]:
        def step(*args: object, **kwargs: object) -> object:
            steered.slots.assign(requests)
            return steered.step(*args, **kwargs)

        return step

    found = {
        "s0": steered, "b": slot_step(["clamp"] * BATCH), "uniform": functools.partial(steered, steering=rows[0]),
        "mixed": functools.partial(steered, steering=rows), "c8": slot_step(["recon"] * BATCH),
        "c1": slot_step(["recon"] + [None] * (BATCH - 1)),
    }
    return found


def recording_steps(bench: Bench) -> dict[str, dict[str, Step]]:
    """r0 and r8 per phase, on a steered model of their own: ``step`` with ``record_steps``'s
    plan, as a serving loop records. On CUDA each is a replay of the idle or the recording
    graph of ``capture_steps``; graph trees (the other configurations) cannot record."""
    steered = sc.steer(bench.model, {bench.preset.site: bench.sae}, dynamic=False, max_batch=BATCH,
                       max_tokens=BATCH * PREFILL, max_top_k=RECORD_TOP_K)
    prefill = functools.partial(steered.step, bench.prompts, use_cache=False)
    if bench.device.type == "cuda":
        paths = [sc.Paths(), sc.Paths(record=True)]
        # The decode graph writes the cache at the position it was captured at, every replay.
        decode, prefill = (steered.capture_steps(fn, paths).replay for fn in (decoder(bench, "r0, r8", steered.step), prefill))
        steps = {"r0": (decode, prefill), "r8": (decode, prefill)}
    else:
        steps = {name: (decoder(bench, name, steered.step), prefill) for name in ("r0", "r8")}
    plans = {"r0": None, "r8": [sc.Features(bench.preset.site, top_k=RECORD_TOP_K)]}
    return {phase: {name: functools.partial(recorded_step, steered, steps[name][i], plan) for name, plan in plans.items()}
            for i, phase in enumerate(("decode", "prefill"))}


def recorded_step(steered: sc.SteeredModel, step: Step, record: list[sc.Features] | None) -> object:
    """Plan ``record`` (None: nothing) for the next step, run ``step``, and copy out what it recorded."""
    steered.record_steps(record, BATCH)
    output = step()
    return steered.step_features() if record is not None else output


def baseline_forwards(bench: Bench) -> dict[str, Callable[..., object]]:
    """The plain model and the hand-written clamps: hooks (eager, compiled) and nnsight."""
    layer = bench.preset.layer
    dense = oc.hooked_copy(bench.model, layer, oc.dense_clamp(bench.sae))
    sparse = oc.hooked_copy(bench.model, layer, oc.sparse_clamp(bench.sae))
    found = {"a": bench.plain, "af": bench.plain, "af1": bench.plain, "ae": bench.plain, "d": dense, "ds": sparse,
             "e": oc.compile_hooked(dense, "dense_hook", bench.mode), "es": oc.compile_hooked(sparse, "sparse_hook", bench.mode)}
    if oc.nnsight_available():
        found["nn"] = oc.nnsight_clamp(bench.model, layer, oc.sparse_clamp(bench.sae))
    else:
        print("nnsight is not installed (pip install -e '.[bench]'): skipping configuration nn")
    return found


def decoder(bench: Bench, name: str, fn: Callable[..., object]) -> Step:
    """A decode step of ``fn`` on a static cache of its own, primed with an 8-token prompt."""
    print(f"priming the decode cache for {name} ...", flush=True)
    cache = transformers.StaticCache(config=bench.model.config, max_cache_len=bench.cache_len)
    # Eagerly: tensors first created inside a CUDA-graphed call would live in (and be
    # overwritten through) that graph's memory pool, and no prompt shape is compiled.
    bench.model(bench.prompts[:, :8], **{CACHE: cache})
    return lambda: fn(bench.step_ids, **{CACHE: cache})


def then(step: Step, fn: Callable[..., object], *args: object) -> object:
    """``step()``, then ``fn(*args)``."""
    step()
    return fn(*args)


def sae_matmuls(sae: sc.SAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's arithmetic with nothing else: ``(x @ W_enc + b_enc) @ W_dec + b_dec`` for ``x [n, D]``."""
    return torch.addmm(sae.b_dec, torch.addmm(sae.b_enc, x, sae.W_enc), sae.W_dec)


def encode_matmul(sae: sc.SAE, x: torch.Tensor) -> torch.Tensor:
    """The encode alone: ``x @ W_enc + b_enc`` for ``x [n, D]``."""
    return torch.addmm(sae.b_enc, x, sae.W_enc)


def add_matmuls(steps: dict[str, Step], sae: sc.SAE, x: torch.Tensor) -> None:
    """Make f, and append the bare SAE matmuls to af, af1 and ae where present, for the tokens
    ``x [B, S, D]``."""
    tokens = x.flatten(0, 1)  # [B*S, D]
    extra = {"af": (sae_matmuls, tokens), "af1": (sae_matmuls, x[0]), "ae": (encode_matmul, tokens)}
    for name, (fn, inputs) in extra.items():
        if name in steps:
            steps[name] = functools.partial(then, steps[name], fn, sae, inputs)
    steps["f"] = functools.partial(sae_matmuls, sae, tokens)


def make_steps(bench: Bench, only: set[str] | None) -> dict[str, dict[str, Step]]:
    """Each phase's timed step per configuration (all, or those in ``only``)."""
    forwards = {**baseline_forwards(bench), **steered_forwards(bench)}
    if only is not None:
        forwards = {name: fn for name, fn in forwards.items() if name in only or name == "a"}
    x = torch.randn(BATCH, PREFILL, bench.preset.hidden, device=bench.device, dtype=bench.sae.W_enc.dtype)
    steps = {"decode": {name: decoder(bench, name, fn) for name, fn in forwards.items()},
             "prefill": {name: functools.partial(fn, bench.prompts, use_cache=False) for name, fn in forwards.items()}}
    if only is None or only & {"r0", "r8"}:
        for phase, fns in recording_steps(bench).items():
            steps[phase].update(fns)
    for phase, tokens in (("decode", x[:, :1]), ("prefill", x)):
        add_matmuls(steps[phase], bench.sae, tokens)
    return steps


def check_clamps(prefill: dict[str, Step]) -> None:
    """Fail unless every clamping configuration's logits match the eager dense hook's (d) far
    better than the unsteered ones (a) do: a hook that did not run would time as fast as a."""
    reference = prefill["d"]().logits.float()
    effect = (prefill["a"]().logits.float() - reference).abs().max().item()
    for name in ("b", "uniform", "ds", "e", "es", "nn"):
        if name in prefill:
            error = (prefill[name]().logits.float() - reference).abs().max().item()
            if not error < 0.25 * effect:
                raise RuntimeError(f"configuration {name} does not clamp like d: max |{name} - d| = {error:.3g}, "
                                   f"while the clamp itself moves the logits by {effect:.3g}.")


def block_ms(fn: Step, calls: int, sync: Callable[[], None]) -> float:
    """Mean time of ``calls`` back-to-back calls: one sample of a block, in ms per call."""
    fn()  # the first call after switching configuration pays for cold caches; not timed
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / calls


def time_rounds(steps: dict[str, dict[str, Step]], args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, list[dict[str, float]]]:
    """``args.repeats`` rounds; per phase, one ``{config: ms}`` per round."""
    block = {"decode": args.block, "prefill": 1}
    order = random.Random(0)
    rounds: dict[str, list[dict[str, float]]] = {phase: [] for phase in steps}
    for _ in range(args.repeats):
        for phase, fns in steps.items():
            # A fresh random order each round, so no configuration always follows another.
            names = order.sample(list(fns), len(fns))
            times = {name: block_ms(fns[name], block[phase], sync) for name in names}
            rounds[phase].append({name: times[name] for name in fns})
    return rounds


def host_us(bench: Bench, steps: dict[str, Step], calls: int) -> dict[str, float]:
    """Per decode step of each steered configuration: µs outside the compiled callable (median of 3 blocks).

    Wraps the model's compiled callable (a private attribute, restored afterwards) to add up
    the time spent inside it; the rest of each step's wall time is the host cost."""
    steered = bench.steered
    inner = steered._compiled
    inside = [0.0]

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        inside[0] += time.perf_counter() - start
        return out

    steered._compiled = timed
    found = {}
    try:
        for name in ("s0", "b", "uniform", "mixed", "c8"):
            if name in steps:
                found[name] = statistics.median(_outside_us(steps[name], inside, calls, bench.sync) for _ in range(3))
    finally:
        steered._compiled = inner
    return found


def _outside_us(fn: Step, inside: list[float], calls: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    inside[0] = 0.0
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    total = time.perf_counter() - start  # host time only: the GPU may still be working
    sync()
    return (total - inside[0]) * 1e6 / calls


def assessments(rounds: dict[str, list[dict[str, float]]], device: str) -> list[dict[str, object]]:
    """Every ratio whose configurations ran, per phase, with its interval and verdict."""
    goals = targets(device)
    found = []
    for phase, rs in rounds.items():
        for name in TARGETED + INFORMATIVE:
            ratio = Ratio(name)
            if ratio.configs <= set(rs[0]):
                found.append(asdict(assess(ratio, phase, rs, goals.get((phase, name)))))
    return found


def run(args: argparse.Namespace) -> dict:
    bench = setup(args)
    with torch.no_grad():
        steps = make_steps(bench, set(args.configs.split(",")) if args.configs else None)
        for phase, fns in steps.items():
            for name, fn in fns.items():
                print(f"warming up {phase} {name} ...", flush=True)
                for _ in range(args.warmup):
                    fn()
        if "d" in steps["prefill"]:
            check_clamps(steps["prefill"])
        graphs = counters["stats"]["unique_graphs"]
        rounds = time_rounds(steps, args, bench.sync)
        recompiles = counters["stats"]["unique_graphs"] - graphs
        host = host_us(bench, steps["decode"], args.block)
        if args.profile:
            profile(steps, args.profile, bench.device)
    b_minus_a = [1e3 * (r["b"] - r["a"]) for r in rounds["decode"]] if "b" in rounds["decode"][0] else []
    return {
        "medians_ms": {phase: {name: statistics.median(r[name] for r in rs) for name in rs[0]} for phase, rs in rounds.items()},
        "assessments": assessments(rounds, bench.device.type),
        "host_us_per_decode_step": host,
        "decode_b_minus_a_us": statistics.median(b_minus_a) if b_minus_a else None,
        "rounds_ms": rounds,
        "recompiles_during_timing": recompiles,
    }


def profile(steps: dict[str, dict[str, Step]], names: list[str], device: torch.device) -> None:
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


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def source_state() -> dict[str, object]:
    """The commit, and the library files that differ from it (uncommitted edits are measured
    too), when the run starts; empty where the tree is no git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--", "sae_compile"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit.stdout.strip(), "uncommitted_library_files": [line[3:] for line in status.stdout.splitlines()]}


def report(result: dict) -> None:
    """Print the latency table, the targets with verdicts, the other ratios and the host cost."""
    medians = result["medians_ms"]
    print(f"\nmachine: {result['machine']}")
    print(f"{'config':9}" + "".join(f"{p + ' ms':>14}" for p in medians))
    for name in medians["decode"]:
        print(f"{name:9}" + "".join(f"{medians[p][name]:14.3f}" for p in medians))
    print(f"\n{'target':18}{'phase':9}{'median [bootstrap 95% CI]':32}{'bound':9}verdict")
    for a in result["assessments"]:
        if a["target"]:
            print(f"{a['ratio']:18}{a['phase']:9}{Assessment(**a).figure():32}{a['target']:9}{a['verdict']} ({a['note']})")
    print(f"\n{'other ratio':18}{'phase':9}median [bootstrap 95% CI]")
    for a in result["assessments"]:
        if not a["target"]:
            print(f"{a['ratio']:18}{a['phase']:9}{Assessment(**a).figure():32}{a['note']}")
    host = ", ".join(f"{name} {us:.1f}" for name, us in result["host_us_per_decode_step"].items())
    print(f"\nhost µs per decode step outside the compiled graph: {host}")
    if result["decode_b_minus_a_us"] is not None:
        print(f"decode b - a (wall, median over rounds): {result['decode_b_minus_a_us']:.1f} µs")
    print(f"recompiles while timing: {result['recompiles_during_timing']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(oc.MODELS), default="default", help="model preset")
    parser.add_argument("--small", action="store_const", dest="model", const="small", help="same as --model small")
    parser.add_argument("--sae", choices=sorted(oc.SAES), help="SAE preset (default: the model preset's own)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block", type=int, default=5, help="decode steps per timed block")
    parser.add_argument("--configs", help="comma-separated configurations to run (a always runs); default: all")
    parser.add_argument("--dry-run", action="store_true", help="print the shapes a run would allocate, allocating nothing")
    parser.add_argument("--profile", nargs="*", default=[], metavar="CONFIG", help="after timing, profile these configurations")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sae = args.sae or oc.MODELS[args.model].sae
    if args.dry_run:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        for key, value in oc.dry_run(oc.MODELS[args.model], oc.SAES[sae], dtype).items():
            print(f"{key}: {value}")
        return
    state = source_state()  # at the start: the library as this run imported it
    result = run(args)
    result["machine"] = {**machine(args.device), **state}
    result["config"] = {**vars(args), "sae": sae}
    report(result)
    suffix = "" if args.model == "default" else f"_{args.model}"
    suffix += "" if args.sae is None or args.sae == oc.MODELS[args.model].sae else f"_{args.sae}"
    save(result, f"overhead_{args.device.split(':')[0]}{suffix}")


def save(result: dict, name: str) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` and say where."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
