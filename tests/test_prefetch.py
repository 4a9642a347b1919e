"""The look-ahead view thread (alssl/prefetch.py): same weights with and without it, errors surface, no hang."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alssl.data import load_dataset
from alssl.prefetch import ahead
from alssl.pretraining import load_state, pretrain
from alssl.runs import Run
from alssl.semi import semi_finetune


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_with_look_ahead_gives_the_same_weights(tmp_path, digits, method="moco"):  # teacher + queue too
    states = {}
    for prefetch in (False, True):
        run = Run.create(tmp_path / f"{method}-{prefetch}", n_pool=digits.n_pool, config={})
        pretrain(digits, run, method=method, epochs=2, batch_size=128, knn_every=0, prefetch=prefetch,
                 ckpt_every_steps=5)
        states[prefetch] = load_state(run.path)
    assert states[True]["step"] == states[False]["step"] > 10
    assert _same(states[True]["model"], states[False]["model"])
    assert _same(states[True]["teacher"], states[False]["teacher"])
    assert states[True]["history"] == states[False]["history"]


@pytest.mark.parametrize("method", ["fixmatch", "simmatch", "daso"])
def test_semi_with_look_ahead_gives_the_same_weights(tmp_path, digits, method):
    rng = np.random.default_rng(0)
    li = np.concatenate([rng.choice(np.flatnonzero(digits.y_train == k), 2, replace=False) for k in range(10)])
    opts = {"hflip": False, **({"daso_warmup": 2} if method == "daso" else {})}
    states = {}
    for prefetch in (False, True):
        out = tmp_path / f"{method}-{prefetch}"
        semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], out_dir=out, method=method, steps=6,
                      batch_size=8, mu=2, seed=3, quiet=True, device="cpu", options=opts, prefetch=prefetch)
        states[prefetch] = torch.load(out / "state.pt", weights_only=True)
    assert _same(states[True]["model"], states[False]["model"])
    assert _same(states[True]["teacher"], states[False]["teacher"])


def test_ahead_draws_the_next_item_on_another_thread_while_the_caller_works():
    seen = []

    def make(k):
        seen.append((k, threading.current_thread().name))
        return k * k

    out = []
    for k, v in ahead(make, range(4)):
        time.sleep(0.05)  # the caller's "step": make(k + 1) finishes meanwhile
        out.append((k, v, len(seen)))
    assert [(k, v) for k, v, _ in out] == [(0, 0), (1, 1), (2, 4), (3, 9)]
    assert all(n <= k + 2 for k, _, n in out)  # at most one item ahead
    assert all(name.startswith("alssl-views") for _, name in seen)
    assert [k for k, _ in ahead(make, range(3), enabled=False)] == [0, 1, 2]


def test_an_error_in_make_surfaces_at_its_step_and_an_early_stop_does_not_hang():
    def make(k):
        if k == 2:
            raise ValueError("bad batch")
        return k

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for _, v in ahead(make, range(5)):
            got.append(v)
    assert got == [0, 1]
    gen = ahead(lambda k: k, range(100))
    assert next(gen) == (0, 0)
    gen.close()  # a caller that stops early (break, error, Ctrl-C) closes the generator: the worker exits
    assert not any(t.name.startswith("alssl-views") and t.is_alive() for t in threading.enumerate())
