"""The Python API (alssl/api.py, docs/python.md): the notebook walkthrough through `alssl.*` only, and the run dir it
leaves equal to the one the CLI leaves for the same seeds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import run_cli_inprocess

PRETRAIN = dict(method="simsiam", backbone="cnn", epochs=1, batch_size=128, knn_every=0, seed=0)


def _comparable_state(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    for r in state["rounds"]:
        r.pop("source")
    for timing in ("seconds", "images_per_s"):
        state["stages"]["pretrain"].pop(timing, None)
    state["stages"].get("features", {}).pop("line", None)  # (holds nothing path-like; times are not in it)
    state["config"]["data"].pop("spec", None)
    return state


def test_the_notebook_walkthrough_equals_the_cli_path(tmp_path):
    import alssl
    from alssl.errors import UserError

    run = tmp_path / "api_run"
    summary = alssl.pretrain("digits", run, **PRETRAIN)
    assert summary["run"] == str(run) and summary["epochs"] == 1
    q = alssl.query(run, budget=30, strategy="random", seed=0)
    assert q["round"] == 0 and len(q["indices"]) == 30 and not q["reshown"]
    truth = alssl.dataset(run).y_train  # a benchmark: its ground truth plays the person
    answers = {i: str(int(truth[i])) for i in q["indices"]}  # a person's answers, as a dict (class ids)
    res = alssl.label(run, answers)
    assert res == {"imported": 30, "skipped": 0, "labeled": 30, "rounds": 1}
    with pytest.raises(UserError, match="no open query"):
        alssl.label(run, answers)  # the round is closed: nothing left to label
    probe = alssl.probe(run)
    assert probe["n_labeled"] == 30 and 0 <= probe["accuracy"] <= 1
    card = alssl.export(run, tmp_path / "model")
    assert card["classifier"] == "linear-probe" and abs(card["accuracy"] - probe["accuracy"]) < 1e-3
    pred = alssl.predict(run, pool=True, out=tmp_path / "pool.csv")
    assert pred["n"] == alssl.status(run)["pool"] - 30
    st = alssl.status(run)
    assert st["labeled"] == 30 and st["open_query"] is None and st["stages"]["pretrain"]["method"] == "simsiam"

    # the same steps through the CLI, the labels from the query CSV with a label column
    cli_run = tmp_path / "cli_run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PRETRAIN.items()]
    for args in (["pretrain", "--data", "digits", "--out", str(cli_run), *flags],
                 ["query", str(cli_run), "--budget", "30", "--strategy", "random", "--seed", "0"]):
        r = run_cli_inprocess(*args)
        assert r.returncode == 0, r.stderr
    with open(cli_run / "queries" / "round-0.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label"])
        w.writerows([[row["index"], answers[int(row["index"])]] for row in rows])
    for args in (["label", str(cli_run), "--from", str(tmp_path / "labels.csv")], ["probe", str(cli_run)],
                 ["export", str(cli_run), "--out", str(tmp_path / "cli_model")],
                 ["predict", str(cli_run), "--pool", "--out", str(tmp_path / "cli_pool.csv")]):
        r = run_cli_inprocess(*args)
        assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == pred | {"predictions": str(tmp_path / "cli_pool.csv")}

    assert _comparable_state(run) == _comparable_state(cli_run)
    for name in ("backbone.pt", "start.pt"):
        a = torch.load(run / "checkpoints" / name, weights_only=True)
        b = torch.load(cli_run / "checkpoints" / name, weights_only=True)
        sa, sb = a.pop("state_dict"), b.pop("state_dict")
        assert a == b and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (run / "queries" / "round-0.csv").read_bytes() == (cli_run / "queries" / "round-0.csv").read_bytes()
    assert sorted(p.name for p in (run / "features").iterdir()) \
            == sorted(p.name for p in (cli_run / "features").iterdir())
    assert (tmp_path / "pool.csv").read_bytes() == (tmp_path / "cli_pool.csv").read_bytes()
    card_a = json.loads((tmp_path / "model" / "model.json").read_text())
    card_b = json.loads((tmp_path / "cli_model" / "model.json").read_text())
    assert {k: v for k, v in card_a.items() if k != "run"} == {k: v for k, v in card_b.items() if k != "run"}


def test_import_alssl_loads_no_torch():
    code = ("import sys, alssl; assert callable(alssl.pretrain) and callable(alssl.label); "
            "print(sorted(m for m in ('torch', 'numpy', 'lightly', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_words():
    from alssl.api import python_words

    msg = "--init and --from-scratch both replace it; e.g. --lr 0.03 or `alssl query RUN --budget 2%` (--other 1)"
    assert python_words(msg, {"init", "from_scratch", "lr", "budget"}) == (
        "init and from_scratch both replace it; e.g. lr=0.03 or `alssl query RUN --budget 2%` (--other 1)")


def test_api_errors_are_user_errors_and_leave_no_run(tmp_path):
    import alssl
    from alssl.errors import UserError

    with pytest.raises(UserError, match="unknown method"):
        alssl.pretrain("digits", tmp_path / "r", method="simclr")
    with pytest.raises(UserError, match=r"^lr must be a finite number > 0, got -1\.0; e\.g\. lr=0\.05$") as exc:
        alssl.pretrain("digits", tmp_path / "r", lr=-1.0)  # the keyword, not the CLI's --lr
    assert "--" not in str(exc.value)
    with pytest.raises(UserError, match=r"batch_size=30 does not split over 4 devices"):
        alssl.semi_finetune(tmp_path / "r", batch_size=30, devices=4)
    with pytest.raises(UserError, match=r"^--lr must be a finite number > 0"):  # the CLI keeps its flags
        with alssl.api.called_from_cli():
            alssl.pretrain("digits", tmp_path / "r", lr=-1.0)
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="does not exist"):
        alssl.status(tmp_path / "nope")
