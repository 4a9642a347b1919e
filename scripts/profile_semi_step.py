"""Where a stage-4 FixMatch step spends its time: the weak + strong views vs forward/backward/SGD/EMA, then the
profiler's top ops by self CPU time.

    OMP_NUM_THREADS=1 python scripts/profile_semi_step.py [--batch-size 8 --mu 7 --repeats 5]

Same pieces as the trainer (alssl.semi): WRN-28-2 + linear head in channels_last, USB's weak / strong views on the
batch, FixMatch's loss with one concatenated forward, SGD-nesterov, EMA teacher. Used for docs/semi.md's speed notes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from alssl.backbones import build_backbone  # noqa: E402
from alssl.data import load_dataset  # noqa: E402
from alssl.semi.common import Batch, Net  # noqa: E402
from alssl.semi.fixmatch import FixMatch  # noqa: E402
from alssl.semi.teacher import Teacher  # noqa: E402
from alssl.semi.views import views_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_10k.npz"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    ds = load_dataset(a.data)
    b_l, b_u = a.batch_size, a.mu * a.batch_size
    torch.manual_seed(0)
    net = Net(build_backbone("wrn28_2", ds.channels), ds.num_classes).to(memory_format=torch.channels_last)
    ema = Teacher(net, kind="ema", decay=0.999)
    opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    weak, strong = views_for(ds.image_size, hflip=True)
    method = FixMatch(num_classes=ds.num_classes, labeled_y=torch.zeros(b_l, dtype=torch.long), steps=10, tau=0.95,
                      lambda_u=1.0, options={"bn_batch": "concat"})
    x = torch.from_numpy(ds.x_train[: b_l + b_u]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)

    def views() -> Batch:
        return Batch(x_l=(weak(x[:b_l]) - mean) / std, y_l=torch.zeros(b_l, dtype=torch.long), i_l=torch.arange(b_l),
                     x_uw=(weak(x[b_l:]) - mean) / std, x_us=(strong(x[b_l:]) - mean) / std)

    def train(b: Batch) -> None:
        loss, _ = method.loss(net, ema, b, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net, 0)

    for _ in range(2):  # warm-up
        train(views())
    t_views, t_train = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        b = views()
        t_views.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train(b)
        t_train.append(time.perf_counter() - t0)
    v, t = statistics.median(t_views), statistics.median(t_train)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, WRN-28-2, B={b_l}, mu={a.mu} "
          f"({b_l + 2 * b_u} images per forward)")
    print(f"views {v:.3f} s | forward+backward+SGD+EMA {t:.3f} s | views = {v / (v + t):.1%} of a step (medians of "
          f"{a.repeats})")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(views())
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
