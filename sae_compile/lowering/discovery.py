"""Which sites a model exposes, read off one Dynamo capture of its forward."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import fx, nn

from .backend import fresh_entry_point
from .graph_sites import find_site_nodes
from .sites import DecoderLayout, Site, decoder_layout

_probe_ids = itertools.count()
Discovery = tuple[DecoderLayout, dict[Site, tuple[int, ...]]]
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[bool, Discovery]] = weakref.WeakKeyDictionary()


def discover_sites(model: nn.Module, fullgraph: bool = True) -> Discovery:
    """The model's decoder layout and every site its graph exposes, with the site's
    shape on a 1x2-token probe input. Cached per model object.

    The probe is traced as ``sc.steer`` will compile: with ``fullgraph=True`` it is one
    Dynamo trace, never executed by a compiler; with ``fullgraph=False`` the sites of
    every graph fragment count, and the code between fragments runs eagerly on the probe.
    """
    cached = _CACHE.setdefault(model, {})
    if fullgraph in cached:
        return cached[fullgraph]
    layout = decoder_layout(model)
    found: dict[Site, tuple[int, ...]] = {}

    device = next(model.parameters()).device
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)

    def capture(gm: fx.GraphModule, example_inputs: Any) -> Any:
        for site, site_node in find_site_nodes(gm.graph, model, layout).items():
            shape = tuple(site_node.node.meta["example_value"].shape)
            # Steering routes rows and tokens by the input's [batch, seq]; a stream with other
            # positions (CPM-Ant prepends prompt tokens) cannot be steered token by token.
            if shape[:2] == tuple(probe.shape):
                found[site] = shape
        return gm.forward

    entry = fresh_entry_point(model.forward, f"probe_{next(_probe_ids)}")
    try:
        with torch.no_grad():
            torch.compile(entry, backend=capture, fullgraph=fullgraph)(input_ids=probe, use_cache=False)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
        if not fullgraph:
            raise
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{type(model).__name__} does not compile as one graph: torch.compile(fullgraph=True) fails on the "
            f"model itself ({type(error).__name__}: {reason}). sc.steer(..., fullgraph=False) lets Dynamo break "
            "the graph there and finds the sites in every piece."
        ) from error
    cached[fullgraph] = (layout, found)
    return layout, found
