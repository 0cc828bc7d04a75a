"""``sae-compile demo``: steer a small offline model with SAE features and show what it costs.

Everything is built in memory from fixed seeds, so the demo needs no network and always
prints the same text:

- a tiny random ``LlamaForCausalLM`` over a word-level vocabulary (``WORDS``), so its
  output reads as words;
- a synthetic SAE at the last layer's ``resid_post`` whose feature ``i`` decodes to the
  unembedding direction of ``CONCEPTS[i]``. Clamping the feature high therefore makes the
  model say that word: the final RMSNorm rescales the residual stream, so once the clamped
  direction dominates it, the logits are essentially the lm_head row of the concept word.

The show: unsteered vs steered greedy generation, the words each feature promotes (logit
lens of its decoder row), compile counts before/after changing the steering (which must
not add a graph), and the per-token latency of steered vs unsteered generation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch._dynamo.utils import counters

import sae_compile as sc

#: The demo vocabulary: id ``i`` is ``WORDS[i]``. ``<pad>`` and ``<unk>`` keep ids 0 and 1.
WORDS: tuple[str, ...] = (
    "<pad>", "<unk>", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "and", "saw",
    "bird", "tree", "big", "small", "red", "blue", "green", "house", "car", "road", "city", "sun", "moon",
    "sky", "rain", "wind", "river", "hill", "boat", "fish", "sea", "bridge", "golden", "gate", "fog",
    "ocean", "light", "night", "day", "old", "new", "man", "woman", "child", "book", "read", "song",
    "sang", "ate", "bread", "cheese", "apple", "walked", "slept", "quietly", "happy", "cold", "warm",
    "then", "with",
)
#: Feature ``i`` of the demo SAE promotes the word ``CONCEPTS[i]``.
CONCEPTS: tuple[str, ...] = ("bridge", "golden", "ocean")
PROMPT = "the cat sat on the"
NUM_LAYERS = 2
SITE = f"blocks.{NUM_LAYERS - 1}.hook_resid_post"
SEED = 0
MAX_NEW_TOKENS = 10
#: Clamp strength. The residual stream at SITE has norm 35-65 (random init, std 0.2); a
#: clamp about twice that dominates the final RMSNorm, so the concept word wins the argmax.
VALUE = 100.0
#: Encoder bias. Unsteered, x . d stays below ~11 at SITE, so relu(x . d - 50) keeps every
#: feature off, as a sparse SAE's would on unrelated text; an "add" clamp then acts like "set".
FEATURE_BIAS = -50.0

#: (label, steering) per feature, in feature order. Between them they change the feature,
#: the value, the mode and the token scope, none of which may recompile.
STEERINGS: tuple[tuple[str, sc.Steering], ...] = (
    (f"clamp f0={VALUE:g}, tokens=all", sc.Steering(sc.Clamp(SITE, 0, VALUE))),
    (f"clamp f1={VALUE:g}, tokens=generated", sc.Steering(sc.Clamp(SITE, 1, VALUE), tokens="generated")),
    (f"add {1.5 * VALUE:g} to f2, tokens=prompt",
     sc.Steering(sc.Clamp(SITE, 2, 1.5 * VALUE, mode="add"), tokens="prompt")),
)


@dataclass(frozen=True)
class Demo:
    """The demo's model, tokenizer and SAE (feature ``i`` promotes ``CONCEPTS[i]``)."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerFast
    sae: sc.SAE


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS``; unknown words map to ``<unk>``."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def build_model(seed: int = SEED) -> transformers.PreTrainedModel:
    """A tiny random Llama over ``WORDS`` in eval mode, identical for the same ``seed``."""
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        # At HF's default std (0.02) a model this small has nearly constant logits; 0.2 gives
        # varied text.
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,  # no end-of-text word: every run generates exactly max_new_tokens
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        # Zero logits for <pad>/<unk> so greedy text is all words: the best of the other 62
        # random logits is positive at every step the demo takes.
        model.lm_head.weight[:2] = 0.0
    return model.eval()


def build_sae(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerFast) -> sc.SAE:
    """An SAE at ``SITE`` whose feature ``i`` reads and writes the unembedding direction of ``CONCEPTS[i]``.

    The logit of word ``w`` is ``lm_head[w] . (g * x / rms(x))`` with ``g`` the final norm's
    weight, so the direction that raises it most is ``g * lm_head[w]``: that (unit-normed)
    is the decoder row. The encoder is tied to it (``W_enc = W_dec.T``).
    """
    ids = tokenizer.convert_tokens_to_ids(list(CONCEPTS))
    with torch.no_grad():
        rows = model.lm_head.weight[ids] * model.model.norm.weight  # [F, D]
        W_dec = rows / rows.norm(dim=-1, keepdim=True)  # [F, D]
    b_enc = torch.full((len(CONCEPTS),), FEATURE_BIAS)
    return sc.SAE(W_dec.T.contiguous(), W_dec.clone(), b_enc, activation="relu", hook_name=SITE)


def build_demo(seed: int = SEED) -> Demo:
    """The demo's model, tokenizer and SAE, all built offline."""
    model, tokenizer = build_model(seed), build_tokenizer()
    return Demo(model, tokenizer, build_sae(model, tokenizer))


def promoted_words(demo: Demo, feature: int, k: int = 3) -> list[str]:
    """The ``k`` words whose logits feature ``feature``'s decoder row raises most (logit lens)."""
    with torch.no_grad():
        row = demo.sae.W_dec[feature]  # [D]
        logits = demo.model.lm_head(demo.model.model.norm(row))  # [V]
    return demo.tokenizer.convert_ids_to_tokens(logits.topk(k).indices.tolist())


def run(backend: str = "inductor") -> int:
    """Run the show, printing as it goes. Returns 0 if every claim held, 1 otherwise.

    The claims: each steered text contains its concept word, the unsteered text none, and
    changing the steering (feature, value, mode, token scope) adds no compiled graph.
    """
    demo = build_demo()
    _print_setup(demo, backend)
    # Inductor's compile-worker pool costs more to start than it saves on a model with a
    # few dozen tiny kernels, most of all on small machines.
    options = {"compile_threads": 1} if backend == "inductor" else None
    steered = sc.steer(demo.model, [demo.sae], backend=backend, options=options)
    input_ids = demo.tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, P]

    def generate(steering: sc.Steering | None) -> list[str]:
        with torch.no_grad():
            out = steered.generate(input_ids, steering=steering, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return demo.tokenizer.convert_ids_to_tokens(out[0, input_ids.shape[1]:].tolist())  # new words only

    before = _graphs()
    with _progress(f"compiling with {backend} during the first generate (prefill + decode graphs)"):
        plain = generate(None)
    compiled = _graphs()
    print()
    print(f"prompt: {PROMPT!r}; greedy continuation of {MAX_NEW_TOKENS} words")
    ok = _print_words("unsteered", plain, expected=None)
    for feature, (label, steering) in enumerate(STEERINGS):
        ok &= _print_words(label, generate(steering), expected=CONCEPTS[feature])
    print("  (the 1st new word is predicted at the last prompt position: 'generated' steers from the 2nd")
    print("   word on, and 'prompt' steers only the 1st, since a last-layer edit reaches no later token)")
    recompiles = _graphs() - compiled
    ok &= recompiles == 0
    print()
    print(f"graphs compiled by the first generate: {compiled - before}")
    print(f"recompiles after changing feature, value, mode and token scope: {recompiles}")

    with _progress("timing generate (median of 7 interleaved runs each)"):
        ms = _per_token_ms({"unsteered": lambda: generate(None), "steered": lambda: generate(STEERINGS[0][1])})
    print(f"latency per generated token: unsteered {ms['unsteered']:.2f} ms, steered {ms['steered']:.2f} ms "
          f"({ms['steered'] / ms['unsteered']:.2f}x)")
    print()
    print("OK: every claim above held" if ok else "FAILED: see the marked lines above")
    return 0 if ok else 1


def _print_setup(demo: Demo, backend: str) -> None:
    print(f"sae-compile demo: torch {torch.__version__}, transformers {transformers.__version__}, backend={backend}")
    print(f"model: random LlamaForCausalLM ({NUM_LAYERS} layers, d_model {demo.model.config.hidden_size}, "
          f"{len(WORDS)}-word vocab, seed {SEED}), built offline")
    print(f"SAE:   {demo.sae.d_sae} features at {SITE}; feature i decodes to the unembedding of CONCEPTS[i]")
    print()
    print("feature  concept   promotes (top words of the logit lens of its decoder row)")
    for feature, concept in enumerate(CONCEPTS):
        print(f"{feature:<8} {concept:<9} {', '.join(promoted_words(demo, feature))}")
    print()


def _print_words(label: str, words: list[str], expected: str | None) -> bool:
    """Print one continuation; True if it holds ``expected`` (or, for None, no concept word)."""
    held = expected in words if expected is not None else not set(words) & set(CONCEPTS)
    want = f"expected {expected!r}" if expected is not None else "expected no concept word"
    print(f"  {label:<31} {' '.join(words)}" + ("" if held else f"   <-- {want}"))
    return held


def _graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def _per_token_ms(runs: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Median wall time per generated token of each run, in ms.

    The runs are interleaved, so a burst of load from other processes slows all of them
    alike instead of skewing the ratio.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm up allocator and caches so no timed run is a cold outlier
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) / MAX_NEW_TOKENS for name, t in times.items()}


@contextmanager
def _progress(label: str) -> Iterator[None]:
    """Print ``label ...`` before a long step and its duration on the same line after it."""
    print(f"{label} ...", end="", flush=True)
    start = time.perf_counter()
    yield
    print(f" {time.perf_counter() - start:.1f} s", flush=True)
