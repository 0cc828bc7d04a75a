"""A static-KV-cache decode loop in which requests join and leave with different steering.

The decode step is compiled once (and, on a GPU, captured in two CUDA graphs: one with the
clamps' paths only, one that can also record features; each step replays the one it
needs). Requests are admitted into ``steered.slots``, share rows when their steering is
identical, change steering mid-stream, and leave; the batch assignment is rewritten in
place before each step. Every 16th step records each slot's top SAE features. At the end
the loop prints the last record of slot 0 and how many graphs were compiled while it ran: zero.

HF's ``StaticCache`` keeps one length for the whole batch, so a request that joins a slot
continues that slot's context; a real engine would pair this with its own paged cache.

    python examples/serving_loop.py
"""

from __future__ import annotations

import random

import torch
import transformers
from torch._dynamo.utils import counters

import sae_compile as sc

SITE, SLOTS, PROMPT, STEPS, RECORD_EVERY = "blocks.2.hook_resid_post", 4, 8, 48, 16


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=256, vocab_size=512)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    d, width = config.hidden_size, 1024
    sae = sc.SAE(torch.randn(d, width) / d**0.5, torch.randn(width, d) / d**0.5, activation="jumprelu",
                 threshold=torch.full((width,), 0.1)).to(device)
    steered = sc.steer(model, {SITE: sae}, max_batch=SLOTS, max_rows=SLOTS)
    cache = transformers.StaticCache(config=config, max_cache_len=PROMPT + STEPS + 8)
    step_ids = torch.zeros(SLOTS, 1, dtype=torch.long, device=device)
    with torch.no_grad():  # allocate the cache eagerly, outside any compiled or captured call
        model(step_ids, past_key_values=cache)
        cache.reset()
    rng = random.Random(0)

    def new_steering() -> sc.Steering | None:
        if rng.random() < 0.25:
            return None
        edits = [sc.Clamp(SITE, rng.randrange(width), rng.choice([2.0, 5.0]), rng.choice(["set", "add"]))]
        return sc.Steering(*edits, tokens=rng.choice(["all", "generated"]))

    if device != "cuda":
        steered.warmup([(SLOTS, 1)], past_key_values=cache)  # compile the decode step before any request
        cache.reset()
    slots: list[str | None] = [None] * SLOTS
    for i in range(SLOTS):
        slots[i] = f"req{i}"
        steered.slots.admit(slots[i], new_steering(), PROMPT)
    steered.slots.assign(slots)
    out = None
    if device == "cuda":
        clamps, recording = sc.Paths(add=True, sparse=True), sc.Paths(add=True, sparse=True, record=True)
        graphs = steered.capture_steps(lambda: steered.step(step_ids, past_key_values=cache), [clamps, recording],
                                       reset=cache.reset)

    def decode() -> None:
        nonlocal out
        out = graphs.replay() if device == "cuda" else steered.step(step_ids, past_key_values=cache)

    prompt = torch.randint(0, config.vocab_size, (SLOTS, PROMPT), device=device)
    with torch.no_grad():
        steered.step(prompt, past_key_values=cache)  # prefill
        step_ids.copy_(prompt[:, -1:])
        decode()  # compile the decode shape before counting
    graphs = counters["stats"]["unique_graphs"]
    served = SLOTS
    with torch.no_grad():
        for _step in range(STEPS):
            slot = rng.randrange(SLOTS)
            event = rng.random()
            if event < 0.15:  # the request in this slot finishes; a new one joins
                steered.slots.release(slots[slot])
                slots[slot] = f"req{served}"
                served += 1
                steered.slots.admit(slots[slot], new_steering(), PROMPT)
            elif event < 0.3:  # the request changes its steering mid-stream
                steered.slots.update(slots[slot], new_steering())
            steered.slots.assign(slots)
            recording = _step % RECORD_EVERY == RECORD_EVERY - 1
            steered.record_steps([sc.Features(SITE, top_k=5)] if recording else None, SLOTS)
            decode()
            if recording:
                record = steered.step_features()[SITE]
            step_ids.copy_(out.logits[:, -1:].argmax(-1))
    print(f"device={device} requests served={served} steps={STEPS} rows in use={len(steered.slots.rows_in_use())}")
    top = ", ".join(f"{i}: {v:.3f}" for i, v in zip(record.indices[0, -1].tolist(), record.values[0, -1].tolist(), strict=True))
    print(f"slot 0's top features at {SITE} on the last recorded step: {top}")
    print(f"graphs compiled during the loop: {counters['stats']['unique_graphs'] - graphs}")


if __name__ == "__main__":
    main()
