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
    ATTN_OUT = 1
    RESID_MID = 2
    MLP_OUT = 3
    RESID_POST = 4

    @property
    def hook(self) -> str:
        return "hook_" + self.name.lower()


@dataclass(frozen=True, order=True)
class Site:
    """One steerable tensor: ``kind`` in decoder layer ``layer``. Orders in forward order."""

    layer: int
    kind: SiteKind

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind.hook}"


_CANONICAL = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)$")
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
        match = _CANONICAL.match(name)
        if match is not None and int(match.group(1)) < len(self.layers):
            return Site(int(match.group(1)), SiteKind[match.group(2).upper()])
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
    layer_paths = tuple(f"{stack_path}.{i}" for i in range(len(stack)))
    attn_paths, mlp_paths = [], []
    for path, layer in zip(layer_paths, stack, strict=True):
        attn_paths.append(_branch_child(path, layer, _ATTENTION_NAMES))
        mlp_paths.append(_branch_child(path, layer, _MLP_NAMES))
    return DecoderLayout(tuple(stack), layer_paths, tuple(attn_paths), tuple(mlp_paths), embeddings.embedding_dim)


def _branch_child(layer_path: str, layer: nn.Module, words: tuple[str, ...]) -> str | None:
    """The child implementing a branch: matched on its class name first (``LlamaAttention``,
    ``GPT2MLP``), then on its attribute name, never a norm or dropout wrapper."""
    children = [
        (name, type(child).__name__.lower())
        for name, child in layer.named_children()
        if not any(skip in type(child).__name__.lower() for skip in ("norm", "dropout"))
    ]
    for label_index in (1, 0):
        for child in children:
            label = child[label_index].lower()
            if any(word in label for word in words):
                return f"{layer_path}.{child[0]}"
    return None


def find_site_nodes(graph: fx.Graph, model: nn.Module, layout: DecoderLayout) -> dict[Site, SiteNode]:
    """Every site this graph exposes, mapped to the FX node that computes its tensor.

    Layers whose residual chain cannot be traced (for example a graph fragment after a
    graph break) expose no sites rather than wrong ones.
    """
    modules = dict(model.named_modules())
    scope_of = {str(id(m)): id(m) for m in modules.values()}
    scopes = {node: _module_ids(node, scope_of) for node in graph.nodes}
    found: dict[Site, SiteNode] = {}
    for layer_idx, layer in enumerate(layout.layers):
        branch_ids = {
            "attn": _subtree_ids(modules, layout.attn_paths[layer_idx]),
            "mlp": _subtree_ids(modules, layout.mlp_paths[layer_idx]),
        }
        found.update(_layer_sites(scopes, layer_idx, id(layer), branch_ids, layout.hidden_size))
    return found


def _subtree_ids(modules: dict[str, nn.Module], path: str | None) -> frozenset[int]:
    if path is None:
        return frozenset()
    return frozenset(id(m) for m in modules[path].modules())


def _module_ids(node: fx.Node, scope_of: dict[str, int]) -> frozenset[int]:
    stack = node.meta.get("nn_module_stack") or {}
    return frozenset(scope_of[key] for key in stack if key in scope_of)


def _is_residual_tensor(node: fx.Node, hidden_size: int) -> bool:
    value = node.meta.get("example_value")
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dim() == 3
        and value.shape[-1] == hidden_size
    )


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target == "add"


def _layer_sites(
    scopes: dict[fx.Node, frozenset[int]],
    layer_idx: int,
    layer_id: int,
    branch_ids: dict[str, frozenset[int]],
    hidden_size: int,
) -> dict[Site, SiteNode]:
    inside = {node for node, ids in scopes.items() if layer_id in ids}
    if not inside:
        return {}
    escaping = [
        node for node in inside
        if _is_residual_tensor(node, hidden_size) and any(user not in inside for user in node.users)
    ]
    if len(escaping) != 1:
        return {}
    resid_post = escaping[0]
    # The layer's own scope, not a child's: residual adds sit directly in the block.
    direct = {node for node in inside if not any(i in scopes[node] for ids in branch_ids.values() for i in ids)}

    chain: list[fx.Node] = []
    contributions: list[fx.Node] = []
    node = resid_post
    while node in inside:
        if not (_is_add(node) and node in direct):
            return {}
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        residual = [a for a in operands if _on_chain(a, inside, direct)]
        if len(operands) != 2 or len(residual) != 1:
            return {}
        chain.append(node)
        contributions.append(operands[0] if operands[1] is residual[0] else operands[1])
        node = residual[0]
    resid_pre = node
    if not _is_residual_tensor(resid_pre, hidden_size):
        return {}
    chain.reverse()
    contributions.reverse()

    stop = set(chain) | {resid_pre}
    labels = [_branch_label(c, inside, stop, scopes, branch_ids) for c in contributions]
    layer_users = frozenset(user for user in resid_pre.users if user in inside)
    sites = {
        Site(layer_idx, SiteKind.RESID_PRE): SiteNode(resid_pre, layer_users),
        Site(layer_idx, SiteKind.RESID_POST): SiteNode(resid_post),
    }
    if labels == ["attn", "mlp"]:
        sites[Site(layer_idx, SiteKind.ATTN_OUT)] = SiteNode(contributions[0])
        sites[Site(layer_idx, SiteKind.RESID_MID)] = SiteNode(chain[0])
        sites[Site(layer_idx, SiteKind.MLP_OUT)] = SiteNode(contributions[1])
    elif labels == ["both"]:
        parts = _split_parallel(contributions[0], inside, stop, scopes, branch_ids)
        if parts is not None:
            sites[Site(layer_idx, SiteKind.ATTN_OUT)] = SiteNode(parts[0])
            sites[Site(layer_idx, SiteKind.MLP_OUT)] = SiteNode(parts[1])
    return sites


def _on_chain(node: fx.Node, inside: set[fx.Node], direct: set[fx.Node]) -> bool:
    """True if ``node`` carries the residual stream: produced outside the layer, or a
    layer-scope add one of whose operands carries it. (A parallel ``attn + mlp`` sum
    does not: both its operands come from branch modules.)"""
    if node not in inside:
        return True
    if not (_is_add(node) and node in direct):
        return False
    return any(_on_chain(a, inside, direct) for a in node.args if isinstance(a, fx.Node))


def _branch_label(
    contribution: fx.Node,
    inside: set[fx.Node],
    stop: set[fx.Node],
    scopes: dict[fx.Node, frozenset[int]],
    branch_ids: dict[str, frozenset[int]],
) -> str | None:
    """Which branch modules computed ``contribution``: "attn", "mlp", "both" (a parallel
    block adds their sum in one step), or None (neither: not a branch output)."""
    touched = set()
    for node in _branch_nodes(contribution, inside, stop):
        touched.update(name for name, ids in branch_ids.items() if scopes[node] & ids)
    if touched == {"attn"}:
        return "attn"
    if touched == {"mlp"}:
        return "mlp"
    return "both" if touched == {"attn", "mlp"} else None


def _branch_nodes(start: fx.Node, inside: set[fx.Node], stop: set[fx.Node]) -> Iterable[fx.Node]:
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
    contribution: fx.Node,
    inside: set[fx.Node],
    stop: set[fx.Node],
    scopes: dict[fx.Node, frozenset[int]],
    branch_ids: dict[str, frozenset[int]],
) -> tuple[fx.Node, fx.Node] | None:
    """For ``attn + mlp`` added to the residual in one step, the (attn_out, mlp_out) nodes."""
    if not _is_add(contribution):
        return None
    operands = [a for a in contribution.args if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    labels = [_branch_label(a, inside, stop, scopes, branch_ids) for a in operands]
    if labels == ["attn", "mlp"]:
        return operands[0], operands[1]
    if labels == ["mlp", "attn"]:
        return operands[1], operands[0]
    return None
