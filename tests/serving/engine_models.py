"""A tiny random Llama saved as a vLLM-loadable folder, its SAEs, and the HF reference for it.

vLLM's CPU attention takes head sizes of 32 and up, so the model has two 32-wide heads (one KV
head). The tokenizer is the demo's offline word-level one. Requests are token ids, so vLLM and
HF see the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

import sae_compile as sc
from sae_compile import demo
from tests.factories import random_sae

HIDDEN = 64
NUM_LAYERS = 2
PROMPTS = (
    [5, 9, 14, 3, 22, 7],
    [11, 40, 8],
    [30, 31, 32, 33, 34, 35, 36, 37, 38],
    [60, 12, 19, 44, 4],
)


#: Architectures of the comparison tests: vLLM's CPU build runs each.
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


def _config(arch: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=len(demo.WORDS), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
        eos_token_id=None,  # every request generates exactly max_tokens
    )
    if arch in ("gemma2", "gemma3"):
        # Sliding layers with a window past every test sequence behave like full ones; vLLM's
        # Gemma ties the unembedding to the embedding.
        common |= dict(
            sliding_window=256, query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True
        )
    configs = {
        "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config, "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
    }
    return configs[arch](**common)


def save_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random ``arch`` causal LM (fp32 weights) and its tokenizer, written to ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
    model.save_pretrained(folder)
    demo.build_tokenizer().save_pretrained(folder)
    return folder


def save_llama(folder: Path, seed: int = 0) -> Path:
    """The random Llama most tests use."""
    return save_model(folder, "llama", seed)


def site_saes() -> dict[str, sc.SAE]:
    """One SAE per hook kind, with every activation among them."""
    return {
        "blocks.0.hook_attn_out": random_sae(HIDDEN, 32, "relu", seed=1),
        "blocks.0.hook_mlp_out": random_sae(HIDDEN, 48, "topk", seed=2, k=6),
        "blocks.1.hook_resid_pre": random_sae(HIDDEN, 32, "jumprelu", seed=3, apply_b_dec_to_input=True),
        "blocks.1.hook_resid_mid": random_sae(HIDDEN, 32, "relu", seed=4),
        "blocks.1.hook_resid_post": random_sae(HIDDEN, 40, "jumprelu", seed=5, threshold_low=-0.1),
    }


#: Attached for AddVector only.
ADDITIVE_SITES = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")


def steered_llama(folder: Path, **kwargs):
    """The steered engine most tests start: the model of ``folder`` with ``site_saes()`` and the
    additive sites, in fp32, with room for 8 requests; ``kwargs`` override or add engine arguments."""
    from sae_compile.vllm import LLM

    settings = dict(max_rows=8, dtype="float32", max_model_len=128, max_num_batched_tokens=256, seed=0)
    return LLM(str(folder), site_saes(), sites=ADDITIVE_SITES, **{**settings, **kwargs})


def hf_reference(folder: Path, saes: dict[str, sc.SAE], dtype: torch.dtype = torch.float32) -> sc.SteeredModel:
    """``sc.steer`` of the same weights, as the reference for vLLM's outputs."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
    return sc.steer(model, saes, sites=ADDITIVE_SITES, backend="aot_eager")


def hf_generate(reference: sc.SteeredModel, prompt: list[int], steering: sc.Steering | None, max_tokens: int):
    """Greedy tokens and the per-step log-softmax of the logits, for one prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(
            ids, steering=steering, max_new_tokens=max_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([step[0].double().log_softmax(-1) for step in out.logits])  # [T, V]
    return tokens, logprobs
