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
process resolves the handle against that process's state. Handles are deterministic
(``claim_handle_prefix``), so steering the same model the same way again produces the
same graph and hits that cache; two live models never share one.

The op assumes that nothing it reads changes while one graph runs: every write happens
between forwards (``SteeredModel`` serialises its calls and its state writes).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..sae import SAE
from .recording import SiteRecorder

NO_STEERING_ROW = 0


@dataclass(frozen=True)
class Capacity:
    """Sizes the static state is allocated at; exceeding one is a ValueError, never a realloc.

    ``with_call_rows`` says whether the tables hold rows for ``steering=`` on a call beside the slot
    rows (``SteeredModel`` does; an engine, whose every request is a slot, does not).
    ``max_top_k`` sizes each SAE site's feature-record buffers (0: no recording).
    """

    max_rows: int = 8
    max_clamps: int = 16
    max_batch: int = 32
    max_tokens: int = 16384
    with_call_rows: bool = True
    max_top_k: int = 0

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_clamps", "max_batch", "max_tokens", "max_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"steer(): {name} must be an int, got {type(value).__name__}.")
            if value < (0 if name == "max_top_k" else 1):
                raise ValueError(f"steer(): {name} must be at least {0 if name == 'max_top_k' else 1}, got {value}.")

    @property
    def table_rows(self) -> int:
        """Rows of every per-row table: the sentinel, then ``slot_rows``, then ``call_rows``."""
        return 1 + self.max_rows + len(self.call_rows)

    @property
    def slot_rows(self) -> range:
        """Rows for requests admitted through ``SteeredModel.slots`` (or an engine's requests)."""
        return range(1, self.max_rows + 1)

    @property
    def call_rows(self) -> range:
        """Rows for ``steering=`` on a call, apart from the slots so a call never evicts a request."""
        return range(self.max_rows + 1, (2 if self.with_call_rows else 1) * self.max_rows + 1)


SCOPE_ALL, SCOPE_PROMPT, SCOPE_GENERATED = 1, 2, 3
SCOPE_CODES = {"all": SCOPE_ALL, "prompt": SCOPE_PROMPT, "generated": SCOPE_GENERATED}


class RoutingState:
    """Which steering row each batch row uses, and which tokens are steered.

    Host-written (between forwards, by admission and batch assignment):
      ``batch_rows [max_batch]`` (steering row per batch row, 0 = none),
      ``batch_prompt_len [max_batch]`` (the row's prompt length), ``row_scope [R]``
      (``R = capacity.table_rows``)
      (per steering row: 1 all, 2 prompt, 3 generated).
    Device-computed (per forward, by ``route``): ``token_mask [max_tokens]`` and the same
    mask as 0/1 in the model dtype, ``token_weight [max_tokens]``.

    Token-major forwards (an engine's flattened ``[num_tokens, hidden]`` batch, ragged by
    request) use ``route_tokens`` instead: each token carries its steering row in
    ``token_rows [max_tokens]`` and its request's prompt length in
    ``token_prompt_len [max_tokens]``, and the mask is computed from them on the device.
    """

    def __init__(self, capacity: Capacity, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity = capacity
        self.batch_rows = torch.zeros(capacity.max_batch, dtype=torch.long, device=device)
        self.batch_prompt_len = torch.zeros(capacity.max_batch, dtype=torch.long, device=device)
        self.row_scope = torch.zeros(capacity.table_rows, dtype=torch.long, device=device)
        self.token_mask = torch.zeros(capacity.max_tokens, dtype=torch.bool, device=device)
        self.token_weight = torch.zeros(capacity.max_tokens, dtype=dtype, device=device)
        self.token_valid = torch.ones(capacity.max_tokens, dtype=torch.bool, device=device)
        self.token_rows = torch.zeros(capacity.max_tokens, dtype=torch.long, device=device)
        self.token_prompt_len = torch.zeros(capacity.max_tokens, dtype=torch.long, device=device)
        self._token_layout: tuple | None = None  # what token_rows and token_prompt_len hold
        self._scope_host = [0] * capacity.table_rows
        self._assigned: tuple[int, ...] = ()
        self._prompt_lens: tuple[int, ...] | None = ()  # what batch_prompt_len holds (None: a device value)
        self._pending_lens: list[int] | torch.Tensor | None = None  # asked for, unwritten: nothing read them
        self._version = 0
        self._routed: tuple | None = None
        # (batch, seq, version) of the last route of an all-unsteered assignment: the mask of
        # those tokens is all False, whatever their positions or padding, until a write.
        self._idle: tuple[int, int, int] | None = None
        self._cleared = 0  # token_mask / token_weight [:_cleared] are known to be all zero
        self._views: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def view(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a ``[batch, seq]`` forward: rows ``[B]``, token mask ``[B, S]`` and weight ``[B, S]``.

        Views of the static buffers, kept for the last shape (a decode loop repeats one): inside
        a step every tensor op the steering op runs costs several times what it costs in a
        loop of its own.
        """
        if self._views is None or self._views[0] != (batch, seq):
            n = batch * seq
            views = self.batch_rows[:batch], self.token_mask[:n].view(batch, seq), self.token_weight[:n].view(batch, seq)
            self._views = ((batch, seq), views)
        return self._views[1]

    @property
    def version(self) -> int:
        """Bumped by every host write (assignment, scope), so readers can cache what they derive."""
        return self._version

    def assigned_rows(self, batch: int) -> tuple[int, ...]:
        """The steering rows of the first ``batch`` batch rows, as last assigned (host copy)."""
        return self._assigned[:batch]

    def set_scope(self, row: int, scope: int) -> None:
        """Host write: steering ``row`` covers ``scope`` (0 none, 1 all, 2 prompt, 3 generated)."""
        self.row_scope[row] = scope
        self._scope_host[row] = scope
        self._version += 1

    def assign(self, rows: list[int], prompt_lens: list[int] | torch.Tensor) -> None:
        """Host write: batch row ``b`` uses steering row ``rows[b]`` with prompt length ``prompt_lens[b]``.

        ``prompt_lens`` may be a 0-d tensor on the device, shared by every row: a length that a
        static cache holds on the device is then used without reading it back (no host sync).
        A serving loop re-assigns every step, so unchanged rows cost nothing; new prompt lengths
        for them are written only once a row's scope reads them (``_route_scoped``).
        """
        on_device = isinstance(prompt_lens, torch.Tensor)
        if tuple(rows) == self._assigned:
            if not on_device and tuple(prompt_lens) == self._prompt_lens:
                self._pending_lens = None
                return
            if not self._reads_prompt_lens(rows):
                # Unsteered or tokens="all" rows: nothing reads them (yet).
                self._pending_lens = prompt_lens if on_device else tuple(prompt_lens)
                return
        # Batch rows past the assignment are unsteered, not whatever an earlier, larger one left.
        unassigned = [0] * (self.capacity.max_batch - len(rows))
        self.batch_rows.copy_(torch.tensor(rows + unassigned, dtype=torch.long), non_blocking=True)
        self._assigned = tuple(rows)
        self._write_prompt_lens(prompt_lens)
        self._version += 1

    def _write_prompt_lens(self, prompt_lens: list[int] | torch.Tensor | tuple[int, ...]) -> None:
        """``batch_prompt_len`` for the assigned rows (0 past them)."""
        count = len(self._assigned)
        if isinstance(prompt_lens, torch.Tensor):
            self.batch_prompt_len.zero_()[:count].copy_(prompt_lens.expand(count))
            self._prompt_lens = None
        else:
            unassigned = [0] * (self.capacity.max_batch - count)
            self.batch_prompt_len.copy_(torch.tensor(list(prompt_lens) + unassigned, dtype=torch.long), non_blocking=True)
            self._prompt_lens = tuple(prompt_lens)
        self._pending_lens = None

    def _reads_prompt_lens(self, rows: Sequence[int]) -> bool:
        """Whether any of ``rows`` has a scope that depends on the prompt length (prompt, generated)."""
        return any(self._scope_host[r] in (SCOPE_PROMPT, SCOPE_GENERATED) for r in rows)

    def route(self, positions: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, seq: int) -> None:
        """Device-only: mark the tokens of the next forward that are steered.

        ``positions`` (``[S]`` or ``[B, S]``, on the device) are the tokens' indices in the
        (padded) sequence: cache positions. A token is steered if its row has a steering
        whose scope covers it (prompt: position < the row's prompt length) and it is not
        padding. No host sync and no data-dependent shapes, so this can sit inside a
        captured CUDA graph and follow the positions from prefill into decode.
        """
        if self.is_routed(batch, seq, attention_mask):
            return
        valid = self._write_valid(attention_mask, batch, seq)
        if not any(self._assigned[:batch]) and not self._capturing():
            self._route_idle(batch, seq)
        else:
            padded = attention_mask is not None and attention_mask.dim() == 2
            self._route_scoped(positions, valid if padded else None, batch, seq)
        static = attention_mask is None and all(self._scope_host[r] in (0, SCOPE_ALL) for r in self._assigned[:batch])
        self._routed = (batch, seq, self._version) if static else None

    def _route_scoped(self, positions: torch.Tensor, valid: torch.Tensor | None, batch: int, seq: int) -> None:
        """The mask from each row's scope and prompt length, and ``valid [B, S]`` (padding) if given."""
        rows, token_mask, token_weight = self.view(batch, seq)  # [B], [B, S], [B, S]
        if self._pending_lens is not None and self._reads_prompt_lens(self._assigned[:batch]):
            self._write_prompt_lens(self._pending_lens)  # a scope that reads them came in since
        in_prompt = positions.reshape(-1, seq) < self.batch_prompt_len[:batch, None]  # [B, S]
        mask = _scope_mask(self.row_scope[rows][:, None], in_prompt)  # [B, S]
        token_mask.copy_(mask if valid is None else mask & valid)
        token_weight.copy_(token_mask)
        self._idle, self._cleared = None, 0

    def _write_valid(self, attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        """``token_valid [B, S]``: False on padding (attention_mask 0), which is never steered or recorded."""
        valid = self.valid(batch, seq)
        if attention_mask is not None and attention_mask.dim() == 2:
            # (A 4-D mask, as static-cache generation passes, has no per-token padding column to
            # read; a pad token's own output is unused anyway.)
            valid.copy_(attention_mask[:, -seq:] != 0)
        else:
            valid.fill_(True)
        return valid

    def _route_idle(self, batch: int, seq: int) -> None:
        """No assigned row steers: the mask is all False, with no scope arithmetic, and is not
        rewritten while it stays so. Never under capture: a replay must recompute the mask."""
        n = batch * seq
        if self._cleared < n:
            self.token_mask[:n].zero_()
            self.token_weight[:n].zero_()
            self._cleared = n
        self._idle = (batch, seq, self._version)

    def idle_routed(self, batch: int, seq: int) -> bool:
        """True when the mask already says "steer nothing" for a ``[batch, seq]`` forward: the last
        route was of an all-unsteered assignment at this shape and nothing was written since. The
        padding of the forward does not matter then, except to recording (``token_valid``)."""
        return self._idle == (batch, seq, self._version) and not self._capturing()

    def route_tokens(self, rows: Sequence[int], prompt_lens: Sequence[int], counts: torch.Tensor, positions: torch.Tensor) -> None:
        """Route a token-major forward: request ``i`` uses steering row ``rows[i]``, has prompt
        length ``prompt_lens[i]`` and owns the next ``counts[i]`` tokens (``counts``: a host
        tensor). Tokens past ``counts.sum()`` (an engine's padding) are unsteered.

        The per-token rows are expanded on the host and copied only when the layout changes (a
        decode loop repeats one); the scope mask is computed on the device from ``positions
        [num_tokens]``, so prompt/generated scopes follow the positions without a host read.
        """
        tokens = positions.shape[0]
        if tokens > self.capacity.max_tokens:
            raise ValueError(f"route_tokens: {tokens} tokens exceed max_tokens={self.capacity.max_tokens}.")
        layout = (tuple(rows), tuple(prompt_lens), tuple(counts.tolist()), tokens)
        if layout != self._token_layout:
            self._write_token_layout(rows, prompt_lens, counts, tokens)
            self._token_layout = layout
            if tuple(rows) != self._assigned:
                self._assigned, self._prompt_lens = tuple(rows), tuple(prompt_lens)
                self._version += 1
        if self._routed == (layout, self._version) and not self._capturing():
            return  # no row's scope depends on position and nothing changed: the mask stands
        in_prompt = positions < self.token_prompt_len[:tokens]  # [N]
        mask = _scope_mask(self.row_scope[self.token_rows[:tokens]], in_prompt)  # [N]
        self.token_mask[:tokens].copy_(mask)
        self.token_weight[:tokens].copy_(mask)
        self._idle, self._cleared = None, 0
        static = all(self._scope_host[r] in (0, SCOPE_ALL) for r in rows)
        self._routed = (layout, self._version) if static else None

    def _write_token_layout(self, rows: Sequence[int], prompt_lens: Sequence[int], counts: torch.Tensor, tokens: int) -> None:
        counts = counts.to(torch.long)
        padding = tokens - int(counts.sum())
        if padding < 0:
            raise ValueError(f"route_tokens: the requests own {int(counts.sum())} tokens but the forward has {tokens}.")
        for buffer, values in ((self.token_rows, rows), (self.token_prompt_len, prompt_lens)):
            expanded = torch.repeat_interleave(torch.tensor(list(values), dtype=torch.long), counts)  # [N - padding]
            buffer[:tokens].copy_(torch.cat([expanded, torch.zeros(padding, dtype=torch.long)]), non_blocking=True)

    def valid(self, batch: int, seq: int) -> torch.Tensor:
        """``[B, S]``: which tokens of the routed ``[batch, seq]`` forward are not padding."""
        return self.token_valid[: batch * seq].view(batch, seq)

    def view_tokens(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a token-major forward of ``tokens`` tokens: rows ``[N]``, mask ``[N, 1]`` and weight
        ``[N, 1]``, the shapes of a ``[N, 1]`` batch, so every steering path serves both forms."""
        return self.token_rows[:tokens], self.token_mask[:tokens].view(tokens, 1), self.token_weight[:tokens].view(tokens, 1)

    def is_routed(self, batch: int, seq: int, attention_mask: torch.Tensor | None) -> bool:
        """True when ``route`` would write what the mask already holds: no assigned row's scope
        depends on position, there is no padding, and neither the shape nor the assignment changed.
        Never while a CUDA graph is captured: its replays must recompute the mask."""
        if self._capturing():
            return False
        return attention_mask is None and self._routed == (batch, seq, self._version)

    def _capturing(self) -> bool:
        return self.token_mask.is_cuda and torch.cuda.is_current_stream_capturing()

    def tensors(self) -> dict[str, torch.Tensor]:
        names = (
            "batch_rows", "batch_prompt_len", "row_scope", "token_mask", "token_weight", "token_valid", "token_rows",
            "token_prompt_len",
        )
        return {f"routing.{name}": getattr(self, name) for name in names}


def _scope_mask(scope: torch.Tensor, in_prompt: torch.Tensor) -> torch.Tensor:
    """Which tokens a steering row's scope covers, from the row's scope code and whether the token
    is in its prompt (broadcast together)."""
    return (scope == SCOPE_ALL) | ((scope == SCOPE_PROMPT) & in_prompt) | ((scope == SCOPE_GENERATED) & ~in_prompt)


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


@dataclass(frozen=True)
class Paths:
    """Which paths a forward runs at one site (see ``kernels.steer``), or, declared for a
    CUDA-graph capture, which paths the captured graph holds at every site that can run them.

    ``add``: additive vectors; ``sparse``: the clamps of delta rows on an elementwise SAE;
    ``full``: Reconstruct rows and clamps on a TopK SAE; ``record``: reading features
    (``record=``). A replay of a graph serves an assignment only if its paths ``cover`` what
    the assignment needs.
    """

    add: bool = False
    sparse: bool = False
    full: bool = False
    record: bool = False

    def covers(self, needed: Paths) -> bool:
        """Whether a graph holding these paths serves a forward that needs ``needed``."""
        return all(have or not need for have, need in zip(self.flags, needed.flags, strict=True))

    def __or__(self, other: Paths) -> Paths:
        return Paths(*(a or b for a, b in zip(self.flags, other.flags, strict=True)))

    @property
    def flags(self) -> tuple[bool, bool, bool, bool]:
        """``(add, sparse, full, record)``."""
        return self.add, self.sparse, self.full, self.record


#: What a capture holds unless told otherwise: every steering path, and no recording (which
#: would add a full encode of every token to each replay).
STEERING_PATHS = Paths(add=True, sparse=True, full=True)

_DECLARED = threading.local()


@contextlib.contextmanager
def capture_paths(paths: Paths = STEERING_PATHS) -> Iterator[None]:
    """Within this block (on this thread), forwards run as a captured CUDA graph holding
    ``paths`` does: each site runs those of ``paths`` it can run, whatever rows are assigned,
    and decides nothing from host state that a replay would not see.

    Warmup runs under it, so that each kernel a capture will hold has been compiled and
    launched before the capture: lazy initialisation inside a captured region is an error.
    """
    previous = getattr(_DECLARED, "paths", None)
    _DECLARED.paths = paths
    try:
        yield
    finally:
        _DECLARED.paths = previous


def declared_paths() -> Paths | None:
    """The paths ``capture_paths`` declared on this thread, or None outside it."""
    return getattr(_DECLARED, "paths", None)


class SparseTables(NamedTuple):
    """The sparse-delta tables of a batch's steering rows (``C`` clamp slots, ``D`` wide)."""

    enc_t: torch.Tensor  # [B, D, C] the clamped features' encoder columns
    dec: torch.Tensor  # [B, C, D] their decoder rows
    b_enc: torch.Tensor  # [B, 1, C] fp32
    threshold: torch.Tensor  # [B, 1, C] fp32 (0 for ReLU)
    mul_m1: torch.Tensor  # [B, 1, C] fp32, mul - 1
    shift: torch.Tensor  # [B, 1, C] fp32


# Columns (features) per step when copying or folding SAE weights: bounds the scratch of a
# dtype or device conversion to a few MiB instead of a second copy of the weights.
_COPY_ELEMENTS = 1 << 20


class SiteState:
    """The SAE buffers and the per-row edit tables of one attached site.

    The site holds no reference to the ``SAE`` it was given: its weights live only in the
    buffers below, in the model's dtype, so attaching an SAE the caller then drops costs one
    copy of it.

    SAE buffers (``F`` features, ``D`` = the site's width, model dtype):
      ``W_enc [D, F]`` (the SAE's own layout, the fast one for a dense encode on CPU),
      ``b_enc [F]`` (with ``-b_dec @ W_enc`` folded in when the SAE subtracts b_dec from its
      input), ``threshold [F]`` (0 for ReLU), ``W_dec [F, D]``, ``b_dec [D]``.
    Row tables (``R = capacity.table_rows``, ``C = max_clamps``); unused slots are all-zero or
    the identity, so they contribute exactly nothing:
      ``add_vec [R, D]``: the additive vector.
      Sparse delta rows (clamps on an elementwise SAE), pre-gathered at admission so a
      forward reads ``C`` features, not ``F``: ``sparse_enc [R, C, D]`` and
      ``sparse_dec [R, C, D]`` (the clamped features' encoder and decoder rows) and
      ``sparse_params [R, 4, C]`` fp32 (``b_enc``, ``threshold``, ``mul - 1``, ``shift``).
      Full rows (Reconstruct, or clamps on a TopK SAE): ``clamp_idx [R, C]``,
      ``clamp_mul [R, C]``, ``clamp_shift [R, C]`` fp32, ``full_row [R]``, ``reconstruct_row [R]``.
    """

    def __init__(
        self,
        name: str,
        width: int,
        sae: SAE | None,
        capacity: Capacity,
        routing: RoutingState,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.name = name
        self.width = width
        self.capacity = capacity
        self.routing = routing
        self.has_sae = sae is not None
        self.activation = None if sae is None else sae.activation
        self.k = None if sae is None else sae.k
        self.d_sae = 0 if sae is None else sae.d_sae
        self.layer_norm_input = False  # the SAE normalises its input (set by _load_sae; see kernels.steer)
        self._captured_layer_norm: bool | None = None  # layer_norm_input when a CUDA graph captured the site
        self._allocate(max(self.d_sae, 1), dtype, device)
        # Host mirrors: what each row holds, so the op can skip whole paths without reading
        # device memory (no host sync) and a hot swap can re-gather the sparse rows.
        self._edits: dict[int, RowEdits] = {}
        self._add_rows: set[int] = set()
        self._sparse_rows: set[int] = set()
        self._full_rows: set[int] = set()
        self._version = 0
        self._paths: tuple[tuple[int, int, int, bool], Paths] | None = None
        self._tables_version = 0  # bumped by every write to the sparse tables
        self._tables: tuple[tuple[torch.Tensor, int, int], SparseTables] | None = None
        self.broken: str | None = None
        self.handle: str | None = None  # set by register_site
        self.recorder: SiteRecorder | None = None  # set by allocate_sites when recording is sized
        if sae is not None:
            self._load_sae(sae)

    def _allocate(self, width: int, dtype: torch.dtype, device: torch.device) -> None:
        rows, clamps, d = self.capacity.table_rows, self.capacity.max_clamps, self.width

        def zeros(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.W_enc, self.b_enc, self.threshold = zeros(d, width), zeros(width), zeros(width)
        self.W_dec, self.b_dec = zeros(width, d), zeros(d)
        self.add_vec = zeros(rows, d)
        self.sparse_enc, self.sparse_dec = zeros(rows, clamps, d), zeros(rows, clamps, d)
        self.sparse_params = zeros(rows, 4, clamps, dtype=torch.float32)
        self.clamp_idx = zeros(rows, clamps, dtype=torch.long)
        self.clamp_mul = torch.ones(rows, clamps, dtype=torch.float32, device=device)
        self.clamp_shift = zeros(rows, clamps, dtype=torch.float32)
        self.full_row = zeros(rows, dtype=torch.bool)
        self.reconstruct_row = zeros(rows, dtype=torch.bool)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the site steers in: the model's."""
        return self.W_dec.dtype

    @property
    def elementwise(self) -> bool:
        """True when each feature depends on its own encoder column only (ReLU, JumpReLU)."""
        return self.activation in ("relu", "jumprelu")

    def live_paths(self, batch: int) -> Paths:
        """The paths the first ``batch`` batch rows need: their steering rows' and, when this
        site records in the next forward, ``record``.

        Read from host mirrors only (no device sync), and cached until the assignment, a row
        or the record plan changes, so a decode step pays a tuple compare.
        """
        recording = self.recorder is not None and self.recorder.plan is not None
        key = (self.routing.version, self._version, batch, recording)
        if self._paths is None or self._paths[0] != key:
            rows = set(self.routing.assigned_rows(batch))
            steering = (bool(rows & kind) for kind in (self._add_rows, self._sparse_rows, self._full_rows))
            self._paths = (key, Paths(*steering, record=recording))
        return self._paths[1]

    def paths_within(self, declared: Paths) -> Paths:
        """The paths of ``declared`` this site can run: a captured graph holds them whatever
        rows a later replay is given."""
        return Paths(
            add=declared.add,
            sparse=declared.sparse and self.elementwise,
            full=declared.full and self.d_sae > 0,
            record=declared.record and self.recorder is not None,
        )

    def sparse_tables(self, rows: torch.Tensor) -> SparseTables:
        """The sparse-delta tables of steering ``rows [B]``, gathered.

        A decode loop passes the routing's cached view of its rows every step, so on the CPU,
        outside a capture, the gather is kept for as long as that view, the assignment and the
        rows' edits stand: six ops fewer per step, which costs tens of µs each inside a step.
        """
        if rows.is_cuda or declared_paths() is not None:
            return self._gather_tables(rows)
        key = (rows, self.routing.version, self._tables_version)
        cached = self._tables
        if cached is None or cached[0][0] is not rows or cached[0][1:] != key[1:]:
            cached = self._tables = (key, self._gather_tables(rows))
        return cached[1]

    def _gather_tables(self, rows: torch.Tensor) -> SparseTables:
        enc = self.sparse_enc.index_select(0, rows)  # [B, C, D]
        params = self.sparse_params.index_select(0, rows)[:, :, None, :].unbind(1)  # 4 x [B, 1, C]
        return SparseTables(enc.transpose(1, 2), self.sparse_dec.index_select(0, rows), *params)

    def max_feature(self) -> int:
        """The largest feature index any live row clamps (-1 if none)."""
        return max((max(e.features, default=-1) for e in self._edits.values()), default=-1)

    def write_row(self, row: int, edits: RowEdits | None) -> None:
        """Make steering ``row`` do ``edits`` at this site (``None``: nothing). In place."""
        edits = edits or RowEdits()
        n = len(edits.features)
        full = edits.reconstruct or (n > 0 and not self.elementwise)
        sparse = n > 0 and not full
        idx = torch.zeros(self.clamp_idx.shape[1], dtype=torch.long)
        mul = torch.ones(self.clamp_idx.shape[1], dtype=torch.float32)
        shift = torch.zeros(self.clamp_idx.shape[1], dtype=torch.float32)
        idx[:n] = torch.tensor(edits.features, dtype=torch.long)
        mul[:n] = torch.tensor(edits.mul, dtype=torch.float32)
        shift[:n] = torch.tensor(edits.shift, dtype=torch.float32)
        with torch.no_grad():
            self.add_vec[row].copy_(edits.add if edits.add is not None else torch.zeros(self.width))
            self.clamp_idx[row].copy_(idx)
            self.clamp_mul[row].copy_(mul if full else torch.ones_like(mul))
            self.clamp_shift[row].copy_(shift if full else torch.zeros_like(shift))
            self.full_row[row] = full
            self.reconstruct_row[row] = edits.reconstruct
        self._edits[row] = edits
        for rows, member in ((self._add_rows, edits.add is not None), (self._sparse_rows, sparse), (self._full_rows, full)):
            (rows.add if member else rows.discard)(row)
        self._version += 1
        self._gather_sparse(row)

    def _gather_sparse(self, row: int) -> None:
        """Copy the encoder/decoder rows and parameters of ``row``'s clamped features into the
        sparse tables (all zero unless the row is a sparse delta row)."""
        edits = self._edits.get(row, RowEdits())
        n = len(edits.features) if row in self._sparse_rows else 0
        self._tables_version += 1
        idx = torch.tensor(edits.features[:n], dtype=torch.long, device=self.W_enc.device)
        with torch.no_grad():
            for table in (self.sparse_enc[row], self.sparse_dec[row], self.sparse_params[row]):
                table.zero_()
            self.sparse_enc[row, :n].copy_(self.W_enc[:, idx].t())
            self.sparse_dec[row, :n].copy_(self.W_dec[idx])
            self.sparse_params[row, 0, :n].copy_(self.b_enc[idx])
            self.sparse_params[row, 1, :n].copy_(self.threshold[idx])
            self.sparse_params[row, 2, :n].copy_(torch.tensor(edits.mul[:n]) - 1.0)
            self.sparse_params[row, 3, :n].copy_(torch.tensor(edits.shift[:n]))

    def _load_sae(self, sae: SAE) -> None:
        """Copy ``sae`` into the buffers (features past its width become all-zero and never
        fire), then re-gather the sparse rows from it.

        Everything that allocates more than a chunk (the b_dec fold) runs before the first
        write; the large copies go a chunk of features at a time, so a conversion to the
        model's dtype or device never holds a second copy of the weights.
        """
        f = sae.d_sae
        b_enc = _folded_b_enc(sae)  # [F] fp64
        with torch.no_grad():
            _copy_features(self.W_enc, sae.W_enc, dim=1)
            _copy_features(self.W_dec, sae.W_dec, dim=0)
            self.b_enc[:f].copy_(b_enc)
            self.threshold[:f].copy_(sae.threshold if sae.threshold is not None else torch.zeros(f))
            self.b_dec.copy_(sae.b_dec)
            for buffer in (self.b_enc, self.threshold):
                buffer[f:].zero_()
        for row in self._sparse_rows:
            self._gather_sparse(row)
        # A host flag the op reads on every call: swapping it recompiles nothing (the op is opaque).
        self.layer_norm_input = sae.layer_norm_input

    def note_capture(self) -> None:
        """Record that a CUDA graph is capturing this site: the graph holds the kernels of the
        current SAE's input normalisation (or of none), so a later swap must keep it."""
        self._captured_layer_norm = self.layer_norm_input

    def swap_sae(self, sae: SAE) -> None:
        """Replace this site's SAE in place, without recompiling.

        The new SAE must fit the buffers (``d_sae`` up to the attached SAE's), keep the
        activation (and ``k``), and cover every feature a live steering row clamps. It may add or
        drop input layer normalisation (``layer_norm_input``), unless a CUDA graph has captured the
        site: the captured kernels would keep the old arithmetic. Every
        check runs before anything is written, so a rejected SAE changes nothing. The copy
        keeps no backup of the old weights (that would double the site's memory at its
        peak): if the copy itself fails (say the device runs out of memory for a chunk),
        the site is marked broken, forwards raise, and a later successful ``swap_sae``
        repairs it.
        """
        self._check_swap(sae)
        self.broken = f"load_sae failed while copying a new SAE into {self.name}"
        self._load_sae(sae)
        self.d_sae, self.broken = sae.d_sae, None

    def _check_swap(self, sae: SAE) -> None:
        if not self.has_sae:
            raise ValueError(
                f"load_sae: {self.name} was attached for additive steering only, so it has no SAE buffers. "
                "Attaching an SAE there needs sc.steer() again (one recompile)."
            )
        if sae.d_in != self.width:
            raise ValueError(f"load_sae: the SAE has d_in={sae.d_in} but {self.name} is {self.width} wide.")
        capacity = self.W_enc.shape[1]
        if sae.d_sae > capacity:
            raise ValueError(
                f"load_sae: the SAE has d_sae={sae.d_sae} but the buffers at {self.name} hold {capacity} features. "
                "A wider SAE needs sc.steer() again (one recompile)."
            )
        if (sae.activation, sae.k) != (self.activation, self.k):
            raise ValueError(
                f"load_sae: {self.name} runs activation={self.activation!r} (k={self.k}); the new SAE has "
                f"{sae.activation!r} (k={sae.k}). Changing the activation changes the compiled arithmetic: "
                "use sc.steer() again."
            )
        self._check_captured_layer_norm(sae)
        used = self.max_feature()
        if used >= sae.d_sae:
            raise ValueError(
                f"load_sae: a live steering row clamps feature {used} at {self.name}, beyond the new SAE's "
                f"d_sae={sae.d_sae}. Release or update those requests first."
            )
        if sae.device.type == "meta":
            raise ValueError(f"load_sae: the SAE for {self.name} is on the meta device and has no values to copy.")

    def _check_captured_layer_norm(self, sae: SAE) -> None:
        if self._captured_layer_norm not in (None, sae.layer_norm_input):
            raise ValueError(
                f"load_sae: a CUDA graph captured {self.name} with layer_norm_input={self._captured_layer_norm}; "
                f"the new SAE has layer_norm_input={sae.layer_norm_input}. The captured graph would keep "
                "normalising (or not) as before. Swap to an SAE with the same input normalisation, or call "
                "sc.steer() again and capture anew."
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.{n}": getattr(self, n) for n in (*_SAE_BUFFERS, *_ROW_TABLES)}

    def weight_bytes(self) -> int:
        """Bytes of the SAE buffers (``W_enc``, ``W_dec``, ``b_enc``, ``threshold``, ``b_dec``)."""
        return sum(getattr(self, n).nbytes for n in _WEIGHTS)

    def table_bytes(self) -> int:
        """Bytes of the per-row tables (the sparse gathers included)."""
        return sum(getattr(self, n).nbytes for n in (*_SAE_BUFFERS, *_ROW_TABLES) if n not in _WEIGHTS)


def _folded_b_enc(sae: SAE) -> torch.Tensor:
    """``b_enc`` in fp64, minus ``b_dec @ W_enc`` when the SAE subtracts ``b_dec`` from its input:
    ``(x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc)``. Folded a chunk of
    features at a time, so no fp64 copy of ``W_enc`` exists at once."""
    b_enc = sae.b_enc.detach().to("cpu", torch.float64, copy=True)  # [F]
    if not sae.apply_b_dec_to_input:
        return b_enc
    b_dec = sae.b_dec.detach().double()  # [D]
    step = max(1, _COPY_ELEMENTS // sae.d_in)
    for start in range(0, sae.d_sae, step):
        cols = slice(start, start + step)
        b_enc[cols] -= (b_dec @ sae.W_enc[:, cols].double()).cpu()  # [step]
    return b_enc


def _copy_features(buffer: torch.Tensor, weights: torch.Tensor, dim: int) -> None:
    """``buffer`` gets ``weights`` along feature dimension ``dim``, and zeros past its width."""
    f = weights.shape[dim]
    per_feature = weights.numel() // f
    step = max(1, _COPY_ELEMENTS // per_feature)
    for start in range(0, f, step):
        length = min(step, f - start)
        buffer.narrow(dim, start, length).copy_(weights.narrow(dim, start, length))
    buffer.narrow(dim, f, buffer.shape[dim] - f).zero_()


_WEIGHTS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
_SAE_BUFFERS = (*_WEIGHTS, "sparse_enc", "sparse_dec", "sparse_params")
_ROW_TABLES = ("add_vec", "clamp_idx", "clamp_mul", "clamp_shift", "full_row", "reconstruct_row")

_REGISTRY: weakref.WeakValueDictionary[str, SiteState] = weakref.WeakValueDictionary()
_PREFIXES: weakref.WeakValueDictionary[str, RoutingState] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def claim_handle_prefix(digest: str, owner: RoutingState) -> str:
    """The lowest free handle prefix ``{digest}.{n}``, held for as long as ``owner`` lives.

    ``digest`` is deterministic for a model and its attached sites, so steering the same
    model the same way again (once the previous ``SteeredModel`` is gone, or in a fresh
    process) yields the same handles and the same graph; ``n`` keeps models that are alive
    at the same time apart.
    """
    with _REGISTRY_LOCK:
        n = 0
        while f"{digest}.{n}" in _PREFIXES:
            n += 1
        prefix = f"{digest}.{n}"
        _PREFIXES[prefix] = owner
        return prefix


def register_site(handle: str, state: SiteState) -> None:
    """Make ``state`` what ``torch.ops.sae_compile.steer(x, handle)`` reads, until ``state`` is
    garbage-collected. A handle that a live state already holds is an error, never replaced."""
    with _REGISTRY_LOCK:
        current = _REGISTRY.get(handle)
        if current is not None and current is not state:
            raise RuntimeError(
                f"sae_compile: site handle {handle!r} is already held by a live steering state. Two "
                "models sharing a handle would read each other's steering. Handles come from "
                "claim_handle_prefix(), which never hands out a live one: use it."
            )
        _REGISTRY[handle] = state
        state.handle = handle


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


def live_handles() -> list[str]:
    """Every handle whose state is alive (tests check that none leak)."""
    with _REGISTRY_LOCK:
        return list(_REGISTRY.keys())


def allocate_sites(
    saes: dict[str, SAE | None],
    widths: Mapping[str, int],
    capacity: Capacity,
    dtype: torch.dtype,
    device: torch.device,
    digest: str,
) -> tuple[RoutingState, dict[str, SiteState], str]:
    """One routing and one registered state per named site (``None``: additive steering only),
    ``widths[name]`` wide, under handles ``{prefix}:{name}`` with a prefix claimed for
    ``digest``; returns the prefix too."""
    routing = RoutingState(capacity, dtype, device)
    prefix = claim_handle_prefix(digest, routing)
    states = {
        name: SiteState(name, widths[name], sae, capacity, routing, dtype, device) for name, sae in saes.items()
    }
    for name, state in states.items():
        if capacity.max_top_k and state.has_sae:
            state.recorder = SiteRecorder(
                name, capacity.max_tokens, capacity.max_batch, capacity.max_top_k, state.W_enc.shape[1], dtype, device
            )
        register_site(f"{prefix}:{name}", state)
    return routing, states, prefix
