"""Screenshots of the real `alssl label-ui` page for docs/labeling.md, taken with headless Debian Chromium.

    python scripts/label_ui_screenshots.py --work /tmp/shots --out docs

Builds a small photo-folder run (CIFAR-10 images saved as mixed-size JPEG/PNG/WebP files, tests/photo_folder.py),
labels round 0 from the known classes, opens round 1 (so the page shows the model's suggestions), then drives the
page like a person: a few key presses (one image skipped as "none of these") -> docs/label-ui.png; the rest +
Submit from the bottom of the page -> docs/label-ui-submitted.png.
Needs chromium + chromium-driver (`make test` installs them) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def alssl(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "alssl", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"alssl {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def small_png(png: bytes, path: Path) -> None:
    """Screenshots as 256-colour PNGs: a fraction of the bytes, still sharp."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    im.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")


def main() -> None:
    from photo_folder import make_photo_folder
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    photos, run = args.work / "photos", args.work / "run"
    truth = make_photo_folder(photos, 60, corrupt=0)
    classes = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
    alssl("pretrain", "--data", str(photos), "--classes", classes, "--out", str(run), "--epochs", "0", "-q")
    q0 = Path(alssl("query", str(run), "--budget", "20").strip())
    rows = list(csv.DictReader(q0.open()))
    labels = args.work / "round0.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([r["id"], truth[r["id"]]] for r in rows)
    alssl("label", str(run), "--from", str(labels))
    alssl("query", str(run), "--budget", "12")

    server = subprocess.Popen([sys.executable, "-m", "alssl", "label-ui", str(run), "--port", "0", "--no-browser"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    url = server.stdout.readline().strip()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1100,860", "--hide-scrollbars"):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        wait = WebDriverWait(d, 120)
        d.get(url)
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, ".card img")) == 12 and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in d.find_elements(By.CSS_SELECTOR, ".card img")))
        q = json.loads((run / "state.json").read_text())["open_query"]
        ids = [c.get_attribute("data-index") for c in d.find_elements(By.CSS_SELECTOR, ".card")]
        names = classes.split(",")
        pool_ids = json.loads((run / "pool" / "manifest.json").read_text())["pool"]
        body = d.find_element(By.TAG_NAME, "body")
        keys = "123456789abcdefghijklmnopqrstuvwxyz"  # class k's key on the page
        for n, idx in enumerate(ids[:5]):  # a person labeling the first five with the keys of their classes
            body.send_keys("x" if n == 3 else keys[names.index(truth[pool_ids[int(idx)]])])  # the 4th: none of these
        wait.until(lambda _: d.find_element(By.ID, "saved").text == "all saved")
        time.sleep(0.5)
        small_png(d.get_screenshot_as_png(), args.out / "label-ui.png")
        for idx in ids[5:]:
            body.send_keys(keys[names.index(truth[pool_ids[int(idx)]])])
        wait.until(lambda _: d.find_element(By.ID, "progress").text == "12 / 12" and
                   d.find_element(By.ID, "saved").text == "all saved")
        d.find_element(By.ID, "submit").click()
        wait.until(lambda _: d.find_element(By.ID, "done").is_displayed())
        # Submit from the bottom: the banner is there
        d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        time.sleep(0.5)
        small_png(d.get_screenshot_as_png(), args.out / "label-ui-submitted.png")
        assert q["round"] == 1
    finally:
        d.quit()
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
