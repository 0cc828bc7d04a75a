"""Independent eager reference for SAE steering (DESIGN §3-§4), for tests only.

It applies each row's edits with temporary forward hooks on an eager HF model and does
every SAE computation in float64, casting back to the model dtype only where the result
re-enters the model. It shares nothing with the library except the value classes
``sae_compile.sae.SAE`` and ``sae_compile.edits`` (it never calls ``SAE.encode`` /
``SAE.decode``), and production code must never import it.

Public entry points:

- ``sae_math(sae, x64) -> (f, x_hat)``: the SAE encode/decode in float64.
- ``apply_steering_at_site(x, site, steering, sae, token_mask) -> x'``: one row, one site.
- ``reference_logits(model, input_ids, *, saes, steering, ...) -> logits``.
- ``reference_generate(model, input_ids, *, saes, steering, max_new_tokens, ...) -> ids``:
  greedy decoding without a KV cache (the whole sequence is recomputed every step).
- ``site_activations(model, input_ids, site) -> x``: the tensor at ``site``, unsteered.
- ``steered_generation(model, input_ids, *, saes, steering)``: a context manager that keeps
  the steering hooked on ``model`` for one HF ``model.generate`` (e.g. to replay sampling).

Which module implements each hook on each architecture comes from the hand-written table
in ``tests/models.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from sae_compile.edits import AddVector, Clamp, Reconstruct, Steering
from sae_compile.sae import SAE

if __package__:  # imported as ``tests.reference``
    from . import models as _models
else:  # imported as top-level ``reference`` (pytest's rootdir-less "prepend" import mode)
    import models as _models  # type: ignore[no-redef]

Edit = Clamp | AddVector | Reconstruct
#: What ``steering=`` accepts (DESIGN §3): None; a Steering or a list of edits for every
#: row; or a list with one Steering-or-None per batch row.
SteeringArg = Steering | Sequence[Edit] | Sequence[Steering | None] | None

#: The residual-stream kinds, in forward order. The two sites inside the branches,
#: ``blocks.L.attn.hook_z`` and ``blocks.L.hook_mlp_in``, are kinds "z" and "mlp_in".
SITE_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(?:attn\.hook_(z)|hook_(resid_pre|attn_out|resid_mid|mlp_in|mlp_out|resid_post))$")


def _parse_site(site: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a canonical site name, or None."""
    m = _SITE_RE.match(site)
    return None if m is None else (int(m.group(1)), m.group(2) or m.group(3))


# --------------------------------------------------------------------------------------
# SAE math (float64)
# --------------------------------------------------------------------------------------


class SAEOutput(NamedTuple):
    f: torch.Tensor  # feature activations [..., d_sae], float64
    x_hat: torch.Tensor  # reconstruction f @ W_dec + b_dec [..., d_in], float64 (LN SAEs: mapped back)


class _LayerNorm64(NamedTuple):
    """OpenAI's ``LN`` (sparse_autoencoder/model.py) of an input, in float64."""

    x_n: torch.Tensor  # (x - mu) / (std + 1e-5)  [..., D]
    mu: torch.Tensor  # mean over D  [..., 1]
    std: torch.Tensor  # unbiased standard deviation over D  [..., 1]


def _layer_norm64(x64: torch.Tensor) -> _LayerNorm64:
    """Written from the published equations, not with torch.std: ``sum((x - mu)^2) / (D - 1)``."""
    d = x64.shape[-1]
    mu = x64.sum(dim=-1, keepdim=True) / d
    centred = x64 - mu
    std = ((centred * centred).sum(dim=-1, keepdim=True) / (d - 1)).sqrt()
    return _LayerNorm64(centred / (std + 1e-5), mu, std)


def _sae64(sae: SAE, device: torch.device) -> dict[str, torch.Tensor]:
    """The SAE's tensors as float64 on ``device``."""
    out = {
        "W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec,
    }
    if sae.threshold is not None:
        out["threshold"] = sae.threshold
    return {k: v.to(device=device, dtype=torch.float64) for k, v in out.items()}


def sae_encode64(sae: SAE, x64: torch.Tensor) -> torch.Tensor:
    """``f = act((x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc)`` in float64.

    act is relu; jumprelu (``relu(pre_i) * (pre_i > theta_i)``, per-feature theta, SAELens'
    convention: a negative theta never lets a negative ``pre_i`` through); or topk (keep the k
    largest entries of ``relu(pre)``, the lower index first at a tie; zero the rest). With
    ``layer_norm_input``, ``x`` is first replaced by ``LN(x)`` (``_layer_norm64``).
    """
    w = _sae64(sae, x64.device)
    x64 = x64.to(torch.float64)
    if sae.layer_norm_input:
        x64 = _layer_norm64(x64).x_n
    if sae.apply_b_dec_to_input:
        x64 = x64 - w["b_dec"]
    pre = x64 @ w["W_enc"] + w["b_enc"]
    zero = torch.zeros((), dtype=torch.float64, device=pre.device)
    if sae.activation == "relu":
        return torch.where(pre > 0, pre, zero)
    if sae.activation == "jumprelu":
        return torch.relu(pre) * (pre > w["threshold"])
    if sae.activation == "topk":
        assert sae.k is not None
        act = torch.where(pre > 0, pre, zero)
        # A stable sort keeps equal values in index order, so a tie at the k-th goes to the lower index.
        idx = act.sort(dim=-1, descending=True, stable=True).indices[..., : sae.k]
        keep = torch.zeros_like(act, dtype=torch.bool).scatter(-1, idx, True)
        return torch.where(keep, act, zero)
    raise ValueError(f"reference: unknown SAE activation {sae.activation!r}")


def sae_decode64(sae: SAE, f64: torch.Tensor, x64: torch.Tensor | None = None) -> torch.Tensor:
    """``x_hat = f @ W_dec + b_dec`` in float64; with ``layer_norm_input``, ``x_hat * std + mu``
    with the statistics of ``x64``, the input ``f`` was encoded from (then required)."""
    w = _sae64(sae, f64.device)
    x_hat = f64.to(torch.float64) @ w["W_dec"] + w["b_dec"]
    if not sae.layer_norm_input:
        return x_hat
    if x64 is None:
        raise ValueError("reference: decoding a layer-normalising SAE needs the input it encoded")
    ln = _layer_norm64(x64.to(torch.float64))
    return x_hat * ln.std + ln.mu


def sae_math(sae: SAE, x64: torch.Tensor) -> SAEOutput:
    """Encode and decode ``x64 [..., d_in]`` in float64: ``(f, x_hat)`` per DESIGN §4."""
    f = sae_encode64(sae, x64)
    return SAEOutput(f, sae_decode64(sae, f, x64))


# --------------------------------------------------------------------------------------
# One site, one row
# --------------------------------------------------------------------------------------


def _edits_at(steering: Steering | None, site: str) -> list[Edit]:
    return [] if steering is None else [e for e in steering.edits if e.site == site]


def _steer64(x: torch.Tensor, site: str, steering: Steering | None, sae: SAE | None) -> torch.Tensor | None:
    """Steered ``x`` in float64 for every token (no token mask), or None if nothing at ``site``.

    Order at one site (DESIGN §4): all AddVector edits first, then the SAE edits: clamps
    applied to ``f`` in edit order, then reconstruct (``f' @ W_dec + b_dec``) if any
    Reconstruct is present, else error-preserving (``x + (f' - f) @ W_dec``). An SAE with
    ``layer_norm_input`` encodes ``LN(x)`` of the post-AddVector ``x``; reconstruct is then
    ``(f' @ W_dec + b_dec) * std + mu`` and the delta ``x + std * (f' - f) @ W_dec``, which is what
    OpenAI's decode of ``f'`` minus its decode of ``f`` adds.
    """
    edits = _edits_at(steering, site)
    if not edits:
        return None
    x64 = x.to(torch.float64)
    d = x.shape[-1]
    for e in edits:
        if isinstance(e, AddVector):
            if e.vector.shape != (d,):
                raise ValueError(f"reference: AddVector at {site} has length {e.vector.shape[0]}, d_model is {d}")
            x64 = x64 + e.scale * e.vector.to(device=x.device, dtype=torch.float64)
    clamps = [e for e in edits if isinstance(e, Clamp)]
    reconstruct = any(isinstance(e, Reconstruct) for e in edits)
    if not clamps and not reconstruct:
        return x64
    if sae is None:
        raise ValueError(f"reference: {site} has Clamp/Reconstruct edits but no SAE is attached there")
    if sae.d_in != d:
        raise ValueError(f"reference: SAE at {site} has d_in={sae.d_in}, the model's hidden size is {d}")
    f = sae_encode64(sae, x64)
    f_new = _clamped64(f, clamps, sae.d_sae, site)
    if reconstruct:
        return sae_decode64(sae, f_new, x64)
    w_dec = sae.W_dec.to(device=x.device, dtype=torch.float64)
    delta = (f_new - f) @ w_dec
    return x64 + (_layer_norm64(x64).std * delta if sae.layer_norm_input else delta)


def _clamped64(f: torch.Tensor, clamps: list[Clamp], d_sae: int, site: str) -> torch.Tensor:
    """A copy of ``f [..., d_sae]`` with ``clamps`` applied in edit order."""
    f_new = f.clone()
    for c in clamps:
        if not 0 <= c.feature < d_sae:
            raise ValueError(f"reference: Clamp feature {c.feature} is outside [0, {d_sae}) at {site}")
        col = f_new[..., c.feature]
        if c.mode == "set":
            f_new[..., c.feature] = c.value
        elif c.mode == "add":
            f_new[..., c.feature] = col + c.value
        else:  # "scale"
            f_new[..., c.feature] = col * c.value
    return f_new


def apply_steering_at_site(
    x: torch.Tensor,
    site: str,
    steering: Steering | None,
    sae: SAE | None,
    token_mask: torch.Tensor,
) -> torch.Tensor:
    """Apply the edits of ``steering`` that target ``site`` to one row ``x [S, D]``.

    ``site`` must be the name the edits use (canonical TransformerLens names in practice).
    The math runs in float64 and the result is cast back to ``x.dtype``. Tokens where
    ``token_mask [S]`` is False, and every token if no edit targets ``site``, come back
    exactly as they were (bit for bit). ``steering.tokens`` is NOT consulted here: the
    scope is already folded into ``token_mask`` by the caller.
    """
    y64 = _steer64(x, site, steering, sae)
    if y64 is None:
        return x
    mask = token_mask.to(device=x.device, dtype=torch.bool).reshape(*token_mask.shape, *([1] * (x.dim() - token_mask.dim())))
    return torch.where(mask, y64.to(x.dtype), x)


# --------------------------------------------------------------------------------------
# Arguments: steering, sites, token scope
# --------------------------------------------------------------------------------------


def normalize_steering(steering: SteeringArg, batch: int) -> list[Steering | None]:
    """One ``Steering`` (or None) per row, following DESIGN §3's accepted forms."""
    if steering is None or (isinstance(steering, Sequence) and len(steering) == 0):
        return [None] * batch  # an empty list is "no edits", not a per-row list of length 0
    if isinstance(steering, Steering):
        return [steering] * batch
    if isinstance(steering, (Clamp, AddVector, Reconstruct)):
        raise TypeError("reference: pass a Steering or a list of edits, not a bare edit")
    items = list(steering)
    if all(isinstance(e, (Clamp, AddVector, Reconstruct)) for e in items):
        return [Steering(*items)] * batch  # a list of edits applies to every row
    if all(e is None or isinstance(e, Steering) for e in items):
        if len(items) != batch:
            raise ValueError(f"reference: per-row steering list has {len(items)} entries for a batch of {batch}")
        return items
    raise TypeError("reference: steering must be None, a Steering, a list of edits, or a per-row list of Steering/None")


def canonical_site(model: nn.Module, site: str) -> str:
    """The TransformerLens name for ``site``; HF module paths are accepted as aliases.

    ``<layers>.{L}`` means resid_post, ``<layers>.{L}.mlp`` mlp_out, and the layer's
    attention module (``self_attn`` / ``attn`` / ``attention``) attn_out (DESIGN §3).
    Raises ValueError for an unknown site or a resid_mid the architecture lacks.
    """
    n_layers = _models.num_layers(model)
    parsed = _parse_site(site)
    if parsed is None:
        modules = dict(model.named_modules())
        mod = modules.get(site)
        canon = None
        if mod is not None:
            for layer in range(n_layers):
                block = _models.layer_module(model, layer)
                if mod is block:
                    canon = f"blocks.{layer}.hook_resid_post"
                elif mod is getattr(block, "mlp", None):
                    canon = f"blocks.{layer}.hook_mlp_out"
                elif any(mod is getattr(block, a, None) for a in ("self_attn", "attn", "attention")):
                    canon = f"blocks.{layer}.hook_attn_out"
        if canon is None:
            raise ValueError(f"reference: unknown site {site!r}; sites are {_models.site_names(model)}")
        return canon
    layer, kind = parsed
    if not 0 <= layer < n_layers:
        raise ValueError(f"reference: site {site!r} names layer {layer}, the model has {n_layers}")
    if kind == "resid_mid" and not _models.has_resid_mid(model):
        raise ValueError(f"reference: {_models.arch_of(model)} has parallel attention+MLP, so no {site!r}")
    return site


def _canonical_steering(model: nn.Module, s: Steering | None) -> Steering | None:
    if s is None:
        return None
    edits = []
    for e in s.edits:
        canon = canonical_site(model, e.site)  # also validates the site
        edits.append(e if canon == e.site else dataclasses.replace(e, site=canon))
    return Steering(*edits, tokens=s.tokens)


def token_scope_mask(
    tokens: str,
    seq_len: int,
    prompt_len: int,
    attention_mask_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[S]``: which positions of one row a Steering with scope ``tokens`` touches.

    Position p (0-based, in the given possibly left-padded sequence) is "prompt" if
    ``p < prompt_len`` and "generated" otherwise; "all" is every position. Padding
    (``attention_mask == 0``) is never steered.
    """
    pos = torch.arange(seq_len)
    if tokens == "all":
        mask = torch.ones(seq_len, dtype=torch.bool)
    elif tokens == "prompt":
        mask = pos < prompt_len
    elif tokens == "generated":
        mask = pos >= prompt_len
    else:
        raise ValueError(f"reference: unknown token scope {tokens!r}")
    if attention_mask_row is not None:
        mask = mask & attention_mask_row.detach().cpu().bool()
    return mask


# --------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------


class _RowPlan(NamedTuple):
    row: int
    steering: Steering
    masks: list[torch.Tensor]  # the caller's list, read at every forward (it may change between them)

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[S]``: the positions of this row's current forward that are steered."""
        return self.masks[self.row]


def _output_tensor(out: Any) -> torch.Tensor:
    # HF 5.x decoder layers return a tensor; 4.x (and attention modules) return tuples.
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out: Any, new: torch.Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _layer_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    # Decoder layers get hidden_states positionally (HF 5.x) or by keyword.
    return args[0] if args else kwargs["hidden_states"]


def _steer_batch(x: torch.Tensor, site: str, plans: list[_RowPlan], sae: SAE | None) -> torch.Tensor:
    """Apply each planned row's steering at ``site`` to ``x [B, S, D]``; other rows untouched."""
    out = x.clone()  # fresh tensor: never write into a tensor the model may still alias
    for p in plans:
        if x.shape[1] != p.mask.shape[0]:
            raise RuntimeError(f"reference: {site} saw {x.shape[1]} positions, the token masks have {p.mask.shape[0]}")
        out[p.row] = apply_steering_at_site(x[p.row], site, p.steering, sae, p.mask.to(x.device))
    return out


@contextmanager
def steering_hooks(
    model: nn.Module,
    saes: dict[str, SAE],
    rows: list[Steering | None],
    masks: list[torch.Tensor],
) -> Iterator[None]:
    """Temporarily hook ``model`` so that row b is steered by ``rows[b]`` on positions ``masks[b]``.

    ``rows`` must already use canonical site names (``masks[b]`` already folds in the
    token scope and padding). ``masks`` is read at every forward, so a caller may replace
    its items between forwards (``steered_generation`` does, per decode step). The hooks
    are removed on exit, also on error.
    """
    saes = {canonical_site(model, k): v for k, v in saes.items()}
    # site -> rows with at least one edit there
    plans: dict[str, list[_RowPlan]] = {}
    for b, s in enumerate(rows):
        if s is None:
            continue
        for site in s.sites:
            plans.setdefault(site, []).append(_RowPlan(b, s, masks))

    def site(layer: int, kind: str) -> str:
        return f"blocks.{layer}.hook_{kind}"

    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer in range(_models.num_layers(model)):
            handles += _branch_input_hooks(model, layer, plans, saes)
            pre, attn, mid, mlp, post = (site(layer, k) for k in SITE_KINDS)
            if not any(s in plans for s in (pre, attn, mid, mlp, post)):
                continue
            # resid_pre as it entered the layer, after any resid_pre steering: resid_mid
            # steering needs it to turn a steered residual back into a branch output.
            captured: dict[str, torch.Tensor] = {}

            def pre_hook(module, args, kwargs, *, pre=pre, captured=captured):
                x = _layer_input(args, kwargs)
                if pre in plans:
                    x = _steer_batch(x, pre, plans[pre], saes.get(pre))
                captured["x"] = x
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            handles.append(_models.layer_module(model, layer).register_forward_pre_hook(pre_hook, with_kwargs=True))

            if attn in plans or mid in plans:

                def attn_hook(module, args, out, *, attn=attn, mid=mid, captured=captured):
                    a = _output_tensor(out)
                    if attn in plans:
                        a = _steer_batch(a, attn, plans[attn], saes.get(attn))
                    if mid in plans:
                        # The layer computes resid_mid r = x + a right after this module, and
                        # hooks cannot replace r itself. So steer r (the model's own sum, in
                        # its dtype) and fold the change into the branch output instead:
                        # a' = a + (steer(r) - r), in float64 and rounded once. Then x + a'
                        # equals steer(r) up to the model's own rounding of that add. The
                        # delta form makes an AddVector here bit-identical to the same
                        # AddVector at attn_out (a' = a + v either way). Unsteered tokens keep
                        # a exactly.
                        r = captured["x"] + a
                        a_new = a.clone()
                        sae = saes.get(mid)
                        for p in plans[mid]:
                            r64 = _steer64(r[p.row], mid, p.steering, sae)
                            assert r64 is not None
                            delta = r64 - r[p.row].to(torch.float64)
                            cand = (a[p.row].to(torch.float64) + delta).to(a.dtype)
                            a_new[p.row] = torch.where(p.mask.to(a.device)[:, None], cand, a[p.row])
                        a = a_new
                    return _replace_output(out, a)

                handles.append(_models.attn_branch_module(model, layer).register_forward_hook(attn_hook))

            if mlp in plans:

                def mlp_hook(module, args, out, *, mlp=mlp):
                    return _replace_output(out, _steer_batch(_output_tensor(out), mlp, plans[mlp], saes.get(mlp)))

                handles.append(_models.mlp_branch_module(model, layer).register_forward_hook(mlp_hook))

            if post in plans:

                def post_hook(module, args, out, *, post=post):
                    return _replace_output(out, _steer_batch(_output_tensor(out), post, plans[post], saes.get(post)))

                handles.append(_models.layer_module(model, layer).register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _branch_input_hooks(
    model: nn.Module, layer: int, plans: dict[str, list[_RowPlan]], saes: dict[str, SAE]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Pre-hooks steering ``attn.hook_z`` (the output projection's input) and ``hook_mlp_in``
    (the MLP's input) of ``layer``, where any row edits them."""
    handles = []
    for site, module in (
        (f"blocks.{layer}.attn.hook_z", _models.attn_out_projection(model, layer)),
        (f"blocks.{layer}.hook_mlp_in", _models.mlp_module(model, layer)),
    ):
        if site in plans:

            def steer_input(module, args, *, site=site):
                return (_steer_batch(args[0], site, plans[site], saes.get(site)), *args[1:])

            handles.append(module.register_forward_pre_hook(steer_input))
    return handles


def site_activations(model: nn.Module, input_ids: torch.Tensor, site: str) -> torch.Tensor:
    """``[B, S, D]``: the tensor at ``site`` in one unsteered forward (what an SAE there encodes)."""
    return _captured_at(model, site, lambda: model(input_ids, use_cache=False))


def _captured_at(model: nn.Module, site: str, run: Any) -> torch.Tensor:
    """The tensor at ``site`` during ``run()``, which runs one forward of ``model``."""
    layer, kind = _parse_site(canonical_site(model, site))
    block = _models.layer_module(model, layer)
    seen: dict[str, torch.Tensor] = {}

    def record(kind: str):
        return lambda module, args, out: seen.__setitem__(kind, _output_tensor(out))

    def record_input(kind: str):
        return lambda module, args: seen.__setitem__(kind, args[0])

    handles = [
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("resid_pre", _layer_input(args, kwargs)),
                                        with_kwargs=True),
        _models.attn_out_projection(model, layer).register_forward_pre_hook(record_input("z")),
        _models.attn_branch_module(model, layer).register_forward_hook(record("attn_out")),
        _models.mlp_module(model, layer).register_forward_pre_hook(record_input("mlp_in")),
        _models.mlp_branch_module(model, layer).register_forward_hook(record("mlp_out")),
        block.register_forward_hook(record("resid_post")),
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    # The layer adds the attention branch to its input right after the branch: that sum is resid_mid.
    return seen["resid_pre"] + seen["attn_out"] if kind == "resid_mid" else seen[kind]


# --------------------------------------------------------------------------------------
# Forward and greedy generation
# --------------------------------------------------------------------------------------


def _prompt_lens(prompt_len: int | Sequence[int] | None, batch: int, seq_len: int) -> list[int]:
    if prompt_len is None:
        return [seq_len] * batch
    if isinstance(prompt_len, int):
        return [prompt_len] * batch
    lens = [int(p) for p in prompt_len]
    if len(lens) != batch:
        raise ValueError(f"reference: prompt_len has {len(lens)} entries for a batch of {batch}")
    return lens


def _row_masks(
    rows: list[Steering | None], seq_len: int, prompt_lens: list[int], attention_mask: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Each row's ``token_scope_mask`` over ``seq_len`` positions."""
    return [
        token_scope_mask(s.tokens if s is not None else "all", seq_len, prompt_lens[b],
                         None if attention_mask is None else attention_mask[b])
        for b, s in enumerate(rows)
    ]


def reference_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    saes: dict[str, SAE] | None = None,
    steering: SteeringArg = None,
    attention_mask: torch.Tensor | None = None,
    prompt_len: int | Sequence[int] | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, S, V]`` of one eager forward of ``model`` with ``steering`` applied.

    ``steering``: None; a Steering or a list of edits (every row); or a per-row list of
    Steering/None. Row b position p is "prompt" if ``p < prompt_len`` (an int or one per
    row; default: the whole sequence is prompt) and "generated" otherwise; positions with
    ``attention_mask == 0`` are never steered. ``saes`` maps site -> SAE for the sites
    with Clamp/Reconstruct edits. ``position_ids`` is passed through to the model (None:
    the model's default). Runs under ``torch.no_grad()`` with ``use_cache=False``.
    """
    rows = [_canonical_steering(model, s) for s in normalize_steering(steering, input_ids.shape[0])]
    with _steered(model, input_ids, saes, rows, attention_mask, prompt_len):
        return model(**_forward_kwargs(input_ids, attention_mask, position_ids)).logits


@contextmanager
def _steered(
    model: nn.Module,
    input_ids: torch.Tensor,
    saes: dict[str, SAE] | None,
    rows: list[Steering | None],
    attention_mask: torch.Tensor | None,
    prompt_len: int | Sequence[int] | None,
) -> Iterator[list[torch.Tensor]]:
    """``rows`` (canonical) hooked on ``model`` under ``torch.no_grad()``; yields the row masks."""
    batch, seq_len = input_ids.shape
    masks = _row_masks(rows, seq_len, _prompt_lens(prompt_len, batch, seq_len), attention_mask)
    with torch.no_grad(), steering_hooks(model, dict(saes or {}), rows, masks):
        yield masks


def _forward_kwargs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return kwargs


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids the way HF ``generate`` derives them: ``cumsum(mask) - 1``, 0 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def reference_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    saes: dict[str, SAE] | None = None,
    steering: SteeringArg = None,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding ``[B, P + max_new_tokens]`` with no KV cache; independent of HF generate.

    Every step recomputes the whole sequence with ``reference_logits`` (prompt_len = P,
    the input width, so "generated" means positions >= P) and appends the argmax of the
    last position; the attention mask is extended with ones. Position ids follow HF
    ``generate`` (``cumsum(attention_mask) - 1``), so left-padded prompts match it.

    With ``eos_token_id`` set it mimics HF's stopping: after a row emits EOS it gets
    ``pad_token_id`` (default: ``eos_token_id``), and decoding stops early once every row is
    done (the result is then shorter). Default: no EOS handling.
    """
    batch, prompt_width = input_ids.shape
    ids = input_ids
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    fill = eos_token_id if pad_token_id is None else pad_token_id
    for _ in range(max_new_tokens):
        logits = reference_logits(
            model, ids, saes=saes, steering=steering, attention_mask=mask,
            prompt_len=prompt_width, position_ids=generation_position_ids(mask),
        )
        nxt = logits[:, -1, :].argmax(dim=-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            done = done | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None].to(ids.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


@contextmanager
def steered_generation(
    model: nn.Module, input_ids: torch.Tensor, *, saes: dict[str, SAE] | None = None, steering: SteeringArg = None,
) -> Iterator[None]:
    """Keep ``steering`` hooked on ``model`` for a whole HF ``model.generate(input_ids, ...)``.

    Unlike ``reference_generate`` this lets HF decode (KV cache, sampling and its RNG draws
    included), so a seeded sampled run of the steered model can be replayed on the eager
    one. Each forward's token masks come from its ``attention_mask`` (HF generate passes
    the whole mask, prompt and cache included; its last ``S`` columns are this forward's
    tokens): position ``p`` of that mask is "generated" iff ``p >= input_ids.shape[1]``.
    """
    batch, prompt_len = input_ids.shape
    rows = [_canonical_steering(model, s) for s in normalize_steering(steering, batch)]
    masks: list[torch.Tensor] = []

    def scope(module, args, kwargs):
        seq, attention = kwargs["input_ids"].shape[1], kwargs["attention_mask"]
        full = _row_masks(rows, attention.shape[1], [prompt_len] * batch, attention)
        masks[:] = [m[-seq:] for m in full]

    handle = model.register_forward_pre_hook(scope, with_kwargs=True)
    try:
        with torch.no_grad(), steering_hooks(model, dict(saes or {}), rows, masks):
            yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------
# Recording features
# --------------------------------------------------------------------------------------

_KIND_ORDER = ("resid_pre", "z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


def _forward_order(site: str) -> tuple[int, int]:
    layer, kind = _parse_site(site)
    return layer, _KIND_ORDER.index(kind)


def _before(steering: Steering | None, site: str) -> Steering | None:
    """``steering`` with only its edits at sites that come before ``site`` in forward order."""
    if steering is None:
        return None
    edits = [e for e in steering.edits if _forward_order(e.site) < _forward_order(site)]
    return Steering(*edits, tokens=steering.tokens) if edits else None


def reference_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    site: str,
    sae: SAE,
    *,
    saes: dict[str, SAE] | None = None,
    steering: SteeringArg = None,
    attention_mask: torch.Tensor | None = None,
    prompt_len: int | Sequence[int] | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``f [B, S, d_sae]`` in float64: ``sae``'s activations of the tensor arriving at ``site``
    in one steered forward, i.e. after the edits at earlier sites and before ``site``'s own.

    Edits at ``site`` and later ones cannot change what arrives at ``site`` (they act after it,
    at every position), so the forward runs with only the earlier sites' edits.
    """
    site = canonical_site(model, site)
    rows = [_canonical_steering(model, s) for s in normalize_steering(steering, input_ids.shape[0])]
    earlier = [_before(s, site) for s in rows]
    kwargs = _forward_kwargs(input_ids, attention_mask, position_ids)
    # The steering hooks go on first, so the capture hooks see the steered tensors.
    with _steered(model, input_ids, saes, earlier, attention_mask, prompt_len):
        x = _captured_at(model, site, lambda: model(**kwargs))
    return sae_encode64(sae, x)


def reference_top_k(f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``[..., k]``: the ``k`` largest of ``f``, largest first, and among
    equal values the lower index first (a stable sort of the descending values)."""
    order = torch.sort(f, dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k]
