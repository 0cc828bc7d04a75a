"""Site handles: deterministic for the same model and sites, distinct for live models, and
freed with the model, so re-steering hits the FX graph cache and nothing leaks."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import sae_compile as sc
from sae_compile.runtime.state import Capacity, RoutingState, SiteState, live_handles, register_site
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

POST = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=3)


def _owned(steered: sc.SteeredModel) -> set[str]:
    return {state.handle for state in steered._states.values()}


def test_same_model_and_sites_get_the_same_handles_once_the_old_model_is_gone(model) -> None:
    sae = random_sae(hidden_size(model), 16, "relu", seed=1)
    first = _owned(sc.steer(model, {POST: sae}, backend="aot_eager"))
    gc.collect()
    again = _owned(sc.steer(model, {POST: sae}, backend="aot_eager"))
    assert first == again and len(first) == 1


def test_live_models_never_share_a_handle_or_state(model) -> None:
    d = hidden_size(model)
    sae = random_sae(d, 16, "relu", seed=1)
    a = sc.steer(model, {POST: sae}, backend="aot_eager")
    b = sc.steer(model, {POST: sae}, backend="aot_eager")
    assert _owned(a).isdisjoint(_owned(b))
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(a.steering_state().values(), b.steering_state().values(), strict=True))
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    steering = sc.Steering(sc.Clamp(POST, 3, 6.0))
    with torch.no_grad():
        b.slots.admit("held", sc.Steering(sc.AddVector(POST, torch.ones(d))), 0)  # b's tables differ from a's
        got_a = a(ids, steering=steering).logits
        got_b = b(ids).logits
    assert_rel_close(got_a, reference_logits(model, ids, saes={POST: sae}, steering=steering), 1e-5)
    assert_rel_close(got_b, reference_logits(model, ids), 1e-5)


def test_a_live_handle_is_never_overwritten() -> None:
    capacity = Capacity()
    routing = RoutingState(capacity, torch.float32, torch.device("cpu"))
    first = SiteState("blocks.0.hook_resid_post", 8, None, capacity, routing, torch.float32, torch.device("cpu"))
    second = SiteState("blocks.0.hook_resid_post", 8, None, capacity, routing, torch.float32, torch.device("cpu"))
    register_site("test_handles:taken", first)
    register_site("test_handles:taken", first)  # the same state again is fine
    with pytest.raises(RuntimeError, match="already held by a live steering state"):
        register_site("test_handles:taken", second)


def test_no_state_leaks_over_100_steer_delete_cycles(model) -> None:
    sae = random_sae(hidden_size(model), 16, "jumprelu", seed=2)
    gc.collect()
    before = set(live_handles())
    states = []
    for _ in range(100):
        steered = sc.steer(model, {POST: sae}, sites=["blocks.0.hook_resid_pre"], backend="aot_eager")
        states.extend(weakref.ref(state) for state in steered._states.values())
        del steered
    # No reference cycle holds a SteeredModel: it is freed as soon as the last name goes.
    assert all(ref() is None for ref in states)
    assert set(live_handles()) == before
