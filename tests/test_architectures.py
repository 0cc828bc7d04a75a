"""Compiled steering equals the eager fp64 hook reference on every supported architecture,
at every hook type, in one full graph."""

from __future__ import annotations

import pytest
import torch

import sae_compile as sc
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import ARCHS, arch_of, has_resid_mid, hidden_size, make_model
from tests.reference import reference_logits

LAYER = 1
# A different SAE flavour at each hook, so every activation meets every hook type somewhere.
FLAVOURS = {
    "hook_resid_pre": dict(activation="relu"),
    "attn.hook_z": dict(activation="jumprelu", apply_b_dec_to_input=True),
    "hook_attn_out": dict(activation="topk", k=6),
    "hook_resid_mid": dict(activation="jumprelu", apply_b_dec_to_input=True),
    "hook_mlp_in": dict(activation="topk", k=5),
    "hook_mlp_out": dict(activation="relu", apply_b_dec_to_input=True),
    "hook_resid_post": dict(activation="jumprelu"),
}


def hooks_of(arch: str) -> list[str]:
    return [h for h in FLAVOURS if h != "hook_resid_mid" or has_resid_mid(arch)]


class Steered:
    def __init__(self, arch: str) -> None:
        self.model = make_model(arch)
        d = hidden_size(self.model)
        self.saes = {
            f"blocks.{LAYER}.{hook}": random_sae(d, 48, seed=i, **flavour)
            for i, (hook, flavour) in enumerate(FLAVOURS.items())
            if hook in hooks_of(arch)
        }
        self.graphs: list = []
        self.steered = sc.steer(self.model, self.saes, backend="aot_eager", on_graph=self.graphs.append)
        self.ids = torch.randint(3, self.model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))

    def compare(self, steering: sc.Steering) -> None:
        with torch.no_grad():
            got = self.steered(self.ids, steering=steering).logits
        expected = reference_logits(self.model, self.ids, saes=self.saes, steering=steering)
        plain = reference_logits(self.model, self.ids, saes=self.saes, steering=None)
        assert rel_err(expected, plain) > 1e-3, "the reference must visibly differ from the unsteered model"
        assert_rel_close(got, expected, 1e-5)


@pytest.fixture(scope="module", params=ARCHS)
def steered(request: pytest.FixtureRequest) -> Steered:
    return Steered(request.param)


def clamps_and_vector(site: str, d: int) -> sc.Steering:
    vector = torch.linspace(-1.0, 1.0, d)
    return sc.Steering(
        sc.Clamp(site, 3, 4.0, "set"), sc.Clamp(site, 11, 1.5, "add"), sc.Clamp(site, 20, 3.0, "scale"),
        sc.AddVector(site, vector, 0.7),
    )


@pytest.mark.parametrize("hook", list(FLAVOURS))
def test_clamps_and_vector_match_reference(steered: Steered, hook: str) -> None:
    arch = arch_of(steered.model)
    site = f"blocks.{LAYER}.{hook}"
    if site not in steered.saes:
        assert not has_resid_mid(steered.model)
        pytest.skip(f"{arch} has parallel attention+MLP: no resid_mid")
    steered.compare(clamps_and_vector(site, hidden_size(steered.model)))


def test_reconstruct_with_clamp_matches_reference(steered: Steered) -> None:
    site = f"blocks.{LAYER}.hook_resid_post"
    steered.compare(sc.Steering(sc.Reconstruct(site), sc.Clamp(site, 5, 2.0)))


def test_all_sites_at_once_match_reference(steered: Steered) -> None:
    d = hidden_size(steered.model)
    edits = [e for site in steered.saes for e in clamps_and_vector(site, d).edits]
    steered.compare(sc.Steering(*edits))


def test_one_full_graph_with_one_op_per_site(steered: Steered) -> None:
    with torch.no_grad():
        steered.steered(steered.ids)
    assert len(steered.graphs) == 1, "fullgraph: a single graph, no breaks, no recompiles"
    ops = [n for n in steered.graphs[0].graph.nodes if n.target is torch.ops.sae_compile.steer.default]
    assert sorted(n.args[1].split(":", 1)[1] for n in ops) == sorted(steered.saes)


def test_sites_lists_every_hook_of_every_layer(steered: Steered) -> None:
    layers = steered.model.config.num_hidden_layers
    expected = {f"blocks.{L}.{h}" for L in range(layers) for h in hooks_of(arch_of(steered.model))}
    if not has_resid_mid(steered.model):
        expected = {s for s in expected if "resid_mid" not in s}
    assert set(steered.steered.sites) == expected
    assert steered.steered.attached_sites == tuple(sorted(steered.saes, key=steered.steered.sites.index))
