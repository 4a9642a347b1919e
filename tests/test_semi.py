"""Stage 4 end to end on digits: SSL beats supervised on 40 labels, resume after kill -9, NaN handling, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from alssl.backbones import backbone_checkpoint, build_backbone
from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.runs import atomic_torch_save, read_jsonl
from alssl.semi import METHODS, semi_finetune

ROOT = Path(__file__).resolve().parents[1]

# The digits schedule for CPU tests: 200 steps, B = 32, μ = 2 (the default μ stays 7), default EMA 0.999 with its
# warm-up (m_t ≈ 0.96 at the end), no horizontal flip (digits are not mirror-symmetric). ~10-20 s per method idle.
FAST = dict(steps=200, batch_size=32, mu=2, seed=0, quiet=True, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def forty_labels(d, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(d.y_train == k), 4, replace=False) for k in range(10)])


@pytest.fixture(scope="module")
def supervised_40(digits, tmp_path_factory):
    li = forty_labels(digits)
    return semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], method="supervised",
                         out_dir=tmp_path_factory.mktemp("sup"), options={"hflip": False}, **FAST)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "simmatch", "daso"])
def test_ssl_beats_supervised_on_40_digit_labels(method, digits, supervised_40, tmp_path):
    li = forty_labels(digits)
    opts = {"hflip": False, **({"daso_warmup": 40} if method == "daso" else {})}
    res = semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], method=method, out_dir=tmp_path,
                        options=opts, **FAST)
    assert res["n_labeled"] == 40 and res["n_unlabeled"] == len(digits.y_train) - 40
    # measured: supervised 0.894; fixmatch 0.961, simmatch 0.942, daso 0.967 (all seeds: margins 2.5-9.2 points)
    assert supervised_40["accuracy"] > 0.6  # the baseline learned something
    assert res["accuracy"] >= supervised_40["accuracy"] + 0.03, (res, supervised_40)
    assert res["balanced_accuracy"] == pytest.approx(np.mean(res["per_class_recall"]))


def _tiny(d, out, method, **kw):
    li = forty_labels(d)
    base = dict(steps=10, batch_size=8, mu=2, seed=1, ckpt_every=4, quiet=True, device="cpu")
    opts = {"daso_warmup": 2, "daso_dist_period": 3} if method == "daso" else {}
    return semi_finetune(d, labeled_idx=li, labeled_y=d.y_train[li], method=method, out_dir=out, options=opts,
                         **{**base, **kw})


def _weights(out: Path) -> dict:
    st = torch.load(out / "state.pt", weights_only=True)
    return {**{f"m.{k}": v for k, v in st["model"].items()}, **{f"t.{k}": v for k, v in st["teacher"].items()}}


@pytest.mark.parametrize("method", ["fixmatch", "simmatch", "daso"])
def test_kill_after_k_steps_then_resume_gives_the_same_weights(method, digits, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _tiny(digits, whole, method)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_semi import _tiny
        from alssl.data import load_dataset
        _tiny(load_dataset("digits"), {str(broken)!r}, {method!r})
    """)
    env = {**os.environ, "ALSSL_FAULT_AFTER_STEPS": "6", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed itself after step 6
    assert torch.load(broken / "state.pt", weights_only=True)["step"] == 4  # the last checkpoint before the kill
    res = _tiny(digits, broken, method)  # same arguments: resumes from step 4
    a, b = _weights(whole), _weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    assert [r["step"] for r in read_jsonl(broken / "metrics.jsonl")] == [4, 8, 10]  # no duplicated lines
    assert json.loads((broken / "result.json").read_text())["accuracy"] == res["accuracy"]


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    cls = METHODS["fixmatch"]
    real = cls.loss

    def poisoned(self, model, teacher, b, step):
        loss, logs = real(self, model, teacher, b, step)
        return (loss * float("nan") if step == 6 else loss), logs

    monkeypatch.setattr(cls, "loss", poisoned)
    with pytest.raises(UserError,
                       match=r"loss became NaN at step 6; the last good checkpoint \(step 4\) is kept in .*lower --lr"):
        _tiny(digits, tmp_path, "fixmatch")
    st = torch.load(tmp_path / "state.pt", weights_only=True)
    assert st["step"] == 4
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_rerun_with_other_arguments_is_refused_and_a_finished_run_is_not_retrained(digits, tmp_path):
    first = _tiny(digits, tmp_path, "fixmatch", steps=4)
    mtime = (tmp_path / "state.pt").stat().st_mtime_ns
    assert _tiny(digits, tmp_path, "fixmatch", steps=4) == first  # finished: evaluated again, not retrained
    assert (tmp_path / "state.pt").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other arguments.*lr"):
        _tiny(digits, tmp_path, "fixmatch", steps=4, lr=0.1)


def test_stage1_checkpoint_is_the_starting_point(digits, tmp_path):
    torch.manual_seed(5)
    bb = build_backbone("cnn", 1)
    ckpt = tmp_path / "backbone.pt"
    atomic_torch_save(backbone_checkpoint(bb, name="cnn", in_channels=1), ckpt)
    li = forty_labels(digits)
    semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], out_dir=tmp_path / "s", method="supervised",
                  init_checkpoint=ckpt, steps=1, batch_size=8, lr=1e-12, quiet=True, device="cpu",
                  backbone="wrn28_2")  # the checkpoint's backbone wins over the argument
    st = torch.load(tmp_path / "s" / "state.pt", weights_only=True)
    w0 = bb.state_dict()["features.0.weight"]
    assert torch.allclose(st["model"]["backbone.features.0.weight"], w0, atol=1e-9)
    rgb = tmp_path / "rgb.pt"
    atomic_torch_save(backbone_checkpoint(build_backbone("cnn", 3), name="cnn", in_channels=3), rgb)
    with pytest.raises(UserError, match="3-channel"):
        semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], out_dir=tmp_path / "x",
                      init_checkpoint=rgb, steps=1, quiet=True, device="cpu")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs,match", [
    (dict(labeled_idx=np.array([1, 1, 2])), "duplicates"),
    (dict(labeled_idx=np.array([1, 99999, 2])), "out of range"),
    (dict(labeled_y=np.array([0, 1, 12])), "class ids"),
    (dict(teacher="emaa"), 'did you mean "ema"'),
    (dict(options={"daso_warmpu": 3}), 'did you mean "daso_warmup"'),
    (dict(options={"unlabeled_profile": "reverse"}), 'did you mean "reversed"'),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(unlabeled_idx=np.array([1, 5])), "overlap"),
    (dict(seed=-1), "seed must be an integer in 0.."),
    (dict(seed=2**70), "seed must be an integer in 0.."),
    (dict(options={"hflip": "maybe"}), "hflip must be true or false"),
    (dict(options={"hflip": 1}), "hflip must be true or false"),
    (dict(options={"daso_queue": "big"}), "daso_queue must be an integer"),
    (dict(options={"daso_queue": 2.5}), "daso_queue must be an integer"),
    (dict(options={"daso_T_proto": float("nan")}), "daso_T_proto must be a number"),
    (dict(options={"daso_T_dist": -1}), "daso_T_dist must be a number >= 0"),
    (dict(options={"unlabeled_imbalance": "x"}), "unlabeled_imbalance must be a number"),
    (dict(options={"bn_batch": 3}), "bn_batch must be a str"),
])
def test_bad_input_is_a_user_error(digits, tmp_path, kwargs, match):
    args = dict(labeled_idx=np.array([1, 2, 3]), labeled_y=np.array([0, 1, 2]), out_dir=tmp_path / "out", method="daso",
                steps=1, quiet=True, device="cpu")
    with pytest.raises(UserError, match=match):
        semi_finetune(digits, **{**args, **kwargs})
    assert not (tmp_path / "out").exists()  # bad input leaves nothing behind


def test_supervised_needs_no_unlabeled_and_ssl_does(digits, tmp_path):
    li = np.arange(len(digits.y_train))
    res = semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train, out_dir=tmp_path / "a", method="supervised",
                        steps=2, batch_size=8, quiet=True, device="cpu")
    assert res["n_unlabeled"] == 0
    with pytest.raises(UserError, match="needs unlabeled samples"):
        semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train, out_dir=tmp_path / "b", method="fixmatch",
                      steps=2, quiet=True, device="cpu")


def test_long_tailed_pool_with_reversed_unlabeled_profile(tmp_path):
    d = load_dataset("digits", imbalance=10)
    counts = np.bincount(d.y_train, minlength=10)
    li = np.concatenate([np.flatnonzero(d.y_train == k)[: max(1, counts[k] // 5)] for k in range(10)])
    res = semi_finetune(d, labeled_idx=li, labeled_y=d.y_train[li], out_dir=tmp_path, method="daso", steps=3,
                        batch_size=8, mu=2, quiet=True, device="cpu",
                        options={"unlabeled_profile": "reversed", "unlabeled_imbalance": 10})
    rest = np.setdiff1d(np.arange(len(d.y_train)), li)
    rc = np.bincount(d.y_train[rest], minlength=10)
    order = np.argsort(rc, kind="stable")  # rarest remaining class first: it becomes the head of the unlabeled pool
    assert rc[order[0]] < rc[order[-1]]
    n_max = min(rc[k] * 10 ** (r / 9) for r, k in enumerate(order))
    assert res["n_unlabeled"] == sum(max(1, int(int(n_max) * 10 ** (-(r / 9)))) for r in range(10))
    assert res["n_unlabeled"] < len(rest)
    assert len(res["per_class_recall"]) == 10


FIX = "; delete it to start this fine-tune over"  # every damaged-state message names the fix


@pytest.mark.parametrize("edit, match", [(lambda st: st.pop("fingerprint"), r"\(key 'fingerprint' is missing\)" + FIX),
                                         (lambda st: st.update(step=-3), r"\(step -3 is outside 0\.\.4\)" + FIX),
                                         (lambda st: st.update(kind="x"),
                                          r"\(not an alssl semi-supervised checkpoint\)" + FIX),
                                         (lambda st: st.update(model={"x": torch.ones(1)}),
                                          r"does not fit this model \(.*\)" + FIX)])
def test_damaged_semi_state_is_a_user_error(digits, tmp_path, edit, match):
    _tiny(digits, tmp_path, "fixmatch", steps=4)
    st = torch.load(tmp_path / "state.pt", weights_only=True)
    edit(st)
    atomic_torch_save(st, tmp_path / "state.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=match):
        _tiny(digits, tmp_path, "fixmatch", steps=4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("method,schedule", [("daso", "constant"), ("fixmatch", "cosine"), ("simmatch", "cosine")])
def test_default_lr_schedule_and_da_queue_follow_the_reference(method, schedule, digits, tmp_path):
    """DASO keeps lr constant (official SOLVER.APPLY_SCHEDULER = False; USB: scheduler = None); FixMatch/SimMatch
    decay it with cos(7πk/16K); SimMatch aligns over USB's CIFAR queue of 32 batch means."""
    li = forty_labels(digits)
    run = dict(FAST, steps=4, batch_size=8)
    semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], method=method, out_dir=tmp_path / "a",
                  ckpt_every=4, options={"hflip": False}, **run)
    lr = [r["lr"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "lr" in r][-1]  # lr of the last step (k = 3)
    assert lr == pytest.approx(0.03 if schedule == "constant" else 0.03 * np.cos(7 * np.pi * 3 / 64))
    if method == "daso":  # the deviation is an option
        semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], method=method, out_dir=tmp_path / "b",
                      ckpt_every=4, options={"hflip": False, "lr_schedule": "cosine"}, **run)
        assert [r["lr"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "lr" in r][-1] < 0.03
    if method == "simmatch":
        assert METHODS["simmatch"].defaults(4, {})["da_len"] == 32
    with pytest.raises(UserError, match="lr_schedule"):
        semi_finetune(digits, labeled_idx=li, labeled_y=digits.y_train[li], method=method, out_dir=tmp_path / "c",
                      options={"lr_schedule": "step"}, **run)
