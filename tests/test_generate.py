"""generate(): HF generate semantics, with prefill and decode both on the steered compiled forward."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from tests.factories import random_sae
from tests.models import hidden_size, make_model
from tests.reference import reference_generate, steered_generation

POST = "blocks.1.hook_resid_post"
NEW = 6


@pytest.fixture(scope="module")
def setup():
    model = make_model("llama", seed=5)
    d = hidden_size(model)
    saes = {POST: random_sae(d, 48, "jumprelu", seed=2), "blocks.0.hook_mlp_out": random_sae(d, 32, "topk", k=4)}
    steered = sc.steer(model, saes, backend="aot_eager")
    return model, saes, steered


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


@torch.no_grad()  # steered.generate refuses to run with gradients enabled (the op has no backward)
def generate(steered, model, **kwargs) -> torch.Tensor:
    cfg = model.generation_config
    return steered.generate(max_new_tokens=NEW, do_sample=False, eos_token_id=cfg.eos_token_id,
                            pad_token_id=cfg.pad_token_id, **kwargs)


def reference(model, saes, **kwargs) -> torch.Tensor:
    cfg = model.generation_config
    return reference_generate(model, saes=saes, max_new_tokens=NEW, eos_token_id=cfg.eos_token_id,
                              pad_token_id=cfg.pad_token_id, **kwargs)


STEERINGS = {
    "all": sc.Steering(sc.Clamp(POST, 4, 6.0), sc.AddVector("blocks.0.hook_mlp_out", torch.ones(32), -1.0)),
    "prompt": sc.Steering(sc.Clamp(POST, 9, 8.0), sc.Reconstruct("blocks.0.hook_mlp_out"), tokens="prompt"),
    "generated": sc.Steering(sc.Clamp(POST, 4, 6.0, "add"), tokens="generated"),
}


@pytest.mark.parametrize("scope", list(STEERINGS))
def test_greedy_generate_matches_reference(setup, scope: str) -> None:
    model, saes, steered = setup
    ids, mask = prompts()
    steering = STEERINGS[scope]
    got = generate(steered, model, input_ids=ids, attention_mask=mask, steering=steering)
    expected = reference(model, saes, input_ids=ids, attention_mask=mask, steering=steering)
    unsteered = reference(model, saes, input_ids=ids, attention_mask=mask, steering=None)
    assert not torch.equal(expected, unsteered), "the steering must change the greedy text"
    assert torch.equal(got, expected)


def test_generated_scope_leaves_first_new_token(setup) -> None:
    model, saes, steered = setup
    ids, mask = prompts()
    got = generate(steered, model, input_ids=ids, attention_mask=mask, steering=STEERINGS["generated"])
    plain = generate(steered, model, input_ids=ids, attention_mask=mask, steering=None)
    width = ids.shape[1]
    assert torch.equal(got[:, width], plain[:, width])
    assert not torch.equal(got, plain)


def test_per_row_steering_in_a_padded_batch(setup) -> None:
    model, saes, steered = setup
    ids, mask = prompts()
    per_row = [STEERINGS["all"], None, STEERINGS["prompt"]]
    got = generate(steered, model, input_ids=ids, attention_mask=mask, steering=per_row)
    assert torch.equal(got, reference(model, saes, input_ids=ids, attention_mask=mask, steering=per_row))


def test_changing_steering_between_generations_adds_no_graph(setup) -> None:
    model, _, steered = setup
    ids, mask = prompts()
    generate(steered, model, input_ids=ids, attention_mask=mask, steering=STEERINGS["all"])
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for steering in (STEERINGS["prompt"], None, [None, STEERINGS["generated"], STEERINGS["all"]]):
            generate(steered, model, input_ids=ids, attention_mask=mask, steering=steering)
    assert counters["stats"]["unique_graphs"] == graphs


def test_generate_leaves_model_untouched(setup) -> None:
    model, _, steered = setup
    ids, mask = prompts()
    generate(steered, model, input_ids=ids, attention_mask=mask, steering=STEERINGS["all"])
    assert "forward" not in vars(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_static_cache_generation_with_an_additive_site_on_an_sae_site() -> None:
    model = make_model("llama", seed=5)
    d = hidden_size(model)
    saes = {POST: random_sae(d, 48, "jumprelu", seed=2)}
    steered = sc.steer(model, saes, sites=["model.layers.1"], backend="aot_eager")  # same site, by alias
    steering = sc.Steering(sc.Clamp(POST, 4, 6.0), sc.AddVector("model.layers.1", torch.ones(d)))
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    got = generate(steered, model, input_ids=ids, steering=steering, cache_implementation="static")
    assert torch.equal(got, reference(model, saes, input_ids=ids, steering=steering))


def test_left_padded_per_row_batch_equals_individual_generation(setup) -> None:
    model, _, steered = setup
    ids, mask = prompts()
    per_row = [STEERINGS["all"], None, STEERINGS["generated"]]
    batched = generate(steered, model, input_ids=ids, attention_mask=mask, steering=per_row)
    for b, steering in enumerate(per_row):
        real = mask[b].bool()
        alone = generate(steered, model, input_ids=ids[b : b + 1, real], steering=steering)
        new_tokens = batched[b, ids.shape[1]:]
        assert torch.equal(alone[0, real.sum():], new_tokens[: alone.shape[1] - int(real.sum())])


def test_streamer_receives_the_generated_tokens(setup) -> None:
    model, _, steered = setup
    ids, _ = prompts()

    class Collect:
        def __init__(self) -> None:
            self.chunks: list[torch.Tensor] = []

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.clone())

        def end(self) -> None:
            self.chunks.append(torch.empty(0))

    streamer = Collect()
    single = ids[1:2]
    greedy = generate(steered, model, input_ids=single, steering=STEERINGS["all"], streamer=streamer)
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])  # [0] is the prompt, [-1] the end
    assert torch.equal(streamed, greedy[0, single.shape[1]:])


#: Wide enough that a sampled run departs from the greedy one within NEW tokens.
SAMPLING = dict(do_sample=True, top_k=20, temperature=1.5)


@torch.no_grad()
def sample(generate_fn, **kwargs) -> torch.Tensor:
    """``generate_fn`` sampling NEW tokens from the padded prompts, torch's RNG seeded the same each time."""
    ids, mask = prompts()
    torch.manual_seed(0)
    return generate_fn(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **SAMPLING, **kwargs)


def test_unsteered_sampling_draws_what_plain_hf_sampling_draws(setup) -> None:
    model, _, steered = setup
    got = sample(steered.generate, steering=None)
    assert torch.equal(got, sample(model.generate))
    ids, mask = prompts()
    greedy = generate(steered, model, input_ids=ids, attention_mask=mask, steering=None)
    assert not torch.equal(got, greedy), "the sampling must depart from greedy, or this proves nothing"


@pytest.mark.parametrize("scope", list(STEERINGS))
def test_steered_sampling_draws_what_the_hooked_reference_draws(setup, scope: str) -> None:
    model, saes, steered = setup
    steering = STEERINGS[scope]
    got = sample(steered.generate, steering=steering)
    with steered_generation(model, prompts()[0], saes=saes, steering=steering):
        expected = sample(model.generate)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, sample(model.generate)), "the steering must change the sampled text"
