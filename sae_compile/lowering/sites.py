"""Sites: the TransformerLens hook names we steer, and where an HF decoder keeps its layers.

A *site* is a TransformerLens hook name (``blocks.{L}.hook_resid_post`` ...). Finding its
tensor needs two things, both read from the model rather than from per-architecture tables:
the module tree, here (the decoder layers, and in each layer which children are the
attention and MLP branches), and the Dynamo FX graph (``graph_sites``).
"""

from __future__ import annotations

import enum
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn


class SiteKind(enum.IntEnum):
    """Hook kinds, valued in forward order within a layer."""

    RESID_PRE = 0
    ATTN_Z = 1
    ATTN_OUT = 2
    RESID_MID = 3
    MLP_IN = 4
    MLP_OUT = 5
    RESID_POST = 6

    @property
    def hook(self) -> str:
        """The TransformerLens hook name within ``blocks.{L}``."""
        return "attn.hook_z" if self is SiteKind.ATTN_Z else "hook_" + self.name.lower()

    @property
    def on_residual_stream(self) -> bool:
        """Whether the site's tensor is the residual stream or a branch's contribution to it
        (``hidden_size`` wide), rather than a tensor inside a branch."""
        return self not in (SiteKind.ATTN_Z, SiteKind.MLP_IN)


@dataclass(frozen=True, order=True)
class Site:
    """One steerable tensor: ``kind`` in decoder layer ``layer``. Orders in forward order."""

    layer: int
    kind: SiteKind

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind.hook}"

    @classmethod
    def parse(cls, name: str) -> Site | None:
        """The site a TransformerLens hook name ``blocks.{L}.{hook}`` names (``None``: not one).

        ``blocks.{L}.ln2.hook_normalized`` (TransformerLens's normalised MLP input) means
        ``hook_mlp_in``, which here *is* the normalised MLP input; TransformerLens's own
        ``hook_mlp_in`` is a copy of resid_mid taken before the norm.
        """
        match = _BLOCK_HOOK.match(name)
        kind = None if match is None else _HOOKS.get(match.group(2))
        return None if kind is None else cls(int(match.group(1)), kind)


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HOOKS = {kind.hook: kind for kind in SiteKind} | {"ln2.hook_normalized": SiteKind.MLP_IN}
# Name heuristics for the branch children (see ``_branch_children``): HF has no common
# base class or attribute name for a layer's attention and MLP modules.
_ATTENTION_NAMES = ("attention", "attn")
_MLP_NAMES = ("mlp", "feedforward", "feed_forward", "ffn", "moe", "experts")


@dataclass(frozen=True)
class SiteNode:
    """Where a site lives in one graph: the node computing it, and which of its users
    read the site (``None``: all of them). resid_pre is read only by its own layer;
    other users of the same value (say, a collected ``hidden_states`` output) keep
    seeing the unsteered value, as a forward pre-hook would leave them.

    ``stream_like`` is set where the site's tensor holds the stream's tokens flattened to
    ``[B * S, D]`` (OPT runs its MLP on that reshape): a ``[B, S, D]`` node of the same layer,
    whose shape the op sees the site's tensor in, since steering routes by batch row and token.
    ``sequence_first`` is set where the model keeps its stream as ``[S, B, D]`` (XLNet): the op
    sees it transposed."""

    node: fx.Node
    consumers: frozenset[fx.Node] | None = None
    stream_like: fx.Node | None = None
    sequence_first: bool = False

    def stream_value(self) -> torch.Tensor:
        """The site's example value as the op sees it, ``[B, S, D]``."""
        like = self.node if self.stream_like is None else self.stream_like
        value = like.meta["example_value"]
        return value.transpose(0, 1) if self.sequence_first else value


@dataclass(frozen=True)
class DecoderLayout:
    """What the module tree says: the decoder layers and their attention/MLP children; and
    what the discovery trace adds, whether the residual stream is ``[S, B, D]``."""

    layers: tuple[nn.Module, ...]
    layer_paths: tuple[str, ...]
    attn_paths: tuple[str | None, ...]
    mlp_paths: tuple[str | None, ...]
    hidden_size: int
    sequence_first: bool = False

    def resolve(self, name: str) -> Site:
        """The site a user-facing name means: a hook name, or an HF module path alias.

        ``<layer path>`` means resid_post, ``<layer path>.<attn child>`` attn_out and
        ``<layer path>.<mlp child>`` mlp_out. Raises ValueError for anything else.
        """
        site = Site.parse(name)
        if site is not None and site.layer < len(self.layers):
            return site
        for layer, path in enumerate(self.layer_paths):
            if name == path:
                return Site(layer, SiteKind.RESID_POST)
            if name == self.attn_paths[layer]:
                return Site(layer, SiteKind.ATTN_OUT)
            if name == self.mlp_paths[layer]:
                return Site(layer, SiteKind.MLP_OUT)
        raise ValueError(f"Unknown site {name!r}.")


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Find the decoder layers of an HF causal LM from its module tree.

    The layer stacks are found by ``layer_stacks``; ``blocks.L`` counts their layers in order.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings()); "
            "sae_compile needs an HF decoder language model to find its hidden size."
        )
    stacks = layer_stacks(model)
    layers = tuple(layer for _, stack in stacks for layer in stack)
    layer_paths = tuple(f"{path}.{i}" for path, stack in stacks for i in range(len(stack)))
    branches = [_branch_children(path, layer) for path, layer in zip(layer_paths, layers, strict=True)]
    attn_paths = tuple(attn for attn, _ in branches)
    mlp_paths = tuple(mlp for _, mlp in branches)
    return DecoderLayout(layers, layer_paths, attn_paths, mlp_paths, embeddings.embedding_dim)


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ``ModuleList`` of a model's one stack of decoder layers (see
    ``layer_stacks``); ValueError for a model with several."""
    stacks = layer_stacks(model)
    if len(stacks) > 1:
        raise ValueError(f"{type(model).__name__} has {len(stacks)} decoder stacks ({', '.join(path for path, _ in stacks)}); expected one.")
    return stacks[0]


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The paths and ``ModuleList``s of the decoder layers, looked for under the text decoder
    (``model.get_decoder()``: a multimodal wrapper's vision tower has layers too).

    HF declares the decoder-layer classes in ``_no_split_modules``, and the text config counts
    them in ``num_hidden_layers``; a ``ModuleList`` that both, then one, then neither (its
    blocks all of one class) vouch for, in that order, holding the most parameters. Hybrid
    stacks mix block classes; LongCat-Flash counts two sublayers per layer. Where the winning
    ``ModuleList``s include twins, stacks of the same number of the same blocks (HRM's H and L
    stacks; its config counts loop slots), every twin is a stack, in module-tree order. A model
    that no ``ModuleList`` fits is an error rather than a guess.
    """
    lists = [(path, m) for path, m in _named_under_decoder(model) if isinstance(m, nn.ModuleList) and len(m) > 0]
    declared = set(getattr(type(model), "_no_split_modules", None) or ())
    expected = _layer_count(model)

    def is_declared(blocks: nn.ModuleList) -> bool:
        return bool(declared) and all(type(block).__name__ in declared for block in blocks)

    def is_counted(blocks: nn.ModuleList) -> bool:
        return len(blocks) == expected

    tiers = (
        [(path, m) for path, m in lists if is_declared(m) and is_counted(m)],
        [(path, m) for path, m in lists if is_declared(m) or is_counted(m)],
        [(path, m) for path, m in lists if expected is None and len({type(block) for block in m}) == 1],
    )
    for candidates in tiers:
        if candidates:
            return _twins(candidates) or [max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))]
    found = ", ".join(f"{path!r} ({len(m)})" for path, m in lists) or "none"
    raise ValueError(
        f"{type(model).__name__} has no ModuleList of its declared decoder layers "
        f"({', '.join(sorted(declared)) or 'none declared'}) or of config.num_hidden_layers = {expected} "
        f"blocks (ModuleLists: {found}); cannot find steering sites."
    )


def _twins(candidates: list[tuple[str, nn.ModuleList]]) -> list[tuple[str, nn.ModuleList]]:
    """The candidate stacks that share their length and block classes with another candidate."""
    def kind(blocks: nn.ModuleList) -> tuple[int, frozenset[str]]:
        return len(blocks), frozenset(type(block).__name__ for block in blocks)

    kinds = Counter(kind(m) for _, m in candidates)
    return [(path, m) for path, m in candidates if kinds[kind(m)] > 1]


def _named_under_decoder(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()``, restricted to ``model.get_decoder()``'s subtree on a model with
    a composite config (a multimodal wrapper). A text model's ``get_decoder()`` is a best-effort
    lookup that can return its LM head (ModernBERT's ``decoder``), so it is not asked."""
    named = list(model.named_modules())
    config = getattr(model, "config", None)
    composite = hasattr(config, "get_text_config") and config.get_text_config() is not config
    decoder = model.get_decoder() if composite and hasattr(model, "get_decoder") else None
    prefix = next((path for path, m in named if m is decoder), "")
    if not prefix:
        return named
    return [(path, m) for path, m in named if path == prefix or path.startswith(prefix + ".")]


def _layer_count(model: nn.Module) -> int | None:
    """``num_hidden_layers`` of the model's text config (a composite config keeps it there)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _branch_children(layer_path: str, layer: nn.Module) -> tuple[str | None, str | None]:
    """The paths of a layer's (attention, MLP) children, ``None`` where there is none.

    A child is matched on its class name first (``LlamaAttention``, ``GPT2MLP``), then on
    its attribute name, and is never a norm or dropout wrapper. Models name these modules
    freely, so a name heuristic is unavoidable here. ``graph_sites`` names branch sites
    in forward order and only where the labels do not contradict it, so a wrong match
    loses those sites rather than swapping them.
    """
    children = [
        (name, _own_class_name(child, layer))
        for name, child in layer.named_children()
        if not any(skip in type(child).__name__.lower() for skip in ("norm", "dropout"))
    ]
    attn = _first_match(children, _ATTENTION_NAMES)
    # MoE models put the MLP words into attention class names too (``OlmoeAttention``
    # contains "moe"): whatever reads as attention is never the MLP.
    mlp_candidates = [child for child in children if not any(_matches(label, _ATTENTION_NAMES) for label in child)]
    mlp = _first_match(mlp_candidates, _MLP_NAMES)
    return (
        None if attn is None else f"{layer_path}.{attn}",
        None if mlp is None else f"{layer_path}.{mlp}",
    )


def _own_class_name(child: nn.Module, layer: nn.Module) -> str:
    """The child's class name, lowercase, without the model-family prefix it shares with the
    layer's class: ``Lfm2MoeShortConv`` is a convolution, though ``Lfm2Moe`` says "moe"."""
    name, family = type(child).__name__, type(layer).__name__
    shared = len(os.path.commonprefix([name, family]))
    return name[shared:].lower()


def _first_match(children: list[tuple[str, str]], words: tuple[str, ...]) -> str | None:
    """The attribute name of the first ``(attribute, class)`` child whose class name, or
    failing any such child, whose attribute name contains one of ``words``."""
    for label_index in (1, 0):
        for child in children:
            if _matches(child[label_index], words):
                return child[0]
    return None


def _matches(label: str, words: tuple[str, ...]) -> bool:
    return any(word in label.lower() for word in words)


def why_missing(site: Site, available: Iterable[Site]) -> str:
    """Why the model has no tensor for ``site``, read from the sites its layer does have."""
    kinds = {s.kind for s in available if s.layer == site.layer}
    layer = f"layer {site.layer}"
    if not kinds:
        return (
            f"{layer} exposes no sites: its residual stream is not one [batch, seq, hidden] tensor aligned with "
            "the input tokens (several streams, as in AltUp or hyper-connections, or extra positions, as CPM-Ant's "
            "prompt), or, with fullgraph=False, a graph break inside the layer leaves no graph piece holding all of it"
        )
    if kinds <= {SiteKind.RESID_PRE, SiteKind.RESID_POST}:
        return (
            f"{layer}'s output is not its input plus branch outputs (its residual stream is restarted or "
            "mixed with other streams), so only resid_pre and resid_post exist there"
        )
    if site.kind in (SiteKind.ATTN_OUT, SiteKind.ATTN_Z, SiteKind.RESID_MID) and SiteKind.ATTN_OUT not in kinds:
        return f"{layer} adds one branch, its MLP, and no token mixer; its output is mlp_out"
    if site.kind in (SiteKind.RESID_MID, SiteKind.MLP_OUT, SiteKind.MLP_IN) and SiteKind.MLP_OUT not in kinds:
        return f"{layer} adds one branch (a token mixer such as Mamba, or attention alone) and no MLP; its output is attn_out"
    if site.kind is SiteKind.RESID_MID:
        return f"{layer} adds attention and MLP to the residual stream in parallel, so there is no resid_mid between them"
    if site.kind is SiteKind.ATTN_Z:
        return f"{layer}'s token mixer has no attention output projection reading the concatenated heads"
    if site.kind is SiteKind.MLP_IN:
        return f"{layer}'s MLP is not one module reading one input (its projections sit on the layer itself)"
    return f"{layer} has no {site.kind.hook} tensor"
