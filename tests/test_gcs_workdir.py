"""gs:// workdirs end to end, against a real GCS API server on loopback (tests/gcs_emulator.py).

Every program runs as a user would start it (train.py, the tools), with the client settings of
gcs_emulator.client_env: nothing reaches beyond 127.0.0.0/8. Local folders hold only what a host keeps
to itself (its token cache, its temporary files); the run lives in the bucket.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import gcs_emulator
import gcs_fault_proxy
import pytest

from gpt1_jax.training import checkpoint
from pretrain_helpers import (
    RECIPES,
    REPO,
    assert_trees_equal,
    final_params,
    losses,
    run_train_py,
    tiny_config,
    train_py_command,
)

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


def bucket_losses(url: str, run: str) -> dict[int, float]:
    lines = read_object(url, f"{run}/metrics.jsonl").decode().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def tool(url: str, module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", f"gpt1_jax.{module}", *args], cwd=REPO, env=bucket_env(url),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def pretraining(token_cache_dir, **overrides):
    """200 steps of the tiny recipe on one book, a checkpoint every 25, every step logged."""
    return tiny_config(token_cache_dir, **{"train.num_steps": 200, "checkpoint.every": 25, "train.log_every": 1,
                                           "data.shard_by_process": False, **overrides})


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, token_cache_dir):
    """The reference: the same pre-training on a local disk, one process, uninterrupted."""
    workdir = tmp_path_factory.mktemp("local_run")
    run_train_py(pretraining(token_cache_dir), workdir)
    return workdir


def upload(url: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{url}/upload/storage/v1/b/{BUCKET}/o?{query}", data=data, method="POST")
    urllib.request.urlopen(request, timeout=30).close()


def wait_for_bucket_step(url: str, run: str, step: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while not any(logged >= step for logged in bucket_steps(url, run)):
        for proc in procs:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"step {step} never reached the bucket"
        time.sleep(0.05)


def test_pretrain_on_a_bucket_stops_on_sigterm_resumes_bit_for_bit_and_fine_tunes_from_it(
        server, tmp_path, token_cache_dir, local_run):
    config = pretraining(token_cache_dir)

    run = "gs://test-bucket/pretrain"
    env = bucket_env(server, tmp_path / "scratch")
    proc = subprocess.Popen(train_py_command(config, run), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_bucket_step(server, "pretrain", 25, [proc])  # the metrics are copied up with the save of step 25
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
    assert_trees_equal(checkpoint.load_pretrained(tmp_path / "copied")[1], final_params(local_run))
    sample = tool(server, "generate", f"--checkpoint={run}/checkpoints", "--prompt=Alice was",
                  "--max_new_tokens=3", "--temperature=0")
    assert sample.strip()

    finetuned = "gs://test-bucket/finetune"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", f"{RECIPES / 'finetune.py'}:tiny",
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


def launch_two_processes(url: str, scratch, command_for) -> list[subprocess.Popen]:
    """Two processes of one run on localhost, each with its own local folders (temporary files, token cache
    copies, compilation cache), as two hosts have: the bucket is all they share."""
    coordinator = f"127.0.0.1:{gcs_emulator.free_port()}"
    procs = []
    for index in range(2):
        own = scratch / f"host{index}"
        env = {**bucket_env(url, own / "tmp"), "XDG_CACHE_HOME": str(own / "cache"),
               "JAX_COMPILATION_CACHE_DIR": str(own / "jit"), "JAX_COORDINATOR_ADDRESS": coordinator,
               "GPT1_JAX_NUM_PROCESSES": "2", "GPT1_JAX_PROCESS_ID": str(index)}
        procs.append(subprocess.Popen(command_for(own), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_two_hosts_that_share_only_the_bucket_pretrain_resume_and_fine_tune(server, tmp_path, token_cache_dir):
    """Each host's checkpoint shards, the corpus and the token cache all go through the bucket: a run split
    over two disks would leave each step in halves that neither host can restore."""
    # The reference: the same two processes uninterrupted on one local disk (two processes sum in another
    # order than one, so a one-process run would match only to float tolerance).
    reference = tmp_path / "reference"
    finish(launch_two_processes(server, tmp_path / "ref", lambda own: train_py_command(
        pretraining(token_cache_dir, **{"train.num_steps": 100}), reference)))

    book = pathlib.Path(os.environ["GPT1_JAX_DATA"], "corpus", "gutenberg", "11-0.txt")
    upload(server, "books/11-0.txt", book.read_bytes())
    run = "gs://test-bucket/two_hosts"
    config = pretraining(token_cache_dir, **{"train.num_steps": 100, "data.cache_dir": "gs://test-bucket/token_cache",
                                             "data.source": "files:gs://test-bucket/books/*.txt"})
    procs = launch_two_processes(server, tmp_path, lambda own: train_py_command(config, run))
    wait_for_bucket_step(server, "two_hosts", 25, procs)
    procs[1].send_signal(signal.SIGTERM)  # one host gets the notice; the coordination service stops both
    outputs = finish(procs)
    assert "preemption notice at step" in outputs[0], outputs[0][-2000:]
    assert any(name.startswith("token_cache/") and name.endswith("/meta.json")
               for name in object_names(server, "token_cache/"))
    outputs = finish(launch_two_processes(server, tmp_path, lambda own: train_py_command(config, run)))
    assert "Resumed from step" in outputs[0]
    assert bucket_losses(server, "two_hosts") == losses(reference)
    tool(server, "convert", f"--orbax_in={run}/checkpoints", f"--orbax={tmp_path / 'copied'}")
    assert_trees_equal(checkpoint.load_pretrained(tmp_path / "copied")[1], final_params(reference))

    finetune = [sys.executable, str(REPO / "train.py"), "--config", f"{RECIPES / 'finetune.py'}:tiny",
                "--workdir", "gs://test-bucket/two_hosts_finetune", f"--config.init={run}/checkpoints",
                "--config.finetune.max_train_examples=64", "--config.train.batch_size=16",
                "--config.train.eval_batch_size=64", "--config.model.n_ctx=32"]
    finish(launch_two_processes(server, tmp_path, lambda own: finetune))
    assert json.loads(read_object(server, "two_hosts_finetune/results.json"))["best_step"] == 4
    assert "| two_hosts_finetune | sst2 |" in tool(server, "report", "gs://test-bucket/two_hosts_finetune")


@pytest.fixture
def proxy(server):
    """The emulator behind a loopback proxy that refuses the bucket `locked` and can cut connections."""
    with gcs_fault_proxy.running(server) as (url, settings):
        settings.refuse("locked")
        yield url, settings


def error_line(result: subprocess.CompletedProcess) -> str:
    """The program's last line on stderr, where train.py and the tools put a user's error."""
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr.strip().splitlines()[-1]


def test_a_missing_bucket_and_a_refused_one_each_give_one_line_naming_the_url(proxy, tmp_path, token_cache_dir):
    url, _ = proxy
    config = pretraining(token_cache_dir, **{"train.num_steps": 2})
    env = bucket_env(url, tmp_path / "scratch")
    missing = subprocess.run(train_py_command(config, "gs://no-such-bucket/run"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    line = error_line(missing)
    assert line.startswith("error: Cannot write the workdir gs://no-such-bucket/run: it does not exist"), line

    refused = subprocess.run(train_py_command(config, "gs://locked/run"), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    line = error_line(refused)
    assert line.startswith("error: Cannot write the workdir gs://locked/run: access was refused"), line

    generate = subprocess.run([sys.executable, "-m", "gpt1_jax.generate", "--checkpoint=gs://locked/run/checkpoints",
                               "--prompt=Alice"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = error_line(generate)
    assert "gs://locked/run/checkpoints" in line and "access was refused" in line, line


def test_a_network_cut_mid_save_stops_with_one_line_and_keeps_the_earlier_checkpoints(server, proxy, tmp_path,
                                                                                       token_cache_dir):
    url, settings = proxy  # the programs go through the proxy; the test looks at the bucket directly
    config = pretraining(token_cache_dir, **{"train.num_steps": 75})
    run = "gs://test-bucket/cut"
    env = bucket_env(url, tmp_path / "scratch")
    settings.cut("cut/checkpoints/50/")  # every request of step 50's save fails as a dropped connection
    result = subprocess.run(train_py_command(config, run), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    line = error_line(result)
    assert line.startswith(f"error: Writing checkpoint step 50 to {run}/checkpoints failed:"), line
    assert "the store could not be reached or failed: check the network, then rerun." in line, line
    assert settings.cut_count > 0
    kept = object_names(server, "cut/checkpoints/25/")
    assert "cut/checkpoints/25/commit_success.txt" in kept
    assert "cut/checkpoints/50/commit_success.txt" not in object_names(server, "cut/checkpoints/50/")

    settings.cut_fragments.clear()  # the network is back: the rerun resumes from the last complete step
    resumed = subprocess.run(train_py_command(config, run), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from step 25" in resumed.stdout + resumed.stderr
    assert object_names(server, "cut/checkpoints/25/") == kept
    assert bucket_steps(server, "cut")[-1] == 75


def test_the_clients_settings_refuse_any_connection_beyond_loopback(server):
    """The lock the other tests rely on: a Python process of theirs cannot open a socket off 127.0.0.0/8.

    The probe raises the audit event a connect raises, without connecting, so even a broken lock sends nothing."""
    probe = ("import socket, sys\nwith socket.socket() as s:\n    try:\n"
             "        sys.audit('socket.connect', s, ('192.0.2.1', 443))\n"
             "    except ConnectionRefusedError as err:\n        print(err)\n")
    result = subprocess.run([sys.executable, "-c", probe], env=bucket_env(server), capture_output=True, text=True,
                            timeout=60)
    assert "allow loopback only; refused a connection to ('192.0.2.1', 443)" in result.stdout, result.stderr
