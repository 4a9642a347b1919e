"""Backbones: torchvision:NAME and timm:NAME at 64 px through every stage, --init weights, an export that plain
torchvision loads with strict=True and that predicts what `alssl predict` does; backbone.pt with missing or mistyped
fields is a UserError naming the file and the fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from alssl.backbones import (backbone_checkpoint, build_backbone, check_backbone_name, load_backbone_checkpoint,
                             load_init_weights)
from alssl.errors import UserError
from conftest import run_cli_inprocess as run_cli  # the same entry point, without a 3 s import per call
from photo_folder import make_photo_folder
from test_bad_inputs import assert_user_error

SIZES = [(64, 64), (100, 75), (80, 120)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bb")
    truth = make_photo_folder(root / "photos", 200, sizes=SIZES, corrupt=0)
    return {"root": root, "pool": root / "photos", "truth": truth}


def test_names_dims_and_suggestions():
    assert build_backbone("torchvision:resnet18", 3).dim == 512
    assert build_backbone("torchvision:convnext_tiny", 3).dim == 768
    assert build_backbone("torchvision:efficientnet_b0", 1)(torch.zeros(2, 1, 64, 64)).shape == (2, 1280)
    assert build_backbone("timm:resnet18", 1)(torch.zeros(2, 1, 64, 64)).shape == (2, 512)
    for bad, msg in [("torchvision:resnet19", 'did you mean "resnet18"'), ("timm:resnet18x", "unknown timm model"),
                     ("resnet19", 'did you mean "resnet18"')]:
        with pytest.raises(UserError, match=msg):
            check_backbone_name(bad)


def test_init_loads_torchvision_weights_and_refuses_another_architecture(tmp_path):
    src = torchvision.models.resnet18(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    bb = build_backbone("torchvision:resnet18", 3)
    info = load_init_weights(bb, "torchvision:resnet18", str(tmp_path / "r18.pth"))
    assert info["init_tensors"] == len(src.state_dict()) - 2  # the 1000-way fc is dropped
    assert torch.equal(bb.net.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    load_init_weights(build_backbone("torchvision:resnet18", 3), "torchvision:resnet18",
                      str(tmp_path / "r18.safetensors"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"does not fit backbone torchvision:resnet18: .*unexpected \(layer1\.2"):
        load_init_weights(build_backbone("torchvision:resnet18", 3), "torchvision:resnet18", str(tmp_path / "r34.pth"))
    with pytest.raises(UserError, match=r"of another shape \(conv1.weight: \(64, 3, 7, 7\) vs \(64, 1, 7, 7\)"):
        load_init_weights(build_backbone("timm:resnet18", 1), "timm:resnet18", str(tmp_path / "r18.pth"))


def test_init_hub_uses_torchvisions_cache_offline(tmp_path, monkeypatch):
    """`--init hub` goes through torchvision's own download, which finds the file in TORCH_HOME first: no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    src = torchvision.models.resnet18()
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "th" / "hub" / "checkpoints" / Path(url).name)
    bb = build_backbone("torchvision:resnet18", 3)
    load_init_weights(bb, "torchvision:resnet18", "hub")
    assert torch.equal(bb.net.conv1.weight, src.conv1.weight)
    with pytest.raises(UserError, match="torchvision:NAME or timm:NAME"):
        load_init_weights(build_backbone("cnn", 3), "cnn", "hub")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_every_stage_at_64px(folder, name, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", str(folder["pool"]), "--out", str(run), "--backbone", name, "--epochs", "1",
                "--batch-size", "64", "--image-size", "64",
                "--classes", ",".join(sorted(set(folder["truth"].values()))), "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backbone"] == name
    q = run_cli("query", str(run), "--budget", "30", "--strategy", "kcenter")
    assert q.returncode == 0, q.stderr
    rows = list(csv.DictReader(open(q.stdout.strip())))
    (tmp_path / "l.csv").write_text("id,label\n"
                                    + "".join(f'"{r_["id"]}",{folder["truth"][r_["id"]]}\n' for r_ in rows))
    assert run_cli("label", str(run), "--from", str(tmp_path / "l.csv")).returncode == 0
    probe = run_cli("probe", str(run))
    assert probe.returncode == 0 and "cv_accuracy" in json.loads(probe.stdout), probe.stderr
    assert run_cli("export", str(run), "--out", str(tmp_path / "m")).returncode == 0
    pred = run_cli("predict", str(run), "--data", str(folder["pool"] / "trip"), "--out", str(tmp_path / "p.csv"), "-q")
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    if name.startswith("torchvision:"):  # a plain torchvision model, loaded strictly, predicts what alssl predicts
        assert card["state_dict_of"] == "torchvision.models.resnet18(num_classes=10)"
        net = torchvision.models.resnet18(num_classes=10)
        net.load_state_dict(state, strict=True)
    else:
        import timm

        net = timm.create_model("resnet18", num_classes=10, in_chans=3)
        net.load_state_dict(state, strict=True)
    from alssl.data.images import load_image

    x = torch.from_numpy(np.stack([load_image(r_["path"], 64, 3) for r_ in rows])).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(card["mean"]).view(1, 3, 1, 1), torch.tensor(card["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = net.eval()((x - mean) / std).argmax(1).tolist()
    assert [card["classes"][k] for k in labels] == [r_["label"] for r_ in rows]


@pytest.mark.slow
def test_init_changes_the_features_and_bad_init_exits_2(folder, tmp_path):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "mine.pth")
    base = ["pretrain", "--data", str(folder["pool"]), "--backbone", "torchvision:resnet18", "--epochs", "0",
            "--image-size", "64", "-q"]
    assert run_cli(*base, "--out", str(tmp_path / "rand")).returncode == 0
    r = run_cli(*base, "--out", str(tmp_path / "init"), "--init", str(tmp_path / "mine.pth"))
    assert r.returncode == 0, r.stderr
    mine = torch.load(tmp_path / "mine.pth", weights_only=True)
    got = torch.load(tmp_path / "init" / "checkpoints" / "backbone.pt", weights_only=True)["state_dict"]
    rand = torch.load(tmp_path / "rand" / "checkpoints" / "backbone.pt", weights_only=True)["state_dict"]
    assert torch.equal(got["net.conv1.weight"], mine["conv1.weight"])  # --epochs 0 --init: the weights as given
    assert not torch.equal(got["net.conv1.weight"], rand["net.conv1.weight"])
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    bad = run_cli(*base, "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "r34.pth"))
    assert_user_error(bad, "does not fit backbone torchvision:resnet18", "unexpected")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- damaged backbone.pt
@pytest.fixture
def good(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save(backbone_checkpoint(build_backbone("cnn", 1), name="cnn", in_channels=1, epochs=0), path)
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda ck: ck.pop("in_channels"), "'in_channels' is missing"),
    (lambda ck: ck.pop("backbone"), "'backbone' is missing"),
    (lambda ck: ck.pop("state_dict"), "'state_dict' is missing"),
    (lambda ck: ck.update(in_channels="1"), "in_channels is '1'"),
    (lambda ck: ck.update(in_channels=True), "in_channels is True"),
    (lambda ck: ck.update(in_channels=0), "in_channels is 0"),
    (lambda ck: ck.update(backbone=7), "backbone is 7"),
    (lambda ck: ck.update(backbone="resnet99"), "backbone is 'resnet99'"),
    (lambda ck: ck.update(state_dict=[1, 2]), "state_dict"),
    (lambda ck: ck.update(state_dict={}), "state_dict"),
    (lambda ck: ck.update(state_dict={"w": 3}), "state_dict"),
    (lambda ck: ck.update(meta=[1]), "meta"),
])
def test_damaged_fields(good, edit, needle):
    ck = torch.load(good, weights_only=True)
    edit(ck)
    torch.save(ck, good)
    with pytest.raises(UserError) as exc:
        load_backbone_checkpoint(good)
    assert needle in str(exc.value) and str(good) in str(exc.value) and "rerun `alssl pretrain`" in str(exc.value)


def test_good_checkpoint_loads(good):
    model, ck = load_backbone_checkpoint(good, expect_channels=1)
    assert ck["backbone"] == "cnn" and not model.training
