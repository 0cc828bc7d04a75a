"""Threads: two SteeredModels used at once both give correct results, and one SteeredModel
called from several threads serialises its calls, so each call sees its own steering."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import sae_compile as sc
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

POST = "blocks.1.hook_resid_post"
CALLS = 12


@pytest.fixture(scope="module")
def pair():
    """Two models, each steered, compiled once before any thread uses them."""
    models, steered = [], []
    for seed in (1, 2):
        model = make_model("llama", seed=seed)
        sae = random_sae(hidden_size(model), 32, "jumprelu", seed=seed)
        models.append((model, sae))
        steered.append(sc.steer(model, {POST: sae}, backend="aot_eager"))
        with torch.no_grad():
            steered[-1](ids_for(0))
    return models, steered


def ids_for(i: int) -> torch.Tensor:
    return torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(i))


def steering_for(i: int) -> sc.Steering:
    return sc.Steering(sc.Clamp(POST, i % 32, 2.0 + i), tokens=("all", "prompt")[i % 2])


def run_calls(steered: sc.SteeredModel, start: threading.Barrier, offset: int) -> list[torch.Tensor]:
    start.wait()
    with torch.no_grad():
        return [steered(ids_for(i), steering=steering_for(i), prompt_len=3).logits for i in range(offset, offset + CALLS)]


def expected_for(model, sae, offset: int) -> list[torch.Tensor]:
    return [reference_logits(model, ids_for(i), saes={POST: sae}, steering=steering_for(i), prompt_len=3)
            for i in range(offset, offset + CALLS)]


def test_two_models_in_two_threads(pair) -> None:
    models, steered = pair
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_calls, s, start, 10 * k) for k, s in enumerate(steered)]
        results = [f.result(timeout=600) for f in futures]
    for k, ((model, sae), got) in enumerate(zip(models, results, strict=True)):
        for actual, expected in zip(got, expected_for(model, sae, 10 * k), strict=True):
            assert_rel_close(actual, expected, 1e-5)


def test_one_model_from_several_threads_serialises_its_calls(pair) -> None:
    model, sae = pair[0][0]
    steered = pair[1][0]
    threads = 3
    start = threading.Barrier(threads)
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run_calls, steered, start, 100 * k) for k in range(threads)]
        results = [f.result(timeout=600) for f in futures]
    for k, got in enumerate(results):
        for actual, expected in zip(got, expected_for(model, sae, 100 * k), strict=True):
            assert_rel_close(actual, expected, 1e-5)


def test_slot_writes_wait_for_a_running_forward(pair) -> None:
    """A state write from another thread never lands in the middle of a forward."""
    steered = pair[1][1]
    entered, release = threading.Event(), threading.Event()
    original = steered._compiled

    def slow_forward(*args, **kwargs):
        entered.set()
        release.wait(timeout=60)
        return original(*args, **kwargs)

    steered._compiled = slow_forward
    try:
        with ThreadPoolExecutor(2) as pool:
            call = pool.submit(lambda: torch.no_grad()(steered.__call__)(ids_for(0), steering=steering_for(1)))
            assert entered.wait(timeout=60)
            admit = pool.submit(steered.slots.admit, "late", steering_for(2), 0)
            assert not admit.done()
            release.set()
            call.result(timeout=600)
            admit.result(timeout=600)
    finally:
        steered._compiled = original
        steered.slots.release("late")
