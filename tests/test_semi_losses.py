"""Stage-4 math on hand-computed numbers: FixMatch mask/loss, SimMatch unfolding/aggregation, DASO blend/alignment,
EMA vs EMAN teachers, distribution alignment, the DASO queue ordering, per-sample views and the pool helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alssl.errors import UserError
from alssl.semi import METHODS
from alssl.semi.common import Batch, Net
from alssl.semi.daso import DASO, daso_align_loss, daso_blend, proto_logits
from alssl.semi.fixmatch import fixmatch_unsup_loss
from alssl.semi.simmatch import SimMatch, simmatch_targets
from alssl.semi.teacher import DistAlign, Teacher
from alssl.semi.trainer import cosine_lr, shape_unlabeled, stream_batch
from alssl.semi.views import StrongView, WeakView


# ---------------------------------------------------------------- FixMatch
def test_fixmatch_mask_and_loss_by_hand():
    weak = torch.tensor([[3.0, 0.0, 0.0], [0.5, 0.4, 0.1], [0.0, 0.0, 5.0]])
    strong = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    loss, mask, pseudo = fixmatch_unsup_loss(weak, strong, tau=0.9)
    # max softmax: e^3/(e^3+2) = 0.9094 >= 0.9; sample 2 ~ 0.4; e^5/(e^5+2) = 0.9867
    assert mask.tolist() == [True, False, True]
    assert pseudo[0] == 0 and pseudo[2] == 2
    z = math.log(1 + math.e + math.e**2)  # log-sum-exp of [1, 2, 0] and of [0, 1, 2]
    expected = ((z - 1.0) + 0.0 + (z - 2.0)) / 3  # CE(class 0 | [1,2,0]) + masked + CE(class 2 | [0,1,2]), mean over 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()  # gradient flows to the strong logits only
    assert strong.grad is not None and strong.grad[1].abs().sum() == 0


# ---------------------------------------------------------------- SimMatch
def test_simmatch_unfolding_and_aggregation_by_hand():
    # 3 classes, 4 bank entries with labels [0, 1, 2, 0]; two unlabeled samples
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.4, 0.1, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    labels = torch.tensor([0, 1, 2, 0])
    p_hat, q_hat = simmatch_targets(p, q, labels, alpha=0.9)
    # sample 0 unfolding: q_j·p[y_j] = [0.4·0.5, 0.1·0.3, 0.2·0.2, 0.3·0.5] = [0.2, 0.03, 0.04, 0.15], sum 0.42
    assert q_hat[0].tolist() == pytest.approx([0.2 / 0.42, 0.03 / 0.42, 0.04 / 0.42, 0.15 / 0.42], abs=1e-6)
    # sample 1: [0.025, 0.025, 0.2, 0.025] / 0.275
    assert q_hat[1].tolist() == pytest.approx([0.025 / 0.275, 0.025 / 0.275, 0.2 / 0.275, 0.025 / 0.275], abs=1e-6)
    # aggregation: a = [0.4 + 0.3, 0.1, 0.2]; p̂ = 0.9·p + 0.1·a
    assert p_hat[0].tolist() == pytest.approx([0.45 + 0.07, 0.27 + 0.01, 0.18 + 0.02], abs=1e-6)
    # sample 1: a = [0.5, 0.25, 0.25]; p̂ = [0.09 + 0.05, 0.09 + 0.025, 0.72 + 0.025]
    assert p_hat[1].tolist() == pytest.approx([0.14, 0.115, 0.745], abs=1e-6)
    assert p_hat.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_simmatch_bank_refresh_last_row_wins_for_a_repeated_sample():
    m = SimMatch(num_classes=3, labeled_y=torch.tensor([0, 1, 2, 0]), steps=10, tau=0.95, lambda_u=1.0,
                 options={**SimMatch.defaults(10, {}), "proj_dim": 2})
    m.bank = torch.zeros(4, 2)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m._refresh(torch.tensor([3, 1, 3]), emb)  # a batch crossing an epoch boundary holds sample 3 twice
    assert m.bank.tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]]


# ---------------------------------------------------------------- DASO
def test_daso_blend_weights_by_hand():
    pl_dist = torch.tensor([0.5, 0.3, 0.2])
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    q = torch.tensor([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]])
    blended, v = daso_blend(p, q, pl_dist, T_dist=1.0)
    assert v.tolist() == pytest.approx([1.0, 0.6, 0.4])
    assert blended[0].tolist() == pytest.approx([0.1, 0.2, 0.7])  # k̂ = 0 (the majority): v = 1, p' = q
    assert blended[1].tolist() == pytest.approx([0.4 * 0.2 + 0.6 * 0.1, 0.4 * 0.7 + 0.6 * 0.2, 0.4 * 0.1 + 0.6 * 0.7])
    _, v_sharp = daso_blend(p, q, pl_dist, T_dist=0.5)  # π̂^2 / max = [0.25, 0.09, 0.04] / 0.25
    assert v_sharp.tolist() == pytest.approx([1.0, 0.36, 0.16])


def test_daso_prototype_similarity_and_alignment_loss_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    sim = proto_logits(z, protos, torch.tensor([True, True, False]), T_proto=0.05)
    assert sim[0, :2].tolist() == pytest.approx([20.0, 0.0]) and sim[0, 2] == float("-inf")
    sim_w = torch.tensor([[0.0, math.log(3.0)]])  # target softmax = [0.25, 0.75]
    sim_s = torch.tensor([[0.0, 0.0]], requires_grad=True)  # log softmax = [-ln 2, -ln 2]
    loss = daso_align_loss(sim_w, sim_s)
    assert loss.item() == pytest.approx(math.log(2.0))
    loss.backward()  # d/ds = softmax(s) - target = [0.25, -0.25]
    assert sim_s.grad[0].tolist() == pytest.approx([0.25, -0.25])
    masked = daso_align_loss(torch.tensor([[1.0, float("-inf")]]), torch.tensor([[0.5, float("-inf")]]))
    assert masked.item() == pytest.approx(0.0)  # an empty class contributes nothing, no NaN


class _Toy(nn.Module):
    """A 'backbone' whose features are the flattened input (dim 2), so features are known exactly."""

    dim = 2

    def forward(self, x):
        return x.flatten(1)


def _daso(**opts):
    o = {**DASO.defaults(100, {}), "daso_warmup": 0, **opts}
    return DASO(num_classes=2, labeled_y=torch.tensor([0, 1]), steps=100, tau=0.0, lambda_u=1.0, options=o)


def test_daso_prototypes_at_step_t_include_step_t_embeddings(monkeypatch):
    torch.manual_seed(0)
    net = Net(_Toy(), 2)
    teacher = Teacher(net, kind="ema", decay=0.999)
    m = _daso()
    seen = []
    import alssl.semi.daso as daso_mod

    real = daso_mod.proto_logits

    def spy(z, protos, valid, T_proto):
        seen.append((protos.clone(), valid.clone()))
        return real(z, protos, valid, T_proto)

    monkeypatch.setattr(daso_mod, "proto_logits", spy)
    x_l = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]).view(3, 2, 1, 1)
    b = Batch(x_l=x_l, y_l=torch.tensor([0, 1, 0]), i_l=torch.tensor([0, 1, 0]),
              x_uw=torch.tensor([[1.0, 0.1]]).view(1, 2, 1, 1), x_us=torch.tensor([[0.9, 0.2]]).view(1, 2, 1, 1))
    m.loss(net, teacher, b, step=0)  # empty queues before this step
    protos, valid = seen[0]
    assert valid.tolist() == [True, True]  # this step's labeled features were pushed first
    assert torch.allclose(protos, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))  # mean of [1,0] and [3,0]; [0,2]
    b2 = Batch(x_l=torch.tensor([[0.0, 4.0]]).view(1, 2, 1, 1), y_l=torch.tensor([1]), i_l=torch.tensor([1]),
               x_uw=b.x_uw, x_us=b.x_us)
    m.loss(net, teacher, b2, step=1)
    assert len(seen) == 4  # weak and strong similarities per step, both against the same prototypes
    assert seen[2][0][1].tolist() == pytest.approx([0.0, 3.0])  # class 1 queue: [0,2] and step-1's [0,4]


def test_daso_queue_is_fifo_per_class():
    m = _daso(daso_queue=2)
    m.push(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]))
    m.push(torch.tensor([[4.0, 0.0], [6.0, 0.0], [8.0, 0.0]]), torch.tensor([0, 0, 0]))  # 3 more of class 0, L = 2
    protos, valid = m.prototypes()
    assert torch.allclose(protos, torch.tensor([[7.0, 0.0], [0.0, 5.0]]))  # newest two of class 0: 6 and 8
    assert m.queue_len.tolist() == [2, 1]


def test_daso_pl_distribution_window():
    m = _daso(daso_dist_period=2)
    assert m.current_pl_dist().tolist() == pytest.approx([0.5, 0.5])  # nothing seen: uniform
    m.pl_window += torch.tensor([3.0, 1.0])
    assert m.current_pl_dist().tolist() == pytest.approx([0.75, 0.25])  # no completed window yet: counts so far


# ---------------------------------------------------------------- EMAN teacher gives the pseudo-labels
def _teacher_case(kind: str):
    """A 2-class toy net (features = input), its teacher with a DIFFERENT head, and one batch."""
    torch.manual_seed(0)
    net = Net(_Toy(), 2)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        net.head.bias.zero_()
    teacher = Teacher(net, kind=kind, decay=0.999)
    with torch.no_grad():
        teacher.model.head.weight.copy_(torch.tensor([[0.0, 3.0], [3.0, 0.0]]))  # the teacher disagrees everywhere
    x = lambda rows: torch.tensor(rows).view(len(rows), 2, 1, 1)  # noqa: E731
    b = Batch(x_l=x([[1.0, 0.0]]), y_l=torch.tensor([0]), i_l=torch.tensor([0]),
              x_uw=x([[2.0, 0.0], [0.0, 1.5]]), x_us=x([[1.0, 0.5], [0.2, 1.0]]))
    return net, teacher, b


@pytest.mark.parametrize("method", ["fixmatch", "pseudolabel"])
def test_eman_teacher_predicts_the_pseudo_labels_ema_student_does(method):
    """FixMatch-EMAN (Cai et al. 2021): pseudo-labels from the EMAN teacher's weak view; EMA: from the student (USB)."""
    opts = METHODS[method].defaults(10, {})
    m = METHODS[method](num_classes=2, labeled_y=torch.tensor([0]), steps=10, tau=0.0, lambda_u=1.0,
                        options={**opts, "pl_rampup": 0.0} if method == "pseudolabel" else opts)
    for kind in ("ema", "eman"):
        net, teacher, b = _teacher_case(kind)
        loss, _ = m.loss(net, teacher, b, step=5)
        source = teacher.model if kind == "eman" else net
        pseudo = source(b.x_uw)[0].argmax(1)  # eman: [1, 0] (teacher), ema: [0, 1] (student)
        trained = b.x_us if method == "fixmatch" else b.x_uw  # Pseudo-Label trains on the weak view itself
        expected = F.cross_entropy(net(b.x_l)[0], b.y_l) + F.cross_entropy(net(trained)[0], pseudo)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6), kind
        with torch.no_grad():
            teacher.model.head.weight.neg_()  # perturb the teacher
        changed = m.loss(net, teacher, b, step=5)[0]
        if kind == "eman":
            assert abs(changed.item() - loss.item()) > 0.1  # the teacher now drives the loss
        else:
            assert changed.item() == pytest.approx(loss.item(), abs=1e-7)  # EMA: teacher is evaluation-only


def test_daso_with_eman_teacher_takes_pseudo_labels_and_features_from_it():
    m = _daso()
    net, teacher, b = _teacher_case("eman")
    m.loss(net, teacher, b, step=0)  # fills the queues with teacher features of x_l
    loss = m.loss(net, teacher, b, step=1)[0]
    with torch.no_grad():
        teacher.model.head.weight.neg_()
    assert abs(m.loss(net, teacher, b, step=2)[0].item() - loss.item()) > 0.1


# ---------------------------------------------------------------- teachers and distribution alignment
def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


@pytest.mark.parametrize("kind", ["ema", "eman"])
def test_teacher_update_ema_copies_buffers_eman_averages_them(kind):
    s = _student()
    t = Teacher(s, kind=kind, decay=0.9)
    old_w = t.model[0].weight.clone()
    old_rm = t.model[1].running_mean.clone()
    with torch.no_grad():
        s[0].weight.add_(1.0)
    s.train()
    s(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # moves the student's BN running stats, num_batches_tracked = 1
    t.update(s, step=1000)  # past the warm-up: m_t = min(0.9, 1001/1010) = 0.9
    assert torch.allclose(t.model[0].weight, 0.9 * old_w + 0.1 * s[0].weight)  # parameters: EMA in both
    if kind == "ema":
        assert torch.equal(t.model[1].running_mean, s[1].running_mean)  # buffers copied
    else:
        assert torch.allclose(t.model[1].running_mean, 0.9 * old_rm + 0.1 * s[1].running_mean)  # buffers EMA'd
        assert not torch.equal(t.model[1].running_mean, s[1].running_mean)
    assert int(t.model[1].num_batches_tracked) == 1  # integer counters copied in both
    t.train()
    assert t.model.training is (kind == "ema")  # the EMAN teacher stays in eval mode, always
    assert not any(p.requires_grad for p in t.parameters())


def test_teacher_decay_warms_up_like_tensorflow_num_updates():
    t = Teacher(_student(), kind="ema", decay=0.999)
    assert t.decay_at(0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert t.decay_at(90) == pytest.approx(0.91)
    assert t.decay_at(10_000) == pytest.approx(0.999)  # capped at m
    s = _student()
    t = Teacher(s, kind="ema", decay=0.999)
    old_w = t.model[0].weight.clone()
    with torch.no_grad():
        s[0].weight.add_(1.0)
    t.update(s, step=0)  # first update: the teacher moves 90 % of the way
    assert torch.allclose(t.model[0].weight, old_w + 0.9)


def test_distribution_alignment_by_hand():
    da = DistAlign(2, length=2)
    out1 = da(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))  # p_model = [0.7, 0.3]
    r = [0.8 / 0.7, 0.2 / 0.3]
    assert out1[0].tolist() == pytest.approx([r[0] / sum(r), r[1] / sum(r)])
    da(torch.tensor([[0.5, 0.5]]))  # p_model = mean([0.7, 0.3], [0.5, 0.5]) = [0.6, 0.4]
    out3 = da(torch.tensor([[0.3, 0.7]]))  # queue of 2: mean([0.5, 0.5], [0.3, 0.7]) = [0.4, 0.6]
    r = [0.3 / 0.4, 0.7 / 0.6]
    assert out3[0].tolist() == pytest.approx([r[0] / sum(r), r[1] / sum(r)])


# ---------------------------------------------------------------- views
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_views_differ_per_sample_and_stay_in_range(channels, size):
    torch.manual_seed(0)
    x = torch.rand(1, channels, size, size).repeat(64, 1, 1, 1)  # 64 copies of ONE image
    for view in (WeakView(size), StrongView(size)):
        y = view(x)
        assert y.shape == x.shape and float(y.min()) >= -1e-5 and float(y.max()) <= 1 + 1e-5
        distinct = len({row.numpy().tobytes() for row in y})
        assert distinct >= 10, f"{type(view).__name__} gave {distinct} distinct results for 64 copies"
        assert not torch.equal(y[0], y[1]) or not torch.equal(y[1], y[2])


# ---------------------------------------------------------------- pool helpers and registry
def test_stream_batch_covers_each_epoch_and_is_deterministic():
    got = np.concatenate([stream_batch(10, 4, k, seed=3, stream=0) for k in range(5)])  # 20 = two epochs of 10
    assert sorted(got[:10].tolist()) == list(range(10)) and sorted(got[10:].tolist()) == list(range(10))
    assert np.array_equal(stream_batch(10, 4, 3, seed=3, stream=0), got[12:16])


def test_shape_unlabeled_reversed_profile():
    y = np.array([0] * 100 + [1] * 50 + [2] * 20)
    idx = np.arange(len(y)) + 1000
    out = shape_unlabeled(idx, y, num_classes=3, profile="reversed", gamma=10.0, seed=0)
    counts = np.bincount(y[out - 1000], minlength=3)
    # rarest class first: ratios [1, 10^-0.5, 0.1] over classes [2, 1, 0]; n_max = min(20/1, 50/0.316, 100/0.1) = 20
    assert counts.tolist() == [2, 6, 20]
    same = shape_unlabeled(idx, y, num_classes=3, profile="same", gamma=None, seed=0)
    assert np.array_equal(same, idx)


def test_cosine_schedule():
    assert cosine_lr(0.03, 0, 100) == pytest.approx(0.03)
    assert cosine_lr(0.03, 100, 100) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))


def test_registry_and_unknown_names():
    assert set(METHODS) == {"fixmatch", "simmatch", "daso", "pseudolabel", "supervised"}
    from alssl.data import load_dataset
    from alssl.semi import semi_finetune

    d = load_dataset("digits")
    with pytest.raises(UserError, match='did you mean "fixmatch"'):
        semi_finetune(d, labeled_idx=np.arange(10), labeled_y=d.y_train[:10], out_dir="/nonexistent", method="fixmach")
