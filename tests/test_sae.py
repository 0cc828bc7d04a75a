"""SAE value semantics: DESIGN §3-§4 math, validation and dtype/device moves."""

from __future__ import annotations

import pytest
import torch

from sae_compile import SAE
from tests.factories import random_sae
from tests.reference import sae_encode64, sae_math


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_encode_decode_match_fp64_math(activation: str, apply_b_dec: bool) -> None:
    sae = random_sae(16, 40, activation, seed=3, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(5, 7, 16)
    ref = sae_math(sae, x.double())
    torch.testing.assert_close(sae.encode(x).double(), ref.f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.forward(x).double(), ref.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae(x))


def test_topk_keeps_exactly_k_positive_features() -> None:
    sae = random_sae(16, 64, "topk", k=5, seed=1)
    f = sae.encode(torch.randn(100, 16))
    assert int((f > 0).sum(-1).max()) <= 5
    assert bool(((f > 0).sum(-1) >= 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [32, 100, 1000, 20000])  # torch.topk's CPU kernels break ties differently by size
def test_topk_ties_go_to_the_lower_feature_index(features: int, dtype: torch.dtype) -> None:
    # pre = x * W_enc[0]: 2 on features 1 and 3, 1 on the even features of the upper half, so
    # with k = 5 the k-th value (1) is tied. An input of 0 makes every feature tie at 0.
    pattern = torch.zeros(1, features)
    pattern[0, features // 2 :: 2] = 1.0
    pattern[0, [1, 3]] = 2.0
    sae = SAE(pattern, torch.randn(features, 1), activation="topk", k=5).to(dtype=dtype)
    x = torch.tensor([[1.0], [0.0]])
    expected = torch.zeros(2, features)
    expected[0, [1, 3]] = 2.0
    expected[0, [features // 2, features // 2 + 2, features // 2 + 4]] = 1.0
    assert torch.equal(sae.encode(x.to(dtype)).float(), expected)
    assert torch.equal(sae_encode64(sae, x).float(), expected)


def test_jumprelu_threshold_is_per_feature() -> None:
    W = torch.eye(3)
    sae = SAE(W, W, activation="jumprelu", threshold=torch.tensor([0.5, 1.5, -1.0]))
    f = sae.encode(torch.tensor([[1.0, 1.0, -0.5]]))
    assert f.tolist() == [[1.0, 0.0, 0.0]]  # relu(pre) * (pre > threshold): -0.5 > -1 is not let through


def saelens_jumprelu(sae: SAE):
    """SAELens's own JumpReLU SAE holding ``sae``'s tensors; skips the test without sae_lens."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.JumpReLUSAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, apply_b_dec_to_input=sae.apply_b_dec_to_input)
    theirs = sae_lens.SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(getattr(sae, name))
    return theirs


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_negative_jumprelu_thresholds_encode_as_saelens(apply_b_dec: bool) -> None:
    """Thresholds in [-1, 0.5]: most pre-activations in (threshold, 0) are let through by
    ``pre * (pre > threshold)`` but not by SAELens's ``relu(pre) * (pre > threshold)``."""
    sae = random_sae(16, 40, "jumprelu", seed=5, apply_b_dec_to_input=apply_b_dec)
    threshold = torch.linspace(-1.0, 0.5, sae.d_sae)
    sae = SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation="jumprelu", threshold=threshold,
              apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(6))
    pre = (x - sae.b_dec if apply_b_dec else x) @ sae.W_enc + sae.b_enc
    assert bool(((pre > threshold) & (pre < 0)).sum() > 100)  # the cases the two conventions disagree on
    with torch.no_grad():
        expected = saelens_jumprelu(sae).encode(x)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-6, atol=1e-6)
    assert bool((sae.encode(x) >= 0).all())


def test_attributes_are_constructor_arguments() -> None:
    sae = random_sae(8, 12, "topk", k=3, hook_name="blocks.1.hook_resid_post", apply_b_dec_to_input=True)
    assert (sae.d_in, sae.d_sae, sae.k, sae.activation) == (8, 12, 3, "topk")
    assert sae.W_enc.shape == (8, 12) and sae.W_dec.shape == (12, 8)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.apply_b_dec_to_input and sae.threshold is None


def test_to_dtype_returns_new_sae_and_keeps_config() -> None:
    sae = random_sae(8, 12, "jumprelu", hook_name="blocks.0.hook_mlp_out")
    half = sae.to(torch.bfloat16)
    assert half is not sae and half.dtype == torch.bfloat16 and half.threshold.dtype == torch.bfloat16
    assert sae.dtype == torch.float32
    assert (half.activation, half.hook_name, half.d_sae) == ("jumprelu", "blocks.0.hook_mlp_out", 12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(4, 6)), ValueError, "W_dec must have shape"),
        (dict(W_enc=torch.zeros(4), W_dec=torch.zeros(4, 6)), ValueError, "W_enc must be 2-D"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), b_enc=torch.zeros(5)), ValueError, "b_enc"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), b_dec=torch.zeros(6)), ValueError, "b_dec"),
        (dict(W_enc=torch.full((4, 6), float("nan")), W_dec=torch.zeros(6, 4)), ValueError, "W_enc contains NaN"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), activation="gelu"), ValueError, "activation"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), activation="jumprelu"), ValueError, "threshold"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), activation="topk", k=7), ValueError, "k in"),
        (dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), k=2), ValueError, "only meaningful"),
        (dict(W_enc=[[0.0]], W_dec=torch.zeros(1, 1)), TypeError, "torch.Tensor"),
        (
            dict(W_enc=torch.zeros(4, 6), W_dec=torch.zeros(6, 4), activation="jumprelu", threshold=torch.zeros(5)),
            ValueError, "threshold must have shape",
        ),
    ],
)
def test_bad_construction_is_rejected(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SAE(**kwargs)
