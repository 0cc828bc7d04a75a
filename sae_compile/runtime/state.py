"""Static steering state: every tensor the op reads, allocated once at capacity.

Two kinds of state, both written only in place so their ``data_ptr()``s never change
(which is what lets a captured CUDA graph keep reading them):

- ``RoutingState`` (one per steered model): for the next forward, which steering row
  each batch row uses, and which tokens are steered at all (scope and padding applied).
- ``SiteState`` (one per attached site): the SAE weights in the model's dtype, and the
  per-row edit tables. Row 0 is the "no steering" sentinel and is never written.

The op finds a ``SiteState`` through a string handle registered here, so the compiled
graph holds only that string: no tensor of ours is a graph input, which keeps the op
usable from post-grad passes too, and a graph loaded from the FX graph cache in a fresh
process resolves the handle against that process's state.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..sae import SAE

NO_STEERING_ROW = 0


@dataclass(frozen=True)
class Capacity:
    """Sizes the static state is allocated at; exceeding one is a ValueError, never a realloc."""

    max_rows: int = 8
    max_clamps: int = 16
    max_batch: int = 32
    max_tokens: int = 16384

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_clamps", "max_batch", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"steer(): {name} must be a positive int, got {value!r}.")


class RoutingState:
    """Per-forward routing: ``batch_rows [max_batch]`` and ``token_mask [max_tokens]``."""

    def __init__(self, capacity: Capacity, device: torch.device) -> None:
        self.batch_rows = torch.zeros(capacity.max_batch, dtype=torch.long, device=device)
        self.token_mask = torch.zeros(capacity.max_tokens, dtype=torch.bool, device=device)
        self.capacity = capacity

    def view(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``[batch]`` and token mask ``[batch, seq]`` for a forward of that shape."""
        return self.batch_rows[:batch], self.token_mask[: batch * seq].view(batch, seq)

    def write(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Route the next forward: ``rows [B]`` (steering row per batch row), ``mask [B, S]``."""
        batch, seq = mask.shape
        self.batch_rows[:batch].copy_(rows, non_blocking=True)
        self.token_mask[: batch * seq].view(batch, seq).copy_(mask, non_blocking=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"routing.batch_rows": self.batch_rows, "routing.token_mask": self.token_mask}


@dataclass
class RowEdits:
    """What one steering row does at one site, staged on the host before commit.

    Clamps are already composed per feature: feature ``i`` becomes ``mul * f_i + shift``.
    """

    add: torch.Tensor | None = None  # [D] fp32, the sum of scale * vector
    features: tuple[int, ...] = ()
    mul: tuple[float, ...] = ()
    shift: tuple[float, ...] = ()
    reconstruct: bool = False

    @property
    def uses_sae(self) -> bool:
        return bool(self.features) or self.reconstruct


class SiteState:
    """The SAE and the per-row edit tables of one attached site.

    SAE buffers (``F`` features, ``D`` = hidden size, model dtype):
      ``W_enc_t [F, D]`` (encoder columns as rows, so gathering features is contiguous),
      ``b_enc [F]`` (with ``-b_dec @ W_enc`` folded in when the SAE subtracts b_dec from its
      input), ``threshold [F]`` (0 for ReLU), ``W_dec [F, D]``, ``b_dec [D]``.
    Row tables (``R = max_rows + 1``, ``C = max_clamps``):
      ``add_vec [R, D]``, ``clamp_idx [R, C]``, ``clamp_mul [R, C]`` and ``clamp_shift [R, C]``
      (fp32; unused slots are the identity ``mul=1, shift=0``), ``sparse_row [R]`` (clamps via
      the O(K·D) delta) and ``full_row [R]`` (needs the full encode), ``reconstruct_row [R]``.
    """

    def __init__(
        self,
        name: str,
        hidden_size: int,
        sae: SAE | None,
        capacity: Capacity,
        routing: RoutingState,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        rows, clamps = capacity.max_rows + 1, capacity.max_clamps
        self.name = name
        self.hidden_size = hidden_size
        self.capacity = capacity
        self.routing = routing
        self.sae = sae
        self.activation = None if sae is None else sae.activation
        self.k = None if sae is None else sae.k
        self.d_sae = 0 if sae is None else sae.d_sae
        f = max(self.d_sae, 1)
        self.W_enc_t = torch.zeros(f, hidden_size, dtype=dtype, device=device)
        self.b_enc = torch.zeros(f, dtype=dtype, device=device)
        self.threshold = torch.zeros(f, dtype=dtype, device=device)
        self.W_dec = torch.zeros(f, hidden_size, dtype=dtype, device=device)
        self.b_dec = torch.zeros(hidden_size, dtype=dtype, device=device)
        self.add_vec = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.clamp_idx = torch.zeros(rows, clamps, dtype=torch.long, device=device)
        self.clamp_mul = torch.ones(rows, clamps, dtype=torch.float32, device=device)
        self.clamp_shift = torch.zeros(rows, clamps, dtype=torch.float32, device=device)
        self.sparse_row = torch.zeros(rows, dtype=torch.bool, device=device)
        self.full_row = torch.zeros(rows, dtype=torch.bool, device=device)
        self.reconstruct_row = torch.zeros(rows, dtype=torch.bool, device=device)
        # Host mirrors of "does any row need this path": let the op skip whole paths
        # without reading device memory (no host sync).
        self.any_add = self.any_sparse = self.any_full = False
        if sae is not None:
            self._load_sae(sae)

    @property
    def elementwise(self) -> bool:
        """True when each feature depends on its own encoder column only (ReLU, JumpReLU)."""
        return self.activation in ("relu", "jumprelu")

    def _load_sae(self, sae: SAE) -> None:
        b_enc = sae.b_enc.double()
        if sae.apply_b_dec_to_input:
            # (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc)
            b_enc = b_enc - sae.b_dec.double() @ sae.W_enc.double()
        with torch.no_grad():
            self.W_enc_t.copy_(sae.W_enc.t())
            self.b_enc.copy_(b_enc)
            if sae.threshold is not None:
                self.threshold.copy_(sae.threshold)
            self.W_dec.copy_(sae.W_dec)
            self.b_dec.copy_(sae.b_dec)

    def write_rows(self, edits: dict[int, RowEdits]) -> None:
        """Make rows ``1..R-1`` hold ``edits[row]`` (rows not given are cleared). In place."""
        rows, clamps = self.clamp_idx.shape
        add_vec = torch.zeros(rows, self.hidden_size, dtype=torch.float32)
        idx = torch.zeros(rows, clamps, dtype=torch.long)
        mul = torch.ones(rows, clamps, dtype=torch.float32)
        shift = torch.zeros(rows, clamps, dtype=torch.float32)
        sparse, full, recon = (torch.zeros(rows, dtype=torch.bool) for _ in range(3))
        for row, e in edits.items():
            n = len(e.features)
            if e.add is not None:
                add_vec[row] = e.add
            idx[row, :n] = torch.tensor(e.features, dtype=torch.long)
            mul[row, :n] = torch.tensor(e.mul, dtype=torch.float32)
            shift[row, :n] = torch.tensor(e.shift, dtype=torch.float32)
            needs_full = e.reconstruct or (n > 0 and not self.elementwise)
            full[row] = needs_full
            sparse[row] = n > 0 and not needs_full
            recon[row] = e.reconstruct
        with torch.no_grad():
            self.add_vec.copy_(add_vec)
            self.clamp_idx.copy_(idx)
            self.clamp_mul.copy_(mul)
            self.clamp_shift.copy_(shift)
            self.sparse_row.copy_(sparse)
            self.full_row.copy_(full)
            self.reconstruct_row.copy_(recon)
        self.any_add = any(e.add is not None for e in edits.values())
        self.any_sparse = bool(sparse.any())
        self.any_full = bool(full.any())

    def tensors(self) -> dict[str, torch.Tensor]:
        names = (
            "W_enc_t", "b_enc", "threshold", "W_dec", "b_dec", "add_vec", "clamp_idx", "clamp_mul",
            "clamp_shift", "sparse_row", "full_row", "reconstruct_row",
        )
        return {f"{self.name}.{n}": getattr(self, n) for n in names}


_REGISTRY: weakref.WeakValueDictionary[str, SiteState] = weakref.WeakValueDictionary()


def register_site(handle: str, state: SiteState) -> None:
    """Make ``state`` what ``torch.ops.sae_compile.steer(x, handle)`` reads."""
    _REGISTRY[handle] = state


def lookup_site(handle: str) -> SiteState:
    """The state behind a handle baked into a compiled graph."""
    try:
        return _REGISTRY[handle]
    except KeyError:
        raise RuntimeError(
            f"sae_compile: no steering state is registered for site handle {handle!r}. The compiled "
            "graph outlived the SteeredModel that owned it, or was loaded from a cache in a process "
            "that has not called sc.steer() the same way. Keep the SteeredModel alive while you call it."
        ) from None
