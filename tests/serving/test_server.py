"""``sae-compile serve``: vLLM's OpenAI server on loopback, steering the requests that ask, and
recording the features of those that ask (fetched from ``/v1/sae_features`` by their keys).

One server for the module, started as the user starts it (the console script), stopped with
SIGINT as a terminal would.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("vllm")

import sae_compile as sc  # noqa: E402
from tests.reference import reference_features, reference_top_k  # noqa: E402
from tests.serving.engine_models import PROMPTS, hf_generate, hf_reference, save_llama, site_saes  # noqa: E402

pytestmark = pytest.mark.vllm

SITE = "blocks.1.hook_resid_post"
STEERING = sc.Steering(sc.Clamp(SITE, 3, 2.0), sc.Clamp(SITE, 9, 1.5, mode="add"))
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = save_llama(tmp_path_factory.mktemp("llama"))
    sae_folder = tmp_path_factory.mktemp("sae") / "resid_post"
    site_saes()[SITE].save(sae_folder)
    port = _free_port()
    command = [
        str(Path(sys.executable).parent / "sae-compile"), "serve", str(folder), "--sae", f"{SITE}={sae_folder}", "--max-top-k", "4", "--",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--seed", "0",
    ]
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        yield base, process, folder
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _wait_healthy(base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the server did not become healthy")


def _complete(base: str, prompt: list[int], steering: str | None, max_tokens: int, **xargs: str) -> tuple[int, dict]:
    body = {
        "model": _model_name(base), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "logprobs": 1, "return_tokens_as_token_ids": True,
    }
    if steering is not None:
        xargs["sae_steering"] = steering
    if xargs:
        body["vllm_xargs"] = xargs
    return _post(f"{base}/v1/completions", json.dumps(body).encode())


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _model_name(base: str) -> str:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def _token_ids(reply: dict) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in reply["choices"][0]["logprobs"]["tokens"]]


def test_concurrent_steered_and_plain_requests(server):
    base, _, folder = server
    reference = hf_reference(folder, {SITE: site_saes()[SITE]})
    with ThreadPoolExecutor(2) as pool:
        steered = pool.submit(_complete, base, PROMPTS[0], STEERING.to_json(), 8)
        plain = pool.submit(_complete, base, PROMPTS[0], None, 8)
        (status_s, reply_s), (status_p, reply_p) = steered.result(), plain.result()
    assert status_s == status_p == 200
    assert _token_ids(reply_s) == hf_generate(reference, PROMPTS[0], STEERING, 8)[0]
    assert _token_ids(reply_p) == hf_generate(reference, PROMPTS[0], None, 8)[0]
    assert _token_ids(reply_s) != _token_ids(reply_p)


@pytest.mark.parametrize(
    ("steering", "message"),
    [
        ("{oops", "steering JSON"),
        (sc.Steering(sc.Clamp(SITE, 10_000, 1.0)).to_json(), "out of range"),
        (sc.Steering(sc.Clamp("blocks.0.hook_attn_out", 0, 1.0)).to_json(), "not attached"),
    ],
)
def test_bad_request_gets_400_while_a_good_one_completes(server, steering, message):
    base, _, folder = server
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(_complete, base, PROMPTS[1], STEERING.to_json(), 48)
        time.sleep(0.5)  # the good request is running when the bad one arrives
        status, reply = _complete(base, PROMPTS[2], steering, 4)
        good_status, good_reply = good.result()
    assert status == 400
    assert message in json.dumps(reply)
    assert good_status == 200 and len(_token_ids(good_reply)) == 48


def test_records_are_fetched_by_key_once(server):
    base, _, folder = server
    record = sc.features_to_json([sc.Features(SITE, top_k=4)])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with ThreadPoolExecutor(2) as pool:
        steered = pool.submit(_complete, base, PROMPTS[0], STEERING.to_json(), 6, sae_record=record, sae_record_key="steered-1")
        plain = pool.submit(_complete, base, PROMPTS[3], None, 6, sae_record=record, sae_record_key="plain-1")
        replies = {"steered-1": (PROMPTS[0], steered.result()), "plain-1": (PROMPTS[3], plain.result())}
    status, records = _post(f"{base}/v1/sae_features", json.dumps({"keys": ["steered-1", "plain-1", "unknown"]}).encode())
    assert status == 200 and set(records) == {"steered-1", "plain-1"}
    for key, (prompt, (reply_status, reply)) in replies.items():
        assert reply_status == 200
        computed = torch.tensor([prompt + _token_ids(reply)[:-1]])  # the last generated token is never fed back
        wire = records[key][SITE]
        assert wire["features"] is None and len(wire["values"][0]) == computed.shape[1]
        # Edits at SITE act after it: what arrives there is the unsteered forward's.
        f64 = reference_features(model, computed, SITE, site_saes()[SITE])
        values, indices = reference_top_k(f64, 4)
        assert torch.equal(torch.tensor(wire["indices"]), indices)
        torch.testing.assert_close(torch.tensor(wire["values"]), values.float(), rtol=1e-4, atol=1e-5)
    assert _post(f"{base}/v1/sae_features", json.dumps({"keys": ["steered-1"]}).encode()) == (200, {}), "taken once"


@pytest.mark.parametrize(
    ("xargs", "message"),
    [
        ({"sae_record": '[{"site": "blocks.1.hook_resid_post", "top_k": 2}]'}, "sae_record_key"),
        ({"sae_record": '[{"site": "blocks.1.hook_resid_post", "top_k": 5}]', "sae_record_key": "k"}, "outside [1, 4]"),
        ({"sae_record": "[", "sae_record_key": "k"}, "record JSON"),
    ],
)
def test_a_bad_record_request_gets_400(server, xargs, message):
    base, _, _ = server
    status, reply = _complete(base, PROMPTS[2], None, 2, **xargs)
    assert status == 400 and message in json.dumps(reply)


@pytest.mark.parametrize("body", [b"{", b'{"keys": []}', b'{"keys": [3]}', b"[]"])
def test_a_bad_fetch_gets_400(server, body):
    base, _, _ = server
    status, reply = _post(f"{base}/v1/sae_features", body)
    assert status == 400 and reply["error"].startswith("the body")


def test_clean_shutdown(server):
    _, process, _ = server
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
