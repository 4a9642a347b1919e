"""How often does model.ts, fed by the usual torchvision preprocessing, agree with `alssl predict`? (docs/export.md)

Builds the tests' photo folder (1,000 CIFAR-10 images at 7 sizes, JPEG/PNG/WebP, tests/photo_folder.py), makes a run
on it (1 epoch of SimSiam at 32 px, 40 random labels), exports it, and predicts two image sets with `alssl predict`
and with model.ts fed by a plain PIL decode + torchvision `Resize(32)` + `CenterCrop(32)` + `ToTensor()`:
- the labeled test folder (300 images, the same mix of sizes and formats),
- 300 big JPEGs (the test images upscaled to 640×480, quality 90), like photos from a phone.
It does this twice: a run built with JPEG draft decoding (the default) and one built with `--no-jpeg-draft`.
Prints one line per (run, image set): agreeing labels / images.

    PYTHONPATH=$PWD .venv/bin/python scripts/export_agreement.py --work /tmp/agree
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photo_folder import make_photo_folder, make_test_folder  # noqa: E402


def alssl(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "alssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"alssl {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def torchvision_labels(model_ts: Path, paths: list[str], classes: list[str]) -> list[str]:
    import torch
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    model = torch.jit.load(str(model_ts))
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return [classes[k] for k in model(x).argmax(1).tolist()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    w = args.work
    if not (w / "photos").exists():
        truth = make_photo_folder(w / "photos", 1000, corrupt=0)
        make_test_folder(w / "test", 300)
        from PIL import Image

        for p in sorted((w / "test").rglob("*.*")):
            out = w / "big" / p.relative_to(w / "test").with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(p).convert("RGB").resize((640, 480), Image.BICUBIC).save(out, quality=90)
        (w / "truth.csv").write_text("".join(f"{k},{v}\n" for k, v in truth.items()))
    truth = dict(line.rsplit(",", 1) for line in (w / "truth.csv").read_text().splitlines())
    import json

    for name, flags in (("draft", []), ("no-draft", ["--no-jpeg-draft"])):
        run = w / f"run-{name}"
        if not (run / "state.json").exists():
            alssl("pretrain", "--data", str(w / "photos"), "--test", str(w / "test"), "--out", str(run),
                  "--epochs", "1", "--batch-size", "128", "--image-size", "32", "-q", *flags)
            q = alssl("query", str(run), "--budget", "40", "--strategy", "random").strip()
            rows = list(csv.DictReader(open(q)))
            with open(w / f"labels-{name}.csv", "w", newline="") as f:
                cw = csv.writer(f)
                cw.writerow(["id", "label"])
                cw.writerows([r["id"], truth[r["id"]]] for r in rows)
            alssl("label", str(run), "--from", str(w / f"labels-{name}.csv"))
            alssl("export", str(run), "--out", str(w / f"model-{name}"))
        classes = json.loads((w / f"model-{name}" / "model.json").read_text())["classes"]
        for images in ("test", "big"):
            out = w / f"pred-{name}-{images}.csv"
            alssl("predict", str(run), "--data", str(w / images), "--out", str(out), "-q")
            pred = list(csv.DictReader(open(out)))
            tv = torchvision_labels(w / f"model-{name}" / "model.ts", [p["path"] for p in pred], classes)
            same = sum(a == p["label"] for a, p in zip(tv, pred))
            conf = np.array([float(p["confidence"]) for p in pred])
            print(f"run={name} images={images} agree={same}/{len(pred)} median_confidence={np.median(conf):.2f}",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
