"""Steering semantics on one compiled Llama: per-row batches, token scope, padding, zero
recompiles, static addresses, and the no-steering graph."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

POST, MLP, PRE = "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    d = hidden_size(model)
    saes = {
        POST: random_sae(d, 64, "jumprelu", seed=1),
        MLP: random_sae(d, 40, "topk", k=5, seed=2),
        PRE: random_sae(d, 32, "relu", seed=3, apply_b_dec_to_input=True),
    }
    steered = sc.steer(model, saes, backend="aot_eager", max_rows=6, max_clamps=4)
    return model, saes, steered


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_steering(rng: random.Random, d: int) -> sc.Steering:
    edits: list = []
    for site, d_sae in ((POST, 64), (MLP, 40), (PRE, 32)):
        if rng.random() < 0.5:
            continue
        for _ in range(rng.randint(1, 3)):
            mode = rng.choice(["set", "add", "scale"])
            edits.append(sc.Clamp(site, rng.randrange(d_sae), rng.uniform(-3, 3), mode))
        if rng.random() < 0.4:
            edits.append(sc.AddVector(site, torch.randn(d, generator=torch.Generator().manual_seed(rng.randrange(99))),
                                      rng.uniform(-1, 1)))
        if rng.random() < 0.3:
            edits.append(sc.Reconstruct(site))
    if not edits:
        edits.append(sc.Clamp(POST, rng.randrange(64), 2.0))
    return sc.Steering(*edits, tokens=rng.choice(["all", "prompt", "generated"]))


def run(steered, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return steered(*args, **kwargs).logits


def test_per_row_batch_equals_single_row_runs(llama) -> None:
    model, saes, steered = llama
    d = hidden_size(model)
    rng = random.Random(7)
    per_row = [random_steering(rng, d), None, random_steering(rng, d), random_steering(rng, d), None,
               sc.Steering(sc.AddVector(POST, torch.ones(d)), sc.Reconstruct(MLP))]
    x = ids(len(per_row), 6)
    batched = run(steered, x, steering=per_row, prompt_len=4)
    for b, steering in enumerate(per_row):
        single = run(steered, x[b : b + 1], steering=steering, prompt_len=4)
        assert_rel_close(batched[b], single[0], 1e-5)
        expected = reference_logits(model, x[b : b + 1], saes=saes, steering=steering, prompt_len=4)
        assert_rel_close(single[0], expected[0], 1e-5)


@pytest.mark.parametrize("tokens", ["all", "prompt", "generated"])
def test_token_scope_and_left_padding(llama, tokens: str) -> None:
    model, saes, steered = llama
    x = ids(3, 8, seed=1)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    steering = sc.Steering(sc.Clamp(POST, 5, 3.0), sc.AddVector(PRE, torch.ones(hidden_size(model))), tokens=tokens)
    got = run(steered, x, attention_mask=mask, steering=steering, prompt_len=5)
    expected = reference_logits(model, x, saes=saes, steering=steering, attention_mask=mask, prompt_len=5)
    valid = mask.bool()
    assert_rel_close(got[valid], expected[valid], 1e-5)


def test_cache_continuation_is_generated_scope(llama) -> None:
    """On a cache, a call's tokens are "generated" by default: prompt-only steering leaves them alone."""
    model, saes, steered = llama
    x = ids(1, 6, seed=2)
    steering = sc.Steering(sc.Clamp(POST, 1, 4.0), tokens="generated")
    with torch.no_grad():
        first = steered(x[:, :5], steering=steering, use_cache=True)
        second = steered(x[:, 5:], steering=steering, past_key_values=first.past_key_values, use_cache=True)
    expected = reference_logits(model, x, saes=saes, steering=steering, prompt_len=5)
    assert_rel_close(first.logits[0], expected[0, :5], 1e-5)
    assert_rel_close(second.logits[0, 0], expected[0, 5], 1e-5)
    assert rel_err(expected[0, 5], reference_logits(model, x, saes=saes)[0, 5]) > 1e-3


def test_fifty_steering_changes_add_no_graph(llama) -> None:
    model, saes, steered = llama
    d = hidden_size(model)
    x = ids(4, 6, seed=3)
    run(steered, x, steering=None)
    graphs = counters["stats"]["unique_graphs"]
    rng = random.Random(11)
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(50):
            n_steered = rng.randint(0, 4)
            per_row = [random_steering(rng, d) if b < n_steered else None for b in range(4)]
            rng.shuffle(per_row)
            got = run(steered, x, steering=per_row, prompt_len=3)
            if i % 10 == 0:
                expected = reference_logits(model, x, saes=saes, steering=per_row, prompt_len=3)
                assert_rel_close(got, expected, 1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_state_addresses_never_change(llama) -> None:
    model, _, steered = llama
    before = {name: t.data_ptr() for name, t in steered.steering_state().items()}
    assert any(name.startswith(POST) for name in before) and "routing.batch_rows" in before
    rng = random.Random(5)
    x = ids(2, 5)
    for _ in range(100):
        run(steered, x, steering=[random_steering(rng, hidden_size(model)), None])
    assert {name: t.data_ptr() for name, t in steered.steering_state().items()} == before


def test_unsteered_call_equals_plain_compile(llama) -> None:
    model, _, steered = llama
    x = ids(2, 7, seed=4)
    plain = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = plain(x).logits
    assert (run(steered, x, steering=None) - expected).abs().max() <= 1e-6
    assert (run(steered, x, steering=[None, None]) - expected).abs().max() <= 1e-6


def test_no_attached_site_means_no_op_in_graph() -> None:
    model = make_model("llama", seed=3)
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    steered = sc.steer(model, backend=record)
    x = ids(1, 5)
    got = run(steered, x)
    assert len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if "sae_compile" in str(n.target)]
    with torch.no_grad():
        assert torch.equal(got, model(x).logits)
    with pytest.raises(ValueError, match="no site is attached"):
        run(steered, x, steering=sc.Steering(sc.Clamp(POST, 0, 1.0)))


def test_additive_only_site_and_bf16_model() -> None:
    model = make_model("qwen2", dtype=torch.bfloat16, seed=2)
    d = hidden_size(model)
    sae = random_sae(d, 48, "jumprelu", seed=4)
    steered = sc.steer(model, {POST: sae}, sites=["blocks.0.hook_attn_out"], backend="aot_eager")
    steering = sc.Steering(sc.AddVector("blocks.0.hook_attn_out", torch.ones(d), 0.5), sc.Clamp(POST, 2, 3.0))
    x = ids(2, 6)
    got = run(steered, x, steering=steering)
    expected = reference_logits(model, x, saes={POST: sae.to(torch.bfloat16)}, steering=steering)
    plain = reference_logits(model, x)
    assert rel_err(expected, plain) > 0.05
    # bf16 carries ~3 significant digits; the model's own rounding dominates the difference.
    assert_rel_close(got.float(), expected.float(), 2e-2)
    with pytest.raises(ValueError, match="no SAE is attached"):
        run(steered, x, steering=sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 0, 1.0)))


def test_steered_model_passes_through_what_hf_code_reads(llama) -> None:
    model, _, steered = llama
    assert steered.config is model.config and steered.generation_config is model.generation_config
    assert steered.device == model.device and steered.dtype == model.dtype


def test_one_sae_with_a_hook_name_steers_like_a_list_of_one() -> None:
    model = make_model("llama", seed=4)
    base = random_sae(hidden_size(model), 16, "relu", seed=1)
    sae = sc.SAE(base.W_enc, base.W_dec, base.b_enc, base.b_dec, hook_name=POST)
    steered = sc.steer(model, sae, backend="aot_eager")
    assert steered.attached_sites == (POST,)
    x, steering = ids(1, 5), sc.Steering(sc.Clamp(POST, 2, 5.0))
    assert_rel_close(run(steered, x, steering=steering), reference_logits(model, x, saes={POST: sae}, steering=steering), 1e-5)


def test_every_entry_point_refuses_grad_mode_alike(llama) -> None:
    _, _, steered = llama
    x = ids(1, 3)
    with torch.enable_grad():
        for call in (lambda: steered(x), lambda: steered.step(x), lambda: steered.generate(x, max_new_tokens=1)):
            with pytest.raises(ValueError, match=r"called with gradients enabled.*torch.no_grad\(\)"):
                call()


def test_a_device_held_cache_length_is_never_read_back(llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a static cache the default scope comes from the cache length the cache keeps on the
    device: continuing the cache must not read it on the host (a sync per step on a GPU)."""
    import transformers

    model, saes, steered = llama
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    x = ids(2, 6, seed=3)
    steering = sc.Steering(sc.Clamp(POST, 7, 6.0), tokens="generated")
    with torch.no_grad():
        model(x[:, :4], past_key_values=cache)  # allocate the cache eagerly
        cache.reset()
        steered(x[:, :4], past_key_values=cache, steering=steering)
        length = cache.layers[0].cumulative_length
        for name in ("__int__", "__index__", "__bool__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def guarded(self, *args, _original=original, _name=name):
                assert self is not length, f"Tensor.{_name} read the cache length back to the host"
                return _original(self, *args)

            monkeypatch.setattr(torch.Tensor, name, guarded)
        got = steered(x[:, 4:], past_key_values=cache, steering=steering).logits
        monkeypatch.undo()
    expected = reference_logits(model, x, saes=saes, steering=steering, prompt_len=4)[:, 4:]
    assert_rel_close(got, expected, 1e-5)
