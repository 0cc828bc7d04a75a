"""Repeated steps: an unsteered call after another costs no routing work, a call with the
same steering objects as the last re-stages nothing, and nothing about either leaks.

A call with ``steering=None`` at a shape whose unsteered routing stands skips assignment and
routing, and the op copies ``x`` without running a path. Rows that do not read their prompt
length (unsteered, ``tokens="all"``) are not rewritten for a new one. These tests pin what that
must keep: the plain logits after steering, steering taking effect again at once, zero
recompiles, the padding that recording reads, prompt lengths once a scope reads them, and every
path under warmup.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from sae_compile.lowering.kernels import steer, torch_path
from sae_compile.runtime.state import SCOPE_ALL, SCOPE_PROMPT, Capacity, RoutingState, capture_paths
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

SITE = "blocks.1.hook_resid_post"
CLAMP = sc.Steering(sc.Clamp(SITE, 3, 6.0), sc.Clamp(SITE, 9, 0.0))


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    saes = {SITE: random_sae(hidden_size(model), 48, "jumprelu", seed=4)}
    steered = sc.steer(model, saes, backend="aot_eager", max_rows=4, max_clamps=4, max_top_k=4)
    return model, saes, steered


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(steered: sc.SteeredModel, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return steered(x, **kwargs).logits


def test_idle_after_steering_gives_the_plain_logits(llama) -> None:
    model, saes, steered = llama
    x = ids(2, 5)
    plain = logits(steered, x)
    assert_rel_close(plain, reference_logits(model, x), 1e-5)
    assert not torch.equal(logits(steered, x, steering=CLAMP), plain)
    assert torch.equal(logits(steered, x), plain)
    assert torch.equal(logits(steered, x), plain)  # idle again: the fast path


def test_steering_takes_effect_right_after_idle_calls(llama) -> None:
    """The fast path is for all-unsteered calls only: one steered row, slots assigned through
    ``step``, or a new shape all route again."""
    model, saes, steered = llama
    x = ids(3, 4, seed=1)
    plain = logits(steered, x)
    logits(steered, x)
    per_row = [None, CLAMP, None]
    got = logits(steered, x, steering=per_row)
    assert_rel_close(got, reference_logits(model, x, saes=saes, steering=per_row), 1e-5)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])
    logits(steered, x)
    steered.slots.admit("r", CLAMP, 0)
    try:
        steered.slots.assign(["r", None, None])
        with torch.no_grad():
            stepped = steered.step(x).logits
        assert_rel_close(stepped, reference_logits(model, x, saes=saes, steering=[CLAMP, None, None]), 1e-5)
        assert torch.equal(logits(steered, x), plain)
    finally:
        steered.slots.release("r")


def test_an_idle_call_after_an_idle_call_does_no_routing_work(llama, monkeypatch: pytest.MonkeyPatch) -> None:
    model, saes, steered = llama
    x = ids(2, 3, seed=2)
    logits(steered, x, steering=CLAMP)
    writes: list[str] = []
    for name in ("assign", "route"):
        original = getattr(RoutingState, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            writes.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(RoutingState, name, counted)
    logits(steered, x)
    assert "route" in writes  # leaving the steered call routes once
    writes.clear()
    for _ in range(3):
        logits(steered, x)
        logits(steered, x, attention_mask=torch.ones_like(x))
    assert writes == []


def test_alternating_idle_and_steered_calls_never_recompile(llama) -> None:
    model, saes, steered = llama
    x = ids(2, 4, seed=3)
    plain = logits(steered, x)
    steered_logits = logits(steered, x, steering=CLAMP)
    mixed = [CLAMP, sc.Steering(sc.Clamp(SITE, 5, 2.0, "add"))]
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            assert torch.equal(logits(steered, x), plain)
            assert torch.equal(logits(steered, x, steering=CLAMP), steered_logits)
            assert torch.equal(logits(steered, x), plain)
            logits(steered, x, steering=mixed)
    assert counters["stats"]["unique_graphs"] == graphs


def test_recording_after_idle_calls_reads_this_calls_padding(llama) -> None:
    """Idle calls skip the padding write (nothing is steered); a recording call must not see
    the padding an earlier idle call had."""
    model, saes, steered = llama
    x = ids(2, 4, seed=4)
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    features = [sc.Features(SITE, top_k=2)]
    with torch.no_grad():
        steered(x, attention_mask=padded)
        steered(x, attention_mask=padded)
        full = steered(x, record=features).features[SITE]
        assert (full.indices >= 0).all()
        steered(x)
        steered(x)
        masked = steered(x, attention_mask=padded, record=features).features[SITE]
    assert (masked.indices[0, 0] == -1).all() and (masked.indices[:, 1:] >= 0).all()


def test_the_op_copies_an_idle_input_but_runs_every_path_under_warmup(llama, monkeypatch: pytest.MonkeyPatch) -> None:
    model, saes, steered = llama
    site = steered._by_name[SITE]
    calls: list[int] = []
    original = torch_path.add_vector

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(torch_path, "add_vector", counted)
    logits(steered, ids(2, 3))
    x = torch.randn(2, 3, 2 * hidden_size(model))[..., ::2]  # strided: the output is contiguous anyway
    out = steer.steer_site(x, site)
    assert calls == [] and torch.equal(out, x) and out.is_contiguous()
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    with capture_paths():
        assert torch.equal(steer.steer_site(x, site), x)
    assert calls == [1]


def test_a_decode_loop_with_one_steering_object_matches_the_reference(llama) -> None:
    """Every step passes the same objects (the identity shortcut) on a static cache, whose
    length lives on the device (no prompt-length write for tokens="all")."""
    import transformers

    model, saes, steered = llama
    x = ids(2, 7, seed=5)
    per_row = [CLAMP, sc.Steering(sc.Clamp(SITE, 5, 3.0, "scale"))]
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(x[:, :4], past_key_values=cache)  # allocate the cache eagerly
        cache.reset()
        steered(x[:, :4], past_key_values=cache, steering=per_row)
        steps = [steered(x[:, t : t + 1], past_key_values=cache, steering=per_row).logits for t in range(4, 7)]
    expected = reference_logits(model, x, saes=saes, steering=per_row)[:, 4:]
    assert_rel_close(torch.cat(steps, dim=1), expected, 1e-5)


def test_prompt_lengths_left_unwritten_are_written_once_a_scope_reads_them() -> None:
    routing = RoutingState(Capacity(max_rows=2, max_batch=2, max_tokens=16), torch.float32, torch.device("cpu"))
    routing.set_scope(1, SCOPE_ALL)
    routing.assign([1, 0], [3, 3])
    routing.assign([1, 0], [5, 5])  # row 1 steers every token: the new length is not read yet
    routing.set_scope(1, SCOPE_PROMPT)
    routing.route(torch.arange(6), None, 2, 6)
    assert routing.token_mask[:6].tolist() == [True] * 5 + [False]
    assert not routing.token_mask[6:12].any()
