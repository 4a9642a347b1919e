"""The `alssl` command line: a thin typer layer over the library (no method logic here).

Every command validates its input before it writes anything; a `UserError` becomes exit code 2 and one
`error:` line on stderr, with no traceback, and the run dir is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.22 vendors click; older typer depends on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from alssl.errors import UserError, check_positive, check_seed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Self-supervised pretraining + active learning + semi-supervised fine-tuning under a labeling budget.\n\n"
    "Example: alssl pretrain --data digits --out runs/d && alssl query runs/d --budget 2% && alssl label runs/d --oracle",
)


def _accelerator_option():
    return typer.Option(None, "--accelerator", help="Where the network runs (Fabric's meaning): auto (the GPU when present) | cpu | cuda | gpu | mps; default $ALSSL_ACCELERATOR or auto")


def _devices_option():
    return typer.Option(None, "--devices", help="Devices to embed/predict on; > 1 shards the pool over that many processes (docs/scale.md); default $ALSSL_DEVICES or 1")


def _precision_option():
    return typer.Option(None, "--precision", help="32-true | bf16-mixed | 16-mixed (autocast); default $ALSSL_PRECISION or 32-true")


def _use_devices(accelerator: Optional[str], devices: Optional[str], precision: Optional[str]) -> None:
    """Validate the device setting (torch-free) and make it the one this command's embedding / prediction reads."""
    from alssl import devices as dev

    dev.use(dev.parse(accelerator, devices, precision))


def _quiet(quiet: bool) -> bool:
    return quiet or not sys.stderr.isatty()


def _load_run(run_dir: Path, *, quiet: bool = True):
    """Open a run and its dataset exactly as it was when the run was made. Call it under `run_lock(run_dir)`: an
    image-folder run may rebuild its on-disk pool (RUN/pool) if that was deleted."""
    from alssl.runs import Run

    run = Run.open(run_dir)
    return run, _run_dataset(run, quiet=quiet)


def _run_dataset(run, *, quiet: bool = True):
    from alssl.data import load_dataset

    cfg = run.config["data"]
    dataset = load_dataset(cfg["spec"], imbalance=cfg.get("imbalance"), seed=cfg.get("seed", 0), test=cfg.get("test"),
                           classes=cfg.get("classes"), image_size=cfg.get("image_size"), strict=cfg.get("strict", False),
                           pool_dir=run.path / "pool", quiet=quiet, expect=cfg.get("pool"),
                           jpeg_draft=cfg.get("jpeg_draft", True))
    if dataset.n_pool != run.state["n_pool"]:
        raise UserError(f"the data {cfg['spec']} no longer matches {run.path} ({dataset.n_pool} vs {run.state['n_pool']} samples); restore the data or start a new run")
    return dataset


def _spec_path(spec: str) -> str:
    """A data SPEC with its path made absolute (~ expanded), so later commands work from any directory."""
    if spec.startswith("cifar10:"):
        return "cifar10:" + str(Path(spec[len("cifar10:"):]).expanduser().resolve())
    if spec == "digits":
        return spec
    return str(Path(spec).expanduser().resolve()) + ("/" if spec.endswith("/") else "")


def _data_config(spec: str, imbalance: Optional[float], seed: int, **folder: object) -> dict:
    """The data section of run.toml (absolute paths); image-folder keys only where given."""
    cfg = {"spec": _spec_path(spec), "imbalance": imbalance, "seed": seed}
    return cfg | {k: v for k, v in folder.items() if v is not None}


def _source(spec: str) -> dict:
    """An image folder's SPEC as the user typed it, for information (run.toml `data.source`): the run itself reads
    RUN/pool and needs the folder only to rebuild that."""
    return {"source": spec} if _spec_path(spec) != spec else {}


def _classes_option(text: Optional[str]) -> Optional[list[str]]:
    from alssl.data.folder import parse_classes

    return None if text is None else parse_classes(text)


# ------------------------------------------------------------------ stage 1
@app.command()
def pretrain(
    data: str = typer.Option("digits", help="Data SPEC: digits | FILE.npz | DIR/ (train/+test/) | cifar10:DIR | any folder of images (an unlabeled pool)"),
    out: Path = typer.Option(..., help="Run dir to create (or resume)"),
    test: Optional[Path] = typer.Option(None, help="Image folders only: a labeled test set, one subfolder per class"),
    classes: Optional[str] = typer.Option(None, help="Image folders only: class names a,b,c or @classes.txt (logit order)"),
    image_size: Optional[int] = typer.Option(None, help="Image folders only: train at S×S (shorter side resized, centre crop); default 32 if every image is ≤ 32 px, else 64"),
    strict: bool = typer.Option(False, help="Image folders only: stop at the first unreadable file instead of skipping it"),
    jpeg_draft: bool = typer.Option(True, "--jpeg-draft/--no-jpeg-draft", help="Image folders only: decode big JPEGs at reduced scale (fast); --no-jpeg-draft decodes them whole, so the pool's pixels are exactly torchvision's Resize+CenterCrop (for a model.ts fed by a standard pipeline: docs/export.md)"),
    workers: Optional[int] = typer.Option(None, min=1, help="Processes that decode an image folder (default: CPU count, at most 8)"),
    method: str = typer.Option("simsiam", help="simsiam | moco | byol"),
    backbone: str = typer.Option("cnn", help="cnn | resnet18 (CIFAR stem) | wrn28_2 | torchvision:NAME | timm:NAME"),
    init: Optional[str] = typer.Option(None, help="Start from these weights: a state dict .pt/.pth/.safetensors, or hub (torchvision's / timm's published weights)"),
    epochs: int = typer.Option(20, min=0, help="Epochs; 0 = no training (random init, or the --init weights as they are)"),
    batch_size: int = typer.Option(256, min=2),
    lr: Optional[float] = typer.Option(None, help="Default: the method's recipe (SimSiam 0.05·bs/256)"),
    eman: bool = typer.Option(False, help="EMAN teacher (MoCo, BYOL)"),
    devices: str = typer.Option("1", help="Devices for Lightning Fabric (e.g. 1, 2, auto)"),
    accelerator: str = typer.Option("auto", help="cpu | cuda | auto"),
    precision: str = typer.Option("32-true", help="32-true | bf16-mixed | 16-mixed"),
    strategy: str = typer.Option("auto", help="Fabric strategy: auto | ddp"),
    imbalance: Optional[float] = typer.Option(None, help="Long-tailed pool with this imbalance ratio (CIFAR-10-LT style)"),
    ckpt_every_steps: int = typer.Option(0, min=0, help="Also checkpoint every N steps (0 = every epoch only)"),
    momentum: float = typer.Option(0.99, help="Teacher momentum m (MoCo, BYOL: start of the cosine schedule)"),
    momentum_schedule: Optional[str] = typer.Option(None, help="cosine: m rises to 1 over training (default for BYOL)"),
    queue_size: Optional[int] = typer.Option(None, min=1, help="MoCo queue length (default min(4096, pool/2))"),
    temperature: float = typer.Option(0.2, min=1e-3, help="MoCo InfoNCE temperature"),
    knn_every: int = typer.Option(1, min=0, help="kNN monitor every N epochs (0 = off; off for unlabeled pools)"),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips in the views (default: on for colour images, off for 1-channel glyphs)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the student (meant for GPUs, not measured there yet; no gain on a CPU: docs/pretrain.md)"),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget for this call's training: stop when spent, keep a resumable checkpoint and the weights so far (rerun to go on)"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage 1: self-supervised pretraining. Rerun the same command to resume.

    Examples:
      alssl pretrain --data photos/ --test labeled_test/ --out runs/mine --epochs 50
      alssl pretrain --data digits --out runs/d --method simsiam --epochs 20
    """
    import shutil

    from alssl import names as registry
    from alssl.data import is_pool_spec, load_dataset
    from alssl.errors import unknown, warn
    from alssl.runs import Run, atomic_write_text, check_writable, run_lock

    # the torch-free checks first: a refused argument answers before torch, lightly and Fabric are imported
    if method not in registry.PRETRAIN_METHODS:
        raise unknown("method", method, registry.PRETRAIN_METHODS)
    if not backbone.startswith(("torchvision:", "timm:")) and backbone not in registry.BACKBONES:
        raise unknown("backbone", backbone, registry.BACKBONES)
    check_seed(seed)
    if lr is not None:
        check_positive(lr, "--lr")
    check_positive(temperature, "--temperature")
    if minutes is not None:
        check_positive(minutes, "--minutes", "--minutes 15")
    if init is not None and init != "hub":
        init = str(Path(init).expanduser().resolve())
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be at least 1 pixel (got {image_size}); e.g. --image-size 64")
    names = _classes_option(classes)
    folder = is_pool_spec(data)  # an in-memory SPEC is checked whole before anything heavy (folders: while decoding)
    # a resumed run reads its own data (an image folder's RUN/pool works with the folder moved away)
    preloaded = None if folder or Run.exists(out) else load_dataset(data, imbalance=imbalance, seed=seed, test=test,
                                                                    classes=names, image_size=image_size,
                                                                    jpeg_draft=jpeg_draft)
    from alssl.backbones import check_backbone_name
    from alssl.pretrain import check_args, pretrain as run_pretrain

    check_backbone_name(backbone)
    dev: int | str = int(devices) if devices.isdigit() else devices
    check_args(method=method, eman=eman, momentum=momentum, momentum_schedule=momentum_schedule,
               accelerator=accelerator, devices=dev, strategy=strategy, precision=precision, seed=seed)
    given = {"test": None if test is None else str(test.expanduser().resolve()), "classes": names,
             "image_size": image_size, "strict": strict or None, "jpeg_draft": None if jpeg_draft else False}
    args = {"method": method, "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "eman": eman, "seed": seed, "hflip": hflip, "momentum": momentum,
            "momentum_schedule": momentum_schedule, "queue_size": queue_size, "temperature": temperature, "init": init}
    created = not out.exists()
    check_writable(out)
    try:
        with run_lock(out):
            if Run.exists(out):
                run = Run.open(out)
                _check_same_run(run, out, args, _data_config(data, imbalance, seed, **given))
                dataset = preloaded if preloaded is not None else _run_dataset(run, quiet=_quiet(quiet))
            else:
                try:
                    dataset = preloaded or load_dataset(data, imbalance=imbalance, seed=seed, pool_dir=out / "pool",
                                                        workers=workers, quiet=_quiet(quiet), **given)
                    data_cfg = _data_config(data, imbalance, seed, **given)
                    if folder:
                        data_cfg |= _source(data) | {
                            "classes": dataset.classes or None, "image_size": dataset.image_size,
                            "pool": {"n": dataset.n_pool, "image_size": dataset.image_size,
                                     "channels": dataset.channels, **(dataset.pool_identity or {})}}
                    _prepare_backbone(backbone, init, dataset.channels, dataset.image_size)
                    run = Run.create(out, n_pool=dataset.n_pool, config={"data": data_cfg, "pretrain": args})
                except BaseException:
                    shutil.rmtree(out / "pool", ignore_errors=True)
                    raise
                if dataset.skipped:
                    atomic_write_text(out / "skipped.csv", _skipped_csv(dataset.skipped))
                    warn(f"skipped {len(dataset.skipped)} unreadable image file(s), listed in {out / 'skipped.csv'} "
                         f"(e.g. {dataset.skipped[0][0]}: {dataset.skipped[0][1]}); use --strict to stop instead")
            summary = run_pretrain(dataset, run, method=method, backbone=backbone, epochs=epochs, batch_size=batch_size,
                                   lr=lr, eman=eman, devices=dev, accelerator=accelerator, precision=precision,
                                   strategy=strategy, seed=seed, ckpt_every_steps=ckpt_every_steps, hflip=hflip,
                                   momentum=momentum, momentum_schedule=momentum_schedule, queue_size=queue_size,
                                   temperature=temperature, knn_every=knn_every, init=init, compile=compile,
                                   minutes=minutes, quiet=_quiet(quiet))
            if summary is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
                run.state["stages"]["pretrain"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
                run.save_state()
                typer.echo(json.dumps({"run": str(out), **run.state["stages"]["pretrain"]}))
    except BaseException:
        if created and not Run.exists(out):  # bad input or a stop before the run existed: leave nothing behind
            import contextlib

            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _prepare_backbone(name: str, init: Optional[str], channels: int, size: int) -> None:
    """Build the backbone, load --init and run it once at the pool's image size: refuses a model that cannot take
    these images or weights that do not fit, before the run dir is made."""
    from alssl.backbones import build_backbone, check_input_size, load_init_weights

    model = build_backbone(name, channels)
    if init is not None:
        load_init_weights(model, name, init)
    check_input_size(model, name, channels, size)


def _check_same_run(run, out: Path, args: dict, data_cfg: dict) -> None:
    """A pretrain rerun must ask for what the run was made with (then it resumes); anything else is refused."""
    old = run.config.get("pretrain", {})
    diff = [f"--{k.replace('_', '-')} {old.get(k)} (not {args[k]})" for k in args if old.get(k) != args[k]]
    old_data = run.config["data"]
    for key in ("spec", "imbalance", "test", "strict", "jpeg_draft"):
        if old_data.get(key) != data_cfg.get(key):
            flag = "--data" if key == "spec" else f"--{key}"
            diff.append(f"{flag} {old_data.get(key)} (not {data_cfg.get(key)})")
    for key in ("classes", "image_size"):  # resolved at creation: compare only when given again
        if data_cfg.get(key) is not None and old_data.get(key) != data_cfg[key]:
            diff.append(f"--{key.replace('_', '-')} {old_data.get(key)} (not {data_cfg[key]})")
    if diff:
        raise UserError(f"{out} was made with {diff[0]}; rerun with the same arguments to resume, or pick a new --out")


def _skipped_csv(skipped: list) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    return buf.getvalue()


# ------------------------------------------------------------------ stage 2
@app.command()
def probe(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    probe: str = typer.Option("linear", help="linear | svm"),
    kernel: str = typer.Option("linear", help="SVM kernel: linear | rbf"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    seed: int = typer.Option(0),
) -> None:
    """Stage 2: fit a probe on the frozen features of the labeled set; print its accuracy as JSON.

    Accuracy is on the test split; a pool without a labeled test set reports cv_accuracy (stratified k-fold on the
    labeled set, k = min(5, smallest class count)).

    Example: alssl probe runs/d --probe svm
    """
    from alssl.errors import unknown
    from alssl.features import choose, pool_features
    from alssl.probes import KERNELS, PROBES, cross_val_accuracy, fit_probe
    from alssl.runs import run_lock

    _use_devices(accelerator, devices, precision)
    check_seed(seed)
    if probe not in PROBES:
        raise unknown("probe", probe, PROBES)
    if kernel not in KERNELS:
        raise unknown("kernel", kernel, KERNELS)
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        idx = run.labeled_indices
        if len(idx) == 0:
            raise UserError(f"{run_dir} has no labeled samples yet; run `alssl query {run_dir} --budget 2%` then `alssl label {run_dir} --from FILE.csv` (or --oracle)")
        choice = choose(run, dataset, test_probe=probe, kernel=kernel, seed=seed)
        train, test = pool_features(run.path, dataset, choice.path)
        y = run.labels[idx]
        record: dict = {"probe": probe, "n_labeled": int(len(idx))}
        if dataset.has_test:
            model = fit_probe(probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
            record["accuracy"] = round(float(model.accuracy(test, dataset.y_test)), 4)
        else:
            acc, k = cross_val_accuracy(probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
            record |= {"cv_accuracy": None if acc is None else round(float(acc), 4), "cv_folds": k,
                       "note": ("no labeled test set: stratified k-fold cross-validation on the labeled set" if acc is not None
                                else "no labeled test set and a class with a single label: label more to measure accuracy")}
        record |= {"features_in_use": choice.name, "features_why": choice.why,
                   "features": {n: {k: v for k, v in s.items() if k != "origin"} for n, s in choice.scores.items()}}
        _remember_choice(run, choice)
        if len(set(run.labeled_round[run.labeled_round >= 0].tolist())) >= 2:  # the stopping signal needs 2 rounds
            from alssl.stopping import WINDOW, stopping_signal

            sig = stopping_signal(train, run.labeled_round, run.labels, num_classes=dataset.num_classes, probe=probe,
                                  kernel=kernel, seed=seed, cv_rounds=0)
            record |= {"kappa": sig["kappa"][-WINDOW:], "predictions_stable": sig["stable"]}
        run.log_metrics({"stage": "probe", "round": run.n_rounds, **record})
    typer.echo(json.dumps(record))
    if record.get("predictions_stable"):
        from alssl.stopping import stable_message

        typer.echo(f"# {stable_message(record['kappa'])}", err=True)


def _remember_choice(run, choice) -> None:
    """Keep the last measured feature choice in state.json for `alssl status` (which loads no torch)."""
    run.state["stages"]["features"] = {"in_use": choice.name, "n_labeled": int(run.labeled_mask.sum()),
                                       "line": choice.line(), "why": choice.why}
    run.save_state()


# ------------------------------------------------------------------ feature sets
@app.command()
def features(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    add: Optional[str] = typer.Option(None, "--add", help="Add a feature extractor: cnn | resnet18 | torchvision:NAME | timm:NAME"),
    init: Optional[str] = typer.Option(None, help="With --add: its weights, a state dict file (.pt/.pth/.safetensors) or hub"),
    name: Optional[str] = typer.Option(None, help="With --add: the feature set's name (default: from the backbone and weights)"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    use: Optional[str] = typer.Option(None, help="Pin the feature set every command uses (a name), or auto: choose by measurement"),
) -> None:
    """The run's feature sets (stage 1, its start, any you add), each scored on the labels; the strongest is used.

    Without options: list them with their accuracy on the labels (test set, or cross-validation) and which is in use.

    Examples:
      alssl features runs/mine --add timm:vit_small_patch14_dinov2.lvd142m --init hub
      alssl features runs/mine --add cnn --init other_run/checkpoints/backbone.pt --name other
      alssl features runs/mine --use start
    """
    from alssl.features import add_feature_set, check_name, choose, default_name, pin
    from alssl.runs import run_lock

    _use_devices(accelerator, devices, precision)
    if add is None and (init is not None or name is not None):
        raise UserError("--init and --name go with --add BACKBONE; e.g. alssl features RUN --add timm:resnet50 --init hub")
    if add is not None and use is not None:
        raise UserError("give --add or --use, not both (add first, then pin it with --use NAME)")
    if add is not None:
        from alssl.backbones import check_backbone_name

        check_backbone_name(add)
        if init is not None and init != "hub":
            init = str(Path(init).expanduser().resolve())
        name = check_name(name if name is not None else default_name(add, init))
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        added = None
        if add is not None:
            added = add_feature_set(run, dataset, backbone=add, init=init, name=name).name
        if use is not None:
            pin(run, use)
        choice = choose(run, dataset, test_probe="linear" if dataset.has_test else None)
        if run.labeled_mask.any():
            _remember_choice(run, choice)
    out = {"run": str(run_dir), **({"added": added} if added else {}), "in_use": choice.name, "why": choice.why,
           "features": choice.scores}
    typer.echo(json.dumps(out))
    typer.echo(f"# {choice.line()}", err=True)


# ------------------------------------------------------------------ stage 3
@app.command()
def query(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    budget: str = typer.Option(..., help="2% of the pool or a count like 500"),
    strategy: str = typer.Option("random", help="random | entropy | margin | svm-margin | kcenter | vaal | typiclust | probcover | badge | cluster-margin"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    seed: int = typer.Option(0),
    probe: str = typer.Option("linear", help="Probe behind the uncertainty strategies"),
    delta: Optional[float] = typer.Option(None, help="ProbCover ball radius (default: purity heuristic)"),
    kernel: Optional[str] = typer.Option(None, help="SVM kernel behind svm-margin / the svm probe: linear | rbf"),
    thumbnails: bool = typer.Option(False, help="Also write queries/round-K.png, a contact sheet to label from"),
    skip_duplicates: Optional[bool] = typer.Option(
        None, "--skip-duplicates/--keep-duplicates",
        help="Never pick a near-duplicate (feature cosine >= 0.98) of a labeled or picked image "
             "(default: on for image folders, off for digits/npz/cifar10)"),
    balance: bool = typer.Option(False, "--balance", help="Per-class quotas around the strategy for imbalanced pools (picks spread over the probe's predicted classes, fewest labels first)"),
) -> None:
    """Stage 3: pick B new samples; writes RUN/queries/round-K.csv (index,id) and prints its path.

    Example: alssl query runs/d --budget 2% --strategy typiclust --thumbnails
    """
    from alssl.budget import budget_count
    from alssl.rounds import query as run_query
    from alssl.runs import Run, run_lock

    _use_devices(accelerator, devices, precision)
    check_seed(seed)
    budget_count(budget, n_pool=max(1, Run.open(run_dir).state["n_pool"]))  # a bad budget answers before any loading
    from alssl.errors import unknown
    from alssl.probes import KERNELS, PROBES

    if probe not in PROBES:  # checked before the feature sets are measured (which writes caches in the run)
        raise unknown("probe", probe, PROBES)
    if kernel is not None and kernel not in KERNELS:
        raise unknown("kernel", kernel, KERNELS)
    options = {k: v for k, v in {"delta": delta, "kernel": kernel, "skip_duplicates": skip_duplicates,
                                 "balance": balance or None}.items()
               if v is not None}
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        path, reshown = run_query(run, dataset, budget=budget, strategy=strategy, seed=seed, probe=probe,
                                  thumbnails=thumbnails, options=options)
    if reshown:
        typer.echo(f"# round {run.state['open_query']['round']} is still open; label it, then query again", err=True)
    typer.echo(str(path))


@app.command()
def label(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    from_file: Optional[Path] = typer.Option(None, "--from", help="CSV with header id,label | index,label | index,id,label (the query CSV plus a label column)"),
    oracle: bool = typer.Option(False, "--oracle", help="Use the dataset's ground truth (simulation)"),
    any_images: bool = typer.Option(False, "--any", help="With --from: labels you already have for any pool images, imported as a round of their own"),
    classes: Optional[str] = typer.Option(None, help="Set the class list (a,b,c or @classes.txt) of a run that has none yet"),
) -> None:
    """Import labels: for the open query (from a person's CSV or the ground truth), or any pool images with --any.

    Examples:
      alssl label runs/mine --from runs/mine/queries/round-0.csv      (the query CSV with a label column added)
      alssl label runs/mine --from labels_we_had.csv --any --classes cat,dog,bird
    """
    from alssl.rounds import label_any, label_from_csv, label_oracle
    from alssl.runs import atomic_write_text, run_lock, toml_dumps

    if oracle == (from_file is not None):
        raise UserError("give exactly one of --from FILE.csv or --oracle")
    if any_images and oracle:
        raise UserError("--any imports labels from a file; use it with --from FILE.csv, not --oracle")
    names = _classes_option(classes)
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        if names is not None:
            if dataset.classes and names != dataset.classes:
                raise UserError(f"{run_dir} already has classes {', '.join(dataset.classes)}; drop --classes (the class "
                                f"list of a run cannot change once set)")
            if not dataset.classes:
                dataset.classes = names
                run.config["data"]["classes"] = names
        if oracle:
            n = label_oracle(run, dataset)
        else:
            n = (label_any if any_images else label_from_csv)(run, dataset, from_file)
        if names is not None and run.config["data"].get("classes") == names:
            atomic_write_text(run.path / "run.toml", toml_dumps({"alssl_format": run.state["format_version"], **run.config}))
    n_skipped = len(run.state["rounds"][-1].get("skipped", []))
    typer.echo(f"imported {n} labels{f' and {n_skipped} skipped images' if n_skipped else ''}; "
               f"{int(run.labeled_mask.sum())} labeled in {run.n_rounds} rounds")


@app.command()
def status(run_dir: Path = typer.Argument(..., metavar="RUN"), as_json: bool = typer.Option(False, "--json")) -> None:
    """What the run holds: data, stages done, labeled count per round, open query, last metrics.

    Example: alssl status runs/d
    """
    from alssl.runs import Run, read_jsonl

    run = Run.open(run_dir)
    data = run.config["data"]
    info = {
        "run": str(run_dir),
        "data": data["spec"],
        "test": data.get("test"),
        "classes": data.get("classes"),
        "image_size": data.get("image_size"),
        "skipped": _count_rows(run.path / "skipped.csv"),
        "pool": run.state["n_pool"],
        "labeled": int(run.labeled_mask.sum()),
        "skipped_images": [{"index": i, "round": r["round"]} for r in run.state["rounds"] for i in r.get("skipped", [])],
        "stages": run.state["stages"],
        "rounds": run.state["rounds"],
        "open_query": None if run.state["open_query"] is None else {k: v for k, v in run.state["open_query"].items() if k != "indices"},
        "last_metrics": (read_jsonl(run.metrics_file) or [None])[-1],
        "probcover_delta": _probcover_deltas(Path(run_dir)),
        "near_duplicates": _near_duplicates(Path(run_dir)),
    }
    if as_json:
        typer.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{run_dir}[/]  data={info['data']}  pool={info['pool']}  labeled={info['labeled']}")
    if info["image_size"] is not None:
        con.print(f"  image folder: {info['image_size']}px, {info['skipped']} unreadable files skipped, test={info['test']}, "
                  f"classes={', '.join(info['classes'] or []) or 'not set yet'}")
    for name, st in info["stages"].items():
        if name == "features" and "line" in st:  # the last measured choice (probe / features)
            con.print(f"  {st['line']} on {st.get('n_labeled')} labels; {st.get('why')}")
            continue
        if name == "pretrain" and "knn_on" in st:  # stage 1 against its start (docs/features.md)
            con.print(f"  {_pretrain_line(st)}")
            continue
        con.print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    table = Table("round", "strategy", "budget", "labels", "skipped", "source")
    for r in info["rounds"]:
        table.add_row(str(r["round"]), str(r["strategy"]), str(r["budget"]), str(r["n"]), str(len(r.get("skipped", []))),
                      str(r["source"]))
    con.print(table)
    if info["skipped_images"]:
        shown = ", ".join(str(s["index"]) for s in info["skipped_images"][:20])
        con.print(f"  skipped (none of the classes, never queried again): {len(info['skipped_images'])} images, "
                  f"pool indices {shown}{', ...' if len(info['skipped_images']) > 20 else ''} (`--json` lists them all)")
    if info["open_query"]:
        q = info["open_query"]
        con.print(f"  open query: round {q['round']} ({q['strategy']}, {q['budget']}) → {q['file']}")
    for sha, deltas in info["probcover_delta"].items():
        con.print(f"  probcover delta (features {sha}): " + ", ".join(f"{v:.4g} ({k})" for k, v in deltas.items()))
    for sha, dup in info["near_duplicates"].items():
        con.print(f"  near-duplicates (features {sha}, cosine >= {dup['tau']:g}): {dup['groups']} groups holding "
                  f"{dup['images']} of {dup['pool']} images")
    if info["last_metrics"]:
        con.print(f"  last metrics: {info['last_metrics']}")
    probes = [m for m in read_jsonl(run.metrics_file) if m.get("stage") == "probe"]
    if probes and probes[-1].get("predictions_stable"):
        from alssl.stopping import stable_message

        con.print(f"  {stable_message(probes[-1]['kappa'])} (last probe, round {probes[-1]['round']})")


def _pretrain_line(st: dict) -> str:
    """`pretrain: simsiam cnn, 30 epochs (930 steps, 1202 s); kNN 0.193 → 0.220 (…); RankMe 12.6 → 27.5`."""
    def arrow(a, b, fmt: str) -> str:
        return f"{a:{fmt}} → {b:{fmt}}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "n/a"

    knn = ""
    if isinstance(st.get("knn_accuracy"), (int, float)):
        knn = f"; kNN {arrow(st.get('knn_accuracy_init'), st['knn_accuracy'], '.3f')} ({st['knn_on']})"
    worse = (isinstance(st.get("knn_accuracy"), (int, float)) and isinstance(st.get("knn_accuracy_init"), (int, float))
             and st.get("epochs", 0) > 0 and st["knn_accuracy"] < st["knn_accuracy_init"])
    return (f"pretrain: {st.get('method')} {st.get('backbone')}, {st.get('epochs')} epochs ({st.get('steps')} steps, "
            f"{st.get('seconds')} s){knn}; RankMe {arrow(st.get('rankme_init'), st.get('rankme'), '.1f')} (label-free "
            f"proxy)" + ("; below its start: the run keeps the start, see `alssl features`" if worse else ""))


def _near_duplicates(run_dir: Path) -> dict:
    """The near-duplicate groups found per feature set (embeddings sha): tau, groups, images, pool; a damaged cache
    file is skipped with a warning (the next query recomputes it)."""
    from alssl.errors import warn

    out = {}
    for f in sorted((run_dir / "features").glob("*.duplicates-*.json")):
        try:
            dup = json.loads(f.read_text())
            if not all(isinstance(dup.get(k), (int, float)) for k in ("tau", "groups", "images", "pool")):
                raise ValueError
        except (OSError, ValueError, UnicodeDecodeError, RecursionError, AttributeError):
            warn(f"{f} is damaged and not shown; delete it (the next query recomputes it)")
            continue
        out[f.name.split(".")[0]] = dup
    return out


def _probcover_deltas(run_dir: Path) -> dict:
    """ProbCover's chosen radii per feature set (embeddings sha); a damaged cache file is skipped with a warning
    (it is only a cache: the next probcover query recomputes it)."""
    from alssl.errors import warn

    out = {}
    for f in sorted((run_dir / "features").glob("*.probcover.json")):
        try:
            delta = json.loads(f.read_text())["delta"]
            if not isinstance(delta, dict) or not all(isinstance(v, (int, float)) for v in delta.values()):
                raise ValueError
        except (OSError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
            warn(f"{f} is damaged and not shown; delete it (the next probcover query recomputes it)")
            continue
        out[f.name.split(".")[0]] = delta
    return out


def _count_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


# ------------------------------------------------------------------ stage 4
@app.command("semi-finetune")
def semi_finetune(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    method: str = typer.Option("fixmatch", help="fixmatch | simmatch | daso | pseudolabel | supervised"),
    steps: int = typer.Option(1000, min=1, help="Training steps (the papers use 2^20 on GPU)"),
    batch_size: int = typer.Option(64, min=1, help="Labeled batch size B (unlabeled batch is mu·B)"),
    mu: int = typer.Option(7, min=1, help="Unlabeled ratio mu"),
    tau: float = typer.Option(0.95, help="Confidence threshold tau"),
    lambda_u: float = typer.Option(1.0, help="Unlabeled loss weight"),
    lr: float = typer.Option(0.03),
    teacher: str = typer.Option("ema", help="ema | eman"),
    from_scratch: bool = typer.Option(False, help="Ignore the stage-1 backbone and start from random init"),
    backbone: Optional[str] = typer.Option(None, help="With --from-scratch or --init: which backbone (default: the run's)"),
    init: Optional[str] = typer.Option(None, help="Start from these weights instead of the stage-1 backbone: a state dict .pt/.pth/.safetensors, or hub"),
    unlabeled_profile: str = typer.Option("same", help="same | reversed (DASO-style mismatched unlabeled pool; simulation)"),
    unlabeled_imbalance: Optional[float] = typer.Option(None, help="Imbalance of the reshaped unlabeled pool"),
    ckpt_every: int = typer.Option(100, min=1),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Flips in the weak/strong views (default: colour images only)"),
    option: list[str] = typer.Option([], "--option", help="Method setting KEY=VALUE, repeatable (see docs/semi.md), e.g. --option bn_batch=split"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the student's backbone (meant for GPUs, not measured there yet; no gain on a CPU: docs/semi.md)"),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget for this call: stop when spent with a resumable checkpoint (rerun to go on)"),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", help="auto (the GPU when present) | cpu | cuda | gpu | mps; default $ALSSL_ACCELERATOR or auto"),
    devices: Optional[str] = typer.Option(None, "--devices", help="Processes (one per device) for DDP through Fabric; --batch-size is the global batch, split over them (docs/scale.md); default $ALSSL_DEVICES or 1"),
    precision: Optional[str] = typer.Option(None, "--precision", help="32-true | bf16-mixed (forward and loss under bf16 autocast); default $ALSSL_PRECISION or 32-true"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage 4: semi-supervised fine-tune from the stage-1 backbone on the labels bought; prints JSON.

    Example: alssl semi-finetune runs/d --method simmatch --steps 2000 --option bn_batch=split
    """
    import hashlib

    from alssl.errors import unknown
    from alssl.runs import read_jsonl, run_lock
    from alssl.semi import METHODS, semi_finetune as run_semi

    if method not in METHODS:
        raise unknown("method", method, METHODS)
    from alssl import devices as dev
    from alssl.semi.trainer import PRECISIONS

    setting = dev.parse(accelerator, devices, precision)
    if setting.precision not in PRECISIONS:
        raise UserError(f"--precision {setting.precision} is not offered by semi-finetune; use {' or '.join(PRECISIONS)}")
    if batch_size % setting.devices:
        raise UserError(f"--batch-size {batch_size} does not split over {setting.devices} devices (it is the global "
                        f"batch); use a multiple of {setting.devices}")
    dev.use(setting)  # the probe baseline's embedding (if it is not cached yet) runs there too
    check_seed(seed)
    check_positive(lr, "--lr")
    if minutes is not None:
        check_positive(minutes, "--minutes", "--minutes 15")
    if teacher not in ("ema", "eman"):
        raise unknown("teacher", teacher, ["ema", "eman"])
    if unlabeled_profile not in ("same", "reversed"):
        raise unknown("unlabeled profile", unlabeled_profile, ["same", "reversed"])
    if init is not None and from_scratch:
        raise UserError("--init and --from-scratch both replace the stage-1 backbone; give one of them")
    if backbone is not None:
        from alssl.backbones import check_backbone_name

        check_backbone_name(backbone)
    if init is not None and init != "hub":
        init = str(Path(init).expanduser().resolve())
    fresh = from_scratch or init is not None  # start from random init / the user's weights, not from stage 1
    options = {"unlabeled_profile": unlabeled_profile, "unlabeled_imbalance": unlabeled_imbalance, "hflip": hflip,
               **_key_values(option)}
    args = dict(method=method, steps=steps, batch_size=batch_size, mu=mu, tau=tau, lambda_u=lambda_u, lr=lr,
                teacher=teacher, seed=seed)
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        idx = run.labeled_indices
        if len(idx) == 0:
            raise UserError(f"{run_dir} has no labeled samples yet; run `alssl query {run_dir} --budget 2%` then `alssl label {run_dir} --from FILE.csv` (or --oracle)")
        ckpt, record = run.checkpoints / "backbone.pt", {}
        if not fresh and not ckpt.exists():
            raise UserError(f"{run_dir} has no stage-1 backbone; run `alssl pretrain` first or pass --from-scratch")
        baseline = None  # the linear probe's test accuracy on the same labels and features
        if not fresh:  # start from the feature set measured strongest on the labels (alssl/features.py)
            from alssl.features import choose

            choice = choose(run, dataset, test_probe="linear")
            ckpt, record = choice.path, choice.record()
            baseline = choice.scores[choice.name].get("test_accuracy")
        start_from = [record["features"]] if record.get("features", "ssl") != "ssl" else []  # (ssl: as before)
        tag = hashlib.sha256(json.dumps([args, options, from_scratch, backbone, idx.tolist()] + ([init] if init else [])
                                        + start_from,
                                        sort_keys=True).encode()).hexdigest()[:8]
        out = run.path / "semi" / f"{method}-{len(idx)}lab-{tag}"
        res = run_semi(dataset, labeled_idx=idx, labeled_y=run.labels[idx], out_dir=out,
                       backbone=backbone or run.config["pretrain"]["backbone"], init_weights=init,
                       init_checkpoint=None if fresh else ckpt, ckpt_every=ckpt_every, compile=compile,
                       device={"gpu": "cuda"}.get(setting.accelerator, setting.accelerator), precision=setting.precision,
                       devices=setting.devices, quiet=_quiet(quiet), options=options, record=record, minutes=minutes,
                       **args)
        if res is None:  # a DDP rank > 0: rank 0 reports and logs
            return
        res = {**res, **record}
        if baseline is not None and res.get("accuracy") is not None:
            res["probe_accuracy"] = baseline
            if res["accuracy"] < baseline:
                from alssl.errors import warn

                warn(f"the fine-tune scores {res['accuracy']:.3f} on the test set, below the linear probe's {baseline:.3f} "
                     f"on the same labels and features: fine-tune longer (--steps), or keep the probe "
                     f"(`alssl export {run_dir} --classifier probe`)")
        rec = {"stage": "semi", "dir": str(out.relative_to(run.path)), **{k: v for k, v in res.items() if k != "per_class_recall"}}
        if "stopped_at" not in res and not any(r.get("stage") == "semi" and r.get("dir") == rec["dir"]
                                                for r in read_jsonl(run.metrics_file)):
            run.log_metrics(rec)  # once per fine-tune: a rerun of a finished one (or after a kill) adds no twin
    typer.echo(json.dumps(res))


# ------------------------------------------------------------------ models out
@app.command("export")
def export_model(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    out: Path = typer.Option(..., help="Folder for model.pt, model.ts and model.json"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    force: bool = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)"),
    classifier: str = typer.Option("auto", help="auto (the fine-tune on the current labels if any, else the linear probe) | semi | probe"),
) -> None:
    """The best model the run has (the semi-supervised fine-tune on the current labels, else backbone + linear probe)
    → model.pt (state dict), model.ts (TorchScript: float [B, C, S, S] in [0, 1] → logits) and model.json.

    Example: alssl export runs/mine --out models/mine
    """
    from alssl.export import EXPORT_FILES, export, is_export_dir
    from alssl.runs import check_output, check_writable, data_inputs, run_lock

    _use_devices(accelerator, devices, precision)
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        if run.labeled_mask.sum() == 0:
            raise UserError(f"{run_dir} has no labels yet, so there is no classifier to export; label some images first "
                            f"(`alssl query {run_dir} --budget 2%`, then `alssl label {run_dir} --from FILE.csv`)")
        check_output(out, names=EXPORT_FILES, is_previous=is_export_dir, inputs=data_inputs(run.config["data"]),
                     force=force, what="an exported model")
        check_writable(out)
        card = export(run, dataset, out, classifier=classifier)
    typer.echo(json.dumps({"out": str(out), "classifier": card["classifier"], "features": card.get("features"),
                           "classes": card["classes"],
                           "image_size": card["image_size"], "accuracy": card["accuracy"],
                           "accuracy_on": card["accuracy_on"],
                           **({"probe_accuracy": card["probe_accuracy"]} if "probe_accuracy" in card else {})}))


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    paths: Optional[list[Path]] = typer.Argument(None, metavar="[FILES_OR_DIRS]...", help="More images or folders"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Image files or folders (repeatable; folders are read recursively)"),
    pool: bool = typer.Option(False, "--pool", help="Predict every unlabeled pool image instead (pre-annotations)"),
    out: Path = typer.Option(..., help="CSV to write: path,label,confidence"),
    workers: Optional[int] = typer.Option(None, min=1, help="Decoding processes (default: CPU count, at most 8)"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    force: bool = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)"),
    classifier: str = typer.Option("auto", help="auto (the fine-tune on the current labels if any, else the linear probe) | semi | probe"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Predict classes with the run's best model (as `alssl export` picks it); same preprocessing as training.

    Examples:
      alssl predict runs/mine --data new_photos/ --out predictions.csv
      alssl predict runs/mine --pool --out pool_predictions.csv
    """
    from alssl.export import is_predictions_csv, predict_files, predict_pool
    from alssl.runs import check_output, data_inputs, run_lock

    _use_devices(accelerator, devices, precision)
    sources = [p.expanduser() for p in [*(data or []), *(paths or [])]]
    if pool == bool(sources):
        raise UserError("give images to predict (--data DIR_OR_FILES...) or --pool, not both and not neither")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a CSV file name like {out / 'predictions.csv'}")
    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        if run.labeled_mask.sum() == 0:
            raise UserError(f"{run_dir} has no labels yet, so there is no classifier to predict with; label some images "
                            f"first (`alssl query {run_dir} --budget 2%`, then `alssl label {run_dir} --from FILE.csv`)")
        check_output(out, names=None, is_previous=is_predictions_csv, inputs=[*data_inputs(run.config["data"]), *sources],
                     force=force, what="a predictions CSV")
        if pool:
            res = predict_pool(run, dataset, out, classifier=classifier, quiet=_quiet(quiet))
        else:
            res = predict_files(run, dataset, sources, out, workers=workers, quiet=_quiet(quiet), classifier=classifier)
    typer.echo(json.dumps(res))


# ------------------------------------------------------------------ curves and pipelines
def _key_values(items: list[str]) -> dict:
    """`--option KEY=VALUE` pairs; values become bool, int or float where they read as one."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r} is not KEY=VALUE; write e.g. --option bn_batch=split")
        value: object = raw.strip()
        if raw.strip().lower() in ("true", "false"):
            value = raw.strip().lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command()
def curve(
    data: str = typer.Option("digits", help="Data SPEC"),
    strategies: str = typer.Option("random,entropy,kcenter,typiclust", help="Comma-separated strategies"),
    budgets: str = typer.Option("1%,2%,5%,10%", help="Cumulative budgets, ascending"),
    seeds: int = typer.Option(3, help="Seeds per strategy (0..N-1)"),
    out: Optional[Path] = typer.Option(None, help="Output dir for curve.csv/png/svg (rerun to resume)"),
    probe: str = typer.Option("linear", help="Probes, comma-separated: linear,svm"),
    semi: Optional[str] = typer.Option(None, help="Also fine-tune each cell with this semi method"),
    semi_steps: int = typer.Option(500, min=1, help="Optimizer steps of each cell's semi fine-tune"),
    semi_batch_size: int = typer.Option(64, min=1, help="Labeled batch B of each semi fine-tune"),
    semi_mu: int = typer.Option(7, min=1, help="Unlabeled batch = mu * B"),
    from_run: Optional[Path] = typer.Option(None, "--from", help="Reuse this run's stage-1 backbone"),
    method: str = typer.Option("simsiam"),
    backbone: str = typer.Option("cnn"),
    epochs: int = typer.Option(20, min=0),
    batch_size: int = typer.Option(256, min=2),
    imbalance: Optional[float] = typer.Option(None),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    jobs: int = typer.Option(1, help="Parallel processes over (probe, strategy, seed) chains"),
    balance: bool = typer.Option(False, "--balance", help="Every strategy with per-class quotas (imbalanced pools; see docs/acquisition.md)"),
    plot_only: Optional[Path] = typer.Option(None, help="Only redraw DIR/curve.png from DIR/curve.csv"),
    force: bool = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Budget-curve grid: strategies × budgets × seeds → curve.csv + curve.png/svg. Resumable.

    Example: alssl curve --data digits --strategies random,kcenter,typiclust --budgets 1%,2%,5% --seeds 3 --out curves/d
    """
    if plot_only is not None:
        from alssl.plots import plot_curve

        if not (plot_only / "curve.csv").exists():
            raise UserError(f"{plot_only} has no curve.csv; run `alssl curve --out {plot_only}` first")
        png, svg = plot_curve(plot_only / "curve.csv", title=_plot_only_title(plot_only))
        typer.echo(json.dumps({"png": str(png), "svg": str(svg)}))
        return
    _use_devices(accelerator, devices, precision)
    from alssl.curve import Grid, run_experiment

    if out is None:
        raise UserError("give --out DIR for the curve files (or --plot-only DIR to redraw one)")
    _check_curve_out(out, _data_config(data, imbalance, 0), force)
    grid = Grid(data=_data_config(data, imbalance, 0), strategies=_split(strategies), budgets=_split(budgets),
                seeds=seeds, probes=_split(probe), semi=semi, semi_steps=semi_steps,
                semi_batch_size=semi_batch_size, semi_mu=semi_mu, options={"balance": True} if balance else {})
    pargs = {"method": method, "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "lr": None,
             "eman": False, "seed": 0}
    csv_path, png, svg = run_experiment(out, grid, pretrain_args=pargs, from_run=from_run, jobs=jobs, quiet=_quiet(quiet))
    typer.echo(json.dumps({"csv": str(csv_path), "png": str(png), "svg": str(svg)}))


CURVE_FILES = ["curve.csv", "curve.png", "curve.svg", "grid.json", "cells", "pretrain"]


def _check_curve_out(out: Path, data: dict, force: bool) -> None:
    """A curve dir is a new folder or an earlier grid (it holds grid.json); never inside a run dir or the data."""
    from alssl.runs import check_output, data_inputs

    check_output(out, names=CURVE_FILES, is_previous=lambda d: (d / "grid.json").is_file(), inputs=data_inputs(data),
                 force=force, what="a budget curve")


def _plot_only_title(out: Path) -> Optional[str]:
    """The title a redraw gets: the grid's data and (when the grid pretrained its own backbone) its features."""
    import tomllib

    from alssl.plots import curve_title

    try:
        grid = json.loads((out / "grid.json").read_text())
        pre = tomllib.loads((out / "pretrain" / "run.toml").read_text()).get("pretrain") if (out / "pretrain" / "run.toml").is_file() else None
        return curve_title(grid["data"]["spec"], pre, grid.get("probes") or ["linear"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="pipelines/NAME.toml"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: the config's [output] dir)"),
    force: bool = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The whole pipeline from a config: pretrain once, then the budget-curve grid and its plots.

    Example: alssl run pipelines/digits_demo.toml --out runs/demo
    """
    from dataclasses import asdict

    from alssl.config import load_config

    cfg = load_config(config)  # torch-free: a bad config is refused before the heavy imports below
    from alssl.curve import Grid, run_experiment

    c = cfg.curve
    grid = Grid(data=_data_config(cfg.data.spec, cfg.data.imbalance, cfg.data.seed), strategies=c.strategies,
                budgets=[str(b) for b in c.budgets], seeds=c.seeds, probes=c.probes, semi=c.semi,
                semi_steps=c.semi_steps, semi_batch_size=c.semi_batch_size, semi_mu=c.semi_mu,
                options={} if c.delta is None else {"delta": c.delta})
    pargs = {k: v for k, v in asdict(cfg.pretrain).items() if k != "from_run"}
    from_run = Path(cfg.pretrain.from_run) if cfg.pretrain.from_run else None
    out = out or Path(cfg.output.dir)
    _check_curve_out(out, _data_config(cfg.data.spec, cfg.data.imbalance, cfg.data.seed), force)
    csv_path, png, svg = run_experiment(out, grid, pretrain_args=pargs, from_run=from_run, jobs=c.jobs,
                                        quiet=_quiet(quiet), title=cfg.output.title)
    typer.echo(json.dumps({"csv": str(csv_path), "png": str(png), "svg": str(svg)}))


# ------------------------------------------------------------------ labeling (alssl/labeling/, docs/labeling.md)
@app.command("label-ui")
def label_ui(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but 127.0.0.1 lets other machines reach the page (the token still guards it)"),
    port: int = typer.Option(8765, min=0, max=65535, help="Port (0: any free port)"),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open the page in your web browser"),
    accelerator: Optional[str] = _accelerator_option(),
    devices: Optional[str] = _devices_option(),
    precision: Optional[str] = _precision_option(),
    classes: Optional[str] = typer.Option(None, help="Class list (a,b,c or @classes.txt) for a run that has none yet; stored with the first import"),
) -> None:
    """A local labeling page for the open query: a key or a click per image, Submit imports the round.

    Prints one URL with a random token; the page's JSON API and images refuse requests without it. Every label is
    saved at once to RUN/queries/round-K.partial.csv: Ctrl-C (or a crash) loses nothing, rerun to go on.

    Example: alssl label-ui runs/mine
    """
    from alssl.errors import warn
    from alssl.labeling.server import bind, make_app, new_token, serve, url_of
    from alssl.labeling.session import LabelSession, resolve_classes

    names = _classes_option(classes)
    _use_devices(accelerator, devices, precision)
    sock = bind(host, port)  # a taken port answers before anything (torch included) is loaded
    try:
        from alssl.runs import run_lock

        with run_lock(run_dir):  # held only while loading: the server takes it again to import (session.py)
            run, dataset = _load_run(run_dir)
            label_classes, store = resolve_classes(dataset, names)
            session = LabelSession(run_dir, dataset, classes=label_classes, store=store)
            session.load(run)
    except BaseException:
        sock.close()
        raise
    token = new_token()
    url = url_of(sock, host, token)
    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {host}: other machines that can reach it can open the page with the URL's token")
    n_done = len(session.labels())
    typer.echo(url)
    typer.echo(f"# round {session.round}: {n_done} / {len(session.indices)} labeled; every label is saved at once to "
               f"{session.partial}; Ctrl-C stops the server", err=True)
    if browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import threading
        import webbrowser

        threading.Timer(0.5, webbrowser.open, [url]).start()
    try:
        serve(make_app(session, token), sock)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        sock.close()
    left = len(session.indices) - len(session.labels())
    done = f"round {session.round} is imported" if session.result else (
        f"{left} image(s) of round {session.round} still to label: rerun `alssl label-ui {run_dir}` to go on")
    typer.echo(f"# stopped; {done}", err=True)


@app.command()
def tasks(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    out: Path = typer.Option(..., help="Folder for tasks.json and config.xml (and images/ for datasets without image files)"),
    format: str = typer.Option("label-studio", "--format", help="label-studio"),
    document_root: Optional[Path] = typer.Option(None, help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (default: the pool folder; for datasets without image files, --out)"),
    classes: Optional[str] = typer.Option(None, help="Class list (a,b,c or @classes.txt) for a run that has none yet"),
    force: bool = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)"),
) -> None:
    """Label Studio tasks for the open query (+ its labeling config); import the export with `alssl label --from`.

    Example: alssl tasks runs/mine --out ls_round1 && alssl label runs/mine --from project-1-export.json
    """
    from alssl.errors import unknown

    if format != "label-studio":
        raise unknown("format", format, ["label-studio"])
    names = _classes_option(classes)
    from alssl.labeling.session import resolve_classes
    from alssl.labeling.studio import TASK_FILES, is_tasks_dir, write_tasks
    from alssl.runs import check_output, check_writable, data_inputs, run_lock

    with run_lock(run_dir):
        run, dataset = _load_run(run_dir)
        label_classes, _ = resolve_classes(dataset, names)
        if run.state["open_query"] is not None:
            check_output(out, names=TASK_FILES, is_previous=is_tasks_dir, inputs=data_inputs(run.config["data"]),
                         force=force, what="Label Studio tasks")
            check_writable(out)
        res = write_tasks(run, dataset, out, classes=label_classes, document_root=document_root)
    typer.echo(json.dumps(res))
    typer.echo(f"# Label Studio: start it with LOCAL_FILES_SERVING_ENABLED=true LOCAL_FILES_DOCUMENT_ROOT={res['document_root']}; "
               f"make a project with the labeling config {res['config']}; add a Local files source storage at "
               f"{res['storage']}; import {res['tasks']}; label; export JSON, JSON-MIN or CSV; then "
               f"`alssl label {run_dir} --from EXPORT`" + (" --classes ..." if not dataset.classes else "")
               + " (docs/labeling.md)", err=True)


class Terminated(BaseException):
    """Raised by the SIGTERM handler so a `kill` unwinds like Ctrl-C: locks released, checkpoints intact."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a skipped torn metrics line, a collapse alert) as one `warning:` line, no source line."""
    typer.echo(f"warning: {message}", err=True)


INTERRUPTED = "interrupted; the last checkpoint is kept: rerun the same command to resume"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: UserError and usage errors → one `error:` line, exit 2; Ctrl-C → exit 130, SIGTERM → 143."""
    import signal

    import warnings

    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    with contextlib.suppress(ValueError):  # not in the main thread (tests): keep the default handler
        signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.showwarning = _one_line_warning
    try:
        try:
            rc = app(args=argv, standalone_mode=False, prog_name="alssl")
        finally:
            from alssl import devices

            devices.use(None)  # a command's --accelerator/--devices/--precision end with it (in-process callers)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "alssl"
        typer.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except Terminated:
        typer.echo(f"error: terminated (SIGTERM); {INTERRUPTED.split('; ', 1)[1]}", err=True)
        sys.exit(143)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    if rc == 130:  # typer turns Ctrl-C into a returned 130 under standalone_mode=False: say so, and exit with it
        typer.echo(f"error: {INTERRUPTED}", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
