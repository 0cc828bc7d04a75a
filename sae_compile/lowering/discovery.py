"""Which sites a model exposes, read off one Dynamo capture of its forward."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace
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
        for site, calls in find_site_nodes(gm.graph, model, layout).items():
            found[site] = tuple(calls[0].stream_value().shape)
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
    layout, found = _aligned_with_tokens(layout, found, tuple(probe.shape))
    cached[fullgraph] = (layout, found)
    return layout, found


def _aligned_with_tokens(layout: DecoderLayout, found: dict[Site, tuple[int, ...]], tokens: tuple[int, int]) -> Discovery:
    """The sites whose tensor lines up with the input's ``[batch, seq]`` tokens, since steering
    routes by row and token; a stream with other positions (CPM-Ant prepends prompt positions)
    has no sites. A model whose stream is ``[seq, batch, D]`` throughout (XLNet) is steered
    transposed: the layout says so, and its sites' shapes are given as ``[B, S, D]``."""
    aligned = {site: shape for site, shape in found.items() if shape[:2] == tokens}
    flipped = {site: shape for site, shape in found.items() if shape[:2] == tokens[::-1]}
    if flipped and not aligned:
        return replace(layout, sequence_first=True), {site: (*tokens, *shape[2:]) for site, shape in flipped.items()}
    return layout, aligned
