"""Property tests: compiled steering equals the independent fp64 reference for random SAEs,
edits, modes, rows, scopes, padding and batch/sequence shapes."""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sae_compile as sc
import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile.runtime.slots import SlotManager
from sae_compile.runtime.state import Capacity, RoutingState, SiteState, register_site
from tests.factories import assert_rel_close, random_sae, rel_err
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
        threshold_low=draw(st.sampled_from([0.0, -0.1])),  # -0.1: some thresholds below 0 (SAELens' JumpReLU)
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
WIDTHS = {site: width for site, (_, width) in SITES.items()}


def steered_llama(dtype: torch.dtype, continuous: bool = False):
    """A tiny Llama in ``dtype`` with an SAE at each of SITES (in ``dtype`` too), compiled once.

    ``continuous``: every SAE is ReLU. JumpReLU and TopK jump where a pre-activation crosses a
    threshold or the k-th value, so a rounding-sized change of the input can move their output
    by O(1); only a continuous activation keeps a low-precision error rounding-sized.
    """
    model = make_model("llama", seed=9, dtype=dtype)
    d = hidden_size(model)
    saes = {site: random_sae(d, width, "relu" if continuous else activation, seed=i, apply_b_dec_to_input=i == 1,
                             dtype=dtype)
            for i, (site, (activation, width)) in enumerate(SITES.items())}
    return model, saes, sc.steer(model, saes, backend="aot_eager", dynamic=True, max_rows=4, max_clamps=12)


@pytest.fixture(scope="module")
def compiled():
    return steered_llama(torch.float32)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=str)
def low_precision(request):
    """``(model, model64, saes, steered)``: model64 is the model's own rounded weights in float64."""
    model, saes, steered = steered_llama(request.param, continuous=True)
    return model, copy.deepcopy(model).double(), saes, steered


class Call(NamedTuple):
    per_row: list[sc.Steering | None]
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int


@st.composite
def calls(draw, d: int, batch: int, seq: int) -> Call:
    """Random per-row steering over SITES, token ids, left padding and prompt length."""
    per_row = draw(st.lists(st.none() | steerings(WIDTHS, d), min_size=batch, max_size=batch))
    ids = torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    pads = draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch))
    mask = (torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]).long()
    return Call(per_row, ids, mask, draw(st.integers(0, seq)))


def logits(model, call: Call, saes=None, steering=None) -> torch.Tensor:
    """The model's logits on ``call``'s real (unpadded) tokens: ``steered`` or the fp64-SAE reference."""
    if isinstance(model, sc.SteeredModel):
        with torch.no_grad():
            out = model(call.ids, attention_mask=call.mask, steering=steering, prompt_len=call.prompt_len).logits
    else:
        out = reference_logits(model, call.ids, saes=saes, steering=steering, attention_mask=call.mask,
                               prompt_len=call.prompt_len)
    return out[call.mask.bool()]


@given(data=st.data(), batch=st.integers(1, 4), seq=st.integers(1, 8))
def test_compiled_model_matches_reference(compiled, data, batch: int, seq: int) -> None:
    model, saes, steered = compiled
    call = data.draw(calls(hidden_size(model), batch, seq))
    got = logits(steered, call, steering=call.per_row)
    assert_rel_close(got, logits(model, call, saes, call.per_row), 1e-5)


#: How many times the model's own rounding error the steered low-precision logits may be off
#: (the largest ratio seen in 300 random examples was 2.9 for bf16 and 2.1 for fp16; a wrong
#: edit is off by O(1), about 100 times the rounding).
ROUNDING_FACTOR = 4.0


@settings(max_examples=settings.default.max_examples // 2)  # half the profile's (25 by default): two dtypes
@given(data=st.data(), batch=st.integers(1, 4), seq=st.integers(1, 8))
def test_low_precision_model_is_within_its_own_rounding_of_reference(low_precision, data, batch: int, seq: int) -> None:
    # The model's own rounding: the plain model in its dtype against the same rounded weights
    # run in float64, on the same tokens. The steered model must be within ROUNDING_FACTOR of
    # that from the reference hooked on the model in its own dtype (fp64 SAE math, rounded
    # where it re-enters the model). Not from a float64 steered model: there the SAE sees an
    # input that differs by the model's rounding. The SAEs are ReLU (``continuous``): with
    # JumpReLU or TopK a feature at the threshold or at the k-th place can flip on that
    # difference, and a Reconstruct then moves the logits by up to 30-60x the rounding.
    # Those activations are checked in low precision op by op (tests/test_kernels.py).
    model, model64, saes, steered = low_precision
    call = data.draw(calls(hidden_size(model), batch, seq))
    rounding = rel_err(logits(model, call), logits(model64, call))
    err = rel_err(logits(steered, call, steering=call.per_row), logits(model, call, saes, call.per_row))
    assert err <= ROUNDING_FACTOR * rounding, f"steered error {err:.2e}, the plain model's own {rounding:.2e}"


def test_empty_steering_list_is_no_edits(compiled) -> None:
    model, saes, steered = compiled
    call = Call([], torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3)),
                torch.ones(2, 5, dtype=torch.long), 5)
    empty = logits(steered, call, steering=[])
    assert torch.equal(empty, logits(steered, call, steering=None))
    assert_rel_close(empty, logits(model, call, saes, []), 1e-5)
