"""The overhead benchmark's models, SAEs and hand-written baselines.

Models are random Llamas of a preset shape (``MODELS``); SAEs are random, of a preset width
and activation (``SAES``), placed at one layer's ``hook_resid_post``. Random weights are
enough: the benchmark measures time, which depends on the shapes.

The baselines do what a user without sae_compile would write for the benchmark's clamp
(set features ``FEATURES`` to ``CLAMP_VALUE`` and keep the SAE's error term,
``x' = x + (f' - f) @ W_dec``):

- the dense edit, as SAELens users write it: encode every feature, clamp, decode twice;
- the sparse edit, as a careful user writes it: only the clamped features' encoder columns
  and decoder rows (a TopK SAE still needs every pre-activation to know its k-th largest);
- either one in a forward hook, eager or compiled, or inside an nnsight trace.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

import sae_compile as sc
from sae_compile.lowering.backend import fresh_entry_point

FEATURES = (11, 222, 333, 444)
CLAMP_VALUE = 5.0
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelPreset:
    """A random Llama's shape, the layer whose output carries the SAE, and its default SAE."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layer: int
    sae: str
    head_dim: int | None = None  # None: hidden / heads
    act: str = "silu"
    tied: bool = False

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def config(self) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(
            hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim or self.hidden // self.heads,
            intermediate_size=self.intermediate, vocab_size=self.vocab, hidden_act=self.act,
            tie_word_embeddings=self.tied, max_position_embeddings=1024,
        )


@dataclass(frozen=True)
class SAEPreset:
    """A random SAE's width and activation (``k`` for TopK)."""

    width: int
    activation: str
    k: int | None = None


MODELS = {
    "small": ModelPreset(128, 6, 8, 8, 344, 1024, layer=4, sae="jumprelu1k"),
    "default": ModelPreset(512, 8, 8, 8, 1376, 8192, layer=4, sae="jumprelu8k"),
    # Gemma-2-2B's matmul shapes (8 query heads and 4 KV heads of 256, a GELU MLP of 9216, a
    # tied 256k vocabulary) in a Llama, which every sae_compile path supports; meant for a GPU.
    "gemma2-2b": ModelPreset(2304, 26, 8, 4, 9216, 256_000, layer=12, sae="jumprelu16k", head_dim=256,
                             act="gelu_pytorch_tanh", tied=True),
}
SAES = {
    "jumprelu1k": SAEPreset(1024, "jumprelu"),
    "jumprelu8k": SAEPreset(8192, "jumprelu"),
    "jumprelu16k": SAEPreset(16_384, "jumprelu"),
    "topk65k": SAEPreset(65_536, "topk", k=64),
}


def build_model(preset: ModelPreset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The preset's random Llama, initialised on ``device`` (seed 0) and cast to ``dtype``."""
    torch.manual_seed(0)
    with device:  # initialise in place: a 2B model's fp32 copy in host memory would be 10 GB
        model = transformers.LlamaForCausalLM(preset.config())
    return model.to(dtype=dtype).eval()


def sae_tensors(preset: SAEPreset, hidden: int) -> dict[str, torch.Tensor | None]:
    """The random SAE's tensors (seed 1; made on the current default device, so ``meta`` works)."""
    g = torch.Generator().manual_seed(1) if torch.empty(0).device.type == "cpu" else None
    w_enc = torch.randn(hidden, preset.width, generator=g) / hidden**0.5  # [D, W]
    w_dec = torch.randn(preset.width, hidden, generator=g) / hidden**0.5  # [W, D]
    threshold = 0.1 * torch.rand(preset.width, generator=g) if preset.activation == "jumprelu" else None  # [W]
    return {"W_enc": w_enc, "W_dec": w_dec, "b_enc": torch.zeros(preset.width), "b_dec": torch.zeros(hidden),
            "threshold": threshold}


def build_sae(preset: SAEPreset, hidden: int, site: str, device: torch.device, dtype: torch.dtype) -> sc.SAE:
    """The preset's random SAE at ``site``."""
    t = sae_tensors(preset, hidden)
    sae = sc.SAE(t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], activation=preset.activation,
                 threshold=t["threshold"], k=preset.k, hook_name=site)
    return sae.to(device=device, dtype=dtype)


def dry_run(model: ModelPreset, sae: SAEPreset, dtype: torch.dtype) -> dict[str, object]:
    """The shapes and sizes a run would allocate, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(model.config())
        tensors = {name: t for name, t in sae_tensors(sae, model.hidden).items() if t is not None}
    params = sum(p.numel() for p in llama.parameters())
    attn = llama.model.layers[0].self_attn
    return {
        "site": model.site, "model_params": params, "model_gb": params * dtype.itemsize / 1e9,
        "q_proj": tuple(attn.q_proj.weight.shape), "k_proj": tuple(attn.k_proj.weight.shape),
        "mlp.up_proj": tuple(llama.model.layers[0].mlp.up_proj.weight.shape),
        "lm_head": tuple(llama.lm_head.weight.shape), "tied": llama.lm_head.weight is llama.model.embed_tokens.weight,
        "sae": {name: tuple(t.shape) for name, t in tensors.items()}, "sae_activation": sae.activation, "sae_k": sae.k,
        "sae_gb": sum(t.numel() for t in tensors.values()) * dtype.itemsize / 1e9,
    }


def dense_clamp(sae: sc.SAE) -> Edit:
    """The clamp the SAELens way: encode every feature, set the clamped ones, decode, add the error."""
    features = list(FEATURES)

    def edit(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x)  # [B, S, W]
        error = x - sae.decode(f)  # [B, S, D]
        f[..., features] = CLAMP_VALUE
        return sae.decode(f) + error

    return edit


def sparse_clamp(sae: sc.SAE) -> Edit:
    """The same clamp touching only the clamped features: ``x + (v - f_F(x)) @ W_dec[F]``."""
    if sae.apply_b_dec_to_input:
        raise ValueError("sparse_clamp is written for the benchmark's SAEs, which have apply_b_dec_to_input=False.")
    index = torch.tensor(FEATURES, device=sae.W_dec.device)
    w_dec = sae.W_dec[index]  # [F, D], sliced once, as a careful user would
    acts = _clamped_acts(sae, index)

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x + (CLAMP_VALUE - acts(x)) @ w_dec  # [B, S, D]

    return edit


def _clamped_acts(sae: sc.SAE, index: torch.Tensor) -> Edit:
    """``x [B, S, D] -> [B, S, F]``: the activations of the features in ``index``."""
    if sae.activation == "topk":

        def topk_acts(x: torch.Tensor) -> torch.Tensor:
            pre = torch.relu(x @ sae.W_enc + sae.b_enc)  # [B, S, W]: membership needs the k-th largest
            kth = pre.topk(sae.k, dim=-1).values[..., -1:]  # [B, S, 1]
            mine = pre[..., index]  # [B, S, F]
            return mine * (mine >= kth)

        return topk_acts
    w_enc, b_enc = sae.W_enc[:, index].contiguous(), sae.b_enc[index]  # [D, F], [F]
    threshold = sae.threshold[index] if sae.activation == "jumprelu" else torch.zeros_like(b_enc)  # [F]

    def column_acts(x: torch.Tensor) -> torch.Tensor:
        pre = x @ w_enc + b_enc  # [B, S, F]
        return torch.relu(pre) * (pre > threshold)  # JumpReLU as SAELens has it (a 0/1 mask, no where)

    return column_acts


def on_hidden(output: torch.Tensor | tuple, edit: Edit) -> torch.Tensor | tuple:
    """A decoder layer's output with ``edit`` applied to its hidden states (a tuple's first item
    in transformers 4, the tensor itself in 5)."""
    if isinstance(output, tuple):
        return (edit(output[0]), *output[1:])
    return edit(output)


def hooked_copy(model: nn.Module, layer: int, edit: Edit) -> nn.Module:
    """A copy of ``model`` whose decoder layer ``layer`` applies ``edit`` in a forward hook.

    A copy, so that the plain and steered configurations never see the hook."""
    hooked = copy.deepcopy(model)
    hooked.model.layers[layer].register_forward_hook(lambda module, args, output: on_hidden(output, edit))
    return hooked


def compile_hooked(model: nn.Module, tag: str, mode: str | None) -> Callable[..., object]:
    """``torch.compile`` of a hooked model, through an entry point with a code object of its own.

    Dynamo keeps its cache per code object, and every instance of a model class shares
    ``forward``'s; by default it does not guard on (empty) module hooks, so a hooked copy
    compiled through ``forward`` could reuse the plain model's entry and skip its hook.
    An entry of its own gives it a cache of its own, so no process-wide
    ``skip_nnmodule_hook_guards=False`` is needed, and no other configuration pays for hook
    guards. ``bench_overhead`` checks that the hook ran.
    """
    return torch.compile(fresh_entry_point(model.forward, f"bench_{tag}"), mode=mode, dynamic=False, fullgraph=True)


def nnsight_available() -> bool:
    return importlib.util.find_spec("nnsight") is not None


def nnsight_clamp(model: nn.Module, layer: int, edit: Edit) -> Callable[..., object]:
    """A forward that runs ``edit`` on layer ``layer``'s output inside an nnsight trace (eager),
    on a copy of ``model`` (nnsight wraps the modules it is given)."""
    from nnsight import NNsight  # a benchmark-only extra: imported only when installed

    traced = NNsight(copy.deepcopy(model))

    def forward(input_ids: torch.Tensor, **kwargs: object) -> object:
        with traced.trace(input_ids, **kwargs):
            site = traced.model.layers[layer]
            site.output = on_hidden(site.output, edit)
            out = traced.output.save()
        return out

    return forward
