"""Sites in a serving engine's graph: a token-major residual stream that crosses layer boundaries.

An engine such as vLLM runs the decoder on a flattened ``[num_tokens, hidden]`` batch, and its
layers return ``(branch_output, residual)``: the add that forms ``resid_post`` of layer L runs
inside layer L+1's input norm (or the final norm), and ``resid_mid`` inside the MLP-side norm.
So sites are not at layer scope, as in an HF graph (``lowering.sites``), but on the residual
chain itself, which we follow through the graph's data flow:

- ``R_0`` is the value entering decoder layer 0 from outside it (the embedding, scaled where
  the model scales it): ``resid_pre`` of layer 0.
- Each residual add takes the current residual ``R_k`` as one operand (possibly through dtype
  casts: engines add in fp32 and keep the residual in the model dtype) and a branch output as
  the other; its result is ``R_{k+1}``.
- A sequential block has two adds per layer: ``resid_mid`` (branch: ``attn_out``) and then
  ``resid_post`` (branch: ``mlp_out``), which is also ``resid_pre`` of the next layer.

Layers are known by module identity (the ``nn_module_stack`` keys are ``str(id(module))``), and
every branch is checked to come from the layer the chain assigns it to, so a graph that does
not have this shape fails with an error instead of steering the wrong tensor. Comparison tests
against the HF model prove that these are the tensors DESIGN §3 defines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from .sites import Site, SiteKind, SiteNode

_CASTS = frozenset({torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default})
_ADD = torch.ops.aten.add.Tensor


def find_engine_sites(graph: fx.Graph, layers: Sequence[nn.Module], hidden_size: int) -> dict[Site, SiteNode]:
    """Every site of a sequential-residual decoder in a token-major post-grad ``graph``.

    ``layers`` are the decoder layer modules in order. Raises ValueError when the graph's
    residual chain does not have two adds per layer, or a branch comes from another layer.
    """
    layer_of = {str(id(layer)): index for index, layer in enumerate(layers)}
    start = _chain_start(graph, layer_of, hidden_size)
    order = {node: index for index, node in enumerate(graph.nodes)}
    chain = _residual_chain(start, hidden_size, order)
    if len(chain) != 2 * len(layers):
        raise ValueError(
            f"sae_compile: the residual stream in this graph has {len(chain)} adds; a sequential "
            f"decoder of {len(layers)} layers has {2 * len(layers)}. Parallel attention+MLP blocks "
            "and graphs split into pieces are not supported in an engine yet."
        )
    sites = {Site(0, SiteKind.RESID_PRE): SiteNode(start)}
    for layer in range(len(layers)):
        (mid, attn), (post, mlp) = chain[2 * layer], chain[2 * layer + 1]
        for kind, branch in ((SiteKind.ATTN_OUT, attn), (SiteKind.MLP_OUT, mlp)):
            _check_branch_layer(branch, layer_of, layer, kind)
        sites[Site(layer, SiteKind.ATTN_OUT)] = SiteNode(attn)
        sites[Site(layer, SiteKind.RESID_MID)] = SiteNode(mid)
        sites[Site(layer, SiteKind.MLP_OUT)] = SiteNode(mlp)
        sites[Site(layer, SiteKind.RESID_POST)] = SiteNode(post)
        if layer + 1 < len(layers):
            sites[Site(layer + 1, SiteKind.RESID_PRE)] = SiteNode(post)
    return sites


def _chain_start(graph: fx.Graph, layer_of: dict[str, int], hidden_size: int) -> fx.Node:
    """The one residual-stream value that layer 0's nodes read from outside layer 0."""
    found: dict[fx.Node, None] = {}
    for node in graph.nodes:
        if _layer(node, layer_of) != 0:
            continue
        for source in node.all_input_nodes:
            if source.op not in ("placeholder", "get_attr") and _layer(source, layer_of) != 0 and _is_stream(source, hidden_size):
                found[_strip_casts(source)] = None
    if len(found) != 1:
        names = ", ".join(node.name for node in found) or "none"
        raise ValueError(f"sae_compile: expected one residual-stream input to decoder layer 0, found: {names}.")
    return next(iter(found))


def _residual_chain(start: fx.Node, hidden_size: int, order: dict[fx.Node, int]) -> list[tuple[fx.Node, fx.Node]]:
    """``(add, branch)`` for each residual add after ``start``, in forward order."""
    chain = []
    current = start
    while (step := _next_residual_add(current, hidden_size, order)) is not None:
        chain.append(step)
        current = step[0]
    return chain


def _next_residual_add(residual: fx.Node, hidden_size: int, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """The first add that reads ``residual`` (or a cast of it) and another stream-shaped value."""
    readers = _with_casts(residual)
    candidates = []
    for reader in readers:
        for user in reader.users:
            if user.target is _ADD and _is_stream(user, hidden_size) and len(user.all_input_nodes) == 2:
                candidates.append(user)
    for add in sorted(set(candidates), key=order.__getitem__):
        left, right = add.args[:2]
        other = right if _strip_casts(left) is residual else left
        if _strip_casts(other) is not residual and isinstance(other, fx.Node) and _is_stream(other, hidden_size):
            return add, _strip_casts(other)
    return None


def _check_branch_layer(branch: fx.Node, layer_of: dict[str, int], layer: int, kind: SiteKind) -> None:
    found = _layer(branch, layer_of)
    if found != layer:
        raise ValueError(
            f"sae_compile: the residual chain puts {branch.name} at blocks.{layer}.{kind.hook}, but it was "
            f"computed in layer {found}. This graph's residual stream does not have the sequential shape "
            "sae_compile places sites on."
        )


def _layer(node: fx.Node, layer_of: dict[str, int]) -> int | None:
    """The decoder layer whose forward computed ``node`` (``None``: outside every layer)."""
    for key in node.meta.get("nn_module_stack", {}):
        if key in layer_of:
            return layer_of[key]
    return None


def _is_stream(node: fx.Node, hidden_size: int) -> bool:
    """A floating ``[num_tokens, hidden]`` value."""
    value = node.meta.get("val")
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dim() == 2
        and value.shape[1] == hidden_size
    )


def _strip_casts(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.target in _CASTS:
        node = node.args[0]
    return node


def _with_casts(node: fx.Node) -> list[fx.Node]:
    """``node`` and every value that is ``node`` through dtype casts only."""
    found, frontier = [node], [node]
    while frontier:
        casts = [user for current in frontier for user in current.users if user.target in _CASTS]
        found.extend(casts)
        frontier = casts
    return found
