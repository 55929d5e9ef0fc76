"""Shared fixtures: the real data folder (`$GPT1_JAX_DATA`, else `<repo>/../shared/data`)."""

import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    root = pathlib.Path(os.environ.get("GPT1_JAX_DATA", _REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"no data folder at {root}; set GPT1_JAX_DATA")
    return root
