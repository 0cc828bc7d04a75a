"""The Triton kernels compute what the torch path computes (DESIGN §4), within the §5 contract.

``sparse_delta`` must equal the additive step plus ``torch_path.sparse_delta``, and
``full_path`` must equal ``torch_path.full_path``, for every activation, with and without
Reconstruct rows, under random clamps and random token masks; unsteered tokens come back
bit for bit. On a CPU machine the kernels run in Triton's interpreter at tiny shapes; the
``cuda`` tests run them compiled at model-like shapes and inside a captured CUDA graph.

Most SAEs here are *exact*: inputs, additive vectors and encoder weights are small multiples
of 1/4, so every pre-activation is exact in bf16 and in any summation order. Both paths then
fire the same JumpReLU features and pick the same TopK features, whatever the dtype and the
accumulation order, and only the decode rounds differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

if not torch.cuda.is_available():
    # Triton picks the interpreter when it is first imported, so this must come before that.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; set it in the environment "
                    "(or in conftest.py) to run the Triton kernels on the CPU", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from sae_compile import SAE, AddVector, Clamp, Reconstruct, Steering  # noqa: E402
from sae_compile.lowering.kernels import torch_path, triton_sae  # noqa: E402
from sae_compile.lowering.kernels.steer import steer_site  # noqa: E402
from sae_compile.lowering.kernels.torch_path import full_path, sparse_delta  # noqa: E402
from sae_compile.runtime.slots import SlotManager  # noqa: E402
from sae_compile.runtime.state import Capacity, RoutingState, SiteState  # noqa: E402
from tests.factories import assert_rel_close, random_sae  # noqa: E402
from tests.reference import apply_steering_at_site, token_scope_mask  # noqa: E402

SITE = "blocks.0.hook_resid_post"
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def exact_sae(d_in: int, d_sae: int, activation: str, *, seed: int) -> SAE:
    """An SAE whose pre-activations are exact in bf16 for inputs in {-2, ..., 2}.

    Encoder weights are in {-1/4, 0, 1/4} (about 64 non-zero per feature, so pre-activations
    stay below 64 in magnitude) and biases are quarters; JumpReLU thresholds sit half-way between
    quarters, so no pre-activation ever equals one. Decoder weights are ordinary Gaussians.
    """
    g = torch.Generator().manual_seed(seed)
    density = min(1.0, 64 / d_in)
    nonzero = torch.rand(d_in, d_sae, generator=g) < density  # [D, F]
    W_enc = torch.randint(-1, 2, (d_in, d_sae), generator=g) * nonzero / 4  # [D, F]
    b_enc = torch.randint(-2, 3, (d_sae,), generator=g) / 4  # [F]
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in**0.5  # [F, D]
    b_dec = 0.1 * torch.randn(d_in, generator=g)  # [D]
    threshold = (torch.randint(0, 4, (d_sae,), generator=g) + 0.5) / 4 if activation == "jumprelu" else None
    k = max(1, min(64, d_sae // 8)) if activation == "topk" else None
    return SAE(W_enc, W_dec, b_enc, b_dec, activation=activation, threshold=threshold, k=k)


def random_steering(
    g: torch.Generator, d_in: int, d_sae: int, clamps: int, *, reconstruct: bool, scope: str | None = None
) -> Steering:
    """Up to ``clamps`` clamps on distinct random features in random modes, maybe an additive
    vector (in {-1, 0, 1}: exact after the add), maybe Reconstruct, over ``scope`` (default random)."""
    n = int(torch.randint(1, clamps + 1, (), generator=g))
    features = torch.randperm(d_sae, generator=g)[:n].tolist()
    modes = ("set", "add", "scale")
    edits = [Clamp(SITE, f, float(3 * torch.randn((), generator=g)), modes[int(torch.randint(3, (), generator=g))])
             for f in features]
    if torch.rand((), generator=g) < 0.5:
        edits.append(AddVector(SITE, torch.randint(-1, 2, (d_in,), generator=g).float()))
    if reconstruct:
        edits.append(Reconstruct(SITE))
    if scope is None:
        scope = ("all", "prompt", "generated")[int(torch.randint(3, (), generator=g))]
    return Steering(*edits, tokens=scope)


def build(
    sae: SAE, dtype: torch.dtype, *, batch: int, seq: int, clamps: int, reconstruct: bool, seed: int,
    device: str = "cpu",
) -> tuple[SiteState, SlotManager, torch.Generator]:
    """A site where batch row 0 has clamps (and Reconstruct if ``reconstruct``) on all its tokens,
    row 1 is unsteered, and later rows have clamps over random scopes. Token masks are random
    beyond that: per-row prompt lengths, and random padding."""
    g = torch.Generator().manual_seed(seed)
    rows = random_rows(g, sae, batch=batch, seq=seq, clamps=clamps, reconstruct=reconstruct)
    state, slots = site_for(sae, dtype, rows, clamps=clamps, device=device)
    return state, slots, g


def random_rows(g: torch.Generator, sae: SAE, *, batch: int, seq: int, clamps: int, reconstruct: bool) -> Rows:
    """Row 0 has clamps (and Reconstruct if ``reconstruct``) on all tokens, row 1 is unsteered, later
    rows have clamps over random scopes; random prompt lengths and random padding."""
    per_row = [random_steering(g, sae.d_in, sae.d_sae, clamps, reconstruct=reconstruct, scope="all")]
    per_row += [None if b == 1 else random_steering(g, sae.d_in, sae.d_sae, clamps, reconstruct=False)
                for b in range(1, batch)]
    prompt_lens = torch.randint(0, seq + 1, (batch,), generator=g).tolist()
    attention_mask = (torch.rand(batch, seq, generator=g) > 0.2).long()  # [B, S]
    return Rows(per_row, prompt_lens, attention_mask)


class Rows(NamedTuple):
    """What each batch row runs: its steering, prompt length and attention mask."""

    steering: list[Steering | None]
    prompt_lens: list[int]
    attention_mask: torch.Tensor  # [B, S] 0/1

    def token_masks(self) -> list[torch.Tensor]:
        """Each row's steered tokens (``[S]`` bool), as the reference computes them."""
        seq = self.attention_mask.shape[1]
        return [torch.zeros(seq, dtype=torch.bool) if s is None else token_scope_mask(s.tokens, seq, p, m)
                for s, p, m in zip(self.steering, self.prompt_lens, self.attention_mask, strict=True)]


def site_for(sae: SAE, dtype: torch.dtype, rows: Rows, *, clamps: int, device: str = "cpu"
             ) -> tuple[SiteState, SlotManager]:
    """A site with the steering of ``rows`` admitted, assigned to the batch rows and routed."""
    batch, seq = rows.attention_mask.shape
    capacity = Capacity(max_rows=4, max_clamps=clamps, max_batch=8, max_tokens=max(1024, batch * seq))
    state = SiteState(SITE, sae.d_in, sae, capacity, RoutingState(capacity, dtype, torch.device(device)), dtype,
                      torch.device(device))
    slots = SlotManager({SITE: state}, state.routing, lambda name: name)
    slots.replace((), {b: (s, p) for b, (s, p) in enumerate(zip(rows.steering, rows.prompt_lens, strict=True))})
    slots.assign(list(range(batch)))
    state.routing.route(torch.arange(seq, device=device), rows.attention_mask.to(device), batch, seq)
    return state, slots


def exact_input(g: torch.Generator, batch: int, seq: int, d_in: int, dtype: torch.dtype, device: str = "cpu"):
    return torch.randint(-1, 2, (batch, seq, d_in), generator=g).to(device=device, dtype=dtype)  # [B, S, D]


def torch_add_then_sparse(x: torch.Tensor, state: SiteState) -> torch.Tensor:
    """The torch path's first two steps: additive, then the sparse delta (as ``steer_site``)."""
    batch, seq, _ = x.shape
    rows, _, weight = state.routing.view(batch, seq)
    added = torch.addcmul(x, weight[..., None], state.add_vec[rows][:, None, :])  # [B, S, D]
    return sparse_delta(added, rows, weight, state)


def full_mask(state: SiteState, batch: int, seq: int) -> torch.Tensor:
    rows, mask, _ = state.routing.view(batch, seq)
    return mask & state.full_row[rows][:, None]  # [B, S] as steer_site passes it


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, steered: torch.Tensor) -> None:
    """Close to the torch path, with every unsteered token returned bit for bit."""
    assert actual.dtype == x.dtype and actual.shape == x.shape
    assert actual.data_ptr() != x.data_ptr()
    assert torch.equal(actual[~steered], x[~steered])
    assert_rel_close(actual.float(), expected.float(), TOLERANCE[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("with_add", [False, True], ids=["delta", "add+delta"])
def test_sparse_delta_matches_torch_path(activation: str, dtype: torch.dtype, with_add: bool) -> None:
    batch, seq, d_in = 3, 5, 40
    state, _, g = build(exact_sae(d_in, 72, activation, seed=1), dtype, batch=batch, seq=seq, clamps=5,
                        reconstruct=False, seed=2)
    rows, mask, weight = state.routing.view(batch, seq)
    assert mask.any() and state.live_paths(batch).sparse
    x = exact_input(g, batch, seq, d_in, dtype)
    if with_add:
        expected = torch_add_then_sparse(x, state)
    else:
        expected = sparse_delta(x, rows, weight, state)
    actual = triton_sae.sparse_delta(x, rows, mask, state, with_add=with_add)
    assert_matches(actual, expected, x, mask)
    assert not torch.equal(actual, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("reconstruct", [False, True], ids=["delta", "reconstruct"])
def test_full_path_matches_torch_path(activation: str, dtype: torch.dtype, reconstruct: bool) -> None:
    """Elementwise SAEs send only Reconstruct rows here (their delta-only case steers nothing)."""
    batch, seq, d_in = 3, 5, 40
    state, _, g = build(exact_sae(d_in, 72, activation, seed=3), dtype, batch=batch, seq=seq, clamps=5,
                        reconstruct=reconstruct, seed=4)
    rows, _, _ = state.routing.view(batch, seq)
    mask = full_mask(state, batch, seq)
    assert mask.any() == (reconstruct or activation == "topk")
    x = exact_input(g, batch, seq, d_in, dtype)
    actual = triton_sae.full_path(x, rows, mask, state)
    assert_matches(actual, full_path(x, rows, mask, state), x, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d_sae", [72, 1100], ids=["one-step", "ragged-steps"])
def test_topk_select_keeps_the_k_largest_of_listed_slots(d_sae: int, dtype: torch.dtype) -> None:
    """Values in quarters, so ties at the k-th are everywhere: the lower feature wins, as in the
    stable-sort rule of the reference. Slots past the device-held count are never touched."""
    g = torch.Generator().manual_seed(d_sae)
    k = 9
    f = (torch.randint(0, 6, (7, d_sae), generator=g) / 4).to(dtype)  # [7, F]
    f[1] = 0.0  # every feature ties at 0
    f[2] = 0.5  # every feature ties at the same positive value
    f[3, k // 2 :] = 0.0  # fewer positive features than k
    f[4, 5] = torch.finfo(dtype).max  # the top bits of the key decide
    kept = f.clone()
    top = f.float().sort(dim=1, descending=True, stable=True).indices[:, :k]  # [7, k]
    expected = torch.zeros_like(f).scatter(1, top, f.gather(1, top))  # [7, F]
    # Chunk 0 of a list of 5 full-path slots (0-4), then the chunk at 5 holding slots 5-6 past the count.
    bounds = torch.tensor([0, 5])
    listed = torch.full((7, k), -1, dtype=torch.int32)  # [7, k]
    triton_sae._select_top_k(f[:5], listed[:5], bounds, 0)
    triton_sae._select_top_k(f[5:], listed[5:], bounds, 5)
    assert torch.equal(f[:5], expected[:5])
    assert torch.equal(listed[:5].long(), top[:5].sort(dim=1).values)  # the kept features, in feature order
    assert torch.equal(f[5:], kept[5:]) and bool((listed[5:] == -1).all())


@given(
    features=st.integers(1, 700), k_share=st.floats(0.0, 1.0), rows=st.integers(1, 4), ties=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
)
def test_topk_select_property(features: int, k_share: float, rows: int, ties: bool, dtype: torch.dtype,
                              seed: int) -> None:
    """Any width (within one block or over several, ragged), any k from 1 to every feature,
    values with heavy ties or none: the select keeps the stable-sort rule's features."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(k_share * features))
    if ties:
        f = (torch.randint(0, 4, (rows, features), generator=g) / 4).to(dtype)  # [rows, F]
    else:
        f = torch.rand(rows, features, generator=g).to(dtype)  # [rows, F]; bf16 may still tie
    top = f.float().sort(dim=1, descending=True, stable=True).indices[:, :k]  # [rows, k]
    expected = torch.zeros_like(f).scatter(1, top, f.gather(1, top))
    listed = torch.empty(rows, k, dtype=torch.int32)
    triton_sae._select_top_k(f, listed, torch.tensor([0, rows]), 0)
    assert torch.equal(f, expected)
    assert torch.equal(listed.long(), top.sort(dim=1).values)


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_full_path_works_in_chunks(activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of full-path tokens longer than a chunk, with a ragged last chunk, goes through
    the same chunk-sized scratch chunk by chunk."""
    monkeypatch.setattr(torch_path, "FULL_PATH_CHUNK", 4)
    batch, seq, d_in = 3, 14, 40
    state, _, g = build(exact_sae(d_in, 72, activation, seed=19), torch.float32, batch=batch, seq=seq, clamps=5,
                        reconstruct=True, seed=20)
    rows, _, _ = state.routing.view(batch, seq)
    mask = full_mask(state, batch, seq)
    assert int(mask.sum()) > 2 * torch_path.FULL_PATH_CHUNK
    x = exact_input(g, batch, seq, d_in, torch.float32)
    assert_matches(triton_sae.full_path(x, rows, mask, state), full_path(x, rows, mask, state), x, mask)


def test_kernels_loop_over_a_wide_hidden_size() -> None:
    """A hidden size past one chunk of the per-token loops, with a ragged last chunk."""
    batch, seq, d_in = 2, 17, 520
    assert triton_sae._block_d(d_in) < d_in
    state, _, g = build(exact_sae(d_in, 40, "jumprelu", seed=17), torch.bfloat16, batch=batch, seq=seq, clamps=3,
                        reconstruct=True, seed=18)
    rows, mask, _ = state.routing.view(batch, seq)
    x = exact_input(g, batch, seq, d_in, torch.bfloat16)
    expected = full_path(torch_add_then_sparse(x, state), rows, mask, state)
    actual = triton_sae.full_path(triton_sae.sparse_delta(x, rows, mask, state, with_add=True), rows, mask, state,
                                  in_place=True)
    assert_matches(actual, expected, x, mask)


@pytest.mark.parametrize("seq", [1, 20], ids=["decode", "prefill"])
def test_full_path_splits_a_wide_decode(seq: int) -> None:
    """With few tokens the dense decode is split over F in parts summed in a fixed order;
    the parts (the last one ragged) must add up to the torch path's decode."""
    batch, d_in, d_sae = 3, 40, 300
    state, _, g = build(exact_sae(d_in, d_sae, "jumprelu", seed=15), torch.float32, batch=batch, seq=seq,
                        clamps=4, reconstruct=True, seed=16)
    assert triton_sae._decode_splits(triton.cdiv(batch * seq, 16), d_sae, torch.device("cpu")) > 1
    rows, mask, _ = state.routing.view(batch, seq)
    x = exact_input(g, batch, seq, d_in, torch.float32)
    steered = full_mask(state, batch, seq)
    assert steered.any()
    assert_matches(triton_sae.full_path(x, rows, mask, state), full_path(x, rows, mask, state), x, steered)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_kernels_compose_like_the_torch_path(activation: str) -> None:
    """A trained-like fp32 SAE (Gaussian weights, b_dec subtracted from the input), every row kind
    at once: add + sparse delta, then the full path, as ``steer_site`` orders them."""
    batch, seq, d_in = 4, 6, 24
    sae = random_sae(d_in, 48, activation, seed=5, apply_b_dec_to_input=True)
    state, _, g = build(sae, torch.float32, batch=batch, seq=seq, clamps=6, reconstruct=True, seed=6)
    rows, mask, _ = state.routing.view(batch, seq)
    x = torch.randn(batch, seq, d_in, generator=g)  # [B, S, D]
    expected = full_path(torch_add_then_sparse(x, state), rows, full_mask(state, batch, seq), state)
    delta = triton_sae.sparse_delta(x, rows, mask, state, with_add=True)  # [B, S, D]
    actual = triton_sae.full_path(delta, rows, mask, state, in_place=True)
    assert actual is delta  # as steer_site chains them: no copy of the unsteered tokens
    assert_matches(actual, expected, x, mask)


def test_nothing_steered_returns_a_copy() -> None:
    batch, seq, d_in = 2, 3, 16
    state, _, g = build(exact_sae(d_in, 32, "topk", seed=7), torch.float32, batch=batch, seq=seq, clamps=2,
                        reconstruct=True, seed=8)
    rows, mask, _ = state.routing.view(batch, seq)
    none = torch.zeros_like(mask)  # [B, S]
    x = torch.randn(batch, seq, d_in, generator=g)  # [B, S, D]
    for out in (triton_sae.sparse_delta(x, rows, none, state, with_add=True), triton_sae.full_path(x, rows, none, state)):
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_partition_lists_full_path_tokens_reconstruct_first() -> None:
    """Steering row 1 reconstructs, row 2 is a full-path delta row (TopK clamps), row 0 steers
    nothing; only masked tokens of full rows are listed, each group in token order."""
    capacity = Capacity(max_rows=3, max_clamps=2, max_batch=4, max_tokens=8)
    state = SiteState(SITE, 8, None, capacity, RoutingState(capacity, torch.float32, torch.device("cpu")),
                      torch.float32, torch.device("cpu"))
    state.full_row[1:3] = True
    state.reconstruct_row[1] = True
    rows = torch.tensor([2, 1, 0, 1])  # [B]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)  # [B, S]: tokens 0..7
    token, bounds = triton_sae._partition(mask, rows, state)
    assert bounds.tolist() == [2, 4]
    assert token[:4].tolist() == [2, 7, 0, 1]


def test_module_imports_without_triton() -> None:
    """The CPU path never needs triton: with it unimportable, the module still imports."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from sae_compile.lowering.kernels import triton_sae\n"
        "assert triton_sae.TRITON_AVAILABLE is False\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


# --- against the independent fp64 reference and SAELens ---------------------------------------


def fused_steer(x: torch.Tensor, state: SiteState) -> torch.Tensor:
    """``steer_site``'s Triton branch, which it takes only on CUDA; here it also runs in the interpreter."""
    batch, seq, _ = x.shape
    rows, mask, weight = state.routing.view(batch, seq)
    if state.elementwise:
        out = triton_sae.sparse_delta(x, rows, mask, state, with_add=True)
    else:
        out = torch_path.add_vector(x, rows, weight, state)
    return triton_sae.full_path(out, rows, mask, state, in_place=True)


def reference_steer(x: torch.Tensor, sae: SAE, rows: Rows) -> torch.Tensor:
    """``tests/reference.py``'s fp64 steering of each batch row of ``x``, cast back to ``x.dtype``."""
    per_row = zip(x, rows.steering, rows.token_masks(), strict=True)
    return torch.stack([apply_steering_at_site(xb, SITE, s, sae, mask.to(x.device)) for xb, s, mask in per_row])


def check_against_reference(sae: SAE, dtype: torch.dtype, *, batch: int, seq: int, clamps: int, seed: int,
                            device: str = "cpu") -> None:
    """Every row kind at once (Reconstruct, unsteered, clamps over random scopes, additive vectors),
    through the kernels, against the reference; unsteered tokens come back bit for bit."""
    g = torch.Generator().manual_seed(seed)
    rows = random_rows(g, sae, batch=batch, seq=seq, clamps=clamps, reconstruct=True)
    state, _ = site_for(sae, dtype, rows, clamps=clamps, device=device)
    x = exact_input(g, batch, seq, sae.d_in, dtype, device)
    steered = torch.stack(rows.token_masks()).to(device)  # [B, S]
    assert steered[0].any() and steered[2:].any()  # a Reconstruct row and clamp rows
    assert_matches(fused_steer(x, state), reference_steer(x, sae.to(device), rows), x, steered)


@pytest.mark.parametrize("apply_b_dec", [False, True], ids=["x", "x-b_dec"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_kernels_match_the_fp64_reference(activation: str, apply_b_dec: bool) -> None:
    """The kernels against ``tests/reference.py``'s math, which shares no table with them (the
    torch path reads the same pre-folded state, so agreeing with it alone could hide a folding bug)."""
    sae = random_sae(24, 48, activation, seed=31, apply_b_dec_to_input=apply_b_dec)
    check_against_reference(sae, torch.float32, batch=4, seq=6, clamps=6, seed=32)


def negative_threshold_sae(d_in: int, d_sae: int, *, seed: int) -> SAE:
    """``exact_sae``'s JumpReLU with thresholds in {-7/8, -5/8, ..., 3/8}, two thirds of them negative,
    so that many pre-activations fall in (threshold, 0): SAELens's ``relu(pre) * (pre > threshold)``
    zeroes them and ``pre * (pre > threshold)`` would not."""
    sae = exact_sae(d_in, d_sae, "jumprelu", seed=seed)
    threshold = (torch.randint(-4, 2, (d_sae,), generator=torch.Generator().manual_seed(seed)) + 0.5) / 4
    return SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation="jumprelu", threshold=threshold)


def between_negative_threshold_and_zero(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """``[..., F]``: pre-activations where the two JumpReLU conventions disagree."""
    pre = x.float() @ sae.W_enc + sae.b_enc
    return (pre > sae.threshold) & (pre < 0)


@pytest.mark.parametrize("path", ["sparse", "full"])
def test_negative_thresholds_follow_saelens(path: str) -> None:
    """Both kernels and both torch paths against SAELens's own JumpReLU encode. Sparse: scaling the
    clamped features by 2 adds ``f_c W_dec[c]``. Full: Reconstruct with no clamps decodes all of ``f``."""
    from tests.test_sae import saelens_jumprelu

    batch, seq, d_in, d_sae, clamps = 2, 8, 40, 72, 8
    sae = negative_threshold_sae(d_in, d_sae, seed=41)
    g = torch.Generator().manual_seed(42)
    features = torch.randperm(d_sae, generator=g)[:clamps].tolist()
    edits = [Reconstruct(SITE)] if path == "full" else [Clamp(SITE, i, 2.0, "scale") for i in features]
    rows = Rows([Steering(*edits)] * batch, [seq] * batch, torch.ones(batch, seq, dtype=torch.long))
    state, _ = site_for(sae, torch.float32, rows, clamps=clamps)
    x = exact_input(g, batch, seq, d_in, torch.float32)
    with torch.no_grad():
        theirs = saelens_jumprelu(sae)
        f = theirs.encode(x)  # [B, S, F]
        expected = theirs.decode(f) if path == "full" else x + f[..., features] @ sae.W_dec[features]
    disagree = between_negative_threshold_and_zero(sae, x)
    assert bool(disagree[..., features if path == "sparse" else slice(None)].any())
    everything = torch.ones(batch, seq, dtype=torch.bool)
    assert_matches(fused_steer(x, state), expected, x, everything)
    assert_matches(steer_site(x, state), expected, x, everything)  # the torch path, on the CPU


# --- on the GPU: model-like shapes, and capture in a CUDA graph -------------------------------

GPU_SHAPE = dict(batch=4, seq=64, d_in=2048, d_sae=16384, clamps=16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_kernels_match_torch_path_on_gpu(activation: str, dtype: torch.dtype) -> None:
    batch, seq, d_in, d_sae, clamps = GPU_SHAPE.values()
    state, _, g = build(exact_sae(d_in, d_sae, activation, seed=11), dtype, batch=batch, seq=seq, clamps=clamps,
                        reconstruct=True, seed=12, device="cuda")
    rows, mask, weight = state.routing.view(batch, seq)
    x = exact_input(g, batch, seq, d_in, dtype, "cuda")
    if state.elementwise:
        actual = triton_sae.sparse_delta(x, rows, mask, state, with_add=True)
        assert_matches(actual, torch_add_then_sparse(x, state), x, mask)
    steered = full_mask(state, batch, seq)
    assert steered.any()
    actual = triton_sae.full_path(x, rows, steered, state)
    assert_matches(actual, full_path(x, rows, steered, state), x, steered)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("activation", "d_sae"), [("jumprelu", 16384), ("topk", 65536)])
def test_kernels_match_the_fp64_reference_at_gemma_2_2b_shapes(activation: str, d_sae: int, dtype: torch.dtype
                                                               ) -> None:
    """Gemma-2-2B's hidden size, Gemma Scope's 16k JumpReLU width and a 64k TopK (k = 64), a few
    hundred tokens, compiled kernels against the fp64 reference."""
    sae = exact_sae(2304, d_sae, activation, seed=51)
    assert sae.k in (None, 64)
    check_against_reference(sae, dtype, batch=4, seq=80, clamps=16, seed=52, device="cuda")


@pytest.mark.cuda
def test_float64_on_gpu_takes_the_torch_path() -> None:
    """The kernels take fp32/bf16/fp16; a float64 model is steered by the torch path instead."""
    batch, seq, d_in = 3, 5, 40
    state, _, g = build(exact_sae(d_in, 72, "topk", seed=21), torch.float64, batch=batch, seq=seq, clamps=5,
                        reconstruct=True, seed=22, device="cuda")
    rows, mask, _ = state.routing.view(batch, seq)
    x = exact_input(g, batch, seq, d_in, torch.float64, "cuda")
    steered = full_mask(state, batch, seq)
    assert torch.float64 not in triton_sae.DTYPES
    assert torch.equal(steer_site(x, state), full_path(torch_add_then_sparse(x, state), rows, steered, state))


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_captured_graph_follows_in_place_routing(activation: str) -> None:
    """Capture add + sparse delta + full path once; replays follow new rows, masks and inputs
    written in place, and match the torch path each time."""
    batch, seq, d_in, d_sae, clamps = 4, 16, 256, 1024, 8
    dtype = torch.bfloat16
    state, slots, g = build(exact_sae(d_in, d_sae, activation, seed=13), dtype, batch=batch, seq=seq,
                            clamps=clamps, reconstruct=True, seed=14, device="cuda")
    rows, mask, _ = state.routing.view(batch, seq)  # fixed addresses, rewritten in place below
    x = exact_input(g, batch, seq, d_in, dtype, "cuda")  # [B, S, D], rewritten in place below

    def step() -> torch.Tensor:
        out = triton_sae.sparse_delta(x, rows, mask, state, with_add=True)  # [B, S, D]
        return triton_sae.full_path(out, rows, mask, state, in_place=True)  # [B, S, D]

    def expected() -> torch.Tensor:
        return full_path(torch_add_then_sparse(x, state), rows, full_mask(state, batch, seq), state)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile every kernel before capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    positions = torch.arange(seq, device="cuda")  # [S]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 0, 1], [1, 1, 1, 1]):
        slots.assign(order, torch.randint(0, seq + 1, (batch,), generator=g).tolist())
        padding = (torch.rand(batch, seq, generator=g) > 0.2).long().cuda()  # [B, S]
        state.routing.route(positions, padding, batch, seq)
        x.copy_(exact_input(g, batch, seq, d_in, dtype, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, expected(), x, mask)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    """Compile every kernel to a Hopper cubin in a fresh process (no interpreter, no GPU needed),
    so a CPU-only CI catches what only the compiler rejects (tl.dot shapes, dtypes) and the
    shared memory a launch would be refused for."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["ok"] * 23, result.stdout


_COMPILE_ALL = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from sae_compile.lowering.kernels import triton_sae as ts

def build(fn, pointers, scalars, constexprs, num_warps=4):
    signature = {**pointers, **{name: "i32" for name in scalars}, **{name: "constexpr" for name in constexprs}}
    kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": num_warps})
    # A launch fails past the block's shared-memory limit (227 KiB on Hopper); the compiler alone does not check.
    print("ok" if kernel.metadata.shared <= 227 * 1024 else f"{fn.__name__}:shared={kernel.metadata.shared}")

build(ts._partition_kernel,
      dict(mask_ptr="*u8", rows_ptr="*i64", full_row_ptr="*u8", reconstruct_row_ptr="*u8", token_ptr="*i64",
           bounds_ptr="*i64"),
      ["n", "seq"], dict(BLOCK=1024))
for dt in ("fp32", "bf16"):
    precision = "ieee" if dt == "fp32" else "tf32"
    for with_add in (False, True):
        build(ts._sparse_delta_kernel,
              dict(x_ptr=f"*{dt}", out_ptr=f"*{dt}", rows_ptr="*i64", mask_ptr="*u8", add_vec_ptr=f"*{dt}",
                   enc_ptr=f"*{dt}", dec_ptr=f"*{dt}", params_ptr="*fp32"),
              ["seq"], dict(d_model=2048, C=16, WITH_ADD=with_add, DOT_F32=False, PRECISION=precision,
                            BLOCK_T=16, BLOCK_C=16, BLOCK_D=512))
    for topk in (False, True):
        for block_m in (16, 64):
            build(ts._encode_kernel,
                  dict(x_ptr=f"*{dt}", token_ptr="*i64", bounds_ptr="*i64", w_enc_ptr=f"*{dt}", b_enc_ptr=f"*{dt}",
                       threshold_ptr=f"*{dt}", f_ptr=f"*{dt}"),
                  ["chunk_start", "n_slots"], dict(d_model=2048, d_sae=16384, TOPK=topk, DOT_F32=False, PRECISION=precision,
                           BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64))
    build(ts._decode_kernel,
          dict(f_ptr=f"*{dt}", bounds_ptr="*i64", w_dec_ptr=f"*{dt}", dec_ptr="*fp32"),
          ["chunk_start", "n_slots"], dict(d_model=2048, d_sae=16384, K_SPLIT=1024, DOT_F32=False, PRECISION=precision,
                            BLOCK_M=16, BLOCK_N=64, BLOCK_K=64))
    build(ts._full_output_kernel,
          dict(out_ptr=f"*{dt}", rows_ptr="*i64", token_ptr="*i64", bounds_ptr="*i64", f_ptr=f"*{dt}",
               dec_ptr="*fp32", w_dec_ptr=f"*{dt}", b_dec_ptr=f"*{dt}", clamp_idx_ptr="*i64", clamp_mul_ptr="*fp32",
               clamp_shift_ptr="*fp32"),
          ["chunk_start", "seq", "n_slots"], dict(d_model=2048, d_sae=16384, C=5, SPLITS=4, BLOCK_C=8, BLOCK_D=512))
for dt, low_bit in (("fp32", 0), ("bf16", 16), ("fp16", 13)):
    build(ts._topk_kernel, dict(f_ptr=f"*{dt}", idx_ptr="*i32", bounds_ptr="*i64"), ["chunk_start"],
          dict(d_sae=16384, K=64, LOW_BIT=low_bit, BLOCK=ts._TOPK_BLOCK), num_warps=ts._TOPK_WARPS)
    build(ts._gather_decode_kernel,
          dict(f_ptr=f"*{dt}", idx_ptr="*i32", bounds_ptr="*i64", w_dec_ptr=f"*{dt}", dec_ptr="*fp32"), ["chunk_start"],
          dict(d_model=2048, d_sae=16384, K=64, BLOCK_J=ts._GATHER_BLOCK_J, BLOCK_D=ts._GATHER_BLOCK_D))
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_recorded_top_k_on_cuda_is_the_radix_select(monkeypatch, dtype: torch.dtype, k: int) -> None:
    """Recording's top-k takes the TopK path's radix-select kernel on CUDA (here in the
    interpreter) and gives what the torch path and the reference give, ties and zeros included."""
    from sae_compile.lowering.kernels import record
    from tests.reference import reference_top_k

    g = torch.Generator().manual_seed(k)
    f = torch.randint(0, 4, (9, 40), generator=g).to(dtype) / 2  # many ties, many zeros
    f[3] = 0.0
    expected = record.top_k_sorted(f.clone(), k)
    monkeypatch.setattr(record, "_use_triton", lambda _: True)
    values, indices = record.top_k_sorted(f.clone(), k)
    assert torch.equal(indices, expected[1]) and torch.equal(values, expected[0])
    ref_values, ref_indices = reference_top_k(f.double(), k)
    assert torch.equal(indices, ref_indices) and torch.equal(values.double(), ref_values)
