"""Production-loop runtime: request slots, atomic updates, content keys, hot swap, warmup."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from sae_compile.runtime.hashing import steering_key
from sae_compile.runtime.state import STEERING_PATHS
from tests.factories import assert_rel_close, random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

POST, MID = "blocks.1.hook_resid_post", "blocks.2.hook_resid_mid"
ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 4, 5


@pytest.fixture(scope="module")
def setup():
    model = make_model("mistral", seed=7)
    d = hidden_size(model)
    saes = {POST: random_sae(d, 48, "jumprelu", seed=1), MID: random_sae(d, 32, "topk", k=4, seed=2)}
    steered = sc.steer(model, saes, backend="aot_eager", max_rows=5, max_clamps=3, max_batch=BATCH)
    steered.warmup([(BATCH, SEQ)])
    return model, saes, steered


def random_steering(rng: random.Random, d: int) -> sc.Steering:
    site = rng.choice([POST, MID])
    width = 48 if site == POST else 32
    edits: list = [sc.Clamp(site, rng.randrange(width), rng.choice([-2.0, 1.0, 3.0]), rng.choice(["set", "add", "scale"]))
                   for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        edits.append(sc.AddVector(POST, torch.full((d,), rng.choice([-0.5, 0.5]))))
    if rng.random() < 0.2:
        edits.append(sc.Reconstruct(site))
    return sc.Steering(*edits, tokens=rng.choice(["all", "prompt", "generated"]))


def snapshot(steered: sc.SteeredModel) -> tuple[dict[str, torch.Tensor], dict, dict]:
    tensors = {name: t.clone() for name, t in steered.steering_state().items()}
    return tensors, steered.slots.requests, steered.slots.rows_in_use()


def assert_unchanged(steered: sc.SteeredModel, before: tuple) -> None:
    tensors, requests, rows = snapshot(steered)
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors), "tables changed"
    assert (requests, rows) == (before[1], before[2]), "manager state changed"


def test_stream_of_admissions_updates_and_releases(setup) -> None:
    model, saes, steered = setup
    d = hidden_size(model)
    rng = random.Random(0)
    x = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    live: dict[int, tuple[sc.Steering | None, int]] = {}
    pointers = {name: t.data_ptr() for name, t in steered.steering_state().items()}
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(200):
            action = rng.random()
            if action < 0.4 or not live:
                rid, steering, plen = step, rng.choice([None, random_steering(rng, d)]), rng.randint(0, SEQ)
                try:
                    steered.slots.admit(rid, steering, plen)
                    live[rid] = (steering, plen)
                except ValueError as error:
                    assert "rows but only" in str(error)
            elif action < 0.7:
                rid = rng.choice(sorted(live))
                steering = random_steering(rng, d)
                try:
                    steered.slots.update(rid, steering)
                    live[rid] = (steering, live[rid][1])
                except ValueError as error:
                    assert "rows but only" in str(error)
            else:
                rid = rng.choice(sorted(live))
                steered.slots.release(rid)
                steered.slots.release(rid)  # idempotent
                del live[rid]
            batch = [rng.choice([*live, None]) if live else None for _ in range(BATCH)]
            steered.slots.assign(batch)
            with torch.no_grad():
                got = steered.step(x).logits
            per_row = [None if r is None else live[r][0] for r in batch]
            plens = [0 if r is None else live[r][1] for r in batch]
            expected = reference_logits(model, x, saes=saes, steering=per_row, prompt_len=plens)
            assert_rel_close(got, expected, 1e-5)
            assert len(steered.slots.rows_in_use()) <= 5
    assert counters["stats"]["unique_graphs"] == graphs
    assert {name: t.data_ptr() for name, t in steered.steering_state().items()} == pointers
    for rid in live:
        steered.slots.release(rid)
    assert steered.slots.rows_in_use() == {}


def test_identical_steerings_share_one_refcounted_row(setup) -> None:
    _, _, steered = setup
    a = sc.Steering(sc.Clamp(POST, 1, 2.0), sc.Clamp(MID, 3, 1.0, "add"))
    b = sc.Steering(sc.Clamp(MID, 3, 1.0, "add"), sc.Clamp("model.layers.1", 1, 2.0))  # same content, other order/alias
    row = steered.slots.admit("share-a", a, 3)
    assert steered.slots.admit("share-b", b, 4) == row
    assert steered.slots.rows_in_use()[row] == 2
    steered.slots.release("share-a")
    assert steered.slots.rows_in_use()[row] == 1
    steered.slots.release("share-b")
    assert row not in steered.slots.rows_in_use()


def test_capacity_overflow_changes_nothing(setup) -> None:
    _, _, steered = setup
    steered.slots.admit("keep", sc.Steering(sc.Clamp(POST, 0, 1.0)), 2)
    filler = [f"fill{i}" for i in range(4)]
    for i, rid in enumerate(filler):
        steered.slots.admit(rid, sc.Steering(sc.Clamp(POST, i + 1, 1.0)), 2)
    before = snapshot(steered)
    with pytest.raises(ValueError, match=r"needs 1 new rows but only 0 are free \(max_rows=5\)"):
        steered.slots.admit("over", sc.Steering(sc.Clamp(POST, 40, 1.0)), 2)
    with pytest.raises(ValueError, match="max_clamps=3"):
        steered.slots.update("keep", sc.Steering(*(sc.Clamp(POST, f, 1.0) for f in range(4))))
    with pytest.raises(ValueError, match="feature 48 is out of range"):
        steered.slots.update("keep", sc.Steering(sc.Clamp(POST, 48, 1.0)))
    with pytest.raises(ValueError, match="already admitted"):
        steered.slots.admit("keep", None, 1)
    with pytest.raises(ValueError, match="not admitted"):
        steered.slots.assign(["keep", "ghost"])
    with pytest.raises(ValueError, match="max_batch=4"):
        steered.slots.assign(["keep"] * 5)
    with pytest.raises(ValueError, match="prompt_len must be non-negative"):
        steered.slots.admit("neg", None, -1)
    with pytest.raises(TypeError, match="prompt_len must be an int, got str"):
        steered.slots.admit("text", None, "3")
    assert_unchanged(steered, before)
    # An update that reuses its own row's slot fits even when no row is free.
    steered.slots.update("keep", sc.Steering(sc.Clamp(POST, 9, 2.0)))
    for rid in ["keep", *filler]:
        steered.slots.release(rid)
    assert steered.slots.rows_in_use() == {}


def test_hot_swap_without_recompile_and_a_failed_copy_is_loud(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap changes the steering without a recompile. A copy that fails midway (no backup is
    kept, so the site's memory never doubles) leaves the site refusing to run, never steering
    with half-written weights; a later good swap repairs it."""
    model, saes, steered = setup
    d = hidden_size(model)
    x = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    steering = sc.Steering(sc.Clamp(POST, 5, 3.0), sc.Clamp(POST, 30, 1.0, "add"))
    graphs = counters["stats"]["unique_graphs"]
    swapped = {**saes, POST: random_sae(d, 40, "jumprelu", seed=99)}  # narrower, within capacity
    try:
        with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
            before = steered(x, steering=steering).logits
            steered.load_sae(POST, swapped[POST])
            after = steered(x, steering=steering).logits
            assert_rel_close(after, reference_logits(model, x, saes=swapped, steering=steering), 1e-5)
            assert not torch.allclose(after, before)

            def fail_midway(self, sae):
                self.W_enc.zero_()
                raise RuntimeError("injected failure mid-copy")

            monkeypatch.setattr(type(steered._by_name[POST]), "_load_sae", fail_midway)
            with pytest.raises(RuntimeError, match="injected"):
                steered.load_sae(POST, saes[POST])
            monkeypatch.undo()
            with pytest.raises(RuntimeError, match=f"load_sae failed while copying a new SAE into {POST}"):
                steered(x, steering=steering)
            steered.load_sae(POST, swapped[POST])
            assert torch.equal(steered(x, steering=steering).logits, after)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        monkeypatch.undo()
        steered.load_sae(POST, saes[POST])
    with pytest.raises(ValueError, match="buffers at blocks.1.hook_resid_post hold 48 features"):
        steered.load_sae(POST, random_sae(d, 64, "jumprelu"))
    with pytest.raises(ValueError, match="Changing the activation"):
        steered.load_sae(POST, random_sae(d, 48, "relu"))
    with pytest.raises(ValueError, match="not attached.*needs a new sc.steer"):
        steered.load_sae("blocks.0.hook_resid_post", saes[POST])
    steered.slots.admit("uses-47", sc.Steering(sc.Clamp(POST, 47, 1.0)), 1)
    with pytest.raises(ValueError, match="clamps feature 47"):
        steered.load_sae(POST, random_sae(d, 40, "jumprelu"))
    steered.slots.release("uses-47")


def test_warmup_then_no_compiles_in_the_loop() -> None:
    model = make_model("llama", seed=8)
    d = hidden_size(model)
    steered = sc.steer(model, {POST: random_sae(d, 32, "relu")}, sites=[MID], backend="aot_eager")
    steered.warmup([(2, 6), (2, 1), (3, 4)], use_cache=False)
    assert steered.slots.rows_in_use() == {}, "warmup leaves the steering state as it was"
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        for batch, seq in [(2, 6), (2, 1), (3, 4), (2, 6)]:
            steered(torch.ones(batch, seq, dtype=torch.long), use_cache=False,
                    steering=sc.Steering(sc.Clamp(POST, 1, 2.0), sc.AddVector(MID, torch.ones(d))))
    assert counters["stats"]["unique_graphs"] == graphs


STEERINGS = [
    sc.Steering(sc.Clamp(POST, 3, 2.0)),
    sc.Steering(sc.Clamp(POST, 3, 2.0, "add")),
    sc.Steering(sc.Clamp(POST, 3, 2.5)),
    sc.Steering(sc.Clamp(POST, 4, 2.0)),
    sc.Steering(sc.Clamp(MID, 3, 2.0)),
    sc.Steering(sc.Clamp(POST, 3, 2.0), tokens="prompt"),
    sc.Steering(sc.Reconstruct(POST)),
    sc.Steering(sc.Reconstruct(MID)),
    sc.Steering(sc.AddVector(POST, torch.ones(4))),
    sc.Steering(sc.AddVector(POST, torch.ones(4), 2.0)),
    sc.Steering(sc.AddVector(POST, torch.tensor([1.0, 1.0, 1.0, 2.0]))),
    sc.Steering(sc.AddVector(MID, torch.ones(4))),
    sc.Steering(sc.Clamp(POST, 3, 2.0), sc.Clamp(POST, 3, 1.0, "add")),
    sc.Steering(sc.Clamp(POST, 3, 1.0, "add"), sc.Clamp(POST, 3, 2.0)),
]


def test_keys_differ_for_every_field_and_kind() -> None:
    keys = [steering_key(s) for s in STEERINGS]
    assert len(set(keys)) == len(keys)


def test_keys_ignore_order_where_order_does_not_matter() -> None:
    v, w = torch.ones(4), torch.arange(4.0)
    a = sc.Steering(sc.AddVector(POST, v), sc.Clamp(POST, 1, 2.0), sc.AddVector(POST, w, 0.5), sc.Clamp(MID, 2, 1.0))
    b = sc.Steering(sc.Clamp(MID, 2, 1.0), sc.AddVector(POST, w, 0.5), sc.Clamp(POST, 1, 2.0), sc.AddVector(POST, v))
    assert steering_key(a) == steering_key(b)
    assert steering_key(sc.Steering(sc.Clamp(POST, 1, 2.0))) == steering_key(sc.Steering(sc.Clamp(POST, 1, 2)))


def test_keys_are_stable_across_processes() -> None:
    code = (
        f"import sys, json; sys.path[:0] = [{str(ROOT)!r}]\n"
        "from tests.test_slots import STEERINGS\nfrom sae_compile.runtime.hashing import steering_key\n"
        "print(json.dumps([steering_key(s) for s in STEERINGS]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [steering_key(s) for s in STEERINGS]


def test_update_and_release_reroute_assigned_batch_rows(setup) -> None:
    model, saes, steered = setup
    x = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    first, second = sc.Steering(sc.Clamp(POST, 2, 4.0)), sc.Steering(sc.Clamp(MID, 5, 3.0))
    steered.slots.admit("p", first, 0)
    steered.slots.admit("q", first, 0)
    steered.slots.assign(["p", "q", None, "p"])
    steered.slots.update("p", second)  # p moves to a new row; q keeps the old one
    with torch.no_grad():
        got = steered.step(x).logits
    expected = reference_logits(model, x, saes=saes, steering=[second, first, None, second], prompt_len=0)
    assert_rel_close(got, expected, 1e-5)
    steered.slots.release("q")
    steered.slots.admit("r", sc.Steering(sc.Clamp(POST, 9, -2.0)), 0)  # may reuse q's row
    with torch.no_grad():
        got = steered.step(x).logits
    assert_rel_close(got, reference_logits(model, x, saes=saes, steering=[second, None, None, second], prompt_len=0), 1e-5)
    for rid in ("p", "r"):
        steered.slots.release(rid)


def test_rows_past_a_shorter_assignment_are_unsteered(setup) -> None:
    """Batch rows that the latest assignment does not name are unsteered, whatever an earlier,
    longer assignment put there."""
    model, saes, steered = setup
    x = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    steering = sc.Steering(sc.Clamp(POST, 2, 4.0), sc.Reconstruct(MID))
    steered.slots.admit("p", steering, 0)
    steered.slots.assign(["p"] * BATCH)
    steered.slots.assign(["p", "p"])
    with torch.no_grad():
        got = steered.step(x).logits
    expected = reference_logits(model, x, saes=saes, steering=[steering, steering, None, None], prompt_len=0)
    assert_rel_close(got, expected, 1e-5)
    steered.slots.release("p")


def test_warmup_runs_every_captured_path_on_every_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture holds every steering path (``SiteState.paths_within``), so warmup must have run each of
    them, with real tokens, on every bucket: batch 1 included."""
    from sae_compile.lowering.kernels import torch_path

    ran: set[tuple[str, str, tuple[int, int]]] = set()

    def recording(path: str, fn):
        def run(x, rows, mask_or_weight, site, *args):
            if bool(mask_or_weight.any()):
                ran.add((site.name, path, tuple(x.shape[:2])))
            return fn(x, rows, mask_or_weight, site, *args)

        return run

    for path in ("add_vector", "sparse_delta", "full_path"):
        monkeypatch.setattr(torch_path, path, recording(path, getattr(torch_path, path)))
    model = make_model("llama", seed=8)
    d = hidden_size(model)
    steered = sc.steer(model, {POST: random_sae(d, 32, "relu"), MID: random_sae(d, 32, "topk", k=3)}, backend="aot_eager")
    buckets = [(1, 4), (1, 1), (3, 2)]
    steered.warmup(buckets, use_cache=False)
    for site in (POST, MID):
        captured = steered._by_name[site].paths_within(STEERING_PATHS)
        paths = [("add_vector", captured.add), ("sparse_delta", captured.sparse), ("full_path", captured.full)]
        for bucket in buckets:
            for path, needed in paths:
                assert not needed or (site, path, bucket) in ran, (site, path, bucket)


def test_call_steering_never_touches_admitted_requests(setup) -> None:
    """``steering=`` on a call has rows of its own: with every slot row taken, a call with as
    many distinct steerings still runs, and the serving loop's next step is routed as before."""
    model, saes, steered = setup
    x = torch.randint(3, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(6))
    requests = [sc.Steering(sc.Clamp(POST, i, 2.0 + i)) for i in range(5)]
    for i, steering in enumerate(requests):
        steered.slots.admit(f"r{i}", steering, 0)
    steered.slots.assign(["r0", "r4", None, "r2"])
    calls = [sc.Steering(sc.Clamp(MID, i, 1.0 + i)) for i in range(BATCH)]
    try:
        with torch.no_grad():
            called = steered(x, steering=calls, prompt_len=0).logits
            stepped = steered.step(x).logits
        assert_rel_close(called, reference_logits(model, x, saes=saes, steering=calls, prompt_len=0), 1e-5)
        served = [requests[0], requests[4], None, requests[2]]
        assert_rel_close(stepped, reference_logits(model, x, saes=saes, steering=served, prompt_len=0), 1e-5)
        assert sorted(steered.slots.requests) == [f"r{i}" for i in range(5)]
    finally:
        for i in range(5):
            steered.slots.release(f"r{i}")
