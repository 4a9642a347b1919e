"""`alssl label-ui`: the JSON API on a real server process (token, traversal, kill -9, 409, double submit) and the
page itself in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; `make test` installs
them). Nothing here is skipped: a machine without Chromium fails the browser test and says how to install it."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_of, run_cli_inprocess

BUDGET = 6


def _cli(*args: str) -> None:
    old = signal.getsignal(signal.SIGTERM)  # the CLI entry point installs its own SIGTERM handler
    try:
        r = run_cli_inprocess(*args)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """digits at random init; round 0 (10 images) labeled by the oracle, round 1 (6 images) open."""
    d = tmp_path_factory.mktemp("labeling") / "run"
    _cli("pretrain", "--data", "digits", "--out", str(d), "--epochs", "0", "-q")
    _cli("query", str(d), "--budget", "10")
    _cli("label", str(d), "--oracle")
    _cli("query", str(d), "--budget", str(BUDGET))
    return d


@pytest.fixture
def run_dir(base_run, tmp_path) -> Path:
    return copy_of(base_run, tmp_path / "run")


class Server:
    """`alssl label-ui RUN --port 0 --no-browser` in a subprocess; the URL it prints; tiny HTTP helpers."""

    def __init__(self, run_dir: Path, log: Path, timeout: float = 240):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "alssl", "label-ui", str(run_dir), "--port", "0",
                                      "--no-browser"], stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise AssertionError(f"label-ui printed {line!r}; stderr: {log.read_text()[-2000:]}")
        self.url = line
        self.base, self.token = line.split("/?token=")

    def request(self, path: str, data: dict | None = None, *, token: str | None = "yes") -> tuple[int, bytes, str]:
        url = self.base + path
        if token is not None:
            url += ("&" if "?" in path else "?") + "token=" + (self.token if token == "yes" else token)
        req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "")

    def json(self, path: str, data: dict | None = None, **kw) -> tuple[int, dict]:
        status, body, _ = self.request(path, data, **kw)
        return status, json.loads(body)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.log.close()


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


# ---------------------------------------------------------------- API
def _token_required_and_no_traversal(server: Server, run_dir: Path) -> None:
    status, q = server.json("/api/query")
    assert status == 200 and q["round"] == 1 and len(q["items"]) == BUDGET
    assert q["classes"] == [str(c) for c in range(10)] and q["keys"] == q["classes"]  # digit classes keep their keys
    assert all(it["suggestion"] in q["classes"] and it["label"] is None for it in q["items"])  # the run has labels
    first = q["items"][0]["index"]
    labeled = next(i for i, r in enumerate(_state(run_dir)["labeled_round"]) if r == 0)
    # 403 without the token, or with a wrong one, on the page, every API route and the images
    for path, data in [("/", None), ("/api/query", None), (f"/img/{first}", None),
                       ("/api/label", {"index": first, "label": "1"}), ("/api/submit", {}), ("/api/next", {}),
                       ("/img/..%2F..%2Fstate.json", None), ("/state.json", None)]:
        for token in (None, "wrong" + server.token[5:], ""):
            assert server.request(path, data, token=token)[0] == 403, (path, token)
    assert server.request("/static/app.js", token=None)[0] == 200  # the script holds no secret
    # images: only the open query's indices, by number; nothing else reachable
    status, png, ctype = server.request(f"/img/{first}")
    assert status == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")
    for path in [f"/img/{labeled}", "/img/99999", "/img/-1", f"/img/{first}.png", "/img/..%2F..%2Fstate.json",
                 "/img/%2e%2e%2fstate.json", "/img/..%2Frun.toml", "/static/..%2Fsession.py", "/static/index.html",
                 "/../state.json", "/state.json", "/queries/round-1.csv"]:
        assert server.request(path)[0] == 404, path
    # bad label requests change nothing
    assert server.json("/api/label", {"index": labeled, "label": "1"})[0] == 404
    assert server.json("/api/label", {"index": first, "label": "zebra"})[0] == 400
    assert server.json("/api/label", {"index": str(first), "label": "1"})[0] == 400
    assert not (run_dir / "queries" / "round-1.partial.csv").exists()
    # the server does not hold the run lock between requests: other commands run meanwhile
    from alssl.runs import run_lock

    with run_lock(run_dir):
        pass


def test_api_token_traversal_kill9_409_submit_once_next(run_dir, tmp_path):
    """One server lifetime for the security checks, then labels, kill -9, a restart, 409, a double submit, next."""
    log = tmp_path / "server.log"
    s = Server(run_dir, log)
    try:
        _token_required_and_no_traversal(s, run_dir)
        items = s.json("/api/query")[1]["items"]
        idx = [it["index"] for it in items]
        want = {i: str((i * 7) % 10) for i in idx}
        for i in idx[:3]:
            assert s.json("/api/label", {"index": i, "label": want[i]}) == (
                200, {"index": i, "label": want[i], "labeled": idx.index(i) + 1, "total": BUDGET})
        assert s.json("/api/label", {"index": idx[2], "label": None})[0] == 200  # undo
        assert s.json("/api/label", {"index": idx[2], "label": want[idx[2]]})[0] == 200
    except BaseException:
        s.stop()  # never leave a server behind
        raise
    s.stop(signal.SIGKILL)  # kill -9: nothing acknowledged may be lost
    partial = run_dir / "queries" / "round-1.partial.csv"
    assert partial.read_text().splitlines() == ["index,id,label"] + [f"{i},train/{i},{want[i]}" for i in idx[:3]]

    s = Server(run_dir, log)
    try:
        q = s.json("/api/query")[1]
        assert {it["index"]: it["label"] for it in q["items"]} == {i: (want[i] if i in idx[:3] else None) for i in idx}
        before = (run_dir / "state.json").read_bytes()
        status, res = s.json("/api/submit", {})
        assert status == 409 and sorted(m["index"] for m in res["missing"]) == sorted(idx[3:]) \
                and "nothing" in res["error"]
        assert (run_dir / "state.json").read_bytes() == before
        for i in idx[3:]:
            assert s.json("/api/label", {"index": i, "label": want[i]})[0] == 200
        # two tabs (or a double click) submit at the same moment: one import
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(s.json("/api/submit", {}))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r[0] for r in results) == [200, 200]
        assert sorted(r[1]["imported"] for r in results) == [0, BUDGET]
        assert sorted(r[1]["already_imported"] for r in results) == [False, True]
        st = _state(run_dir)
        assert st["open_query"] is None and len(st["rounds"]) == 2 and st["rounds"][1]["n"] == BUDGET
        assert [st["labels"][i] for i in idx] == [int(want[i]) for i in idx]
        assert [st["labeled_round"][i] for i in idx] == [1] * BUDGET \
                and sum(r >= 0 for r in st["labeled_round"]) == 10 + BUDGET
        assert s.json("/api/submit", {})[1]["already_imported"] is True
        assert s.json("/api/label", {"index": idx[0], "label": "1"})[0] == 409  # the round is closed
        assert s.json("/api/query")[1]["status"] == "imported"
        # then the page offers the next query: same strategy and budget
        status, nq = s.json("/api/next", {})
        assert status == 200 and nq["round"] == 2 and nq["status"] == "open" and len(nq["items"]) == BUDGET
        assert _state(run_dir)["open_query"]["strategy"] == "random" \
                and not set(idx) & {it["index"] for it in nq["items"]}
        # another process closes the round meanwhile: the page can no longer label or import it
        from alssl.data import load_dataset
        from alssl.rounds import ORACLE, import_labels
        from alssl.runs import Run, run_lock

        with run_lock(run_dir):
            import_labels(Run.open(run_dir), load_dataset("digits"), ORACLE)
        first = nq["items"][0]["index"]
        assert s.json("/api/label", {"index": first, "label": "1"})[0] == 409
        status, res = s.json("/api/submit", {})
        assert status == 409 and "no longer open" in res["error"]
        assert len(_state(run_dir)["rounds"]) == 3
    finally:
        s.stop()


def test_class_list_given_on_the_page_is_stored_with_the_import(tmp_path):
    """An image folder made without --classes: `label-ui --classes` labels with them and stores them on Submit."""
    import tomllib

    from alssl.data import load_dataset
    from alssl.labeling.session import LabelSession
    from alssl.rounds import resolve_classes
    from alssl.runs import Run

    ds = load_dataset("digits")
    ds.classes = []  # as an image-folder pool without --classes / --test
    run = Run.create(tmp_path / "r", n_pool=ds.n_pool, config={"data": {"spec": "digits"}})
    run.state["open_query"] = {"round": 0, "budget": "2", "strategy": "random", "seed": 0, "probe": "linear",
                               "file": "queries/round-0.csv", "indices": [3, 5]}
    run.save_state()
    with pytest.raises(Exception, match="no class list"):
        resolve_classes(run, ds, None)
    names, store = resolve_classes(run, ds, ["odd", "even"])
    s = LabelSession(run.path, ds, classes=names, store=store)
    s.load(Run.open(run.path))
    assert s.set_label(3, "odd")[0] == 200 and s.set_label(5, "seven")[0] == 400
    assert s.submit()[0] == 409 and not ds.classes  # nothing stored by a refused submit
    assert s.set_label(5, "odd")[0] == 200
    status, res = s.submit()
    assert status == 200 and res["imported"] == 2
    after = Run.open(run.path)
    assert after.config["data"]["classes"] == ["odd", "even"] and after.labels[[3, 5]].tolist() == [0, 0]
    assert tomllib.loads((run.path / "run.toml").read_text())["data"]["classes"] == ["odd", "even"]


def test_submit_while_another_command_holds_the_run_answers_503(tmp_path, monkeypatch):
    """The page waits for the run lock (`run_lock(wait=...)`), then answers 503 and imports nothing."""
    import alssl.labeling.session as session
    from alssl.data import load_dataset
    from alssl.runs import Run, run_lock

    ds = load_dataset("digits")
    run = Run.create(tmp_path / "r", n_pool=ds.n_pool, config={"data": {"spec": "digits"}})
    run.state["open_query"] = {"round": 0, "budget": "1", "strategy": "random", "seed": 0, "probe": "linear",
                               "file": "queries/round-0.csv", "indices": [3]}
    run.save_state()
    s = session.LabelSession(run.path, ds, classes=ds.classes)
    s.load(Run.open(run.path))
    assert s.set_label(3, "1")[0] == 200
    monkeypatch.setattr(session, "LOCK_WAIT_S", 0.2)
    with run_lock(run.path):  # another command (a second lock of this process conflicts just the same)
        status, res = s.submit()
    assert status == 503 and "in use by another alssl process" in res["error"]
    assert "nothing was imported" in res["error"]
    assert Run.open(run.path).state["open_query"] is not None
    assert s.submit()[0] == 200


def test_image_folder_pools_serve_downscaled_originals(tmp_path):
    from PIL import Image

    from alssl.labeling.session import LabelSession

    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    Image.new("RGB", (1200, 900), (200, 30, 30)).save(root / "trip" / "big.jpg")
    Image.new("L", (20, 10), 99).save(root / "small.png")

    class Pool:  # just what the session reads of a Dataset
        ids = ["trip/big.jpg", "small.png", "../outside.png"]
        x_train = np.zeros((3, 8, 8, 3), np.uint8)

    s = LabelSession(tmp_path / "run", Pool(), classes=["a", "b"])
    s.query, s.position, s.pool_root = {"round": 0, "indices": [0, 1, 2]}, {0: 0, 1: 1, 2: 2}, root
    data, media = s.image(0)
    assert media == "image/jpeg" and Image.open(io.BytesIO(data)).size == (512, 384)
    data, media = s.image(1)
    assert media == "image/png" and Image.open(io.BytesIO(data)).size == (20, 10)
    data, media = s.image(2)  # an id that would leave the pool folder: the pool pixels instead
    assert media == "image/png" and Image.open(io.BytesIO(data)).size == (8, 8)
    assert s.image(3) is None


# ---------------------------------------------------------------- the page in a real browser
def chrome(tmp_path: Path):
    """Headless Debian Chromium through chromedriver (the flags this machine's network needs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "Chromium is missing: `make test` installs it (apt-get install chromium chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_browser_labels_with_keys_reload_undo_skip_submit(run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    s = Server(run_dir, tmp_path / "server.log")
    try:
        d = chrome(tmp_path)
    except BaseException:
        s.stop()
        raise
    wait = WebDriverWait(d, 60)
    try:
        def progress() -> str:
            return d.find_element(By.ID, "progress").text

        def saved() -> bool:
            return d.find_element(By.ID, "saved").get_attribute("data-pending") == "0" and \
                d.find_element(By.ID, "saved").text == "all saved"

        def press(key: str) -> None:
            d.find_element(By.TAG_NAME, "body").send_keys(key)

        def in_view(element_id: str) -> bool:
            return d.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                    "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight;", element_id)

        payload = s.json("/api/query")[1]
        items = {it["index"]: it for it in payload["items"]}
        d.get(s.url)
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, ".card")) == BUDGET and saved())
        assert progress() == f"0 / {BUDGET}" and d.find_element(By.ID, "submit").get_attribute("disabled")
        assert in_view("keyhelp") and "none of these" in d.find_element(By.ID, "keyhelp").text  # no scrolling needed
        assert "accurate" in d.find_element(By.ID, "model").text  # the suggesting model's accuracy beside them
        idx = [int(c.get_attribute("data-index")) for c in d.find_elements(By.CSS_SELECTOR, ".card")]
        wait.until(lambda _: all(  # every image loaded (8x8 digits), upscaled nearest-neighbour
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 8
            and "pixelated" in img.get_attribute("class") for img in d.find_elements(By.CSS_SELECTOR, ".card img")))
        # a suggestion is pre-selected on its class button only when the model is confident enough
        first = items[idx[0]]
        accurate = (payload["model"]["accuracy"] or 0) >= 0.8
        assert first["suggestion"] is not None and first["preselect"] == (first["score"] >= 0.8 and accurate)
        assert len(d.find_elements(By.CSS_SELECTOR, "nav#classes button.suggested")) == int(first["preselect"])
        keys = {}
        for n in range(3):  # key presses label the selected image and move on
            keys[idx[n]] = str((n * 3) % 10)
            press(keys[idx[n]])
        wait.until(lambda _: saved() and progress() == f"3 / {BUDGET}")
        d.refresh()  # reload mid-way: the labels are on the server
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, ".card.labeled")) == 3 and saved())
        assert progress() == f"3 / {BUDGET}"
        labels = [c.find_element(By.CSS_SELECTOR, ".label").text for c in d.find_elements(By.CSS_SELECTOR, ".card")[:3]]
        assert labels == [keys[i] for i in idx[:3]]
        press("9")  # a wrong label on the 4th image, undone with Backspace after a reload
        wait.until(lambda _: progress() == f"4 / {BUDGET}" and saved())
        d.refresh()
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, ".card.labeled")) == 4 and saved())
        press(Keys.BACKSPACE)
        wait.until(lambda _: progress() == f"3 / {BUDGET}" and saved())
        press(Keys.ENTER)  # Enter accepts a confident suggestion only
        if items[idx[3]]["preselect"]:
            keys[idx[3]] = items[idx[3]]["suggestion"]
        else:
            time.sleep(0.3)
            assert progress() == f"3 / {BUDGET}"
            keys[idx[3]] = "5"
            press("5")
        press("x")  # none of these: the 5th image is skipped
        wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, ".card .label")[4].text == "none of these")
        keys[idx[4]] = "__skip__"
        for n in range(5, BUDGET):
            keys[idx[n]] = str((n * 3) % 10)
            press(keys[idx[n]])
        wait.until(lambda _: saved() and progress() == f"{BUDGET} / {BUDGET}")
        for _ in range(14):
            press("+")  # big tiles: the page scrolls; Submit from the bottom of it
        d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        assert d.execute_script("return window.scrollY") > 300
        d.find_element(By.ID, "submit").click()
        wait.until(lambda _: d.find_element(By.ID, "done").is_displayed())
        assert in_view("done") and in_view("next")  # the confirmation is where the user is looking
        assert f"Imported {BUDGET - 1} labels for round 1 (1 skipped as none of these)" \
                in d.find_element(By.ID, "done-text").text
        st = _state(run_dir)
        assert st["open_query"] is None and len(st["rounds"]) == 2 and st["rounds"][1]["skipped"] == [idx[4]]
        assert {i: str(st["labels"][i]) for i in idx if i != idx[4]} == {i: k for i, k in keys.items() if i != idx[4]}
        assert all(st["labeled_round"][i] == 1 for i in idx if i != idx[4]) and st["labeled_round"][idx[4]] == -1
        assert "Next query: 6 more (random)" in d.find_element(By.ID, "next").text
        d.find_element(By.ID, "next").click()
        wait.until(lambda _: d.find_element(By.ID, "round").text == "2" and progress() == f"0 / {BUDGET}")
        assert _state(run_dir)["open_query"]["round"] == 2
        severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # no script errors, no failed loads
    finally:
        d.quit()
        s.stop()
