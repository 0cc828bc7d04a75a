"""Steered vLLM offline: the same tokens and logprobs as ``sc.steer`` on HF, per request, in one
continuous batch; bad requests fail alone; no recompiles; no rows leak.

One engine for the module (vLLM's CPU build takes about a minute to start).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import STEERING_KEY, sampling_params  # noqa: E402
from tests.serving.engine_models import (  # noqa: E402
    HIDDEN,
    PROMPTS,
    hf_generate,
    hf_reference,
    site_saes,
    steered_llama,
)

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
LOGPROB_TOL = 2e-3


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


STEERINGS = {
    "unsteered": None,
    "clamps": sc.Steering(
        sc.Clamp("blocks.1.hook_resid_post", 3, 2.0),
        sc.Clamp("blocks.1.hook_resid_post", 7, 1.5, mode="add"),
        sc.Clamp("blocks.1.hook_resid_post", 11, 3.0, mode="scale"),
    ),
    "reconstruct_topk": sc.Steering(sc.Reconstruct("blocks.0.hook_mlp_out"), sc.Clamp("blocks.0.hook_mlp_out", 5, 1.0)),
    "add_vector": sc.Steering(sc.AddVector("blocks.0.hook_resid_pre", _vector(0), scale=0.5)),
    "prompt_only": sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 2, 2.5), tokens="prompt"),
    "generated_only": sc.Steering(sc.Clamp("blocks.1.hook_resid_mid", 4, 2.0), tokens="generated"),
    "shared_node": sc.Steering(
        sc.AddVector("blocks.0.hook_resid_post", _vector(1), scale=0.3),
        sc.Clamp("blocks.1.hook_resid_pre", 1, 1.5),
    ),
    "reconstruct_jumprelu": sc.Steering(sc.Reconstruct("blocks.1.hook_resid_post")),
}


@pytest.fixture(scope="module")
def llm(folder):
    engine = steered_llama(folder)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference(folder):
    return hf_reference(folder, site_saes())


def _requests(names: list[str]) -> tuple[list[dict], list]:
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    params = [sampling_params(STEERINGS[name], max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5) for name in names]
    return prompts, params


def _check_against_hf(output, prompt: list[int], steering, reference) -> None:
    tokens, logprobs = hf_generate(reference, prompt, steering, MAX_TOKENS)
    completion = output.outputs[0]
    assert list(completion.token_ids) == tokens
    for step, top in enumerate(completion.logprobs):
        hf_top5 = set(logprobs[step].topk(5).indices.tolist())
        assert set(top) == hf_top5, f"step {step}: top-5 differs"
        for token, logprob in top.items():
            assert abs(logprob.logprob - float(logprobs[step, token])) <= LOGPROB_TOL, (step, token)


def test_concurrent_requests_match_hf_per_request(llm, reference):
    names = list(STEERINGS)
    prompts, params = _requests(names)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for name, prompt, output in zip(names, prompts, outputs, strict=True):
        _check_against_hf(output, prompt["prompt_token_ids"], STEERINGS[name], reference)
    # The steerings change the text: otherwise the comparison above proves nothing.
    texts = {tuple(o.outputs[0].token_ids) for o in outputs[:4]} | {tuple(outputs[0].outputs[0].token_ids)}
    assert len(texts) >= 3


def test_identical_steerings_share_a_row(llm):
    prompts, params = _requests(["clamps", "clamps", "clamps", "add_vector"])
    llm.enqueue(prompts, params, use_tqdm=False)
    llm.llm_engine.step()
    (stats,) = llm.steering_stats()
    assert sorted(stats["rows_in_use"].values()) == [1, 3]
    llm.wait_for_completion(use_tqdm=False)


BAD_REQUESTS = {
    "malformed JSON": ("{not json", "steering JSON: "),
    "unknown site": (sc.Steering(sc.Clamp("blocks.9.hook_resid_post", 0, 1.0)).to_json(), "not attached"),
    "unattached site": (sc.Steering(sc.Clamp("blocks.0.hook_resid_mid", 0, 1.0)).to_json(), "not attached"),
    "feature out of range": (sc.Steering(sc.Clamp("blocks.1.hook_resid_post", 40, 1.0)).to_json(), "out of range"),
    "NaN": ('{"edits": [{"type": "clamp", "site": "blocks.1.hook_resid_post", "feature": 0, "value": NaN}]}', "steering JSON"),
    "wrong-length vector": (sc.Steering(sc.AddVector("blocks.0.hook_resid_pre", torch.ones(HIDDEN + 1))).to_json(), "length"),
    "clamp on additive site": (sc.Steering(sc.Clamp("blocks.0.hook_resid_pre", 0, 1.0)).to_json(), "no SAE"),
    "too many clamps": (
        sc.Steering(*(sc.Clamp("blocks.1.hook_resid_post", i, 1.0) for i in range(17))).to_json(), "max_clamps"
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_fails_alone(llm, reference, case):
    text, message = BAD_REQUESTS[case]
    good_prompts, good_params = _requests(["clamps", "unsteered"])
    llm.enqueue(good_prompts, good_params, use_tqdm=False)
    llm.llm_engine.step()  # the good requests are running when the bad one arrives
    bad = sampling_params(None, max_tokens=2)
    bad.extra_args = {STEERING_KEY: text}
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], bad, use_tqdm=False)
    outputs = sorted(llm.wait_for_completion(use_tqdm=False), key=lambda o: int(o.request_id.split("-")[0]))
    for name, prompt, output in zip(["clamps", "unsteered"], good_prompts, outputs, strict=True):
        _check_against_hf(output, prompt["prompt_token_ids"], STEERINGS[name], reference)


def test_no_recompiles_and_no_leaked_rows(llm):
    (before,) = llm.steering_stats()
    generator = torch.Generator().manual_seed(0)
    for round_ in range(25):  # 50 requests, steerings changing every round
        feature, value = int(torch.randint(0, 40, (1,), generator=generator)), float(torch.randn(1, generator=generator))
        steering = sc.Steering(sc.Clamp("blocks.1.hook_resid_post", feature, value), tokens=("all", "prompt", "generated")[round_ % 3])
        params = [sampling_params(steering, max_tokens=3, temperature=0.0), sampling_params(None, max_tokens=3)]
        llm.generate([{"prompt_token_ids": PROMPTS[round_ % 4]}] * 2, params, use_tqdm=False)
    _abort_some(llm, 150)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], sampling_params(None, max_tokens=1), use_tqdm=False)
    (after,) = llm.steering_stats()
    assert after["unique_graphs"] == before["unique_graphs"]
    assert after["graphs_rewritten"] == before["graphs_rewritten"] == 1
    assert after["rows_in_use"] == {}, "rows leaked"


def _abort_some(llm, count: int) -> None:
    """``count`` steered requests, every third aborted while running."""
    names = ["clamps", "reconstruct_topk", "add_vector", "prompt_only"]
    prompts, params = _requests([names[i % 4] for i in range(count)])
    ids = llm.enqueue(prompts, params, use_tqdm=False)
    llm.llm_engine.step()
    llm.llm_engine.abort_request(ids[::3])
    llm.wait_for_completion(use_tqdm=False)


def test_steering_json_is_what_travels(llm):
    params = sampling_params(STEERINGS["clamps"], max_tokens=1)
    assert sc.Steering.from_json(params.extra_args[STEERING_KEY]) == STEERINGS["clamps"]
    assert json.loads(params.extra_args[STEERING_KEY])["edits"][0]["type"] == "clamp"
    assert sampling_params(None, max_tokens=1).extra_args is None
