"""OpenAI's GPT-2 small autoencoders: ``{layer}.pt`` state dicts with an input layer norm.

The library (github.com/openai/sparse_autoencoder) is not on the package index (the index's
``sparse_autoencoder`` is an unrelated project), so the tests write files by hand in the layout its
``sparse_autoencoder/model.py`` saves and reads: ``Autoencoder.state_dict()`` holds the parameters
``pre_bias [D]``, ``latent_bias [F]``, ``encoder.weight [F, D]``, ``decoder.weight [D, F]``, the
buffers ``stats_last_nonzero``, ``latents_activation_frequency``, ``latents_mean_square``, and
``activation`` (the class name) with ``activation_state_dict`` (TopK: ``k`` and ``postact_fn``).
``Autoencoder.from_state_dict`` turns the layer norm on exactly for TopK. Release files sit at
``{location}_{version}/autoencoders/{layer}.pt`` (``sparse_autoencoder/paths.py``). The equations
(``openai_reference`` below) are model.py's::

    x_n, mu, std = LN(x)            mu = mean, std = unbiased std of x - mu, x_n = (x - mu) / (std + 1e-5)
    latents = TopK(encoder(x_n - pre_bias) + latent_bias)     (relu of the k largest)
    recons  = (decoder(latents) + pre_bias) * std + mu
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
import sae_compile.lowering.op  # noqa: F401 - registers torch.ops.sae_compile.steer
from sae_compile import SAE
from sae_compile.checkpoints import detect_format
from sae_compile.lowering.kernels import steer as steer_module
from sae_compile.lowering.kernels import triton_sae
from sae_compile.lowering.kernels.steer import steer_site
from sae_compile.runtime.engine import EngineState
from sae_compile.runtime.slots import SlotManager
from sae_compile.runtime.state import Capacity, RoutingState, SiteState
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import make_model
from tests.reference import apply_steering_at_site, reference_logits, token_scope_mask
from tests.test_checkpoints import assert_names, assert_same_sae
from tests.test_goodfire import TouchOnUnpickle, assert_load_fails_naming

D_IN, D_SAE, K = 32, 96, 8
LAYER = 1
SITE = f"blocks.{LAYER}.hook_resid_post"
RELEASE = Path("resid_post_mlp_v5_32k") / "autoencoders" / f"{LAYER}.pt"
FP64 = dict(rtol=1e-12, atol=1e-12)


def openai_state(seed: int = 0, *, activation: str = "TopK", d_in: int = D_IN, d_sae: int = D_SAE, k: int = K) -> dict:
    """``Autoencoder.state_dict()`` of a random autoencoder, as model.py writes it."""
    g = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict(
        pre_bias=0.1 * torch.randn(d_in, generator=g),
        latent_bias=0.1 * torch.randn(d_sae, generator=g),
        stats_last_nonzero=torch.zeros(d_sae, dtype=torch.long),
        latents_activation_frequency=torch.ones(d_sae),
        latents_mean_square=torch.zeros(d_sae),
    )
    state["encoder.weight"] = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    state["decoder.weight"] = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    state["activation"] = activation
    # TopK.state_dict(): its (empty) module state plus k and the post-activation's class name.
    state["activation_state_dict"] = collections.OrderedDict(k=k, postact_fn="ReLU") if activation == "TopK" else {}
    return state


def write_openai(file: Path, state: dict | None = None) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state() if state is None else state, file)
    return file


def openai_reference(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents, recons)`` by model.py's equations (module docstring), in float64."""
    w = {key: value.double() for key, value in state.items() if isinstance(value, torch.Tensor)}
    x = x.double()
    normalize = state.get("activation") == "TopK"
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = (x - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"]
    if normalize:
        top = torch.topk(pre, k=state["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    else:
        latents = torch.relu(pre)
    recons = latents @ w["decoder.weight"].T + w["pre_bias"]
    return latents, recons * std + mu if normalize else recons


def _x(n: int = 20, d_in: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return 3 * torch.randn(n, d_in, generator=g) + torch.randn(n, 1, generator=g)  # per-token offsets and scales


def ln_sae(sae: SAE, layer_norm_input: bool = True) -> SAE:
    """``sae`` with ``layer_norm_input`` set."""
    return SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation=sae.activation, threshold=sae.threshold, k=sae.k,
               apply_b_dec_to_input=sae.apply_b_dec_to_input, hook_name=sae.hook_name, layer_norm_input=layer_norm_input)


# ------------------------------------------------------------------------------------- loading


def test_topk_file_matches_the_published_equations_in_fp64(tmp_path) -> None:
    state = openai_state()
    file = write_openai(tmp_path / RELEASE, state)
    assert detect_format(file) == ("openai", file)
    sae = SAE.load(file, dtype=torch.float64)
    assert (sae.activation, sae.k, sae.apply_b_dec_to_input, sae.layer_norm_input) == ("topk", K, True, True)
    x = _x()
    latents, recons = openai_reference(state, x)
    assert ((latents > 0).sum(-1) == K).all()
    torch.testing.assert_close(sae.encode(x), latents, **FP64)
    torch.testing.assert_close(sae.decode(latents, x), recons, **FP64)
    torch.testing.assert_close(sae(x), recons, **FP64)


@pytest.mark.parametrize("activation", ["ReLU", None], ids=["ReLU", "no activation entry"])
def test_relu_file_is_a_plain_sae(tmp_path, activation) -> None:
    """The v1/v4 ReLU releases: model.py's from_state_dict reads no entry as ReLU, without the layer norm."""
    state = openai_state(activation="ReLU")
    if activation is None:
        del state["activation"], state["activation_state_dict"]
    file = write_openai(tmp_path / "resid_delta_mlp_v4/autoencoders/3.pt", state)
    sae = SAE.load(file, dtype=torch.float64)
    assert (sae.activation, sae.layer_norm_input, sae.hook_name) == ("relu", False, "blocks.3.hook_mlp_out")
    latents, recons = openai_reference({**state, "activation": "ReLU"}, _x())
    torch.testing.assert_close(sae.encode(_x()), latents, **FP64)
    torch.testing.assert_close(sae.decode(latents), recons, **FP64)


@pytest.mark.parametrize(
    ("folder", "hook_name"),
    [
        ("resid_post_mlp_v5_32k", "blocks.6.hook_resid_post"),
        ("resid_post_attn_v5_128k", "blocks.6.hook_resid_mid"),
        ("resid_delta_attn_v5_32k", "blocks.6.hook_attn_out"),
        ("resid_delta_mlp_v5_32k", "blocks.6.hook_mlp_out"),
        ("mlp_post_act", "blocks.6.mlp.hook_post"),
        ("downloads", None),
    ],
)
def test_site_comes_from_the_release_path(tmp_path, folder, hook_name) -> None:
    """The TransformerLens hooks of the library's README for each location of paths.py."""
    assert SAE.load(write_openai(tmp_path / folder / "autoencoders" / "6.pt")).hook_name == hook_name


def test_layer_and_hook_name_overrides(tmp_path) -> None:
    file = write_openai(tmp_path / RELEASE)
    assert SAE.load(file, layer=4).hook_name == "blocks.4.hook_resid_post"
    assert SAE.load(file, hook_name="blocks.0.hook_mlp_out").hook_name == "blocks.0.hook_mlp_out"


def test_a_folder_with_one_pt_file_loads_it(tmp_path) -> None:
    file = write_openai(tmp_path / RELEASE)
    assert detect_format(file.parent) == ("openai", file)


# --------------------------------------------------------------------------------- bad files


def _without(key: str) -> dict:
    return {k: v for k, v in openai_state().items() if k != key}


def _with(key: str, value: object) -> dict:
    return {**openai_state(), key: value}


BAD = [
    ("missing decoder", _without("decoder.weight"), "decoder.weight"),
    ("missing encoder", _without("encoder.weight"), "encoder.weight"),
    ("missing latent bias", _without("latent_bias"), "latent_bias"),
    ("missing pre bias", _without("pre_bias"), "pre_bias"),
    ("decoder not transposed", _with("decoder.weight", torch.randn(D_SAE, D_IN)), "decoder.weight"),
    ("latent bias too short", _with("latent_bias", torch.randn(D_SAE - 1)), "latent_bias"),
    ("pre bias too long", _with("pre_bias", torch.randn(D_IN + 1)), "pre_bias"),
    ("encoder not a matrix", _with("encoder.weight", torch.randn(D_SAE * D_IN)), "encoder.weight"),
    ("non-finite decoder", _with("decoder.weight", torch.full((D_IN, D_SAE), float("inf"))), "decoder.weight"),
    ("k too large", _with("activation_state_dict", {"k": D_SAE + 1, "postact_fn": "ReLU"}), "activation_state_dict.k"),
    ("k missing", _with("activation_state_dict", {"postact_fn": "ReLU"}), "activation_state_dict.k"),
    ("identity after TopK", _with("activation_state_dict", {"k": K, "postact_fn": "Identity"}),
     "activation_state_dict.postact_fn"),
    ("identity activation", _with("activation", "Identity"), "activation"),
    ("a non-tensor entry", _with("latents_mean_square", [0.0] * D_SAE), "latents_mean_square"),
]


@pytest.mark.parametrize(("state", "key"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_files_raise_naming_file_and_key(tmp_path, state, key) -> None:
    file = write_openai(tmp_path / RELEASE, state)
    with pytest.raises(ValueError) as err:
        SAE.load(file)
    assert_names(err, file, key)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip" * 4])
def test_a_corrupt_file_names_the_file(tmp_path, content) -> None:
    file = tmp_path / RELEASE
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    assert_load_fails_naming(file, "cannot be read as a state dict")


def test_a_pickled_object_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "ran"
    file = write_openai(tmp_path / RELEASE, _with("activation_state_dict", TouchOnUnpickle(marker)))
    assert_load_fails_naming(file, "never unpickled")
    assert not marker.exists()


# --------------------------------------------------------------------------- the SAE option


def test_decode_of_a_layer_normalising_sae_needs_the_input() -> None:
    sae = ln_sae(random_sae(D_IN, D_SAE, "topk", seed=1))
    with pytest.raises(ValueError, match=r"sae.decode\(f, x\)"):
        sae.decode(sae.encode(_x()))
    plain = random_sae(D_IN, D_SAE, "topk", seed=1)
    torch.testing.assert_close(plain.decode(plain.encode(_x()), _x()), plain(_x()))  # x is not read


@pytest.mark.parametrize(("value", "d_in", "error"), [(1, D_IN, TypeError), ("layer", D_IN, TypeError), (True, 1, ValueError)])
def test_bad_layer_norm_input_is_rejected(value, d_in, error) -> None:
    with pytest.raises(error, match="layer_norm_input"):
        SAE(torch.zeros(d_in, 4), torch.zeros(4, d_in), layer_norm_input=value)


def test_to_and_repr_keep_the_option() -> None:
    sae = ln_sae(random_sae(D_IN, D_SAE, "topk", seed=1))
    assert sae.to(torch.float64).layer_norm_input and "layer_norm_input=True" in repr(sae)
    assert "layer_norm_input" not in repr(random_sae(D_IN, D_SAE, "topk", seed=1))


def test_save_round_trips_the_option_as_saelens_layer_norm(tmp_path) -> None:
    sae = SAE.load(write_openai(tmp_path / RELEASE))
    sae.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved/cfg.json").read_text())["normalize_activations"] == "layer_norm"
    back = SAE.load(tmp_path / "saved")
    assert_same_sae(back, sae)
    assert back.layer_norm_input


def test_saelens_reads_the_saved_sae_with_the_same_math(tmp_path) -> None:
    """SAELens's normalize_activations="layer_norm" is the same LN: encode and decode agree."""
    sae_lens = pytest.importorskip("sae_lens")
    ours = SAE.load(write_openai(tmp_path / RELEASE))
    ours.save(tmp_path / "saved")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saved"), device="cpu")
    x = _x()
    with torch.no_grad():
        f = theirs.encode(x)  # SAELens keeps this input's mu and std for the decode that follows
        torch.testing.assert_close(f, ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(f), ours.decode(ours.encode(x), x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- at one site

OP_SITE = "blocks.0.hook_resid_post"
CAPACITY = Capacity(max_rows=4, max_clamps=4, max_batch=4, max_tokens=64)


def _site(sae: SAE) -> SiteState:
    """A site holding ``sae``, steered directly with ``steer_site`` (no handle needed)."""
    return SiteState(OP_SITE, sae.d_in, sae, CAPACITY, RoutingState(CAPACITY, torch.float32, torch.device("cpu")),
                     torch.float32, torch.device("cpu"))


def _route(state: SiteState, per_row: list, seq: int, prompt_len: int) -> None:
    """Row ``b`` runs ``per_row[b]`` with prompt length ``prompt_len`` in a ``[len(per_row), seq]`` forward."""
    slots = SlotManager({OP_SITE: state}, state.routing, lambda name: name)
    slots.replace((), {b: (s, prompt_len) for b, s in enumerate(per_row)})
    slots.assign(list(range(len(per_row))), [prompt_len] * len(per_row))
    state.routing.route(torch.arange(seq), None, len(per_row), seq)


def _op_rows(seed: int) -> list[sc.Steering | None]:
    vector = torch.randn(D_IN, generator=torch.Generator().manual_seed(seed))
    return [
        sc.Steering(sc.Clamp(OP_SITE, 3, 4.0), sc.Clamp(OP_SITE, 7, 0.5, "scale"), sc.AddVector(OP_SITE, vector)),
        None,
        sc.Steering(sc.Reconstruct(OP_SITE), sc.Clamp(OP_SITE, 1, 2.0), tokens="generated"),
        sc.Steering(sc.AddVector(OP_SITE, vector, 0.5), sc.Clamp(OP_SITE, 5, 1.0, "add"), tokens="prompt"),
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_op_matches_the_reference_and_leaves_unsteered_tokens_exact(activation, fused, monkeypatch) -> None:
    """Every row kind at an LN site (sparse delta, full path, Reconstruct, AddVector, scopes), on the
    torch path and on the Triton branch that CUDA takes (here in Triton's interpreter)."""
    if fused:
        if not triton_sae.TRITON_AVAILABLE:
            pytest.skip("triton is not installed")
        monkeypatch.setattr(steer_module, "_use_triton", lambda x: True)
    sae = ln_sae(random_sae(D_IN, D_SAE, activation, seed=2, apply_b_dec_to_input=True))
    state = _site(sae)
    rows, seq, prompt_len = _op_rows(3), 6, 4
    _route(state, rows, seq, prompt_len)
    x = _x(4 * seq).view(4, seq, D_IN)
    out = steer_site(x, state)
    for b, steering in enumerate(rows):
        scope = token_scope_mask("all" if steering is None else steering.tokens, seq, prompt_len)
        if steering is None:
            scope = torch.zeros(seq, dtype=torch.bool)
        expected = apply_steering_at_site(x[b], OP_SITE, steering, sae, scope)
        assert torch.equal(out[b][~scope], x[b][~scope])
        if scope.any():
            assert_rel_close(out[b][scope], expected[scope], 1e-5)
            assert rel_err(out[b][scope], x[b][scope]) > 1e-3


def test_bf16_site_within_its_rounding() -> None:
    """A bf16 model: the LN statistics in fp32, the SAE paths in bf16, unsteered tokens exact. ReLU,
    whose output does not jump on a rounding-sized change of the input as JumpReLU/TopK can."""
    sae = ln_sae(random_sae(D_IN, D_SAE, "relu", seed=2, apply_b_dec_to_input=True)).to(torch.bfloat16)
    state = SiteState(OP_SITE, D_IN, sae, CAPACITY, RoutingState(CAPACITY, torch.bfloat16, torch.device("cpu")),
                      torch.bfloat16, torch.device("cpu"))
    rows, seq, prompt_len = _op_rows(3), 6, 4
    _route(state, rows, seq, prompt_len)
    x = _x(4 * seq).view(4, seq, D_IN).bfloat16()
    out = steer_site(x, state)
    for b, steering in enumerate(rows):
        scope = token_scope_mask(steering.tokens, seq, prompt_len) if steering else torch.zeros(seq, dtype=torch.bool)
        assert torch.equal(out[b][~scope], x[b][~scope])
        if scope.any():
            expected = apply_steering_at_site(x[b], OP_SITE, steering, sae, scope)
            assert_rel_close(out[b][scope].float(), expected[scope].float(), 2e-2)


def test_a_clamp_adds_std_times_the_decoded_delta() -> None:
    """Error kept: OpenAI's decode of f' minus its decode of f, ``std * (f' - f) @ W_dec``."""
    sae = ln_sae(random_sae(D_IN, D_SAE, "relu", seed=4))
    state = _site(sae)
    steering = sc.Steering(sc.Clamp(OP_SITE, 2, 5.0))
    _route(state, [steering], seq=5, prompt_len=5)
    x = _x(5).view(1, 5, D_IN).double()
    f = sae.to(torch.float64).encode(x)
    f_new = f.clone()
    f_new[..., 2] = 5.0
    theirs = sae.to(torch.float64)
    expected = x + theirs.decode(f_new, x) - theirs.decode(f, x)
    assert_rel_close(steer_site(x.float(), state), expected, 1e-5)


def test_token_major_input_steers_like_the_reference() -> None:
    """An engine's flattened ``[N, D]`` batch, each token routed to its request's row."""
    sae = ln_sae(random_sae(D_IN, D_SAE, "topk", seed=5, apply_b_dec_to_input=True))
    capacity = Capacity(max_rows=4, max_clamps=4, max_batch=4, max_tokens=64, with_call_rows=False)
    engine = EngineState({OP_SITE: sae}, D_IN, capacity, torch.float32, torch.device("cpu"), "test_openai_engine")
    steerings = {"a": sc.Steering(sc.Clamp(OP_SITE, 1, 3.0)), "b": None, "c": sc.Steering(sc.Reconstruct(OP_SITE))}
    engine.sync(list(steerings), lambda request_id: (steerings[request_id], 0))
    counts = [3, 2, 4]
    engine.route(list(steerings), torch.tensor(counts), torch.cat([torch.arange(n) for n in counts]))
    x = _x(sum(counts))
    out = torch.ops.sae_compile.steer(x, engine.sites[OP_SITE].handle)
    assert torch.equal(out[3:5], x[3:5])
    for (start, n), steering in zip([(0, 3), (5, 4)], [steerings["a"], steerings["c"]], strict=True):
        expected = apply_steering_at_site(x[start:start + n], OP_SITE, steering, sae, torch.ones(n, dtype=torch.bool))
        assert_rel_close(out[start:start + n], expected, 1e-5)


# ------------------------------------------------------------------------- a compiled model


class Steered(NamedTuple):
    model: torch.nn.Module
    steered: sc.SteeredModel
    sae: SAE
    ids: torch.Tensor

    def logits(self, steering=None) -> torch.Tensor:
        with torch.no_grad():
            return self.steered(self.ids, steering=steering).logits


@pytest.fixture(scope="module")
def steered(tmp_path_factory) -> Steered:
    """A tiny GPT-2 steered at ``SITE`` with the OpenAI TopK autoencoder written for that layer."""
    file = write_openai(tmp_path_factory.mktemp("openai") / RELEASE, openai_state(seed=11))
    sae = SAE.load(file)
    assert sae.hook_name == SITE
    model = make_model("gpt2", hidden=D_IN, num_layers=3)
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    return Steered(model, sc.steer(model, [sae], backend="aot_eager"), sae, ids)


STEERINGS = {
    "clamps": sc.Steering(sc.Clamp(SITE, 4, 6.0), sc.Clamp(SITE, 9, 0.0, "scale")),
    "reconstruct": sc.Steering(sc.Reconstruct(SITE)),
    "reconstruct+clamp+add": sc.Steering(sc.Reconstruct(SITE), sc.Clamp(SITE, 2, 3.0), sc.AddVector(SITE, torch.ones(D_IN))),
}


@pytest.mark.parametrize("name", list(STEERINGS))
def test_compiled_steering_matches_the_reference(steered: Steered, name: str) -> None:
    steering = STEERINGS[name]
    expected = reference_logits(steered.model, steered.ids, saes={SITE: steered.sae}, steering=steering)
    assert rel_err(expected, reference_logits(steered.model, steered.ids)) > 1e-3
    assert_rel_close(steered.logits(steering), expected, 1e-5)


def test_unsteered_rows_are_exact(steered: Steered) -> None:
    plain = steered.logits(None)
    got = steered.logits([STEERINGS["clamps"], None, STEERINGS["reconstruct"]])
    assert torch.equal(got[1], plain[1]) and not torch.equal(got[0], plain[0])


def test_hot_swap_between_layer_norm_and_plain_saes_adds_no_graph(steered: Steered) -> None:
    steering = [STEERINGS["clamps"], None, STEERINGS["reconstruct+clamp+add"]]
    steered.logits(steering)
    graphs = counters["stats"]["unique_graphs"]
    plain = ln_sae(steered.sae, layer_norm_input=False)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for sae in (plain, steered.sae, plain):
                steered.steered.load_sae(SITE, sae)
                expected = reference_logits(steered.model, steered.ids, saes={SITE: sae}, steering=steering)
                assert_rel_close(steered.logits(steering), expected, 1e-5)
    finally:
        steered.steered.load_sae(SITE, steered.sae)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_captured_site_keeps_its_input_normalisation() -> None:
    """After a CUDA graph captured the site (recorded by the op), a swap that would change the
    captured arithmetic is refused and changes nothing."""
    state = _site(ln_sae(random_sae(D_IN, D_SAE, "topk", seed=8, k=K)))
    state.note_capture()
    before = state.W_enc.clone()
    with pytest.raises(ValueError, match="captured"):
        state.swap_sae(ln_sae(random_sae(D_IN, D_SAE, "topk", seed=9, k=K), layer_norm_input=False))
    assert torch.equal(state.W_enc, before) and state.layer_norm_input
    state.swap_sae(ln_sae(random_sae(D_IN, D_SAE, "topk", seed=9, k=K)))  # the same normalisation is fine
