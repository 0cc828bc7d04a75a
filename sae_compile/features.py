"""Reading SAE features: what to record at a site, and what a forward recorded there.

A recorded activation is ``f = act((x - b_dec?) @ W_enc + b_enc)`` of the tensor ``x`` that
arrives at the site: after earlier sites' edits, before this site's own. ``Features`` asks
for it per token, either as each token's ``top_k`` largest activations or densely for a
list of ``features``; a ``FeatureRecord`` holds the answer for a whole batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .wire import json_error, json_type, load_json

#: The index of a padding entry in ``FeatureRecord.indices``: a padding position, a row that
#: recorded nothing here, or a place past the row's own ``top_k``.
PAD_INDEX = -1


@dataclass(frozen=True)
class Features:
    """Record the SAE activations at ``site``: each token's ``top_k`` largest (indices and
    values, largest first, the lower index first among equal values) or, densely, those of
    ``features`` in the given order. Exactly one of the two is given."""

    site: str
    top_k: int | None = None
    features: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.site, str):
            raise TypeError(f"Features: site must be a string such as 'blocks.3.hook_resid_post', got {type(self.site).__name__}.")
        if (self.top_k is None) == (self.features is None):
            raise ValueError("Features: give exactly one of top_k= (each token's k largest) or features= (a list, recorded densely).")
        if self.top_k is not None:
            _check_index("top_k", self.top_k)
            if self.top_k < 1:
                raise ValueError(f"Features: top_k must be at least 1, got {self.top_k}.")
        else:
            object.__setattr__(self, "features", _feature_list(self.features))

    @property
    def width(self) -> int:
        """Entries per token: ``top_k``, or the number of features."""
        return self.top_k if self.top_k is not None else len(self.features or ())


def _check_index(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Features: {name} must be an int, got {type(value).__name__}.")


def _feature_list(features: object) -> tuple[int, ...]:
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"Features: features must be a list of feature indices, got {type(features).__name__}.")
    for feature in features:
        _check_index("each feature", feature)
        if feature < 0:
            raise ValueError(f"Features: feature indices must be >= 0, got {feature}.")
    if not features:
        raise ValueError("Features: features= must name at least one feature.")
    if len(set(features)) != len(features):
        raise ValueError(f"Features: features= names a feature twice: {list(features)}.")
    return tuple(features)


def features_to_json(requests: Sequence[Features]) -> str:
    """``requests`` as JSON text, the wire form of a request's ``record=`` (``features_from_json``
    reads it back): a list of objects ``{"site": ..., "top_k": k}`` or ``{"site": ..., "features": [...]}``."""
    items = []
    for request in requests:
        if not isinstance(request, Features):
            raise TypeError(f"record= takes a list of sc.Features, got an item of type {type(request).__name__}.")
        kind = {"top_k": request.top_k} if request.top_k is not None else {"features": list(request.features or ())}
        items.append({"site": request.site, **kind})
    return json.dumps(items)


def features_from_json(text: object) -> tuple[Features, ...]:
    """Parse the JSON text of ``features_to_json`` (or of any client that follows its schema).
    Anything malformed raises a ``ValueError`` whose message starts with ``"record JSON: "``."""
    data = load_json("record", text)
    if not isinstance(data, list):
        raise json_error("record", f"the top level must be a list of objects, got {json_type(data)}.")
    return tuple(_request_from_json(index, raw) for index, raw in enumerate(data))


def _request_from_json(index: int, raw: object) -> Features:
    where = f"[{index}]"
    if not isinstance(raw, dict):
        raise json_error("record", f"{where}: a request must be an object, got {json_type(raw)}.")
    unknown = sorted(set(raw) - {"site", "top_k", "features"})
    if unknown:
        raise json_error("record", f"{where}: unknown key(s) {unknown}; allowed: 'site', 'top_k', 'features'.")
    if "site" not in raw:
        raise json_error("record", f"{where}: missing 'site'.")
    features = raw.get("features")
    if features is not None and not isinstance(features, list):
        raise json_error("record", f"{where}: 'features' must be a list of integers, got {json_type(features)}.")
    try:
        return Features(raw["site"], top_k=raw.get("top_k"), features=None if features is None else tuple(features))
    except (TypeError, ValueError) as exc:  # the constructor's own checks
        raise json_error("record", f"{where}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class FeatureRecord:
    """What a forward recorded at one site, for the whole batch; the tensors are the caller's.

    ``values [B, S, k]`` in the model's dtype. For a ``top_k`` request ``indices [B, S, k]``
    (int64) says which feature each value is, ``PAD_INDEX`` (value 0) at padding positions,
    in rows that recorded nothing, and past a row's own ``top_k`` (rows may ask for different
    ``k``; ``k`` is the largest). For a dense request ``indices`` is None, ``features`` names
    the columns, and rows that recorded nothing and padding positions hold zeros.
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    features: tuple[int, ...] | None = None


class RecordedSteps:
    """The records of the consecutive forwards of one generation, joined along the sequence axis."""

    def __init__(self) -> None:
        self._steps: dict[str, list[FeatureRecord]] = {}
        self.length = 0  # positions recorded so far

    def add(self, records: dict[str, FeatureRecord]) -> None:
        """Add one forward's records. A later forward of several tokens re-feeds the whole
        sequence (generation without a KV cache): only its new positions are kept."""
        seq = next(iter(records.values())).values.shape[1]
        start = self.length if self.length and seq > 1 else 0
        for name, record in records.items():
            indices = None if record.indices is None else record.indices[:, start:]
            self._steps.setdefault(name, []).append(FeatureRecord(record.values[:, start:], indices, record.features))
        self.length += seq - start

    def joined(self, length: int) -> dict[str, FeatureRecord]:
        """Every site's record over ``length`` positions: the recorded ones, then padding (the
        last generated token is never fed back, so it has no record)."""
        return {name: padded(_concat(steps), length - self.length) for name, steps in self._steps.items()}


def _concat(records: list[FeatureRecord]) -> FeatureRecord:
    first = records[0]
    indices = None if first.indices is None else torch.cat([r.indices for r in records], dim=1)
    return FeatureRecord(torch.cat([r.values for r in records], dim=1), indices, first.features)


def padded(record: FeatureRecord, positions: int) -> FeatureRecord:
    """``record`` with ``positions`` padding positions (value 0, index -1) after its own."""
    batch, _, width = record.values.shape
    values = torch.cat([record.values, record.values.new_zeros(batch, positions, width)], dim=1)
    if record.indices is None:
        return FeatureRecord(values, None, record.features)
    indices = torch.cat([record.indices, record.indices.new_full((batch, positions, width), PAD_INDEX)], dim=1)
    return FeatureRecord(values, indices, record.features)
