"""The FX rewrite: route each attached site's tensor through ``sae_compile::steer``.

Invariants (those of ``torch/_inductor/fx_passes``): no new aliasing (the op returns a
fresh tensor), and inserted nodes carry the meta of the node they steer
(``example_value``, ``nn_module_stack``, ``stack_trace``) so later passes and error
messages see a well-formed graph.
"""

from __future__ import annotations

from torch import fx

from .op import STEER_OP
from .sites import Site, SiteNode

_COPIED_META = ("example_value", "val", "tensor_meta", "nn_module_stack", "stack_trace")


def insert_steering_ops(gm: fx.GraphModule, placements: dict[Site, tuple[SiteNode, str]]) -> int:
    """Insert one ``steer(x, handle)`` per placement into ``gm`` and recompile it; returns how many."""
    count = insert_into_graph(gm.graph, placements)
    gm.graph.lint()
    gm.recompile()
    return count


def insert_into_graph(graph: fx.Graph, placements: dict[Site, tuple[SiteNode, str]]) -> int:
    """Insert one ``steer(x, handle)`` per placement, in forward order; returns how many.

    Sites that share a node (resid_post of layer L-1 is resid_pre of layer L) chain, so the
    later site sees the earlier one's output, as forward hooks would.
    """
    latest: dict[fx.Node, fx.Node] = {}
    for site in sorted(placements):
        site_node, handle = placements[site]
        source = latest.get(site_node.node, site_node.node)
        with graph.inserting_after(source):
            steered = graph.call_function(STEER_OP, (source, handle))
        steered.meta.update({key: source.meta[key] for key in _COPIED_META if key in source.meta})
        consumers = site_node.consumers
        for user in list(source.users):
            if user is not steered and (consumers is None or user in consumers):
                user.replace_input_with(source, steered)
        if consumers is None:
            latest[site_node.node] = steered
    return len(placements)
