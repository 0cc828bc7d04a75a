"""``sc.steer()``: compile an HF model with SAE steering sites, and the model it returns."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from .edits import AddVector, Clamp, Reconstruct, Steering
from .lowering.backend import InnerBackend, SteeringBackend, fresh_entry_point, resolve_inner_backend
from .lowering.discovery import discover_sites
from .lowering.sites import DecoderLayout, Site, SiteKind
from .runtime.slots import SlotManager
from .runtime.staging import SteeringArg, per_row_steerings
from .runtime.state import Capacity, RoutingState, SiteState, register_site
from .sae import SAE

_model_ids = itertools.count()


def steer(
    model: nn.Module,
    saes: Mapping[str, SAE] | Sequence[SAE] | None = None,
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
    on_graph: Callable[[fx.GraphModule], None] | None = None,
) -> SteeredModel:
    """Compile ``model`` so that the given sites can be steered without recompiling.

    ``saes`` attaches an SAE per site: ``{site: SAE}``, or a list of SAEs placed at their
    ``hook_name``. ``sites`` attaches further sites for additive steering (``AddVector``)
    only. Site names are TransformerLens hook names (``blocks.3.hook_resid_post``) or HF
    module paths (``model.layers.3`` = resid_post, ``.self_attn`` = attn_out, ``.mlp`` =
    mlp_out).

    ``backend``, ``mode``, ``options``, ``dynamic`` and ``fullgraph`` mean what they mean
    to ``torch.compile``. ``max_rows`` (distinct steerings per forward), ``max_clamps``
    (clamped features per steering and site), ``max_batch`` and ``max_tokens`` (batch x
    sequence per forward) size the static state. ``on_graph``, if given, is called with
    every rewritten FX graph (to inspect what was inserted). With nothing attached, the
    result is plain ``torch.compile``. The model's weights and modules are not modified.
    """
    capacity = Capacity(max_rows, max_clamps, max_batch, max_tokens)
    layout, available = discover_sites(model)
    attached = _attach(layout, available, _sae_by_site(saes), sites)
    param = next(model.parameters())
    tag = f"m{next(_model_ids)}"
    routing = RoutingState(capacity, param.dtype, param.device)
    states: dict[Site, SiteState] = {}
    for site, sae in attached.items():
        if sae is not None and sae.d_in != layout.hidden_size:
            raise ValueError(
                f"steer(): the SAE for {site.name} has d_in={sae.d_in} but the model's hidden size is "
                f"{layout.hidden_size}. It was trained on a different model or site."
            )
    inner = resolve_inner_backend(backend, mode, options)
    handles = {site: f"{tag}:{site.name}" for site in attached}
    for site, sae in attached.items():
        states[site] = SiteState(site.name, layout.hidden_size, sae, capacity, routing, param.dtype, param.device)
        register_site(handles[site], states[site])
    if attached:
        inner = SteeringBackend(model, layout, handles, inner, on_graph)
    compiled = torch.compile(fresh_entry_point(model.forward, tag), backend=inner, dynamic=dynamic, fullgraph=fullgraph)
    return SteeredModel(model, layout, available, states, routing, compiled)


def _sae_by_site(saes: Mapping[str, SAE] | Sequence[SAE] | None) -> list[tuple[str, SAE]]:
    if saes is None:
        return []
    if isinstance(saes, Mapping):
        pairs = list(saes.items())
    elif isinstance(saes, (list, tuple)):
        pairs = []
        for sae in saes:
            if not isinstance(sae, SAE):
                raise TypeError(f"steer(): a list of SAEs must hold SAE objects, got {type(sae).__name__}.")
            if sae.hook_name is None:
                raise ValueError(
                    "steer(): an SAE in a list must have a hook_name saying where it goes; "
                    "pass {site: sae} instead, or build the SAE with hook_name=..."
                )
            pairs.append((sae.hook_name, sae))
    else:
        raise TypeError(f"steer(): saes must be a dict {{site: SAE}} or a list of SAEs, got {type(saes).__name__}.")
    for name, sae in pairs:
        if not isinstance(sae, SAE):
            raise TypeError(f"steer(): the value for site {name!r} must be an SAE, got {type(sae).__name__}.")
    return pairs


def _attach(
    layout: DecoderLayout,
    available: dict[Site, tuple[int, ...]],
    saes: list[tuple[str, SAE]],
    additive: Sequence[str],
) -> dict[Site, SAE | None]:
    if isinstance(additive, str):
        raise TypeError("steer(): sites= takes a list of site names, not a single string.")
    attached: dict[Site, SAE | None] = {}
    for name, sae in [*saes, *((name, None) for name in additive)]:
        site = resolve_site(layout, available, name)
        if sae is not None and attached.get(site) is not None:
            raise ValueError(f"steer(): site {site.name} is given twice ({name!r}); attach one SAE per site.")
        attached[site] = sae if sae is not None else attached.get(site)
    return attached


def resolve_site(layout: DecoderLayout, available: dict[Site, tuple[int, ...]], name: str) -> Site:
    """The exposed site ``name`` refers to, or a ValueError listing the available ones."""
    names = ", ".join(site.name for site in sorted(available))
    try:
        site = layout.resolve(name)
    except ValueError:
        raise ValueError(
            f"Unknown site {name!r}. Available sites: {names}. HF module paths work too "
            f"(e.g. {layout.layer_paths[0]!r} for resid_post)."
        ) from None
    if site not in available:
        if site.kind is SiteKind.RESID_MID:
            raise ValueError(
                f"Site {name!r} does not exist: layer {site.layer} adds attention and MLP to the residual "
                "stream in parallel, so there is no resid_mid between them. Use hook_resid_pre, "
                "hook_attn_out, hook_mlp_out or hook_resid_post."
            )
        raise ValueError(f"Site {name!r} was not found in the model's graph. Available sites: {names}.")
    return site


class _CallRow:
    """Request id of the rows that ``steering=`` on a call admits; never equal to a user's id."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<call steering {self.index}>"


class SteeredModel:
    """A compiled HF model whose attached sites can be steered per call without recompiling.

    ``steering=`` on ``__call__`` and ``generate`` takes ``None``, a ``Steering``, a list of
    edits (applied to every row), or a list with one ``Steering``-or-``None`` per batch row.
    Production loops use ``slots`` (admit / update / release / assign) and ``step`` instead.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: DecoderLayout,
        available: dict[Site, tuple[int, ...]],
        states: dict[Site, SiteState],
        routing: RoutingState,
        compiled: Callable[..., Any],
    ) -> None:
        self.model = model
        self._layout = layout
        self._available = available
        self._states = states
        self._by_name = {site.name: state for site, state in states.items()}
        self._routing = routing
        self._device = routing.batch_rows.device
        self._compiled = compiled
        self.slots = SlotManager(self._by_name, routing, self._resolve_attached)
        self._call_steerings: tuple[Steering, ...] = ()
        self._call_ids: tuple[_CallRow, ...] = ()

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this model exposes, in forward order."""
        return tuple(site.name for site in sorted(self._available))

    @property
    def attached_sites(self) -> tuple[str, ...]:
        """The sites steering can act on (those passed to ``sc.steer``), in forward order."""
        return tuple(site.name for site in sorted(self._states))

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each exposed site's tensor shape on a 1x2-token probe (``[1, 2, d_model]``)."""
        return {site.name: shape for site, shape in sorted(self._available.items())}

    def steering_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the op reads, by name. They live at fixed addresses for the model's life."""
        state = dict(self._routing.tensors())
        for site in sorted(self._states):
            state.update(self._states[site].tensors())
        return state

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        steering: SteeringArg = None,
        prompt_len: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the compiled forward with ``steering``; other arguments are HF forward kwargs.

        Token scope: positions (cache positions) before ``prompt_len`` (an int, or one per
        row) are "prompt". By default every token of a call on an empty cache is prompt,
        and every token of a call that continues a cache is generated.
        """
        _require_no_grad()
        batch, seq = _batch_and_seq(input_ids, kwargs)
        past = _past_length(kwargs)
        if prompt_len is None:
            prompt_len = seq if int(past) == 0 else int(past)
        prompt_lens = [prompt_len] * batch if isinstance(prompt_len, int) else [int(p) for p in prompt_len]
        if len(prompt_lens) != batch:
            raise ValueError(f"prompt_len has {len(prompt_lens)} entries for a batch of {batch}.")
        self._assign_call(per_row_steerings(steering, batch), prompt_lens, seq)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.step(input_ids, positions=_positions(seq, past, kwargs, self._device), **kwargs)

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
        _require_no_grad()
        batch, seq = _batch_and_seq(input_ids, kwargs)
        attention_mask = kwargs.get("attention_mask")
        if not self._routing.is_routed(batch, seq, attention_mask):
            if positions is None:
                positions = _positions(seq, _past_length(kwargs), kwargs, self._device)
            self._routing.route(positions, attention_mask, batch, seq)
        return self._compiled(input_ids, *args, **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        steering: SteeringArg = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """HF ``generate`` whose prefill and decode steps both run the steered compiled forward.

        ``tokens="prompt"`` steers the ``input_ids`` positions; ``"generated"`` the new ones.
        All other arguments (generation config, streamer, sampling) are HF's.
        """
        batch, prompt_len = input_ids.shape
        per_row = per_row_steerings(steering, batch)
        self._assign_call(per_row, [prompt_len] * batch, prompt_len)
        batch_ids = self._call_batch(per_row)
        assigned = [batch]

        @functools.wraps(self.model.forward)
        def steered_forward(input_ids: torch.Tensor | None = None, *args: Any, **kw: Any) -> Any:
            step_batch, _ = _batch_and_seq(input_ids, kw)
            if step_batch != assigned[0]:
                # Beam search and num_return_sequences repeat each prompt row in place.
                if step_batch % batch:
                    raise ValueError(f"generate: batch changed from {batch} to {step_batch} mid-generation.")
                expand = step_batch // batch
                self.slots.assign([r for r in batch_ids for _ in range(expand)], [prompt_len] * step_batch)
                assigned[0] = step_batch
            return self.step(input_ids, *args, **kw)

        kwargs.setdefault("disable_compile", True)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with torch.no_grad(), _forward_replaced(self.model, steered_forward):
            return self.model.generate(input_ids, **kwargs)

    def load_sae(self, site: str, sae: SAE) -> None:
        """Hot-swap the SAE at an attached site in place: no recompile, live rows keep working.

        The new SAE must have the same activation (and ``k``) and at most the attached SAE's
        width. Attaching a new site needs ``sc.steer()`` again, which recompiles.
        """
        if not isinstance(sae, SAE):
            raise TypeError(f"load_sae: expected an SAE, got {type(sae).__name__}.")
        self._by_name[self._resolve_attached(site)].swap_sae(sae)

    def warmup(self, shapes: Sequence[tuple[int, int]], repeats: int = 3, **kwargs: Any) -> None:
        """Compile and run every ``(batch, seq)`` bucket a loop will use, through every op path.

        Each bucket runs ``repeats`` times with steering that exercises the additive, sparse
        and full paths at every attached site, so compilation, CUDA-graph recording and
        lazy kernel initialisation all happen here and not inside the loop. ``kwargs`` are
        passed to each forward (e.g. ``use_cache=False``). Leaves the steering state as it was.
        """
        exercise = self._warmup_steerings()
        ids = [_CallRow(-1 - i) for i in range(len(exercise))]
        self.slots.replace((), {rid: (s, 0) for rid, s in zip(ids, exercise, strict=True)})
        try:
            for batch, seq in shapes:
                self._check_tokens(batch, seq)
                rows = [ids[b % len(ids)] if ids else None for b in range(batch)]
                self.slots.assign(rows, [seq // 2] * batch)
                tokens = torch.zeros(batch, seq, dtype=torch.long, device=self._device)
                for _ in range(repeats):
                    with torch.no_grad():
                        self.step(tokens, **kwargs)
        finally:
            self.slots.replace(ids, {})

    def _warmup_steerings(self) -> list[Steering]:
        sae_sites = [name for name, state in self._by_name.items() if state.d_sae > 0]
        additive = [AddVector(name, torch.zeros(state.hidden_size)) for name, state in self._by_name.items()]
        steerings = [Steering(*additive, *(Clamp(name, 0, 0.0, "add") for name in sae_sites))] if additive else []
        if sae_sites:
            steerings.append(Steering(*(Reconstruct(name) for name in sae_sites), tokens="prompt"))
        return steerings

    def _check_tokens(self, batch: int, seq: int) -> None:
        capacity = self._routing.capacity
        if batch > capacity.max_batch:
            raise ValueError(f"batch of {batch} rows exceeds max_batch={capacity.max_batch}; pass a larger max_batch to sc.steer().")
        if batch * seq > capacity.max_tokens:
            raise ValueError(
                f"{batch}x{seq}={batch * seq} tokens exceed max_tokens={capacity.max_tokens}; "
                "pass a larger max_tokens to sc.steer()."
            )

    def _assign_call(self, per_row: list[Steering | None], prompt_lens: list[int], seq: int) -> None:
        """Admit the distinct steerings of a call (atomically replacing the last call's) and route."""
        self._check_tokens(len(per_row), seq)
        distinct = tuple(dict.fromkeys(s for s in per_row if s is not None))
        if distinct and not self._states:
            raise ValueError("steering was given but no site is attached; pass saes= or sites= to sc.steer().")
        if distinct != self._call_steerings:
            ids = tuple(_CallRow(i) for i in range(len(distinct)))
            self.slots.replace(self._call_ids, {rid: (s, 0) for rid, s in zip(ids, distinct, strict=True)})
            self._call_steerings, self._call_ids = distinct, ids
        self.slots.assign(self._call_batch(per_row), prompt_lens)

    def _call_batch(self, per_row: list[Steering | None]) -> list[_CallRow | None]:
        index = {s: rid for s, rid in zip(self._call_steerings, self._call_ids, strict=True)}
        return [None if s is None else index[s] for s in per_row]

    def _resolve_attached(self, name: str) -> str:
        site = resolve_site(self._layout, self._available, name)
        if site not in self._states:
            attached = ", ".join(self.attached_sites) or "none"
            raise ValueError(
                f"Site {name!r} ({site.name}) is not attached, so it cannot be steered. Attached sites: "
                f"{attached}. Attaching a new site needs a new sc.steer() (one recompile)."
            )
        return site.name


def _require_no_grad() -> None:
    if torch.is_grad_enabled():
        raise ValueError(
            "SteeredModel called with gradients enabled. The steering op has no autograd formula, so "
            "backward would fail. Wrap the call in torch.no_grad() or torch.inference_mode()."
        )


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


def _positions(seq: int, past: int | torch.Tensor, kwargs: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Cache positions ``[S]`` of this call's tokens in the (padded) sequence."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return cache_position
    return torch.arange(seq, device=device) + past


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Route ``model(...)`` through ``forward`` for the duration, restoring it afterwards."""
    had_own = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward
