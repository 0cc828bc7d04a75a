"""Real weights: Gemma 2 2B with a Gemma Scope SAE, compiled steering vs an eager hook reference.

Skipped unless both checkpoints are on local disk (there is no hub access), named by:

    SAE_COMPILE_GEMMA2_PATH       a local Hugging Face folder of google/gemma-2-2b
                                  (config.json + *.safetensors; tokenizer files optional)
    SAE_COMPILE_GEMMA_SCOPE_PATH  a Gemma Scope SAE: its params.npz or the folder holding it,
                                  e.g. .../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82
    SAE_COMPILE_GEMMA_SCOPE_LAYER optional: the layer, when the SAE path has no layer_N folder

Run with ``PYTHONPATH=. python -m pytest tests/real -m slow``. The model runs in fp32 on the GPU
when there is one. Both sides use the same loaded SAE; the reference (``tests/reference.py``, the
one every tiny-model test uses) hooks the eager model and does the SAE math in float64, so the
comparison tests the compiled graph rewrite and op, not the loader. Each case also asserts that the steering moved the logits far more than the tolerance,
so agreement is not vacuous.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import sae_compile as sc
from sae_compile.sae import SAE
from tests.reference import reference_logits, sae_encode64, site_activations

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
    sae = SAE.load(os.environ[SAE_ENV], device=device, layer=None if layer is None else int(layer))
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
    return sc.steer(model, {sae.hook_name: sae}, backend="inductor")


@pytest.fixture(scope="module")
def plain_logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def _assert_steered_agrees(model, sae: SAE, steered, input_ids, plain: torch.Tensor, steering: sc.Steering) -> None:
    """The compiled steered logits equal the hooked reference's, and the steering moved them."""
    expected = reference_logits(model, input_ids, saes={sae.hook_name: sae}, steering=steering)
    with torch.no_grad():
        actual = steered(input_ids, steering=steering).logits
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    moved = float((expected - plain).abs().max())
    assert moved > 50 * ATOL, f"steering moved the logits by only {moved:.2e}; the comparison would be vacuous"


# ------------------------------------------------------------------------------------- tests


def test_unsteered_compiled_logits_match_the_model(steered, input_ids, plain_logits) -> None:
    with torch.no_grad():
        out = steered(input_ids, steering=None)
    torch.testing.assert_close(out.logits, plain_logits, rtol=RTOL, atol=ATOL)


def test_clamp_keeps_the_error_term_and_matches_the_reference(model, sae, steered, input_ids, plain_logits) -> None:
    site = sae.hook_name
    f = sae_encode64(sae, site_activations(model, input_ids, site))  # [1, S, d_sae]
    # The strongest feature on this prompt, pushed to 4x its peak: a large, meaningful edit.
    feature = int(f.amax(dim=(0, 1)).argmax())
    steering = sc.Steering(sc.Clamp(site, feature, 4 * float(f[..., feature].max())))
    _assert_steered_agrees(model, sae, steered, input_ids, plain_logits, steering)


def test_full_reconstruction_matches_the_reference(model, sae, steered, input_ids, plain_logits) -> None:
    _assert_steered_agrees(model, sae, steered, input_ids, plain_logits, sc.Steering(sc.Reconstruct(sae.hook_name)))
