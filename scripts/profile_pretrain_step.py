"""Where a stage-1 step spends its time: torch.profiler over a few SimSiam steps (views, forward, backward, SGD).

    python scripts/profile_pretrain_step.py [--device cuda --backbone resnet18 --batch-size 512 --size 32 --steps 10]

Prints the step time split into: the two kornia views, forward + backward + step; then the profiler's top ops by
self CPU time (and self CUDA time on a GPU). Used for docs/pretrain.md's speed notes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from alssl.augment import SSLView  # noqa: E402
from alssl.backbones import build_backbone  # noqa: E402
from alssl.pretrain_methods import SimSiam  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="cnn")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    dev = torch.device(a.device)
    method = SimSiam()
    net = method.student(build_backbone(a.backbone, 3)).to(dev, memory_format=torch.channels_last)
    method.setup(net, n_pool=a.batch_size)
    method.to(dev)
    view = SSLView(a.size, 3, (0.5,) * 3, (0.25,) * 3).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randint(0, 256, (a.batch_size, 3, a.size, a.size), dtype=torch.uint8, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(times: dict | None = None):
        t0 = time.perf_counter()
        xf = x.float().div_(255)
        x0 = view(xf).contiguous(memory_format=torch.channels_last)
        x1 = view(xf).contiguous(memory_format=torch.channels_last)
        sync()
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss, _ = method.loss(net, x0, x1, contextlib.nullcontext)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if times is not None:
            times["views"] += t1 - t0
            times["net"] += time.perf_counter() - t1

    for _ in range(3):
        step()
    times = {"views": 0.0, "net": 0.0}
    for _ in range(a.steps):
        step(times)
    total = sum(times.values())
    print(f"# {a.backbone} {a.size}px bs {a.batch_size} on {a.device}{' bf16' if a.bf16 else ''}: "
          f"{a.steps * a.batch_size / total:.0f} img/s; per step {1000 * total / a.steps:.1f} ms = views "
          f"{1000 * times['views'] / a.steps:.1f} ms ({100 * times['views'] / total:.0f} %) + forward/backward/SGD "
          f"{1000 * times['net'] / a.steps:.1f} ms")
    acts = ([torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []))
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=48))


if __name__ == "__main__":
    main()
