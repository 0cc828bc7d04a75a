"""Sites in vLLM's graph for each architecture vLLM's CPU build runs: every hook kind, steered in
vLLM, gives the tokens and top-5 logprobs of ``sc.steer`` on the HF model.

The engines fuse the residual add into the next layer's norm, and Gemma adds post-branch
norms and scales the embedding: the residual chain must still land on DESIGN §3's tensors.
One engine per architecture.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from sae_compile.vllm import LLM, sampling_params  # noqa: E402
from tests.serving.engine_models import (  # noqa: E402
    ADDITIVE_SITES,
    ARCHS,
    HIDDEN,
    PROMPTS,
    hf_generate,
    hf_reference,
    save_model,
    site_saes,
)

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
LOGPROB_TOL = 2e-3

STEERINGS = [
    None,
    sc.Steering(sc.AddVector("blocks.0.hook_resid_pre", torch.linspace(-1.0, 1.0, HIDDEN))),
    sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 2, 2.5)),
    sc.Steering(sc.Reconstruct("blocks.0.hook_mlp_out")),
    sc.Steering(sc.Clamp("blocks.1.hook_resid_pre", 1, 2.0, mode="add")),
    sc.Steering(sc.Clamp("blocks.1.hook_resid_mid", 4, 3.0, mode="scale"), tokens="generated"),
    sc.Steering(sc.Clamp("blocks.1.hook_resid_post", 3, 2.0), tokens="prompt"),
]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])  # Llama: test_offline
def test_every_hook_kind_matches_hf(tmp_path, arch):
    folder = save_model(tmp_path / arch, arch)
    llm = LLM(
        str(folder), site_saes(), sites=ADDITIVE_SITES, max_rows=len(STEERINGS), dtype="float32",
        max_model_len=128, max_num_batched_tokens=256, seed=0,
    )
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(STEERINGS))]
        params = [sampling_params(s, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5) for s in STEERINGS]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    reference = hf_reference(folder, site_saes())
    for prompt, steering, output in zip(prompts, STEERINGS, outputs, strict=True):
        tokens, logprobs = hf_generate(reference, prompt, steering, MAX_TOKENS)
        completion = output.outputs[0]
        assert list(completion.token_ids) == tokens, steering
        for step, top in enumerate(completion.logprobs):
            for token, logprob in top.items():
                assert abs(logprob.logprob - float(logprobs[step, token])) <= LOGPROB_TOL, (steering, step)
