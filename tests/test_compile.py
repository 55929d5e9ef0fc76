"""gpt1-compile: a run compiled for a TPU slice from the command line; its report, files and exit status."""

import importlib
import json
import re
import sys

import jax
import pytest

from gpt1_jax import cli
from gpt1_jax import compile as compile_tool
from gpt1_jax.aot import slices
from pretrain_helpers import RECIPES

TINY = str(RECIPES / "tiny_pretrain.py")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        compile_tool.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_that_fits_prints_its_memory_per_chip_and_writes_json_and_the_programs(tmp_path, capsys):
    code, out, _ = run(["--config", TINY, "--config.train.batch_size=64", "--topology", "v5e:2x2",
                        "--json", str(tmp_path / "report.json"), "--hlo", str(tmp_path / "hlo")], capsys)
    assert code == 0
    assert out.startswith("pre-training on v5e:2x2: 4 chips of TPU v5 lite, 1 host, 15.75 GiB of HBM per chip")
    for line in ("mesh: data 4 x fsdp 1", "train step (compiled in", "eval step (compiled in", "    parameters ",
                 "    optimizer state ", "    batch ", "    temporaries ", "of 15.750 for programs", "  FITS, ",
                 "collectives per step: all-reduce x", "FLOPs per chip: "):
        assert line in out, line
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fits"] and report["slice"]["chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1}
    train = report["steps"][0]
    memory = train["memory_bytes_per_chip"]
    assert set(memory) == {"parameters", "optimizer_state", "batch", "temporaries", "outputs", "program", "total"}
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total") > 0
    assert train["margin_bytes"] == train["hbm_bytes_per_chip"] - memory["total"]
    assert (tmp_path / "hlo" / "train_step.hlo.txt").read_text().startswith("HloModule jit_train_step")
    assert (tmp_path / "hlo" / "eval_step.hlo.txt").exists()


@pytest.mark.slow
def test_a_run_that_does_not_fit_exits_1_and_fit_finds_a_config_that_compiles_and_fits(tmp_path, capsys):
    """2,048 windows on one v5e chip: the LM head's logits alone are over its HBM. Sharding and recomputation
    cannot help; accumulating over two micro-batches does."""
    argv = ["--config", TINY, "--config.train.batch_size=2048", "--config.train.eval_every=0", "--topology",
            "v5litepod-1"]
    code, out, _ = run([*argv, "--fit", "--json", str(tmp_path / "report.json")], capsys)
    assert code == compile_tool.DOES_NOT_FIT_STATUS == 1
    assert re.search(r"DOES NOT FIT, [\d.]+ GiB \([\d.]+% of HBM\) over", out)
    assert re.search(r"The run DOES NOT FIT on v5e:1x1: the train step by [\d.]+ GiB per chip", out)
    assert "mesh.fsdp: no setting fits" in out and "model.remat: no setting fits" in out
    assert "  --config.train.grad_accum_steps=2  (" in out
    found = json.loads((tmp_path / "report.json").read_text())["fit"]
    assert found["fits"] and found["flags"] == "--config.train.grad_accum_steps=2"
    code, out, _ = run([*argv, *found["flags"].split()], capsys)
    assert code == 0 and "  FITS, " in out and "DOES NOT FIT" not in out


def fake_libtpu_release(monkeypatch, tmp_path) -> None:
    info = tmp_path / "libtpu-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


@pytest.mark.parametrize("overrides, setup, message", [
    (["--topology", "v5e:9"], None, "--topology 'v5e:9': a v5e slice has 2 axes of chips, e.g. v5e:2x2. Accepted: "
                                    "v4:2x2x1, v5e:4x4, v5p:2x2x1, v6e:2x2 (GENERATION:chips per axis), or gcloud's "
                                    "accelerator types v4-8, v5litepod-16 (also v5e-16), v5p-8, v6e-4."),
    (["--topology", "v5e:2x2"], lambda mp, _: mp.setitem(sys.modules, "libtpu", None),
     f"libtpu is not installed; compiling for a TPU needs it: pip install 'jax[tpu]=={jax.__version__}'"),
    (["--topology", "v5e:2x2"], fake_libtpu_release, f"libtpu 0.0.1 does not match jax {jax.__version__}"),
    (["--topology", "v5e:2x2", "--config.mesh.fsdp=3"], None, "mesh.fsdp=3 must divide the device count 4."),
    (["--topology", "v4-16", "--config.train.batch_size=12"], None,
     "train.batch_size=12 must be divisible by train.grad_accum_steps x device count = 1 x 8"),
])
def test_each_bad_input_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, overrides, setup, message):
    if setup:
        setup(monkeypatch, tmp_path)
    code, out, err = run(["--config", TINY, *overrides], capsys)
    assert code == cli.USAGE_ERROR_STATUS and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_the_accepted_names_are_the_ones_the_help_lists(capsys):
    with pytest.raises(SystemExit):
        compile_tool.main(["--help"])
    assert slices.ACCEPTED.split(" (")[0] in " ".join(capsys.readouterr().out.split())
