"""Real weights: Gemma 2 2B with a Gemma Scope SAE, compiled steering vs an eager hook reference.

Skipped unless both checkpoints are on local disk (there is no hub access), named by:

    SAE_COMPILE_GEMMA2_PATH       a local Hugging Face folder of google/gemma-2-2b
                                  (config.json + *.safetensors; tokenizer files optional)
    SAE_COMPILE_GEMMA_SCOPE_PATH  a Gemma Scope SAE: its params.npz or the folder holding it,
                                  e.g. .../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82
    SAE_COMPILE_GEMMA_SCOPE_LAYER optional: the layer, when the SAE path has no layer_N folder

Run with ``PYTHONPATH=. python -m pytest tests/real -m slow``. The model runs in fp32 on the GPU
when there is one. Both sides use the same loaded SAE; the reference hooks the eager model and
does the SAE math in float64, so the comparison tests the compiled graph rewrite and op, not the
loader. Each case also asserts that the steering moved the logits far more than the tolerance,
so agreement is not vacuous.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sae_compile.checkpoints import load_sae
from sae_compile.sae import SAE

MODEL_ENV = "SAE_COMPILE_GEMMA2_PATH"
SAE_ENV = "SAE_COMPILE_GEMMA_SCOPE_PATH"
LAYER_ENV = "SAE_COMPILE_GEMMA_SCOPE_LAYER"
# fp32 end to end; compiled and eager differ only by kernel summation order over 26 layers.
RTOL = ATOL = 2e-3
PROMPT = "The Golden Gate Bridge is a suspension bridge spanning the strait between San Francisco Bay and the ocean."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.environ.get(MODEL_ENV) and os.environ.get(SAE_ENV)
             and Path(os.environ[MODEL_ENV]).is_dir() and Path(os.environ[SAE_ENV]).exists()),
        reason=f"set {MODEL_ENV} and {SAE_ENV} to local Gemma 2 2B and Gemma Scope checkpoints",
    ),
]


# ------------------------------------------------------------------------- eager hook reference


def _encode64(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """DESIGN §4 encode in float64, written out here so the reference shares no code with the library."""
    W_enc, b_enc, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x - b_dec if sae.apply_b_dec_to_input else x) @ W_enc + b_enc  # [..., d_sae]
    if sae.activation == "jumprelu":
        return torch.where(pre > sae.threshold.double(), pre, torch.zeros_like(pre))
    if sae.activation == "topk":
        top = torch.relu(pre).topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return torch.relu(pre)


def clamp_edit(sae: SAE, feature: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Error-preserving clamp: x' = x + (f' - f) @ W_dec, with f'[feature] = value."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        f = _encode64(sae, x64)
        delta = value - f[..., feature]  # [..., ]
        return (x64 + delta[..., None] * sae.W_dec[feature].double()).to(x.dtype)
    return edit


def reconstruct_edit(sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """Full reconstruction, error term dropped: x' = f @ W_dec + b_dec."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        f = _encode64(sae, x.double())
        return (f @ sae.W_dec.double() + sae.b_dec.double()).to(x.dtype)
    return edit


def _site_module(model: torch.nn.Module, site: str) -> torch.nn.Module:
    """The Gemma 2 module whose output is ``site``: the decoder layer (resid_post) or the
    post-MLP norm (mlp_out, what the MLP adds to the residual)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out)", site)
    if match is None:
        pytest.skip(f"the reference hooks resid_post and mlp_out only, not {site}")
    layer = model.model.layers[int(match.group(1))]
    return layer if match.group(2) == "resid_post" else layer.post_feedforward_layernorm


@contextmanager
def hooked(model: torch.nn.Module, site: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    def hook(module, args, output):
        # Decoder layers return a tensor in transformers 5.x and a tuple in 4.x.
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    handle = _site_module(model, site).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def model(device):
    from transformers import AutoModelForCausalLM

    # Gemma 2's attention logit soft-capping needs the eager attention implementation.
    return AutoModelForCausalLM.from_pretrained(
        os.environ[MODEL_ENV], torch_dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).to(device).eval()


@pytest.fixture(scope="module")
def sae(device) -> SAE:
    layer = os.environ.get(LAYER_ENV)
    sae = load_sae(os.environ[SAE_ENV], device=device, layer=None if layer is None else int(layer))
    if sae.hook_name is None:
        pytest.fail(f"{os.environ[SAE_ENV]} has no layer_N folder; set {LAYER_ENV}")
    return sae


@pytest.fixture(scope="module")
def input_ids(model, device) -> torch.Tensor:
    folder = Path(os.environ[MODEL_ENV])
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids.to(device)  # [1, S]
    # No tokenizer shipped with the weights: fixed pseudo-random tokens still exercise every path.
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, 24), generator=g).to(device)


@pytest.fixture(scope="module")
def steered(model, sae):
    import sae_compile as sc

    return sc.steer(model, {sae.hook_name: sae}, backend="inductor")


@pytest.fixture(scope="module")
def plain_logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def _assert_steered_agrees(actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    moved = float((expected - plain).abs().max())
    assert moved > 50 * ATOL, f"steering moved the logits by only {moved:.2e}; the comparison would be vacuous"


# ------------------------------------------------------------------------------------- tests


def test_unsteered_compiled_logits_match_the_model(steered, input_ids, plain_logits) -> None:
    with torch.no_grad():
        out = steered(input_ids, steering=None)
    torch.testing.assert_close(out.logits, plain_logits, rtol=RTOL, atol=ATOL)


def test_clamp_keeps_the_error_term_and_matches_hooks(model, sae, steered, input_ids, plain_logits) -> None:
    import sae_compile as sc

    site = sae.hook_name
    captured: list[torch.Tensor] = []
    with torch.no_grad(), hooked(model, site, lambda x: captured.append(x) or x):
        model(input_ids)
    f = _encode64(sae, captured[0].double())  # [1, S, d_sae]
    # The strongest feature on this prompt, pushed to 4x its peak: a large, meaningful edit.
    feature = int(f.amax(dim=(0, 1)).argmax())
    value = 4 * float(f[..., feature].max())
    with torch.no_grad(), hooked(model, site, clamp_edit(sae, feature, value)):
        expected = model(input_ids).logits
    with torch.no_grad():
        actual = steered(input_ids, steering=sc.Steering(sc.Clamp(site, feature, value))).logits
    _assert_steered_agrees(actual, expected, plain_logits)


def test_full_reconstruction_matches_hooks(model, sae, steered, input_ids, plain_logits) -> None:
    import sae_compile as sc

    with torch.no_grad(), hooked(model, sae.hook_name, reconstruct_edit(sae)):
        expected = model(input_ids).logits
    with torch.no_grad():
        actual = steered(input_ids, steering=sc.Steering(sc.Reconstruct(sae.hook_name))).logits
    _assert_steered_agrees(actual, expected, plain_logits)
