"""Declared capture paths (``sc.Paths``), on the CPU: a forward under ``capture_paths`` must be
what a CUDA graph captured from it would replay.

A CUDA graph keeps the kernels of one run and none of its Python. ``make_fx`` does the same
to the op: traced once under a declared path set, the trace is replayed after the host has
rewritten the steering rows, the assignment and the record plan, and must give what a live
forward (the host-planned paths, tested against the reference elsewhere) gives for each.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import sae_compile as sc
from sae_compile.lowering.kernels import record
from sae_compile.lowering.kernels.steer import steer_site
from sae_compile.runtime.capture import cheapest_covering
from sae_compile.runtime.state import capture_paths
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model

POST, MID, ADD = "blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "blocks.0.hook_attn_out"
BATCH, SEQ, D_SAE, MAX_TOP_K = 3, 4, 48, 8
EVERYTHING = sc.Paths(add=True, sparse=True, full=True, record=True)


@pytest.fixture(scope="module")
def steered() -> sc.SteeredModel:
    model = make_model("llama", seed=4)
    d = hidden_size(model)
    saes = {POST: random_sae(d, D_SAE, "jumprelu", seed=1), MID: random_sae(d, D_SAE, "topk", k=5, seed=2)}
    return sc.steer(model, saes, sites=[ADD], backend="aot_eager", max_batch=4, max_top_k=MAX_TOP_K)


def scenarios(d: int) -> list[tuple[list[sc.Steering | None], object]]:
    """(steering per row, record=) pairs that need different paths and record plans."""
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(d, generator=g)
    return [
        ([sc.Steering(sc.Clamp(POST, 3, 4.0), sc.AddVector(POST, vector)), sc.Steering(sc.Reconstruct(MID)), None],
         [sc.Features(POST, top_k=5), sc.Features(MID, top_k=8)]),
        ([None, sc.Steering(sc.Clamp(MID, 2, 2.0, "scale")), sc.Steering(sc.Clamp(POST, 7, -1.0, "add"))],
         [None, [sc.Features(POST, top_k=3), sc.Features(MID, top_k=2)], [sc.Features(POST, top_k=6)]]),
        ([sc.Steering(sc.Reconstruct(POST), tokens="prompt"), None, sc.Steering(sc.AddVector(MID, vector))],
         [sc.Features(POST, features=(1, 5, 7)), sc.Features(MID, features=(0, 9))]),
        ([None, None, None], None),
    ]


def assign(steered: sc.SteeredModel, steerings: list[sc.Steering | None], record_: object, x: torch.Tensor) -> None:
    """Host writes between replays: the rows, the assignment, the record plan, and the route."""
    for row, steering in enumerate(steerings):
        if row in steered.slots.requests:
            steered.slots.update(row, steering, SEQ)
        else:
            steered.slots.admit(row, steering, SEQ)
    steered.slots.assign(list(range(len(steerings))))
    steered.record_steps(record_, BATCH)
    steered._routing.route(torch.arange(SEQ), None, BATCH, SEQ)


def records(steered: sc.SteeredModel, site: str) -> sc.FeatureRecord | None:
    recorder = steered._by_name[site].recorder
    return None if recorder.plan is None else recorder.collect(BATCH, SEQ)


def assert_same_record(got: sc.FeatureRecord | None, want: sc.FeatureRecord | None) -> None:
    assert (got is None) == (want is None)
    if want is None:
        return
    assert got.features == want.features
    assert (got.indices is None) == (want.indices is None)
    if want.indices is not None:
        assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    assert_rel_close(got.values, want.values, 1e-5)


@pytest.mark.parametrize("site", [POST, MID])
def test_a_trace_under_declared_paths_replays_every_later_assignment(steered: sc.SteeredModel, site: str) -> None:
    d = hidden_size(steered.model)
    state = steered._by_name[site]
    x = torch.randn(BATCH, SEQ, d, generator=torch.Generator().manual_seed(1))
    cases = scenarios(d)
    assign(steered, *cases[0], x)
    with torch.no_grad(), capture_paths(EVERYTHING):
        graph = make_fx(lambda x: steer_site(x, state))(x)
    # A host sync would have frozen this first forward's values into the trace.
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert not {op for op in ops if "_local_scalar_dense" in op or "nonzero" in op}, ops
    for steerings, record_ in cases:
        assign(steered, steerings, record_, x)
        with torch.no_grad():
            replayed = graph(x)
        state.recorder.replayed()
        replayed_record = records(steered, site)
        with torch.no_grad():
            live = steer_site(x, state)
        assert_rel_close(replayed, live, 1e-5)
        assert_same_record(replayed_record, records(steered, site))
    steered.record_steps(None, BATCH)


def test_a_trace_without_the_record_path_records_nothing(steered: sc.SteeredModel) -> None:
    d = hidden_size(steered.model)
    x = torch.randn(BATCH, SEQ, d)
    assign(steered, *scenarios(d)[0], x)
    state = steered._by_name[POST]
    with torch.no_grad(), capture_paths(sc.Paths(add=True, sparse=True, full=True)):
        graph = make_fx(lambda x: steer_site(x, state))(x)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert not any("topk" in op or "sort" in op for op in ops)
    with pytest.raises(RuntimeError, match="does not hold the record path"):
        state.recorder.collect(BATCH, SEQ)
    steered.record_steps(None, BATCH)


def test_needed_paths_follow_the_assignment_and_the_record_plan(steered: sc.SteeredModel) -> None:
    d = hidden_size(steered.model)
    x = torch.randn(BATCH, SEQ, d)
    assign(steered, [sc.Steering(sc.AddVector(ADD, torch.ones(d))), None, None], None, x)
    assert steered.needed_paths() == sc.Paths(add=True)
    assign(steered, [None, sc.Steering(sc.Clamp(POST, 1, 2.0)), None], None, x)
    assert steered.needed_paths() == sc.Paths(sparse=True)
    assign(steered, [None, sc.Steering(sc.Clamp(MID, 1, 2.0)), None], [sc.Features(POST, top_k=2)], x)
    assert steered.needed_paths() == sc.Paths(full=True, record=True)  # a clamp on a TopK SAE encodes fully
    assign(steered, [None, None, None], None, x)
    assert steered.needed_paths() == sc.Paths()


def test_the_cheapest_covering_graph_is_chosen_and_a_missing_path_is_named() -> None:
    sets = [sc.Paths(add=True, sparse=True, full=True, record=True), sc.Paths(add=True, sparse=True), sc.Paths()]
    assert cheapest_covering(sets, sc.Paths()) == 2
    assert cheapest_covering(sets, sc.Paths(add=True)) == 1
    assert cheapest_covering(sets, sc.Paths(sparse=True, add=True)) == 1
    assert cheapest_covering(sets, sc.Paths(full=True)) == 0
    with pytest.raises(ValueError, match="full=True"):
        cheapest_covering(sets[1:], sc.Paths(full=True))


def test_step_records_what_record_steps_planned_until_changed(steered: sc.SteeredModel) -> None:
    d = hidden_size(steered.model)
    ids = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    steerings, _ = scenarios(d)[0]
    assign(steered, steerings, None, torch.empty(0))
    request = [sc.Features(POST, top_k=4)]
    with torch.no_grad():
        called = steered(ids, steering=steerings, record=request, prompt_len=SEQ)
        steered.record_steps(request, BATCH)
        steered.step(ids, use_cache=False)
        stepped = steered.step_features()
        unrecorded = steered(ids, steering=steerings, prompt_len=SEQ)  # a call without record= reads nothing
        steered.step(ids, use_cache=False)
        again = steered.step_features()
    assert not hasattr(unrecorded, "features")
    for got in (stepped[POST], again[POST]):
        assert_same_record(got, called.features[POST])
    with pytest.raises(ValueError, match="top_k=99"):
        steered.record_steps([sc.Features(POST, top_k=99)], BATCH)
    with torch.no_grad():
        steered.step(ids, use_cache=False)
    assert_same_record(steered.step_features()[POST], called.features[POST])  # the refused plan changed nothing
    with pytest.raises(RuntimeError, match="no forward ran"):
        steered.step_features()  # collected already
    steered.record_steps(request, BATCH)
    with pytest.raises(RuntimeError, match="since its plan was set"):
        steered.step_features()  # no step since the plan
    steered.record_steps(None, BATCH)


def test_warmup_with_the_record_path_runs_the_static_record(steered: sc.SteeredModel, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    original = record._record_static

    def counted(x, site, recorder, valid):
        ran.append(site.name)
        return original(x, site, recorder, valid)

    monkeypatch.setattr(record, "_record_static", counted)
    steered.warmup([(1, 2)], repeats=1, use_cache=False)
    assert ran == []
    steered.warmup([(1, 2)], repeats=1, paths=sc.Paths(add=True, record=True), use_cache=False)
    assert sorted(set(ran)) == sorted([MID, POST])


@pytest.mark.parametrize(("path_sets", "error", "message"), [
    ([], TypeError, "non-empty list of sc.Paths"),
    (["add"], TypeError, "non-empty list of sc.Paths"),
    ([sc.Paths(add=True)], ValueError, "captures CUDA graphs"),
])
def test_capture_steps_refuses_bad_path_sets_and_a_cpu_model(steered: sc.SteeredModel, path_sets, error, message) -> None:
    with pytest.raises(error, match=message):
        steered.capture_steps(lambda: None, path_sets)
