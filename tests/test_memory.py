"""Memory of an attached site: one copy of the SAE, in the model's dtype.

The cheap check (default tier) is by references: the site keeps no reference to the caller's
SAE, and none of its buffers shares storage with it. The RSS check (slow tier) runs
``benchmarks/bench_site_memory.py`` in a fresh process and holds it to the targets."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import sae_compile as sc
from tests.factories import random_sae
from tests.models import hidden_size, make_model

ROOT = Path(__file__).resolve().parents[1]
POST = "blocks.1.hook_resid_post"


def test_the_site_keeps_no_reference_to_the_callers_sae() -> None:
    model = make_model("llama", seed=1)
    sae = random_sae(hidden_size(model), 64, "jumprelu", seed=1, apply_b_dec_to_input=True)
    storages = {t.untyped_storage().data_ptr() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold)}
    steered = sc.steer(model, {POST: sae}, backend="aot_eager")
    gone = weakref.ref(sae)
    del sae
    gc.collect()
    assert gone() is None
    assert not storages & {t.untyped_storage().data_ptr() for t in steered.steering_state().values()}
    with torch.no_grad():
        steered(torch.ones(1, 3, dtype=torch.long), steering=sc.Steering(sc.Clamp(POST, 3, 2.0)))


@pytest.mark.slow
def test_site_memory_meets_the_targets() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_site_memory.py"), "--d-sae", "32768", "--d-in", "512", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steady"] <= 1.05, report
    assert report["steer_peak"] <= 1.25, report
    assert report["swap_peak"] <= 0.25, report  # chunked copies: no backup of the old weights
