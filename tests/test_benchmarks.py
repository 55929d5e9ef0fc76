"""benchmarks/: every script runs end to end at its smallest size, as a user runs it, and leaves docs/ alone.

These are smoke tests, not measurements: each script is run as `python benchmarks/NAME.py` in a subprocess
with its tiny settings and `--no_doc`, so a change to the package that breaks a script fails here instead of
on the day someone next measures. The numbers they print are noise; only their shape is checked.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def docs_files() -> dict[pathlib.Path, bytes]:
    return {path: path.read_bytes() for path in sorted(DOCS.rglob("*")) if path.is_file()}


def run_benchmark(script: str, *flags: str) -> str:
    """Runs `python benchmarks/{script}.py FLAGS...` from the repository root; returns its stdout.

    Fails unless it exits 0 and every file under docs/ (sections, ledger, figure) is byte for byte as before.
    """
    before = docs_files()
    done = subprocess.run([sys.executable, f"benchmarks/{script}.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert docs_files() == before, f"benchmarks/{script}.py changed docs/ although --no_doc was given"
    return done.stdout


@pytest.mark.slow
def test_accelerator_step_sweeps_its_variants_on_a_tiny_model():
    # --sweep runs each variant as a plain run in a process of its own: both paths of the script.
    out = run_benchmark("accelerator_step", "--sweep", "--variants", "before", "--tiny", "--batch", "2",
                        "--steps", "1", "--no_torch")
    row = json.loads(out.splitlines()[0])
    assert row["variant"] == "before" and row["framework"] == "gpt1_jax" and row["tokens_per_s"] > 0
    assert "| variant | tokens/s | MFU |" in out and "| before |" in out


@pytest.mark.slow
def test_finetune_step_times_a_variant_on_a_tiny_model():
    out = run_benchmark("finetune_step", "--configs", "tiny", "--variants", "tokens", "--rounds", "1", "--no_doc")
    assert "## Fine-tuning step (CPU)" in out
    assert "| tiny | 2 x 2 x 64 | `lm_softmax_rows=tokens` |" in out


def test_input_pipeline_on_one_book_and_a_short_stream(data_root):
    out = run_benchmark("input_pipeline", "--books", "11-0.txt", "--steps", "5", "--stream_tokens", "100000",
                        "--no_doc")
    assert "## Input pipeline" in out and "| gpt1 (64 x 513) |" in out
    assert "Token-cache build with the real GPT-1 tokenizer (11-0.txt; once per corpus)" in out


def test_profile_breakdown_groups_a_traces_kernels(tmp_path):
    (tmp_path / "train_step.hlo.txt").write_text(
        "  %fusion.3 = f32[8,12,512,512]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_computation\n")
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "ts": 0.0, "dur": 30.0, "name": "fusion_3"},
              {"ph": "X", "pid": 1, "ts": 40.0, "dur": 70.0, "name": "nvjet_sm90_tst"}]
    with gzip.open(tmp_path / "host.trace.json.gz", "wt") as trace:
        json.dump({"traceEvents": events}, trace)
    out = run_benchmark("profile_breakdown", str(tmp_path), "--steps", "1")
    assert "| group | ms a step | share |" in out
    assert "| matrix products, bfloat16 | 0.1 | 70.0% |" in out


def test_table5_mini_renders_its_section_from_the_committed_ledger(tmp_path):
    out = run_benchmark("table5_mini", "--out", str(tmp_path), "--doc_only", "--layers", "--no_doc")
    assert "## Table 5 in miniature" in out and "| mini, L3 |" in out and "Wins that count" in out


def test_tokenizer_matches_the_slow_reference_on_a_sample(data_root):
    pytest.importorskip("transformers")
    from benchmarks import tokenizer as tokenizer_benchmark

    site = tokenizer_benchmark.reference_site_path()
    if not (site / "transformers").is_dir():
        pytest.skip(f"the slow reference tokenizer is not installed at {site} (the benchmark installs it with pip)")
    out = run_benchmark("tokenizer", "--texts", "100", "--min_speedup", "0", "--no_doc")
    assert "## Tokenizer" in out and "| gpt1_jax `GPT1Tokenizer.encode_batch`, cold caches |" in out


@pytest.mark.slow
def test_train_step_against_transformers_on_the_tiny_config():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = run_benchmark("train_step", "--configs", "tiny", "--rounds", "1", "--warmup", "0", "--matmul", "256",
                        "--no_doc")
    assert "## Train step (CPU)" in out and "| tiny | 16 x 64 | gpt1_jax jit |" in out


@pytest.mark.slow
def test_tpu_slices_compiles_the_tiny_model_for_one_chip():
    pytest.importorskip("libtpu")
    out = run_benchmark("tpu_slices", "--tiny", "--slices", "v5e:1x1", "--no_doc")
    assert "## Compiled for TPU slices (CPU, libtpu)" in out and "| v5e:1x1 (v5e:1x1) | 1 / 1 |" in out


def test_tpu_step_memory_compiles_the_tiny_model_with_the_fused_kernels():
    pytest.importorskip("libtpu")
    out = run_benchmark("tpu_step_memory", "--tiny", "--topology", "v5e:1x1", "--variants", "scan:fused", "--no_doc")
    assert "## The TPU step's memory, by lever (CPU, libtpu)" in out and "| scan | fused |" in out
