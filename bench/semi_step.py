"""FixMatch training-step throughput: alssl vs semilearn 0.3.2 (USB), same network, B, μ and data, one run.

    pip install --no-deps semilearn==0.3.2 && pip install tensorboard ruamel.yaml progress
    python bench/semi_step.py [--data ../shared/data/cifar10_10k.npz --batch-size 8 --mu 7 --warmup 1 --steps 3
                               --rounds 5 --threads 1 --workers 0,2 --pairs default|both]

CPU only (semilearn's `process_batch` moves batches with `.cuda()`; this script bypasses it on CPU).

Both sides train the SAME network — alssl's WRN-28-2 (+ linear head) with the same initial weights — with the same
B, μ, τ = 0.95, λ_u = 1, SGD-nesterov lr 0.03, wd 5e-4, EMA 0.999, on the CIFAR-10 10k subset (32×32), 40 labels.
A step is everything from drawing the batch to the updated EMA weights, each library with its own data pipeline:

- alssl: `alssl.semi.semi_finetune(method="fixmatch")` — the real trainer loop. Its metrics.jsonl reports steps/s
  of each step (waiting for the batch, forward/backward, SGD, EMA, and the checkpoint written after every step here),
  excluding the final evaluation; the first `warmup` steps are dropped. The next step's weak + strong views are
  drawn on a worker thread while the step trains (alssl/prefetch.py), as alssl ships; `alssl-inline` is the same
  loop with that thread off, so the lever is measured alone. On CPU alssl keeps the network in channels_last memory
  format (oneDNN's fast conv layout); semilearn uses PyTorch's default.
- semilearn 0.3.2: `semilearn.algorithms.fixmatch.FixMatch` fed by its own `BasicDataset` with its CIFAR transforms
  (weak: reflect-pad crop + flip; strong: + its RandAugment(3, 5)) through its `get_data_loader`, timed with each
  `--workers` value (DataLoader processes; 0 = views in the training process); the fastest is the peer.
  Per step: next batches, `train_step`, then the two after-step hooks that do training work in its trainer:
  ParamUpdateHook (backward, optimizer.step, scheduler.step, zero_grad) and EMAHook (EMA update + ema_model reload).
  Skipped: TimerHook (CUDA events), Evaluation/Checkpoint/Logging (every num_eval_iter, set beyond the run).
  `process_batch` would call `.cuda()`, so on CPU the batch is handed to `train_step` directly.
  semilearn imports at package import time modules its FixMatch step never runs (skimage, torchaudio, timm,
  transformers, wandb, aim); when they are absent this script registers empty placeholder modules for them.
  It needs tensorboard, protobuf, absl-py, ruamel.yaml and progress installed for real.

Two like-for-like pairs, each with the same BatchNorm batches on both sides:
- default: alssl bn_batch="concat" (its default) vs semilearn use_cat=True (its default): ONE forward of
  labeled + weak + strong, as FixMatch's official code.
- split: alssl bn_batch="split" (weak view under no_grad, labeled + strong in one graded forward) vs semilearn
  use_cat=False (labeled, strong with grad in two forwards; weak under no_grad).
Rounds interleave the sides (A B C ... A B C ...) so background load hits all alike. Each round compares median
step times: ratio_r = the fastest semilearn side's ÷ alssl's. Last line: `ratio=X.XX`, the median of ratio_r over
rounds for the default pair (min and max on the line before). `--pairs both` also times the split pair.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import load_average, print_ratio, spread  # noqa: E402  (bench/report.py)

OPTIONAL = ["skimage", "skimage.util", "torchaudio", "timm", "timm.models", "timm.models.layers", "transformers",
            "transformers.file_utils", "transformers.tokenization_utils_base", "transformers.data", "wandb", "aim"]


class _Placeholder(types.ModuleType):
    """Stands in for an optional dependency semilearn imports but FixMatch's step never uses."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def install_placeholders() -> list[str]:
    shimmed = []
    for name in OPTIONAL:
        top = name.split(".")[0]
        if top not in shimmed and importlib.util.find_spec(top) is not None:
            continue
        mod = _Placeholder(name)
        mod.__path__ = []
        sys.modules.setdefault(name, mod)
        if top not in shimmed:
            shimmed.append(top)
    return shimmed


def make_net(channels: int, num_classes: int) -> nn.Module:
    from alssl.backbones import build_backbone
    from alssl.semi.common import Net

    torch.manual_seed(0)  # the same initial weights for both sides (alssl seeds 0 too)
    return Net(build_backbone("wrn28_2", channels), num_classes)


class USBNet(nn.Module):
    """alssl's Net behind semilearn's model interface (a dict with 'logits' and 'feat')."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = net.head.in_features

    def forward(self, x, only_fc=False, only_feat=False, **kwargs):
        logits, feats = self.net(x)
        return {"logits": logits, "feat": feats}


def alssl_times(dataset, li: np.ndarray, args, bn_batch: str, prefetch: bool = True) -> list[float]:
    """Seconds of each timed step of the real trainer (ckpt_every=1: metrics.jsonl has one steps/s per step)."""
    from alssl.runs import read_jsonl
    from alssl.semi import semi_finetune

    with tempfile.TemporaryDirectory() as tmp:
        semi_finetune(dataset, labeled_idx=li, labeled_y=dataset.y_train[li], out_dir=Path(tmp), method="fixmatch",
                      backbone="wrn28_2", steps=args.warmup + args.steps, batch_size=args.batch_size, mu=args.mu,
                      ckpt_every=1, seed=0, quiet=True, device="cpu", options={"bn_batch": bn_batch}, prefetch=prefetch)
        return [1.0 / r["steps_per_s"] for r in read_jsonl(Path(tmp) / "metrics.jsonl") if r["step"] > args.warmup]


def semilearn_setup(dataset, li: np.ndarray, args, tmp: str, use_cat: bool, workers: int):
    from semilearn.algorithms.fixmatch import FixMatch
    from semilearn.core.utils import get_data_loader
    from semilearn.datasets.augmentation import RandAugment
    from semilearn.datasets.cv_datasets.datasetbase import BasicDataset
    from semilearn.lighting import get_config
    from torchvision import transforms

    total = args.warmup + args.steps
    cfg = get_config({"algorithm": "fixmatch", "dataset": "alssl-bench", "num_classes": dataset.num_classes,
                      "batch_size": args.batch_size, "uratio": args.mu, "epoch": 1, "num_train_iter": total,
                      "num_eval_iter": 10**9, "num_log_iter": 10**9, "ema_m": 0.999, "lr": 0.03,
                      "weight_decay": 5e-4, "p_cutoff": 0.95, "hard_label": True, "use_cat": use_cat, "amp": False,
                      "save_dir": tmp, "save_name": "usb", "gpu": None, "num_workers": workers, "distributed": False})

    def builder(num_classes, pretrained=False, pretrained_path=None):
        return USBNet(make_net(dataset.channels, num_classes))

    alg = FixMatch(cfg, builder, tb_log=None, logger=None)
    alg.call_hook("before_run", "EMAHook")  # creates alg.ema, as its trainer does before the first step
    size, mean, std = dataset.image_size, dataset.mean, dataset.std
    crop = [transforms.RandomCrop(size, padding=int(size * 0.125), padding_mode="reflect"),
            transforms.RandomHorizontalFlip()]
    post = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    weak = transforms.Compose(crop + post)
    strong = transforms.Compose(crop + [RandAugment(3, 5)] + post)
    ui = np.setdiff1d(np.arange(len(dataset.y_train)), li)
    lb = BasicDataset("fixmatch", dataset.x_train[li], dataset.y_train[li], dataset.num_classes, weak, False, None)
    ulb = BasicDataset("fixmatch", dataset.x_train[ui], dataset.y_train[ui], dataset.num_classes, weak, True, strong)
    dl_lb = get_data_loader(cfg, lb, args.batch_size, data_sampler="RandomSampler", num_iters=total, num_epochs=1,
                            num_workers=workers)
    dl_ulb = get_data_loader(cfg, ulb, args.batch_size * args.mu, data_sampler="RandomSampler", num_iters=total,
                             num_epochs=1, num_workers=workers)
    return alg, dl_lb, dl_ulb


def semilearn_times(dataset, li: np.ndarray, args, use_cat: bool, workers: int) -> list[float]:
    """Seconds of each timed semilearn step: data, train_step, ParamUpdateHook, EMAHook."""
    with tempfile.TemporaryDirectory() as tmp:
        alg, dl_lb, dl_ulb = semilearn_setup(dataset, li, args, tmp, use_cat, workers)
        alg.model.train()
        it_lb, it_ulb = iter(dl_lb), iter(dl_ulb)
        w0 = next(alg.model.parameters()).detach().clone()
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            b_lb, b_ulb = next(it_lb), next(it_ulb)
            out, log = alg.train_step(x_lb=b_lb["x_lb"], y_lb=b_lb["y_lb"], x_ulb_w=b_ulb["x_ulb_w"],
                                      x_ulb_s=b_ulb["x_ulb_s"])
            alg.out_dict, alg.log_dict = out, log
            alg.call_hook("after_train_step", "ParamUpdateHook")  # backward + SGD + scheduler
            alg.call_hook("after_train_step", "EMAHook")
            alg.it += 1
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        assert not torch.equal(w0, next(alg.model.parameters()).detach()), "semilearn's step did not update weights"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_10k.npz"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mu", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (1: least noise on a shared CPU)")
    ap.add_argument("--workers", default="0,2", help="semilearn DataLoader num_workers values; the fastest is the peer")
    ap.add_argument("--pairs", choices=["both", "default"], default="default",
                    help="default: only alssl concat vs semilearn use_cat=True; both: also the split pair")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shimmed = install_placeholders()
    import semilearn  # noqa: F401  (fails here, with its own message, if a real dependency is missing)
    from importlib.metadata import version

    from alssl.data import load_dataset

    dataset = load_dataset(args.data)
    dataset.x_test, dataset.y_test = dataset.x_test[:100], dataset.y_test[:100]  # alssl's final eval is not timed
    rng = np.random.default_rng(0)
    li = np.concatenate([rng.choice(np.flatnonzero(dataset.y_train == k), 4, replace=False)
                         for k in range(dataset.num_classes)])
    workers = [int(w) for w in args.workers.split(",")]
    print(f"semilearn {version('semilearn')} | torch {torch.__version__} | {args.threads} threads | load average "
          f"{load_average()} | WRN-28-2 | B={args.batch_size} mu={args.mu} | "
          f"{dataset.image_size}px | {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds | "
          f"placeholder modules for semilearn: {', '.join(shimmed) or 'none'}")
    sides = {"alssl": lambda: alssl_times(dataset, li, args, "concat"),
             "alssl-inline": lambda: alssl_times(dataset, li, args, "concat", prefetch=False)}
    sides |= {f"semilearn-w{w}": functools.partial(semilearn_times, dataset, li, args, True, w) for w in workers}
    if args.pairs == "both":
        sides["alssl-split"] = lambda: alssl_times(dataset, li, args, "split")
        sides |= {f"semilearn-nocat-w{w}": functools.partial(semilearn_times, dataset, li, args, False, w)
                  for w in workers}
    ratios: dict[str, list[float]] = {"default": [], "split": [], "look-ahead": []}
    for r in range(args.rounds):  # interleaved, so background load hits every side alike
        med = {name: float(np.median(run())) for name, run in sides.items()}
        peer = min(med[f"semilearn-w{w}"] for w in workers)
        ratios["default"].append(peer / med["alssl"])
        ratios["look-ahead"].append(med["alssl-inline"] / med["alssl"])
        if args.pairs == "both":
            ratios["split"].append(min(med[f"semilearn-nocat-w{w}"] for w in workers) / med["alssl-split"])
        print(f"round {r}: " + " | ".join(f"{k} {v:.3f}" for k, v in med.items()) +
              f" s/step (median) | ratio {ratios['default'][-1]:.2f}", flush=True)

    print(f"look-ahead view thread alone (alssl vs alssl-inline): {spread(ratios['look-ahead'])}")
    if args.pairs == "both":
        print(f"split pair: alssl bn_batch=split vs semilearn use_cat=False: {spread(ratios['split'])}")
    print_ratio(ratios["default"])


if __name__ == "__main__":
    main()
