"""Which start buys the best model? A photo folder built from CIFAR-10 (as the tests build one), three feature sets on
one run — random init (`start`), SSL from scratch with the CPU recipe (`ssl`), and `--init` from the study's CIFAR-10
stage-1 backbone (`stage1`, a stand-in for pretrained weights offline) — probed at 40 / 100 / 200 random labels over
3 seeds, with the set alssl chose on its own (cross-validation on the labels) marked.

    python scripts/start_study.py --out runs/start_study [--photos 2000 --test 400 --epochs 30]

Writes OUT/start_study.csv (one row per seed × labels × feature set) and OUT/start_study.md (the table for
docs/results.md). Every step is the real CLI, as a user would run it; the person labeling is simulated from the file
names' known classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from photo_folder import make_photo_folder, make_test_folder  # noqa: E402

STAGE1 = ROOT / "docs" / "results" / "cifar10_stage1" / "checkpoints" / "backbone.pt"
SETS = {"start": "random init", "ssl": "SSL from scratch (CPU recipe)", "stage1": "--init stage-1 backbone"}


def alssl(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "alssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"alssl {' '.join(args)} failed:\n{r.stderr}")
    sys.stderr.write("".join(line + "\n" for line in r.stderr.splitlines() if line.startswith(("#", "warning"))))
    return r.stdout.strip().splitlines()[-1]


def label_round(run: Path, truth: dict[str, str], n: int, seed: int) -> None:
    query = Path(alssl("query", str(run), "--budget", str(n), "--strategy", "random", "--seed", str(seed)))
    rows = list(csv.DictReader(query.open()))
    labels = query.with_name(query.stem + "-labeled.csv")
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([r["id"], truth[r["id"]]] for r in rows)
    alssl("label", str(run), "--from", str(labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/start_study"))
    p.add_argument("--photos", type=int, default=2000)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--labels", default="40,100,200")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    truth_file = out / "truth.json"
    if not truth_file.exists():
        truth = make_photo_folder(out / "photos", args.photos)
        make_test_folder(out / "test", args.test)
        truth_file.write_text(json.dumps(truth))
    truth = json.loads(truth_file.read_text())
    base = out / "run"
    t0 = time.perf_counter()
    summary = json.loads(alssl("pretrain", "--data", str(out / "photos"), "--test", str(out / "test"),
                               "--out", str(base), "--image-size", "32", "--epochs", str(args.epochs),
                               "--batch-size", "64", "-q"))
    pretrain_s = time.perf_counter() - t0
    if not (base / "feature_sets.json").exists():
        alssl("features", str(base), "--add", "cnn", "--init", str(STAGE1), "--name", "stage1")
    counts = [int(c) for c in args.labels.split(",")]
    rows = []
    for seed in range(args.seeds):
        run = out / f"seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run, ignore=shutil.ignore_patterns("pool"))
        (run / "pool").symlink_to((base / "pool").resolve())
        have = 0
        for n in counts:
            label_round(run, truth, n - have, seed)
            have = n
            probe = json.loads(alssl("probe", str(run)))
            for name, s in probe["features"].items():
                rows.append({"seed": seed, "labels": n, "features": name, "test_accuracy": s["test_accuracy"],
                             "cv_accuracy": s["cv_accuracy"], "rankme": s["rankme"],
                             "chosen": int(name == probe["features_in_use"])})
            print(f"seed {seed} labels {n}: "
                  + " ".join(f"{k} {v['test_accuracy']:.3f}" for k, v in probe["features"].items())
                  + f"  in use: {probe['features_in_use']}", flush=True)
    with (out / "start_study.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| labels | " + " | ".join(f"{SETS[k]} (`{k}`)" for k in SETS) + " | alssl's choice |",
             "|---|" + "---|" * (len(SETS) + 1)]
    for n in counts:
        cells, chosen_acc, picks = [], [], []
        for k in SETS:
            acc = [r["test_accuracy"] for r in rows if r["labels"] == n and r["features"] == k]
            times = sum(r["chosen"] for r in rows if r["labels"] == n and r["features"] == k)
            cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" + (f" ✓{times}" if times else ""))
        for seed in range(args.seeds):
            c = next(r for r in rows if r["labels"] == n and r["seed"] == seed and r["chosen"])
            chosen_acc.append(c["test_accuracy"])
            picks.append(c["features"])
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {np.mean(chosen_acc):.3f} ({', '.join(picks)}) |")
    lines.append("")
    lines.append(f"Stage 1 (`ssl`): SimSiam `cnn`, 32 px, {args.epochs} epochs, batch 64 on {args.photos} photos: "
                 f"{pretrain_s / 60:.1f} min here; kNN (5-fold within the {args.test}-image test set) "
                 f"{summary.get('knn_accuracy_init')} → {summary.get('knn_accuracy')}. "
                 f"Mean ± std over {args.seeds} seeds of "
                 f"random labels; ✓n: chosen by alssl in n of the seeds.")
    (out / "start_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
