"""The two sites inside the branches: ``attn.hook_z`` (the output projection's input, the
heads concatenated) and ``hook_mlp_in`` (the MLP's normalised input). The models here have
``head_dim`` 12 with 4 heads, so hook_z is 48 wide while the residual stream is 32: every
width check must use the site's own width."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from sae_compile import checkpoints
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import NUM_HEADS, hidden_size, make_model
from tests.reference import reference_logits

HEAD_DIM = 12
Z_WIDTH = NUM_HEADS * HEAD_DIM
Z = "blocks.1.attn.hook_z"
MLP_IN = "blocks.1.hook_mlp_in"
POST = "blocks.0.hook_resid_post"


class Steered:
    def __init__(self, arch: str) -> None:
        self.model = make_model(arch, head_dim=HEAD_DIM)
        d = hidden_size(self.model)
        self.saes = {
            Z: random_sae(Z_WIDTH, 40, "jumprelu", seed=1, apply_b_dec_to_input=True),
            MLP_IN: random_sae(d, 40, "topk", k=6, seed=2),
            POST: random_sae(d, 40, "relu", seed=3),
        }
        self.steered = sc.steer(self.model, self.saes, backend="aot_eager")
        self.ids = torch.randint(3, self.model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))

    def logits(self, steering: object) -> torch.Tensor:
        with torch.no_grad():
            return self.steered(self.ids, steering=steering).logits


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def steered(request: pytest.FixtureRequest) -> Steered:
    return Steered(request.param)


def edits_at(site: str, width: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        sc.Clamp(site, 2, 3.0), sc.Clamp(site, 7, 0.0, "scale"), sc.Clamp(site, 11, 1.0, "add"),
        sc.AddVector(site, torch.randn(width, generator=g), 0.5),
    ]


def test_sites_list_both_with_their_widths(steered: Steered) -> None:
    shapes = steered.steered.site_shapes()
    for layer in range(steered.model.config.num_hidden_layers):
        assert shapes[f"blocks.{layer}.attn.hook_z"] == (1, 2, Z_WIDTH)
        assert shapes[f"blocks.{layer}.hook_mlp_in"] == (1, 2, hidden_size(steered.model))
    names = list(steered.steered.sites)
    assert names.index("blocks.1.hook_resid_pre") < names.index(Z) < names.index("blocks.1.hook_attn_out")
    assert names.index("blocks.1.hook_resid_mid") < names.index(MLP_IN) < names.index("blocks.1.hook_mlp_out")


@pytest.mark.parametrize("site", [Z, MLP_IN])
def test_edits_match_the_reference(steered: Steered, site: str) -> None:
    width = steered.saes[site].d_in
    steering = sc.Steering(*edits_at(site, width, seed=4))
    expected = reference_logits(steered.model, steered.ids, saes=steered.saes, steering=steering)
    assert rel_err(expected, reference_logits(steered.model, steered.ids, saes=steered.saes)) > 1e-3
    assert_rel_close(steered.logits(steering), expected, 1e-5)


@pytest.mark.parametrize("site", [Z, MLP_IN])
def test_reconstruct_matches_the_reference(steered: Steered, site: str) -> None:
    steering = sc.Steering(sc.Reconstruct(site), sc.Clamp(site, 3, 2.0))
    expected = reference_logits(steered.model, steered.ids, saes=steered.saes, steering=steering)
    assert_rel_close(steered.logits(steering), expected, 1e-5)


def test_per_row_steering_across_sites_adds_no_graph(steered: Steered) -> None:
    d = hidden_size(steered.model)
    widths = {Z: Z_WIDTH, MLP_IN: d, POST: d}
    rng = random.Random(5)
    steered.logits(None)
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(50):
            rows = [
                sc.Steering(*edits_at(site, widths[site], seed=i * 3 + b)) if (site := rng.choice([*widths, None])) else None
                for b in range(3)
            ]
            got = steered.logits(rows)
            if i % 10 == 0:
                assert_rel_close(got, reference_logits(steered.model, steered.ids, saes=steered.saes, steering=rows), 1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_an_sae_of_the_hidden_width_does_not_fit_hook_z(steered: Steered) -> None:
    d = hidden_size(steered.model)
    with pytest.raises(ValueError, match=f"d_in={d} but the tensor at that site is {Z_WIDTH} wide"):
        sc.steer(steered.model, {Z: random_sae(d, 16, "relu")}, backend="aot_eager")


def test_wrong_widths_at_hook_z_fail_and_change_nothing(steered: Steered) -> None:
    d = hidden_size(steered.model)
    before = steered.logits(sc.Steering(sc.Clamp(Z, 2, 3.0)))
    with pytest.raises(ValueError, match=f"{Z} is {Z_WIDTH} wide"):
        steered.steered.load_sae(Z, random_sae(d, 40, "jumprelu"))
    with pytest.raises(ValueError, match=f"length {d} but the tensor there is {Z_WIDTH} wide"):
        steered.logits(sc.Steering(sc.AddVector(Z, torch.ones(d))))
    assert torch.equal(steered.logits(sc.Steering(sc.Clamp(Z, 2, 3.0))), before)


def test_saelens_hook_names_place_saes_there(tmp_path) -> None:
    """An SAE saved with SAELens's hook names (``attn.hook_z``, ``ln2.hook_normalized``) loads
    and lands on those sites."""
    model = make_model("llama", head_dim=HEAD_DIM)
    d = hidden_size(model)
    written = {"z": random_sae(Z_WIDTH, 16, "relu", hook_name=Z), "ln2": random_sae(d, 16, "relu", hook_name="blocks.1.ln2.hook_normalized")}
    for name, sae in written.items():
        checkpoints.save_sae(sae, tmp_path / name)
    loaded = [sc.SAE.load(tmp_path / name) for name in written]
    assert [sae.hook_name for sae in loaded] == [Z, "blocks.1.ln2.hook_normalized"]
    steered = sc.steer(model, loaded, backend="aot_eager")
    assert steered.attached_sites == (Z, MLP_IN)


def test_unknown_branch_sites_name_what_exists() -> None:
    model = make_model("llama", num_layers=2)
    with pytest.raises(ValueError, match=r"Unknown site 'blocks.1.hook_z'.*blocks.1.attn.hook_z"):
        sc.steer(model, sites=["blocks.1.hook_z"], backend="aot_eager")
