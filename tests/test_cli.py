"""The ``sae-compile`` command line, driven as a user drives it: one subprocess per command.

Every command runs as ``python -m sae_compile.cli`` with the repository root on PYTHONPATH,
so the tests need no install. The checkpoints are the demo's own model, tokenizer and SAE
(feature i promotes the word ``CONCEPTS[i]``), written once per module, so a steered
generation has a known word to look for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import sae_compile as sc
from sae_compile import demo
from sae_compile.checkpoints import save_sae
from tests.factories import random_sae

ROOT = Path(__file__).resolve().parent.parent
SITE = demo.SITE
PROMPT = demo.PROMPT
BRIDGE, GOLDEN, _ = demo.CONCEPTS  # promoted by features 0 and 1
TIMEOUT_S = 240
EARLIER = "blocks.0.hook_resid_post"
EARLIER_STEERING = sc.Steering(sc.AddVector(EARLIER, torch.linspace(-3.0, 3.0, 64)))


def start(*args: str | Path) -> subprocess.Popen[str]:
    """Start ``sae-compile ARGS...`` from the source tree, capturing its output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # Several commands run at once (see ``slow_runs``); one thread each avoids oversubscription.
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sae_compile.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a started command and return its exit status and output."""
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``sae-compile ARGS...`` to completion."""
    return finish(start(*args))


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit status 2, no traceback, and one stderr line that names the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def new_words(stdout: str) -> list[str]:
    """The generated words: ``generate`` prints the prompt followed by the continuation."""
    text = stdout.strip()
    assert text.startswith(PROMPT), text
    return text[len(PROMPT):].split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``model/`` (HF model + tokenizer), ``sae/`` (placed at SITE by its
    hook_name), ``sae_unplaced/`` (no hook_name) and ``golden.npy`` (feature 1's direction)."""
    root = tmp_path_factory.mktemp("cli")
    parts = demo.build_demo()
    parts.model.save_pretrained(root / "model")
    parts.tokenizer.save_pretrained(root / "model")
    sae = parts.sae
    save_sae(sae, root / "sae")
    unplaced = sc.SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation=sae.activation)
    save_sae(unplaced, root / "sae_unplaced")
    np.save(root / "golden.npy", sae.W_dec[1].numpy())
    # The demo SAE's features stay silent on the prompt; this one fires on every token.
    save_sae(random_sae(sae.d_in, 32, "relu", seed=3, hook_name=SITE), root / "sae_random")
    return root


@pytest.fixture(scope="module", autouse=True)
def slow_runs(ckpt: Path) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """The commands that load a model and compile, all started when the module starts.

    Each spends most of its time importing and tracing on one core, so running them side by
    side (while the quick tests run) keeps the module well under a minute. A test reads its
    command's result with ``finish(slow_runs[name])``; unread ones are stopped at the end.
    """
    model, sae, unplaced = ckpt / "model", ckpt / "sae", ckpt / "sae_unplaced"
    runs = {
        "demo": start("demo", "--backend", "aot_eager"),
        "sites": start("sites", model),
        # The SAE has no hook_name, so it goes to the --clamp site.
        "clamp": start("generate", "--model", model, "--sae", unplaced, "--clamp", f"{SITE}:0=100",
                       "--tokens", "generated", "--prompt", PROMPT, "--max-new-tokens", "2", "--backend", "aot_eager"),
        "vector": start("generate", "--model", model, "--sae", sae, "--add-vector", f"{SITE}:{ckpt / 'golden.npy'}:100",
                        "--reconstruct", SITE, "--prompt", PROMPT, "--max-new-tokens", "2", "--backend", "aot_eager"),
        "unknown_site": start("generate", "--model", model, "--sae", unplaced, "--prompt", PROMPT,
                              "--clamp", "blocks.7.hook_resid_post:0=1", "--backend", "aot_eager"),
        "features": start("features", "--model", model, "--sae", ckpt / "sae_random", "--prompt", PROMPT, "--top", "3",
                          "--json", ckpt / "features.json", "--backend", "aot_eager"),
        # Steering an earlier site changes what arrives at SITE; SITE's own clamp does not.
        "features_steered": start("features", "--model", model, "--sae", ckpt / "sae_random", "--prompt", PROMPT, "--top", "3",
                                  "--steer", EARLIER_STEERING.to_json(), "--clamp", f"{SITE}:0=100",
                                  "--json", ckpt / "features_steered.json", "--backend", "aot_eager"),
    }
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


# ------------------------------------------- bad input (quick: these run while the slow commands work)


@pytest.mark.parametrize(
    ("clamp", "fragment"),
    [
        (f"{SITE}:0", "SITE:FEATURE=VALUE[:MODE]"),  # no '=VALUE'
        (f"{SITE}:zero=1", "integer FEATURE"),
        (f"{SITE}:0=1:double", "mode"),  # not set / add / scale
    ],
)
def test_bad_clamp_is_one_line(clamp: str, fragment: str) -> None:
    result = cli("generate", "--model", "unused", "--prompt", "x", "--clamp", clamp)
    assert_user_error(result, "--clamp", fragment)


def test_clamp_without_sae_is_one_line(ckpt: Path) -> None:
    result = cli("generate", "--model", ckpt / "model", "--prompt", PROMPT, "--clamp", f"{SITE}:0=1")
    assert_user_error(result, "--sae")


def test_unknown_site_is_one_line(slow_runs: dict[str, subprocess.Popen[str]]) -> None:
    result = finish(slow_runs["unknown_site"])
    assert_user_error(result, "blocks.7.hook_resid_post", "Available sites", SITE)


@pytest.mark.parametrize("missing", ["model", "sae", "vector"])
def test_missing_file_is_one_line(ckpt: Path, tmp_path: Path, missing: str) -> None:
    absent = tmp_path / "absent"
    paths = {"model": ckpt / "model", "sae": ckpt / "sae", "vector": ckpt / "golden.npy", missing: absent}
    result = cli("generate", "--model", paths["model"], "--sae", paths["sae"],
                 "--add-vector", f"{SITE}:{paths['vector']}", "--prompt", PROMPT)
    assert_user_error(result, str(absent))


def test_sites_of_a_missing_model_is_one_line(tmp_path: Path) -> None:
    assert_user_error(cli("sites", tmp_path / "absent"), str(tmp_path / "absent"), "config.json")


def test_bench_without_the_script_is_one_line(tmp_path: Path) -> None:
    result = cli("bench", "--script", tmp_path / "bench_overhead.py")
    assert_user_error(result, "bench_overhead.py", "not found")


def test_vector_of_the_wrong_kind_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    weights = tmp_path / "vector.pt"
    torch.save({"not": torch.zeros(3)}, weights)
    result = cli("generate", "--model", ckpt / "model", "--add-vector", f"{SITE}:{weights}", "--prompt", PROMPT)
    assert_user_error(result, "vector.pt", "not a tensor")


# ------------------------------------------------------------------------------- commands


def test_demo_steers_the_concept_word_in_without_recompiling(slow_runs: dict[str, subprocess.Popen[str]]) -> None:
    result = finish(slow_runs["demo"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    unsteered = next(line for line in lines if line.startswith("unsteered"))
    steered = next(line for line in lines if line.startswith("clamp f0"))
    assert not set(unsteered.split()) & set(demo.CONCEPTS), unsteered
    assert BRIDGE in steered.split(), steered
    assert "recompiles after changing feature, value, mode and token scope: 0" in lines
    assert any(line.startswith("latency per generated token") for line in lines)


def test_sites_lists_every_hook_with_its_shape(slow_runs: dict[str, subprocess.Popen[str]]) -> None:
    result = finish(slow_runs["sites"])
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.splitlines()[1:]]
    hooks = ["hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post"]
    assert [site for site, _ in rows] == [f"blocks.{layer}.{hook}" for layer in range(2) for hook in hooks]
    assert {shape for _, shape in rows} == {"[1, 2, 64]"}


def test_generate_clamps_generated_tokens_only(slow_runs: dict[str, subprocess.Popen[str]]) -> None:
    """tokens=generated: the first new word is predicted at the last prompt position, so it
    is unsteered; the next is the clamped feature's word."""
    result = finish(slow_runs["clamp"])
    assert result.returncode == 0, result.stderr
    words = new_words(result.stdout)
    assert len(words) == 2 and words[0] != BRIDGE and words[1] == BRIDGE, words


def test_generate_adds_a_vector_and_reconstructs_at_the_sae_site(slow_runs: dict[str, subprocess.Popen[str]]) -> None:
    """Add 100x feature 1's direction, then replace the site by its SAE reconstruction: the
    reconstruction keeps feature 1 (now strongly active), so the model says its word."""
    result = finish(slow_runs["vector"])
    assert result.returncode == 0, result.stderr
    assert new_words(result.stdout) == [GOLDEN, GOLDEN]


def test_bench_runs_the_script_and_passes_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text("import sys\nprint('| case | ms |')\nprint('| args |', ' '.join(sys.argv[1:]), '|')\n")
    result = cli("bench", "--script", script, "--", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["| case | ms |", "| args | --repeats 3 |"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_names_the_install(tmp_path: Path) -> None:
    assert_user_error(cli("serve", tmp_path, "--", "--port", "1"), 'pip install "sae-compile[vllm]"')


def test_serve_checks_its_own_arguments_first(tmp_path: Path) -> None:
    assert_user_error(cli("serve", tmp_path, "--sae", "blocks.0.hook_resid_post"), "SITE=PATH")


def test_only_bench_and_serve_pass_arguments_on(tmp_path: Path) -> None:
    assert_user_error(cli("sites", tmp_path, "--", "--port", "1"), "only bench and serve")


# ------------------------------------------------------------------------------------ features


def expected_top(ckpt: Path, steering: sc.Steering | None) -> tuple[list[list[int]], torch.Tensor]:
    """The reference's top-3 features per prompt token at SITE (fp64), and its values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.reference import reference_features, reference_top_k

    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    ids = AutoTokenizer.from_pretrained(ckpt / "model")(PROMPT, return_tensors="pt").input_ids
    f = reference_features(model, ids, SITE, sc.SAE.load(ckpt / "sae_random"), steering=steering)
    values, indices = reference_top_k(f[0], 3)
    return indices.tolist(), values


@pytest.mark.parametrize(("run", "steering"), [("features", None), ("features_steered", EARLIER_STEERING)])
def test_features_prints_and_writes_each_tokens_top_features(
    slow_runs: dict[str, subprocess.Popen[str]], ckpt: Path, run: str, steering: sc.Steering | None
) -> None:
    result = finish(slow_runs[run])
    assert result.returncode == 0, result.stderr
    data = json.loads((ckpt / f"{run}.json").read_text())
    indices, values = expected_top(ckpt, steering)
    assert bool((values > 0).all())
    if steering is not None:
        assert indices != expected_top(ckpt, None)[0], "steering the earlier site must change the features"
    assert data["site"] == SITE and [t["position"] for t in data["tokens"]] == list(range(len(indices)))
    assert [[i for i, _ in t["features"]] for t in data["tokens"]] == indices
    got = torch.tensor([[v for _, v in t["features"]] for t in data["tokens"]], dtype=torch.float64)
    assert torch.allclose(got, values, rtol=1e-4, atol=1e-5)
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == ["pos", "token", "#1", "#2", "#3"]
    assert len(lines) == 2 + len(indices)
    first = lines[2].split()
    assert first[0] == "0" and first[2] == f"{indices[0][0]}={values[0, 0]:.3f}"


def test_features_without_an_sae_is_a_user_error() -> None:
    assert_user_error(cli("features", "--model", "nowhere", "--prompt", "x"), "needs --sae")


def test_features_checks_its_steering_json(ckpt: Path) -> None:
    assert_user_error(cli("features", "--model", ckpt / "model", "--sae", ckpt / "sae", "--prompt", "x", "--steer", "{"), "--steer")
