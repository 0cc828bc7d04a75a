"""Steered vLLM in bf16 agrees with the fp32 HF reference as well as unsteered bf16 vLLM does.

"Within the model's own rounding" is measured, not assumed: for each request, the largest
gap between vLLM's bf16 top-5 logprobs and the fp32 HF reference's, over the steps before
the greedy tokens first part. The unsteered requests give the model's own bf16 rounding;
the steered ones must stay within a small multiple of it. In bf16 vLLM adds the residual
stream in fp32 between casts, so this also runs the op on fp32 tensors of a bf16 site.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import LLM, sampling_params  # noqa: E402
from tests.serving.engine_models import (  # noqa: E402
    ADDITIVE_SITES,
    PROMPTS,
    hf_generate,
    hf_reference,
    save_llama,
    site_saes,
)

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
#: How far a steered request may drift from fp32, in multiples of the unsteered drift.
ROUNDING_FACTOR = 3.0

STEERED = [
    sc.Steering(sc.Clamp("blocks.1.hook_resid_post", 3, 2.0), sc.Clamp("blocks.1.hook_resid_post", 7, 1.5, mode="add")),
    sc.Steering(sc.Reconstruct("blocks.0.hook_mlp_out")),
    sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 2, 2.5), tokens="prompt"),
    sc.Steering(sc.Clamp("blocks.1.hook_resid_mid", 4, 2.0, mode="scale"), tokens="generated"),
]


def _drift(completion, tokens, logprobs) -> float:
    """Largest |vLLM - reference| top-5 logprob gap before the token streams part."""
    gap = 0.0
    for step, top in enumerate(completion.logprobs):
        gap = max(gap, *(abs(p.logprob - float(logprobs[step, t])) for t, p in top.items()))
        if completion.token_ids[step] != tokens[step]:
            break
    return gap


def test_bf16_steering_is_within_the_models_rounding(tmp_path):
    folder = save_llama(tmp_path / "llama")
    llm = LLM(
        str(folder), site_saes(), sites=ADDITIVE_SITES, max_rows=8, dtype="bfloat16", max_model_len=128,
        max_num_batched_tokens=256, seed=0,
    )
    try:
        steerings = [None] * len(PROMPTS) + STEERED
        prompts = [{"prompt_token_ids": p} for p in PROMPTS + PROMPTS]
        params = [sampling_params(s, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5) for s in steerings]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    reference = hf_reference(folder, site_saes())
    drifts = [
        _drift(o.outputs[0], *hf_generate(reference, p["prompt_token_ids"], s, MAX_TOKENS))
        for o, p, s in zip(outputs, prompts, steerings, strict=True)
    ]
    plain, steered = drifts[: len(PROMPTS)], drifts[len(PROMPTS) :]
    assert max(plain) > 0, "bf16 matched fp32 exactly: the test would not see a steering error"
    assert max(steered) <= ROUNDING_FACTOR * max(plain), (plain, steered)
