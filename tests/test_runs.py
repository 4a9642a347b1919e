import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from alssl.errors import UserError
from alssl.runs import FORMAT_VERSION, Run, atomic_torch_save, atomic_write_text, run_lock, toml_dumps, torch_load


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "a" / "x.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    assert sorted(p.name for p in f.parent.iterdir()) == ["x.txt"]


def test_run_state_roundtrip_and_rounds(tmp_path):
    run = Run.create(tmp_path / "r", n_pool=5, config={"data": {"spec": "digits"}})
    import numpy as np

    run.add_labels(np.array([3, 1]), np.array([7, 2]),
                   round_meta={"strategy": "random", "budget": "2", "seed": 0, "source": "oracle"})
    run.save_state()
    again = Run.open(tmp_path / "r")
    assert again.labeled_indices.tolist() == [1, 3]
    assert again.labeled_round.tolist() == [-1, 0, -1, 0, -1]
    assert again.labels.tolist() == [-1, 2, -1, 7, -1]
    assert again.state["rounds"][0]["n"] == 2
    assert "spec" in (tmp_path / "r" / "run.toml").read_text()


def test_newer_format_is_refused(tmp_path):
    run = Run.create(tmp_path / "r", n_pool=1, config={})
    run.state["format_version"] = FORMAT_VERSION + 1
    run.save_state()
    with pytest.raises(UserError, match="newer alssl"):
        Run.open(tmp_path / "r")


def test_toml_dumps_is_valid_toml():
    import tomllib

    data = {"a": 1, "b": "x\"y", "c": [1, 2], "d": {"e": True, "f": 0.5}}
    assert tomllib.loads(toml_dumps(data)) == data


def test_lock_names_live_holder_and_takes_over_stale(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from alssl.runs import run_lock
        with run_lock({str(d)!r}):
            print("held", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with run_lock(d):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel lock does not
        holder.wait()
    assert (d / ".lock").exists()
    with run_lock(d):  # a stale lock of a dead process is taken over
        assert (d / ".lock").read_text() == str(os.getpid())
    assert not (d / ".lock").exists()


def test_malicious_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        torch_load(bad)
    assert not marker.exists()


def test_truncated_checkpoint_is_user_error(tmp_path):
    f = tmp_path / "c.pt"
    atomic_torch_save({"w": torch.randn(100)}, f)
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(UserError, match="cannot be loaded safely"):
        torch_load(f)
    good = tmp_path / "g.pt"
    atomic_torch_save({"w": torch.ones(3)}, good)
    assert torch_load(good)["w"].sum().item() == 3


# ---------------------------------------------------------------- JSONL that cannot tear, a reader that never raises
def test_read_jsonl_skips_a_torn_tail_and_reports_it(tmp_path):
    from alssl.runs import DamagedFileWarning, append_jsonl, read_jsonl

    f = tmp_path / "m.jsonl"
    append_jsonl(f, {"a": 1})
    with open(f, "ab") as fh:
        fh.write(b'{"a": 2, "b"')  # a crash mid-append
    with pytest.warns(DamagedFileWarning, match="skipped 1 unreadable line .line 2"):
        assert read_jsonl(f) == [{"a": 1}]
    append_jsonl(f, {"a": 3})  # starts on a line of its own, not glued onto the torn one
    assert f.read_bytes().endswith(b'{"a": 2, "b"\n{"a": 3}\n')
    with pytest.warns(DamagedFileWarning, match="skipped 1"):
        assert read_jsonl(f) == [{"a": 1}, {"a": 3}]


@pytest.mark.parametrize("garbage", [b"\xff\xfe not utf-8", b"[1, 2]", b"5", b"{nope}", b"[" * 100_000])
def test_read_jsonl_never_raises_on_a_bad_line(tmp_path, garbage):
    from alssl.runs import DamagedFileWarning, read_jsonl

    f = tmp_path / "m.jsonl"
    f.write_bytes(b'{"a": 1}\n' + garbage + b'\n{"a": 2}\n')
    with pytest.warns(DamagedFileWarning):
        assert read_jsonl(f) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_missing_and_clean_files_are_quiet(tmp_path, recwarn):
    from alssl.runs import read_jsonl, write_jsonl

    assert read_jsonl(tmp_path / "none.jsonl") == []
    write_jsonl(tmp_path / "m.jsonl", [{"a": 1}, {"b": [2]}])
    assert read_jsonl(tmp_path / "m.jsonl") == [{"a": 1}, {"b": [2]}]
    assert not recwarn.list


# ---------------------------------------------------------------- the state.json schema
def _good_state() -> dict:
    return {"format_version": FORMAT_VERSION, "config": {"data": {"spec": "digits"}}, "n_pool": 4,
            "labeled_round": [0, -1, 0, -1], "labels": [3, -1, 1, -1],
            "rounds": [{"round": 0, "n": 2, "strategy": "random", "budget": "2", "seed": 0, "source": "oracle"}],
            "open_query": {"round": 1, "file": "queries/round-1.csv", "indices": [1], "budget": "1",
                           "strategy": "random", "seed": 0, "probe": "linear"},
            "stages": {"pretrain": {"epochs": 0}}}


def _set(path: str, value):
    def edit(s: dict) -> None:
        *head, last = path.split(".")
        for k in head:
            s = s[int(k)] if isinstance(s, list) else s[k]
        if value is KeyError:
            del s[last]
        elif isinstance(s, list):
            s[int(last)] = value
        else:
            s[last] = value
    return edit


STATE_DAMAGE = {
    "version-inf": (_set("format_version", float("inf")), "format_version"),
    "version-string": (_set("format_version", "1"), "format_version"),
    "version-bool": (_set("format_version", True), "format_version"),
    "no-n_pool": (_set("n_pool", KeyError), "'n_pool' is missing"),
    "labeled_round-all": (_set("labeled_round", "all"), "labeled_round"),
    "labeled_round-short": (_set("labeled_round", [0, -1, 0]), "4 integers"),
    "labeled_round-float": (_set("labeled_round.1", 0.5), "labeled_round[1]"),
    "labeled_round-future": (_set("labeled_round.1", 3), "labeled_round[1]"),
    "labels-mismatch": (_set("labels.0", -1), "sample 0"),
    "rounds-null": (_set("rounds", None), "rounds"),
    "round-missing-key": (_set("rounds.0.strategy", KeyError), "'strategy'"),
    "round-wrong-n": (_set("rounds.0.n", 5), "rounds[0].n"),
    "round-not-object": (_set("rounds.0", 7), "rounds[0]"),
    "config-no-data": (_set("config", {}), "config.data.spec"),
    "config-not-object": (_set("config", []), "config"),
    "stage-not-object": (_set("stages.pretrain", 3), "stages.pretrain"),
    "open-query-out-of-range": (_set("open_query.indices", [4]), "open_query.indices"),
    "open-query-negative": (_set("open_query.indices", [-1]), "open_query.indices"),
    "open-query-labeled": (_set("open_query.indices", [0]), "already labeled"),
    "open-query-duplicates": (_set("open_query.indices", [1, 1]), "duplicates"),
    "open-query-no-file": (_set("open_query.file", KeyError), "'file'"),
    "open-query-round": (_set("open_query.round", 0), "open_query.round"),
    "open-query-string": (_set("open_query", "yes"), "open_query"),
}


def test_valid_state_passes():
    from alssl.runs import state_problem

    assert state_problem(_good_state()) is None
    s = _good_state()
    s["open_query"] = None
    assert state_problem(s) is None


@pytest.mark.parametrize("case", sorted(STATE_DAMAGE))
def test_damaged_state_is_a_user_error_naming_the_file_and_fix(tmp_path, case):
    edit, needle = STATE_DAMAGE[case]
    d = tmp_path / "r"
    d.mkdir()
    s = _good_state()
    edit(s)
    (d / "state.json").write_text(json.dumps(s))
    with pytest.raises(UserError) as exc:
        Run.open(d)
    msg = str(exc.value)
    assert needle in msg and str(d / "state.json") in msg and "start a new run" in msg, msg


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"format_version": 1e999}', b"", b"null"])
def test_unreadable_state_bytes(tmp_path, content):
    d = tmp_path / "r"
    d.mkdir()
    (d / "state.json").write_bytes(content)
    with pytest.raises(UserError, match="state.json"):
        Run.open(d)


def test_state_json_that_is_a_directory(tmp_path):
    d = tmp_path / "r"
    (d / "state.json").mkdir(parents=True)
    with pytest.raises(UserError, match="is not a file"):
        Run.open(d)


# ---------------------------------------------------------------- the lock's own failures
def test_lock_that_is_a_directory_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "r"
    (d / ".lock").mkdir(parents=True)
    with pytest.raises(UserError, match="is a directory.*rmdir"):
        with run_lock(d):
            pass
    assert (d / ".lock").is_dir()


def test_lock_on_a_run_dir_of_another_user(tmp_path, monkeypatch):
    d = tmp_path / "r"
    d.mkdir()
    import alssl.runs

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(alssl.runs.os, "open", denied)  # what a dir owned by another user gives (tests may run as root)
    with pytest.raises(UserError, match="Permission denied.*user who owns it"):
        with run_lock(d):
            pass
    monkeypatch.undo()
    assert list(d.iterdir()) == []


def test_lock_that_is_a_symlink_is_not_followed(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (d / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        with run_lock(d):
            pass
    assert victim.read_text() == "keep me"
