"""The default backend end to end: Inductor-compiled steering, and a steered graph served
from the FX graph cache in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import sae_compile as sc
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

pytestmark = pytest.mark.slow
POST, MLP = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
ROOT = Path(__file__).resolve().parents[1]


def test_inductor_steering_matches_reference_without_recompiles() -> None:
    model = make_model("llama", seed=6)
    d = hidden_size(model)
    saes = {POST: random_sae(d, 64, "jumprelu", seed=1), MLP: random_sae(d, 32, "topk", k=4, seed=2)}
    steered = sc.steer(model, saes)  # backend defaults to Inductor
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    steerings = [
        None,
        sc.Steering(sc.Clamp(POST, 3, 5.0), sc.Clamp(MLP, 1, 2.0, "scale"), sc.AddVector(POST, torch.ones(d))),
        [sc.Steering(sc.Reconstruct(MLP), tokens="prompt"), None],
        [sc.Steering(sc.Clamp(POST, 9, -2.0, "add")), sc.Steering(sc.Reconstruct(POST), sc.Clamp(POST, 2, 1.0))],
    ]
    with torch.no_grad():
        steered(ids)
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        for steering in steerings:
            got = steered(ids, steering=steering, prompt_len=5).logits
            expected = reference_logits(model, ids, saes=saes, steering=steering, prompt_len=5)
            assert_rel_close(got, expected, 1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert rel_err(expected, reference_logits(model, ids)) > 1e-3


FRESH_PROCESS = """
import json, sys, torch
sys.path[:0] = [{root!r}]
import sae_compile as sc
from torch._dynamo.utils import counters
from tests.factories import random_sae, rel_err
from tests.models import make_model
from tests.reference import reference_logits
model = make_model("gpt2", seed=2)
sae = random_sae(32, 48, "jumprelu", seed=5)
steered = sc.steer(model, {{"blocks.1.hook_resid_post": sae}})
steering = sc.Steering(sc.Clamp("blocks.1.hook_resid_post", 7, 4.0))
ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    got = steered(ids, steering=steering).logits
expected = reference_logits(model, ids, saes={{"blocks.1.hook_resid_post": sae}}, steering=steering)
print(json.dumps({{"err": rel_err(got, expected), "hits": counters["inductor"]["fxgraph_cache_hit"]}}))
"""


def test_fx_graph_cache_in_a_fresh_process(tmp_path: Path) -> None:
    """The op finds its state through a site handle, so a graph loaded from the cache by
    another process steers with that process's state."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    script = FRESH_PROCESS.format(root=str(ROOT))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1, runs
    assert runs[0]["err"] <= 1e-5 and runs[1]["err"] <= 1e-5, runs


RESTEER = """
import gc, json, sys, torch
sys.path[:0] = [{root!r}]
import sae_compile as sc
from torch._dynamo.utils import counters
from tests.factories import random_sae
from tests.models import make_model
model = make_model("gpt2", seed=2)
sae = random_sae(32, 48, "jumprelu", seed=5)
ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
hits = []
for _ in range(2):
    steered = sc.steer(model, {{"blocks.1.hook_resid_post": sae}})
    with torch.no_grad():
        steered(ids)
    hits.append(counters["inductor"]["fxgraph_cache_hit"])
    del steered
    gc.collect()
print(json.dumps(hits))
"""


def test_resteering_the_same_model_hits_the_fx_graph_cache(tmp_path: Path) -> None:
    """Handles depend on the model and its sites, not on how many models were steered before,
    so steering the same model again (as a notebook does) is a cache hit, not a full compile."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", RESTEER.format(root=str(ROOT))], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hits = json.loads(done.stdout.strip().splitlines()[-1])
    assert hits[0] == 0 and hits[1] >= 1, hits
