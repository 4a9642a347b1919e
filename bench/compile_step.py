"""Does `--compile` pay? One training step (forward + backward + SGD) of the student, eager vs torch.compile.

The network and input are what the stage runs: stage 1 = alssl's SimSiam student (backbone + lightly heads) on two
views of a batch, stage 4 = WRN-28-2 + linear head on B + 2·μB images (FixMatch's concatenated batch). Both in
channels_last, as the loops run them on a CPU. The compiled module shares the eager one's parameters; after the
compile (its time is printed, not counted) the two alternate for `--rounds` rounds of `--steps` steps (A B A B ...)
and the last line is `ratio=X.XX`, the median over rounds of eager step time ÷ compiled step time (> 1: compile pays).

    .venv/bin/python bench/compile_step.py --stage 1 [--backbone cnn --batch-size 256]
    .venv/bin/python bench/compile_step.py --stage 4 [--backbone wrn28_2 --batch-size 8 --mu 7]
    python bench/compile_step.py --stage 1 --backbone resnet18 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from alssl.backbones import build_backbone
from alssl.pretrain_methods import SimSiam
from alssl.semi.common import Net
from report import load_average, print_ratio  # bench/report.py


def step_time(model, x: torch.Tensor, opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Median seconds of `steps` steps of sum-of-outputs loss, backward, SGD."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(x)
        loss = sum(o.float().sum() for o in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, choices=[1, 4], default=1)
    ap.add_argument("--backbone", default=None, help="default: cnn for stage 1, wrn28_2 for stage 4")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 (stage 1), 8 (stage 4)")
    ap.add_argument("--mu", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.stage == 1:
        name, bs = a.backbone or "cnn", a.batch_size or 256
        model = SimSiam().student(build_backbone(name, 3))
        n = 2 * bs  # the two views, as one batch here
    else:
        name, bs = a.backbone or "wrn28_2", a.batch_size or 8
        model = Net(build_backbone(name, 3), 10)
        n = bs + 2 * a.mu * bs
    model = model.to(a.device, memory_format=torch.channels_last).train()
    x = torch.randn(n, 3, 32, 32, device=a.device).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    compiled = torch.compile(model)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}), load average {load_average()}, "
          f"device {a.device}, stage {a.stage}, {name}, {n} images of 32 px per step")
    t0 = time.perf_counter()
    step_time(compiled, x, opt, 1, a.device)
    step_time(model, x, opt, 1, a.device)  # warm-up of the eager side
    print(f"compile (first step) {time.perf_counter() - t0:.1f} s")
    ratios = []
    for r in range(a.rounds):
        eager = step_time(model, x, opt, a.steps, a.device)
        comp = step_time(compiled, x, opt, a.steps, a.device)
        ratios.append(eager / comp)
        print(f"round {r}: eager {eager:.3f} s/step | compiled {comp:.3f} s/step | ratio {ratios[-1]:.2f}", flush=True)
    print_ratio(ratios)


if __name__ == "__main__":
    main()
