"""gs:// workdirs end to end, against a real GCS API server on loopback (tests/gcs_emulator.py).

Every program runs as a user would start it (train.py, the tools), with the client settings of
gcs_emulator.client_env: nothing reaches beyond 127.0.0.0/8. Local folders hold only what a host keeps
to itself (its token cache, its temporary files); the run lives in the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import gcs_emulator
import pytest

from gpt1_jax import checkpoint
from pretrain_helpers import REPO, assert_trees_equal, final_params, run_train_py, tiny_config, train_py_command

pytestmark = pytest.mark.slow
BUCKET = gcs_emulator.BUCKET


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with gcs_emulator.running(tmp_path_factory.mktemp("gcs")) as url:
        yield url


def bucket_env(url: str, scratch=None) -> dict[str, str]:
    """os.environ with the loopback-only client settings; `scratch` gives the process its own temporary folder."""
    env = {**os.environ, **gcs_emulator.client_env(url)}
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(scratch)
    return env


def read_object(url: str, name: str) -> bytes | None:
    """An object's bytes through the JSON API, None when it does not exist."""
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                    timeout=10) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def object_names(url: str, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 10000})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=10) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def bucket_steps(url: str, run: str) -> list[int]:
    """The steps of metrics.jsonl in the bucket (what a user's `gsutil cat` would show)."""
    text = read_object(url, f"{run}/metrics.jsonl")
    return [json.loads(line)["step"] for line in (text or b"").decode().splitlines() if line.strip()]


def tool(url: str, module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", f"gpt1_jax.{module}", *args], cwd=REPO, env=bucket_env(url),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def pretraining(token_cache_dir, **overrides):
    return tiny_config(token_cache_dir, **{"train.num_steps": 200, "checkpoint.every": 25, "train.log_every": 1,
                                           **overrides})


def test_pretrain_on_a_bucket_stops_on_sigterm_resumes_bit_for_bit_and_fine_tunes_from_it(
        server, tmp_path, token_cache_dir):
    config = pretraining(token_cache_dir)
    run_train_py(config, tmp_path / "local")  # the reference: the same run on a local disk, uninterrupted

    run = "gs://test-bucket/pretrain"
    env = bucket_env(server, tmp_path / "scratch")
    proc = subprocess.Popen(train_py_command(config, run), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(step >= 25 for step in bucket_steps(server, "pretrain")):  # synced with the save of step 25
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "step 25 never reached the bucket"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM at step" in output, f"the run ended before the signal:\n{output[-2000:]}"
    stopped = int(output.split("SIGTERM at step ")[1].split(":")[0])
    assert 25 <= stopped < 200
    assert f"pretrain/checkpoints/{stopped}/commit_success.txt" in object_names(server, "pretrain/checkpoints/")
    assert bucket_steps(server, "pretrain")[-1] == stopped  # the metrics reached the bucket with the save

    resumed = subprocess.run(train_py_command(config, run), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Resumed from step {stopped}" in resumed.stdout + resumed.stderr
    steps = bucket_steps(server, "pretrain")
    assert steps == sorted(set(steps)) and steps[-1] == 200  # each step once, across the two attempts
    assert object_names(server, "pretrain/tensorboard/")  # event files of both attempts
    assert b'"num_steps": 200' in read_object(server, "pretrain/config.json")

    # The tools read the bucket: convert copies the final step to a local folder, which must hold exactly
    # the parameters of the uninterrupted local run.
    tool(server, "convert", f"--orbax_in={run}/checkpoints", f"--orbax={tmp_path / 'copied'}")
    assert_trees_equal(checkpoint.load_pretrained(tmp_path / "copied")[1], final_params(tmp_path / "local"))
    sample = tool(server, "generate", f"--checkpoint={run}/checkpoints", "--prompt=Alice was",
                  "--max_new_tokens=3", "--temperature=0")
    assert sample.strip()

    finetuned = "gs://test-bucket/finetune"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", f"{REPO / 'configs' / 'finetune.py'}:tiny",
         "--workdir", finetuned, f"--config.init={run}/checkpoints", "--config.finetune.max_train_examples=64",
         "--config.train.batch_size=16", "--config.train.eval_batch_size=64", "--config.model.n_ctx=32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(read_object(server, "finetune/results.json"))
    assert results["init"] == f"{run}/checkpoints" and results["best_step"] == 4
    assert read_object(server, "finetune/best/4/commit_success.txt") is not None

    table = tool(server, "report", finetuned, run, f"--plots=gs://{BUCKET}/plots")
    assert "| finetune | sst2 | validation | accuracy |" in table and "| pretrain | pre-training" in table
    assert read_object(server, "plots/finetune.png").startswith(b"\x89PNG")
