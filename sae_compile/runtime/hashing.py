"""Content keys for steerings: equal configurations share one row, across processes too.

The key is a SHA-256 over a canonical encoding:
- every field is tagged and length-prefixed, and each edit kind has its own tag
  (``add`` / ``clamp`` / ``reconstruct``), so kinds never collide;
- edits are put in a canonical order wherever order does not change the result (sites,
  additive vectors, clamps on different features), and kept in order where it does
  (successive clamps on one feature);
- only bytes go in (no Python ``hash()``), so the key is stable across processes.
It is computed at admission, never on the per-step path.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import torch

from ..edits import AddVector, Clamp, Reconstruct, Steering

_VERSION = b"sae_compile.steering.v1"
_MODE_CODES = {"set": 0, "add": 1, "scale": 2}


def steering_key(steering: Steering, resolve: Callable[[str], str] = str) -> str:
    """The content key of ``steering``; ``resolve`` canonicalises site names (aliases)."""
    by_site: dict[str, list] = {}
    for edit in steering.edits:
        by_site.setdefault(resolve(edit.site), []).append(edit)
    digest = hashlib.sha256(_VERSION)
    _field(digest, b"tokens", steering.tokens.encode())
    for site in sorted(by_site):
        _field(digest, b"site", site.encode())
        edits = by_site[site]
        for vector in sorted(_add_payload(e) for e in edits if isinstance(e, AddVector)):
            _field(digest, b"add", vector)
        clamps: dict[int, list[bytes]] = {}
        for e in edits:
            if isinstance(e, Clamp):
                clamps.setdefault(e.feature, []).append(struct.pack("<Bd", _MODE_CODES[e.mode], e.value))
        for feature in sorted(clamps):
            _field(digest, b"clamp", struct.pack("<q", feature) + b"".join(clamps[feature]))
        if any(isinstance(e, Reconstruct) for e in edits):
            _field(digest, b"reconstruct", b"")
    return digest.hexdigest()


def _field(digest: hashlib._Hash, tag: bytes, payload: bytes) -> None:
    digest.update(tag + b"\0" + struct.pack("<Q", len(payload)) + payload)


def _add_payload(edit: AddVector) -> bytes:
    values = edit.vector.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return struct.pack("<d", edit.scale) + values
