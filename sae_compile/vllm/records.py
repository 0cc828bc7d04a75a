"""Feature records as they travel from a worker back to the process that took them.

vLLM returns a ``collective_rpc``'s result through msgpack without type information (unless
pickle is allowed, which it is not by default), so a tensor would not come back as one: a
record travels as plain lists, with its dtype's name.
"""

from __future__ import annotations

from typing import Any

import torch

from ..features import FeatureRecord


def record_to_wire(record: FeatureRecord) -> dict[str, Any]:
    """``record`` (on the CPU) as lists, numbers and strings."""
    return {
        "dtype": str(record.values.dtype).removeprefix("torch."),
        "values": record.values.tolist(),
        "indices": None if record.indices is None else record.indices.tolist(),
        "features": None if record.features is None else list(record.features),
    }


def record_from_wire(wire: dict[str, Any]) -> FeatureRecord:
    """The ``FeatureRecord`` that ``record_to_wire`` wrote."""
    values = torch.tensor(wire["values"], dtype=getattr(torch, wire["dtype"]))
    indices = None if wire["indices"] is None else torch.tensor(wire["indices"], dtype=torch.long)
    features = None if wire["features"] is None else tuple(wire["features"])
    return FeatureRecord(values, indices, features)
