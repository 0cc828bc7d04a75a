"""Steered vLLM throughput: what per-request SAE steering costs a serving engine, offline.

Model: a random Llama (hidden 512, 4 layers, 8 heads of 64, intermediate 1376, vocab 8192), a
JumpReLU SAE of width 8192 at ``blocks.2.hook_resid_post``. Each round generates 64 tokens for
each of 16 requests of 32 prompt tokens, greedy, in one ``generate`` call, on each engine:

  v0  vLLM, unsteered
  v1  vLLM with sae_compile, every request steered with 4 clamps (the same 4)
  v2  vLLM with sae_compile, half the requests steered, each with 4 clamps of its own
  v3  what users do today: vLLM with enforce_eager=True and a PyTorch forward hook on the
      layer doing the same 4 clamps the SAELens way (full encode and decode, error kept)
  r0  the sae_compile engine, unsteered, every request skipping the prefix cache
  r1  the same, every request recording its top 16 features at the site (which skips the
      prefix cache too, so that every prompt position is recorded)

All engines live in one process for the whole run; each round runs them in a fresh random
order after an untimed warm-up round. Throughput is generated tokens per second; each ratio
is the median over rounds of that round's ratio, so drift of the machine cancels out.
Each round also times, in the worker, the bare encode matmul of the tokens r1 records (one
``addmm`` per forward: the prefill, then each decode step, each after the model's weights
were read once, as in a forward), as ``enc``.
Targets (CPU): v1/v0 <= 1.10, v2/v0 <= 1.10 (time ratios), v3/v1 >= 1.3, and (r1-r0)/enc <=
1.25: recording, end to end (in the graph, kept per request, handed back), costs at most 1.25x
the bare encode of the recorded tokens (issue 16's bound, read at the engine's level).
Run in the vllm environment: ``.venv-vllm/bin/python benchmarks/bench_vllm.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # v3 ships its hook to the worker

import vllm  # noqa: E402
from bench_overhead import machine, save  # noqa: E402

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import LLM, sampling_params  # noqa: E402

LAYER = 2
SITE = f"blocks.{LAYER}.hook_resid_post"
FEATURES = (11, 222, 3333, 4444)
REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 16, 32, 64
WIDTH, RECORD_TOP_K = 8192, 16
TARGETS = {"v1/v0": ("<=", 1.10), "v2/v0": ("<=", 1.10), "v3/v1": (">=", 1.3), "(r1-r0)/enc": ("<=", 1.25)}


def build(folder: Path, small: bool) -> sc.SAE:
    """The model (saved to ``folder``) and its SAE."""
    hidden = 128 if small else 512
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=4,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    W_enc = torch.randn(hidden, WIDTH, generator=g) / hidden**0.5
    W_dec = torch.randn(WIDTH, hidden, generator=g) / hidden**0.5
    threshold = torch.full((WIDTH,), 0.5)
    return sc.SAE(W_enc, W_dec, torch.zeros(WIDTH), torch.zeros(hidden), activation="jumprelu", threshold=threshold)


def clamps(offset: int = 0) -> sc.Steering:
    return sc.Steering(*(sc.Clamp(SITE, feature + offset, 5.0) for feature in FEATURES))


def engines(folder: Path, sae: sc.SAE) -> dict[str, vllm.LLM]:
    common = dict(dtype="float32", max_model_len=256, max_num_seqs=REQUESTS, max_num_batched_tokens=1024, seed=0, skip_tokenizer_init=True)
    plain = vllm.LLM(str(folder), **common)
    steered = LLM(str(folder), {SITE: sae}, max_top_k=RECORD_TOP_K, **common)
    eager = vllm.LLM(str(folder), enforce_eager=True, **common)
    eager.collective_rpc(_install_hook, args=(sae, LAYER, FEATURES))
    return {"v0": plain, "v1": steered, "v2": steered, "v3": eager, "r0": steered, "r1": steered}


def _install_hook(worker, sae: sc.SAE, layer: int, features: tuple[int, ...]) -> None:
    """In the worker: the SAELens-style clamp as a forward hook on decoder layer ``layer``.

    vLLM's layer returns ``(branch, residual)``; their sum is resid_post. The hook steers that
    sum and hands the residual back unchanged, so the next layer's fused add sees the steered
    stream.
    """
    from sae_compile.lowering.sites import layer_stack

    _, layers = layer_stack(worker.model_runner.model)

    def hook(module, args, output):
        branch, residual = output
        x = branch + residual
        f = sae.encode(x)
        error = x - sae.decode(f)
        f[:, list(features)] = 5.0
        return sae.decode(f) + error - residual, residual

    layers[layer].register_forward_hook(hook)


def _bare_encode_seconds(worker, site: str, forwards: list[int]) -> float:
    """In the worker: the bare encode matmul ``x @ W_enc + b_enc`` of each forward's tokens.

    Between two encodes (untimed) every model weight is read once, as a forward reads them:
    back to back, the encodes would find ``W_enc`` in the cache, which a forward has evicted.
    """
    state = worker.sae_state.sites[site]
    weights = list(worker.model_runner.model.parameters())
    x = torch.randn(max(forwards), state.W_enc.shape[0], dtype=state.W_enc.dtype)
    elapsed = 0.0
    for tokens in forwards:
        for weight in weights:
            weight.sum()
        start = time.perf_counter()
        torch.addmm(state.b_enc, x[:tokens], state.W_enc)
        elapsed += time.perf_counter() - start
    return elapsed


def encode_seconds(llm: LLM) -> float:
    """The bare encode of what r1 records: its prompts in one forward, then each decode step's."""
    forwards = [REQUESTS * PROMPT_TOKENS] + [REQUESTS] * (NEW_TOKENS - 1)
    return llm.collective_rpc(_bare_encode_seconds, args=(SITE, forwards))[0]


def workloads() -> dict[str, tuple[list[dict], list[vllm.SamplingParams]]]:
    g = random.Random(0)
    prompts = [{"prompt_token_ids": [g.randrange(3, 8192) for _ in range(PROMPT_TOKENS)]} for _ in range(REQUESTS)]
    common = dict(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    half = [clamps(offset=i) if i % 2 == 0 else None for i in range(REQUESTS)]
    record = [sc.Features(SITE, top_k=RECORD_TOP_K)]
    return {
        "v0": (prompts, [vllm.SamplingParams(**common)] * REQUESTS),
        "v1": (prompts, [sampling_params(clamps(), **common)] * REQUESTS),
        "v2": (prompts, [sampling_params(s, **common) for s in half]),
        "v3": (prompts, [vllm.SamplingParams(**common)] * REQUESTS),
        "r0": (prompts, [sampling_params(skip_reading_prefix_cache=True, **common)] * REQUESTS),
        "r1": (prompts, [sampling_params(record=record, **common)] * REQUESTS),
    }


def seconds(llm: vllm.LLM, prompts: list[dict], params: list) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
    if params[0].extra_args and "sae_record" in params[0].extra_args:
        assert all(o.features[SITE].indices.shape == (1, PROMPT_TOKENS + NEW_TOKENS, RECORD_TOP_K) for o in outputs)
    return elapsed


def run(rounds: int, small: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        sae = build(Path(folder), small)
        llms, loads = engines(Path(folder), sae), workloads()
        for name in llms:
            seconds(llms[name], *loads[name])  # warm-up: every bucket compiled and cached
        times: dict[str, list[float]] = {name: [] for name in llms}
        times["enc"] = []
        for _ in range(rounds):
            for name in random.sample([*llms, "enc"], len(llms) + 1):
                times[name].append(encode_seconds(llms["r1"]) if name == "enc" else seconds(llms[name], *loads[name]))
        stats = llms["v1"].steering_stats()
    per_round = {
        "v1/v0": [a / b for a, b in zip(times["v1"], times["v0"], strict=True)],
        "v2/v0": [a / b for a, b in zip(times["v2"], times["v0"], strict=True)],
        "v3/v1": [a / b for a, b in zip(times["v3"], times["v1"], strict=True)],
        "(r1-r0)/enc": [(r1 - r0) / enc for r1, r0, enc in zip(times["r1"], times["r0"], times["enc"], strict=True)],
    }
    tokens = REQUESTS * NEW_TOKENS
    return {
        "tokens_per_s": {name: tokens / statistics.median(t) for name, t in times.items() if name != "enc"},
        "encode_s": statistics.median(times["enc"]),
        "ratios": {key: statistics.median(v) for key, v in per_round.items()},
        "ratio_range": {key: [min(v), max(v)] for key, v in per_round.items()},
        "targets": TARGETS,
        "graphs_rewritten": stats[0]["graphs_rewritten"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a small model, for a quick smoke test")
    args = parser.parse_args()
    result = run(args.rounds, args.small)
    result["machine"] = machine("cpu")
    result["config"] = vars(args)
    print(f"\nmachine: {result['machine']}")
    for name, rate in result["tokens_per_s"].items():
        print(f"{name}: {rate:9.1f} generated tokens/s")
    print(f"\n{'ratio (time; median [min, max] over rounds)':44}target")
    for key, value in result["ratios"].items():
        low, high = result["ratio_range"][key]
        print(f"{key:12}{value:8.3f} [{low:5.2f}, {high:5.2f}]{'':14}{TARGETS[key][0]} {TARGETS[key][1]}")
    save(result, f"vllm_cpu{'_small' if args.small else ''}")


if __name__ == "__main__":
    main()
