"""Draw the next step's views while this step trains: one background thread, one step ahead.

Both training loops (stage 1 and stage 4) build each step's input with a pure function of the step number
`make(k)`: it seeds torch's RNG from (seed, k), reads the batch's pixels and draws the augmented views. `ahead(make,
steps)` runs `make(k + 1)` on a worker thread while the caller trains on `make(k)`. On a CPU the convolutions of the
step and the view ops of the next one run on different cores (torch releases the GIL inside its kernels); on a GPU
the thread keeps enqueuing the many small kornia kernels while the main thread enqueues the step's (same CUDA
stream, so no cross-stream memory hazard and the order of each tensor's producers and consumers is unchanged).

Determinism: `make` is the only user of torch's global RNG while the loop runs (the training step itself draws no
random numbers: no dropout, the batch order comes from seeded numpy/torch generators), and it re-seeds at every
step, so a step's views are the same whichever thread draws them and whenever: runs with and without look-ahead are
bit-identical (tests/test_prefetch.py), and so are resumed ones. The thread shares the pool's memory (no process
copies); at most one step's views wait in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def ahead(make: Callable[[int], T], steps: Iterable[int], *, enabled: bool = True,
          device: "torch.device | None" = None) -> Iterator[tuple[int, T]]:
    """Yield (k, make(k)) for k in `steps`, computing make(next k) on a worker thread while the caller uses make(k).

    An exception raised by `make` is raised here, at the step that needed it. When the caller stops early (an
    error, Ctrl-C, `break`), the worker finishes the one step it was drawing and exits. `device`: a CUDA device is
    made the worker's current device (CUDA's current device is per thread).
    """
    steps = list(steps)
    if not enabled or len(steps) < 2:
        for k in steps:
            yield k, make(k)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alssl-views", initializer=_use_device,
                              initargs=(device,))
    try:
        pending = pool.submit(make, steps[0])
        for i, k in enumerate(steps):
            item = pending.result()
            if i + 1 < len(steps):
                pending = pool.submit(make, steps[i + 1])
            yield k, item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _use_device(device: "torch.device | None") -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
