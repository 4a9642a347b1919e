"""alssl's Python API: one function per command, with the command's name and its options as keyword arguments.

    import alssl
    run = alssl.pretrain("digits", "runs/d", epochs=5)          # -> {"run": "runs/d", "knn_accuracy": ..., ...}
    alssl.query("runs/d", budget="2%", strategy="typiclust")    # -> {"file": ".../queries/round-0.csv", ...}
    alssl.label("runs/d", {12: "cat", 40: "dog", ...})           # or a file path, or "oracle"
    alssl.probe("runs/d"); alssl.export("runs/d", out="models/d"); alssl.predict("runs/d", data=["new/"], out="p.csv")

The `alssl` command line is a thin layer over these functions: every command turns its options into one call here
and prints what it returns. Each function takes the run's lock, reads the run under it, and returns plain data
(dicts of numbers, strings and lists, as the command's JSON). A `run` argument is a run dir path or an
`alssl.runs.Run`. Bad input is an `alssl.errors.UserError` whose message names the fix (in the CLI's words: an
option `--batch-size` is the keyword `batch_size` here). Nothing heavy is imported until a function is called, so
`import alssl` stays torch-free.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from alssl.errors import UserError, check_positive, check_seed, unknown, warn

if TYPE_CHECKING:
    from alssl.runs import Run

RunLike = Union[str, os.PathLike, "Run"]  # a run dir, or an opened Run


# ---------------------------------------------------------------- bad input, in the caller's words
_FROM_CLI = contextvars.ContextVar("alssl_from_cli", default=False)
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: ([0-9'\"/~.][^\s;,)]*))?")


@contextlib.contextmanager
def called_from_cli() -> Iterator[None]:
    """The `alssl` command's calls: their errors keep naming the command's flags."""
    token = _FROM_CLI.set(True)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)


def python_words(message: str, keywords: set[str]) -> str:
    """A message naming the CLI's flags, reworded for a Python caller: `--batch-size 30` reads `batch_size=30`,
    `--lr` reads `lr` (only flags that are keywords of the call; text in backticks, a command to run, is kept)."""
    def keyword(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name not in keywords:
            return m.group(0)
        return f"{name}={m.group(2)}" if m.group(2) else name

    parts = message.split("`")
    return "`".join(part if k % 2 else _FLAG.sub(keyword, part) for k, part in enumerate(parts))


def _keywords(fn):
    """`fn`'s bad-input errors in the words of a Python caller (`python_words`); unchanged under the CLI."""
    names = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if not _FROM_CLI.get() and exc.args:
                exc.args = (python_words(str(exc.args[0]), names), *exc.args[1:])
            raise

    return call


# ---------------------------------------------------------------- runs
def run_path(run: RunLike) -> Path:
    """The run dir of a path or a `Run`."""
    from alssl.runs import Run

    return run.path if isinstance(run, Run) else Path(run)


@_keywords
def open_run(run: RunLike):
    """The `Run` at this path (read now; the functions below re-read it under the lock)."""
    from alssl.runs import Run

    return Run.open(run_path(run))


@_keywords
def dataset(run: RunLike, *, quiet: bool = True):
    """The run's `Dataset` (`alssl.data`): pool pixels `x_train`, `ids`, `classes`, the test split, and on a
    benchmark the ground truth `y_train`."""
    with opened(run, quiet=quiet) as (_, data):
        return data


@contextlib.contextmanager
def opened(run: RunLike, *, quiet: bool = True) -> Iterator[tuple[Any, Any]]:
    """(run, dataset) read under the run's lock, held for the `with` block (an image-folder run may rebuild its
    on-disk pool if that was deleted)."""
    from alssl.data import run_dataset
    from alssl.runs import Run, run_lock

    path = run_path(run)
    with run_lock(path):
        opened_run = Run.open(path)
        yield opened_run, run_dataset(opened_run, quiet=quiet)


def _devices(accelerator: str | None, devices: str | int | None, precision: str | None,
             num_nodes: str | int | None = None):
    """The device setting (Fabric's meaning) this call's embedding / prediction runs on (`alssl.devices`), checked
    now: `with` it around the work."""
    from alssl.devices import parse, using

    return using(parse(accelerator, devices, precision, num_nodes))


def _nodes(num_nodes: str | int | None) -> int:
    from alssl.devices import parse

    return parse(num_nodes=num_nodes).num_nodes


def _embed_feature_sets(run, dataset) -> bool:
    """Several nodes (docs/scale.md): every node runs the same command, and each starts by embedding the run's
    missing feature sets together (in the registry's order, each sharded over every rank of every node) — the one
    step where the other nodes help. Returns True on a node other than node 0: its command stops there (None),
    node 0 goes on alone (the caches are there now) and writes everything."""
    from alssl.devices import current, node_rank
    from alssl.feature_sets import feature_sets, pool_features

    if current().num_nodes == 1:
        return False
    for fs in feature_sets(run).values():
        pool_features(run.path, dataset, fs.path)
    return node_rank() > 0


def spec_path(spec: str) -> str:
    """A data SPEC with its path made absolute (~ expanded), so later commands work from any directory."""
    if spec.startswith("cifar10:"):
        return "cifar10:" + str(Path(spec[len("cifar10:"):]).expanduser().resolve())
    if spec == "digits":
        return spec
    return str(Path(spec).expanduser().resolve()) + ("/" if spec.endswith("/") else "")


def data_config(spec: str, imbalance: float | None = None, seed: int = 0, **folder: object) -> dict:
    """The data section of run.toml (absolute paths); image-folder keys only where given."""
    cfg = {"spec": spec_path(spec), "imbalance": imbalance, "seed": seed}
    return cfg | {k: v for k, v in folder.items() if v is not None}


def class_list(classes: str | Sequence[str] | None) -> list[str] | None:
    """Class names from a list, or from text `a,b,c` / `@classes.txt` (the CLI's --classes)."""
    from alssl.data.folder import parse_classes

    if classes is None:
        return None
    return parse_classes(classes) if isinstance(classes, str) else parse_classes(",".join(map(str, classes)))


def _abs_init(init: str | os.PathLike | None) -> str | None:
    return init if init is None or init == "hub" else str(Path(init).expanduser().resolve())


# ---------------------------------------------------------------- stage 1
@_keywords
def pretrain(data: str, out: str | os.PathLike, *, test: str | os.PathLike | None = None,
             classes: str | Sequence[str] | None = None, image_size: int | None = None, strict: bool = False,
             jpeg_draft: bool = True, workers: int | None = None, pool_format: str = "auto", method: str = "simsiam",
             backbone: str = "cnn",
             init: str | None = None, epochs: int = 20, batch_size: int = 256, lr: float | None = None,
             eman: bool = False, devices: str | int = "1", accelerator: str = "auto", precision: str = "32-true",
             num_nodes: str | int | None = None, strategy: str = "auto", imbalance: float | None = None,
             ckpt_every_steps: int = 0, momentum: float = 0.99,
             momentum_schedule: str | None = None, queue_size: int | None = None, temperature: float = 0.2,
             knn_every: int = 1, hflip: bool | None = None, compile: bool = False, minutes: float | None = None,
             seed: int = 0, quiet: bool = True) -> dict | None:
    """Stage 1: create the run dir `out` (or resume it: the same arguments again) and pretrain; returns the stage's
    summary (features' score at the start and at the end, steps, seconds), None on a non-zero rank. `num_nodes` > 1
    (default $ALSSL_NUM_NODES or 1): the same call on every node (docs/scale.md); node 0 creates `out`, the others
    wait for it."""
    from alssl.config import PretrainArgs
    from alssl.data import is_pool_spec, load_dataset, run_dataset
    from alssl.runs import Run, check_writable, run_lock

    out = Path(out)
    args = PretrainArgs(method=method, backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, eman=eman,
                        seed=seed, hflip=hflip, momentum=momentum, momentum_schedule=momentum_schedule,
                        queue_size=queue_size, temperature=temperature, init=_abs_init(init))
    if minutes is not None:
        check_positive(minutes, "--minutes", "--minutes 15")
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be at least 1 pixel (got {image_size}); e.g. --image-size 64")
    if pool_format not in ("auto", "raw", "jpeg"):
        raise unknown("--pool-format", pool_format, ("auto", "raw", "jpeg"))
    fmt = None if pool_format == "auto" else pool_format
    names = class_list(classes)
    folder = is_pool_spec(data)  # an in-memory SPEC is checked whole before anything heavy (folders: while decoding)
    # a resumed run reads its own data (an image folder's RUN/pool works with the folder moved away)
    preloaded = None if folder or Run.exists(out) else load_dataset(data, imbalance=imbalance, seed=seed, test=test,
                                                                    classes=names, image_size=image_size,
                                                                    jpeg_draft=jpeg_draft, pool_format=fmt)
    from alssl.backbones import check_backbone_name
    from alssl.devices import node_rank
    from alssl.pretraining import check_args, pretrain as run_pretrain

    check_backbone_name(backbone)
    dev: int | str = int(devices) if str(devices).isdigit() else devices
    nodes = _nodes(num_nodes)
    check_args(method=method, eman=eman, momentum=momentum, momentum_schedule=momentum_schedule,
               accelerator=accelerator, devices=dev, num_nodes=nodes, strategy=strategy, precision=precision,
               seed=seed)
    if nodes > 1 and node_rank() > 0:
        _wait_for_run(out)
    given = {"test": None if test is None else str(Path(test).expanduser().resolve()), "classes": names,
             "image_size": image_size, "strict": strict or None, "jpeg_draft": None if jpeg_draft else False,
             "pool_format": fmt}
    created = not out.exists()
    check_writable(out)
    try:
        with run_lock(out):
            if Run.exists(out):
                run = Run.open(out)
                args.check_same_run(run, data_config(data, imbalance, seed, **given))
                dataset = preloaded if preloaded is not None else run_dataset(run, quiet=quiet)
            else:
                run, dataset = _create_run(out, data, preloaded, args, imbalance=imbalance, seed=seed, workers=workers,
                                           quiet=quiet, given=given)
            summary = run_pretrain(dataset, run, **args.as_config(), devices=dev, num_nodes=nodes,
                                   accelerator=accelerator, precision=precision, strategy=strategy,
                                   ckpt_every_steps=ckpt_every_steps, knn_every=knn_every, compile=compile,
                                   minutes=minutes, quiet=quiet)
            if summary is None:  # a rank other than global rank 0
                return None
            return {"run": str(out), **run.record_stage("pretrain", summary)}
    except BaseException:
        if created and not Run.exists(out):  # bad input or a stop before the run existed: leave nothing behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _wait_for_run(out: Path) -> None:
    """A node other than node 0 (several nodes): wait until node 0 has created the run dir `out` (it decodes an
    image folder first), up to $ALSSL_NODE_WAIT seconds (default 3600)."""
    import sys
    import time

    from alssl.runs import Run

    limit = float(os.environ.get("ALSSL_NODE_WAIT", "3600"))
    deadline = time.monotonic() + limit
    if not Run.exists(out):
        print(f"# waiting for node 0 to create {out}", file=sys.stderr, flush=True)
    while not Run.exists(out):
        if time.monotonic() > deadline:
            raise UserError(f"node 0 did not create {out} within {limit:g} s (ALSSL_NODE_WAIT); start node 0 with the "
                            f"same command, and put --out on a filesystem every node shares")
        time.sleep(1.0)


def _create_run(out: Path, data: str, preloaded, args, *, imbalance, seed: int, workers, quiet: bool, given: dict):
    """A new run dir: the dataset (an image folder decoded into RUN/pool), the backbone checked on it, run.toml."""
    from alssl.data import is_pool_spec, load_dataset
    from alssl.runs import Run, atomic_write_text

    try:
        dataset = preloaded or load_dataset(data, imbalance=imbalance, seed=seed, pool_dir=out / "pool",
                                            workers=workers, quiet=quiet, **given)
        cfg = data_config(data, imbalance, seed, **given)
        if is_pool_spec(data):
            cfg |= ({"source": data} if spec_path(data) != data else {}) | {
                "classes": dataset.classes or None, "image_size": dataset.image_size,
                "pool_format": dataset.pool_identity["pool_format"],
                "pool": {"n": dataset.n_pool, "image_size": dataset.image_size, "channels": dataset.channels,
                         **(dataset.pool_identity or {})}}
        _prepare_backbone(args.backbone, args.init, dataset.channels, dataset.image_size)
        run = Run.create(out, n_pool=dataset.n_pool, config={"data": cfg, "pretrain": args.as_config()})
    except BaseException:
        shutil.rmtree(out / "pool", ignore_errors=True)
        raise
    if dataset.skipped:
        atomic_write_text(out / "skipped.csv", _skipped_csv(dataset.skipped))
        warn(f"skipped {len(dataset.skipped)} unreadable image file(s), listed in {out / 'skipped.csv'} "
             f"(e.g. {dataset.skipped[0][0]}: {dataset.skipped[0][1]}); use --strict to stop instead")
    return run, dataset


def _prepare_backbone(name: str, init: str | None, channels: int, size: int) -> None:
    """Build the backbone, load `init` and run it once at the pool's image size: refuses a model that cannot take
    these images or weights that do not fit, before the run dir is made."""
    from alssl.backbones import build_backbone, check_input_size, load_init_weights

    model = build_backbone(name, channels)
    if init is not None:
        load_init_weights(model, name, init)
    check_input_size(model, name, channels, size)


def _skipped_csv(skipped: list) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    return buf.getvalue()


# ---------------------------------------------------------------- stage 2 and the feature sets
@_keywords
def probe(run: RunLike, *, probe: str = "linear", kernel: str = "linear", seed: int = 0,
          accelerator: str | None = None, devices: str | int | None = None, precision: str | None = None,
          num_nodes: str | int | None = None) -> dict | None:
    """Stage 2: a probe on the frozen features of the labeled set (the feature set measured strongest on the labels);
    its test accuracy, or cross-validated accuracy for a pool without a labeled test set (None on a node other than
    node 0, which only helps embedding: docs/scale.md)."""
    from alssl.feature_sets import choose, pool_features
    from alssl.probes import KERNELS, PROBES, cross_val_accuracy, fit_probe

    on = _devices(accelerator, devices, precision, num_nodes)
    check_seed(seed)
    if probe not in PROBES:
        raise unknown("probe", probe, PROBES)
    if kernel not in KERNELS:
        raise unknown("kernel", kernel, KERNELS)
    with on, opened(run) as (r, dataset):
        idx = r.require_labels()  # (checked on every node alike before the nodes embed together)
        if _embed_feature_sets(r, dataset):
            return None
        choice = choose(r, dataset, test_probe=probe, kernel=kernel, seed=seed)
        train, test = pool_features(r.path, dataset, choice.path)
        y = r.labels[idx]
        record: dict = {"probe": probe, "n_labeled": int(len(idx))}
        if dataset.has_test:
            model = fit_probe(probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
            record["accuracy"] = round(float(model.accuracy(test, dataset.y_test)), 4)
        else:
            acc, k = cross_val_accuracy(probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
            record |= {"cv_accuracy": None if acc is None else round(float(acc), 4), "cv_folds": k,
                       "note": ("no labeled test set: stratified k-fold cross-validation on the labeled set"
                                if acc is not None else
                                "no labeled test set and a class with a single label: label more to measure accuracy")}
        record |= {"features_in_use": choice.name, "features_why": choice.why,
                   "features": {n: {k: v for k, v in s.items() if k != "origin"} for n, s in choice.scores.items()}}
        _remember_choice(r, choice)
        if len(set(r.labeled_round[r.labeled_round >= 0].tolist())) >= 2:  # the stopping signal needs 2 rounds
            from alssl.stopping import WINDOW, stopping_signal

            sig = stopping_signal(train, r.labeled_round, r.labels, num_classes=dataset.num_classes, probe=probe,
                                  kernel=kernel, seed=seed, cv_rounds=0)
            record |= {"kappa": sig["kappa"][-WINDOW:], "predictions_stable": sig["stable"]}
        r.log_metrics({"stage": "probe", "round": r.n_rounds, **record})
    return record


def _remember_choice(run, choice) -> None:
    """Keep the last measured feature choice in state.json for `alssl status` (which loads no torch)."""
    run.record_stage("features", {"in_use": choice.name, "n_labeled": int(run.labeled_mask.sum()),
                                  "line": choice.line(), "why": choice.why})


@_keywords
def features(run: RunLike, *, add: str | None = None, init: str | None = None, name: str | None = None,
             use: str | None = None, accelerator: str | None = None, devices: str | int | None = None,
             precision: str | None = None, num_nodes: str | int | None = None) -> dict | None:
    """The run's feature sets, each scored on the labels, and which is in use; `add` a backbone (with `init`
    weights, a path or "hub") as a new set, or `use` NAME to pin one (auto: choose by measurement)."""
    from alssl.feature_sets import add_feature_set, check_name, choose, default_name, pin

    on = _devices(accelerator, devices, precision, num_nodes)
    if add is None and (init is not None or name is not None):
        raise UserError("--init and --name go with --add BACKBONE; e.g. alssl features RUN --add timm:resnet50 "
                        "--init hub")
    if add is not None and use is not None:
        raise UserError("give --add or --use, not both (add first, then pin it with --use NAME)")
    if add is not None and _nodes(num_nodes) > 1:
        raise UserError("add a feature set on one machine (without --num-nodes), then embed it on every node with "
                        "`alssl features RUN --num-nodes N`")
    if add is not None:
        from alssl.backbones import check_backbone_name

        check_backbone_name(add)
        init = _abs_init(init)
        name = check_name(name if name is not None else default_name(add, init))
    with on, opened(run) as (r, dataset):
        if _embed_feature_sets(r, dataset):
            return None
        added = add_feature_set(r, dataset, backbone=add, init=init, name=name).name if add is not None else None
        if use is not None:
            pin(r, use)
        choice = choose(r, dataset, test_probe="linear" if dataset.has_test else None)
        if r.labeled_mask.any():
            _remember_choice(r, choice)
    return {"run": str(run_path(run)), **({"added": added} if added else {}), "in_use": choice.name, "why": choice.why,
            "features": choice.scores, "line": choice.line()}


# ---------------------------------------------------------------- stage 3
@_keywords
def query(run: RunLike, budget: str | int, *, strategy: str = "random", seed: int = 0, probe: str = "linear",
          delta: float | None = None, kernel: str | None = None, thumbnails: bool = False,
          skip_duplicates: bool | None = None, balance: bool = False, accelerator: str | None = None,
          devices: str | int | None = None, precision: str | None = None,
          num_nodes: str | int | None = None) -> dict | None:
    """Stage 3: pick `budget` new samples (a count, or "2%" of the pool); writes RUN/queries/round-K.csv and returns
    {file, round, indices, ids, reshown} (reshown: the round was still open, nothing new was picked)."""
    from alssl.budget import budget_count
    from alssl.probes import KERNELS, PROBES
    from alssl.rounds import query as run_query

    on = _devices(accelerator, devices, precision, num_nodes)
    budget = str(budget)
    check_seed(seed)
    budget_count(budget, n_pool=max(1, open_run(run).n_pool))  # a bad budget answers before any loading
    if probe not in PROBES:  # checked before the feature sets are measured (which writes caches in the run)
        raise unknown("probe", probe, PROBES)
    if kernel is not None and kernel not in KERNELS:
        raise unknown("kernel", kernel, KERNELS)
    options = {k: v for k, v in {"delta": delta, "kernel": kernel, "skip_duplicates": skip_duplicates,
                                 "balance": balance or None}.items() if v is not None}
    with on, opened(run) as (r, dataset):
        if _embed_feature_sets(r, dataset):
            return None
        path, reshown = run_query(r, dataset, budget=budget, strategy=strategy, seed=seed, probe=probe,
                                  thumbnails=thumbnails, options=options)
        q = r.open_query
        return {"file": str(path), "round": q["round"], "indices": list(q["indices"]),
                "ids": [dataset.ids[i] for i in q["indices"]], "reshown": reshown}


@_keywords
def label(run: RunLike, labels: Mapping | str | os.PathLike, *, any_images: bool = False,
          classes: str | Sequence[str] | None = None) -> dict:
    """Import labels for the open query: a mapping {pool index or image id: class name or id} (write "__skip__"
    for an image that fits no class), a label file (CSV, Label Studio export), or "oracle" (the dataset's ground
    truth, a simulation). `any_images`: labels for any unlabeled pool images, as a round of their own."""
    from alssl.rounds import check_source, import_labels

    check_source(labels, any_images=any_images)  # before the run (and an image folder's pool) is opened
    names = class_list(classes)
    with opened(run) as (r, dataset):
        n = import_labels(r, dataset, labels, any_images=any_images, classes=names)
        return {"imported": n, "skipped": len(r.rounds[-1].get("skipped", [])), "labeled": int(r.labeled_mask.sum()),
                "rounds": r.n_rounds}


# ---------------------------------------------------------------- what a run holds
@_keywords
def status(run: RunLike) -> dict:
    """What the run holds: data, stages done, labeled count per round, open query, last metrics, caches."""
    from alssl.runs import Run, read_jsonl

    r = Run.open(run_path(run))
    data = r.data_config
    q = r.open_query
    metrics = read_jsonl(r.metrics_file)
    probes = [m for m in metrics if m.get("stage") == "probe"]
    return {
        "run": str(run_path(run)),
        "data": data["spec"],
        "test": data.get("test"),
        "classes": data.get("classes"),
        "image_size": data.get("image_size"),
        "skipped": _count_rows(r.path / "skipped.csv"),
        "pool": r.n_pool,
        "labeled": int(r.labeled_mask.sum()),
        "skipped_images": [{"index": i, "round": rd["round"]} for rd in r.rounds for i in rd.get("skipped", [])],
        "stages": r.stages,
        "rounds": r.rounds,
        "open_query": None if q is None else {k: v for k, v in q.items() if k != "indices"},
        "last_metrics": (metrics or [None])[-1],
        "last_probe": probes[-1] if probes else None,
        "probcover_delta": _cached_json(r.path, "*.probcover.json", _delta_of, "probcover query"),
        "near_duplicates": _cached_json(r.path, "*.duplicates-*.json", _duplicates_of, "query"),
    }


def _delta_of(obj) -> dict:
    delta = obj["delta"]
    if not isinstance(delta, dict) or not all(isinstance(v, (int, float)) for v in delta.values()):
        raise ValueError
    return delta


def _duplicates_of(obj) -> dict:
    if not all(isinstance(obj.get(k), (int, float)) for k in ("tau", "groups", "images", "pool")):
        raise ValueError
    return obj


def _cached_json(run_dir: Path, pattern: str, read, who: str) -> dict:
    """The cached per-feature-set results (ProbCover's radii, near-duplicate groups) by embeddings sha; a damaged
    file is skipped with a warning (it is only a cache: the next query recomputes it)."""
    out = {}
    for f in sorted((run_dir / "features").glob(pattern)):
        try:
            out[f.name.split(".")[0]] = read(json.loads(f.read_text()))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            warn(f"{f} is damaged and not shown; delete it (the next {who} recomputes it)")
    return out


def _count_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


# ---------------------------------------------------------------- stage 4
@_keywords
def semi_finetune(run: RunLike, *, method: str = "fixmatch", steps: int = 1000, batch_size: int = 64, mu: int = 7,
                  tau: float = 0.95, lambda_u: float = 1.0, lr: float = 0.03, teacher: str = "ema",
                  from_scratch: bool = False, backbone: str | None = None, init: str | None = None,
                  unlabeled_profile: str = "same", unlabeled_imbalance: float | None = None, ckpt_every: int = 100,
                  hflip: bool | None = None, options: Mapping[str, Any] | None = None, compile: bool = False,
                  minutes: float | None = None, accelerator: str | None = None, devices: str | int | None = None,
                  precision: str | None = None, num_nodes: str | int | None = None, seed: int = 0,
                  quiet: bool = True) -> dict | None:
    """Stage 4: semi-supervised fine-tune on the labels bought, from the feature set measured strongest on them
    (or `from_scratch`, or `init` weights); its test accuracy beside the linear probe's on the same labels. With
    `devices > 1` (DDP, docs/scale.md) the script is re-run for each rank; with `num_nodes > 1` the same call runs on
    every node; ranks other than global rank 0 return None."""
    from alssl import devices as dev
    from alssl.config import SemiArgs
    from alssl.semi.trainer import PRECISIONS

    args = SemiArgs(method=method, steps=steps, batch_size=batch_size, mu=mu, tau=tau, lambda_u=lambda_u, lr=lr,
                    teacher=teacher, seed=seed).as_config()
    setting = dev.parse(accelerator, devices, precision, num_nodes)
    on = dev.using(setting)
    if setting.precision not in PRECISIONS:
        raise UserError(f"--precision {setting.precision} is not offered by semi-finetune; use "
                        f"{' or '.join(PRECISIONS)}")
    if batch_size % setting.world:
        raise UserError(f"--batch-size {batch_size} does not split over {setting.world} devices (it is the global "
                        f"batch over every node); use a multiple of {setting.world}")
    if minutes is not None:
        check_positive(minutes, "--minutes", "--minutes 15")
    if unlabeled_profile not in ("same", "reversed"):
        raise unknown("unlabeled profile", unlabeled_profile, ["same", "reversed"])
    if init is not None and from_scratch:
        raise UserError("--init and --from-scratch both replace the stage-1 backbone; give one of them")
    if backbone is not None:
        from alssl.backbones import check_backbone_name

        check_backbone_name(backbone)
    init = _abs_init(init)
    options = {"unlabeled_profile": unlabeled_profile, "unlabeled_imbalance": unlabeled_imbalance, "hflip": hflip,
               **(options or {})}
    with on, opened(run) as (r, dataset):
        return _semi_in_run(r, dataset, setting, args, options, from_scratch=from_scratch, backbone=backbone,
                            init=init, ckpt_every=ckpt_every, compile=compile, minutes=minutes, quiet=quiet)


def _semi_in_run(run, dataset, setting, args: dict, options: dict, *, from_scratch: bool, backbone: str | None,
                 init: str | None, ckpt_every: int, compile: bool, minutes: float | None, quiet: bool) -> dict | None:
    """The fine-tune in its folder RUN/semi/METHOD-Nlab-TAG (TAG: a digest of everything that defines it, so a rerun
    resumes it), its result beside the probe baseline, logged once to metrics.jsonl."""
    from alssl.runs import read_jsonl
    from alssl.semi import semi_finetune as run_semi

    idx = run.require_labels()
    fresh = from_scratch or init is not None  # start from random init / the user's weights, not from stage 1
    ckpt, record, baseline = run.checkpoints / "backbone.pt", {}, None
    if not fresh and not ckpt.exists():
        raise UserError(f"{run.path} has no stage-1 backbone; run `alssl pretrain` first or pass --from-scratch")
    if not fresh:  # start from the feature set measured strongest on the labels (alssl/feature_sets.py)
        from alssl.feature_sets import choose

        choice = choose(run, dataset, test_probe="linear")
        ckpt, record = choice.path, choice.record()
        baseline = choice.scores[choice.name].get("test_accuracy")  # the linear probe on the same labels
    start_from = [record["features"]] if record.get("features", "ssl") != "ssl" else []  # (ssl: as before)
    tag = hashlib.sha256(json.dumps([args, options, from_scratch, backbone, idx.tolist()] + ([init] if init else [])
                                    + start_from, sort_keys=True).encode()).hexdigest()[:8]
    out = run.path / "semi" / f"{args['method']}-{len(idx)}lab-{tag}"
    res = run_semi(dataset, labeled_idx=idx, labeled_y=run.labels[idx], out_dir=out,
                   backbone=backbone or run.config["pretrain"]["backbone"], init_weights=init,
                   init_checkpoint=None if fresh else ckpt, ckpt_every=ckpt_every, compile=compile,
                   device={"gpu": "cuda"}.get(setting.accelerator, setting.accelerator), precision=setting.precision,
                   devices=setting.devices, num_nodes=setting.num_nodes, quiet=quiet, options=options, record=record,
                   minutes=minutes, **args)
    if res is None:  # a DDP rank > 0: rank 0 reports and logs
        return None
    res = {**res, **record}
    if baseline is not None and res.get("accuracy") is not None:
        res["probe_accuracy"] = baseline
        if res["accuracy"] < baseline:
            warn(f"the fine-tune scores {res['accuracy']:.3f} on the test set, below the linear probe's {baseline:.3f} "
                 f"on the same labels and features: fine-tune longer (--steps), or keep the probe "
                 f"(`alssl export {run.path} --classifier probe`)")
    rec = {"stage": "semi", "dir": str(out.relative_to(run.path)),
           **{k: v for k, v in res.items() if k != "per_class_recall"}}
    if "stopped_at" not in res and not any(m.get("stage") == "semi" and m.get("dir") == rec["dir"]
                                           for m in read_jsonl(run.metrics_file)):
        run.log_metrics(rec)  # once per fine-tune: a rerun of a finished one (or after a kill) adds no twin
    return res


# ---------------------------------------------------------------- models out
@_keywords
def export(run: RunLike, out: str | os.PathLike, *, classifier: str = "auto", force: bool = False,
           accelerator: str | None = None, devices: str | int | None = None, precision: str | None = None,
           num_nodes: str | int | None = None) -> dict | None:
    """The best model the run has (the fine-tune on the current labels, else backbone + linear probe; `classifier`
    auto | semi | probe) -> OUT/model.pt, model.ts (TorchScript) and model.json; returns model.json's summary."""
    from alssl.models import EXPORT_FILES, export as run_export, is_export_dir
    from alssl.runs import check_output, check_writable, data_inputs

    on = _devices(accelerator, devices, precision, num_nodes)
    out = Path(out)
    with on, opened(run) as (r, dataset):
        r.require_labels("classifier to export")
        check_output(out, names=EXPORT_FILES, is_previous=is_export_dir, inputs=data_inputs(r.data_config),
                     force=force, what="an exported model")
        if _embed_feature_sets(r, dataset):
            return None
        check_writable(out)
        card = run_export(r, dataset, out, classifier=classifier)
    keys = ("classifier", "features", "classes", "image_size", "accuracy", "accuracy_on", "probe_accuracy")
    return {"out": str(out), **{k: card.get(k) for k in keys if k in card or k == "features"}}


@_keywords
def predict(run: RunLike, *, out: str | os.PathLike, data: Sequence[str | os.PathLike] = (), pool: bool = False,
            classifier: str = "auto", workers: int | None = None, force: bool = False,
            accelerator: str | None = None, devices: str | int | None = None, precision: str | None = None,
            num_nodes: str | int | None = None, quiet: bool = True) -> dict | None:
    """Classes for image files / folders (`data`) or every unlabeled pool image (`pool=True`) with the run's best
    model, as `export` picks it -> the CSV `out` (path,label,confidence)."""
    from alssl.models import is_predictions_csv, predict_files, predict_pool
    from alssl.runs import check_output, data_inputs

    on = _devices(accelerator, devices, precision, num_nodes)
    out = Path(out)
    sources = [Path(p).expanduser() for p in data]
    if pool == bool(sources):
        raise UserError("give images to predict (--data DIR_OR_FILES...) or --pool, not both and not neither")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a CSV file name like {out / 'predictions.csv'}")
    with on, opened(run) as (r, dataset):
        r.require_labels("classifier to predict with")
        check_output(out, names=None, is_previous=is_predictions_csv, inputs=[*data_inputs(r.data_config), *sources],
                     force=force, what="a predictions CSV")
        if _embed_feature_sets(r, dataset):  # the predictions themselves run on node 0 alone
            return None
        if pool:
            return predict_pool(r, dataset, out, classifier=classifier, quiet=quiet)
        return predict_files(r, dataset, sources, out, workers=workers, quiet=quiet, classifier=classifier)


# ---------------------------------------------------------------- labeling pages and tools
@_keywords
def label_session(run: RunLike, *, classes: str | Sequence[str] | None = None):
    """The labeling page's session for the open query (`alssl.labeling.session.LabelSession`), loaded under the
    run's lock; `alssl.labeling.server.make_app(session, token)` serves it (the page takes the lock again to import)."""
    from alssl.labeling.session import LabelSession
    from alssl.rounds import resolve_classes

    names = class_list(classes)
    with opened(run) as (r, dataset):
        label_classes, store = resolve_classes(r, dataset, names)
        session = LabelSession(r.path, dataset, classes=label_classes, store=store)
        session.load(r)
    return session


@_keywords
def tasks(run: RunLike, out: str | os.PathLike, *, classes: str | Sequence[str] | None = None,
          document_root: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Label Studio tasks for the open query (tasks.json, config.xml, images/ where needed) in `out`."""
    from alssl.labeling.studio import TASK_FILES, is_tasks_dir, write_tasks
    from alssl.rounds import resolve_classes
    from alssl.runs import check_output, check_writable, data_inputs

    out = Path(out)
    names = class_list(classes)
    with opened(run) as (r, dataset):
        label_classes, _ = resolve_classes(r, dataset, names)
        if r.open_query is not None:
            check_output(out, names=TASK_FILES, is_previous=is_tasks_dir, inputs=data_inputs(r.data_config),
                         force=force, what="Label Studio tasks")
            check_writable(out)
        res = write_tasks(r, dataset, out, classes=label_classes,
                          document_root=None if document_root is None else Path(document_root))
        return res | {"has_classes": bool(dataset.classes)}


# ---------------------------------------------------------------- experiments
CURVE_FILES = ["curve.csv", "curve.png", "curve.svg", "grid.json", "cells", "pretrain"]


@_keywords
def curve(out: str | os.PathLike, *, data: str = "digits", strategies: Sequence[str] | str = ("random", "entropy",
          "kcenter", "typiclust"), budgets: Sequence[str | int] | str = ("1%", "2%", "5%", "10%"), seeds: int = 3,
          probe: Sequence[str] | str = ("linear",), semi: str | None = None, semi_steps: int = 500,
          semi_batch_size: int = 64, semi_mu: int = 7, from_run: str | os.PathLike | None = None,
          method: str = "simsiam", backbone: str = "cnn", epochs: int = 20, batch_size: int = 256,
          imbalance: float | None = None, jobs: int = 1, balance: bool = False, delta: float | None = None,
          force: bool = False, title: str | None = None, accelerator: str | None = None,
          devices: str | int | None = None, precision: str | None = None, quiet: bool = True) -> dict:
    """Budget curve: strategies × cumulative budgets × seeds (and probes) -> OUT/curve.csv, curve.png, curve.svg.
    Rerun to resume. Stage 1 is pretrained once in OUT/pretrain, or reused from `from_run`. One machine
    ($ALSSL_NUM_NODES is not read)."""
    on = _devices(accelerator, devices, precision, num_nodes=1)
    options = ({"balance": True} if balance else {}) | ({} if delta is None else {"delta": delta})
    pargs = {"method": method, "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "lr": None,
             "eman": False, "seed": 0}
    with on:
        return _curve(Path(out), data_config(data, imbalance, 0), pargs, strategies=strategies, budgets=budgets,
                      seeds=seeds, probes=probe, semi=semi, semi_steps=semi_steps, semi_batch_size=semi_batch_size,
                      semi_mu=semi_mu, options=options, from_run=from_run, jobs=jobs, force=force, title=title,
                      quiet=quiet)


@_keywords
def run_pipeline(config: str | os.PathLike, *, out: str | os.PathLike | None = None, force: bool = False,
                 quiet: bool = True) -> dict:
    """The whole pipeline of a config (pipelines/NAME.toml): pretrain once, then the budget-curve grid and plots."""
    from alssl.config import load_config

    cfg = load_config(config)  # torch-free: a bad config is refused before the heavy imports
    c = cfg.curve
    pargs = cfg.pretrain.curve_args(Path(config).parent)
    return _curve(Path(out or cfg.output.dir), data_config(cfg.data.spec, cfg.data.imbalance, cfg.data.seed), pargs,
                  strategies=c.strategies, budgets=c.budgets, seeds=c.seeds, probes=c.probes, semi=c.semi,
                  semi_steps=c.semi_steps, semi_batch_size=c.semi_batch_size, semi_mu=c.semi_mu,
                  options={} if c.delta is None else {"delta": c.delta}, from_run=cfg.pretrain.from_run, jobs=c.jobs,
                  force=force, title=cfg.output.title, quiet=quiet)


def _curve(out: Path, data_cfg: dict, pargs: dict, *, strategies, budgets, seeds: int, probes, semi, semi_steps: int,
           semi_batch_size: int, semi_mu: int, options: dict, from_run, jobs: int, force: bool, title: str | None,
           quiet: bool) -> dict:
    from dataclasses import replace

    from alssl.curves import Grid, run_experiment
    from alssl.devices import current, using

    _check_curve_out(out, data_cfg, force)
    grid = Grid(data=data_cfg, strategies=_listed(strategies), budgets=[str(b) for b in _listed(budgets)],
                seeds=seeds, probes=_listed(probes), semi=semi, semi_steps=semi_steps, semi_batch_size=semi_batch_size,
                semi_mu=semi_mu, options=options)
    with using(replace(current(), num_nodes=1)):  # a grid runs on one machine
        csv_path, png, svg = run_experiment(out, grid, pretrain_args=pargs, jobs=jobs, quiet=quiet, title=title,
                                            from_run=None if from_run is None else Path(from_run))
    return {"csv": str(csv_path), "png": str(png), "svg": str(svg)}


def _listed(value: Sequence | str) -> list:
    return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else list(value)


def _check_curve_out(out: Path, data: dict, force: bool) -> None:
    """A curve dir is a new folder or an earlier grid (it holds grid.json); never inside a run dir or the data."""
    from alssl.runs import check_output, data_inputs

    check_output(out, names=CURVE_FILES, is_previous=lambda d: (d / "grid.json").is_file(), inputs=data_inputs(data),
                 force=force, what="a budget curve")


@_keywords
def redraw_curve(out: str | os.PathLike) -> dict:
    """Redraw OUT/curve.png and curve.svg from OUT/curve.csv."""
    from alssl.plots import plot_curve

    out = Path(out)
    if not (out / "curve.csv").exists():
        raise UserError(f"{out} has no curve.csv; run `alssl curve --out {out}` first")
    png, svg = plot_curve(out / "curve.csv", title=_curve_title(out))
    return {"png": str(png), "svg": str(svg)}


def _curve_title(out: Path) -> str | None:
    """The title a redraw gets: the grid's data and (when the grid pretrained its own backbone) its features."""
    import tomllib

    from alssl.plots import curve_title

    try:
        grid = json.loads((out / "grid.json").read_text())
        toml = out / "pretrain" / "run.toml"
        pre = tomllib.loads(toml.read_text()).get("pretrain") if toml.is_file() else None
        return curve_title(grid["data"]["spec"], pre, grid.get("probes") or ["linear"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
