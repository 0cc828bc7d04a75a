"""Tensor parallelism: two ranks over gloo steer, and record features, exactly as one does.

Every rank holds the full residual stream (vLLM all-reduces before each residual add), so
each rank's state is the same and the steered tokens and the records must not change with the
rank count.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import LLM, sampling_params  # noqa: E402
from tests.serving.engine_models import ADDITIVE_SITES, PROMPTS, save_llama, site_saes  # noqa: E402

pytestmark = pytest.mark.vllm

STEERINGS = [
    None,
    sc.Steering(sc.Clamp("blocks.1.hook_resid_post", 3, 2.0), sc.Clamp("blocks.0.hook_attn_out", 1, 1.5, mode="add")),
    sc.Steering(sc.Reconstruct("blocks.0.hook_mlp_out"), tokens="generated"),
    sc.Steering(sc.Clamp("blocks.1.hook_resid_mid", 2, 3.0, mode="scale"), tokens="prompt"),
    None,  # PROMPTS[1] again, unsteered: the steering of request 1 must show
]
RECORDS = [
    [sc.Features("blocks.1.hook_resid_post", top_k=4)],
    [sc.Features("blocks.1.hook_resid_pre", top_k=2), sc.Features("blocks.0.hook_attn_out", features=[1, 5])],
    None,
    [sc.Features("blocks.1.hook_resid_mid", features=[2])],
    None,
]


def _generate(folder, tensor_parallel_size: int, monkeypatch: pytest.MonkeyPatch):
    if tensor_parallel_size > 1:
        # One OpenMP thread per rank, one core each, none reserved: the 2-core CI machine.
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    llm = LLM(
        str(folder), site_saes(), sites=ADDITIVE_SITES, max_rows=4, max_top_k=4, dtype="float32", max_model_len=128,
        max_num_batched_tokens=256, seed=0, tensor_parallel_size=tensor_parallel_size,
    )
    try:
        params = [sampling_params(s, record=r, max_tokens=8, temperature=0.0, logprobs=5) for s, r in zip(STEERINGS, RECORDS, strict=True)]
        prompts = [{"prompt_token_ids": p} for p in [*PROMPTS, PROMPTS[1]]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.steering_stats()
    finally:
        llm.llm_engine.engine_core.shutdown()
    return outputs, stats


def test_two_ranks_steer_like_one(tmp_path, monkeypatch):
    folder = save_llama(tmp_path / "llama")
    one, _ = _generate(folder, 1, monkeypatch)
    two, stats = _generate(folder, 2, monkeypatch)
    assert len(stats) == 2 and all(s["graphs_rewritten"] == 1 for s in stats)
    assert all(s["records_held"] == 0 for s in stats), "every rank forgets the records taken"
    assert [hasattr(o, "features") for o in two] == [r is not None for r in RECORDS]
    for a, b in zip(one, two, strict=True):
        for site, record in getattr(a, "features", {}).items():
            other = b.features[site]
            assert record.values.shape[1] == len(a.prompt_token_ids) + 8
            assert (record.indices is None) == (other.indices is None)
            assert record.indices is None or torch.equal(record.indices, other.indices)
            torch.testing.assert_close(record.values, other.values, rtol=1e-4, atol=1e-5)
    one, two = [o.outputs[0] for o in one], [o.outputs[0] for o in two]
    steered, plain = two[1].logprobs[0], two[-1].logprobs[0]
    assert max(abs(steered[t].logprob - plain[t].logprob) for t in steered.keys() & plain.keys()) > 0.05
    for a, b in zip(one, two, strict=True):
        assert list(a.token_ids) == list(b.token_ids)
        for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
            assert set(step_a) == set(step_b)
            for token in step_a:
                assert abs(step_a[token].logprob - step_b[token].logprob) <= 1e-4
