"""The FX rewrite: route each attached site's tensor through ``sae_compile::steer``.

Invariants (those of ``torch/_inductor/fx_passes``): no new aliasing of the steered value
(the op returns a fresh tensor), and inserted nodes carry a value meta of their own
(``example_value``/``val``) and the provenance of the node they steer (``nn_module_stack``,
``stack_trace``), so later passes and error messages see a well-formed graph.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from .op import STEER_OP
from .sites import Site, SiteNode

_VALUE_META = ("example_value", "val", "tensor_meta")
_PROVENANCE_META = ("nn_module_stack", "stack_trace")


Placements = dict[Site, tuple[Sequence[SiteNode], str]]  # site -> (its node in each call of its layer, handle)


def insert_steering_ops(gm: fx.GraphModule, placements: Placements) -> int:
    """Insert one ``steer(x, handle)`` per placement into ``gm`` and recompile it; returns how many."""
    count = insert_into_graph(gm.graph, placements)
    gm.graph.lint()
    gm.recompile()
    return count


def insert_into_graph(graph: fx.Graph, placements: Placements) -> int:
    """Insert ``steer(x, handle)`` at every node of each placement, in forward order; returns how
    many sites were placed.

    Sites that share a node (resid_post of layer L-1 is resid_pre of layer L) chain, so the
    later site sees the earlier one's output, as forward hooks would.
    """
    latest: dict[fx.Node, fx.Node] = {}
    for site in sorted(placements):
        site_nodes, handle = placements[site]
        for site_node in site_nodes:
            _steer_site_node(graph, site_node, handle, latest)
    return len(placements)


def _steer_site_node(graph: fx.Graph, site_node: SiteNode, handle: str, latest: dict[fx.Node, fx.Node]) -> None:
    """Route ``site_node``'s readers through a new op, after any op already steering its node."""
    source = latest.get(site_node.node, site_node.node)
    inserted = _insert_steer(source, handle, site_node)
    consumers = site_node.consumers
    for user in list(source.users):
        if user not in inserted and (consumers is None or user in consumers):
            user.replace_input_with(source, inserted[-1])
    if consumers is None:
        latest[site_node.node] = inserted[-1]


def _insert_steer(source: fx.Node, handle: str, site_node: SiteNode) -> list[fx.Node]:
    """The nodes computing ``steer(source, handle)``, in order; the last is the result. The op
    sees the stream as ``[B, S, D]``: a flattened ``[B * S, D]`` site (only in Dynamo graphs) is
    reshaped like ``site_node.stream_like`` and flattened back, a sequence-first one transposed."""
    if site_node.stream_like is not None:
        unflat = _method_after(source, source, "reshape_as", site_node.stream_like)
        steered = _steer_after(unflat, source, handle)
        return [unflat, steered, _method_after(steered, source, "flatten", 0, 1)]
    if site_node.sequence_first:
        batch_first = _method_after(source, source, "transpose", 0, 1)
        steered = _steer_after(batch_first, source, handle)
        return [batch_first, steered, _method_after(steered, source, "transpose", 0, 1)]
    return [_steer_after(source, source, handle)]


def _steer_after(x: fx.Node, source: fx.Node, handle: str) -> fx.Node:
    """``steer(x, handle)`` right after ``x``: its value meta is ``x``'s (the op returns a tensor
    like its input), its provenance ``source``'s."""
    with x.graph.inserting_after(x):
        node = x.graph.call_function(STEER_OP, (x, handle))
    node.meta.update({key: x.meta[key] for key in _VALUE_META if key in x.meta})
    node.meta.update({key: source.meta[key] for key in _PROVENANCE_META if key in source.meta})
    return node


def _method_after(x: fx.Node, source: fx.Node, method: str, *args: object) -> fx.Node:
    """``x.method(*args)`` right after ``x`` in a Dynamo graph, its example value computed on the
    fake inputs, its provenance ``source``'s."""
    with x.graph.inserting_after(x):
        node = x.graph.call_method(method, (x, *args))
    fake = [a.meta["example_value"] if isinstance(a, fx.Node) else a for a in args]
    node.meta["example_value"] = getattr(x.meta["example_value"], method)(*fake)
    node.meta.update({key: source.meta[key] for key in _PROVENANCE_META if key in source.meta})
    return node
