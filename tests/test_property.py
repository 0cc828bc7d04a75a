"""Property tests: compiled steering equals the independent fp64 reference for random SAEs,
edits, modes, rows, scopes, padding and batch/sequence shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sae_compile as sc
import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile.runtime.slots import SlotManager
from sae_compile.runtime.state import Capacity, RoutingState, SiteState, register_site
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import apply_steering_at_site, reference_logits, token_scope_mask

SITE = "blocks.0.hook_resid_post"


@st.composite
def sae_specs(draw) -> dict:
    activation = draw(st.sampled_from(["relu", "jumprelu", "topk"]))
    d_sae = draw(st.integers(2, 40))
    return dict(
        d_sae=d_sae, activation=activation, seed=draw(st.integers(0, 2**16)),
        k=draw(st.integers(1, d_sae)) if activation == "topk" else None,
        apply_b_dec_to_input=draw(st.booleans()),
    )


@st.composite
def steerings(draw, sites: dict[str, int], d: int) -> sc.Steering:
    """A Steering over ``sites`` ({name: d_sae}) with 1-4 edits per touched site."""
    edits: list = []
    for site in draw(st.lists(st.sampled_from(sorted(sites)), min_size=1, max_size=len(sites), unique=True)):
        for _ in range(draw(st.integers(0, 3))):
            edits.append(sc.Clamp(site, draw(st.integers(0, sites[site] - 1)),
                                  draw(st.floats(-4, 4, allow_nan=False)), draw(st.sampled_from(["set", "add", "scale"]))))
        if draw(st.booleans()):
            vector = torch.randn(d, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
            edits.append(sc.AddVector(site, vector, draw(st.floats(-2, 2, allow_nan=False))))
        if draw(st.integers(0, 3)) == 0:
            edits.append(sc.Reconstruct(site))
    if not edits:
        edits.append(sc.Reconstruct(sorted(sites)[0]))
    return sc.Steering(*draw(st.permutations(edits)), tokens=draw(st.sampled_from(["all", "prompt", "generated"])))


@given(data=st.data(), spec=sae_specs(), d=st.integers(2, 24), batch=st.integers(1, 4), seq=st.integers(1, 6))
def test_op_matches_reference(data, spec: dict, d: int, batch: int, seq: int) -> None:
    d_sae = spec.pop("d_sae")
    sae = random_sae(d, d_sae, **spec)
    capacity = Capacity(max_rows=4, max_clamps=12)
    state = SiteState(SITE, d, sae, capacity, RoutingState(capacity, torch.float32, torch.device("cpu")), torch.float32,
                      torch.device("cpu"))
    register_site("property:op", state)
    per_row = data.draw(st.lists(st.none() | steerings({SITE: d_sae}, d), min_size=batch, max_size=batch))
    slots = SlotManager({SITE: state}, state.routing, lambda name: name)
    prompt_len = data.draw(st.integers(0, seq))
    slots.replace((), {b: (s, prompt_len) for b, s in enumerate(per_row)})
    slots.assign(list(range(batch)))
    state.routing.route(torch.arange(seq), None, batch, seq)
    masks = [token_scope_mask("all" if s is None else s.tokens, seq, prompt_len, None) & (s is not None)
             for s in per_row]
    x = torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(spec["seed"]))
    out = torch.ops.sae_compile.steer(x, "property:op")
    for b, steering in enumerate(per_row):
        expected = apply_steering_at_site(x[b], SITE, steering, sae, masks[b])
        assert_rel_close(out[b], expected, 1e-5)


SITES = {"blocks.0.hook_mlp_out": ("topk", 24), "blocks.1.hook_resid_mid": ("jumprelu", 40),
         "blocks.2.hook_resid_pre": ("relu", 16)}


@pytest.fixture(scope="module")
def compiled():
    model = make_model("llama", seed=9)
    d = hidden_size(model)
    saes = {site: random_sae(d, width, activation, seed=i, apply_b_dec_to_input=i == 1)
            for i, (site, (activation, width)) in enumerate(SITES.items())}
    return model, saes, sc.steer(model, saes, backend="aot_eager", dynamic=True, max_rows=4, max_clamps=12)


@given(data=st.data(), batch=st.integers(1, 4), seq=st.integers(1, 8))
def test_compiled_model_matches_reference(compiled, data, batch: int, seq: int) -> None:
    model, saes, steered = compiled
    d = hidden_size(model)
    widths = {site: width for site, (_, width) in SITES.items()}
    per_row = data.draw(st.lists(st.none() | steerings(widths, d), min_size=batch, max_size=batch))
    ids = torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    pads = data.draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch))
    mask = (torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]).long()
    prompt_len = data.draw(st.integers(0, seq))
    with torch.no_grad():
        got = steered(ids, attention_mask=mask, steering=per_row, prompt_len=prompt_len).logits
    expected = reference_logits(model, ids, saes=saes, steering=per_row, attention_mask=mask, prompt_len=prompt_len)
    valid = mask.bool()
    assert_rel_close(got[valid], expected[valid], 1e-5)
