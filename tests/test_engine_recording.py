"""Reading features in a serving engine, without vLLM: ``EngineState`` driven as the vLLM router
drives it (``sync``, ``route``, the op on a flattened ragged batch, ``recording.collect``) over
several steps, and each request's record taken and compared with the fp64 reference per token.

A request records top-k, or a dense list, of its own; requests of every kind share a step; a
request's tokens arrive in chunks (a chunked prefill, then decode steps) and land at their
positions; a request computed again (preempted, resumed) overwrites its record.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile import Clamp, Features, Reconstruct, Steering
from sae_compile.runtime.engine import EngineState, SiteShape, validate_record
from sae_compile.runtime.state import Capacity
from tests.factories import assert_rel_close, random_sae
from tests.reference import reference_top_k, sae_encode64

SITE = "blocks.0.hook_resid_post"
ADDITIVE = "blocks.0.hook_resid_pre"
D, F, MAX_TOP_K = 16, 40, 8
CAPACITY = Capacity(max_rows=6, max_clamps=4, max_batch=64, max_tokens=64, with_call_rows=False, max_top_k=MAX_TOP_K)


def _engine(activation: str) -> tuple[EngineState, object]:
    sae = random_sae(D, F, activation, seed=5, k=10 if activation == "topk" else None, apply_b_dec_to_input=activation == "relu")
    state = EngineState({SITE: sae, ADDITIVE: None}, D, CAPACITY, torch.float32, torch.device("cpu"), f"test_engine_recording_{activation}")
    return state, sae


ENGINES = {activation: _engine(activation) for activation in ("relu", "jumprelu", "topk")}
_IDS = itertools.count()

RECORDS = [
    None,
    Features(SITE, top_k=3),
    Features(SITE, top_k=MAX_TOP_K),
    Features(SITE, features=[4, 0, 39]),
    Features(SITE, features=[7]),
]
STEERINGS = [None, Steering(Clamp(SITE, 1, 3.0)), Steering(Reconstruct(SITE), tokens="generated")]


class Request:
    """A request as the engine sees it, and the stream its tokens carry (one row per position)."""

    def __init__(self, record: Features | None, steering: Steering | None, length: int, seed: int) -> None:
        self.id = f"request-{next(_IDS)}"
        self.record, self.steering = record, steering
        self.stream = torch.randn(length, D, generator=torch.Generator().manual_seed(seed))  # [L, D]
        self.computed = 0  # positions computed so far

    def spec(self) -> tuple:
        return self.steering, 4, () if self.record is None else (self.record,)


def _step(state: EngineState, batch: list[tuple[Request, int]], padding: int = 0) -> None:
    """One forward: each request computes its next ``count`` positions; ``padding`` engine pad tokens."""
    requests = [request for request, _ in batch]
    state.sync([r.id for r in requests], {r.id: r.spec() for r in requests}.__getitem__)
    positions = [torch.arange(r.computed, r.computed + count) for r, count in batch]
    x = torch.cat([r.stream[r.computed : r.computed + count] for r, count in batch] + [torch.randn(padding, D)])
    state.route([r.id for r in requests], torch.tensor([count for _, count in batch]), torch.cat([*positions, torch.zeros(padding, dtype=torch.long)]))
    torch.ops.sae_compile.steer(x, state.sites[SITE].handle)
    state.recording.collect()
    for request, count in batch:
        request.computed += count


def _check(record, request: Request, sae, recorded: int) -> None:
    """``record`` holds the reference at the first ``recorded`` positions."""
    f64 = sae_encode64(sae, request.stream[:recorded])  # [n, F]
    width = request.record.width
    assert record.values.shape == (1, recorded, width)
    if request.record.top_k is not None:
        values, indices = reference_top_k(f64, width)
        assert torch.equal(record.indices[0], indices)
        assert_rel_close(record.values[0], values.float(), 1e-5)
    else:
        assert record.indices is None and record.features == request.record.features
        assert_rel_close(record.values[0], f64[:, list(request.record.features)].float(), 1e-5)


request_strategy = st.tuples(st.integers(0, len(RECORDS) - 1), st.integers(0, len(STEERINGS) - 1), st.integers(1, 7))


@settings(deadline=None)
@given(
    activation=st.sampled_from(sorted(ENGINES)),
    requests=st.lists(request_strategy, min_size=1, max_size=4),
    chunk=st.integers(1, 6),
    padding=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_records_match_the_reference_across_chunked_steps(activation, requests, chunk, padding, seed):
    state, sae = ENGINES[activation]
    batch = [Request(RECORDS[r], STEERINGS[s], prompt + 3, seed + i) for i, (r, s, prompt) in enumerate(requests)]
    prompts = [prompt for _, _, prompt in requests]
    while any(r.computed < p for r, p in zip(batch, prompts, strict=True)):  # chunked prefill
        _step(state, [(r, min(chunk, p - r.computed)) for r, p in zip(batch, prompts, strict=True) if r.computed < p], padding)
    for _ in range(2):  # decode steps; the last generated token is never fed back
        _step(state, [(r, 1) for r in batch], padding)
    taken = state.recording.take([r.id for r in batch])
    assert set(taken) == {r.id for r in batch if r.record is not None}, "a request that records nothing has no record"
    for request in batch:
        if request.record is not None:
            assert set(taken[request.id]) == {SITE}
            _check(taken[request.id][SITE], request, sae, request.computed)
    assert state.recording.take([r.id for r in batch]) == {}, "a record is taken once"


def test_a_request_computed_again_overwrites_its_record():
    state, sae = ENGINES["jumprelu"]
    request = Request(Features(SITE, top_k=4), None, 6, seed=1)
    _step(state, [(request, 6)])
    stale = request.stream.clone()
    request.stream[2:] = torch.randn(4, D)  # preempted after 2 positions; what is recomputed differs
    request.computed = 2
    _step(state, [(request, 4)])
    record = state.recording.take([request.id])[request.id][SITE]
    _check(record, request, sae, 6)
    assert not torch.equal(sae_encode64(sae, stale[2:]), sae_encode64(sae, request.stream[2:]))


def test_a_request_resumed_after_leaving_the_batch_keeps_its_record():
    state, sae = ENGINES["relu"]
    request, other = Request(Features(SITE, top_k=2), None, 5, seed=2), Request(None, None, 3, seed=3)
    _step(state, [(request, 3)])
    _step(state, [(other, 3)])  # the recording request is out of the batch (preempted)
    _step(state, [(request, 2)])
    _check(state.recording.take([request.id])[request.id][SITE], request, sae, 5)


def test_steps_that_record_nothing_plan_nothing():
    state, _ = ENGINES["relu"]
    recorder = state.sites[SITE].recorder
    recording, idle = Request(Features(SITE, top_k=2), None, 3, seed=4), Request(None, STEERINGS[1], 3, seed=5)
    _step(state, [(recording, 2), (idle, 2)])
    assert recorder.plan is not None and recorder.plan.rows == (0, 1)
    _step(state, [(idle, 1)])
    assert recorder.plan is None
    assert not state.sites[SITE].live_paths(1).record
    state.recording.take([recording.id])


def test_records_not_taken_are_dropped_oldest_first():
    state, _ = _engine("relu")
    state.recording._retain = 2
    requests = [Request(Features(SITE, top_k=1), None, 2, seed=i) for i in range(4)]
    for request in requests:
        _step(state, [(request, 2)])
    assert set(state.recording.take([r.id for r in requests])) == {r.id for r in requests[2:]}


def test_records_are_taken_by_the_clients_key():
    state, sae = ENGINES["jumprelu"]
    first, second = Request(Features(SITE, top_k=2), None, 3, seed=6), Request(Features(SITE, features=[1]), None, 4, seed=7)
    for request, key in ((first, "mine"), (second, "theirs")):
        state.sync([request.id], {request.id: (None, 4, (request.record,), key)}.__getitem__)
        _step(state, [(request, len(request.stream))])
    taken = state.recording.take_keyed(["theirs", "unknown"])
    assert set(taken) == {"theirs"}
    _check(taken["theirs"][SITE], second, sae, 4)
    assert state.recording.take_keyed(["theirs"]) == {}, "taken once"
    assert set(state.recording.take([first.id])) == {first.id}
    assert state.recording.take_keyed(["mine"]) == {}, "a record taken by id is gone for its key too"


SHAPES = {SITE: SiteShape(D, F, CAPACITY), ADDITIVE: SiteShape(D, 0, CAPACITY)}
BAD_RECORDS = {
    "unattached site": ([Features("blocks.3.hook_resid_post", top_k=2)], "not attached"),
    "additive site": ([Features(ADDITIVE, top_k=2)], "no SAE attached"),
    "top_k too large": ([Features(SITE, top_k=MAX_TOP_K + 1)], r"outside \[1, 8\]"),
    "feature out of range": ([Features(SITE, features=[F])], "out of range"),
    "too many features": ([Features(SITE, features=list(range(MAX_TOP_K + 1)))], "exceed max_top_k"),
    "site twice": ([Features(SITE, top_k=1), Features(SITE, features=[1])], "recorded twice"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_requests_are_refused(case):
    requests, message = BAD_RECORDS[case]
    with pytest.raises(ValueError, match=message):
        validate_record(requests, SHAPES)


def test_an_engine_without_record_buffers_refuses_records():
    shapes = {SITE: SiteShape(D, F, Capacity(max_top_k=0))}
    with pytest.raises(ValueError, match="max_top_k=0"):
        validate_record([Features(SITE, top_k=1)], shapes)


def test_record_tables_must_hold_a_row_per_token():
    with pytest.raises(ValueError, match="max_batch"):
        EngineState({SITE: random_sae(D, F)}, D, Capacity(max_batch=4, max_tokens=64, max_top_k=4), torch.float32, torch.device("cpu"), "x")
