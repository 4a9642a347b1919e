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

    run.add_labels(np.array([3, 1]), np.array([7, 2]), round_meta={"strategy": "random"})
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
