"""The op contract: registered, opaque, opcheck-clean, fresh output, exact on unsteered rows,
and the DESIGN §4 math at one site against the fp64 reference."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile import SAE, AddVector, Clamp, Reconstruct, Steering
from sae_compile.lowering.kernels import torch_path
from sae_compile.runtime.slots import SlotManager
from sae_compile.runtime.state import Capacity, RoutingState, SiteState, register_site
from tests.factories import assert_rel_close, random_sae
from tests.reference import apply_steering_at_site, token_scope_mask

SITE = "blocks.0.hook_resid_post"
D = 16


CAPACITY = Capacity(max_rows=4, max_clamps=4)


def make_site(sae, handle: str, capacity: Capacity = CAPACITY) -> SiteState:
    state = SiteState(SITE, D, sae, capacity, RoutingState(capacity, torch.float32, torch.device("cpu")), torch.float32,
                      torch.device("cpu"))
    register_site(handle, state)
    return state


def route(state: SiteState, per_row: list, seq: int) -> None:
    """Give row b steering per_row[b] (scope "all") for a [len(per_row), seq] forward."""
    slots = SlotManager({SITE: state}, state.routing, lambda name: name)
    slots.replace((), {b: (s, 0) for b, s in enumerate(per_row)})
    slots.assign(list(range(len(per_row))), [seq] * len(per_row))
    state.routing.route(torch.arange(seq), None, len(per_row), seq)


class Site(NamedTuple):
    state: SiteState
    handle: str
    sae: SAE  # the site keeps no reference to it: the reference reads it from here


@pytest.fixture(scope="module", params=["relu", "jumprelu", "topk"])
def site(request: pytest.FixtureRequest) -> Site:
    handle = f"test_op:{request.param}"
    sae = random_sae(D, 24, request.param, seed=1, apply_b_dec_to_input=request.param == "topk")
    return Site(make_site(sae, handle), handle, sae)


def layouts(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``[batch, seq, D]`` inputs in the layouts a graph may hand the op."""
    return {
        "contiguous": torch.randn(batch, seq, D),
        "transposed": torch.randn(seq, batch, D).transpose(0, 1),
        "strided": torch.randn(batch, seq, 2 * D)[..., ::2],
        "sliced": torch.randn(batch, seq + 2, D)[:, 1:-1],
    }


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "sliced"])
def test_opcheck(site: Site, layout: str) -> None:
    state, handle, sae = site
    route(state, [Steering(Clamp(SITE, 2, 3.0), AddVector(SITE, torch.ones(D))), Steering(Reconstruct(SITE))], seq=3)
    torch.library.opcheck(torch.ops.sae_compile.steer.default, (layouts(2, 3)[layout], handle))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "sliced"])
def test_output_is_contiguous_like_the_fake(site: Site, layout: str) -> None:
    """The fake and every real path agree on the output layout: contiguous, whatever ``x``'s."""
    state, handle, sae = site
    x = layouts(3, 4)[layout]
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.sae_compile.steer(mode.from_tensor(x), handle)
    for per_row in ([None, None, None], [Steering(Clamp(SITE, 2, 3.0)), None, Steering(Reconstruct(SITE))]):
        route(state, per_row, seq=4)
        out = torch.ops.sae_compile.steer(x, handle)
        assert out.is_contiguous() and out.stride() == fake.stride()
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        expected = apply_steering_at_site(x[2], SITE, per_row[2], sae, token_scope_mask("all", 4, 4, None))
        assert_rel_close(out[2], expected, 1e-5)


def test_unsteered_rows_are_bit_identical_and_output_is_fresh(site: Site) -> None:
    state, handle, sae = site
    route(state, [None, Steering(Clamp(SITE, 1, 2.0), Reconstruct(SITE)), None], seq=5)
    x = torch.randn(3, 5, D)
    out = torch.ops.sae_compile.steer(x, handle)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.equal(out[1], x[1])
    route(state, [None, None, None], seq=5)
    same = torch.ops.sae_compile.steer(x, handle)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "edits",
    [
        [Clamp(SITE, 3, 4.0)],
        [Clamp(SITE, 3, 0.5, "add"), Clamp(SITE, 7, 0.0, "scale")],
        [Clamp(SITE, 3, 2.0, "scale"), Clamp(SITE, 3, 1.0, "add")],
        [AddVector(SITE, torch.linspace(-1, 1, D), 0.5), Clamp(SITE, 5, 2.0)],
        [Reconstruct(SITE)],
        [Reconstruct(SITE), Clamp(SITE, 0, 3.0), AddVector(SITE, torch.ones(D))],
    ],
)
def test_site_math_matches_reference(site: Site, edits: list) -> None:
    state, handle, sae = site
    steering = Steering(*edits)
    route(state, [steering, None], seq=6)
    x = torch.randn(2, 6, D)
    out = torch.ops.sae_compile.steer(x, handle)
    expected = apply_steering_at_site(x[0], SITE, steering, sae, token_scope_mask("all", 6, 6, None))
    assert_rel_close(out[0], expected, 1e-5)
    assert torch.equal(out[1], x[1])


def test_topk_ties_follow_the_reference() -> None:
    """Quarter-valued weights and inputs in {-1, 0, 1} make every pre-activation exact, so ties
    at the k-th value are common and the same in fp32 and in the fp64 reference: the op must
    keep the lower features, as the reference does."""
    g = torch.Generator().manual_seed(6)
    W_enc = torch.randint(-1, 2, (D, 48), generator=g) / 4  # [D, F]
    sae = SAE(W_enc, torch.randn(48, D, generator=g), activation="topk", k=5)
    handle = "test_op_topk_ties"
    state = make_site(sae, handle)
    steering = Steering(Reconstruct(SITE))
    route(state, [steering, steering], seq=8)
    x = torch.randint(-1, 2, (2, 8, D), generator=g).float()  # [B, S, D]
    pre = x @ W_enc
    kth = pre.relu().sort(dim=-1, descending=True).values[..., 4:6]  # [B, S, 2]: the k-th and next
    assert (kth[..., 0] == kth[..., 1]).any()  # some token ties across the cut
    out = torch.ops.sae_compile.steer(x, handle)
    for b in range(2):
        expected = apply_steering_at_site(x[b], SITE, steering, sae, token_scope_mask("all", 8, 8, None))
        assert_rel_close(out[b], expected, 1e-5)


def test_fake_impl_under_compile(site: Site) -> None:
    state, handle, sae = site
    route(state, [Steering(Clamp(SITE, 1, 1.0))], seq=4)
    x = torch.randn(1, 4, D)
    fn = torch.compile(lambda t: torch.ops.sae_compile.steer(t, handle) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), torch.ops.sae_compile.steer(x, handle) * 2)


@pytest.mark.parametrize("share", [0.0, 1.0], ids=["dense", "sparse"])
def test_decode_reads_only_the_used_rows_alike(share: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse SAE (few features over their threshold, as trained ones): decoding over the
    used features' rows only, or over all of them, gives the reference."""
    monkeypatch.setattr(torch_path, "SPARSE_DECODE_MAX_SHARE", share)
    sae = random_sae(D, 64, "jumprelu", seed=4)
    sae = SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation="jumprelu", threshold=torch.full((64,), 2.5))
    handle = f"test_op_sparse_decode_{share}"
    state = make_site(sae, handle)
    recon, clamped = Steering(Reconstruct(SITE)), Steering(Reconstruct(SITE), Clamp(SITE, 2, 3.0))
    route(state, [recon, None, clamped], seq=5)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(5))
    used = (sae.encode(x).abs().amax((0, 1)) > 0).sum()
    assert 0 < used < 64 // 4  # both settings are a real choice
    out = torch.ops.sae_compile.steer(x, handle)
    for b, steering in ((0, recon), (2, clamped)):
        expected = apply_steering_at_site(x[b], SITE, steering, sae, token_scope_mask("all", 5, 5, None))
        assert_rel_close(out[b], expected, 1e-5)
    assert torch.equal(out[1], x[1])


def test_full_path_works_in_chunks(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-path tokens are steered a chunk at a time; chunks that straddle rows, and an
    unsteered row between steered ones, change nothing."""
    monkeypatch.setattr(torch_path, "FULL_PATH_CHUNK", 4)
    state, handle, sae = site
    recon, clamped = Steering(Reconstruct(SITE)), Steering(Reconstruct(SITE), Clamp(SITE, 2, 3.0))
    route(state, [recon, None, clamped], seq=5)
    x = torch.randn(3, 5, D)
    out = torch.ops.sae_compile.steer(x, handle)
    for b, steering in ((0, recon), (2, clamped)):
        expected = apply_steering_at_site(x[b], SITE, steering, sae, token_scope_mask("all", 5, 5, None))
        assert_rel_close(out[b], expected, 1e-5)
    assert torch.equal(out[1], x[1])
