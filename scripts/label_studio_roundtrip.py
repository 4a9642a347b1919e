"""Round trip through a REAL Label Studio: alssl tasks -> Label Studio (API) -> exports -> alssl label --from.

Runs with the Python of a separate venv that holds Label Studio and its SDK (never alssl's own venv):

    python3 -m venv /tmp/ls-venv && /tmp/ls-venv/bin/pip install label-studio label-studio-sdk
    /tmp/ls-venv/bin/python scripts/label_studio_roundtrip.py --alssl "$PWD/.venv/bin/python -m alssl" \
        --work /tmp/ls-roundtrip [--fixtures tests/fixtures/label_studio]

What it does (docs/labeling.md, "Label Studio"):
 1. a digits run at random init: round 0 labeled by the oracle, round 1 (10 images) open;
 2. `alssl tasks RUN --out WORK/tasks` (tasks.json, config.xml, images/);
 3. starts Label Studio on 127.0.0.1 with local-files serving on (document root WORK/tasks) and a fresh data dir;
 4. with label-studio-sdk: creates a project with config.xml, adds a Local files storage (WORK/tasks/images),
    imports tasks.json, checks that an image is served, and annotates every task through the API: task 1 first
    with a wrong class then again with the right one (the latest counts), task 2 with a cancelled (skipped)
    annotation and then a real one, the rest once;
 5. exports JSON, JSON_MIN and CSV and imports each into a copy of the run with `alssl label --from`, checking that
    exactly the annotated classes were imported;
 6. with --fixtures DIR: copies the exports, tasks.json, config.xml and expected.json there (the test fixtures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

USER, PASSWORD, TOKEN = "alssl@example.com", "alssl-roundtrip", "alsslroundtrip0123456789abcdef012345"
FORMATS = {"JSON": "export.json", "JSON_MIN": "export-min.json", "CSV": "export.csv"}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    sys.exit(f"Label Studio did not answer at {url} within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alssl", required=True, help='how to run alssl, e.g. "/path/.venv/bin/python -m alssl"')
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--fixtures", type=Path, help="copy the exports here (tests/fixtures/label_studio)")
    args = ap.parse_args()
    alssl = shlex.split(args.alssl)
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = work / "run"

    # 1-2: the run and its tasks
    sh([*alssl, "pretrain", "--data", "digits", "--out", str(run), "--epochs", "0", "-q"])
    sh([*alssl, "query", str(run), "--budget", "10", "--seed", "0"])
    sh([*alssl, "label", str(run), "--oracle"])
    sh([*alssl, "query", str(run), "--budget", "10", "--seed", "0"])
    out = json.loads(sh([*alssl, "tasks", str(run), "--out", str(work / "tasks")]).stdout)
    root, storage = out["document_root"], out["storage"]
    tasks = json.loads(Path(out["tasks"]).read_text())
    config = Path(out["config"]).read_text()

    # 3: Label Studio, local files served from the document root alssl printed
    env = {**os.environ, "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": root,
           "LABEL_STUDIO_BASE_DATA_DIR": str(work / "ls-data"), "DJANGO_DB": "sqlite",
           "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false"}
    ls_bin = Path(sys.executable).parent / "label-studio"
    log = open(work / "label-studio.log", "w")
    cmd = [str(ls_bin), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(args.port),
           "--data-dir", str(work / "ls-data"), "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
           "--enable-legacy-api-token"]
    print("$", " ".join(cmd), flush=True)
    ls = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_http(f"{base}/health", 600)
        expected = roundtrip(base, tasks, config, storage, work)
    finally:
        os.killpg(ls.pid, signal.SIGTERM)
        ls.wait(timeout=60)

    # 5: every export imports exactly what was annotated
    for fmt, name in FORMATS.items():
        copy = work / f"run-{fmt.lower()}"
        shutil.copytree(run, copy)
        print(sh([*alssl, "label", str(copy), "--from", str(work / "exports" / name)]).stdout.strip())
        state = json.loads((copy / "state.json").read_text())
        classes = [str(c) for c in range(10)]
        got = {str(i): classes[state["labels"][int(i)]] for i in expected}
        assert got == expected, (fmt, got, expected)
        assert state["open_query"] is None and len(state["rounds"]) == 2
        print(f"{fmt}: imported {len(got)} labels, exactly the annotated ones")

    # 6: fixtures
    if args.fixtures:
        args.fixtures.mkdir(parents=True, exist_ok=True)
        for name in FORMATS.values():
            shutil.copy(work / "exports" / name, args.fixtures / name)
        shutil.copy(out["tasks"], args.fixtures / "tasks.json")
        shutil.copy(out["config"], args.fixtures / "config.xml")
        labeled0 = [i for i, r in enumerate(json.loads((run / "state.json").read_text())["labeled_round"]) if r == 0]
        (args.fixtures / "expected.json").write_text(json.dumps({"labels": expected, "round0": labeled0}, indent=1)
                                                     + "\n")
        print(f"fixtures written to {args.fixtures}")
    print("round trip OK")


def roundtrip(base: str, tasks: list[dict], config: str, storage: str, work: Path) -> dict[str, str]:
    """Project, storage, import, annotations and the three exports; returns {alssl_index: class annotated}."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=base, api_key=TOKEN)
    project = ls.projects.create(title="alssl round trip", label_config=config)
    ls.import_storage.local.create(project=project.id, path=storage, title="alssl images", use_blob_urls=False)
    ls.projects.import_tasks(project.id, request=tasks)
    made = sorted(ls.tasks.list(project=project.id), key=lambda t: t.data["alssl_index"])
    assert len(made) == len(tasks), (len(made), len(tasks))
    with urllib.request.urlopen(urllib.request.Request(base + made[0].data["image"],
                                                       headers={"Authorization": f"Token {TOKEN}"})) as r:
        assert r.status == 200 and r.read(8).startswith(b"\x89PNG"), "Label Studio does not serve the task images"

    def choice(c: str) -> list[dict]:
        return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [c]}}]

    expected = {}
    for n, t in enumerate(made):
        want = str((t.data["alssl_index"] + n) % 10)  # any class will do: alssl must import exactly this one
        if n == 0:  # a wrong first answer, corrected later: the latest annotation counts
            ls.annotations.create(id=t.id, result=choice(str((int(want) + 1) % 10)), was_cancelled=False)
            time.sleep(1.1)
        if n == 1:  # skipped once (a cancelled annotation), then labeled
            ls.annotations.create(id=t.id, result=[], was_cancelled=True)
            time.sleep(1.1)
        ls.annotations.create(id=t.id, result=choice(want), was_cancelled=False)
        expected[str(t.data["alssl_index"])] = want
    (work / "exports").mkdir()
    for fmt, name in FORMATS.items():
        data = b"".join(ls.projects.exports.download_sync(project.id, export_type=fmt, download_all_tasks=True))
        (work / "exports" / name).write_bytes(data)
        print(f"exported {fmt}: {len(data)} bytes")
    return expected


if __name__ == "__main__":
    main()
