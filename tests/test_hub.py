"""Weights by hub name (gpt1_jax/weights/hub.py), against a fake hub on 127.0.0.1 (tests/fake_hub.py)."""

from __future__ import annotations

import json
import pathlib

import huggingface_hub.constants
import jax
import numpy as np
import pytest
from fake_hub import FakeHub, Repo, repo_from_folder, use_hub

from gpt1_jax.weights import hub, weight_formats

REPO_ID = "tiny-org/tiny-gpt"
COMMIT, TAGGED = "1" * 40, "2" * 40


def save_tiny_openai_gpt(folder: pathlib.Path, seed: int = 0, n_layer: int = 2) -> pathlib.Path:
    """A random transformers OpenAIGPTLMHeadModel, GPT-1's vocabulary at 2 x 64, saved with save_pretrained.

    64 wide, its model.safetensors (10.5 MB) is just over the hub's download chunk (10 MiB), so a cut near its end
    shows the resumed request."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.OpenAIGPTConfig(vocab_size=40478, n_positions=64, n_embd=64, n_layer=n_layer, n_head=2)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt_folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hub-models")
    return {"main": save_tiny_openai_gpt(root / "main", seed=0), "v1": save_tiny_openai_gpt(root / "v1", seed=1)}


def serve_tiny_gpt(fake: FakeHub, folders: dict[str, pathlib.Path]) -> None:
    """REPO_ID with two commits: `main` and the tag `v1`, each also holding a PyTorch duplicate of its weights."""
    main, v1 = repo_from_folder(folders["main"], COMMIT), repo_from_folder(folders["v1"], TAGGED)
    for files in (*main.commits.values(), *v1.commits.values()):
        files["pytorch_model.bin"] = b"not to be fetched"
    fake.repos[REPO_ID] = Repo(commits={**main.commits, **v1.commits}, refs={"main": COMMIT, "v1": TAGGED})


def test_names_parse_to_repositories_and_folders_win_when_they_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse("openai-gpt") == hub.HubModel(hub.RELEASED_REPO)
    assert hub.parse("hf:openai-gpt@abc") == hub.HubModel(hub.RELEASED_REPO, "abc")
    assert hub.parse("hf:tiny-org/tiny-gpt@v1") == hub.HubModel(REPO_ID, "v1")
    assert hub.parse("./openai-gpt") is None and hub.parse("mini") is None and hub.parse("runs/x/checkpoints") is None
    (tmp_path / "tiny-org" / "tiny-gpt").mkdir(parents=True)
    assert hub.parse("hf:tiny-org/tiny-gpt") is None  # a folder of that name: the folder, as before


def test_a_name_fetches_only_config_and_safetensors_at_the_revision_asked(tiny_gpt_folders, tmp_path, monkeypatch):
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        latest = hub.fetch(hub.HubModel(REPO_ID))
        tagged = hub.fetch(hub.HubModel(REPO_ID, "v1"))
    assert (latest.commit, tagged.commit) == (COMMIT, TAGGED) and tagged.pinned == f"hf:{REPO_ID}@{TAGGED}"
    fetched_files = {path.split("/")[-1] for _, path, _ in fake.requests if "/resolve/" in path}
    assert fetched_files == set(hub.WEIGHT_FILES)  # not the .bin / .h5 duplicates a hub repository also holds
    for fetched, folder in ((latest, tiny_gpt_folders["main"]), (tagged, tiny_gpt_folders["v1"])):
        assert leaves(weight_formats.load_hf(fetched.folder)[1]) == leaves(weight_formats.load_hf(folder)[1])
    assert leaves(weight_formats.load_hf(latest.folder)[1]) != leaves(weight_formats.load_hf(tagged.folder)[1])


def leaves(params) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params)]


def test_a_second_fetch_uses_the_cache_with_the_hub_gone_and_offline_with_nothing_cached_says_how(
        tiny_gpt_folders, tmp_path, monkeypatch):
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        first = hub.fetch(hub.HubModel(REPO_ID, "v1"))
    use_hub(monkeypatch, fake.url, tmp_path / "cache", offline=True)  # the server is stopped too
    assert hub.fetch(hub.HubModel(REPO_ID, "v1")).folder == first.folder
    use_hub(monkeypatch, fake.url, tmp_path / "empty-cache", offline=True)
    with pytest.raises(hub.HubError, match=rf"^hf:{REPO_ID}@v1 \(config.json\): offline .* hf:FOLDER"):
        hub.fetch(hub.HubModel(REPO_ID, "v1"))


def test_a_download_cut_short_is_resumed_and_never_loaded_half_written(tiny_gpt_folders, tmp_path, monkeypatch):
    """The hub retries a dropped connection, asking for the bytes after the last whole chunk it wrote."""
    size = (tiny_gpt_folders["main"] / "model.safetensors").stat().st_size
    chunk = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    assert size > chunk
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        fake.cut_after["model.safetensors"] = size - 1000
        fetched = hub.fetch(hub.HubModel(REPO_ID))
    ranges = [rng for method, path, rng in fake.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranges == [None, f"bytes={chunk}-"]  # the second request asked for the rest only
    assert (fetched.folder / "model.safetensors").read_bytes() == (tiny_gpt_folders["main"] / "model.safetensors"
                                                                   ).read_bytes()


def test_a_download_cut_for_good_leaves_nothing_loadable_and_the_next_run_fetches_it(
        tiny_gpt_folders, tmp_path, monkeypatch):
    size = (tiny_gpt_folders["main"] / "model.safetensors").stat().st_size
    cache = tmp_path / "cache"
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, cache)
        hub.fetch(hub.HubModel(REPO_ID), filenames=("config.json",))
        fake.cut_after["model.safetensors"] = size // 3
        fake.stop()  # the rest of the download never comes
        failed = rf"^hf:{REPO_ID} \(model.safetensors\): the download failed .* rerun to download it"
        with pytest.raises(hub.HubError, match=failed):
            hub.fetch(hub.HubModel(REPO_ID))
    assert not list(cache.rglob("model.safetensors")) and not list(cache.rglob("*.incomplete"))
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, cache)
        fetched = hub.fetch(hub.HubModel(REPO_ID))
    assert (fetched.folder / "model.safetensors").stat().st_size == size


@pytest.mark.parametrize("name, error", [
    (hub.HubModel("nobody/nothing"), r"^hf:nobody/nothing \(config.json\): no folder of that name here and no such"),
    (hub.HubModel(REPO_ID, "v9"), rf"^hf:{REPO_ID}@v9 \(config.json\): the repository has no revision 'v9'"),
    (hub.HubModel("gated-org/gpt"), r"^hf:gated-org/gpt \(config.json\): the repository is gated"),
    (hub.HubModel("bert-org/bert"), r"^hf:bert-org/bert: not an OpenAIGPT model \(config.json's model_type is 'bert'"),
    (hub.HubModel("pt-org/gpt"), r"^hf:pt-org/gpt \(model.safetensors\): the repository has no model.safetensors"),
])
def test_each_hub_failure_is_one_line_naming_the_repository_and_revision(
        tiny_gpt_folders, tmp_path, monkeypatch, name, error):
    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        fake.repos["gated-org/gpt"] = repo_from_folder(tiny_gpt_folders["main"])
        fake.repos["gated-org/gpt"].gated = True
        fake.repos["bert-org/bert"] = Repo(commits={COMMIT: {"config.json": b'{"model_type": "bert"}'}},
                                           refs={"main": COMMIT})
        fake.repos["pt-org/gpt"] = Repo(commits={COMMIT: {"config.json": b'{"model_type": "openai-gpt"}',
                                                          "pytorch_model.bin": b"0"}}, refs={"main": COMMIT})
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        with pytest.raises(hub.HubError, match=error) as raised:
            hub.fetch(name)
    assert "\n" not in str(raised.value)


def test_init_by_hub_name_fine_tunes_from_the_folders_backbone_and_records_the_commit(
        tiny_gpt_folders, tmp_path, monkeypatch, data_root):
    from gpt1_jax.configs import finetune as finetune_recipe
    from gpt1_jax.constants import SHAPE_KEYS
    from gpt1_jax.finetuning import finetune, finetune_start, tasks

    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))

    def config_from(init: str):
        config = finetune_recipe.get_config("tiny")
        config.update_from_flattened_dict({"init": init, "data.task_source": "local", "checkpoint.async_save": False,
                                           "finetune.max_train_examples": 32, **{f"model.{k}": 0 for k in SHAPE_KEYS}})
        return config

    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        config = config_from(f"hf:{REPO_ID}@v1")
        _, by_name, _ = finetune_start.build_params(config, tasks.get_task("sst2"), 0)
        _, by_folder, _ = finetune_start.build_params(config_from(f"hf:{tiny_gpt_folders['v1']}"),
                                                      tasks.get_task("sst2"), 0)
        assert leaves(by_name) == leaves(by_folder)
        results = finetune.finetune(config, str(tmp_path / "run"))
    pinned = f"hf:{REPO_ID}@{TAGGED}"
    assert results["starting_point"] == f"pre-trained ({pinned})" and results["config"]["init_weights"] == pinned
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_weights"] == pinned


def test_every_tool_takes_a_hub_name_and_openai_gpt_names_the_released_repository(
        tiny_gpt_folders, tmp_path, monkeypatch, capsys):
    from gpt1_jax import convert, generate
    from gpt1_jax.training import checkpoint

    with FakeHub() as fake:
        serve_tiny_gpt(fake, tiny_gpt_folders)
        fake.repos[hub.RELEASED_REPO] = fake.repos[REPO_ID]
        use_hub(monkeypatch, fake.url, tmp_path / "cache")
        generate.main(["--checkpoint", "openai-gpt", "--prompt", "the old man", "--max_new_tokens", "3", "--greedy"])
        assert capsys.readouterr().out.startswith("the old man")
        convert.main(["--hf", f"hf:{REPO_ID}@v1", "--orbax", str(tmp_path / "converted")])
    _, params, metadata = checkpoint.load_pretrained(tmp_path / "converted")
    assert leaves(params) == leaves(weight_formats.load_hf(tiny_gpt_folders["v1"])[1])
    assert metadata["weights"] == f"hf:{REPO_ID}@{TAGGED}"
    assert any(f"/{hub.RELEASED_REPO}/resolve/main/model.safetensors" in path for _, path, _ in fake.requests)
