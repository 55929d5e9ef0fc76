"""Shared fixtures: the real data folder (`$GPT1_JAX_DATA`, else `<repo>/../shared/data`)."""

import os
import pathlib
import tempfile

import pytest

_REPO = pathlib.Path(__file__).resolve().parent.parent
# Configs read the data root when they are built; default it as the README's test command does.
os.environ.setdefault("GPT1_JAX_DATA", str(_REPO.parent / "shared" / "data"))
# The tests run on the CPU. The test extra installs libtpu (tests/aot compile for TPU slices through it), and
# without this JAX would try the TPU backend in every process, printing libtpu's start-up warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny train step, in this process and in train.py subprocesses: a
# persistent compilation cache (read by JAX from these variables at import) compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gpt1_jax_test_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    # Absolute, so subprocesses and kernels started in other folders (tmp_path) find it too.
    root = pathlib.Path(os.environ.get("GPT1_JAX_DATA", _REPO.parent / "shared" / "data")).resolve()
    if not root.is_dir():
        pytest.skip(f"no data folder at {root}; set GPT1_JAX_DATA")
    return root


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One token cache for the whole session, so each corpus is tokenized once."""
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory, data_root, token_cache_dir) -> pathlib.Path:
    """The workdir of `gpt1_jax/configs/tiny_pretrain.py` as shipped (300 steps) on the six shared books.

    One run serves the pre-training test (perplexity against the unigram baseline) and the
    fine-tuning tests (its `checkpoints/` are their pre-trained starting point, the central-result
    test's included: 200 steps are too few for Story Cloze to gain from them).
    """
    from gpt1_jax.configs import tiny_pretrain
    from gpt1_jax.pretraining import pretrain

    config = tiny_pretrain.get_config()
    config.data.cache_dir = str(token_cache_dir)
    config.checkpoint.every = config.train.num_steps
    config.checkpoint.async_save = False
    workdir = tmp_path_factory.mktemp("tiny_pretraining")
    pretrain.pretrain(config, str(workdir))
    return workdir


@pytest.fixture(scope="session")
def books(data_root) -> pathlib.Path:
    return data_root / "corpus" / "gutenberg"


class _CharTokenizer:
    """Stands in for GPT1Tokenizer in cache-logic tests: one id per character, calls counted."""

    def __init__(self, fingerprint="char-v1", offset=0):
        self.fingerprint = fingerprint
        self.offset = offset
        self.calls = 0

    def encode_batch(self, texts, *, num_workers=None, progress=False):
        self.calls += 1
        return [[ord(c) + self.offset for c in text] for text in texts]


@pytest.fixture
def char_tokenizer() -> type:
    """The stand-in tokenizer class: call it for a fresh instance, subclass it to make one fail."""
    return _CharTokenizer


@pytest.fixture
def write_corpus():
    """write_corpus(folder, texts): one file per text, read back as a one-process FileCorpus."""
    from gpt1_jax.pretraining import text_sources

    def write(folder, texts):
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / f"doc{i:03d}.txt").write_text(text)
        return text_sources.FileCorpus(str(folder / "*.txt"), process_index=0, process_count=1)

    return write
