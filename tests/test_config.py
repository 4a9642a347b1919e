"""Pipeline configs: every value is type-, range- and name-checked by its section before anything is written."""

from __future__ import annotations

import pytest

from alssl import names
from alssl.config import CurveSection, DataSection, PretrainSection, load_config
from alssl.errors import UserError

BAD = {
    '[pretrain]\nlr = "fast"': "pretrain.lr must be a positive number",
    "[pretrain]\nlr = nan": "pretrain.lr",
    "[pretrain]\nlr = inf": "pretrain.lr",
    "[pretrain]\nlr = 0": "pretrain.lr",
    "[curve]\nsemi = 5": "curve.semi",
    '[curve]\nsemi = "fixmach"': 'did you mean "fixmatch"',
    "[curve]\nstrategies = [1, 2]": "curve.strategies must be a list of strings",
    '[curve]\nstrategies = ["kcentre"]': 'unknown strategy "kcentre" (did you mean "kcenter"?)',
    "[curve]\nstrategies = []": "curve.strategies must not be empty",
    '[curve]\nstrategies = "random"': "curve.strategies must be a list",
    '[curve]\nprobes = ["linear", "linear"]': "twice",
    "[pretrain]\nfrom_run = 5": "pretrain.from_run",
    '[pretrain]\nfrom_run = ""': "pretrain.from_run must not be empty",
    "[pretrain]\nbatch_size = 0": "pretrain.batch_size must be an integer >= 2",
    "[pretrain]\nbatch_size = 64.0": "pretrain.batch_size",
    "[pretrain]\nepochs = -3": "pretrain.epochs must be an integer >= 0",
    "[pretrain]\neman = 1": "pretrain.eman must be true or false",
    '[pretrain]\nmethod = "simsaim"': 'did you mean "simsiam"',
    '[pretrain]\nbackbone = "resnet19"': 'did you mean "resnet18"',
    "[pretrain]\nseed = -1": "pretrain.seed",
    "[pretrain]\nseed = 4294967296": "pretrain.seed",
    '[curve]\ndelta = "wide"': "curve.delta",
    "[curve]\ndelta = -0.5": "curve.delta",
    "[curve]\nseeds = 0": "curve.seeds must be an integer >= 1",
    "[curve]\nseeds = true": "curve.seeds",
    "[curve]\njobs = 0": "curve.jobs",
    "[curve]\nsemi_steps = 0": "curve.semi_steps",
    "[curve]\nsemi_mu = 0": "curve.semi_mu",
    "[curve]\nbudgets = [true]": "curve.budgets",
    "[curve]\nbudgets = [0]": "curve.budgets",
    "[curve]\nbudgets = []": "curve.budgets must not be empty",
    "[data]\nspec = 3": "data.spec must be a string",
    "[data]\nimbalance = 0.5": "data.imbalance",
    '[data]\nimbalance = "high"': "data.imbalance",
    "[output]\ndir = 3": "output.dir",
    "[output]\ntitle = [1]": "output.title",
    "[pretrain]\nmomentum = 1.5": "pretrain.momentum must be a number in [0, 1)",
    '[pretrain]\nmomentum_schedule = "linear"': 'unknown momentum schedule "linear"',
    "[pretrain]\nqueue_size = 0": "pretrain.queue_size must be an integer >= 1",
    "[pretrain]\ntemperature = 0": "pretrain.temperature must be a positive number",
    "[pretrain]\nhflip = 1": "pretrain.hflip must be true or false",
    '[pretrain]\ninit = ""': "pretrain.init must not be empty",
}


@pytest.mark.parametrize("text", sorted(BAD))
def test_bad_value_names_key_and_fix(tmp_path, text):
    cfg = tmp_path / "p.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(UserError) as exc:
        load_config(cfg)
    msg = str(exc.value)
    assert BAD[text] in msg and str(cfg) in msg and ("fix it" in msg or "choose from" in msg or "list each" in msg), msg
    assert list(tmp_path.iterdir()) == [cfg]


def test_good_values_pass_and_ints_count_as_floats(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[data]\nspec = "digits"\nimbalance = 10\n[pretrain]\nlr = 1\nepochs = 0\n'
                   '[curve]\nbudgets = ["1%", 20]\nsemi = "daso"\ndelta = 0.3\n')
    c = load_config(cfg)
    assert c.data.imbalance == 10 and c.pretrain.lr == 1 and c.curve.budgets == ["1%", 20] and c.curve.semi == "daso"


def test_sections_check_themselves_when_built_in_code():
    with pytest.raises(UserError, match="data.seed"):
        DataSection(seed=-1)
    with pytest.raises(UserError, match="pretrain.epochs"):
        PretrainSection(epochs=-1)
    with pytest.raises(UserError, match="curve.seeds"):
        CurveSection(seeds=0)


def test_config_needs_no_torch():
    import subprocess
    import sys

    code = "import sys; import alssl.config; print(any(m == 'torch' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_names_match_the_registries():
    from alssl.acquisition import STRATEGIES
    from alssl.backbones import BACKBONES
    from alssl.pretraining import METHODS as PRETRAIN
    from alssl.probes import PROBES
    from alssl.semi import METHODS as SEMI

    assert set(names.STRATEGIES) == set(STRATEGIES) and set(names.PROBES) == set(PROBES)
    assert set(names.PRETRAIN_METHODS) == set(PRETRAIN) and set(names.BACKBONES) == set(BACKBONES)
    assert set(names.SEMI_METHODS) == set(SEMI)


def test_the_pretrain_section_is_the_cli_and_api_config(tmp_path):
    """[pretrain] takes every key `alssl pretrain` / `alssl.pretrain` take and becomes the same PretrainArgs; a
    curve stores the seven keys it always stored plus those set away from their defaults (old curves resume)."""
    from dataclasses import fields

    from alssl.config import PretrainArgs

    cfg = tmp_path / "p.toml"
    cfg.write_text('[pretrain]\nmethod = "byol"\nmomentum_schedule = "cosine"\ntemperature = 0.5\ninit = "w.pt"\n')
    section = load_config(cfg).pretrain
    assert {f.name for f in fields(PretrainArgs)} <= {f.name for f in fields(PretrainSection)}
    args = section.args(tmp_path)
    assert args == PretrainArgs(method="byol", momentum_schedule="cosine", temperature=0.5,
                                init=str(tmp_path / "w.pt"))
    assert section.curve_args(tmp_path) == {
        "method": "byol", "backbone": "cnn", "epochs": 20, "batch_size": 256, "lr": None, "eman": False, "seed": 0,
        "momentum_schedule": "cosine", "temperature": 0.5, "init": str(tmp_path / "w.pt")}
    assert PretrainSection().curve_args(tmp_path) == {"method": "simsiam", "backbone": "cnn", "epochs": 20,
                                                      "batch_size": 256, "lr": None, "eman": False, "seed": 0}

