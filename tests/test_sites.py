"""Site discovery on a mixture-of-experts model. OLMoE's attention class is
``OlmoeAttention``, whose name holds the MLP word "moe": attention must never be taken
for the MLP branch, or the layer loses its attn_out / resid_mid / mlp_out sites."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers
from torch import nn

import sae_compile as sc
from sae_compile.lowering.sites import decoder_layout
from tests.factories import assert_rel_close, rel_err
from tests.models import BOS_ID, EOS_ID, INIT_STD, PAD_ID

HIDDEN = 32
LAYERS = 2
ATTN_OUT = "blocks.0.hook_attn_out"
MLP_OUT = "blocks.0.hook_mlp_out"
HOOKS = (
    "hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post",
)


@pytest.fixture(scope="module")
def olmoe() -> transformers.PreTrainedModel:
    config = transformers.OlmoeConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, initializer_range=INIT_STD, tie_word_embeddings=False,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


@contextmanager
def adding(module: nn.Module, vector: torch.Tensor) -> Iterator[None]:
    """Eagerly add ``vector`` to ``module``'s output (``[0]`` of a tuple): the reference for
    AddVector at the site that module's output is."""

    def hook(_module: nn.Module, _args: object, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_olmoe_branches_are_its_attention_and_its_moe_block(olmoe: transformers.PreTrainedModel) -> None:
    layout = decoder_layout(olmoe)
    assert layout.attn_paths == tuple(f"model.layers.{i}.self_attn" for i in range(LAYERS))
    assert layout.mlp_paths == tuple(f"model.layers.{i}.mlp" for i in range(LAYERS))


def test_olmoe_exposes_every_hook_of_every_layer(olmoe: transformers.PreTrainedModel) -> None:
    steered = sc.steer(olmoe, sites=[ATTN_OUT, MLP_OUT], backend="aot_eager")
    assert steered.sites == tuple(f"blocks.{layer}.{hook}" for layer in range(LAYERS) for hook in HOOKS)


def assert_branch_outputs(
    model: nn.Module, layer: nn.Module, attn_site: str, mlp_site: str, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AddVector at ``attn_site`` / ``mlp_site`` equals adding the vector to the output of
    ``layer.self_attn`` / ``layer.mlp``, and visibly moves the logits; returns both logits."""
    steered = sc.steer(model, sites=[attn_site, mlp_site], backend="aot_eager")
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    vector = torch.linspace(-1.0, 1.0, HIDDEN)
    with torch.no_grad():
        plain = model(ids).logits
        at_attn = steered(ids, steering=sc.Steering(sc.AddVector(attn_site, vector))).logits
        at_mlp = steered(ids, steering=sc.Steering(sc.AddVector(mlp_site, vector))).logits
        with adding(layer.self_attn, vector):
            expected_attn = model(ids).logits
        with adding(layer.mlp, vector):
            expected_mlp = model(ids).logits
    assert rel_err(at_attn, plain) > 1e-3
    assert rel_err(at_mlp, plain) > 1e-3
    assert_rel_close(at_attn, expected_attn, 1e-5)
    assert_rel_close(at_mlp, expected_mlp, 1e-5)
    return at_attn, at_mlp


def test_olmoe_attn_out_and_mlp_out_are_the_branch_outputs(olmoe: transformers.PreTrainedModel) -> None:
    at_attn, at_mlp = assert_branch_outputs(olmoe, olmoe.model.layers[0], ATTN_OUT, MLP_OUT, 128)
    # attn_out feeds the MoE block and mlp_out does not, so the two must differ visibly.
    assert rel_err(at_attn, at_mlp) > 1e-3
