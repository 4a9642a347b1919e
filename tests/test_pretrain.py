"""Stage 1: per-sample views, EMAN teacher buffers, probe quality on digits, exact resume after kill -9, 2-rank DDP."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from torch import nn

from alssl.augment import SSLView
from alssl.data import load_dataset
from alssl.feature_sets import pool_features
from alssl.probes import fit_probe
from alssl.runs import Run
from alssl.pretraining import SSLNet, load_state, momentum_update, pretrain
from alssl.backbones import build_backbone
from conftest import run_cli  # a subprocess: for the run that is killed and for DDP
from conftest import run_cli_inprocess as run_main


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _probe(run: Run, ds, frac: float, seeds=(0, 1, 2)) -> float:
    """Mean linear-probe test accuracy over random labeled subsets of `frac` of the pool."""
    train, test = pool_features(run.path, ds)
    accs = []
    for s in seeds:
        idx = np.random.default_rng(s).choice(len(ds.y_train), int(frac * len(ds.y_train)), replace=False)
        probe = fit_probe("linear", train[idx], ds.y_train[idx], num_classes=ds.num_classes)
        accs.append(probe.accuracy(test, ds.y_test))
    return float(np.mean(accs))


def _pretrained(tmp_path_factory, ds, name: str, **kw) -> Run:
    run = Run.create(tmp_path_factory.mktemp(name) / "run", n_pool=len(ds.y_train), config={})
    pretrain(ds, run, batch_size=128, quiet=True, **kw)
    return run


@pytest.fixture(scope="module")
def random_init(tmp_path_factory, digits):
    return _pretrained(tmp_path_factory, digits, "rand", epochs=0)


# ---------------------------------------------------------------- views
def test_views_are_drawn_per_sample():
    x = torch.rand(1, 3, 32, 32).repeat(64, 1, 1, 1)  # one image, 64 times
    v = SSLView(32, 3, [0.5] * 3, [0.25] * 3)(x)
    distinct = len({tuple(row.round(decimals=4).tolist()) for row in v.flatten(1)[:, :50]})
    assert distinct > 50  # torchvision v2 on a batch would give 1
    gray = SSLView(8, 1, [0.5], [0.25])
    assert gray(torch.rand(4, 1, 8, 8)).shape == (4, 1, 8, 8)


def test_batched_crop_gives_the_pixels_of_per_sample_crops():
    """SSLView crops the whole batch with one affine warp (kornia cropping_mode="resample", one kernel instead of one
    resize per image); from the same crop parameters it gives kornia's per-sample slice-and-resize pixels."""
    import kornia.augmentation as K

    crop = SSLView(32, 3, [0.5] * 3, [0.25] * 3).aug[0]
    assert isinstance(crop, K.RandomResizedCrop) and crop.flags["cropping_mode"] == "resample"
    x = torch.rand(32, 3, 32, 32)
    per_sample = K.RandomResizedCrop((32, 32), scale=(0.2, 1.0), cropping_mode="slice")
    expected = per_sample(x)
    assert (crop(x, params=per_sample._params) - expected).abs().max() < 1e-4


# ---------------------------------------------------------------- EMAN
def test_eman_teacher_tracks_student_bn_and_never_updates_its_own():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    student.train()
    student(torch.randn(8, 1, 6, 6) * 3 + 2)  # student's running stats move
    t_mean, s_mean = teacher[1].running_mean.clone(), student[1].running_mean.clone()
    momentum_update(student, teacher, 0.9, eman=True)
    assert torch.allclose(teacher[1].running_mean, 0.9 * t_mean + 0.1 * s_mean)
    assert teacher[1].num_batches_tracked.item() == student[1].num_batches_tracked.item() == 1
    teacher.eval()  # EMAN's teacher always runs in eval mode: its forward leaves its buffers alone
    before = teacher[1].running_var.clone()
    teacher(torch.randn(8, 1, 6, 6) * 5)
    assert torch.equal(teacher[1].running_var, before)
    # the plain momentum encoder averages parameters only
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).requires_grad_(False)
    plain_mean = plain[1].running_mean.clone()
    momentum_update(student, plain, 0.9, eman=False)
    assert torch.equal(plain[1].running_mean, plain_mean)


def test_eman_teacher_runs_in_eval_mode(tmp_path, digits):
    """After training with --eman the saved teacher's BN buffers are an EMA, not batch statistics of its own."""
    run = Run.create(tmp_path / "r", n_pool=len(digits.y_train), config={})
    pretrain(digits, run, method="moco", eman=True, epochs=1, batch_size=256, quiet=True)
    st = load_state(run.path)
    counter = "backbone.features.1.num_batches_tracked"
    assert st["teacher"][counter] == st["model"][f"encoder.{counter}"]


# ---------------------------------------------------------------- quality (Foundation + stage 1 acceptance)
def test_simsiam_linear_probe_floor_and_beats_random_init(tmp_path_factory, digits, random_init):
    run = _pretrained(tmp_path_factory, digits, "simsiam", method="simsiam", epochs=30)
    ssl10, rand10 = _probe(run, digits, 0.10), _probe(random_init, digits, 0.10)
    ssl5, rand5 = _probe(run, digits, 0.05), _probe(random_init, digits, 0.05)
    print(f"simsiam probe 10%: {ssl10:.3f} (random init {rand10:.3f}); 5%: {ssl5:.3f} (random init {rand5:.3f})")
    assert ssl10 >= 0.85
    assert ssl5 > rand5 + 0.03


@pytest.mark.parametrize("method, eman", [("moco", False), ("byol", False), ("moco", True), ("byol", True)])
def test_momentum_methods_beat_random_init(tmp_path_factory, digits, random_init, method, eman):
    run = _pretrained(tmp_path_factory, digits, f"{method}{eman}", method=method, eman=eman, epochs=15)
    ssl10, rand10 = _probe(run, digits, 0.10), _probe(random_init, digits, 0.10)
    print(f"{method} eman={eman} probe 10%: {ssl10:.3f} (random init {rand10:.3f})")
    assert ssl10 > rand10 + 0.02


# ---------------------------------------------------------------- resume and DDP (through the console)
def test_killed_pretrain_resumes_to_the_same_weights(tmp_path):
    args = ["pretrain", "--data", "digits", "--method", "moco", "--epochs", "2", "--batch-size", "256",
            "--ckpt-every-steps", "3", "-q"]
    full = tmp_path / "full"
    assert run_main(*args, "--out", str(full)).returncode == 0
    cut = tmp_path / "cut"
    killed = run_cli(*args, "--out", str(cut), env={"ALSSL_FAULT_AFTER_STEPS": "7"})
    assert killed.returncode == -signal.SIGKILL
    assert load_state(cut)["step"] == 6  # 5 steps per epoch: checkpoints at steps 3, 5 (epoch end) and 6
    # as if the process had logged epoch 2 and died before its checkpoint, tearing a last line on the way
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"stage": "pretrain", "epoch": 2, "step": 10, "loss": 0.5}\n{"stage": "pretr')
    again = run_main(*args, "--out", str(cut))
    assert again.returncode == 0, again.stderr
    a, b = load_state(full), load_state(cut)
    assert a["step"] == b["step"] == 10
    for part in ("model", "teacher"):
        diff = max((a[part][k].float() - b[part][k].float()).abs().max().item() for k in a[part])
        assert diff <= 1e-6, (part, diff)
    assert torch.equal(a["queue"], b["queue"])
    # the metrics: one line per epoch, and the resumed epoch's loss averages all its steps, as uninterrupted
    import json

    def epochs(run):
        return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]

    ea, eb = epochs(full), epochs(cut)
    assert [r["epoch"] for r in ea] == [r["epoch"] for r in eb] == [0, 1, 2]
    for ra, rb in zip(ea, eb):
        assert ra["step"] == rb["step"] and ra["knn_accuracy"] == rb["knn_accuracy"]
        for k in ("loss", "collapse_std"):
            assert (ra[k] is None and rb[k] is None) or abs(ra[k] - rb[k]) <= 1e-6, (k, ra, rb)


def test_ddp_two_ranks_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("pretrain", "--data", "digits", "--out", str(out), "--epochs", "1", "--batch-size", "64",
                "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp", "-q",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    import json

    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # epochs 0 and 1, written once (rank 0 only)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["backbone.pt", "pretrain-state.pt", "start.pt"]


# ---------------------------------------------------------------- damaged state, other data, seeds (issue 17)
def test_seed_must_fit_32_bits():
    from alssl.errors import UserError
    from alssl.pretraining import check_args

    for bad in (-1, 2**32, 2**70, True, 1.5):
        with pytest.raises(UserError, match="--seed must be an integer"):
            check_args(method="simsiam", eman=False, momentum=0.99, momentum_schedule=None, accelerator="cpu",
                       devices=1, strategy="auto", precision="32-true", seed=bad)


def test_old_checkpoint_of_other_data_is_refused(tmp_path, digits):
    """A pretrain-state.pt written before checkpoints recorded their data: the weights do not fit → UserError."""
    from alssl.errors import UserError
    from alssl.runs import atomic_torch_save

    run = Run.create(tmp_path / "r", n_pool=len(digits.y_train), config={})
    pretrain(digits, run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    st = load_state(run.path)
    del st["data"]
    atomic_torch_save(st, run.checkpoints / "pretrain-state.pt")
    before = {p.name: p.read_bytes() for p in run.checkpoints.iterdir()}
    x = np.repeat(digits.x_train, 3, axis=-1)  # same pool size, 3 channels
    np.savez(tmp_path / "rgb.npz", x_train=x, y_train=digits.y_train, x_test=np.repeat(digits.x_test, 3, axis=-1),
             y_test=digits.y_test)
    with pytest.raises(UserError, match="does not fit this model and data.*original data"):
        pretrain(load_dataset(str(tmp_path / "rgb.npz")), run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    assert {p.name: p.read_bytes() for p in run.checkpoints.iterdir()} == before


def test_a_killed_first_attempt_leaves_no_duplicate_epoch_line(tmp_path, digits):
    """Killed after logging epoch 0 but before the first checkpoint: the rerun logs epoch 0 once."""
    run = Run.create(tmp_path / "r", n_pool=len(digits.y_train), config={})
    run.log_metrics({"stage": "pretrain", "epoch": 0, "step": 0, "loss": None})
    run.log_metrics({"stage": "probe", "round": 0, "accuracy": 0.5})  # other stages' lines are kept
    pretrain(digits, run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    import json

    recs = [json.loads(l) for l in run.metrics_file.read_text().splitlines()]
    assert [r["stage"] for r in recs] == ["probe", "pretrain"]
