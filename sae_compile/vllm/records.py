"""Feature records as they travel: from a worker back to the process that took them, and from a
server to its HTTP clients.

vLLM returns a ``collective_rpc``'s result through msgpack without type information (unless
pickle is allowed, which it is not by default), so a tensor would not come back as one, and
nested lists cost far more to pack than the arithmetic that made them: a record travels as
its tensors' raw bytes, with their dtype and shape. HTTP clients get JSON lists.
"""

from __future__ import annotations

from typing import Any

import torch

from ..features import FeatureRecord


def record_to_wire(record: FeatureRecord) -> dict[str, Any]:
    """``record`` (on the CPU) as bytes, numbers and strings."""
    return {
        "dtype": _dtype_name(record.values.dtype),
        "shape": list(record.values.shape),
        "values": _raw(record.values),
        "indices": None if record.indices is None else _raw(record.indices),
        "features": None if record.features is None else list(record.features),
    }


def record_from_wire(wire: dict[str, Any]) -> FeatureRecord:
    """The ``FeatureRecord`` that ``record_to_wire`` wrote."""
    shape = tuple(wire["shape"])
    values = _tensor(wire["values"], getattr(torch, wire["dtype"]), shape)
    indices = None if wire["indices"] is None else _tensor(wire["indices"], torch.long, shape)
    features = None if wire["features"] is None else tuple(wire["features"])
    return FeatureRecord(values, indices, features)


def record_to_json(record: FeatureRecord) -> dict[str, Any]:
    """``record`` as JSON-able lists, for an HTTP client."""
    return {
        "dtype": _dtype_name(record.values.dtype),
        "values": record.values.float().tolist(),
        "indices": None if record.indices is None else record.indices.tolist(),
        "features": None if record.features is None else list(record.features),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
