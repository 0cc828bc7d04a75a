"""Tiny random-initialised Hugging Face causal LMs for tests, plus a per-architecture hook table.

Nothing here downloads anything: every model is built from a config with a fixed seed. The
hook table (``layer_module`` / ``attn_branch_module`` / ``mlp_branch_module``) is written by
hand per architecture on purpose: it is what the eager reference (``tests/reference.py``)
hooks, and it must stay independent of the library's own site discovery.

Architectures (``ARCHS``):

- ``gpt2``: learned positions, LayerNorm, the attention module returns a tuple.
- ``llama``, ``mistral``, ``qwen2``: RMSNorm + RoPE, grouped-query attention (2 KV heads).
- ``gemma2``: post-branch norms (``attn_out``/``mlp_out`` are *after* them), attention and
  final-logit soft-capping, alternating sliding/full attention (window >= ``MAX_POSITIONS``,
  so the sliding layers behave like full ones on every length a test can use).
- ``gpt_neox``: the HF default ``use_parallel_residual=True`` (no ``resid_mid``).
- ``gpt_neox_seq``: GPT-NeoX with ``use_parallel_residual=False`` (sequential residual).
- ``phi3``: the branch outputs pass through ``resid_attn_dropout`` / ``resid_mlp_dropout``.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

ARCHS: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "gemma2", "gpt_neox", "gpt_neox_seq", "phi3")

#: Longest sequence any tiny model accepts (learned position tables are this long).
MAX_POSITIONS = 64

#: Std of the random init. HF's default (0.02) makes a hidden-32 model nearly linear and
#: its logits nearly constant, so steering edits barely move them; 0.2 ~ 1/sqrt(hidden)
#: gives O(1) logits that react clearly to an O(1) edit.
INIT_STD = 0.2

# Special token ids kept inside every vocab (>= 3), so no config points past the embedding.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

NUM_HEADS = 4
NUM_KV_HEADS = 2  # grouped-query attention where the architecture supports it


def _config(arch: str, *, num_layers: int, hidden: int, vocab: int) -> transformers.PretrainedConfig:
    """The tiny config for ``arch``; every dropout is 0 so even train mode would be deterministic."""
    head_dim = hidden // NUM_HEADS
    intermediate = 2 * hidden
    common = dict(
        vocab_size=vocab,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        initializer_range=INIT_STD,
    )
    rope_common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **common,
    )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=num_layers, n_head=NUM_HEADS, n_inner=intermediate,
            n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if arch == "llama":
        return transformers.LlamaConfig(**rope_common)
    if arch == "mistral":
        # sliding_window >= MAX_POSITIONS: the window never cuts anything in tests.
        return transformers.MistralConfig(sliding_window=MAX_POSITIONS, **rope_common)
    if arch == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **rope_common)
    if arch == "gemma2":
        return transformers.Gemma2Config(
            **{**rope_common, "tie_word_embeddings": True},  # Gemma ties its embeddings
            query_pre_attn_scalar=head_dim,
            sliding_window=MAX_POSITIONS,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    if arch in ("gpt_neox", "gpt_neox_seq"):
        return transformers.GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
            num_attention_heads=NUM_HEADS, max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=(arch == "gpt_neox"), hidden_dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=False, **common,
        )
    if arch == "phi3":
        return transformers.Phi3Config(
            **rope_common, original_max_position_embeddings=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def make_model(
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 3,
    hidden: int = 32,
    vocab: int = 97,
    attn_implementation: str | None = None,
    head_dim: int | None = None,
) -> transformers.PreTrainedModel:
    """A tiny random ``arch`` causal LM in eval mode, deterministic in ``seed``.

    ``head_dim`` (RoPE architectures except Phi-3) defaults to ``hidden // NUM_HEADS``; another
    value makes ``attn.hook_z`` (``NUM_HEADS * head_dim`` wide) differ from the hidden size.

    The weights are drawn in fp32 and then cast, so the same seed gives the same (rounded)
    weights in every ``dtype``. ``attn_implementation`` defaults to ``"sdpa"``, except for
    Gemma 2, which HF refuses to run with SDPA (soft-capping) and gets ``"eager"``. Every
    architecture traces under ``torch.compile(fullgraph=True)`` on CPU with its default.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if hidden % NUM_HEADS:
        raise ValueError(f"hidden={hidden} must be divisible by {NUM_HEADS} heads")
    config = _config(arch, num_layers=num_layers, hidden=hidden, vocab=vocab)
    if head_dim is not None:
        if arch in ("gpt2", "gpt_neox", "gpt_neox_seq", "phi3"):
            raise ValueError(f"{arch} derives its head_dim from the hidden size")
        config.head_dim = head_dim
    if attn_implementation is None:
        attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG stream
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to(dtype)
    model.eval()
    return model


def arch_of(model: nn.Module) -> str:
    """The ``ARCHS`` key of a model built by ``make_model`` (read from its config)."""
    model_type = model.config.model_type
    if model_type == "gpt_neox":
        return "gpt_neox" if model.config.use_parallel_residual else "gpt_neox_seq"
    if model_type not in ARCHS:
        raise ValueError(f"model_type {model_type!r} is not in the test table {ARCHS}")
    return model_type


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (``d_model``)."""
    return int(model.config.hidden_size)


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer ModuleList (``transformer.h`` / ``gpt_neox.layers`` / ``model.layers``)."""
    arch = arch_of(model)
    if arch == "gpt2":
        return model.transformer.h
    if arch in ("gpt_neox", "gpt_neox_seq"):
        return model.gpt_neox.layers
    return model.model.layers


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer ``layer``: its input is ``resid_pre``, its output (or ``[0]``) ``resid_post``."""
    return decoder_layers(model)[layer]


# Per arch: (attention-branch module, MLP-branch module) attribute names on the decoder
# layer. Each module's OUTPUT (or its [0], for attention modules that return a tuple) is
# exactly the tensor that the layer adds into the residual stream.
_BRANCHES: dict[str, tuple[str, str]] = {
    "gpt2": ("attn", "mlp"),  # attn returns (out, weights)
    "llama": ("self_attn", "mlp"),  # self_attn returns (out, weights)
    "mistral": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    # Gemma 2 normalises each branch after it and before the add: attn_out/mlp_out are the
    # post-branch norm outputs. (Its "post_attention_layernorm" is that post-branch norm; the
    # pre-MLP norm is "pre_feedforward_layernorm".)
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    # GPT-NeoX and Phi-3 pass each branch through a residual dropout right before the add;
    # it is the identity in eval mode, but it is the last module the branch goes through.
    "gpt_neox": ("post_attention_dropout", "post_mlp_dropout"),
    "gpt_neox_seq": ("post_attention_dropout", "post_mlp_dropout"),
    "phi3": ("resid_attn_dropout", "resid_mlp_dropout"),
}


def attn_branch_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output (or ``[0]``) is ``attn_out`` of ``layer``: what attention adds to the residual."""
    return getattr(layer_module(model, layer), _BRANCHES[arch_of(model)][0])


def mlp_branch_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is ``mlp_out`` of ``layer``: what the MLP adds to the residual."""
    return getattr(layer_module(model, layer), _BRANCHES[arch_of(model)][1])


# Per arch: the attention's output projection, as a path below the decoder layer. Its INPUT
# is attn.hook_z (the heads concatenated).
_OUT_PROJECTIONS: dict[str, str] = {
    "gpt2": "attn.c_proj",
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "gemma2": "self_attn.o_proj",
    "gpt_neox": "attention.dense",
    "gpt_neox_seq": "attention.dense",
    "phi3": "self_attn.o_proj",
}


def attn_out_projection(model: nn.Module, layer: int) -> nn.Module:
    """The module whose input is ``attn.hook_z`` of ``layer``."""
    return layer_module(model, layer).get_submodule(_OUT_PROJECTIONS[arch_of(model)])


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """The MLP itself (every arch here calls it ``mlp``): its input is ``hook_mlp_in``."""
    return layer_module(model, layer).mlp


def has_resid_mid(arch_or_model: str | nn.Module) -> bool:
    """Whether the architecture has a ``resid_mid`` (False for parallel attention + MLP)."""
    arch = arch_or_model if isinstance(arch_or_model, str) else arch_of(arch_or_model)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    return arch != "gpt_neox"


def site_names(model: nn.Module) -> list[str]:
    """Every TransformerLens site name this model exposes, in forward order."""
    kinds = [
        "hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out",
        "hook_resid_post",
    ]
    if not has_resid_mid(model):
        kinds.remove("hook_resid_mid")
    return [f"blocks.{layer}.{kind}" for layer in range(num_layers(model)) for kind in kinds]
