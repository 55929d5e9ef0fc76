"""What does a bucket cost a checkpoint? Save and restore to a GCS API server against a local disk.

The same `checkpoint.TrainCheckpointer` a run uses writes the full training state (parameters and
the optimizer's two moments, float32: three times the parameters) of a step, and a fresh one restores
it with its checksums verified, once into a local folder and once into `gs://` on fake-gcs-server
(tests/gcs_emulator.py, in memory, on loopback, with the test's loopback-only client settings).
Rounds alternate the two so background load hits both alike; the figures are medians. Save is the
time until the step is committed (the asynchronous part included: Orbax's save returns earlier and
training goes on meanwhile); restore is `restore_latest` with the arrays on the device.

The emulator puts HTTP, JSON and TensorStore's GCS driver on the path and leaves out the network and
Google's servers: the ratio is the client-side cost of going through the object-store API, a lower
bound for a real bucket, whose throughput depends on the VM's network (see docs/benchmarks.md).

    pip install -e '.[test]' && python benchmarks/checkpoint_storage.py [--configs tiny,gpt1] [--rounds 3] [--no-doc]

Needs the test extra (the emulator). Rewrites the `## Checkpoints on a bucket (CPU)` section of
docs/benchmarks.md unless --no-doc. About 5 minutes on 2 cores, mostly the GPT-1 config.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import gcs_emulator  # noqa: E402  (tests/: the server and the loopback-only client settings)
from doc_section import write_section  # noqa: E402

SECTION = "## Checkpoints on a bucket (CPU)"
CONFIGS = {  # name -> model overrides of configs/gpt1_pretrain.py
    "tiny": dict(width=64, n_head=2, n_layer=2, mlp_width=256, n_ctx=128),
    "gpt1": dict(),
}


def training_state(name: str):
    """(params, rest of the train state, abstract params, abstract rest) of a fresh run of the config."""
    import jax

    from configs import gpt1_pretrain
    from gpt1_jax import optim, pretrain, train_lib

    config = gpt1_pretrain.get_config()
    config.model.update(CONFIGS[name])
    model_cfg = pretrain.model_config(config)
    total = config.train.num_steps
    optimizer = optim.make_optimizer(config.optimizer, total,
                                     jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0)))
    compiled = pretrain.compile_pretraining(config, model_cfg, optimizer,
                                            optim.learning_rate_schedule(config.optimizer, total))
    state = train_lib.place_state(pretrain.initial_params(model_cfg, 0), optimizer, compiled)
    abstract = compiled.abstract_state
    return state.params, state.rest(), abstract.params, abstract.rest()


def save_and_restore(directory: str, step: int, state) -> tuple[float, float]:
    """Seconds to save `step` until committed, then to restore it with a fresh checkpointer."""
    import jax

    from gpt1_jax import checkpoint

    params, rest, abstract_params, abstract_rest = state
    saver = checkpoint.TrainCheckpointer(directory, keep=1)
    start = time.perf_counter()
    saver.save(step, params, rest, {"benchmark": True})
    saver.close()
    saved = time.perf_counter() - start
    reader = checkpoint.TrainCheckpointer(directory, keep=1)
    start = time.perf_counter()
    restored_step, restored, _ = reader.restore_latest(abstract_params, abstract_rest)
    jax.block_until_ready(restored)
    restored_time = time.perf_counter() - start
    reader.close()
    assert restored_step == step, f"restored step {restored_step}, saved {step}"
    return saved, restored_time


def measure(name: str, rounds: int, server: str, local_root: pathlib.Path) -> dict:
    import jax

    state = training_state(name)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(state[:2]))
    times = {"local": [], "bucket": []}
    for round_index in range(rounds + 1):  # round 0 warms up (compilations, first connections), untimed
        for where, directory in (("local", str(local_root / name)), ("bucket", f"gs://{gcs_emulator.BUCKET}/{name}")):
            seconds = save_and_restore(directory, round_index + 1, state)
            if round_index:
                times[where].append(seconds)
                print(f"{name} round {round_index} {where}: save {seconds[0]:.2f} s, restore {seconds[1]:.2f} s",
                      flush=True)
    median = {where: tuple(statistics.median(t[i] for t in runs) for i in (0, 1)) for where, runs in times.items()}
    return {"name": name, "megabytes": size / 1e6, **median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,gpt1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as scratch, gcs_emulator.running(pathlib.Path(scratch)) as server:
        os.environ.update(gcs_emulator.client_env(server))  # before the first gs:// client is made
        rows = [measure(name, args.rounds, server, pathlib.Path(scratch)) for name in names]
    lines = [SECTION, "",
             f"`benchmarks/checkpoint_storage.py`, {datetime.date.today()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, median of {args.rounds} alternating rounds after one to warm up. The full "
             "training state of one step (parameters and both Adam moments, float32) saved until committed, "
             "then restored with its checksums verified; \"bucket\" is fake-gcs-server on loopback (HTTP and "
             "TensorStore's GCS driver, no network), so its ratio is the client-side cost of the object-store API, "
             "a lower bound for a real bucket.", "",
             "| config | state (MB) | save local (s) | save bucket (s) | ratio | restore local (s) | "
             "restore bucket (s) | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        (save_l, restore_l), (save_b, restore_b) = row["local"], row["bucket"]
        lines.append(f"| {row['name']} | {row['megabytes']:,.1f} | {save_l:.2f} | {save_b:.2f} | "
                     f"{save_b / save_l:.1f}x | {restore_l:.2f} | {restore_b:.2f} | {restore_b / restore_l:.1f}x |")
    print("\n".join(lines))
    if not args.no_doc:
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
