"""Reading features from a steered vLLM engine: each request's record, over its prompt and every
generated token, equals the fp64 reference of the same sequence under the same steering; requests
of every kind share the continuous batch; bad record requests fail alone; nothing recompiles.

One engine for the module (vLLM's CPU build takes about a minute to start).
"""

from __future__ import annotations

import pytest
import torch
import transformers

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import RECORD_KEY, sampling_params  # noqa: E402
from tests.factories import assert_rel_close  # noqa: E402
from tests.reference import reference_features, reference_top_k  # noqa: E402
from tests.serving.engine_models import PROMPTS, site_saes, steered_llama  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
MAX_TOP_K = 8
# vLLM's fp32 kernels (oneDNN matmuls, fused add + norm) against the fp64 reference.
VALUE_TOL = 1e-4

CLAMPS = sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 3, 4.0), sc.Clamp("blocks.1.hook_resid_post", 5, 2.0))
# (steering, record) per request; one batch holds them all.
REQUESTS = {
    "top_k": (None, [sc.Features("blocks.1.hook_resid_post", top_k=5)]),
    "dense": (None, [sc.Features("blocks.1.hook_resid_post", features=[0, 7, 39])]),
    "steered_downstream": (CLAMPS, [sc.Features("blocks.1.hook_resid_pre", top_k=MAX_TOP_K), sc.Features("blocks.0.hook_attn_out", top_k=3)]),
    "topk_sae": (sc.Steering(sc.Reconstruct("blocks.0.hook_mlp_out"), tokens="generated"), [sc.Features("blocks.0.hook_mlp_out", top_k=6)]),
    "other_dense": (None, [sc.Features("blocks.1.hook_resid_post", features=[2]), sc.Features("blocks.1.hook_resid_mid", top_k=2)]),
    "unrecorded": (CLAMPS, None),
}


@pytest.fixture(scope="module")
def llm(folder):
    engine = steered_llama(folder, max_top_k=MAX_TOP_K)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _generate(llm, names: list[str], prompts: list[list[int]]):
    params = [sampling_params(REQUESTS[n][0], record=REQUESTS[n][1], max_tokens=MAX_TOKENS, temperature=0.0) for n in names]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _check(output, prompt: list[int], steering, requests, model) -> None:
    """Each site's record against the reference of the sequence the request computed."""
    generated = list(output.outputs[0].token_ids)
    computed = torch.tensor([prompt + generated[:-1]])  # the last generated token is never fed back
    length = len(prompt) + len(generated)
    assert set(output.features) == {r.site for r in requests}
    for request in requests:
        record = output.features[request.site]
        assert record.values.shape == (1, length, request.width) and record.values.dtype == torch.float32
        sae = site_saes()[request.site]
        f64 = reference_features(model, computed, request.site, sae, saes=site_saes(), steering=steering, prompt_len=len(prompt))
        if request.top_k is not None:
            values, indices = reference_top_k(f64, request.top_k)
            assert torch.equal(record.indices[:, :-1], indices), request
            assert bool((record.indices[:, -1] == -1).all())
            assert_rel_close(record.values[:, :-1], values.float(), VALUE_TOL)
        else:
            assert record.indices is None and record.features == request.features
            assert_rel_close(record.values[:, :-1], f64[..., list(request.features)].float(), VALUE_TOL)
        assert bool((record.values[:, -1] == 0).all())


def test_concurrent_requests_record_what_the_reference_computes(llm, model):
    names = list(REQUESTS)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outputs = _generate(llm, names, prompts)
    for name, prompt, output in zip(names, prompts, outputs, strict=True):
        steering, requests = REQUESTS[name]
        if requests is None:
            assert not hasattr(output, "features")
        else:
            _check(output, prompt, steering, requests, model)
    # The clamp upstream changes what blocks.1.hook_resid_pre records: the comparison above sees steering.
    plain = _generate(llm, ["top_k"], [prompts[2]])[0]
    assert not torch.equal(plain.features["blocks.1.hook_resid_post"].values, outputs[2].features["blocks.1.hook_resid_pre"].values)


def test_a_repeated_prompt_records_every_position(llm, model):
    prompt = PROMPTS[2]
    first, second = _generate(llm, ["top_k", "top_k"], [prompt, prompt])
    third = _generate(llm, ["top_k"], [prompt])[0]  # its prompt is in the prefix cache by now
    for output in (first, second, third):
        _check(output, prompt, None, REQUESTS["top_k"][1], model)


BAD_RECORDS = {
    "malformed JSON": ({RECORD_KEY: "[{"}, "record JSON"),
    "unattached site": ({RECORD_KEY: '[{"site": "blocks.1.hook_attn_out", "top_k": 2}]'}, "not attached"),
    "additive site": ({RECORD_KEY: '[{"site": "blocks.0.hook_resid_pre", "top_k": 2}]'}, "no SAE attached"),
    "top_k too large": ({RECORD_KEY: '[{"site": "blocks.1.hook_resid_post", "top_k": 9}]'}, r"outside \[1, 8\]"),
    "feature out of range": ({RECORD_KEY: '[{"site": "blocks.1.hook_resid_post", "features": [40]}]'}, "out of range"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_request_fails_alone(llm, model, case):
    extra_args, message = BAD_RECORDS[case]
    good = [PROMPTS[0], PROMPTS[1]]
    params = [sampling_params(REQUESTS[n][0], record=REQUESTS[n][1], max_tokens=MAX_TOKENS, temperature=0.0) for n in ("top_k", "dense")]
    llm.enqueue([{"prompt_token_ids": p} for p in good], params, use_tqdm=False)
    llm.llm_engine.step()  # the good requests are running when the bad one arrives
    bad = sampling_params(max_tokens=2, skip_reading_prefix_cache=True, extra_args=extra_args)
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], bad, use_tqdm=False)
    outputs = sorted(llm.wait_for_completion(use_tqdm=False), key=lambda o: int(o.request_id.split("-")[0]))
    for name, prompt, output in zip(("top_k", "dense"), good, outputs, strict=True):
        _check(output, prompt, None, REQUESTS[name][1], model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": 2}, "n=2"), ({"skip_reading_prefix_cache": False}, "prefix cache")],
)
def test_a_record_the_engine_could_not_complete_is_refused(llm, kwargs, message):
    params = sampling_params(record=[sc.Features("blocks.1.hook_resid_post", top_k=2)], max_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)


def test_changing_what_is_recorded_never_recompiles(llm):
    (before,) = llm.steering_stats()
    for round_ in range(10):
        k = 1 + round_ % MAX_TOP_K
        record = [sc.Features("blocks.1.hook_resid_post", top_k=k)] if round_ % 3 else [sc.Features("blocks.0.hook_attn_out", features=[round_])]
        params = [sampling_params(record=record, max_tokens=3, temperature=0.0), sampling_params(CLAMPS, max_tokens=3)]
        outputs = llm.generate([{"prompt_token_ids": PROMPTS[round_ % 4]}] * 2, params, use_tqdm=False)
        assert hasattr(outputs[0], "features") and not hasattr(outputs[1], "features")
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], sampling_params(max_tokens=1), use_tqdm=False)  # the last ones leave the batch
    (after,) = llm.steering_stats()
    assert after["unique_graphs"] == before["unique_graphs"]
    assert after["rows_in_use"] == {}
    assert after["records_held"] == 0, "records leaked"
