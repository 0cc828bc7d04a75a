"""``sc.steer()``: compile an HF model with SAE steering sites, and the model it returns."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import operator
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from .edits import AddVector, Clamp, Reconstruct, Steering
from .features import FeatureRecord, Features, RecordedSteps
from .lowering.backend import InnerBackend, SteeringBackend, fresh_entry_point, resolve_inner_backend
from .lowering.discovery import discover_sites
from .lowering.sites import DecoderLayout, Site, why_missing
from .runtime.capture import StepGraphs, capture
from .runtime.recording import RecordArg, Recording, RecordPlan, per_row_requests
from .runtime.slots import SlotManager
from .runtime.staging import SteeringArg, per_row_steerings
from .runtime.state import STEERING_PATHS, Capacity, Paths, RoutingState, SiteState, allocate_sites, capture_paths
from .sae import SAE

Sites = dict[Site, tuple[int, ...]]


def steer(
    model: nn.Module,
    saes: Mapping[str, SAE] | Sequence[SAE] | SAE | None = None,
    *,
    sites: Sequence[str] = (),
    backend: InnerBackend = "inductor",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    max_rows: int = 8,
    max_clamps: int = 16,
    max_batch: int = 32,
    max_tokens: int = 16384,
    max_top_k: int = 16,
    on_graph: Callable[[fx.GraphModule], None] | None = None,
) -> SteeredModel:
    """Compile ``model`` so that the given sites can be steered without recompiling.

    ``saes`` attaches an SAE per site: ``{site: SAE}``, or one SAE or a list of SAEs placed
    at their ``hook_name``. ``sites`` attaches further sites for additive steering
    (``AddVector``) only. Site names are TransformerLens hook names
    (``blocks.3.hook_resid_post``, ``blocks.3.attn.hook_z``, ``blocks.3.hook_mlp_in``) or HF
    module paths (``model.layers.3`` = resid_post, ``.self_attn`` = attn_out, ``.mlp`` =
    mlp_out). An SAE's ``d_in`` must equal the width of its site's tensor.

    ``backend``, ``mode``, ``options``, ``dynamic`` and ``fullgraph`` mean what they mean
    to ``torch.compile``; with ``fullgraph=False`` a call raises if a graph break hides a
    site. ``max_rows`` (distinct steerings per forward, for calls and for ``slots`` each),
    ``max_clamps`` (per steering and site), ``max_batch``, ``max_tokens`` (batch x sequence)
    and ``max_top_k`` (the widest ``record=`` request) size the static state. ``on_graph`` is
    called with every rewritten FX graph. With nothing attached, the result is plain
    ``torch.compile``. The model's weights and modules are not modified.
    """
    capacity = Capacity(max_rows, max_clamps, max_batch, max_tokens, max_top_k=max_top_k)
    layout, available = discover_sites(model, fullgraph=fullgraph)
    attached = _attach(layout, available, _sae_by_site(saes), sites)
    _check_widths(attached, available)
    routing, states, prefix = _allocate_state(model, available, attached, capacity)
    handles = {site: state.handle for site, state in states.items()}
    inner = resolve_inner_backend(backend, mode, options)
    steering_backend = SteeringBackend(model, layout, handles, inner, on_graph, fullgraph) if attached else None
    entry = fresh_entry_point(model.forward, prefix.replace(".", "_"))
    compiled = torch.compile(entry, backend=steering_backend or inner, dynamic=dynamic, fullgraph=fullgraph)
    return SteeredModel(model, layout, available, states, routing, compiled, steering_backend)


def _allocate_state(
    model: nn.Module, available: Sites, attached: dict[Site, SAE | None], capacity: Capacity
) -> tuple[RoutingState, dict[Site, SiteState], str]:
    """The routing and one registered state per attached site, under handles of their own."""
    param = next(model.parameters())
    digest = _handle_digest(model, attached, capacity, param)
    named = {site.name: sae for site, sae in attached.items()}
    widths = {site.name: available[site][-1] for site in attached}
    routing, by_name, prefix = allocate_sites(named, widths, capacity, param.dtype, param.device, digest)
    return routing, {site: by_name[site.name] for site in attached}, prefix


def _sae_by_site(saes: Mapping[str, SAE] | Sequence[SAE] | SAE | None) -> list[tuple[str, SAE]]:
    if saes is None:
        return []
    if isinstance(saes, SAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        pairs = list(saes.items())
    elif isinstance(saes, (list, tuple)):
        pairs = [(_hook_name(sae), sae) for sae in saes]
    else:
        raise TypeError(f"steer(): saes must be an SAE, a dict {{site: SAE}} or a list of SAEs, got {type(saes).__name__}.")
    for name, sae in pairs:
        if not isinstance(sae, SAE):
            raise TypeError(f"steer(): the value for site {name!r} must be an SAE, got {type(sae).__name__}.")
    return pairs


def _hook_name(sae: object) -> str:
    if not isinstance(sae, SAE):
        raise TypeError(f"steer(): a list of SAEs must hold SAE objects, got {type(sae).__name__}.")
    if sae.hook_name is None:
        raise ValueError(
            "steer(): an SAE given without a site must have a hook_name saying where it goes; "
            "pass {site: sae} instead, or build the SAE with hook_name=..."
        )
    return sae.hook_name


def _attach(layout: DecoderLayout, available: Sites, saes: list[tuple[str, SAE]], additive: Sequence[str]) -> dict[Site, SAE | None]:
    if isinstance(additive, str):
        raise TypeError("steer(): sites= takes a list of site names, not a single string.")
    attached: dict[Site, SAE | None] = {}
    for name, sae in [*saes, *((name, None) for name in additive)]:
        site = resolve_site(layout, available, name)
        if sae is not None and attached.get(site) is not None:
            raise ValueError(f"steer(): site {site.name} is given twice ({name!r}); attach one SAE per site.")
        attached[site] = sae if sae is not None else attached.get(site)
    return attached


def _check_widths(attached: dict[Site, SAE | None], available: Sites) -> None:
    for site, sae in attached.items():
        width = available[site][-1]
        if sae is not None and sae.d_in != width:
            raise ValueError(
                f"steer(): the SAE for {site.name} has d_in={sae.d_in} but the tensor at that site is "
                f"{width} wide. It was trained on a different model or site."
            )


def _handle_digest(model: nn.Module, attached: dict[Site, SAE | None], capacity: Capacity, param: torch.Tensor) -> str:
    """A digest of what the compiled graph depends on: the model's class and config, the dtype
    and device, the capacities and the attached sites. Equal for the same model steered the
    same way, in any process, so its graph hits the FX graph cache."""
    config = getattr(model, "config", None)
    parts = [
        type(model).__module__ + "." + type(model).__qualname__,
        config.to_json_string() if hasattr(config, "to_json_string") else repr(model),
        str(param.dtype),
        param.device.type,
        repr(capacity),
        *(f"{site.name}={_sae_signature(sae)}" for site, sae in sorted(attached.items())),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _sae_signature(sae: SAE | None) -> str:
    return "additive" if sae is None else f"{sae.activation}/{sae.k}/{sae.d_sae}"


def resolve_site(layout: DecoderLayout, available: Sites, name: str) -> Site:
    """The exposed site ``name`` refers to, or a ValueError listing the available ones."""
    try:
        site = layout.resolve(name)
    except ValueError:
        raise ValueError(
            f"Unknown site {name!r}. Available sites: {_listed(available)}. HF module paths work too "
            f"(e.g. {layout.layer_paths[0]!r} for resid_post)."
        ) from None
    if site not in available:
        raise ValueError(f"Site {name!r} does not exist: {why_missing(site, available)}. Available sites: {_listed(available)}.")
    return site


def _listed(sites: Iterable[Site]) -> str:
    return ", ".join(site.name for site in sorted(sites)) or "none"


def _resolve_attached(layout: DecoderLayout, available: Sites, attached: frozenset[Site], name: str) -> str:
    """The canonical name of attached site ``name``, or a ValueError saying what is attached."""
    site = resolve_site(layout, available, name)
    if site not in attached:
        raise ValueError(
            f"Site {name!r} ({site.name}) is not attached, so it cannot be steered or recorded. Attached sites: "
            f"{_listed(attached)}. Attaching a new site needs a new sc.steer() (one recompile)."
        )
    return site.name


class _CallRow:
    """Request id of the rows that ``steering=`` on a call admits; never equal to a user's id."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<call steering {self.index}>"


_WARMUP = _CallRow(-1)


class SteeredModel:
    """A compiled HF model whose attached sites can be steered per call without recompiling.

    ``steering=`` on ``__call__`` and ``generate`` takes ``None``, a ``Steering``, a list of
    edits (applied to every row; ``[]`` is no edits), or a list with one
    ``Steering``-or-``None`` per batch row. Production loops use ``slots`` (admit / update /
    release / assign) and ``step`` instead. A call's steering lives in rows of its own, so
    it never evicts or re-routes a request admitted through ``slots``.

    Threads: every call and every state write (``slots``, ``load_sae``) holds one lock per
    model, so a forward never sees a half-written state and concurrent calls run one at a
    time. Separate ``SteeredModel`` objects run independently.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: DecoderLayout,
        available: Sites,
        states: dict[Site, SiteState],
        routing: RoutingState,
        compiled: Callable[..., Any],
        backend: SteeringBackend | None = None,
    ) -> None:
        self.model = model
        self._layout = layout
        self._available = available
        self._states = states
        self._by_name = {site.name: state for site, state in states.items()}
        self._routing = routing
        self._device = routing.batch_rows.device
        self._compiled = compiled
        self._backend = backend
        self._checked_compiles = 0
        self._lock = threading.RLock()
        # Memoised: every call's edits and record requests name their sites (errors are not cached).
        resolve = functools.lru_cache(maxsize=1024)(functools.partial(_resolve_attached, layout, available, frozenset(states)))
        self._resolve = resolve
        self.slots = SlotManager(self._by_name, routing, resolve, routing.capacity.slot_rows, self._lock)
        self._calls = SlotManager(self._by_name, routing, resolve, routing.capacity.call_rows, self._lock)
        self._call_steerings: tuple[Steering, ...] = ()
        self._call_ids: tuple[_CallRow, ...] = ()
        self._call_rows: tuple[Steering | None, ...] = ()  # the last call's per-row steerings, as given
        self._call_batch_ids: list[_CallRow | None] = []  # and the call rows they were routed to
        self._call_routed = False
        self._generator: nn.Module | None = None
        by_name = self._by_name  # closed over instead of self: no reference cycle holds the model
        recorders = {name: state.recorder for name, state in by_name.items() if state.recorder is not None}
        self._recording = Recording(recorders, lambda name: by_name[name].d_sae, resolve)
        self._step_plans: dict[str, RecordPlan] = {}  # what step() forwards record (record_steps)
        self._last_shape = (0, 0)  # [batch, seq] of the last forward

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this model exposes, in forward order."""
        return tuple(site.name for site in sorted(self._available))

    @property
    def attached_sites(self) -> tuple[str, ...]:
        """The sites steering can act on (those passed to ``sc.steer``), in forward order."""
        return tuple(site.name for site in sorted(self._states))

    @property
    def config(self) -> Any:
        """The wrapped model's ``config``."""
        return self.model.config

    @property
    def generation_config(self) -> Any:
        """The wrapped model's ``generation_config``."""
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (and of the steering state)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (and of the SAE buffers)."""
        return self._routing.token_weight.dtype

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each exposed site's tensor shape on a 1x2-token probe (``[1, 2, width]``)."""
        return {site.name: shape for site, shape in sorted(self._available.items())}

    def steering_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the op reads, by name. They live at fixed addresses for the model's life."""
        state = dict(self._routing.tensors())
        for site in sorted(self._states):
            state.update(self._states[site].tensors())
            if self._states[site].recorder is not None:
                state.update(self._states[site].recorder.tensors())
        return state

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        steering: SteeringArg = None,
        record: RecordArg = None,
        prompt_len: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the compiled forward with ``steering``; other arguments are HF forward kwargs.

        Token scope: positions (cache positions) before ``prompt_len`` (an int, or one per
        row) are "prompt". By default every token of a call on an empty cache is prompt,
        and every token of a call that continues a cache is generated. A cache length held
        on the device is used there, without a host sync.

        ``record=`` (a list of ``sc.Features`` for every row, or one such list or None per
        row) reads SAE features at attached sites, from the tensor arriving there (after
        earlier sites' edits, before this site's own). The output then has a ``features``
        attribute: ``{site: FeatureRecord}``, each holding the whole batch.
        """
        with self._lock:
            _require_no_grad("__call__")
            batch, seq = _batch_and_seq(input_ids, kwargs)
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            if steering is None and record is None and prompt_len is None and self._idle_again(batch, seq):
                return self._forward(input_ids, **kwargs)
            per_row = per_row_steerings(steering, batch)
            requests = per_row_requests(record, batch)
            plans = self._record_plans(requests, kwargs.get("return_dict") is False, "return_dict=False")
            self._assign_call(per_row, self._call_prompt_lens(prompt_len, per_row, seq, kwargs), seq)
            with self._recorded(plans):
                out = self._forward(input_ids, **kwargs)
                if plans:
                    out.features = self._recording.collect(batch, seq)
            return out

    def _idle_again(self, batch: int, seq: int) -> bool:
        """Whether an unsteered call needs no host work at all: no call rows are held and the routing
        of an unsteered ``[batch, seq]`` forward stands (nothing was assigned or admitted since).
        A decode loop with ``steering=None`` then costs what plain ``torch.compile`` costs."""
        if self._call_steerings or self._recording.active or not self._routing.idle_routed(batch, seq):
            return False
        self._call_routed = True  # the routing is the call's; step() re-applies the slots'
        return True

    @staticmethod
    def _call_prompt_lens(
        prompt_len: int | Sequence[int] | None, per_row: list[Steering | None], seq: int, kwargs: dict[str, Any]
    ) -> list[int] | torch.Tensor:
        """The call's prompt lengths (see ``_prompt_lens``). Unsteered and ``tokens="all"`` rows never
        read theirs, so such a call skips the default's cache-length read (a device op on a static cache)."""
        if prompt_len is None and all(s is None or s.tokens == "all" for s in per_row):
            return [seq] * len(per_row)
        return _prompt_lens(prompt_len, len(per_row), seq, _past_length(kwargs))

    def step(
        self,
        input_ids: torch.Tensor | None = None,
        *args: Any,
        positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """One forward with the current slot assignment (``slots.assign``): the hot path.

        ``positions`` (``[S]`` or ``[B, S]`` on the model's device) are the tokens' cache
        positions; they decide prompt vs generated scope on the device, so a captured CUDA
        graph follows them from step to step. Default: the cache length plus ``arange(S)``.
        """
        with self._lock:
            _require_no_grad("step")
            if self._call_routed:
                self.slots.reapply()  # a call's routing never leaks into the serving loop's steps
                self._call_routed = False
            if self._recording.current is not self._step_plans and (self._step_plans or self._recording.active):
                self._recording.apply(self._step_plans)  # nor does a call's record plan
            return self._forward(input_ids, *args, positions=positions, **kwargs)

    def record_steps(self, record: RecordArg, batch: int) -> None:
        """What the next ``step()`` forwards of ``batch`` rows record, until changed (``None``:
        nothing). ``record`` is as for ``__call__``; the records are read with ``step_features``.
        Bad requests raise and change nothing."""
        with self._lock:
            self._step_plans = self._recording.plans(per_row_requests(record, batch))
            self._recording.apply(self._step_plans)

    def step_features(self) -> dict[str, FeatureRecord]:
        """Copies of what the last step (a forward, or a replay of ``capture_steps``'s graphs)
        recorded, by site: ``FeatureRecord``s over its ``[batch, seq]`` tokens."""
        with self._lock:
            return self._recording.collect(*self._last_shape)

    def needed_paths(self) -> Paths:
        """The paths the current assignment and record plan need at some site: what a
        captured graph must hold to serve the next step."""
        with self._lock:
            needed = Paths()
            for state in self._states.values():
                needed = needed | state.live_paths(self._routing.capacity.max_batch)
            return needed

    def capture_steps(
        self, step: Callable[[], Any], path_sets: Sequence[Paths], *, warmup: int = 3, reset: Callable[[], None] | None = None
    ) -> StepGraphs:
        """Capture ``step`` (a call of ``self.step`` on static inputs) in one CUDA graph per
        path set of ``path_sets``; ``StepGraphs.replay`` then runs, per step, the cheapest graph
        holding what the assignment needs (``needed_paths``). ``warmup`` and ``reset`` are as
        for ``runtime.capture.capture``. A graph with ``record=True`` records what
        ``record_steps`` last planned, read back with ``step_features``."""
        if not path_sets or not all(isinstance(paths, Paths) for paths in path_sets):
            raise TypeError("capture_steps: path_sets is a non-empty list of sc.Paths, e.g. [sc.Paths(add=True, sparse=True)].")
        if self._device.type != "cuda":
            raise ValueError(f"capture_steps captures CUDA graphs; this model is on {self._device}. Call step() instead.")
        graphs, shapes = [], {}
        for paths in path_sets:
            graph, output = capture(step, warmup=warmup, reset=reset, paths=paths)
            graphs.append((paths, graph, output))
            shapes[paths] = self._last_shape
        return StepGraphs(graphs, self.needed_paths, functools.partial(self._replayed, shapes), self._lock)

    def _replayed(self, shapes: dict[Paths, tuple[int, int]], paths: Paths) -> None:
        self._last_shape = shapes[paths]
        if paths.record:
            self._recording.replayed()

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        steering: SteeringArg = None,
        record: RecordArg = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """HF ``generate`` whose prefill and decode steps both run the steered compiled forward.

        ``tokens="prompt"`` steers the ``input_ids`` positions; ``"generated"`` the new ones.
        All other arguments (generation config, streamer, sampling) are HF's. The wrapped
        model is not modified: generation runs on a shallow copy whose ``forward`` is steered.

        ``record=`` (as for ``__call__``) records every forward, prompt and each generated
        token, and returns HF's ``return_dict_in_generate`` output with ``features``: ``{site:
        FeatureRecord}`` along the sequence axis of ``.sequences`` (the last generated token
        is never fed back, so its position is padding). Beam search cannot record.
        """
        with self._lock:
            _require_no_grad("generate")
            batch, prompt_len = input_ids.shape
            per_row = per_row_steerings(steering, batch)
            requests = per_row_requests(record, batch)
            refused = kwargs.get("return_dict_in_generate") is False or _beams(kwargs, self.generation_config) > 1
            plans = self._record_plans(requests, refused, "beam search or return_dict_in_generate=False")
            self._assign_call(per_row, [prompt_len] * batch, prompt_len)
            steps = RecordedSteps() if plans else None
            forward = self._generation_forward(self._call_batch(per_row), prompt_len, requests, steps)
            kwargs.setdefault("disable_compile", True)
            if plans:
                kwargs["return_dict_in_generate"] = True
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            generator = self._generation_model()
            with _forward_replaced(generator, forward), self._recorded(plans):
                out = generator.generate(input_ids, **kwargs)
            if steps is not None:
                out.features = steps.joined(out.sequences.shape[1])
            return out

    def _generation_forward(
        self, batch_ids: list[_CallRow | None], prompt_len: int, requests: list[tuple[Features, ...]], steps: RecordedSteps | None
    ) -> Callable[..., Any]:
        batch, assigned = len(batch_ids), [len(batch_ids)]

        @functools.wraps(self.model.forward)
        def steered_forward(input_ids: torch.Tensor | None = None, *args: Any, **kw: Any) -> Any:
            step_batch, seq = _batch_and_seq(input_ids, kw)
            if step_batch != assigned[0]:
                # num_return_sequences repeats each prompt row in place.
                if step_batch % batch:
                    raise ValueError(f"generate: batch changed from {batch} to {step_batch} mid-generation.")
                expand = step_batch // batch
                self._calls.assign([r for r in batch_ids for _ in range(expand)], [prompt_len] * step_batch)
                if steps is not None:
                    self._recording.apply(self._recording.plans([r for r in requests for _ in range(expand)]))
                assigned[0] = step_batch
            out = self._forward(input_ids, *args, **kw)
            if steps is not None:
                steps.add(self._recording.collect(step_batch, seq))
            return out

        return steered_forward

    def _record_plans(self, requests: list[tuple[Features, ...]], refused: bool, why: str) -> dict[str, RecordPlan]:
        """The record plans of a call's per-row requests (validated; nothing is written yet)."""
        plans = self._recording.plans(requests)
        if plans and refused:
            raise ValueError(f"record= needs an output to put the features on, which {why} does not give.")
        return plans

    @contextlib.contextmanager
    def _recorded(self, plans: dict[str, RecordPlan]) -> Iterator[None]:
        """Record ``plans`` in the forwards of this block; nothing is recorded after it."""
        if not plans and not self._recording.active:
            yield
            return
        self._recording.apply(plans)
        try:
            yield
        finally:
            self._recording.clear()

    def _generation_model(self) -> nn.Module:
        """A shallow copy of the model (same modules, parameters and config) to generate with."""
        if self._generator is None:
            self._generator = copy.copy(self.model)
        return self._generator

    def load_sae(self, site: str, sae: SAE) -> None:
        """Hot-swap the SAE at an attached site in place: no recompile, live rows keep working.

        The new SAE must have the same activation (and ``k``) and at most the attached SAE's
        width. Attaching a new site needs ``sc.steer()`` again, which recompiles. A rejected
        SAE changes nothing; see ``SiteState.swap_sae`` for a failure during the copy.
        """
        if not isinstance(sae, SAE):
            raise TypeError(f"load_sae: expected an SAE, got {type(sae).__name__}.")
        with self._lock:
            self._by_name[self._resolve(site)].swap_sae(sae)

    def warmup(
        self, shapes: Sequence[tuple[int, int]], repeats: int = 3, *, paths: Paths = STEERING_PATHS, **kwargs: Any
    ) -> None:
        """Compile and run every ``(batch, seq)`` bucket a loop will use, through every op path.

        Every forward runs the paths a captured CUDA graph will hold (``capture_paths(paths)``), and
        the steering alternates between repeats (additive + sparse clamps, then Reconstruct)
        so each path also computes real tokens. Compilation, CUDA-graph recording and lazy
        kernel initialisation thus all happen here, on every bucket, batch 1 included, and
        never inside a capture. ``kwargs`` are passed to each forward (e.g.
        ``use_cache=False``). Admitted requests and the slot assignment are left as they were.
        """
        for batch, seq in shapes:
            self._check_tokens(batch, seq)
        exercise = self._warmup_steerings()
        with self._lock, capture_paths(paths), torch.no_grad():
            self._release_call_rows()
            try:
                for repeat in range(repeats):
                    steering = exercise[repeat % len(exercise)] if exercise else None
                    self._calls.replace(list(self._calls.requests), {_WARMUP: (steering, 0)})
                    for batch, seq in shapes:
                        self._calls.assign([_WARMUP] * batch)
                        self._call_routed = True
                        self._forward(torch.zeros(batch, seq, dtype=torch.long, device=self._device), **kwargs)
            finally:
                self._calls.replace(list(self._calls.requests), {})

    def _warmup_steerings(self) -> list[Steering]:
        sae_sites = [name for name, state in self._by_name.items() if state.d_sae > 0]
        additive = [AddVector(name, torch.zeros(state.width)) for name, state in self._by_name.items()]
        steerings = [Steering(*additive, *(Clamp(name, 0, 0.0, "add") for name in sae_sites))] if additive else []
        if sae_sites:
            steerings.append(Steering(*(Reconstruct(name) for name in sae_sites)))
        return steerings

    def _forward(self, input_ids: torch.Tensor | None, *args: Any, positions: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Route the tokens of this forward on the device, run the compiled model, and check
        that every attached site made it into the graph fragments compiled so far."""
        batch, seq = _batch_and_seq(input_ids, kwargs)
        self._last_shape = (batch, seq)
        attention_mask = kwargs.get("attention_mask")
        # An unsteered forward's mask stands whatever its padding, unless a site records (which reads it).
        idle = self._routing.idle_routed(batch, seq) and not self._recording.active
        if not idle and not self._routing.is_routed(batch, seq, attention_mask):
            if positions is None:
                positions = _positions(seq, _past_length(kwargs), kwargs, self._device)
            self._routing.route(positions, attention_mask, batch, seq)
        out = self._compiled(input_ids, *args, **kwargs)
        if self._backend is not None and self._backend.compiles != self._checked_compiles:
            self._checked_compiles = self._backend.compiles
            self._backend.check_placed()
        return out

    def _check_tokens(self, batch: int, seq: int) -> None:
        capacity = self._routing.capacity
        if batch > capacity.max_batch:
            raise ValueError(f"batch of {batch} rows exceeds max_batch={capacity.max_batch}; pass a larger max_batch to sc.steer().")
        if batch * seq > capacity.max_tokens:
            raise ValueError(
                f"{batch}x{seq}={batch * seq} tokens exceed max_tokens={capacity.max_tokens}; "
                "pass a larger max_tokens to sc.steer()."
            )

    def _assign_call(self, per_row: list[Steering | None], prompt_lens: list[int] | torch.Tensor, seq: int) -> None:
        """Admit the distinct steerings of a call in the call rows (atomically replacing the last
        call's, which are kept while they are reused) and route the batch through them."""
        self._check_tokens(len(per_row), seq)
        if len(per_row) == len(self._call_rows) and all(map(operator.is_, per_row, self._call_rows)):
            # The same steering objects as the last call (a decode loop): the same rows, unhashed.
            self._calls.assign(self._call_batch_ids, prompt_lens)
            self._call_routed = True
            return
        distinct = tuple(dict.fromkeys(s for s in per_row if s is not None))
        if distinct and not self._states:
            raise ValueError("steering was given but no site is attached; pass saes= or sites= to sc.steer().")
        if distinct != self._call_steerings:
            ids = tuple(_CallRow(i) for i in range(len(distinct)))
            self._calls.replace(self._call_ids, {rid: (s, 0) for rid, s in zip(ids, distinct, strict=True)})
            self._call_steerings, self._call_ids = distinct, ids
        self._call_rows, self._call_batch_ids = tuple(per_row), self._call_batch(per_row)
        self._calls.assign(self._call_batch_ids, prompt_lens)
        self._call_routed = True

    def _release_call_rows(self) -> None:
        self._calls.replace(self._call_ids, {})
        self._call_steerings, self._call_ids = (), ()
        self._call_rows, self._call_batch_ids = (), []

    def _call_batch(self, per_row: list[Steering | None]) -> list[_CallRow | None]:
        index = {s: rid for s, rid in zip(self._call_steerings, self._call_ids, strict=True)}
        return [None if s is None else index[s] for s in per_row]


def _require_no_grad(method: str) -> None:
    if torch.is_grad_enabled():
        raise ValueError(
            f"SteeredModel.{method} called with gradients enabled. The steering op has no autograd "
            "formula, so backward would fail. Wrap the call in torch.no_grad() or torch.inference_mode()."
        )


def _beams(kwargs: dict[str, Any], config: Any) -> int:
    generation_config = kwargs.get("generation_config") or config
    return int(kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1)


def _batch_and_seq(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[int, int]:
    tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("SteeredModel: pass input_ids or inputs_embeds.")
    return tokens.shape[0], tokens.shape[1]


def _past_length(kwargs: dict[str, Any]) -> int | torch.Tensor:
    """Tokens already in the cache. Static caches keep this on the device: it is returned as
    a tensor, never read back, so the hot path stays free of host syncs."""
    # transformers 5 renamed the forward keyword ``past_key_values`` to ``cache``.
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is None:
        return 0
    return past.get_seq_length() if hasattr(past, "get_seq_length") else past[0][0].shape[-2]


def _prompt_lens(prompt_len: object, batch: int, seq: int, past: int | torch.Tensor) -> list[int] | torch.Tensor:
    """Each row's prompt length: ``prompt_len`` (an int or one per row), or by default the call's
    own tokens on an empty cache and the cached tokens otherwise (a 0-d tensor when the cache
    keeps its length on the device)."""
    if prompt_len is None:
        if isinstance(past, torch.Tensor):
            return torch.where(past == 0, seq, past)  # [] on the device; no host sync
        return [seq if past == 0 else past] * batch
    lengths = [prompt_len] * batch if isinstance(prompt_len, int) else list(prompt_len)  # type: ignore[call-overload]
    if len(lengths) != batch:
        raise ValueError(f"prompt_len has {len(lengths)} entries for a batch of {batch}.")
    return lengths


def _positions(seq: int, past: int | torch.Tensor, kwargs: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Cache positions ``[S]`` of this call's tokens in the (padded) sequence."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return cache_position
    return torch.arange(seq, device=device) + past


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Route ``model(...)`` through ``forward`` for the duration."""
    model.forward = forward
    try:
        yield
    finally:
        del model.forward
