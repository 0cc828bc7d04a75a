"""DESIGN §7: bad input raises ValueError/TypeError naming the problem, and changes nothing."""

from __future__ import annotations

import pytest
import torch

import sae_compile as sc
from sae_compile.runtime.staging import per_row_steerings
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

POST = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = make_model("llama", seed=4)
    saes = {POST: random_sae(hidden_size(model), 32, "jumprelu", seed=1)}
    steered = sc.steer(model, saes, backend="aot_eager", max_rows=2, max_clamps=2, max_batch=4, max_tokens=40)
    return model, saes, steered


X = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
GOOD = sc.Steering(sc.Clamp(POST, 3, 2.0), sc.AddVector(POST, torch.ones(32)))


def snapshot(steered: sc.SteeredModel) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in steered.steering_state().items()}


CALL_ERRORS = [
    (dict(steering=sc.Steering(sc.Clamp("blocks.9.hook_resid_post", 0, 1.0))), ValueError, r"Unknown site .*Available sites: blocks\.0\.hook_resid_pre"),
    (dict(steering=sc.Steering(sc.Clamp("blocks.0.hook_mlp_out", 0, 1.0))), ValueError, "not attached"),
    (dict(steering=sc.Steering(sc.Clamp(POST, 32, 1.0))), ValueError, "feature 32 is out of range"),
    (dict(steering=sc.Steering(sc.AddVector(POST, torch.ones(31)))), ValueError, "length 31"),
    (dict(steering=[GOOD, None, None]), ValueError, "3 entries for a batch of 2"),
    (dict(steering=[GOOD, sc.Clamp(POST, 1, 1.0)]), TypeError, "not a mix"),
    (dict(steering="clamp"), TypeError, "steering must be"),
    (dict(steering=[GOOD, sc.Steering(sc.Clamp(POST, 1, 1.0))], input_ids=torch.zeros(3, 5, dtype=torch.long)), ValueError, "per-row list"),
    (dict(steering=sc.Steering(*(sc.Clamp(POST, f, 1.0) for f in range(3)))), ValueError, "max_clamps=2"),
    (dict(input_ids=torch.zeros(5, 2, dtype=torch.long)), ValueError, "max_batch=4"),
    (dict(input_ids=torch.zeros(4, 11, dtype=torch.long)), ValueError, "max_tokens=40"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), CALL_ERRORS)
def test_bad_call_is_rejected_and_changes_nothing(setup, kwargs: dict, error: type, match: str) -> None:
    model, saes, steered = setup
    with torch.no_grad():
        steered(X, steering=GOOD)
    before = snapshot(steered)
    args = {"input_ids": X, **kwargs}
    with pytest.raises(error, match=match), torch.no_grad():
        steered(args.pop("input_ids"), **args)
    after = snapshot(steered)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a rejected call wrote steering state"
    other = sc.Steering(sc.Clamp(POST, 7, -1.0, "add"), tokens="prompt")
    with torch.no_grad():
        got = steered(X, steering=[other, GOOD]).logits
    assert_rel_close(got, reference_logits(model, X, saes=saes, steering=[other, GOOD]), 1e-5)


def test_too_many_rows(setup) -> None:
    model, saes, steered = setup
    three = [sc.Steering(sc.Clamp(POST, f, 1.0)) for f in range(3)]
    before = snapshot(steered)
    with pytest.raises(ValueError, match=r"needs 3 new rows .* \(max_rows=2\)"), torch.no_grad():
        steered(torch.zeros(3, 4, dtype=torch.long), steering=three)
    assert all(torch.equal(t, before[k]) for k, t in steered.steering_state().items())


def test_grad_mode_is_rejected(setup) -> None:
    _, _, steered = setup
    with pytest.raises(ValueError, match="torch.no_grad"):
        steered(X, steering=GOOD)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: sc.Clamp(POST, 1, float("nan")), ValueError, "must be finite"),
        (lambda: sc.Clamp(POST, 1, float("inf"), "add"), ValueError, "must be finite"),
        (lambda: sc.Clamp(POST, -1, 1.0), ValueError, "feature must be >= 0"),
        (lambda: sc.Clamp(POST, 1.5, 1.0), TypeError, "feature must be an int"),
        (lambda: sc.Clamp(POST, 1, "2.0"), TypeError, "value must be a real number"),
        (lambda: sc.Clamp(POST, 1, 1.0, "clip"), ValueError, "mode must be one of"),
        (lambda: sc.Clamp(POST, 1, 1.0, 2), TypeError, "mode must be a string"),
        (lambda: sc.AddVector(POST, [1.0, 2.0]), TypeError, "vector must be a torch.Tensor"),
        (lambda: sc.AddVector(POST, torch.ones(4, dtype=torch.long)), TypeError, "floating point tensor, got dtype torch.int64"),
        (lambda: sc.AddVector(POST, torch.tensor([1.0, float("nan")])), ValueError, "no NaN or inf"),
        (lambda: sc.AddVector(POST, torch.ones(4), float("inf")), ValueError, "scale must be finite"),
        (lambda: sc.AddVector(POST, torch.ones(2, 2)), ValueError, "1-D"),
        (lambda: sc.Steering(sc.Clamp(POST, 1, 1.0), tokens="decode"), ValueError, "tokens must be one of"),
        (lambda: sc.Steering(sc.Clamp(POST, 1, 1.0), tokens=None), TypeError, "tokens must be a string"),
        (lambda: sc.Steering("clamp"), TypeError, "every edit must be"),
        (lambda: sc.Reconstruct(3), TypeError, "site must be a string"),
    ],
)
def test_bad_edit_values_are_rejected(make, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_an_empty_steering_list_steers_no_row(setup) -> None:
    assert per_row_steerings([], 3) == [None, None, None]
    assert per_row_steerings((), 2) == [None, None]
    _, _, steered = setup
    with torch.no_grad():
        assert torch.equal(steered(X, steering=[]).logits, steered(X, steering=None).logits)


@pytest.mark.parametrize(
    ("steering", "error", "match"),
    [
        (["clamp"], TypeError, "not a mix; got str"),
        ([GOOD, sc.Clamp(POST, 1, 1.0)], TypeError, "not a mix; got Clamp, Steering"),
        ({POST: GOOD}, TypeError, "steering must be None, a Steering, .* got dict"),
        ([GOOD, None], ValueError, "2 entries for a batch of 3"),
    ],
)
def test_bad_steering_argument(steering: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        per_row_steerings(steering, 3)


def test_bad_steer_arguments() -> None:
    model = make_model("gpt_neox", seed=1)
    d = hidden_size(model)
    sae = random_sae(d, 16, seed=0)
    with pytest.raises(ValueError, match="no resid_mid"):
        sc.steer(model, {"blocks.0.hook_resid_mid": sae}, backend="aot_eager")
    with pytest.raises(ValueError, match=r"Unknown site 'layers\.0'.*Available sites: blocks\.0\.hook_resid_pre, blocks\.0\.attn\.hook_z, blocks\.0\.hook_attn_out"):
        sc.steer(model, {"layers.0": sae}, backend="aot_eager")
    with pytest.raises(ValueError, match=f"d_in=8 but the tensor at that site is {d} wide"):
        sc.steer(model, {"blocks.0.hook_resid_post": random_sae(8, 16)}, backend="aot_eager")
    with pytest.raises(ValueError, match="hook_name"):
        sc.steer(model, [sae], backend="aot_eager")
    with pytest.raises(ValueError, match="given twice"):
        sc.steer(model, {"blocks.0.hook_resid_post": sae, "gpt_neox.layers.0": sae}, backend="aot_eager")
    with pytest.raises(TypeError, match="must be an SAE"):
        sc.steer(model, {"blocks.0.hook_resid_post": "sae.safetensors"}, backend="aot_eager")
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        sc.steer(model, {"blocks.0.hook_resid_post": sae}, max_rows=0)
    with pytest.raises(TypeError, match="max_clamps must be an int, got str"):
        sc.steer(model, {"blocks.0.hook_resid_post": sae}, max_clamps="16")
    with pytest.raises(ValueError, match="mode= and options= configure Inductor"):
        sc.steer(model, {"blocks.0.hook_resid_post": sae}, backend="aot_eager", mode="max-autotune")


def test_hf_module_path_aliases() -> None:
    model = make_model("gpt2", seed=1)
    d = hidden_size(model)
    steered = sc.steer(
        model, {"transformer.h.0": random_sae(d, 16), "transformer.h.1.attn": random_sae(d, 16, seed=1),
                "transformer.h.1.mlp": random_sae(d, 16, seed=2)}, backend="aot_eager",
    )
    assert steered.attached_sites == ("blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out")
