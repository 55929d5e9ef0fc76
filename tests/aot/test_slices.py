"""TPU slices by name, described by libtpu on this CPU machine: chips, hosts, HBM, and the errors of bad names."""

import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt1_jax.aot import slices
from gpt1_jax.aot.slices import GiB, TopologyError


@pytest.mark.parametrize("name, topology, chips, hosts, kind", [
    ("v5e:2x2", "v5e:2x2", 4, 1, "TPU v5 lite"),
    ("v5litepod-16", "v5e:4x4", 16, 4, "TPU v5 lite"),
    ("v5e-8", "v5e:2x4", 8, 1, "TPU v5 lite"),  # Cloud TPU's 8-chip v5e is one host
    ("v4-8", "v4:2x2x1", 4, 1, "TPU v4"),  # gcloud counts v4 TensorCores: 8 cores, 4 chips
    ("v4:2x2x2", "v4:2x2x2", 8, 2, "TPU v4"),
    ("v5p-8", "v5p:2x2x1", 4, 1, "TPU v5"),
    ("v6e-4", "v6e:2x2", 4, 1, "TPU v6 lite"),
])
def test_a_slice_name_in_either_spelling_gives_its_chips_and_hosts(name, topology, chips, hosts, kind):
    tpu = slices.resolve(name)
    assert (tpu.topology, tpu.chips, tpu.hosts, tpu.chip_kind) == (topology, chips, hosts, kind)
    assert all(device.platform == "tpu" for device in tpu.devices)


@pytest.mark.parametrize("name, message", [
    ("v9:2x2", "is not a TPU slice name. Accepted: v4:2x2x1, v5e:4x4, v5p:2x2x1, v6e:2x2"),
    ("banana", "gcloud's accelerator types v4-8, v5litepod-16 (also v5e-16), v5p-8, v6e-4"),
    ("v5e:2x2x2", "a v5e slice has 2 axes of chips, e.g. v5e:2x2"),
    ("v4:2x2", "a v4 slice has 3 axes of chips, e.g. v4:2x2x2"),
    ("v4-7", "Cloud TPU has no such v4 slice; its sizes are v4-8, v4-16"),
    ("v5litepod-12", "its sizes are v5litepod-1, v5litepod-4, v5litepod-8, v5litepod-16"),
    ("v5e:3x3", "libtpu cannot describe it"),
])
def test_a_name_that_is_no_slice_is_one_error_listing_the_accepted_forms(name, message):
    with pytest.raises(TopologyError, match=re.escape(message)) as error:
        slices.resolve(name)
    assert "\n" not in str(error.value)


def test_each_generations_hbm_is_what_libtpu_lets_a_program_use():
    """The compiler names the HBM it allows when a program is too large for it; the table must agree."""
    for generation in slices.GENERATIONS.values():
        tpu = slices.resolve(f"{generation.name}:{'x'.join(['2'] * generation.axes)}")
        mesh = jax.sharding.Mesh(np.array(tpu.devices[:1]), ("chip",))
        too_big = jax.ShapeDtypeStruct((64 * GiB // 4,), jnp.float32, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        with pytest.raises(jax.errors.JaxRuntimeError, match="exceeds available HBM") as error:
            jax.jit(lambda x: (jnp.sin(x)[::-1] * x).sum()).trace(too_big).lower().compile()
        available = float(re.search(r"exceeds available HBM \(([\d.]+)G\)", str(error.value))[1])
        assert generation.hbm_bytes / GiB == pytest.approx(available, abs=0.005), generation.name


def test_without_libtpu_the_error_says_which_pip_install_line_fixes_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    with pytest.raises(TopologyError, match=re.escape(f"libtpu is not installed; compiling for a TPU needs it: pip "
                                                      f"install 'jax[tpu]=={jax.__version__}'")):
        slices.resolve("v5e:2x2")


def test_a_libtpu_of_another_release_than_jax_pins_is_refused(monkeypatch, tmp_path):
    """An installed libtpu whose version is not the one jax's `tpu` extra pins (a stale or nightly wheel)."""
    info = tmp_path / "libtpu-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    pin = slices.required_libtpu()
    assert pin and pin.startswith("==")
    with pytest.raises(TopologyError, match=re.escape(f"libtpu 0.0.1 does not match jax {jax.__version__}, which "
                                                      f"needs libtpu{pin}: pip install 'jax[tpu]=={jax.__version__}'")):
        slices.resolve("v5e:2x2")


def test_libtpu_start_up_warnings_stay_off_the_terminal():
    """Off a TPU VM libtpu logs that it finds no accelerator type and no worker hostnames; none of it is an error."""
    script = "from gpt1_jax.aot import slices; print(slices.resolve('v5e:2x2').chips)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr
    assert done.stderr == "", done.stderr
