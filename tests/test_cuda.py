"""GPU behaviour (marked ``cuda``; skipped without a GPU): a manually captured decode step,
CUDA graph trees under mode="reduce-overhead", and no host sync in the steered forward."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

import sae_compile as sc
from sae_compile.runtime.capture import capture, cheapest_covering
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

pytestmark = pytest.mark.cuda
POST, MLP = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
BATCH, PROMPT, STEPS = 2, 5, 6


@pytest.fixture(scope="module")
def setup():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model("llama", seed=3).cuda()
    d = hidden_size(model)
    saes = {POST: random_sae(d, 64, "jumprelu", seed=1).to("cuda"),
            MLP: random_sae(d, 32, "topk", k=4, seed=2).to("cuda")}
    return model, saes


STEERINGS = [
    sc.Steering(sc.Clamp(POST, 3, 5.0), sc.AddVector(MLP, torch.ones(32))),
    sc.Steering(sc.Reconstruct(MLP), sc.Clamp(MLP, 1, 2.0, "scale"), tokens="generated"),
    sc.Steering(sc.Clamp(POST, 7, -3.0, "add"), tokens="prompt"),
    None,
]


def test_captured_decode_step_follows_in_place_steering_changes(setup) -> None:
    """One capture serves every step while row b's steering changes in place between replays.

    Row a keeps one steering, so it is checked against the independent reference at every
    step. Row b's KV cache mixes steerings over time, so it is checked against the same
    steps run live (uncaptured) on a second cache.
    """
    model, saes = setup
    steered = sc.steer(model, saes, max_batch=BATCH)
    captured_cache, live_cache = (
        transformers.StaticCache(config=model.config, max_cache_len=PROMPT + STEPS + 4) for _ in range(2)
    )
    prompt = torch.randint(3, 97, (BATCH, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    step_ids = torch.zeros(BATCH, 1, dtype=torch.long, device="cuda")
    steered.slots.admit("a", STEERINGS[0], PROMPT)
    steered.slots.admit("b", None, PROMPT)
    steered.slots.assign(["a", "b"])
    graph, out = capture(lambda: steered.step(step_ids, past_key_values=captured_cache), reset=captured_cache.reset)
    with torch.no_grad():
        first = steered.step(prompt, past_key_values=captured_cache).logits  # prefill, not captured
        steered.step(prompt, past_key_values=live_cache)
    tokens = torch.cat([prompt, first[:, -1:].argmax(-1)], dim=1)
    graphs = counters["stats"]["unique_graphs"]
    for i in range(STEPS):
        steered.slots.update("b", STEERINGS[(i + 1) % len(STEERINGS)])
        step_ids.copy_(tokens[:, -1:])
        graph.replay()
        with torch.no_grad():
            live = steered.step(step_ids, past_key_values=live_cache).logits[:, -1]
        assert_rel_close(out.logits[:, -1], live, 1e-5)
        expected = reference_logits(model, tokens[:1], saes=saes, steering=STEERINGS[0], prompt_len=PROMPT)[:, -1]
        assert_rel_close(out.logits[:1, -1], expected, 1e-4)
        tokens = torch.cat([tokens, out.logits[:, -1:].argmax(-1)], dim=1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(tokens[0], tokens[1])


def test_reduce_overhead_has_no_cudagraph_skips(setup) -> None:
    model, saes = setup
    counters["inductor"]["cudagraph_skips"] = 0
    steered = sc.steer(model, saes, mode="reduce-overhead", max_batch=BATCH)
    ids = torch.randint(3, 97, (BATCH, 7), device="cuda")
    with torch.no_grad():
        for steering in [None, STEERINGS[0], STEERINGS[0], [STEERINGS[1], STEERINGS[2]], None, STEERINGS[2]]:
            got = steered(ids, steering=steering, prompt_len=4).logits.clone()
            expected = reference_logits(model, ids, saes=saes, steering=steering, prompt_len=4)
            assert_rel_close(got, expected, 1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert rel_err(expected, reference_logits(model, ids)) > 1e-3


def test_no_host_sync_in_the_steered_forward(setup) -> None:
    model, saes = setup
    steered = sc.steer(model, saes, max_batch=BATCH)
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(3, 97, (BATCH, 4), device="cuda")
    steered.slots.admit("s", STEERINGS[1], 2)
    steered.slots.assign(["s", None])
    with torch.no_grad():
        for _ in range(2):  # compile both shapes, on a fresh and on a reused (reset) cache
            steered.step(ids, past_key_values=cache)
            steered.step(ids[:, :1], past_key_values=cache)
            cache.reset()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steered.step(ids, past_key_values=cache)
            steered.step(ids[:, :1], past_key_values=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_warmup_prepares_every_path_a_batch1_capture_holds(setup) -> None:
    """``warmup`` of a batch-1 decode bucket, then a bare capture (no warmup of its own): the
    capture holds every path, so it must find each already compiled and initialised (a lazy
    Triton or cuBLAS init inside a global-mode capture raises), and a Reconstruct row admitted
    after the capture must replay correctly."""
    model, saes = setup
    steered = sc.steer(model, saes, max_batch=1)
    cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT + 4)
    prompt = torch.randint(3, 97, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    step_ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(prompt, past_key_values=cache)  # allocate the cache eagerly
    cache.reset()
    steered.warmup([(1, PROMPT), (1, 1)], past_key_values=cache)
    cache.reset()
    steered.slots.admit("r", sc.Steering(sc.AddVector(POST, torch.ones(32))), PROMPT)
    steered.slots.assign(["r"])
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        steered.step(prompt, past_key_values=cache)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = steered.step(step_ids, past_key_values=cache)
    assert counters["stats"]["unique_graphs"] == graphs
    reconstruct = sc.Steering(sc.Reconstruct(MLP), sc.Clamp(POST, 3, 4.0))
    steered.slots.update("r", reconstruct)
    cache.reset()
    with torch.no_grad():
        first = steered.step(prompt, past_key_values=cache).logits
    step_ids.copy_(first[:, -1:].argmax(-1))
    graph.replay()
    tokens = torch.cat([prompt, step_ids], dim=1)
    expected = reference_logits(model, tokens, saes=saes, steering=reconstruct, prompt_len=PROMPT)[:, -1]
    assert_rel_close(out.logits[:, -1], expected, 1e-4)


def test_recording_on_cuda_matches_the_reference_and_needs_the_record_path_in_a_capture(setup) -> None:
    """Outside a CUDA graph, top-k features on the GPU equal the reference's; a capture that does
    not hold the record path refuses to record instead of leaving stale buffers."""
    from tests.reference import reference_features, reference_top_k

    model, saes = setup
    steered = sc.steer(model, saes, max_batch=BATCH, backend="aot_eager")
    ids = torch.randint(3, 97, (BATCH, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    with torch.no_grad():
        record = steered(ids, steering=STEERINGS[0], record=[sc.Features(MLP, top_k=4)]).features[MLP]
    values, indices = reference_top_k(reference_features(model, ids, MLP, saes[MLP], saes=saes, steering=STEERINGS[0]), 4)
    assert torch.equal(record.indices, indices)
    assert_rel_close(record.values, values.float(), 1e-4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not hold the record path"):
        capture(lambda: steered(ids, record=[sc.Features(MLP, top_k=4)]), warmup=1)


def test_capture_steps_replays_the_cheapest_graph_and_records_in_it(setup) -> None:
    """Two graphs of one decode step: additive and sparse only, and every path with recording.
    Each replay runs the graph the assignment needs and matches the same step run live; the
    recording graph's features equal the live step's, for plans set after the capture."""
    model, saes = setup
    steered = sc.steer(model, saes, max_batch=BATCH, max_top_k=8)
    captured_cache, live_cache = (
        transformers.StaticCache(config=model.config, max_cache_len=PROMPT + 8) for _ in range(2)
    )
    prompt = torch.randint(3, 97, (BATCH, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    step_ids = torch.zeros(BATCH, 1, dtype=torch.long, device="cuda")
    steered.slots.admit("a", STEERINGS[0], PROMPT)
    steered.slots.admit("b", None, PROMPT)
    steered.slots.assign(["a", "b"])
    light, full = sc.Paths(add=True, sparse=True), sc.Paths(add=True, sparse=True, full=True, record=True)
    graphs = steered.capture_steps(
        lambda: steered.step(step_ids, past_key_values=captured_cache), [full, light], reset=captured_cache.reset
    )
    with torch.no_grad():
        first = steered.step(prompt, past_key_values=captured_cache).logits
        steered.step(prompt, past_key_values=live_cache)
    step_ids.copy_(first[:, -1:].argmax(-1))
    plans = [None, [sc.Features(POST, top_k=5)], [None, [sc.Features(MLP, features=(1, 3))]]]
    for steering_b, record in zip([None, STEERINGS[1], STEERINGS[2]], plans, strict=True):
        steered.slots.update("b", steering_b)
        steered.record_steps(record, BATCH)
        expected_graph = light if record is None and steering_b is not STEERINGS[1] else full
        assert graphs.path_sets[cheapest_covering(graphs.path_sets, steered.needed_paths())] == expected_graph
        out = graphs.replay()
        replayed = steered.step_features() if record is not None else {}
        with torch.no_grad():
            live = steered.step(step_ids, past_key_values=live_cache)
        assert_rel_close(out.logits[:, -1], live.logits[:, -1], 1e-5)
        live_records = steered.step_features() if record is not None else {}
        assert replayed.keys() == live_records.keys()
        for site, got in replayed.items():
            assert_rel_close(got.values, live_records[site].values, 1e-5)
            assert (got.indices is None) == (live_records[site].indices is None)
            assert got.indices is None or torch.equal(got.indices, live_records[site].indices)
    steered.record_steps(None, BATCH)
