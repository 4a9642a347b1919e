"""Shared fixtures: keep torch to one thread per test process (CI has 2 cores) and give tests the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One torch thread per process: on a shared 2-core machine two threads measured 3x slower than one (spin-waiting
# OpenMP threads), and the subprocesses the tests start inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may reach the network: `--init hub` and timm / huggingface_hub read only local caches when this is set.
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def copy_of(src: Path, dest: Path) -> Path:
    """A private copy of a module-scoped run / grid dir for one test to change (the original stays pristine)."""
    import shutil

    shutil.copytree(src, dest)
    return dest


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `alssl ARGS` in a subprocess (the real console entry point), capturing text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alssl", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def run_cli_inprocess(*args: str, cwd: Path | None = None, env: dict | None = None,
                      timeout: float = 0) -> subprocess.CompletedProcess:
    """`alssl ARGS` through the same entry point, in this process (no 3 s torch import per case).

    An exception that escapes `main` is reported as exit 1 with its traceback in stderr, as the console would show it.
    """
    import contextlib
    import io
    import traceback

    from alssl.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - a crash must show up as a traceback, like the console
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return subprocess.CompletedProcess(["alssl", *args], code, out.getvalue(), err.getvalue())


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: two equal snapshots mean the dir is byte-identical."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture
def cli():
    return run_cli
