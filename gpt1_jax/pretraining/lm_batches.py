"""Language-modelling batches: random contiguous windows of a token stream.

GPT-1 pre-trains on "minibatches of 64 randomly sampled, contiguous sequences of 512 tokens"
(Sec. 4.1). A window of ``n_ctx + 1`` tokens gives the inputs ``[:, :-1]`` and the next-token
targets ``[:, 1:]`` of the L1 objective (Sec. 3.1).

The batch of step ``t`` is a pure function of ``(seed, t, process_index)``: a resumed run sees
exactly the data it would have seen, and no iterator state is checkpointed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def _check_length(num_tokens: int, n_ctx: int, what: str, key: str) -> None:
    """Fails before any compilation when the corpus cannot fill one window."""
    if num_tokens == 0:
        raise ValueError(f"The {what} is empty (0 tokens); check {key}.")
    if num_tokens < n_ctx + 1:
        raise ValueError(
            f"The {what} has {num_tokens} tokens but one window needs n_ctx + 1 = {n_ctx + 1} "
            f"(model.n_ctx = {n_ctx}); add text via {key} or lower model.n_ctx."
        )


@dataclasses.dataclass(frozen=True)
class WindowSampler:
    """Draws this process's share of each global batch of random windows.

    ``tokens`` is the training stream (a memmap is fine); ``batch_size`` is the per-process batch.
    """

    tokens: np.ndarray  # [num_tokens] integer ids
    n_ctx: int
    batch_size: int
    seed: int
    process_index: int = 0

    def __post_init__(self):
        _check_length(self.tokens.size, self.n_ctx, "training token stream", "data.source")

    def batch(self, step: int) -> np.ndarray:
        """Returns int32 [batch_size, n_ctx + 1], identical for identical (seed, step, process)."""
        rng = np.random.default_rng([self.seed, step, self.process_index])
        # Every start in [0, num_tokens - n_ctx - 1] is equally likely, as in the paper's sampling.
        starts = rng.integers(0, self.tokens.size - self.n_ctx, size=self.batch_size)  # [batch]
        offsets = np.arange(self.n_ctx + 1)  # [n_ctx + 1]
        return self.tokens[starts[:, None] + offsets].astype(np.int32)  # [batch, n_ctx + 1]

    def prefetch(self, start: int, end: int, depth: int = 4) -> Prefetcher:
        """Iterates ``(step, batch)`` for steps in [start, end), produced ahead on a thread."""
        return Prefetcher(self.batch, start, end, depth=depth)


class Prefetcher:
    """Runs ``make_batch(step)`` for step in [start, end) on a background thread.

    The bounded queue (``depth`` batches) keeps host memory flat while hiding batch assembly behind
    the device step. Exceptions raised on the thread are re-raised by the consumer. Use it as a
    context manager (or call ``close``) when leaving the loop early.
    """

    _DONE = object()

    def __init__(self, make_batch: Callable[[int], Any], start: int, end: int, depth: int = 4):
        if depth < 1:
            raise ValueError(f"Prefetch depth must be at least 1, got {depth}.")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(make_batch, start, end), name="lm-batch-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, make_batch: Callable[[int], Any], start: int, end: int) -> None:
        try:
            for step in range(start, end):
                if not self._put((step, make_batch(step))):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class ValidationBatch:
    """A fixed validation batch; rows with ``weights == 0`` are padding and must not count."""

    tokens: np.ndarray  # [batch_size, n_ctx + 1] int32
    weights: np.ndarray  # [batch_size] float32, 1 for real windows, 0 for padding


def validation_batches(
    tokens: np.ndarray, *, n_ctx: int, batch_size: int, num_batches: int | None = None
) -> list[ValidationBatch]:
    """Cuts the held-out stream into consecutive windows that together cover it once.

    Window i starts at ``i * n_ctx``, so targets never overlap and every held-out token after the
    first is predicted exactly once (a trailing remainder shorter than n_ctx is dropped). The last
    batch is padded with zero-weight rows so every batch has one shape (one compilation).
    ``num_batches`` pads with empty batches or truncates: in a multi-host run each process holds
    a different amount of validation text, and all processes must run the same number of steps.
    """
    _check_length(tokens.size, n_ctx, "validation token stream", "data.val_fraction")
    num_windows = (tokens.size - 1) // n_ctx
    starts = np.arange(num_windows) * n_ctx  # [num_windows]
    total = -(-num_windows // batch_size) if num_batches is None else num_batches
    batches = []
    for b in range(total):
        rows = starts[b * batch_size : (b + 1) * batch_size]  # [<= batch_size]
        windows = np.zeros((batch_size, n_ctx + 1), np.int32)  # [batch, n_ctx + 1]
        weights = np.zeros((batch_size,), np.float32)  # [batch]
        windows[: rows.size] = tokens[rows[:, None] + np.arange(n_ctx + 1)]
        weights[: rows.size] = 1.0
        batches.append(ValidationBatch(tokens=windows, weights=weights))
    return batches
