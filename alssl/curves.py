"""Budget-curve grids: strategies × cumulative budgets × seeds × probes (× an optional semi arm).

Protocol (Bengar et al. 2021, arXiv 2108.11458): one stage-1 backbone shared by every cell; for each
(probe, strategy, seed) *chain* the budgets are cumulative rounds (the 2 % set extends the 1 % set);
strategies that need labels to start (entropy, margin, svm-margin, vaal) take the same random first round
as `random`. Each finished cell is saved atomically in `cells/<chain>.json` (its rows and the labeled set)
and `curve.csv` is rebuilt from those files under a lock, so a grid killed with `kill -9` and rerun with
the same arguments computes only the missing cells and never duplicates a row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import multiprocessing
import os
import signal
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from alssl.acquisition import STRATEGIES
from alssl.budget import budget_count
from alssl.data import Dataset, is_pool_spec, load_dataset
from alssl.errors import UserError, unknown
from alssl.faults import fault_point
from alssl.feature_sets import pool_features
from alssl.probes import PROBES, fit_probe
from alssl.rounds import pick
from alssl.runs import atomic_write_text

COLUMNS = ["arm", "probe", "strategy", "seed", "round", "budget", "n_labeled", "fraction", "labels_per_class",
           "accuracy", "balanced_accuracy", "seconds", "random_fill"]


@dataclass
class Grid:
    """What a curve directory computes; saved as `grid.json` so a rerun with other arguments is refused."""

    data: dict
    strategies: list[str]
    budgets: list[str]
    seeds: int
    probes: list[str] = field(default_factory=lambda: ["linear"])
    semi: str | None = None
    semi_steps: int = 500
    semi_batch_size: int = 64  # labeled batch B of each semi cell (unlabeled: mu * B)
    semi_mu: int = 7
    options: dict = field(default_factory=dict)

    def validate(self, n_pool: int) -> list[int]:
        """Check names and budgets; returns the cumulative label counts, ascending."""
        for s in self.strategies:
            if s not in STRATEGIES:
                raise unknown("strategy", s, STRATEGIES)
        for p in self.probes:
            if p not in PROBES:
                raise unknown("probe", p, PROBES)
        if self.semi is not None:
            from alssl.semi import METHODS

            if self.semi not in METHODS:
                raise unknown("semi method", self.semi, METHODS)
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1 (got {self.seeds})")
        if not self.strategies or not self.budgets:
            raise UserError("give at least one strategy and one budget, "
                            "e.g. --strategies random,kcenter --budgets 1%,2%")
        counts = [budget_count(b, n_pool=n_pool) for b in self.budgets]
        if any(b >= a for a, b in zip(counts[1:], counts)) or counts[-1] > n_pool:
            raise UserError(f"budgets must grow strictly and stay within the pool of {n_pool} "
                            f"(got {','.join(self.budgets)} = {counts}); e.g. --budgets 1%,2%,5%")
        return counts

    def chains(self) -> list[tuple[str, str, int]]:
        return [(p, s, seed) for p in self.probes for s in self.strategies for seed in range(self.seeds)]


def _chain_file(out: Path, probe: str, strategy: str, seed: int) -> Path:
    return out / "cells" / f"{probe}__{strategy}__s{seed}.json"


def _damaged(path: Path, problem: str, fix: str) -> UserError:
    return UserError(f"{path} is damaged ({problem}); {fix}")


def _load_json(path: Path, fix: str):
    """The JSON in `path`; unreadable or not JSON is a UserError ending in `fix`."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); {fix}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _damaged(path, "not JSON", fix) from None


def read_cell(path: Path, *, n_pool: int | None = None, counts: list[int] | None = None) -> dict:
    """A chain's `cells/<chain>.json` ({"labeled": [pool indices], "rows": [curve rows]}), validated.

    Damage is a UserError whose fix is to delete the file: that chain is then recomputed on the next run."""
    fix = "delete it and rerun the same command: that chain is recomputed"
    cell = _load_json(path, fix)
    if not isinstance(cell, dict) or not isinstance(cell.get("labeled"), list) \
            or not isinstance(cell.get("rows"), list):
        raise _damaged(path, 'not an object with "labeled" and "rows" lists', fix)
    labeled = cell["labeled"]
    if not all(type(i) is int and 0 <= i < (n_pool if n_pool is not None else 2**62) for i in labeled) \
            or len(set(labeled)) != len(labeled):
        raise _damaged(path, "labeled holds a non-index or a duplicate", fix)
    for r in cell["rows"]:
        if not isinstance(r, dict) or set(COLUMNS) - set(r):
            raise _damaged(path, f"a row lacks the columns {', '.join(COLUMNS)}", fix)
        if type(r["round"]) is not int or not 0 <= r["round"] < (len(counts) if counts is not None else 2**31):
            raise _damaged(path, f"a row has round {r['round']!r}", fix)
        if type(r["seed"]) is not int or not all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool)
                                               for k in ("n_labeled", "fraction", "accuracy", "balanced_accuracy")):
            raise _damaged(path, "a row has a non-numeric value", fix)
    if counts is not None:
        done = {r["round"] for r in cell["rows"]}
        if done and (done != set(range(max(done) + 1)) or len(labeled) != counts[max(done)]):
            raise _damaged(path, f"its rows (rounds {sorted(done)}) do not match its {len(labeled)} labeled samples",
                           fix)
    return cell


def check_grid_dir(out: Path, grid: Grid, *, n_pool: int, counts: list[int]) -> None:
    """Refuse a damaged or foreign grid dir (grid.json, cells/*.json) before anything in it is rewritten."""
    f = out / "grid.json"
    if f.exists():
        fix = "delete it and rerun with the arguments that made this grid, or pick a new --out"
        old = _load_json(f, fix)
        if not isinstance(old, dict):
            raise _damaged(f, "not a JSON object", fix)
        new = asdict(grid)
        old = {fd.name: fd.default for fd in fields(Grid) if fd.default is not MISSING} | old  # keys older grids lack
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            raise UserError(f"{out} holds a grid made with other {diff[0]} ({old.get(diff[0])}); "
                            "rerun with the same arguments to resume, or pick a new --out")
    for c in sorted((out / "cells").glob("*.json")):
        read_cell(c, n_pool=n_pool, counts=counts)


def publish(out: Path) -> Path:
    """Rebuild `curve.csv` from every chain's finished cells (atomic write, under a lock for --jobs)."""
    rows = []
    for f in sorted((out / "cells").glob("*.json")):
        rows += read_cell(f)["rows"]
    rows.sort(key=lambda r: (r["arm"], r["probe"], r["strategy"], r["seed"], r["round"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with open(out / ".curve.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        atomic_write_text(out / "curve.csv", buf.getvalue())
    return out / "curve.csv"


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in range(num_classes) if (y_true == c).any()]
    return float(np.mean(recalls))


def run_chain(out: Path, grid: Grid, counts: list[int], chain: tuple[str, str, int], run_path: Path) -> int:
    """All budgets of one (probe, strategy, seed) chain, resuming after its last finished cell. Returns cells done."""
    probe, strategy, seed = chain
    dataset = load_dataset(grid.data["spec"], imbalance=grid.data.get("imbalance"), seed=grid.data.get("seed", 0))
    train, test = pool_features(run_path, dataset)
    n_pool, C = len(dataset.y_train), dataset.num_classes
    cfile = _chain_file(out, probe, strategy, seed)
    saved = read_cell(cfile, n_pool=n_pool, counts=counts) if cfile.exists() else {"labeled": [], "rows": []}
    labeled_list: list[int] = saved["labeled"]
    done = 0
    for k, target in enumerate(counts):
        if any(r["round"] == k for r in saved["rows"]):
            continue
        t0 = time.perf_counter()
        mask = np.zeros(n_pool, bool)
        mask[labeled_list] = True
        labels = np.where(mask, dataset.y_train, -1)
        picked, info = pick(strategy, target - int(mask.sum()), embeddings=train, labeled=mask, labels=labels,
                            num_classes=C, seed=seed, round_k=k, images=dataset.x_train, probe=probe,
                            options=grid.options, cache_dir=run_path / "features", start_random=True)
        labeled_list = labeled_list + [int(i) for i in picked]
        idx = np.asarray(labeled_list)
        model = fit_probe(probe, train[idx], dataset.y_train[idx], num_classes=C, seed=seed)
        pred = model.predict(test)
        base = {"probe": probe, "strategy": strategy, "seed": seed, "round": k, "budget": grid.budgets[k],
                "n_labeled": len(idx), "fraction": round(len(idx) / n_pool, 6),
                "labels_per_class": round(len(idx) / C, 3), "random_fill": info.get("random_fill", 0)}
        rows = [{**base, "arm": "probe", "accuracy": round(float((pred == dataset.y_test).mean()), 4),
                 "balanced_accuracy": round(_balanced_accuracy(dataset.y_test, pred, C), 4),
                 "seconds": round(time.perf_counter() - t0, 2)}]
        if grid.semi is not None:
            rows.append({**base, "arm": f"semi:{grid.semi}", **_semi_cell(out, grid, dataset, idx, run_path, chain, k)})
        saved = {"labeled": labeled_list, "rows": saved["rows"] + rows}
        atomic_write_text(cfile, json.dumps(saved))
        fault_point("curve-after-cell")
        publish(out)
        done += 1
    return done


def _semi_cell(out: Path, grid: Grid, dataset: Dataset, idx: np.ndarray, run_path: Path, chain, k: int) -> dict:
    from alssl.semi import semi_finetune

    t0 = time.perf_counter()
    probe, strategy, seed = chain
    res = semi_finetune(dataset, labeled_idx=idx, labeled_y=dataset.y_train[idx],
                        out_dir=out / "semi" / f"{probe}__{strategy}__s{seed}__r{k}", method=grid.semi,
                        init_checkpoint=run_path / "checkpoints" / "backbone.pt", steps=grid.semi_steps,
                        batch_size=grid.semi_batch_size, mu=grid.semi_mu,
                        seed=seed, quiet=True)
    return {"accuracy": round(float(res["accuracy"]), 4),
            "balanced_accuracy": round(float(res["balanced_accuracy"]), 4),
            "seconds": round(time.perf_counter() - t0, 2)}


def run_grid(out: Path, grid: Grid, counts: list[int], *, run_path: Path, jobs: int = 1, quiet: bool = True) -> Path:
    """Compute every missing cell of `grid` (chains in `jobs` processes) and return the path of curve.csv."""
    from rich.progress import Progress

    from alssl.progress import Projection

    chains = grid.chains()
    total, start = len(chains) * len(counts), _cells_done(out)
    # one line with the projected wall time, once the first cells are measured (cells are long: no warm-up to skip)
    projection = Projection("curve", total, start, item="cell", after=1, skip_first=False,
                            hint=f"; {jobs} job{'s' if jobs > 1 else ''}; rerun the same command to resume")

    with Progress(disable=quiet, transient=True, speed_estimate_period=3600.0) as bar:
        task = bar.add_task("curve cells", total=total, completed=start)
        if jobs <= 1:
            for ch in chains:
                run_chain(out, grid, counts, ch, run_path)
                bar.update(task, completed=_cells_done(out))
                projection.step(_cells_done(out))
        else:
            # A Pool, not a ProcessPoolExecutor: leaving the `with` (done, an error, Ctrl-C, SIGTERM) terminates the
            # workers, whereas an executor's shutdown waits for every queued chain. Workers leave Ctrl-C to the parent
            # and die silently on its SIGTERM; a cell is written atomically, so a worker stopped mid-cell loses only it.
            with multiprocessing.Pool(jobs, initializer=_chain_worker_init, initargs=(os.getpid(),)) as pool:
                for _ in pool.imap_unordered(_run_chain_star, [(out, grid, counts, ch, run_path) for ch in chains]):
                    bar.update(task, completed=_cells_done(out))
                    projection.step(_cells_done(out))
    return publish(out)


def _chain_worker_init(parent_pid: int) -> None:
    """Ctrl-C is the parent's; SIGTERM and the parent's death (even by kill -9) end the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # first: a SIGTERM during the import below ends the worker quietly
    from alssl.data.folder import set_parent_death_signal

    set_parent_death_signal(parent_pid)


def _run_chain_star(args: tuple) -> int:
    return run_chain(*args)


def _cells_done(out: Path) -> int:
    return sum(len({r["round"] for r in read_cell(f)["rows"]}) for f in (out / "cells").glob("*.json"))


def save_grid(out: Path, grid: Grid) -> None:
    """Write grid.json unless it exists (`check_grid_dir` has checked that an existing one asks for the same grid)."""
    if not (out / "grid.json").exists():
        atomic_write_text(out / "grid.json", json.dumps(asdict(grid), indent=1))


def run_experiment(out: Path, grid: Grid, *, pretrain_args: dict, from_run: Path | None = None, jobs: int = 1,
                   quiet: bool = True, title: str | None = None) -> tuple[Path, Path, Path]:
    """Pretrain once (or reuse `from_run`), then compute the grid and draw it. Returns (csv, png, svg)."""
    from alssl.backbones import check_backbone_name
    from alssl.plots import curve_table, curve_title, plot_curve
    from alssl.runs import Run, check_writable, run_lock
    from alssl.pretraining import METHODS, pretrain

    if is_pool_spec(grid.data["spec"]):
        raise UserError(f"{grid.data['spec']} is an unlabeled image folder: curves simulate labeling with every pool "
                        f"image's true label, which it does not have; run curves on a labeled benchmark (digits, "
                        f"FILE.npz, DIR/ with train/ and test/, cifar10:DIR), and label your own pool with "
                        f"`alssl query` + `alssl label`")
    dataset = load_dataset(grid.data["spec"], imbalance=grid.data.get("imbalance"), seed=grid.data.get("seed", 0))
    counts = grid.validate(len(dataset.y_train))
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1 (got {jobs})")
    if from_run is not None:
        from alssl.backbones import load_backbone_checkpoint

        src = Run.open(from_run)
        if src.n_pool != len(dataset.y_train) or not (Path(from_run) / "checkpoints" / "backbone.pt").exists():
            raise UserError(f"--from {from_run} was not pretrained on this data (or has no backbone.pt); "
                            "pretrain it with `alssl pretrain --data ...`")
        load_backbone_checkpoint(Path(from_run) / "checkpoints" / "backbone.pt", expect_channels=dataset.channels)
        run_path = Path(from_run)
    else:
        if pretrain_args["method"] not in METHODS:
            raise unknown("method", pretrain_args["method"], METHODS)
        check_backbone_name(pretrain_args["backbone"])
        run_path = out / "pretrain"
    if out.is_dir():
        check_grid_dir(out, grid, n_pool=len(dataset.y_train), counts=counts)  # before pretraining rewrites anything
    check_writable(out)
    with run_lock(out):
        check_grid_dir(out, grid, n_pool=len(dataset.y_train), counts=counts)  # again, under the lock
        run = Run.open(run_path) if from_run is None and Run.exists(run_path) else None
        if run is not None and run.config.get("pretrain") != pretrain_args:
            raise UserError(f"{run_path} was pretrained with other arguments; use the same ones, or a new --out")
        save_grid(out, grid)
        if from_run is None:
            run = run or Run.create(run_path, n_pool=len(dataset.y_train),
                                    config={"data": grid.data, "pretrain": pretrain_args})
            summary = pretrain(dataset, run, **pretrain_args, quiet=quiet)
            if summary is not None:  # features at their start and end, for `alssl status OUT/pretrain`
                run.record_stage("pretrain", summary)
        else:
            run = src  # the reused run: its pretrain settings name the features in the figure's title
        pool_features(run_path, dataset)  # embed once, before any worker forks
        csv_path = run_grid(out, grid, counts, run_path=run_path, jobs=jobs, quiet=quiet)
        png, svg = plot_curve(csv_path, title=title or curve_title(grid.data["spec"], run.config.get("pretrain"),
                                                                   grid.probes))
        atomic_write_text(out / "curve.md", curve_table(csv_path))  # the same numbers as a markdown table
    return csv_path, png, svg
