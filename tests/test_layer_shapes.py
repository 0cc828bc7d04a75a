"""Site discovery on the layer shapes beyond a plain pre-LN block, each checked by the
architecture sweep's own checks (``tests/test_architecture_sweep.py``: the eager hook
reference, unsteered logits, no recompiles) on one architecture that has it, and the errors
that say why a site is absent."""

from __future__ import annotations

import pytest
import torch
import transformers

import sae_compile as sc
from sae_compile.lowering.op import STEER_OP
from sae_compile.lowering.sites import Site, SiteKind, decoder_layout, why_missing
from tests.factories import random_sae
from tests.reference import sae_encode64
from tests.sweep_models import try_build
from tests.test_architecture_sweep import ARCHS, sweep_one

#: name -> (the layer shape it has, the hooks steer() must find on layer 0)
REPRESENTATIVES = {
    "gemma4_text": ("scaled after the last add (*= layer_scalar), after a per-layer-embedding add", "pre z attn mid mlp_in mlp post"),
    # BLOOM's MLP module receives the residual too, so no one tensor is its input: no mlp_in.
    "bloom": ("the residual added inside the attention and MLP modules", "pre z attn mid mlp post"),
    "openai-gpt": ("post-LN: the layer returns a LayerNorm of each sum", "pre z attn mid mlp_in mlp post"),
    "minimax": ("the normalised input is the residual, scaled: alpha * x + beta * branch", "pre z attn mid mlp_in mlp post"),
    "mamba": ("one branch, a Mamba mixer, on a residual cast to fp32", "pre attn post"),
    "lfm2_moe": ("a hybrid stack: a convolution layer (layer 0) beside attention layers", "pre attn mid mlp_in mlp post"),
    "opt": ("the MLP added on the stream flattened to [B * S, D], then viewed back", "pre z attn mid mlp post"),
    "dory": ("a looped stack (each layer runs twice), interpolating x + rate * (update - x)", "pre z attn mid mlp_in mlp post"),
    "xlnet": ("a sequence-first [S, B, D] stream, post-LN inside the attention and FF modules", "pre attn mid mlp_in mlp post"),
}
SHORT = {
    "pre": SiteKind.RESID_PRE, "z": SiteKind.ATTN_Z, "attn": SiteKind.ATTN_OUT, "mid": SiteKind.RESID_MID,
    "mlp_in": SiteKind.MLP_IN, "mlp": SiteKind.MLP_OUT, "post": SiteKind.RESID_POST,
}


@pytest.mark.parametrize("name", sorted(REPRESENTATIVES))
def test_layer_shape_steers_like_the_reference(name: str) -> None:
    """Every site found steers like the hook reference, and layer 0 has the hooks its shape has."""
    result = sweep_one(next(arch for arch in ARCHS if arch.name == name))
    assert result.status == "pass", result.summary()
    layer0 = [site for site in result.sites if site.startswith("blocks.0.")]
    expected = [Site(0, SHORT[hook]).name for hook in REPRESENTATIVES[name][1].split()]
    assert layer0 == expected


def _available(*hooks: str) -> set[Site]:
    return {Site(0, SHORT[hook]) for hook in hooks} | {Site(1, kind) for kind in SiteKind}


@pytest.mark.parametrize(
    ("have", "asked", "reason"),
    [
        ("pre attn mlp post", "mid", "in parallel"),
        ("pre attn post", "mlp", "no MLP"),
        ("pre attn post", "mid", "no MLP"),
        ("pre mlp post", "attn", "no token mixer"),
        ("pre post", "attn", "only resid_pre and resid_post"),
        ("pre attn mid mlp post", "z", "no attention output projection"),
        ("pre attn mid mlp post", "mlp_in", "not one module"),
    ],
)
def test_why_missing_names_the_layer_shape(have: str, asked: str, reason: str) -> None:
    why = why_missing(Site(0, SHORT[asked]), _available(*have.split()))
    assert why.startswith("layer 0") and reason in why


def test_why_missing_on_a_layer_without_sites() -> None:
    assert "exposes no sites" in why_missing(Site(2, SiteKind.RESID_PRE), _available("pre", "post"))


def _built(name: str) -> transformers.PreTrainedModel:
    model, why = try_build(next(arch for arch in ARCHS if arch.name == name))
    assert model is not None, why
    return model


@pytest.fixture(scope="module")
def mamba() -> transformers.PreTrainedModel:
    return _built("mamba")


def test_a_mamba_block_has_no_mlp_and_says_so(mamba: transformers.PreTrainedModel) -> None:
    """Asking for an MLP site of a one-branch block is an error naming the block's shape, and
    its mixer output steers as attn_out."""
    for hook in ("hook_mlp_out", "hook_resid_mid"):
        with pytest.raises(ValueError, match="adds one branch"):
            sc.steer(mamba, sites=[f"blocks.0.{hook}"], backend="aot_eager")
    steered = sc.steer(mamba, sites=["blocks.0.hook_attn_out"], backend="aot_eager")
    ids = torch.tensor([[1, 5, 9]])
    vector = torch.linspace(-1.0, 1.0, steered.site_shapes()["blocks.0.hook_attn_out"][-1])
    with torch.no_grad():
        plain = mamba(ids).logits
        moved = steered(ids, steering=sc.Steering(sc.AddVector("blocks.0.hook_attn_out", vector, 2.0))).logits
    assert not torch.allclose(plain, moved)


def test_a_looped_layer_is_steered_at_every_call() -> None:
    """Dory runs each layer twice per forward: one site is one op per call, in one graph."""
    graphs = []
    steered = sc.steer(_built("dory"), sites=["blocks.1.hook_resid_post"], backend="aot_eager", on_graph=graphs.append)
    vector = torch.ones(steered.site_shapes()["blocks.1.hook_resid_post"][-1])
    with torch.no_grad():
        steered(torch.tensor([[1, 5, 9]]), steering=sc.Steering(sc.AddVector("blocks.1.hook_resid_post", vector)), use_cache=False)
    assert [sum(node.target is STEER_OP for node in gm.graph.nodes) for gm in graphs] == [2]


def test_a_record_at_a_looped_site_holds_the_last_call() -> None:
    """Recording where a layer runs twice reads the tensor of its last call, as documented."""
    model = _built("dory")
    site = "blocks.1.hook_resid_post"
    width = model.config.hidden_size
    sae = random_sae(width, 16, "relu", seed=3)
    steered = sc.steer(model, {site: sae}, backend="aot_eager")
    ids = torch.tensor([[1, 5, 9, 2]])
    outputs: list[torch.Tensor] = []
    handle = model.model.layers[1].register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    with torch.no_grad():
        record = steered(ids, record=[sc.Features(site, features=list(range(16)))], use_cache=False).features[site]
    assert len(outputs) == 2 and not torch.allclose(outputs[0], outputs[1])
    expected = sae_encode64(sae, outputs[-1]).to(record.values.dtype)
    torch.testing.assert_close(record.values, expected, rtol=1e-4, atol=1e-5)


def test_twin_layer_stacks_are_numbered_in_module_order() -> None:
    """HRM runs an L and an H stack of one layer class, and config.num_hidden_layers counts loop
    slots: blocks.L numbers the layers of both stacks, L's first, and HF paths name them too."""
    layout = decoder_layout(_built("hrm_text"))
    assert layout.layer_paths == tuple(f"model.{stack}_module.layers.{i}" for stack in "LH" for i in range(2))
    assert layout.resolve("model.H_module.layers.0") == Site(2, SiteKind.RESID_POST)
