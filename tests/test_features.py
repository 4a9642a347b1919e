"""Feature sets (alssl/feature_sets.py): pretrain scores its start and its result, warns when it made them worse; a run
holds several feature sets, the strongest on the labels is used by probe / query / export and recorded, a pinned one
wins; `--init hub` reads a pre-filled local cache offline and fails fast, naming the file, when the cache is empty."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alssl.backbones import build_backbone, load_init_weights
from alssl.errors import UserError
from alssl.feature_sets import cv_choice_accuracy, rankme
from alssl.pretraining import KNN_TEST_CV
from alssl.progress import Projection
from conftest import SHARED_DATA, run_cli_inprocess as run_cli
from photo_folder import make_photo_folder, make_test_folder
from test_bad_inputs import assert_user_error


def _json(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_folder_pretrain_scores_the_start_and_the_result(tmp_path):
    """An image folder with --test: kNN by folds within the test set, at the start and the end, and RankMe."""
    make_photo_folder(tmp_path / "photos", 120, sizes=[(32, 32), (40, 48)], corrupt=0)
    make_test_folder(tmp_path / "test", 60)
    s = _json(run_cli("pretrain", "--data", str(tmp_path / "photos"), "--test", str(tmp_path / "test"), "--out",
                      str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--image-size", "32", "-q"))
    assert s["knn_on"] == KNN_TEST_CV
    assert 0.0 <= s["knn_accuracy_init"] <= 1.0 and 0.0 <= s["knn_accuracy"] <= 1.0
    assert 1.0 <= s["rankme_init"] <= 128 and 1.0 <= s["rankme"] <= 128
    status = _json(run_cli("status", str(tmp_path / "run"), "--json"))
    assert status["stages"]["pretrain"]["knn_accuracy_init"] == s["knn_accuracy_init"]
    assert (tmp_path / "run" / "checkpoints" / "start.pt").exists()
    # one epoch at a huge learning rate makes the features worse than their start: said in one warning line
    r = run_cli("pretrain", "--data", str(tmp_path / "photos"), "--test", str(tmp_path / "test"), "--out",
                str(tmp_path / "worse"), "--epochs", "1", "--batch-size", "32", "--image-size", "32", "--lr", "3", "-q")
    worse = _json(r)
    assert worse["knn_accuracy"] < worse["knn_accuracy_init"] == s["knn_accuracy_init"]
    lines = [line for line in r.stderr.splitlines() if "below their start" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: the trained features score") and "--init" in lines[0]
    assert "below their start" not in run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "ok"),
                                              "--epochs", "0", "-q").stderr


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> Path:
    """A digits run whose stage-1 weights are all zero (useless features) and 60 labels; a random-init cnn is added."""
    root = tmp_path_factory.mktemp("two")
    zeros = {k: torch.zeros_like(v) for k, v in build_backbone("cnn", 1).state_dict().items()}
    torch.save(zeros, root / "zeros.pt")
    run = root / "run"
    _json(run_cli("pretrain", "--data", "digits", "--out", str(run), "--epochs", "0", "--init", str(root / "zeros.pt"),
                  "-q"))
    assert run_cli("query", str(run), "--budget", "60", "--strategy", "random").returncode == 0
    assert run_cli("label", str(run), "--oracle").returncode == 0
    added = _json(run_cli("features", str(run), "--add", "cnn", "--name", "rand"))
    assert added["added"] == "rand"
    return run


def test_probe_lists_both_and_the_better_is_used(two_sets, tmp_path):
    run = two_sets
    p = _json(run_cli("probe", str(run)))
    assert set(p["features"]) == {"start", "rand"}
    assert p["features"]["rand"]["test_accuracy"] > p["features"]["start"]["test_accuracy"] + 0.2
    assert p["features_in_use"] == "rand" and "cross-validated" in p["features_why"]
    assert p["accuracy"] == p["features"]["rand"]["test_accuracy"]
    q = run_cli("query", str(run), "--budget", "20", "--strategy", "margin")
    meta = json.loads((run / "queries" / "round-1.json").read_text())
    assert q.returncode == 0 and meta["features"] == "rand" and meta["feature_scores"]["rand"]["cv_accuracy"] > 0.5
    card = _json(run_cli("export", str(run), "--out", str(tmp_path / "m")))
    model = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["features"] == model["features"] == "rand" and "cross-validated" in model["features_why"]
    status = run_cli("status", str(run))
    assert "(in use: rand)" in status.stdout.replace("\n", " ")


def test_pinning_the_other_set(two_sets, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(two_sets, run)
    out = _json(run_cli("features", str(run), "--use", "start"))
    assert out["in_use"] == "start" and "pinned" in out["why"]
    assert _json(run_cli("probe", str(run)))["features_in_use"] == "start"
    _json(run_cli("export", str(run), "--out", str(tmp_path / "m")))
    assert json.loads((tmp_path / "m" / "model.json").read_text())["features"] == "start"
    assert _json(run_cli("features", str(run), "--use", "auto"))["in_use"] == "rand"
    assert_user_error(run_cli("features", str(run), "--use", "rnd"), 'unknown feature set "rnd"', 'did you mean "rand"')
    assert_user_error(run_cli("features", str(run), "--add", "cnn", "--name", "rand"), "already has a feature set")


def test_label_free_rule_and_cv_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32))
    assert rankme(x) > 25 and rankme(np.outer(rng.normal(size=500), rng.normal(size=32))) < 1.5
    y = np.repeat(np.arange(4), 5)  # 5 labels per class, separable features
    feats = np.eye(4)[y] * 5 + rng.normal(scale=0.1, size=(20, 4))
    assert cv_choice_accuracy(feats, y, num_classes=4) == 1.0
    assert cv_choice_accuracy(feats[:4], y[:4], num_classes=4) is None  # a single class: nothing to cross-validate


def _fill_hf_cache(cache: Path, hub_id: str, state: dict) -> None:
    """The layout `huggingface-cli download` leaves:
    models--ORG--NAME/{refs/main, snapshots/<rev>/model.safetensors}."""
    from safetensors.torch import save_file

    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_init_hub_offline_from_a_prefilled_cache(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"not in the local cache.*models--timm--test_vit\.r160_in1k/snapshots"):
        load_init_weights(build_backbone("timm:test_vit", 3), "timm:test_vit", "hub")
    with pytest.raises(UserError, match=r"th/hub/checkpoints/resnet18-f37072fd\.pth"):
        load_init_weights(build_backbone("torchvision:resnet18", 3), "torchvision:resnet18", "hub")
    assert time.perf_counter() - t0 < 5  # no network try, no retries
    import alssl.backbones

    monkeypatch.delenv("HF_HUB_OFFLINE")  # offline without saying so: the unreachable host is one quick line
    monkeypatch.setattr(alssl.backbones, "_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(UserError, match=r"huggingface\.co cannot be reached \(offline\?\); put the file at .*test_vit"):
        load_init_weights(build_backbone("timm:test_vit", 3), "timm:test_vit", "hub")
    with pytest.raises(UserError, match=r"download\.pytorch\.org cannot be reached"):
        load_init_weights(build_backbone("torchvision:resnet18", 3), "torchvision:resnet18", "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    src = timm.create_model("test_vit", pretrained=False)
    _fill_hf_cache(tmp_path / "hf", "timm/test_vit.r160_in1k", src.state_dict())
    bb = build_backbone("timm:test_vit", 3)
    load_init_weights(bb, "timm:test_vit", "hub")
    assert torch.equal(bb.net.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert bb(torch.zeros(2, 3, 32, 32)).shape == (2, bb.dim)  # a ViT at a size other than its default (160)


def test_features_add_timm_from_the_hub_cache_end_to_end(tmp_path, monkeypatch):
    """`alssl features RUN --add timm:NAME --init hub` on a 32 px pool, offline, from the pre-filled cache."""
    import timm

    with np.load(SHARED_DATA / "cifar10_10k.npz") as f:
        np.savez(tmp_path / "small.npz", x_train=f["x_train"][:200], y_train=f["y_train"][:200],
                 x_test=f["x_test"][:50], y_test=f["y_test"][:50], classes=f["classes"])
    run = tmp_path / "run"
    _json(run_cli("pretrain", "--data", str(tmp_path / "small.npz"), "--out", str(run), "--epochs", "0", "-q"))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert_user_error(run_cli("features", str(run), "--add", "timm:test_vit", "--init", "hub", env=env),
                      "not in the local cache", "models--timm--test_vit.r160_in1k")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before \
            and not (run / "feature_sets.json").exists()
    _fill_hf_cache(tmp_path / "hf", "timm/test_vit.r160_in1k", timm.create_model("test_vit").state_dict())
    out = _json(run_cli("features", str(run), "--add", "timm:test_vit", "--init", "hub", env=env))
    assert out["added"] == "timm:test_vit" and set(out["features"]) == {"start", "timm:test_vit"}
    assert out["features"]["timm:test_vit"]["origin"] == "added: timm:test_vit from hub"


def test_projection_line(monkeypatch, capsys):
    clock = iter(np.arange(0.0, 100.0, 10.0))  # 10 s a step
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    p = Projection("pretrain simsiam cnn", total=100, start=0, per_step=64)
    said = [p.step(k) for k in range(1, 6)]
    assert said[:3] == [None, None, None] and said[3] is not None and said[4] is None
    assert said[3] == "# pretrain simsiam cnn: 96 steps left ≈ 16 min at 6 img/s (measured over 3 steps)"
    assert capsys.readouterr().err.strip() == said[3]
    quick = Projection("semi", total=5, start=0)
    assert all(quick.step(k) is None for k in range(1, 5))  # projected under a minute: no line


def test_fine_tune_reports_its_probe_baseline_and_export_can_take_either(two_sets, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_sets, run)
    r = run_cli("semi-finetune", str(run), "--method", "fixmatch", "--steps", "3", "--batch-size", "8",
                "--mu", "2", "-q")
    res = _json(r)
    assert res["features"] == "rand" and 0 <= res["probe_accuracy"] <= 1  # started from the set in use; its baseline
    assert ("below the linear probe's" in r.stderr) == (res["accuracy"] < res["probe_accuracy"])
    card = _json(run_cli("export", str(run), "--out", str(tmp_path / "semi")))
    assert card["classifier"] == "semi:fixmatch" and card["probe_accuracy"] == res["probe_accuracy"]
    probe = _json(run_cli("export", str(run), "--out", str(tmp_path / "probe"), "--classifier", "probe"))
    assert probe["classifier"] == "linear-probe" and probe["accuracy"] == res["probe_accuracy"]
    assert_user_error(run_cli("export", str(run), "--out", str(tmp_path / "x"), "--classifier", "best"),
                      'unknown classifier "best"')


def test_minutes_budget_stops_resumably(two_sets, tmp_path):
    """--minutes: the loop stops when the budget is spent, keeps a checkpoint, and the rerun ends bit-identical."""
    import shutil

    stopped = run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "a"), "--epochs", "2", "--minutes",
                      "0.00001", "-q")
    assert _json(stopped)["stopped_at"] == 1 and "rerun the same command to go on" in stopped.stderr
    _json(run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "a"), "--epochs", "2", "-q"))
    _json(run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "b"), "--epochs", "2", "-q"))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "backbone.pt", weights_only=True)["state_dict"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    semi = ["semi-finetune", "--method", "fixmatch", "--steps", "4", "--batch-size", "8", "--mu", "2", "-q"]
    for r in ("c", "d"):
        shutil.copytree(two_sets, tmp_path / r)
    res = _json(run_cli(semi[0], str(tmp_path / "c"), *semi[1:], "--minutes", "0.00001"))
    assert res["stopped_at"] == 1 and res["accuracy"] is None \
            and not list((tmp_path / "c" / "semi").glob("*/result.json"))
    done = [_json(run_cli(semi[0], str(tmp_path / r), *semi[1:])) for r in "cd"]
    assert done[0] == done[1]
    assert_user_error(run_cli("pretrain", "--data", "digits", "--out", str(tmp_path / "e"), "--minutes", "0"),
                      "--minutes must be a finite number > 0")
