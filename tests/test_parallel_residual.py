"""Parallel blocks that add their branches one at a time, ``residual + attn + mlp`` (Cohere,
StableLM with ``use_parallel_residual``): the first sum is not a resid_mid, since no MLP reads
it, so it must not be exposed (steering it would edit a tensor the model never uses)."""

from __future__ import annotations

import pytest
import torch
import transformers

import sae_compile as sc
from tests.models import BOS_ID, EOS_ID, INIT_STD, PAD_ID
from tests.test_sites import HIDDEN, assert_branch_outputs

LAYERS = 2
COMMON = dict(
    vocab_size=128, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT_STD,
    tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)
CONFIGS = {
    "cohere": lambda: transformers.CohereConfig(**COMMON),
    "stablelm_parallel": lambda: transformers.StableLmConfig(**COMMON, use_parallel_residual=True),
}
ATTN, MLP = "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request: pytest.FixtureRequest) -> transformers.PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), attn_implementation="sdpa")
    return built.eval()


def test_no_resid_mid_is_exposed(model: transformers.PreTrainedModel) -> None:
    steered = sc.steer(model, sites=[ATTN, MLP], backend="aot_eager")
    assert not any("resid_mid" in site for site in steered.sites)
    assert {ATTN, MLP, "blocks.0.hook_resid_post"} <= set(steered.sites)
    with pytest.raises(ValueError, match="no resid_mid"):
        sc.steer(model, sites=["blocks.0.hook_resid_mid"], backend="aot_eager")


def test_branch_outputs_are_what_each_branch_adds(model: transformers.PreTrainedModel) -> None:
    assert_branch_outputs(model, model.model.layers[0], ATTN, MLP, 128)
