"""The `alssl` command line: a thin typer layer over the library (no method logic here).

Every command validates its input before it writes anything; a `UserError` becomes exit code 2 and one
`error:` line on stderr, with no traceback, and the run dir is left as it was.
"""

from __future__ import annotations

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

from alssl.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Self-supervised pretraining + active learning + semi-supervised fine-tuning under a labeling budget.\n\n"
    "Example: alssl pretrain --data digits --out runs/d && alssl query runs/d --budget 2% && alssl label runs/d --oracle",
)


def _quiet(quiet: bool) -> bool:
    return quiet or not sys.stderr.isatty()


def _load_run(run_dir: Path):
    """Open a run and reload its dataset exactly as it was when the run was made."""
    from alssl.data import load_dataset
    from alssl.runs import Run

    run = Run.open(run_dir)
    cfg = run.config["data"]
    dataset = load_dataset(cfg["spec"], imbalance=cfg.get("imbalance"), seed=cfg.get("seed", 0))
    if len(dataset.y_train) != run.state["n_pool"]:
        raise UserError(f"the data {cfg['spec']} no longer matches {run_dir} ({len(dataset.y_train)} vs {run.state['n_pool']} samples); restore the data or start a new run")
    return run, dataset


def _data_config(spec: str, imbalance: Optional[float], seed: int) -> dict:
    """The data section of run.toml, with paths made absolute so later commands work from any directory."""
    if spec.startswith("cifar10:"):
        spec = "cifar10:" + str(Path(spec[len("cifar10:"):]).resolve())
    elif spec != "digits":
        spec = str(Path(spec).resolve()) + ("/" if spec.endswith("/") else "")
    return {"spec": spec, "imbalance": imbalance, "seed": seed}


# ------------------------------------------------------------------ stage 1
@app.command()
def pretrain(
    data: str = typer.Option("digits", help="Data SPEC: digits | FILE.npz | DIR/ | cifar10:DIR"),
    out: Path = typer.Option(..., help="Run dir to create (or resume)"),
    method: str = typer.Option("simsiam", help="simsiam | moco | byol"),
    backbone: str = typer.Option("cnn", help="cnn | resnet18 | wrn28_2"),
    epochs: int = typer.Option(20, min=0, help="Epochs; 0 = random-init baseline"),
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
    knn_every: int = typer.Option(1, min=0, help="kNN monitor every N epochs (0 = off)"),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips in the views (default: on for colour images, off for 1-channel glyphs)"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage 1: self-supervised pretraining. Rerun the same command to resume.

    Example: alssl pretrain --data digits --out runs/d --method simsiam --epochs 20
    """
    from alssl.backbones import BACKBONES
    from alssl.data import load_dataset
    from alssl.errors import unknown
    from alssl.runs import Run, check_writable, run_lock
    from alssl.pretrain import METHODS, check_args, pretrain as run_pretrain

    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if backbone not in BACKBONES:
        raise unknown("backbone", backbone, BACKBONES)
    dev: int | str = int(devices) if devices.isdigit() else devices
    check_args(method=method, eman=eman, momentum=momentum, momentum_schedule=momentum_schedule,
               accelerator=accelerator, devices=dev, strategy=strategy, precision=precision)
    args = {"method": method, "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "eman": eman, "seed": seed, "hflip": hflip, "momentum": momentum,
            "momentum_schedule": momentum_schedule, "queue_size": queue_size, "temperature": temperature}
    dataset = load_dataset(data, imbalance=imbalance, seed=seed)
    if Run.exists(out):
        run = Run.open(out)
        old = run.config.get("pretrain", {})
        diff = [k for k in args if old.get(k) != args[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{out} was pretrained with --{k.replace('_', '-')} {old.get(k)} (not {args[k]}); rerun with the same arguments to resume, or pick a new --out")
    else:
        check_writable(out)
    with run_lock(out):
        if not Run.exists(out):
            config = {"data": _data_config(data, imbalance, seed), "pretrain": args}
            run = Run.create(out, n_pool=len(dataset.y_train), config=config)
        summary = run_pretrain(dataset, run, method=method, backbone=backbone, epochs=epochs, batch_size=batch_size,
                               lr=lr, eman=eman, devices=dev, accelerator=accelerator, precision=precision,
                               strategy=strategy, seed=seed, ckpt_every_steps=ckpt_every_steps, hflip=hflip,
                               momentum=momentum, momentum_schedule=momentum_schedule, queue_size=queue_size,
                               temperature=temperature, knn_every=knn_every,
                               quiet=_quiet(quiet))
        if summary is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            run.state["stages"]["pretrain"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            run.save_state()
            typer.echo(json.dumps({"run": str(out), **run.state["stages"]["pretrain"]}))


# ------------------------------------------------------------------ stage 2
@app.command()
def probe(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    probe: str = typer.Option("linear", help="linear | svm"),
    kernel: str = typer.Option("linear", help="SVM kernel: linear | rbf"),
    seed: int = typer.Option(0),
) -> None:
    """Stage 2: fit a probe on the frozen features of the labeled set; print test accuracy as JSON.

    Example: alssl probe runs/d --probe svm
    """
    from alssl.features import pool_features
    from alssl.probes import PROBES, fit_probe
    from alssl.errors import unknown
    from alssl.runs import run_lock

    if probe not in PROBES:
        raise unknown("probe", probe, PROBES)
    run, dataset = _load_run(run_dir)
    idx = run.labeled_indices
    if len(idx) == 0:
        raise UserError(f"{run_dir} has no labeled samples yet; run `alssl query {run_dir} --budget 2%` then `alssl label {run_dir} --oracle`")
    with run_lock(run_dir):
        train, test = pool_features(run.path, dataset)
        model = fit_probe(probe, train[idx], run.labels[idx], num_classes=dataset.num_classes, kernel=kernel, seed=seed)
        acc = model.accuracy(test, dataset.y_test)
        record = {"probe": probe, "n_labeled": int(len(idx)), "accuracy": round(float(acc), 4)}
        run.log_metrics({"stage": "probe", "round": run.n_rounds, **record})
    typer.echo(json.dumps(record))


# ------------------------------------------------------------------ stage 3
@app.command()
def query(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    budget: str = typer.Option(..., help="2% of the pool or a count like 500"),
    strategy: str = typer.Option("random", help="random | entropy | margin | svm-margin | kcenter | vaal | typiclust | probcover"),
    seed: int = typer.Option(0),
    probe: str = typer.Option("linear", help="Probe behind the uncertainty strategies"),
    delta: Optional[float] = typer.Option(None, help="ProbCover ball radius (default: purity heuristic)"),
    kernel: Optional[str] = typer.Option(None, help="SVM kernel behind svm-margin / the svm probe: linear | rbf"),
    thumbnails: bool = typer.Option(False, help="Also write queries/round-K.png, a contact sheet to label from"),
) -> None:
    """Stage 3: pick B new samples; writes RUN/queries/round-K.csv (index,id) and prints its path.

    Example: alssl query runs/d --budget 2% --strategy typiclust --thumbnails
    """
    from alssl.rounds import query as run_query
    from alssl.runs import run_lock

    run, dataset = _load_run(run_dir)
    options = {k: v for k, v in {"delta": delta, "kernel": kernel}.items() if v is not None}
    with run_lock(run_dir):
        path, reshown = run_query(run, dataset, budget=budget, strategy=strategy, seed=seed, probe=probe,
                                  thumbnails=thumbnails, options=options)
    if reshown:
        typer.echo(f"# round {run.state['open_query']['round']} is still open; label it, then query again", err=True)
    typer.echo(str(path))


@app.command()
def label(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    from_file: Optional[Path] = typer.Option(None, "--from", help="CSV with header index,label or id,label"),
    oracle: bool = typer.Option(False, "--oracle", help="Use the dataset's ground truth (simulation)"),
) -> None:
    """Import labels for the open query, from a person's CSV or the ground truth.

    Example: alssl label runs/d --from my_labels.csv
    """
    from alssl.rounds import label_from_csv, label_oracle
    from alssl.runs import run_lock

    if oracle == (from_file is not None):
        raise UserError("give exactly one of --from FILE.csv or --oracle")
    run, dataset = _load_run(run_dir)
    with run_lock(run_dir):
        n = label_oracle(run, dataset) if oracle else label_from_csv(run, dataset, from_file)
    typer.echo(f"imported {n} labels; {int(run.labeled_mask.sum())} labeled in {run.n_rounds} rounds")


@app.command()
def status(run_dir: Path = typer.Argument(..., metavar="RUN"), as_json: bool = typer.Option(False, "--json")) -> None:
    """What the run holds: stages done, labeled count per round, open query, last metrics.

    Example: alssl status runs/d
    """
    from alssl.runs import Run, read_jsonl

    run = Run.open(run_dir)
    info = {
        "run": str(run_dir),
        "data": run.config["data"]["spec"],
        "pool": run.state["n_pool"],
        "labeled": int(run.labeled_mask.sum()),
        "stages": run.state["stages"],
        "rounds": run.state["rounds"],
        "open_query": None if run.state["open_query"] is None else {k: v for k, v in run.state["open_query"].items() if k != "indices"},
        "last_metrics": (read_jsonl(run.metrics_file) or [None])[-1],
        "probcover_delta": {f.name.split(".")[0]: json.loads(f.read_text())["delta"]  # per feature set (embeddings sha)
                            for f in sorted((Path(run_dir) / "features").glob("*.probcover.json"))},
    }
    if as_json:
        typer.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{run_dir}[/]  data={info['data']}  pool={info['pool']}  labeled={info['labeled']}")
    for name, st in info["stages"].items():
        con.print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    table = Table("round", "strategy", "budget", "labels", "source")
    for r in info["rounds"]:
        table.add_row(str(r["round"]), r["strategy"], r["budget"], str(r["n"]), r["source"])
    con.print(table)
    if info["open_query"]:
        q = info["open_query"]
        con.print(f"  open query: round {q['round']} ({q['strategy']}, {q['budget']}) → {q['file']}")
    for sha, deltas in info["probcover_delta"].items():
        con.print(f"  probcover delta (features {sha}): " + ", ".join(f"{v:.4g} ({k})" for k, v in deltas.items()))
    if info["last_metrics"]:
        con.print(f"  last metrics: {info['last_metrics']}")


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
    backbone: Optional[str] = typer.Option(None, help="With --from-scratch: which backbone (default: the run's)"),
    unlabeled_profile: str = typer.Option("same", help="same | reversed (DASO-style mismatched unlabeled pool; simulation)"),
    unlabeled_imbalance: Optional[float] = typer.Option(None, help="Imbalance of the reshaped unlabeled pool"),
    ckpt_every: int = typer.Option(100, min=1),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Flips in the weak/strong views (default: colour images only)"),
    option: list[str] = typer.Option([], "--option", help="Method setting KEY=VALUE, repeatable (see docs/semi.md), e.g. --option bn_batch=split"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage 4: semi-supervised fine-tune from the stage-1 backbone on the labels bought; prints JSON.

    Example: alssl semi-finetune runs/d --method simmatch --steps 2000 --option bn_batch=split
    """
    import hashlib

    from alssl.errors import unknown
    from alssl.runs import run_lock
    from alssl.semi import METHODS, semi_finetune as run_semi

    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if teacher not in ("ema", "eman"):
        raise unknown("teacher", teacher, ["ema", "eman"])
    if unlabeled_profile not in ("same", "reversed"):
        raise unknown("unlabeled profile", unlabeled_profile, ["same", "reversed"])
    run, dataset = _load_run(run_dir)
    idx = run.labeled_indices
    if len(idx) == 0:
        raise UserError(f"{run_dir} has no labeled samples yet; run `alssl query {run_dir} --budget 2%` then `alssl label {run_dir} --oracle`")
    ckpt = run.checkpoints / "backbone.pt"
    if not from_scratch and not ckpt.exists():
        raise UserError(f"{run_dir} has no stage-1 backbone; run `alssl pretrain` first or pass --from-scratch")
    args = dict(method=method, steps=steps, batch_size=batch_size, mu=mu, tau=tau, lambda_u=lambda_u, lr=lr,
                teacher=teacher, seed=seed)
    options = {"unlabeled_profile": unlabeled_profile, "unlabeled_imbalance": unlabeled_imbalance, "hflip": hflip,
               **_key_values(option)}
    tag = hashlib.sha256(json.dumps([args, options, from_scratch, backbone, idx.tolist()], sort_keys=True).encode()).hexdigest()[:8]
    out = run.path / "semi" / f"{method}-{len(idx)}lab-{tag}"
    with run_lock(run_dir):
        res = run_semi(dataset, labeled_idx=idx, labeled_y=run.labels[idx], out_dir=out,
                       backbone=backbone or run.config["pretrain"]["backbone"],
                       init_checkpoint=None if from_scratch else ckpt, ckpt_every=ckpt_every,
                       quiet=_quiet(quiet), options=options, **args)
        run.log_metrics({"stage": "semi", "dir": str(out.relative_to(run.path)), **{k: v for k, v in res.items() if k != "per_class_recall"}})
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
    semi_steps: int = typer.Option(500, min=1),
    from_run: Optional[Path] = typer.Option(None, "--from", help="Reuse this run's stage-1 backbone"),
    method: str = typer.Option("simsiam"),
    backbone: str = typer.Option("cnn"),
    epochs: int = typer.Option(20, min=0),
    batch_size: int = typer.Option(256, min=2),
    imbalance: Optional[float] = typer.Option(None),
    jobs: int = typer.Option(1, help="Parallel processes over (probe, strategy, seed) chains"),
    plot_only: Optional[Path] = typer.Option(None, help="Only redraw DIR/curve.png from DIR/curve.csv"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Budget-curve grid: strategies × budgets × seeds → curve.csv + curve.png/svg. Resumable.

    Example: alssl curve --data digits --strategies random,kcenter,typiclust --budgets 1%,2%,5% --seeds 3 --out curves/d
    """
    if plot_only is not None:
        from alssl.plots import plot_curve

        if not (plot_only / "curve.csv").exists():
            raise UserError(f"{plot_only} has no curve.csv; run `alssl curve --out {plot_only}` first")
        png, svg = plot_curve(plot_only / "curve.csv")
        typer.echo(json.dumps({"png": str(png), "svg": str(svg)}))
        return
    from alssl.curve import Grid, run_experiment

    if out is None:
        raise UserError("give --out DIR for the curve files (or --plot-only DIR to redraw one)")
    grid = Grid(data=_data_config(data, imbalance, 0), strategies=_split(strategies), budgets=_split(budgets),
                seeds=seeds, probes=_split(probe), semi=semi, semi_steps=semi_steps)
    pargs = {"method": method, "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "lr": None,
             "eman": False, "seed": 0}
    csv_path, png, svg = run_experiment(out, grid, pretrain_args=pargs, from_run=from_run, jobs=jobs, quiet=_quiet(quiet))
    typer.echo(json.dumps({"csv": str(csv_path), "png": str(png), "svg": str(svg)}))


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="pipelines/NAME.toml"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: the config's [output] dir)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The whole pipeline from a config: pretrain once, then the budget-curve grid and its plots.

    Example: alssl run pipelines/digits_demo.toml --out runs/demo
    """
    from dataclasses import asdict

    from alssl.config import load_config
    from alssl.curve import Grid, run_experiment

    cfg = load_config(config)
    c = cfg.curve
    grid = Grid(data=_data_config(cfg.data.spec, cfg.data.imbalance, cfg.data.seed), strategies=c.strategies,
                budgets=[str(b) for b in c.budgets], seeds=c.seeds, probes=c.probes, semi=c.semi,
                semi_steps=c.semi_steps, options={} if c.delta is None else {"delta": c.delta})
    pargs = {k: v for k, v in asdict(cfg.pretrain).items() if k != "from_run"}
    from_run = Path(cfg.pretrain.from_run) if cfg.pretrain.from_run else None
    out = out or Path(cfg.output.dir)
    csv_path, png, svg = run_experiment(out, grid, pretrain_args=pargs, from_run=from_run, jobs=c.jobs,
                                        quiet=_quiet(quiet), title=cfg.output.title)
    typer.echo(json.dumps({"csv": str(csv_path), "png": str(png), "svg": str(svg)}))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: UserError and usage errors → one `error:` line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    try:
        app(args=argv, standalone_mode=False, prog_name="alssl")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "alssl"
        typer.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
