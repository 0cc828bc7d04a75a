"""Tiny random models for every text decoder-only entry of transformers' causal-LM mapping.

The architecture sweep (``tests/test_architecture_sweep.py``, ``benchmarks/arch_table.py``)
builds each entry of the installed transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` from
its config class, offline, with 2 layers, a 64-wide residual stream, a vocabulary of 256,
a fixed seed, eval mode and every dropout 0. Sizes are set generically, through the names
and aliases configs use for them (``TINY`` / ``ALIASES``); a short per-family table
(``FAMILY_OVERRIDES``) covers only what the generic path cannot build.

Entries that are not text decoder-only models are skipped with a reason (``skip_reason``):
encoder-decoder models (their causal LM is the decoder half), encoder families that become
causal only with ``is_decoder=True``, and composite (multimodal or multi-part) configs. A few
multimodal wrappers are built on purpose (``WRAPPERS``), to see whether their text decoder
steers; their vision/audio towers get one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

SEED = 0
NUM_LAYERS = 2
HIDDEN = 64
VOCAB = 256
MAX_POSITIONS = 64
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

#: The generic tiny sizes, by the canonical config name.
TINY: dict[str, int] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 2 * HIDDEN,
    "head_dim": HIDDEN // 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
}

#: Other names configs give the same sizes (older models and their own conventions).
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("n_embd", "n_embed", "d_model", "dim", "hidden_dim", "model_dim", "embed_dim", "dim_model"),
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers", "num_decoder_layers"),
    "num_attention_heads": ("n_head", "n_heads", "num_heads", "decoder_attention_heads"),
    "num_key_value_heads": ("num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "dim_ff", "inner_hidden_size"),
    "max_position_embeddings": ("n_positions", "n_ctx", "max_seq_len", "seq_length", "max_sequence_length"),
}

#: Sizes that MoE, MLA and state-space configs add; small values that keep their invariants
#: (top-k <= experts, groups dividing experts).
EXTRA_SIZES: dict[str, int] = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "moe_top_k": 2,
    "n_group": 1, "topk_group": 1, "num_shared_experts": 1, "n_shared_experts": 1,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    # MLA (DeepSeek V2/V3 and kin) rotates qk_rope_head_dim channels with head_dim-sized tables.
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "rotary_dim": 8,  # GPT-J / CodeGen: at most head_dim
    "first_k_dense_replace": 1,  # DeepSeek-style: layer 0 dense, layer 1 MoE
    # Gemma 3n / 4 per-layer embeddings: a [vocab, layers * width] table, 262144 rows by default.
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    "num_kv_shared_layers": 0,  # Gemma 3n / 4 share the KV cache of the last layers; 2 layers have none to share
    # Gated DeltaNet (Qwen3-Next and kin) linear-attention heads.
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
}

#: Scalar settings whose default would hide a bug: Granite's residual_multiplier is 1.0 by
#: default, where a site taken before the branch scaling is indistinguishable from one after it.
EXTRA_SCALARS: dict[str, float] = {"residual_multiplier": 0.5}

#: Per-family overrides, only where the generic path cannot build the model, or would give a
#: hybrid stack only one kind of layer. Each says why. ``"<type>.<sub-config>"`` keys apply to
#: that sub-config of a composite config.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # Its default config has no rope parameters, but the model reads one set per layer type.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # modeling_dbrx reads attn_config.rope_theta, which DbrxAttentionConfig does not define.
    "dbrx.attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0},  # and clamps with clip_qkv unguarded
    # Global (full-attention) layers get a head_dim of their own, 512 by default (a constructor-only keyword).
    "gemma4_text": {"global_head_dim": 32},
    "gemma4_unified_text": {"global_head_dim": 32},
    "gemma4.text_config": {"global_head_dim": 32},
    # attention_types is (pattern, repeats); the default repeats a 2-layer pattern 12 times.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # Its default config has no layer_types, which the model reads; num_dense_layers=1 keeps one MoE layer.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # num_heads * head_dim must equal expand * hidden_size (2 * 64), and n_groups divide num_heads.
    "mamba2": {"head_dim": 32, "n_groups": 1},
    # Its indexed-attention layers need the QSA indexer sizes, which the default config leaves unset.
    "qwen4_exp_text": {
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4, "indexer_compress_ratio": 2,
    },
    # M-RoPE splits the rotary half (head_dim / 2 = 8 channels) into time/height/width; its default sums to 64.
    "qwen2_vl.text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    # Layer-kind patterns that repeat with a period longer than 2 layers: one layer of each kind here.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # Hybrid layers share one attention block, tied across them: a single hybrid layer has nothing to tie to.
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},
    "zaya": {"num_experts_per_tok": 1},  # the only value ZAYA supports
}

#: Multimodal wrappers built on purpose: name in the sweep -> (wrapper config's model_type, model class).
WRAPPERS: dict[str, tuple[str, str]] = {
    "gemma3 (wrapper)": ("gemma3", "Gemma3ForConditionalGeneration"),
    "gemma4 (wrapper)": ("gemma4", "Gemma4ForConditionalGeneration"),
    "llama4 (wrapper)": ("llama4", "Llama4ForConditionalGeneration"),
    "qwen2_vl (wrapper)": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
}

# Sub-configs that only group a text model's own settings (DBRX, MPT): not a composite model.
_GROUPING_SUBCONFIGS = frozenset({"attn_config", "ffn_config"})

_SIZE_NAMES: dict[str, int] = {alias: TINY[key] for key, names in ALIASES.items() for alias in names} | TINY | EXTRA_SIZES
_TOKEN_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


@dataclass(frozen=True)
class Arch:
    """One sweep entry: the name it is reported under, its config's model_type and the model class."""

    name: str
    model_type: str
    class_name: str

    @property
    def is_wrapper(self) -> bool:
        """A multimodal wrapper whose text decoder the sweep steers."""
        return self.name in WRAPPERS


def causal_lm_entries() -> dict[str, str]:
    """``model_type -> class name`` of the installed transformers' causal-LM mapping."""
    return dict(sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def skip_reason(model_type: str) -> str | None:
    """Why ``model_type`` is not a text decoder-only model (None: it is one), read from its default config."""
    if model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "encoder-decoder: its causal LM is the decoder half"
    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "is_encoder_decoder", False) is True:
        return "encoder-decoder: its causal LM is the decoder half"
    composite = set(getattr(config_class, "sub_configs", {}) or {}) - _GROUPING_SUBCONFIGS
    if composite:
        return f"composite config (sub-configs {', '.join(sorted(composite))}): multimodal or multi-part"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder family (it has a masked-LM head): causal only with is_decoder=True"
    if {"is_decoder", "add_cross_attention"} <= set(_settable(config_class)):
        # BERT-style layers: bidirectional unless is_decoder, built as an encoder-decoder's decoder half.
        return "encoder family: causal only with is_decoder=True (the decoder of an encoder-decoder)"
    return None


def sweep_archs() -> tuple[list[Arch], dict[str, str]]:
    """The text decoder-only entries plus ``WRAPPERS``, and ``{model_type: reason}`` for the skipped ones."""
    archs, skipped = [], {}
    for model_type, class_name in causal_lm_entries().items():
        reason = skip_reason(model_type)
        if reason is None:
            archs.append(Arch(model_type, model_type, class_name))
        else:
            skipped[model_type] = reason
    for name, (model_type, class_name) in WRAPPERS.items():
        archs.append(Arch(name, model_type, class_name))
    return archs, skipped


def tiny_overrides(config_class: type, default: transformers.PretrainedConfig) -> dict[str, Any]:
    """Constructor keywords that make ``config_class`` tiny, from the names it actually has.

    Sizes go through ``TINY``/``ALIASES``/``EXTRA_SIZES``, every float ``*drop*`` field becomes
    0, special token ids move inside the vocabulary, and per-layer lists are cut to
    ``NUM_LAYERS`` entries (``_per_layer``). Values are read from the default's storage, not
    through getattr, which heterogeneous configs (Gemma 4) refuse for per-layer fields.
    """
    storage = _settable(config_class)
    stored = vars(default)
    out = {name: new for name, target in storage.items() if (new := _tiny_value(name, stored.get(target))) is not None}
    if "kv_lora_rank" in storage and "num_key_value_heads" in out:
        out["num_key_value_heads"] = TINY["num_attention_heads"]  # MLA gives every head its own key
    default_layers = stored.get(storage.get("num_hidden_layers", "num_hidden_layers"))
    for name in storage.keys() & stored.keys():  # the stored name only: an alias would pass the list twice
        value = stored[name]
        if isinstance(value, (list, tuple)) and isinstance(default_layers, int) and len(value) == default_layers > NUM_LAYERS:
            out[name] = _per_layer(list(value))
    return out


def _tiny_value(name: str, value: Any) -> Any:
    """The tiny value of one scalar config field, or None to keep the default."""
    # None is a size left to be derived (head_dim, n_inner) or a count still to be set (dots1's experts).
    if name in _SIZE_NAMES and (value is None or isinstance(value, int)) and not isinstance(value, bool):
        return _SIZE_NAMES[name]
    if "drop" in name and isinstance(value, float):
        return 0.0
    if name in EXTRA_SCALARS and isinstance(value, (int, float)):
        return EXTRA_SCALARS[name]
    if name in _TOKEN_IDS and isinstance(value, int):
        return _TOKEN_IDS[name]
    return None


def _settable(config_class: type) -> dict[str, str]:
    """``keyword -> stored field`` for every keyword the config class takes (its dataclass fields
    and attribute_map aliases), without derived read-only properties (Bamba's layers_block_type)."""
    fields = {name: name for name in getattr(config_class, "__dataclass_fields__", {})}
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    return {
        name: target for name, target in (fields | aliases).items()
        if not any(isinstance(getattr(config_class, n, None), property) for n in (name, target))
    }


def _per_layer(values: list[Any]) -> list[Any]:
    """``NUM_LAYERS`` entries of a per-layer list: the first, then the first that differs from it
    (so a hybrid or sliding/global stack keeps one layer of each of its first two kinds)."""
    first = values[0]
    other = next((v for v in values[1:] if v != first), first)
    return [first, other][:NUM_LAYERS]


def tiny_config(arch: Arch) -> transformers.PretrainedConfig:
    """The tiny config of ``arch``: ``tiny_overrides`` on it and on each of its sub-configs
    (a wrapper's text and vision configs), then ``FAMILY_OVERRIDES``."""
    config_class = CONFIG_MAPPING[arch.model_type]
    default = config_class()
    kwargs = tiny_overrides(config_class, default)
    for key in getattr(config_class, "sub_configs", {}) or {}:
        sub = getattr(default, key, None)
        if isinstance(sub, transformers.PretrainedConfig):
            overrides = tiny_overrides(type(sub), sub) | _tower_overrides(key, type(sub))
            kwargs[key] = type(sub)(**overrides | FAMILY_OVERRIDES.get(f"{arch.model_type}.{key}", {}))
    return config_class(**kwargs | FAMILY_OVERRIDES.get(arch.model_type, {}))


def _tower_overrides(key: str, config_class: type) -> dict[str, int]:
    """One layer for a wrapper's vision/audio tower: in real checkpoints the text decoder is by
    far the larger stack, and a tiny tower as deep as the decoder would not keep that true."""
    if key == "text_config" or key in _GROUPING_SUBCONFIGS:
        return {}
    return {name: 1 for name in ("num_hidden_layers", "depth", "num_layers") if name in _settable(config_class)}


def build_model(arch: Arch) -> nn.Module:
    """``arch``'s tiny random model in eval mode, with eager attention, deterministic in ``SEED``."""
    config = tiny_config(arch)
    model_class = getattr(transformers, arch.class_name)
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG stream
        torch.manual_seed(SEED)
        model = model_class._from_config(config, attn_implementation="eager")
        _fill_zero_matrices(model)
    return model.eval()


def _fill_zero_matrices(model: nn.Module) -> None:
    """Give every weight matrix that init left all zero a small random value. Zero-initialised
    gates (xLSTM's FFN, AFMoE's router) make a branch add nothing, or every expert tie, and
    neither tells a right site from a wrong one."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point() and not param.any():
                param.normal_(0.0, 0.02)


def sample_ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    """Token ids ``[batch, seq]`` in ``[3, VOCAB)``: no pad/bos/eos, and nothing past the vocabulary."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(SEED))


def plain_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` logits of one eager forward without a cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def try_build(arch: Arch) -> tuple[nn.Module | None, str | None]:
    """``(model, None)`` if ``arch`` builds and runs one eager forward, else ``(None, reason)``."""
    try:
        model = build_model(arch)
        plain_logits(model, sample_ids())
    except Exception as e:  # noqa: BLE001 - the sweep records why an architecture cannot be built
        return None, describe(e)
    return model, None


def describe(error: BaseException) -> str:
    """The exception class and the first line of its message."""
    lines = str(error).strip().splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    return f"{type(error).__name__}: {first[:200]}"

