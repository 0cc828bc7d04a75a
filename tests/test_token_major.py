"""The op's token-major form, as a serving engine drives it: a flattened ragged batch of requests
whose steerings, scopes and positions vary per token, against the fp64 reference per token.

``EngineState`` is driven the way the vLLM router drives it (``sync`` then ``route``), so
admission, release and row sharing are covered here without vLLM.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile import AddVector, Clamp, Reconstruct, Steering
from sae_compile.lowering.kernels import torch_path
from sae_compile.runtime.engine import EngineState, SiteShape, validate_steering
from sae_compile.runtime.state import Capacity
from tests.factories import assert_rel_close, random_sae
from tests.reference import apply_steering_at_site, token_scope_mask

SITE = "blocks.0.hook_resid_post"
D, F = 16, 24
CAPACITY = Capacity(max_rows=6, max_clamps=4, max_batch=6, max_tokens=64, with_call_rows=False)


def _engine(activation: str, dtype: torch.dtype = torch.float32) -> tuple[EngineState, object]:
    sae = random_sae(D, F, activation, seed=3, apply_b_dec_to_input=activation == "topk")
    state = EngineState({SITE: sae}, D, CAPACITY, dtype, torch.device("cpu"), f"test_token_major_{activation}_{dtype}")
    return state, sae


_REQUEST_IDS = itertools.count()
ENGINES = {activation: _engine(activation) for activation in ("relu", "jumprelu", "topk")}


def _steerings(seed: int) -> list[Steering | None]:
    vector = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return [
        None,
        Steering(Clamp(SITE, 1, 3.0), Clamp(SITE, 5, 0.5, mode="scale")),
        Steering(Clamp(SITE, 2, 1.0, mode="add"), tokens="prompt"),
        Steering(Reconstruct(SITE), tokens="generated"),
        Steering(AddVector(SITE, vector, scale=0.5), Clamp(SITE, 7, -1.0)),
    ]


request = st.tuples(
    st.integers(0, 4),  # steering choice
    st.sampled_from(["all", "prompt", "generated"]),
    st.integers(1, 5),  # tokens this step
    st.integers(0, 8),  # position of its first token
    st.integers(0, 10),  # prompt length
)


@given(
    activation=st.sampled_from(sorted(ENGINES)),
    requests=st.lists(request, min_size=1, max_size=5),
    padding=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_ragged_batch_matches_reference_per_token(activation, requests, padding, seed):
    state, sae = ENGINES[activation]
    choices = _steerings(seed)
    steerings = [_scoped(choices[choice], scope) for choice, scope, *_ in requests]
    ids = [f"request-{next(_REQUEST_IDS)}" for _ in requests]  # a fresh id is a new request
    described = dict(zip(ids, ((s, prompt_len) for s, (*_, prompt_len) in zip(steerings, requests, strict=True)), strict=True))
    counts = torch.tensor([count for _, _, count, _, _ in requests])
    positions = torch.cat([start + torch.arange(count) for _, _, count, start, _ in requests] + [torch.zeros(padding, dtype=torch.long)])
    state.sync(ids, described.__getitem__)
    state.route(ids, counts, positions)
    x = torch.randn(len(positions), D, generator=torch.Generator().manual_seed(seed))
    out = torch.ops.sae_compile.steer(x, state.sites[SITE].handle)
    expected = _reference(x, requests, steerings, sae)
    torch.testing.assert_close(out[len(expected):], x[len(expected):], rtol=0, atol=0)  # padding
    for token, (want, steered) in enumerate(expected):
        if steered:
            assert_rel_close(out[token], want, 1e-5)
        else:
            assert torch.equal(out[token], x[token])


def _scoped(steering: Steering | None, scope: str) -> Steering | None:
    return None if steering is None else Steering(*steering.edits, tokens=scope)


def _reference(x, requests, steerings, sae) -> list[tuple[torch.Tensor, bool]]:
    """Per real token: the fp64 reference output and whether the token is steered."""
    expected, token = [], 0
    for (_, _, count, start, prompt_len), steering in zip(requests, steerings, strict=True):
        rows = x[token : token + count]
        scope = "all" if steering is None else steering.tokens
        mask = token_scope_mask(scope, start + count, prompt_len)[start:]
        steered = apply_steering_at_site(rows, SITE, steering, sae, mask)
        expected += [(steered[i], steering is not None and bool(mask[i])) for i in range(count)]
        token += count
    return expected


def test_rows_are_shared_and_released():
    state, _ = _engine("relu")
    clamp = Steering(Clamp(SITE, 1, 2.0))
    steerings = {"a": clamp, "b": clamp, "c": Steering(Clamp(SITE, 2, 2.0)), "d": None}
    state.sync(list(steerings), lambda request_id: (steerings[request_id], 3))
    assert sorted(state.requests.rows_in_use().values()) == [1, 2]
    state.sync(["b", "d"], lambda request_id: (steerings[request_id], 3))
    assert list(state.requests.rows_in_use().values()) == [1]
    state.sync([], lambda request_id: (None, 0))
    assert state.requests.rows_in_use() == {}


def test_fp32_stream_of_a_bf16_model_keeps_unsteered_tokens_exact():
    """Engines add the residual stream in fp32 between casts; the op steers in the model dtype."""
    state, sae = _engine("jumprelu", torch.bfloat16)
    steering = Steering(Clamp(SITE, 1, 3.0))
    state.sync(["s", "u"], {"s": (steering, 0), "u": (None, 0)}.__getitem__)
    state.route(["s", "u"], torch.tensor([3, 2]), torch.arange(5))
    x = torch.randn(5, D)
    out = torch.ops.sae_compile.steer(x, state.sites[SITE].handle)
    assert out.dtype == torch.float32
    assert torch.equal(out[3:], x[3:])
    in_model_dtype = apply_steering_at_site(x[:3].bfloat16(), SITE, steering, sae.to(dtype=torch.bfloat16), torch.ones(3, dtype=torch.bool))
    assert_rel_close(out[:3], in_model_dtype.float(), 2e-2)


@pytest.mark.parametrize(
    ("steering", "message"),
    [
        (Steering(Clamp("blocks.3.hook_resid_post", 0, 1.0)), "not attached"),
        (Steering(Clamp(SITE, F, 1.0)), "out of range"),
        (Steering(AddVector(SITE, torch.ones(D + 1))), "length"),
        (Steering(*(Clamp(SITE, i, 1.0) for i in range(5))), "max_clamps"),
    ],
)
def test_front_end_validation_names_the_problem(steering, message):
    shapes = {SITE: SiteShape(D, F, CAPACITY)}
    with pytest.raises(ValueError, match=message):
        validate_steering(steering, shapes)


def test_long_token_major_batches_steer_in_chunks(monkeypatch):
    """A prefill longer than the sparse path's chunk gives the same tokens as one chunk would."""
    monkeypatch.setattr(torch_path, "SPARSE_PATH_CHUNK", 3)
    state, sae = ENGINES["jumprelu"]
    steering = Steering(Clamp(SITE, 1, 3.0), Clamp(SITE, 5, 0.5, mode="scale"))
    ids = [f"request-{next(_REQUEST_IDS)}" for _ in range(2)]
    state.sync(ids, {ids[0]: (steering, 0), ids[1]: (None, 0)}.__getitem__)
    state.route(ids, torch.tensor([7, 4]), torch.cat([torch.arange(7), torch.arange(4)]))
    x = torch.randn(11, D)
    out = torch.ops.sae_compile.steer(x, state.sites[SITE].handle)
    assert_rel_close(out[:7], apply_steering_at_site(x[:7], SITE, steering, sae, torch.ones(7, dtype=torch.bool)), 1e-5)
    assert torch.equal(out[7:], x[7:])


def test_an_engine_allocates_a_row_per_request_and_no_call_rows():
    state, _ = ENGINES["relu"]
    assert state.sites[SITE].sparse_enc.shape[0] == CAPACITY.max_rows + 1
    assert Capacity(max_rows=6).table_rows == 13
