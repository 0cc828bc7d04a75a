"""Sites in an HF model's Dynamo FX graph: each decoder layer's residual chain, read off the data flow.

Every node's ``nn_module_stack`` says which module instances were active when it was traced.
Its keys are ``str(id(module))``, so we map them through module identity and never parse the
path strings, whose format changed across torch versions.

Within a layer, the residual stream runs from a value produced outside the layer (resid_pre)
to the one residual-shaped value the layer hands on (resid_post). Walking back from
resid_post, each step is either

- a residual add: one operand carries the stream, the other is a branch contribution. The
  add may sit at layer scope or inside a branch module (BLOOM and MPT add the residual inside
  their attention and MLP modules); or
- a pass-through: an op that carries the stream on without reading any other activation: a
  dtype cast (Mamba's ``residual_in_fp32``), a scale or shift by a constant or parameter
  (Gemma 4's ``*= layer_scalar``, MiniMax's ``alpha * residual``, Zaya's residual bias),
  dropout, a whole norm module (post-LN blocks such as GPT-1 normalise the sum), or a
  reshape between ``[B, S, D]`` and its tokens flattened to ``[B * S, D]`` (OPT adds its MLP
  on the flattened stream). A flattened site is steered viewed as ``[B, S, D]``.

Each contribution is classified by the branch modules it was computed in: attention
(attn_out), MLP (mlp_out), or both at once (a parallel attention+MLP block, which has no
resid_mid). Where a module name does not tell (a Mamba or convolution token mixer, an MLP
whose projections sit on the layer itself), the forward order does: a layer that adds two
branches adds its token mixer first. resid_mid is the stream value the second add adds to.

Two sites sit inside the branches, found from the branch outputs: ``attn.hook_z`` is the
input of the attention's output projection (the heads concatenated, ``[B, S, H * d_head]``),
and ``hook_mlp_in`` the input the MLP module receives (after its pre-MLP norm).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from .sites import DecoderLayout, Site, SiteKind, SiteNode

_ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add)
# Ops that can carry the stream on unchanged in kind (see ``_pass_through_input``).
_SCALE_TARGETS = (operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.Tensor.mul)
_PASS_FUNCTIONS = (torch.nn.functional.dropout, torch.nn.functional.layer_norm)
_PASS_METHODS = frozenset({"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "mul", "div", "add"})


def find_site_nodes(graph: fx.Graph, model: nn.Module, layout: DecoderLayout) -> dict[Site, list[SiteNode]]:
    """Every site this graph exposes, mapped to the FX node(s) that compute its tensor: one per
    call of its layer (a looped stack runs a layer several times per forward, and a site there
    is steered at every call, as a forward hook would fire at each).

    Layers whose residual chain cannot be traced (for example a graph fragment after a
    graph break) expose no sites rather than wrong ones.
    """
    modules = dict(model.named_modules())
    scope_of = {str(id(m)): id(m) for m in modules.values()}
    scopes = {node: _module_ids(node, scope_of) for node in graph.nodes}  # in graph order
    # Norms are known by class name (LayerNorm, RMSNorm, ...): HF has no common base class.
    norm_ids = frozenset(id(m) for m in modules.values() if "norm" in type(m).__name__.lower())
    found: dict[Site, list[SiteNode]] = {}
    for layer_idx, layer in enumerate(layout.layers):
        branch_ids = {
            "attn": _subtree_ids(modules, layout.attn_paths[layer_idx]),
            "mlp": _subtree_ids(modules, layout.mlp_paths[layer_idx]),
        }
        projections = _projection_ids(modules, layout.attn_paths[layer_idx])
        per_call = []
        for call in _layer_calls(scopes, str(id(layer))):
            sites = _layer_sites(call, layer_idx, branch_ids, norm_ids, layout.hidden_size)
            per_call.append(sites | _branch_input_sites(call, layer_idx, sites, branch_ids["mlp"], projections))
        # A site counts only if every call of its layer exposes it: steering some calls only is wrong.
        for site in set.intersection(*map(set, per_call)) if per_call else ():
            found[site] = [replace(sites[site], sequence_first=layout.sequence_first) for sites in per_call]
    return found


def _layer_calls(scopes: dict[fx.Node, frozenset[int]], layer_key: str) -> list[dict[fx.Node, frozenset[int]]]:
    """The scopes of the nodes of each call of the layer whose ``nn_module_stack`` key is
    ``layer_key``, in call (and graph) order. Dynamo keys a module's first call ``"<key>"`` and
    its later ones ``"<key>@1"``, ...."""
    calls: dict[str, dict[fx.Node, frozenset[int]]] = {}
    for node, ids in scopes.items():
        for key in node.meta.get("nn_module_stack") or {}:
            if key.partition("@")[0] == layer_key:
                calls.setdefault(key, {})[node] = ids
    return list(calls.values())


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
    """The modules active at ``node``, whichever of their calls it is in."""
    stack = node.meta.get("nn_module_stack") or {}
    bases = (key.partition("@")[0] for key in stack)
    return frozenset(scope_of[base] for base in bases if base in scope_of)


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


def _pass_through_input(node: fx.Node) -> fx.Node | None:
    """The operand a pass-through op carries on (see the module docstring), or None if ``node``
    is not one: its one activation operand, the others no larger than one token's vector (a
    constant, a per-channel parameter, a dtype; never a flattened branch output)."""
    is_function = node.op == "call_function" and node.target in _SCALE_TARGETS + _PASS_FUNCTIONS + _ADD_TARGETS
    if not (is_function or node.op == "call_method" and node.target in _PASS_METHODS):
        return None
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    if node.target == "type_as":  # x.type_as(other): ``other`` gives only the dtype
        operands = operands[:1]
    streams = [a for a in operands if _is_activation(a)]
    if len(streams) != 1:
        return None
    width = streams[0].meta["example_value"].shape[-1]
    return streams[0] if all(_numel(a) <= width for a in operands if a is not streams[0]) else None


def _flattening_input(node: fx.Node) -> fx.Node | None:
    """The input of a reshape that flattens ``[B, S, D]`` tokens to ``[B * S, D]`` or views them
    back, or None if ``node`` is no such reshape (a head split changes the last dimension)."""
    is_reshape = (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )
    source = node.args[0] if is_reshape and node.args else None
    if not isinstance(source, fx.Node):
        return None
    before, after = source.meta.get("example_value"), node.meta.get("example_value")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.is_floating_point()):
        return None
    return source if {before.dim(), after.dim()} == {2, 3} and before.shape[-1] == after.shape[-1] else None


def _numel(node: fx.Node) -> int:
    value = node.meta.get("example_value")
    return value.numel() if isinstance(value, torch.Tensor) else 1


@dataclass(frozen=True, eq=False)
class _LayerScope:
    """The FX nodes traced inside one decoder layer, with the module scopes of each."""

    nodes: frozenset[fx.Node]  # every node whose module stack holds the layer
    scopes: dict[fx.Node, frozenset[int]]  # node -> ids of the modules active at it
    branch_ids: dict[str, frozenset[int]]  # "attn" / "mlp" -> ids of that branch's subtree
    norms: dict[fx.Node, fx.Node]  # a norm module's output -> the activation it normalises

    def carried_from(self, node: fx.Node) -> fx.Node | None:
        """The stream operand a pass-through step ending at ``node`` carries on (one op, or a
        whole norm module), or None if ``node`` ends none."""
        return self.norms.get(node) or _pass_through_input(node) or _flattening_input(node)


@dataclass(frozen=True)
class _ResidualChain:
    """A layer's residual stream: resid_pre, then every node carrying it on, among them one add
    per branch contribution; the last is resid_post."""

    resid_pre: fx.Node
    path: tuple[fx.Node, ...]  # forward order; path[-1] is resid_post
    adds: tuple[fx.Node, ...]  # the residual adds on the path, in forward order
    contributions: tuple[fx.Node, ...]  # contributions[i]: what adds[i] adds to the stream
    streams: tuple[fx.Node, ...]  # streams[i]: the stream value adds[i] adds to

    @property
    def stop(self) -> frozenset[fx.Node]:
        """The chain's own nodes: a walk back from a contribution stops at them."""
        return frozenset(self.path) | {self.resid_pre}

    def resid_mid(self) -> fx.Node | None:
        """The stream between the first two adds, where the second branch reads it: the latest
        value on the way from ``adds[0]`` to ``streams[1]`` that ``contributions[1]`` depends on
        (Doge's MLP reads the sum, the residual is then scaled; a post-LN MLP reads the norm).
        None if it reads none: a parallel block that adds its branches one at a time."""
        segment = self.path[self.path.index(self.adds[0]) : self.path.index(self.streams[1]) + 1]
        reads = _ancestors(self.contributions[1])
        return next((node for node in reversed(segment) if node in reads), None)


def _layer_sites(
    scopes: dict[fx.Node, frozenset[int]],
    layer_idx: int,
    branch_ids: dict[str, frozenset[int]],
    norm_ids: frozenset[int],
    hidden_size: int,
) -> dict[Site, SiteNode]:
    """The sites of one call of decoder layer ``layer_idx``, whose FX nodes ``scopes`` holds:
    resid_pre and resid_post only if its residual chain cannot be traced, and none if the
    layer does not hand on one residual-shaped value."""
    nodes = list(scopes)
    layer = _LayerScope(frozenset(nodes), scopes, branch_ids, _norm_steps(nodes, scopes, norm_ids))
    resid_post = _resid_post(layer, hidden_size)
    if resid_post is None:
        return {}
    chain = _residual_chain(resid_post, layer)
    if chain is None or not _is_residual_tensor(chain.resid_pre, hidden_size):
        return _boundary_sites(layer_idx, layer, resid_post, hidden_size)
    labels = tuple(_branch_label(c, layer, chain.stop) for c in chain.contributions)
    return _site_map(layer_idx, layer, chain, labels)


def _boundary_sites(layer_idx: int, layer: _LayerScope, resid_post: fx.Node, hidden_size: int) -> dict[Site, SiteNode]:
    """resid_pre and resid_post of a layer whose residual chain cannot be traced (Inkling2's
    block-boundary layers restart the stream from the attention output): the one residual-shaped
    value it reads from outside and the one it hands on, as a forward pre-hook and a forward
    hook see them. A graph input does not count: after a graph break it may be a value from
    inside the layer."""
    inputs = {
        source for node in layer.nodes for source in node.all_input_nodes
        if source not in layer.nodes and _is_residual_tensor(source, hidden_size)
    }
    if len(inputs) != 1 or next(iter(inputs)).op == "placeholder":
        return {}
    (resid_pre,) = inputs
    layer_users = frozenset(user for user in resid_pre.users if user in layer.nodes)
    return {
        Site(layer_idx, SiteKind.RESID_PRE): SiteNode(resid_pre, layer_users),
        Site(layer_idx, SiteKind.RESID_POST): SiteNode(resid_post),
    }


def _norm_steps(nodes: list[fx.Node], scopes: dict[fx.Node, frozenset[int]], norm_ids: frozenset[int]) -> dict[fx.Node, fx.Node]:
    """Each norm module call in the layer as one pass-through step: its one activation output
    mapped to its one activation input (a norm called on several inputs gives no step)."""
    members: dict[int, list[fx.Node]] = {}
    for node in nodes:
        for norm in scopes[node] & norm_ids:
            members.setdefault(norm, []).append(node)
    steps = {}
    for inside in map(frozenset, members.values()):
        inputs = {source for node in inside for source in node.all_input_nodes if source not in inside and _is_activation(source)}
        outputs = [node for node in inside if _is_activation(node) and any(user not in inside for user in node.users)]
        if len(inputs) == 1 and len(outputs) == 1:
            steps[outputs[0]] = next(iter(inputs))
    return steps


def _resid_post(layer: _LayerScope, hidden_size: int) -> fx.Node | None:
    """The one residual-shaped value the layer hands on, or None if there is not exactly one."""
    escaping = [
        node for node in layer.nodes
        if _is_residual_tensor(node, hidden_size) and any(user not in layer.nodes for user in node.users)
    ]
    return escaping[0] if len(escaping) == 1 else None


def _residual_chain(resid_post: fx.Node, layer: _LayerScope) -> _ResidualChain | None:
    """Walk back from resid_post through residual adds and pass-through ops to the value the
    layer received. None if a step on the way is neither, or the walk meets no add."""
    path: list[fx.Node] = []
    adds: list[fx.Node] = []
    contributions: list[fx.Node] = []
    streams: list[fx.Node] = []
    node = resid_post
    while node in layer.nodes:
        step = _chain_step(node, layer)
        if step is None:
            return None
        stream, contribution = step
        path.append(node)
        if contribution is not None:
            adds.append(node)
            contributions.append(contribution)
            streams.append(stream)
        node = stream
    if not adds:
        return None
    return _ResidualChain(node, *(tuple(reversed(part)) for part in (path, adds, contributions, streams)))


def _chain_step(node: fx.Node, layer: _LayerScope) -> tuple[fx.Node, fx.Node | None] | None:
    """``(input, None)`` of a pass-through op, ``(stream operand, contribution)`` of a residual
    add, or None if ``node`` is neither."""
    source = layer.carried_from(node)
    if source is not None:
        return source, None
    if not _is_add(node):
        return None
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    residual = [a for a in operands if _on_chain(a, layer)]
    if len(operands) != 2 or len(residual) != 1:
        return None
    return residual[0], operands[0] if operands[1] is residual[0] else operands[1]


def _on_chain(node: fx.Node, layer: _LayerScope) -> bool:
    """True if ``node`` carries the residual stream: produced outside the layer, or a
    pass-through op or add in the layer one of whose operands carries it. (A parallel
    ``attn + mlp`` sum does not: both its operands come from branch modules.)"""
    if node not in layer.nodes:
        return True
    source = layer.carried_from(node)
    if source is not None:
        return _on_chain(source, layer)
    return _is_add(node) and any(_on_chain(a, layer) for a in node.args if isinstance(a, fx.Node))


def _site_map(
    layer_idx: int, layer: _LayerScope, chain: _ResidualChain, labels: tuple[str | None, ...]
) -> dict[Site, SiteNode]:
    """Name the chain's nodes as sites. resid_pre and resid_post always exist; the branch
    sites only for the layer shapes we recognise (see ``_branch_sites``)."""
    # Only the layer's own users read the steered resid_pre, as under a forward pre-hook.
    layer_users = frozenset(user for user in chain.resid_pre.users if user in layer.nodes)
    sites = {
        Site(layer_idx, SiteKind.RESID_PRE): SiteNode(chain.resid_pre, layer_users),
        Site(layer_idx, SiteKind.RESID_POST): SiteNode(chain.path[-1]),
    }
    branches = _branch_sites(layer, chain, labels)
    return sites | {Site(layer_idx, kind): _stream_site(node, chain.resid_pre) for kind, node in branches.items()}


def _stream_site(node: fx.Node, resid_pre: fx.Node) -> SiteNode:
    """A branch site at ``node``; one holding the tokens flattened (2-D) is seen as resid_pre's ``[B, S, D]``."""
    return SiteNode(node, stream_like=resid_pre if node.meta["example_value"].dim() == 2 else None)


def _branch_sites(layer: _LayerScope, chain: _ResidualChain, labels: tuple[str | None, ...]) -> dict[SiteKind, fx.Node]:
    """attn_out, resid_mid and mlp_out of a recognised layer shape:

    - two adds (token mixer, then MLP): labels that do not contradict that order; any later
      adds must come from no branch module (Gemma 4's per-layer-embedding add) and get no hook;
    - one add of a parallel ``attn + mlp`` sum;
    - one add of one branch (a Mamba block): its mixer is attn_out, an MLP-only block's mlp_out.

    resid_mid exists only if the MLP reads the stream after the first add (a parallel block
    may add its branches one at a time: Cohere's ``residual + attn + mlp``)."""
    if len(chain.adds) >= 2 and _mixer_then_mlp(labels):
        found = {SiteKind.ATTN_OUT: chain.contributions[0], SiteKind.MLP_OUT: chain.contributions[1]}
        resid_mid = chain.resid_mid()
        return found if resid_mid is None else found | {SiteKind.RESID_MID: resid_mid}
    if len(chain.adds) != 1:
        return {}
    if labels == ("both",):
        parts = _split_parallel(chain.contributions[0], layer, chain.stop)
        return {} if parts is None else {SiteKind.ATTN_OUT: parts[0], SiteKind.MLP_OUT: parts[1]}
    return {SiteKind.MLP_OUT if labels == ("mlp",) else SiteKind.ATTN_OUT: chain.contributions[0]}


def _mixer_then_mlp(labels: tuple[str | None, ...]) -> bool:
    """Whether branch labels read as a token mixer's add, then an MLP's (``None``: no branch
    module computed it, so the order decides), then only adds from no branch module."""
    first, second, *rest = labels
    if first not in ("attn", None) or second not in ("mlp", None) or any(label is not None for label in rest):
        return False
    return not rest or (first, second) == ("attn", "mlp")


def _branch_label(contribution: fx.Node, layer: _LayerScope, stop: frozenset[fx.Node]) -> str | None:
    """Which branch modules computed ``contribution``: "attn", "mlp", "both" (a parallel
    block adds their sum in one step), or None (neither)."""
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
    """For ``attn + mlp`` added to the residual in one step, the (attn_out, mlp_out) nodes.
    Pass-through ops on the sum (Falcon's dropout) are looked through."""
    while not _is_add(contribution):
        contribution = layer.carried_from(contribution)
        if contribution is None:
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
    return SiteNode(source, frozenset(user for user in source.users if scopes.get(user, frozenset()) & module_ids))
