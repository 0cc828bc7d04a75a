"""Site discovery: where the residual stream of an HF decoder model lives in an FX graph.

A *site* is a TransformerLens hook name (``blocks.{L}.hook_resid_post`` ...). Finding it
needs two things, both read from the model rather than from per-architecture tables:

- the module tree: the decoder layers (the ``ModuleList`` with one entry per layer) and,
  in each layer, which children are the attention and MLP branches;
- the Dynamo FX graph: every node's ``nn_module_stack`` says which module instances were
  active when it was traced. Its keys are ``str(id(module))``, so we map them through
  module identity and never parse the path strings, whose format changed across torch
  versions.

Within a layer the residual stream is a chain of ``add`` nodes at layer scope, starting
from a value produced outside the layer (resid_pre) and ending at the value the layer
hands on (resid_post). Each non-chain operand of a chain add is a branch contribution,
classified by the branch modules it was computed in: attention (attn_out), MLP (mlp_out),
or both at once (a parallel attention+MLP block, which has no resid_mid).

Two sites sit inside the branches, found from the branch outputs: ``attn.hook_z`` is the
input of the attention's output projection (the heads concatenated, ``[B, S, H * d_head]``),
and ``hook_mlp_in`` the input the MLP module receives (after its pre-MLP norm).
"""

from __future__ import annotations

import enum
import operator
import re
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
_ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add)


@dataclass(frozen=True)
class SiteNode:
    """Where a site lives in one graph: the node computing it, and which of its users
    read the site (``None``: all of them). resid_pre is read only by its own layer;
    other users of the same value (say, a collected ``hidden_states`` output) keep
    seeing the unsteered value, as a forward pre-hook would leave them."""

    node: fx.Node
    consumers: frozenset[fx.Node] | None = None


@dataclass(frozen=True)
class DecoderLayout:
    """What the module tree says: the decoder layers and their attention/MLP children."""

    layers: tuple[nn.Module, ...]
    layer_paths: tuple[str, ...]
    attn_paths: tuple[str | None, ...]
    mlp_paths: tuple[str | None, ...]
    hidden_size: int

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

    The layer stack is the ``ModuleList`` of identically-typed blocks holding the most
    parameters; its length is cross-checked against ``config.num_hidden_layers`` when the
    config has one.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings()); "
            "sae_compile needs an HF decoder language model to find its hidden size."
        )
    stack_path, stack = layer_stack(model)
    layer_paths = tuple(f"{stack_path}.{i}" for i in range(len(stack)))
    branches = [_branch_children(path, layer) for path, layer in zip(layer_paths, stack, strict=True)]
    attn_paths = tuple(attn for attn, _ in branches)
    mlp_paths = tuple(mlp for _, mlp in branches)
    return DecoderLayout(tuple(stack), layer_paths, attn_paths, mlp_paths, embeddings.embedding_dim)


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ``ModuleList`` of the decoder layers: the ``ModuleList`` of identically-typed
    blocks holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers; cannot find steering sites.")
    _, stack_path, stack = best
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and expected != len(stack):
        raise ValueError(
            f"Found {len(stack)} blocks at {stack_path!r} but config.num_hidden_layers is {expected}; "
            "cannot tell which ModuleList holds the decoder layers."
        )
    return stack_path, stack


def _branch_children(layer_path: str, layer: nn.Module) -> tuple[str | None, str | None]:
    """The paths of a layer's (attention, MLP) children, ``None`` where there is none.

    A child is matched on its class name first (``LlamaAttention``, ``GPT2MLP``), then on
    its attribute name, and is never a norm or dropout wrapper. Models name these modules
    freely, so a name heuristic is unavoidable here. ``find_site_nodes`` names branch sites
    only where the graph shows an attention-then-MLP (or parallel) layer, so a wrong match
    loses those sites rather than swapping them.
    """
    children = [
        (name, type(child).__name__.lower())
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


def find_site_nodes(graph: fx.Graph, model: nn.Module, layout: DecoderLayout) -> dict[Site, SiteNode]:
    """Every site this graph exposes, mapped to the FX node that computes its tensor.

    Layers whose residual chain cannot be traced (for example a graph fragment after a
    graph break) expose no sites rather than wrong ones.
    """
    modules = dict(model.named_modules())
    scope_of = {str(id(m)): id(m) for m in modules.values()}
    scopes = {node: _module_ids(node, scope_of) for node in graph.nodes}  # in graph order
    found: dict[Site, SiteNode] = {}
    for layer_idx, layer in enumerate(layout.layers):
        branch_ids = {
            "attn": _subtree_ids(modules, layout.attn_paths[layer_idx]),
            "mlp": _subtree_ids(modules, layout.mlp_paths[layer_idx]),
        }
        sites = _layer_sites(scopes, layer_idx, id(layer), branch_ids, layout.hidden_size)
        projections = _projection_ids(modules, layout.attn_paths[layer_idx])
        found.update(sites | _branch_input_sites(scopes, layer_idx, sites, branch_ids["mlp"], projections))
    return found


def _subtree_ids(modules: dict[str, nn.Module], path: str | None) -> frozenset[int]:
    if path is None:
        return frozenset()
    return frozenset(id(m) for m in modules[path].modules())


def _projection_ids(modules: dict[str, nn.Module], attn_path: str | None) -> frozenset[int]:
    """The attention's weight-matrix leaves (``nn.Linear``, GPT-2's ``Conv1D``): its projections."""
    if attn_path is None:
        return frozenset()
    return frozenset(
        id(m) for m in modules[attn_path].modules()
        if next(m.children(), None) is None and getattr(m, "weight", None) is not None and m.weight.dim() == 2
    )


def _module_ids(node: fx.Node, scope_of: dict[str, int]) -> frozenset[int]:
    stack = node.meta.get("nn_module_stack") or {}
    return frozenset(scope_of[key] for key in stack if key in scope_of)


def _is_activation(node: fx.Node) -> bool:
    """A floating ``[B, S, width]`` tensor."""
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3


def _is_residual_tensor(node: fx.Node, hidden_size: int) -> bool:
    return _is_activation(node) and node.meta["example_value"].shape[-1] == hidden_size


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target == "add"


@dataclass(frozen=True, eq=False)
class _LayerScope:
    """The FX nodes traced inside one decoder layer, with the module scopes of each."""

    nodes: frozenset[fx.Node]  # every node whose module stack holds the layer
    direct: frozenset[fx.Node]  # those in no branch module: where residual adds can sit
    scopes: dict[fx.Node, frozenset[int]]  # node -> ids of the modules active at it
    branch_ids: dict[str, frozenset[int]]  # "attn" / "mlp" -> ids of that branch's subtree


@dataclass(frozen=True)
class _ResidualChain:
    """A layer's residual stream: resid_pre, then one add per branch contribution."""

    resid_pre: fx.Node
    adds: tuple[fx.Node, ...]  # forward order; adds[-1] is resid_post
    contributions: tuple[fx.Node, ...]  # contributions[i]: what adds[i] adds to the stream

    @property
    def stop(self) -> frozenset[fx.Node]:
        """The chain's own nodes: a walk back from a contribution stops at them."""
        return frozenset(self.adds) | {self.resid_pre}


def _layer_sites(
    scopes: dict[fx.Node, frozenset[int]],
    layer_idx: int,
    layer_id: int,
    branch_ids: dict[str, frozenset[int]],
    hidden_size: int,
) -> dict[Site, SiteNode]:
    """The sites of decoder layer ``layer_idx``, or none if its residual chain cannot be traced."""
    layer = _layer_scope(scopes, layer_id, branch_ids)
    resid_post = _resid_post(layer, hidden_size)
    if resid_post is None:
        return {}
    chain = _residual_chain(resid_post, layer)
    if chain is None or not _is_residual_tensor(chain.resid_pre, hidden_size):
        return {}
    labels = tuple(_branch_label(c, layer, chain.stop) for c in chain.contributions)
    return _site_map(layer_idx, layer, chain, labels)


def _layer_scope(
    scopes: dict[fx.Node, frozenset[int]], layer_id: int, branch_ids: dict[str, frozenset[int]]
) -> _LayerScope:
    nodes = frozenset(node for node, ids in scopes.items() if layer_id in ids)
    in_branch = frozenset().union(*branch_ids.values())
    direct = frozenset(node for node in nodes if not scopes[node] & in_branch)
    return _LayerScope(nodes, direct, scopes, branch_ids)


def _resid_post(layer: _LayerScope, hidden_size: int) -> fx.Node | None:
    """The one residual-shaped value the layer hands on, or None if there is not exactly one."""
    escaping = [
        node for node in layer.nodes
        if _is_residual_tensor(node, hidden_size) and any(user not in layer.nodes for user in node.users)
    ]
    return escaping[0] if len(escaping) == 1 else None


def _residual_chain(resid_post: fx.Node, layer: _LayerScope) -> _ResidualChain | None:
    """Walk back from resid_post through residual adds to the value the layer received.

    None if a step on the way is not a layer-scope add with exactly one residual operand.
    """
    adds: list[fx.Node] = []
    contributions: list[fx.Node] = []
    node = resid_post
    while node in layer.nodes:
        step = _chain_step(node, layer)
        if step is None:
            return None
        adds.append(node)
        node, contribution = step
        contributions.append(contribution)
    return _ResidualChain(node, tuple(reversed(adds)), tuple(reversed(contributions)))


def _chain_step(node: fx.Node, layer: _LayerScope) -> tuple[fx.Node, fx.Node] | None:
    """``(residual operand, contribution)`` of a residual add, or None if ``node`` is not one."""
    if not (_is_add(node) and node in layer.direct):
        return None
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    residual = [a for a in operands if _on_chain(a, layer)]
    if len(operands) != 2 or len(residual) != 1:
        return None
    contribution = operands[0] if operands[1] is residual[0] else operands[1]
    return residual[0], contribution


def _on_chain(node: fx.Node, layer: _LayerScope) -> bool:
    """True if ``node`` carries the residual stream: produced outside the layer, or a
    layer-scope add one of whose operands carries it. (A parallel ``attn + mlp`` sum
    does not: both its operands come from branch modules.)"""
    if node not in layer.nodes:
        return True
    if not (_is_add(node) and node in layer.direct):
        return False
    return any(_on_chain(a, layer) for a in node.args if isinstance(a, fx.Node))


def _site_map(
    layer_idx: int, layer: _LayerScope, chain: _ResidualChain, labels: tuple[str | None, ...]
) -> dict[Site, SiteNode]:
    """Name the chain's nodes as sites. resid_pre and resid_post always exist; the branch
    sites only for the layer shapes we recognise: attention-then-MLP adds (sequential, or a
    parallel block added one branch at a time) and one parallel ``attn + mlp`` add. A
    parallel block has no resid_mid."""
    # Only the layer's own users read the steered resid_pre, as under a forward pre-hook.
    layer_users = frozenset(user for user in chain.resid_pre.users if user in layer.nodes)
    sites = {
        Site(layer_idx, SiteKind.RESID_PRE): SiteNode(chain.resid_pre, layer_users),
        Site(layer_idx, SiteKind.RESID_POST): SiteNode(chain.adds[-1]),
    }
    if labels == ("attn", "mlp"):
        sites[Site(layer_idx, SiteKind.ATTN_OUT)] = SiteNode(chain.contributions[0])
        sites[Site(layer_idx, SiteKind.MLP_OUT)] = SiteNode(chain.contributions[1])
        # ``x + attn + mlp`` adds a parallel block's branches one at a time: the first sum is a
        # resid_mid only if the MLP reads it.
        if chain.adds[0] in _ancestors(chain.contributions[1]):
            sites[Site(layer_idx, SiteKind.RESID_MID)] = SiteNode(chain.adds[0])
    elif labels == ("both",):
        parts = _split_parallel(chain.contributions[0], layer, chain.stop)
        if parts is not None:
            sites[Site(layer_idx, SiteKind.ATTN_OUT)] = SiteNode(parts[0])
            sites[Site(layer_idx, SiteKind.MLP_OUT)] = SiteNode(parts[1])
    return sites


def _branch_label(contribution: fx.Node, layer: _LayerScope, stop: frozenset[fx.Node]) -> str | None:
    """Which branch modules computed ``contribution``: "attn", "mlp", "both" (a parallel
    block adds their sum in one step), or None (neither: not a branch output)."""
    touched = set()
    for node in _branch_nodes(contribution, layer.nodes, stop):
        touched.update(name for name, ids in layer.branch_ids.items() if layer.scopes[node] & ids)
    if touched == {"attn"}:
        return "attn"
    if touched == {"mlp"}:
        return "mlp"
    return "both" if touched == {"attn", "mlp"} else None


def _branch_nodes(start: fx.Node, inside: frozenset[fx.Node], stop: frozenset[fx.Node]) -> Iterable[fx.Node]:
    """Ancestors of ``start`` within the layer, not crossing the residual chain."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen or node in stop or node not in inside:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def _split_parallel(
    contribution: fx.Node, layer: _LayerScope, stop: frozenset[fx.Node]
) -> tuple[fx.Node, fx.Node] | None:
    """For ``attn + mlp`` added to the residual in one step, the (attn_out, mlp_out) nodes."""
    if not _is_add(contribution):
        return None
    operands = [a for a in contribution.args if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    labels = [_branch_label(a, layer, stop) for a in operands]
    if labels == ["attn", "mlp"]:
        return operands[0], operands[1]
    if labels == ["mlp", "attn"]:
        return operands[1], operands[0]
    return None


def _branch_input_sites(
    scopes: dict[fx.Node, frozenset[int]],
    layer_idx: int,
    sites: dict[Site, SiteNode],
    mlp_ids: frozenset[int],
    projections: frozenset[int],
) -> dict[Site, SiteNode]:
    """attn.hook_z and hook_mlp_in of a layer whose attn_out / mlp_out were found. Each is read
    only by the module it feeds, so other readers of the same value keep the unsteered one."""
    found = {}
    attn_out = sites.get(Site(layer_idx, SiteKind.ATTN_OUT))
    if attn_out is not None:
        out_projection = _last_projection(attn_out.node, scopes, projections)
        z = None if out_projection is None else _module_input(scopes, frozenset({out_projection}))
        if z is not None:
            found[Site(layer_idx, SiteKind.ATTN_Z)] = z
    mlp_in = _module_input(scopes, mlp_ids) if Site(layer_idx, SiteKind.MLP_OUT) in sites else None
    if mlp_in is not None:
        found[Site(layer_idx, SiteKind.MLP_IN)] = mlp_in
    return found


def _last_projection(attn_out: fx.Node, scopes: dict[fx.Node, frozenset[int]], projections: frozenset[int]) -> int | None:
    """The projection that ran last before ``attn_out`` (the output projection), by module id."""
    ancestors = _ancestors(attn_out)
    for node in reversed(scopes):  # graph order, latest first
        if node in ancestors and scopes[node] & projections:
            (projection,) = scopes[node] & projections
            return projection
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return seen


def _module_input(scopes: dict[fx.Node, frozenset[int]], module_ids: frozenset[int]) -> SiteNode | None:
    """The one activation the module(s) ``module_ids`` read from outside themselves, as a site
    read only by them; None if there is not exactly one."""
    inside = [node for node, ids in scopes.items() if ids & module_ids]
    inputs = {
        source for node in inside for source in node.all_input_nodes
        if not scopes.get(source, frozenset()) & module_ids and _is_activation(source)
    }
    if len(inputs) != 1:
        return None
    (source,) = inputs
    return SiteNode(source, frozenset(user for user in source.users if scopes[user] & module_ids))
