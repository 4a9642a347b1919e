"""The loop plumbing both training stages share (alssl/loop.py) and the stage-1 method objects' interface."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from alssl.errors import UserError
from alssl.loop import (eman_buffers, fitting, load_checkpoint, non_finite_error, non_finite_kind, past_deadline,
                        state_problem, truncate_metrics)
from alssl.runs import atomic_torch_save

NEED = {"step": int, "model": dict}


def test_state_problem_names_the_first_bad_key():
    ok = {"kind": "k", "step": 3, "model": {}}
    assert state_problem(ok, kind="k", what="a k state", need=NEED) is None
    assert state_problem([1], kind="k", what="a k state", need=NEED) == "not a k state"
    assert state_problem({**ok, "kind": "other"}, kind="k", what="a k state", need=NEED) == "not a k state"
    assert state_problem({"kind": "k", "step": 3}, kind="k", what="a k state", need=NEED) == "key 'model' is missing"
    assert state_problem({**ok, "step": True}, kind="k", what="a k state", need=NEED) == "step is a bool, not a int"
    assert state_problem({**ok, "model": []}, kind="k", what="a k state", need=NEED) == "model is a list, not a dict"


def test_load_checkpoint_and_fitting_are_one_error_line(tmp_path: Path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"kind": "k", "step": 1}, path)
    problem = lambda s: state_problem(s, kind="k", what="a k state", need=NEED)  # noqa: E731
    with pytest.raises(UserError, match=r"state.pt is damaged \(key 'model' is missing\); delete it"):
        load_checkpoint(path, problem, "delete it")
    atomic_torch_save({"kind": "k", "step": 1, "model": {"w": torch.ones(2)}}, path)
    saved = load_checkpoint(path, problem, "delete it")
    fits_not = r"state.pt does not fit this model \(Error\(s\) in loading state_dict for Linear:\); start over$"
    with pytest.raises(UserError, match=fits_not):
        with fitting(path, "this model", "start over"):
            torch.nn.Linear(3, 1, bias=False).load_state_dict({"weight": saved["model"]["w"]})


def test_truncate_metrics_forgets_the_redone_steps_of_one_stage(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"stage": "pretrain", "step": 0}, {"stage": "probe", "round": 0}, {"stage": "pretrain", "step": 5},
            {"stage": "pretrain", "step": 10}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    truncate_metrics(path, 5, stage="pretrain")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs[:3]
    truncate_metrics(path, -1, stage="pretrain")  # nothing kept of the stage; other stages' lines stay
    assert [json.loads(line) for line in path.read_text().splitlines()] == [recs[1]]
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)))  # a stage-4 file: no stage field
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


def test_non_finite_messages_of_both_stages():
    e = non_finite_error("the moco loss", "at step 3", Path("RUN/checkpoints"),
                         fix="lower --lr and rerun with a new --out")
    assert str(e) == ("the moco loss became NaN or inf at step 3; the last good checkpoint is kept in RUN/checkpoints; "
                      "lower --lr and rerun with a new --out")
    e = non_finite_error("loss", "at step 6", Path("OUT/state.pt"), what=non_finite_kind(torch.tensor(float("nan"))),
                         last_good=4)
    assert str(e) == "loss became NaN at step 6; the last good checkpoint (step 4) is kept in OUT/state.pt; lower --lr"
    e = non_finite_error("loss", "at step 0", None, what=non_finite_kind(torch.tensor(float("-inf"))))
    assert str(e) == "loss became inf at step 0; no checkpoint was written yet; lower --lr"


def test_past_deadline_without_ranks():
    assert past_deadline(None, 1e9) is False
    assert past_deadline(10.0, 11.0) is True and past_deadline(10.0, 9.0) is False


def test_eman_buffers_average_statistics_copy_counters_in_each_stage_arithmetic():
    """EMAN's buffer rule, shared: stage 1 computes m·t + (1−m)·s as mul/add, stage 4 as lerp (bit-exact to each)."""
    torch.manual_seed(0)
    student, teacher = torch.nn.BatchNorm1d(1000), torch.nn.BatchNorm1d(1000)
    for bn in (student, teacher):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    student.num_batches_tracked.fill_(7)
    torch.nn.init.constant_(student.weight, 2.0)
    for lerp in (False, True):
        t = torch.nn.BatchNorm1d(1000)
        t.load_state_dict(teacher.state_dict())
        eman_buffers(t, student, 0.99, lerp=lerp)
        mean0 = teacher.running_mean
        mul_add = mean0.mul(0.99).add_(student.running_mean, alpha=1.0 - 0.99)  # stage 1's arithmetic
        want = mean0.lerp(student.running_mean, 1.0 - 0.99) if lerp else mul_add
        assert torch.equal(t.running_mean, want) and int(t.num_batches_tracked) == 7
        if lerp:  # the two arithmetics differ in the last bit: why each stage keeps its own
            assert not torch.equal(t.running_mean, mul_add)
        assert torch.equal(t.weight, torch.ones(1000))  # parameters are not its business


def test_methods_never_compare_names():
    """Each stage-1 method answers the loop's questions itself: teacher or not, checkpoint keys, momentum."""
    from alssl.backbones import build_backbone
    from alssl.pretrain_methods import METHODS

    assert set(METHODS) == {"simsiam", "moco", "byol"}
    for name, cls in METHODS.items():
        torch.manual_seed(0)
        m = cls()
        net = m.student(build_backbone("cnn", 1))
        m.setup(net, n_pool=64)
        assert m.name == name and (m.teacher is not None) == cls.has_teacher
        assert set(m.state_dict()) == set(m.state_types())
        x0, x1 = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
        loss, z = m.loss(net, x0, x1, contextlib.nullcontext)
        assert loss.dim() == 0 and torch.isfinite(loss) and z.shape == (4, m.out_dim)
        m.load_state_dict(m.state_dict())
    assert METHODS["byol"]().momentum_at(100, 100) == 1.0 and METHODS["moco"]().momentum_at(100, 100) == 0.99
