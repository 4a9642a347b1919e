"""The bad-input battery: every case runs the CLI's entry point (`alssl.cli.main`, what the console script calls) and
must exit 2 with exactly one `error:` line on stderr that names the fix, print no traceback, and leave the run dir
byte-identical.

The cases run `main` in-process (`conftest.run_cli_inprocess`): a subprocess per case spent ~4 s importing torch, most
of this file's time. `test_real_console` runs a sample of them through a real `python -m alssl` subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli as run_subprocess
from conftest import run_cli_inprocess as run_cli
from conftest import copy_of, snapshot


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A digits run at random init with one labeled round and round 1's query left open."""
    d = tmp_path_factory.mktemp("base") / "run"
    for args in (
        ["pretrain", "--data", "digits", "--out", str(d), "--epochs", "0", "-q"],
        ["query", str(d), "--budget", "2%", "--strategy", "random"],
        ["label", str(d), "--oracle"],
        ["query", str(d), "--budget", "5", "--strategy", "random"],
    ):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    return d


@pytest.fixture
def run_dir(base_run, tmp_path) -> Path:
    return copy_of(base_run, tmp_path / "run")


def assert_user_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def check(run_dir: Path, args: list[str], *needles: str, env: dict | None = None) -> None:
    before = snapshot(run_dir)
    assert_user_error(run_cli(*args, env=env), *needles)
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------- budgets (query on a run with no open query)
@pytest.fixture(scope="module")
def base_closed_run(base_run, tmp_path_factory) -> Path:
    """`base_run` with its open query labeled too: no query is open."""
    d = copy_of(base_run, tmp_path_factory.mktemp("closed") / "run")
    assert run_cli("label", str(d), "--oracle").returncode == 0
    return d


@pytest.fixture
def closed_run(base_closed_run, tmp_path) -> Path:
    return copy_of(base_closed_run, tmp_path / "closed")


@pytest.mark.parametrize(
    "budget, needle",
    [("abc", "not a count or a percentage"), ("0", "at least 1"), ("-5", "not a count"), ("150%", "(0, 100]"),
     ("2.5.1%", "not a count"), ("0%", "(0, 100]"), ("100000", "unlabeled samples are left"),
     ("100%", "unlabeled samples are left")],
)
def test_bad_budget(closed_run, budget, needle):
    check(closed_run, ["query", str(closed_run), "--budget", budget], needle)


def test_unknown_strategy_suggests(closed_run):
    check(closed_run, ["query", str(closed_run), "--budget", "5", "--strategy", "kcentre"], 'did you mean "kcenter"')


def test_model_strategy_on_empty_pool(tmp_path):
    d = tmp_path / "fresh"
    assert run_cli("pretrain", "--data", "digits", "--out", str(d), "--epochs", "0", "-q").returncode == 0
    check(d, ["query", str(d), "--budget", "5", "--strategy", "entropy"], "--strategy typiclust")


def test_new_query_while_one_is_open(run_dir):
    check(run_dir, ["query", str(run_dir), "--budget", "7", "--strategy", "random"], "still open", "alssl label")


def test_unknown_probe(run_dir):
    check(run_dir, ["probe", str(run_dir), "--probe", "svn"], 'did you mean "svm"')


def test_unknown_semi_method(run_dir):
    check(run_dir, ["semi-finetune", str(run_dir), "--method", "fixmach"], 'did you mean "fixmatch"')


def test_unknown_pretrain_method_and_backbone(tmp_path):
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--method", "simsaim"],
          'did you mean "simsiam"')
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--backbone", "resnet19"],
          'did you mean "resnet18"')


def test_bad_pool_format(tmp_path):
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--pool-format", "jpg"],
          'did you mean "jpeg"', "auto, jpeg, raw")
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--pool-format", "jpeg"],
          "--pool-format applies to an unlabeled image folder")


def test_pretrain_rerun_with_other_arguments(run_dir):
    check(run_dir, ["pretrain", "--data", "digits", "--out", str(run_dir), "--epochs", "3"], "same arguments")


# ---------------------------------------------------------------- data SPECs
def _npz(path: Path, **arrays) -> str:
    base = dict(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 2,
                x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.arange(4) % 2)
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


DATA_CASES = {
    "missing": (lambda d: str(d / "nope.npz"), "no such file"),
    "corrupt": (lambda d: (d / "bad.npz").write_bytes(b"PK\x03\x04garbage") and str(d / "bad.npz"), "npz"),
    "wrong-keys": (lambda d: _npz(d / "k.npz", x_test=None), "x_test"),
    "nan-pixels": (lambda d: _npz(d / "n.npz", x_train=np.full((20, 8, 8), np.nan)), "uint8"),
    "negative-labels": (lambda d: _npz(d / "neg.npz", y_train=np.arange(20) % 2 - 1), "label"),
    "empty-split": (lambda d: _npz(d / "e.npz", x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)),
                    "empty"),
    "length-mismatch": (lambda d: _npz(d / "m.npz", y_train=np.arange(19) % 2), "19"),
    "bad-spec": (lambda d: "mnist", "digits"),
    "missing-cifar10": (lambda d: "cifar10:" + str(d / "nothing"), "no such directory"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(tmp_path, case):
    make, needle = DATA_CASES[case]
    spec = make(tmp_path)
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    assert_user_error(run_cli("pretrain", "--data", spec, "--out", str(out), "--epochs", "0"), needle)
    assert snapshot(tmp_path) == before and not out.exists()


def test_mixed_image_sizes(tmp_path):
    for split, size in (("train", 8), ("train", 9), ("test", 8)):
        d = tmp_path / "imgs" / split / "a"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((size, size), np.uint8)).save(d / f"{size}.png")
    check(tmp_path, ["pretrain", "--data", str(tmp_path / "imgs") + "/", "--out", str(tmp_path / "r"), "--epochs", "0"],
          "size")


# ---------------------------------------------------------------- label CSVs
@pytest.mark.parametrize(
    "text, needle",
    [("index,label\n{0},zebra\n", "unknown class 'zebra'"),
     ("index,label\n{0},1\n{0},1\n", "duplicate row"),
     ("{0},1\n", "header"),
     ("index,label\n{0},1\n", "queried images have no label")],
)
def test_bad_label_csv(run_dir, tmp_path, text, needle):
    from alssl.runs import Run

    first = Run.open(run_dir).state["open_query"]["indices"][0]
    f = tmp_path / "labels.csv"
    f.write_text(text.format(first))
    check(run_dir, ["label", str(run_dir), "--from", str(f)], needle)


def test_label_without_open_query(closed_run, tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("index,label\n1,1\n")
    check(closed_run, ["label", str(closed_run), "--from", str(f)], "no open query")


def test_label_needs_exactly_one_source(run_dir):
    check(run_dir, ["label", str(run_dir)], "--from FILE.csv or --oracle")


# ---------------------------------------------------------------- configs
def test_config_typo_suggests(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[data]\nspec = "digits"\n[curve]\nstrategis = ["random"]\n')
    check(tmp_path, ["run", str(cfg), "--out", str(tmp_path / "o")], "strategis", 'did you mean "strategies"')


def test_config_unknown_section(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[pretrian]\nepochs = 1\n')
    check(tmp_path, ["run", str(cfg), "--out", str(tmp_path / "o")], 'did you mean "pretrain"')


# ---------------------------------------------------------------- run dirs and checkpoints
def test_truncated_checkpoint(run_dir):
    ck = run_dir / "checkpoints" / "backbone.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    shutil.rmtree(run_dir / "features", ignore_errors=True)
    check(run_dir, ["probe", str(run_dir)], "cannot be loaded safely", "rerun")


def test_checkpoint_of_another_backbone(run_dir):
    from alssl.backbones import backbone_checkpoint, build_backbone

    ckpt = backbone_checkpoint(build_backbone("wrn28_2", 1), name="cnn", in_channels=1)
    torch.save(ckpt, run_dir / "checkpoints" / "backbone.pt")
    shutil.rmtree(run_dir / "features", ignore_errors=True)
    check(run_dir, ["probe", str(run_dir)], "do not fit backbone")


def test_malicious_checkpoint_runs_no_code(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, run_dir / "checkpoints" / "backbone.pt")
    shutil.rmtree(run_dir / "features", ignore_errors=True)
    check(run_dir, ["probe", str(run_dir)], "cannot be loaded safely")
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_newer_run_format(run_dir):
    import json

    s = json.loads((run_dir / "state.json").read_text())
    s["format_version"] = 99
    (run_dir / "state.json").write_text(json.dumps(s))
    check(run_dir, ["status", str(run_dir)], "newer alssl", "upgrade")


def test_not_a_run_dir(tmp_path):
    check(tmp_path, ["probe", str(tmp_path)], "not an alssl run dir")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(blocker / "run"), "--epochs", "0"], "writable")


def test_disk_full_changes_nothing(run_dir):
    check(run_dir, ["label", str(run_dir), "--oracle"], "free disk space", env={"ALSSL_FAULT_DISK_FULL": "1"})


def test_usage_error_is_one_line(run_dir):
    check(run_dir, ["query", str(run_dir), "--budget", "5", "--seed", "abc"], "--seed")


@pytest.mark.parametrize("args, needle", [(["--budget", "abc"], "not a count"), (["--budget", "150%"], "(0, 100]")])
def test_real_console(closed_run, args, needle):
    before = snapshot(closed_run)
    assert_user_error(run_subprocess("query", str(closed_run), *args), needle)
    assert snapshot(closed_run) == before


def test_unknown_svm_kernel(closed_run):
    check(closed_run, ["query", str(closed_run), "--budget", "5", "--strategy", "svm-margin", "--kernel", "poly"],
          "kernel")


def test_eman_needs_a_momentum_teacher(tmp_path):
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--eman", "--epochs", "1"],
          "--method moco")


def test_unsupported_precision_on_cpu(tmp_path):
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--accelerator", "cpu",
                     "--precision", "64-bad"], "--precision")


def test_unknown_semi_option_suggests(run_dir):
    check(run_dir, ["semi-finetune", str(run_dir), "--method", "fixmatch", "--option", "bn_bach=split"],
          'did you mean "bn_batch"')
    check(run_dir, ["semi-finetune", str(run_dir), "--option", "novalue"], "KEY=VALUE")


# ================================================================ issue 17: damaged run-dir files, configs, grids
# (runs.py schema / JSONL reader / lock, backbones.py, pretrain.py, semi/trainer.py, config.py, curve.py, plots.py)
import json  # noqa: E402


def _edit_state(run_dir: Path, edit) -> None:
    s = json.loads((run_dir / "state.json").read_text())
    edit(s)
    (run_dir / "state.json").write_text(json.dumps(s))


def test_torn_metrics_line_is_skipped_and_reported(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"stage": "probe", "rou')  # a crash mid-append
    r = run_cli("status", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable line" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["last_metrics"]["stage"] == "pretrain"
    from alssl.runs import Run

    Run.open(run_dir).log_metrics({"stage": "probe", "round": 1})  # the next record (as `alssl probe` logs it) ...
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # ... on a new line
    assert lines[-2] == '{"stage": "probe", "rou' and json.loads(lines[-1]) == {"stage": "probe", "round": 1}


STATE_CASES = {  # hand-edited or damaged state.json (issue 17), through status and probe
    "format-version-1e999": ("status", lambda s: s.update(format_version=float("inf")), "format_version"),
    "labeled-round-all": ("probe", lambda s: s.update(labeled_round="all"), "labeled_round"),
    "rounds-null": ("status", lambda s: s.update(rounds=None), "rounds"),
    "config-without-data": ("probe", lambda s: s["config"].pop("data"), "config.data.spec"),
    "open-query-out-of-range": ("status", lambda s: s["open_query"].update(indices=[10**6]), "open_query.indices"),
    "round-missing-keys": ("status", lambda s: s["rounds"][0].pop("source"), "'source'"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_damaged_state_json(run_dir, case):
    cmd, edit, needle = STATE_CASES[case]
    _edit_state(run_dir, edit)
    check(run_dir, [cmd, str(run_dir)], needle, "state.json is damaged", "start a new run")


def test_state_json_is_a_directory(run_dir):
    (run_dir / "state.json").unlink()
    (run_dir / "state.json").mkdir()
    check(run_dir, ["status", str(run_dir)], "is not a file")


def test_lock_is_a_directory(run_dir):
    (run_dir / ".lock").mkdir()
    check(run_dir, ["label", str(run_dir), "--oracle"], ".lock is a directory", "rmdir")
    assert (run_dir / ".lock").is_dir()


def test_backbone_checkpoint_without_in_channels(run_dir):  # other damage: tests/test_backbones.py
    path = run_dir / "checkpoints" / "backbone.pt"
    ck = torch.load(path, weights_only=True)
    del ck["in_channels"]
    torch.save(ck, path)
    shutil.rmtree(run_dir / "features", ignore_errors=True)
    check(run_dir, ["probe", str(run_dir)], "'in_channels' is missing", "rerun `alssl pretrain`")


PRETRAIN_AGAIN = ["--data", "digits", "--epochs", "0", "-q"]  # the base run's own pretrain arguments


@pytest.mark.parametrize("content, needle", [([1, 2], "not an alssl pretraining state"),
                                             ("drop-model", "'model' is missing")])
def test_damaged_pretrain_state(run_dir, content, needle):
    path = run_dir / "checkpoints" / "pretrain-state.pt"
    if content == "drop-model":
        content = torch.load(path, weights_only=True)
        del content["model"]
    torch.save(content, path)
    check(run_dir, ["pretrain", "--out", str(run_dir), *PRETRAIN_AGAIN], needle, "pretrain-state.pt is damaged")


def _rgb_pool(path: Path) -> str:  # as many images as digits' pool, but 3 channels
    return _npz(path, x_train=np.full((1437, 8, 8, 3), 7, np.uint8), y_train=np.arange(1437) % 2,
                x_test=np.zeros((4, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("case", ["smaller-pool", "other-channels"])  # weights that do not fit: test_pretrain.py
def test_resume_pretrain_with_other_data(run_dir, tmp_path, case):
    spec = _npz(tmp_path / "small.npz") if case == "smaller-pool" else _rgb_pool(tmp_path / "rgb.npz")
    # refused by the CLI's same-arguments check (another --data); the data check inside pretrain() (same spec, data
    # changed on disk) is tests/test_pretrain.py's
    check(run_dir, ["pretrain", "--out", str(run_dir), *PRETRAIN_AGAIN[2:], "--data", spec],
          "was made with --data digits", "new --out")


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_semi_seed_out_of_range(run_dir, seed):
    check(run_dir, ["semi-finetune", str(run_dir), "--steps", "2", "--seed", seed], "seed must be an integer in 0..")


def test_semi_bool_option_takes_only_true_or_false(run_dir):  # other option types: tests/test_semi.py
    check(run_dir, ["semi-finetune", str(run_dir), "--steps", "2", "--option", "hflip=maybe"],
          "hflip must be true or false")


TOML_CASES = {  # every value type-checked before `alssl run` writes anything (the full table: tests/test_config.py)
    "lr-string": ('[pretrain]\nlr = "fast"\n', "pretrain.lr"),
    "semi-int": ("[curve]\nsemi = 5\n", "curve.semi"),
    "strategies-ints": ("[curve]\nstrategies = [1, 2]\n", "curve.strategies"),
    "from-run-int": ("[pretrain]\nfrom_run = 5\n", "pretrain.from_run"),
    "batch-size-0": ("[pretrain]\nbatch_size = 0\n", "pretrain.batch_size must be an integer >= 2"),
    "epochs-negative": ("[pretrain]\nepochs = -3\n", "pretrain.epochs must be an integer >= 0"),
    "delta-string": ('[curve]\ndelta = "wide"\n', "curve.delta"),
}


@pytest.mark.parametrize("case", sorted(TOML_CASES))
def test_config_value_types(tmp_path, case):
    text, needle = TOML_CASES[case]
    cfg = tmp_path / "p.toml"
    cfg.write_text('[data]\nspec = "digits"\n' + text)
    check(tmp_path, ["run", str(cfg), "--out", str(tmp_path / "o"), "-q"], needle, "p.toml")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- curve grids
CURVE = ["curve", "--data", "digits", "--strategies", "random", "--budgets", "1%,2%", "--seeds", "1", "--epochs", "0",
         "-q"]


@pytest.fixture(scope="module")
def base_grid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid") / "g"
    r = run_cli(*CURVE, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def grid_dir(base_grid, tmp_path) -> Path:
    return copy_of(base_grid, tmp_path / "g")


CELL = "cells/linear__random__s0.json"
GRID_CASES = {
    "grid-not-json": ("grid.json", lambda t: t[: len(t) // 2], "grid.json is damaged"),
    "cell-not-json": (CELL, lambda t: "\x00garbage", "linear__random__s0.json is damaged"),
    "cell-row-lacks-columns": (CELL, lambda t: json.dumps({**json.loads(t), "rows": [{"round": 0}]}),
                               "lacks the columns"),
}  # more cell / curve.csv damage: tests/test_curve.py


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_damaged_grid_dir_changes_nothing(grid_dir, case):
    """Refused before pretraining: pretrain-state.pt, backbone.pt and curve.csv stay byte-identical."""
    name, edit, needle = GRID_CASES[case]
    f = grid_dir / name
    f.write_text(edit(f.read_text()))
    check(grid_dir, [*CURVE, "--out", str(grid_dir)], needle)


def test_plot_only_on_malformed_curve_csv(grid_dir):
    (grid_dir / "curve.csv").write_text("arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\n"
                                        "probe,linear,random,0,0,0.01,1.4,high\n")
    check(grid_dir, ["curve", "--plot-only", str(grid_dir)], "line 2", "rebuilt from cells/")


def test_curve_from_a_run_with_a_damaged_backbone(run_dir, tmp_path):
    path = run_dir / "checkpoints" / "backbone.pt"
    ck = torch.load(path, weights_only=True)
    ck["in_channels"] = 3
    torch.save(ck, path)
    out = tmp_path / "grid"
    check(run_dir, [*CURVE, "--from", str(run_dir), "--out", str(out)], "3-channel")
    assert not out.exists()


# ---------------------------------------------------------------- labeling: label-ui, tasks, Label Studio exports
def test_label_ui_and_tasks_need_an_open_query(closed_run, tmp_path):
    check(closed_run, ["label-ui", str(closed_run), "--port", "0", "--no-browser"], "no open query", "alssl query")
    check(closed_run, ["tasks", str(closed_run), "--out", str(tmp_path / "t")], "no open query")


def test_label_ui_port_taken_or_out_of_range(run_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        check(run_dir, ["label-ui", str(run_dir), "--port", port, "--no-browser"], "cannot listen", "--port 0")
    check(run_dir, ["label-ui", str(run_dir), "--port", "70000", "--no-browser"], "--port")


def test_label_ui_classes_cannot_change(run_dir):
    check(run_dir, ["label-ui", str(run_dir), "--port", "0", "--no-browser", "--classes", "cat,dog"],
          "already has classes")


def test_tasks_bad_format_and_document_root(run_dir, tmp_path):
    check(run_dir, ["tasks", str(run_dir), "--out", str(tmp_path / "t"), "--format", "labelstudio"],
          'did you mean "label-studio"')
    check(run_dir, ["tasks", str(run_dir), "--out", str(tmp_path / "t"),
                    "--document-root", str(tmp_path / "elsewhere")], "--document-root", "folder above")


def test_malformed_label_studio_export(run_dir, tmp_path):
    """Unknown class, a task outside the open query, a duplicate task: exit 2, each task listed, nothing imported."""
    import json

    from alssl.runs import Run

    idx = Run.open(run_dir).state["open_query"]["indices"]
    outside = next(i for i in range(100) if i not in idx and Run.open(run_dir).state["labeled_round"][i] < 0)

    def task(tid, index, choice):
        return {"id": tid, "data": {"image": f"/data/local-files/?d=images/train/{index}.png", "alssl_index": index},
                "annotations": [{"id": tid, "was_cancelled": False, "result": [
                    {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]}]}

    tasks = [task(n + 1, i, "3") for n, i in enumerate(idx)]
    tasks[0]["annotations"][0]["result"][0]["value"]["choices"] = ["zebra"]
    tasks += [task(40, outside, "1"), task(41, idx[1], "2")]
    f = tmp_path / "project-1-export.json"
    f.write_text(json.dumps(tasks))
    check(run_dir, ["label", str(run_dir), "--from", str(f)], "nothing imported", "task 1 (alssl_index",
          "unknown class 'zebra'", f"task 40 (alssl_index {outside})", "not in the open query", "task 41",
          "duplicate row")


# ================================================================ issue 17, CLI layer
# expanduser, deleted query, --imbalance
def test_data_path_with_tilde_is_expanded(tmp_path):
    spec = _npz(tmp_path / "t.npz")
    r = run_cli("pretrain", "--data=~/t.npz", "--out", str(tmp_path / "r"), "--epochs", "0", "-q",
                env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert (json.loads((tmp_path / "r" / "state.json").read_text())["config"]["data"]["spec"]
            == str(Path(spec).resolve()))


def test_deleted_open_query_csv_is_written_again(run_dir):
    q = run_dir / "queries" / "round-1.csv"
    before = q.read_bytes()
    q.unlink()
    r = run_cli("query", str(run_dir), "--budget", "5", "--strategy", "random")  # the open query's own arguments
    assert r.returncode == 0 and r.stdout.strip() == str(q), r.stderr
    assert q.read_bytes() == before


def test_pretrain_rerun_with_another_imbalance(run_dir):
    check(run_dir, ["pretrain", "--out", str(run_dir), *PRETRAIN_AGAIN, "--imbalance", "10"],
          "was made with --imbalance None (not 10.0)", "new --out")


# ---------------------------------------------------------------- feature sets, classifier choice, time budgets
# (issue 24)
@pytest.mark.parametrize("args, needle", [
    (["--use", "rnd"], 'unknown feature set "rnd"'),
    (["--add", "cnn", "--name", "ssl"], "feature set name 'ssl' is not allowed"),
    (["--add", "cnn", "--name", "a/b"], "feature set name 'a/b' is not allowed"),
    (["--init", "w.pt"], "--init and --name go with --add BACKBONE"),
    (["--add", "cnn", "--use", "start"], "give --add or --use, not both"),
    (["--add", "resnet19"], 'did you mean "resnet18"'),
    (["--add", "cnn", "--init", "/nonexistent/w.pt"], "does not exist"),
])
def test_bad_feature_set_requests(run_dir, args, needle):
    check(run_dir, ["features", str(run_dir), *args], needle)


def test_damaged_feature_set_registry(run_dir):
    (run_dir / "feature_sets.json").write_text("{not json")
    check(run_dir, ["features", str(run_dir)], "feature_sets.json is damaged")
    (run_dir / "feature_sets.json").write_text('{"added": {"x": 3}}')
    check(run_dir, ["probe", str(run_dir)], "feature_sets.json is damaged")


@pytest.mark.parametrize("cmd", ["export", "predict"])
def test_bad_classifier_choice(closed_run, tmp_path, cmd):
    out = ["--out", str(tmp_path / ("m" if cmd == "export" else "p.csv"))] + (["--pool"] if cmd == "predict" else [])
    check(closed_run, [cmd, str(closed_run), *out, "--classifier", "best"], 'unknown classifier "best"')
    check(closed_run, [cmd, str(closed_run), *out, "--classifier", "semi"], "has no finished semi-supervised fine-tune")


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf"])
def test_bad_time_budget(closed_run, tmp_path, minutes):
    check(tmp_path, ["pretrain", "--data", "digits", "--out", str(tmp_path / "r"), "--minutes", minutes],
          "--minutes must be a finite number > 0")
    check(closed_run, ["semi-finetune", str(closed_run), "--steps", "2", "--minutes", minutes],
          "--minutes must be a finite number > 0")
