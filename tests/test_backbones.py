"""backbone.pt: a checkpoint with missing or mistyped fields is a UserError naming the file and the fix."""

from __future__ import annotations

import pytest
import torch

from alssl.backbones import backbone_checkpoint, build_backbone, load_backbone_checkpoint
from alssl.errors import UserError


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
