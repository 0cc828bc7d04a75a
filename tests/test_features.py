"""Reading SAE features (``record=``) against the independent fp64 reference: every activation,
with and without ``apply_b_dec_to_input``, per row with padding, with steering at earlier
sites and at the recorded site itself, through ``generate``, and with no recompiles."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import sae_compile as sc
from tests.factories import assert_rel_close, random_sae
from tests.models import PAD_ID, hidden_size, make_model
from tests.reference import reference_features, reference_top_k

D_SAE = 40
MAX_TOP_K = 12
# One SAE per (activation, apply_b_dec_to_input). blocks.0.hook_resid_post and
# blocks.1.hook_resid_pre are the same tensor: recording the second sees the first's edits.
FLAVOURS = {
    "blocks.0.hook_resid_mid": dict(activation="topk", k=8, layer_norm_input=True),  # OpenAI's TopK autoencoders
    "blocks.0.hook_mlp_out": dict(activation="relu"),
    "blocks.0.hook_resid_post": dict(activation="relu", apply_b_dec_to_input=True),
    "blocks.1.hook_resid_pre": dict(activation="jumprelu"),
    "blocks.1.hook_resid_mid": dict(activation="jumprelu", apply_b_dec_to_input=True),
    "blocks.1.hook_mlp_out": dict(activation="topk", k=6),
    "blocks.1.hook_resid_post": dict(activation="topk", k=6, apply_b_dec_to_input=True),
}
SITES = tuple(FLAVOURS)
ADDITIVE = "blocks.0.hook_attn_out"


def sae_of(d: int, seed: int, layer_norm_input: bool = False, **flavour: object) -> sc.SAE:
    sae = random_sae(d, D_SAE, seed=seed, **flavour)
    if not layer_norm_input:
        return sae
    return sc.SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation=sae.activation, k=sae.k,
                  apply_b_dec_to_input=True, layer_norm_input=True)


class Recorded:
    def __init__(self, dynamic: bool | None = None) -> None:
        self.model = make_model("llama")
        d = hidden_size(self.model)
        self.saes = {site: sae_of(d, i, **flavour) for i, (site, flavour) in enumerate(FLAVOURS.items())}
        self.steered = sc.steer(
            self.model, self.saes, sites=[ADDITIVE], backend="aot_eager", max_top_k=MAX_TOP_K, dynamic=dynamic
        )

    def call(self, ids: torch.Tensor, **kwargs: object):
        with torch.no_grad():
            return self.steered(ids, **kwargs)


@pytest.fixture(scope="module")
def rec() -> Recorded:
    return Recorded()


@pytest.fixture(scope="module")
def dynamic_rec() -> Recorded:
    """Compiled for dynamic shapes, so the property's batch and sequence sizes share one graph."""
    return Recorded(dynamic=True)


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def steering_everywhere(seed: int) -> sc.Steering:
    """Clamps at every SAE site (so each recorded site also has edits of its own) and a vector."""
    g = torch.Generator().manual_seed(seed)
    edits = [sc.Clamp(site, int(torch.randint(D_SAE, (1,), generator=g)), 3.0) for site in SITES]
    return sc.Steering(*edits, sc.AddVector(ADDITIVE, torch.randn(32, generator=g)))


def expected(rec: Recorded, x: torch.Tensor, site: str, **kwargs: object) -> torch.Tensor:
    return reference_features(rec.model, x, site, rec.saes[site], saes=rec.saes, **kwargs)


def assert_top_k(record: sc.FeatureRecord, f64: torch.Tensor, k: int) -> None:
    values, indices = reference_top_k(f64, k)
    assert torch.equal(record.indices, indices), (record.indices, indices)
    assert_rel_close(record.values, values.float(), 1e-5)


@pytest.mark.parametrize("site", SITES)
def test_top_k_matches_the_reference_under_steering(rec: Recorded, site: str) -> None:
    x, steering = ids(2, 7), steering_everywhere(1)
    out = rec.call(x, steering=steering, record=[sc.Features(site, top_k=8)])
    assert set(out.features) == {site}
    record = out.features[site]
    assert record.values.shape == record.indices.shape == (2, 7, 8)
    assert record.indices.dtype == torch.int64 and record.values.dtype == torch.float32
    assert_top_k(record, expected(rec, x, site, steering=steering), 8)


def test_top_k_past_the_firing_features_pads_with_the_lowest_zero_indices(rec: Recorded) -> None:
    """A TopK SAE with k=6 fires at most 6 features: the other places hold zeros, lowest index first."""
    site = "blocks.1.hook_mlp_out"
    record = rec.call(ids(1, 5), record=[sc.Features(site, top_k=MAX_TOP_K)]).features[site]
    zeros = record.values == 0
    assert bool(zeros[..., 6:].all())
    assert bool((record.indices >= 0).all())
    assert_top_k(record, expected(rec, ids(1, 5), site), MAX_TOP_K)


def test_dense_features_match_the_reference(rec: Recorded) -> None:
    x, steering, chosen = ids(2, 6, seed=2), steering_everywhere(2), [7, 0, 33, 12]
    record = [sc.Features(site, features=chosen) for site in SITES]
    out = rec.call(x, steering=steering, record=record)
    for site in SITES:
        got = out.features[site]
        assert got.indices is None and got.features == tuple(chosen)
        assert_rel_close(got.values, expected(rec, x, site, steering=steering)[..., chosen].float(), 1e-5)


def test_per_row_requests_with_padding(rec: Recorded) -> None:
    """Left padding records as padding; a row recording nothing is all padding; rows may ask
    for different k (the record is as wide as the largest); rows steer differently."""
    x = ids(3, 6, seed=3)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    x[0, :2] = PAD_ID
    site = "blocks.1.hook_resid_mid"
    steering = [steering_everywhere(4), None, steering_everywhere(5)]
    record = [[sc.Features(site, top_k=3)], None, [sc.Features(site, top_k=5)]]
    got = rec.call(x, attention_mask=mask, steering=steering, record=record).features[site]
    f64 = expected(rec, x, site, steering=steering, attention_mask=mask)
    assert got.indices.shape == (3, 6, 5)
    assert bool((got.indices[1] == -1).all()) and bool((got.values[1] == 0).all())
    assert bool((got.indices[0, :2] == -1).all()) and bool((got.values[0, :2] == 0).all())
    assert bool((got.indices[0, :, 3:] == -1).all())
    row0 = sc.FeatureRecord(got.values[0:1, 2:, :3], got.indices[0:1, 2:, :3])
    assert_top_k(row0, f64[0:1, 2:], 3)
    assert_top_k(sc.FeatureRecord(got.values[2:], got.indices[2:]), f64[2:], 5)


def test_records_are_the_callers_tensors(rec: Recorded) -> None:
    site = SITES[0]
    first = rec.call(ids(1, 4), record=[sc.Features(site, top_k=4)]).features[site]
    kept = first.values.clone()
    rec.call(ids(1, 4, seed=9), record=[sc.Features(site, top_k=4)])
    assert torch.equal(first.values, kept)
    assert first.values.data_ptr() not in {t.data_ptr() for t in rec.steered.steering_state().values()}


def test_generate_records_prompt_and_generated_positions(rec: Recorded) -> None:
    x, steering = ids(2, 5, seed=6), sc.Steering(*steering_everywhere(6).edits, tokens="generated")
    site = "blocks.1.hook_resid_post"
    with torch.no_grad():
        out = rec.steered.generate(
            x, steering=steering, record=[sc.Features(site, top_k=4)], max_new_tokens=4, do_sample=False,
            return_dict_in_generate=True,
        )
    record = out.features[site]
    assert record.indices.shape == (2, out.sequences.shape[1], 4)
    assert bool((record.indices[:, -1] == -1).all()), "the last generated token is never fed back"
    fed = out.sequences[:, :-1]
    assert_top_k(
        sc.FeatureRecord(record.values[:, :-1], record.indices[:, :-1]),
        expected(rec, fed, site, steering=steering, prompt_len=x.shape[1]), 4,
    )


def test_nothing_recorded_leaves_no_features(rec: Recorded) -> None:
    out = rec.call(ids(1, 3))
    assert not hasattr(out, "features")


def test_fifty_changes_of_what_is_recorded_add_no_graph(rec: Recorded) -> None:
    x = ids(3, 5, seed=7)
    rec.call(x)
    graphs = counters["stats"]["unique_graphs"]
    rng = random.Random(3)
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(50):
            site = rng.choice(SITES)
            request = sc.Features(site, top_k=rng.randint(1, MAX_TOP_K)) if i % 3 else sc.Features(site, features=[i % D_SAE])
            rows = [[request] if rng.random() < 0.6 else None for _ in range(3)]
            steering = [steering_everywhere(i * 3 + b) if rng.random() < 0.5 else None for b in range(3)]
            got = rec.call(x, steering=steering, record=rows)
            if i % 10 == 0 and any(rows):
                assert site in got.features
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (sc.Features("blocks.2.hook_resid_post", top_k=2), "not attached"),
        (sc.Features(ADDITIVE, top_k=2), "has no SAE attached"),
        (sc.Features(SITES[0], top_k=MAX_TOP_K + 1), r"top_k=13 is outside \[1, 12\]"),
        (sc.Features(SITES[0], features=[D_SAE]), "feature 40 is out of range"),
        (sc.Features(SITES[0], features=list(range(MAX_TOP_K + 1))), "exceed max_top_k"),
    ],
)
def test_bad_requests_fail_and_change_nothing(rec: Recorded, request_: sc.Features, message: str) -> None:
    x = ids(1, 4, seed=8)
    good = [sc.Features(SITES[1], top_k=3)]
    before = rec.call(x, record=good).features[SITES[1]]
    with pytest.raises(ValueError, match=message):
        rec.call(x, record=[request_], steering=steering_everywhere(1))
    after = rec.call(x, record=good)
    assert set(after.features) == {SITES[1]} and torch.equal(after.features[SITES[1]].indices, before.indices)


def test_a_top_k_above_the_sae_width_is_refused() -> None:
    model = make_model("llama", num_layers=1)
    steered = sc.steer(model, {"blocks.0.hook_resid_post": random_sae(32, 8, "relu")}, backend="aot_eager", max_top_k=16)
    with torch.no_grad(), pytest.raises(ValueError, match=r"top_k=9 is outside \[1, 8\]"):
        steered(ids(1, 3), record=[sc.Features("blocks.0.hook_resid_post", top_k=9)])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(), ValueError),
        (dict(top_k=2, features=[1]), ValueError),
        (dict(top_k=0), ValueError),
        (dict(top_k=2.0), TypeError),
        (dict(features=[1, 1]), ValueError),
        (dict(features=[-1]), ValueError),
        (dict(features=[]), ValueError),
    ],
)
def test_features_arguments_are_checked(kwargs: dict, error: type) -> None:
    with pytest.raises(error, match="Features"):
        sc.Features("blocks.0.hook_resid_post", **kwargs)


def test_mixed_requests_at_one_site_are_refused(rec: Recorded) -> None:
    site = SITES[0]
    with pytest.raises(ValueError, match="mix top_k= and features="):
        rec.call(ids(2, 3), record=[[sc.Features(site, top_k=2)], [sc.Features(site, features=[1])]])
    with pytest.raises(ValueError, match="different feature lists"):
        rec.call(ids(2, 3), record=[[sc.Features(site, features=[2])], [sc.Features(site, features=[1])]])
    with pytest.raises(ValueError, match="twice"):
        rec.call(ids(1, 3), record=[sc.Features(site, top_k=2), sc.Features(site, top_k=3)])
    with pytest.raises(ValueError, match="one entry per batch row"):
        rec.call(ids(2, 3), record=[[sc.Features(site, top_k=2)]])


def test_beam_search_cannot_record(rec: Recorded) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="beam search"):
        rec.steered.generate(ids(1, 3), record=[sc.Features(SITES[0], top_k=2)], num_beams=2, max_new_tokens=2)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    k=st.integers(1, MAX_TOP_K),
    site=st.sampled_from(SITES),
    recording=st.lists(st.booleans(), min_size=3, max_size=3),
    steer_rows=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 1000),
)
def test_property_top_k_equals_the_reference(dynamic_rec, batch, seq, k, site, recording, steer_rows, seed) -> None:
    rec = dynamic_rec
    x = ids(batch, seq, seed=seed)
    steering = [steering_everywhere(seed + b) if steer_rows[b] else None for b in range(batch)]
    rows = [[sc.Features(site, top_k=k)] if recording[b] else None for b in range(batch)]
    out = rec.call(x, steering=steering, record=rows)
    if not any(rows):
        assert not hasattr(out, "features")
        return
    got = out.features[site]
    f64 = expected(rec, x, site, steering=steering)
    for b in range(batch):
        if rows[b] is None:
            assert bool((got.indices[b] == -1).all())
        else:
            assert_top_k(sc.FeatureRecord(got.values[b : b + 1], got.indices[b : b + 1]), f64[b : b + 1], k)


def cpu_pre_activations(rows: int, features: int, data: str, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre [rows, F], threshold [F])`` for the CPU record's shortcuts, shaped to make them fail:
    values with ties, few features firing, or (JumpReLU) blocks whose largest pre-activations a
    threshold hides."""
    g = torch.Generator().manual_seed(features)
    pre = torch.randn(rows, features, generator=g)
    threshold = 0.1 * torch.rand(features, generator=g) if activation == "jumprelu" else torch.zeros(features)
    if data == "ties":
        pre = (pre * 4).round() / 4
    elif data == "few firing":  # the rest distinct and negative: the k + 1 largest are no answer
        silent = torch.randperm(features, generator=g)[: features - 5]
        pre[:, silent] = -pre[:, silent].abs() - 0.01
    elif data == "hidden maxima":
        hidden = torch.randperm(features, generator=g)[: features // 4]
        pre[:, hidden] += 3.0
        threshold[hidden] = 10.0 if activation == "jumprelu" else 0.0
    return pre, threshold


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize(("rows", "features"), [(37, 8192), (37, 4096), (37, 1000), (3, 8192)])
@pytest.mark.parametrize("data", ["distinct", "ties", "few firing", "hidden maxima"])
def test_the_cpu_record_shortcuts_keep_the_tie_rule(monkeypatch, activation: str, rows: int, features: int, data: str) -> None:
    """The record's top-k on the CPU (the blocks of largest bound, or for few tokens the k + 1
    largest pre-activations, then the exact path for the tokens they cannot prove) and its
    dense columns against the rule on ``act(pre)`` itself: largest first, the lower index
    first among equal values. On distinct values the shortcuts prove every token, so the
    exact path never runs."""
    from types import SimpleNamespace

    from sae_compile.activations import activate_
    from sae_compile.lowering.kernels import record

    pre, threshold = cpu_pre_activations(rows, features, data, activation)
    # A TopK SAE of k = 8: its record's k of 16 is past the shortcut (relu(pre) is not act(pre) there).
    site = SimpleNamespace(activation=activation, k=8 if activation == "topk" else None, threshold=threshold)
    f = activate_(pre.clone(), activation, threshold, site.k)
    exact_rows = []
    exact = record.top_k_sorted
    monkeypatch.setattr(record, "top_k_sorted", lambda f, k, **kw: exact_rows.append(f.shape[0]) or exact(f, k, **kw))
    for k in (1, 5, 16):
        exact_rows.clear()
        columns = torch.randperm(features, generator=torch.Generator().manual_seed(k))[:k]
        values, indices = record._record_tokens(pre.clone(), site, record._Layout(k, False, features, columns))
        expected = reference_top_k(f.double(), k)
        assert torch.equal(indices, expected[1]) and torch.equal(values.double(), expected[0])
        dense, at = record._record_tokens(pre.clone(), site, record._Layout(k, True, features, columns))
        assert torch.equal(at, columns.expand(rows, -1)) and torch.equal(dense, f[:, columns])
        shortcut = site.k is None or k <= site.k
        assert not (data == "distinct" and shortcut) or not exact_rows
