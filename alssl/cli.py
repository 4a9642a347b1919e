"""The `alssl` command line: a thin typer layer over the library (no method logic here).

Every command validates its input before it writes anything; a `UserError` becomes exit code 2 and one
`error:` line on stderr, with no traceback, and the run dir is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.22 vendors click; older typer depends on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from alssl.api import called_from_cli
from alssl.devices import use as use_devices
from alssl.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Self-supervised pretraining + active learning + semi-supervised fine-tuning under a labeling budget.\n\n"
    "Example: alssl pretrain --data digits --out runs/d && alssl query runs/d --budget 2% && alssl label runs/d --oracle",
)


ACCELERATOR = typer.Option(None, "--accelerator", help="Where the network runs (Fabric's meaning): auto (the GPU when present) | cpu | cuda | gpu | mps; default $ALSSL_ACCELERATOR or auto")
DEVICES = typer.Option(None, "--devices", help="Devices to embed/predict on; > 1 shards the pool over that many processes (docs/scale.md); default $ALSSL_DEVICES or 1")
PRECISION = typer.Option(None, "--precision", help="32-true | bf16-mixed | 16-mixed (autocast); default $ALSSL_PRECISION or 32-true")
NUM_NODES = typer.Option(None, "--num-nodes", help="Machines (Fabric's num_nodes): run the same command on each with NODE_RANK, MASTER_ADDR, MASTER_PORT set, RUN on a shared filesystem (docs/scale.md); default $ALSSL_NUM_NODES or 1")
FORCE = typer.Option(False, "--force", help="Replace existing files at --out that an earlier run of this command did not write (never a run's file or an input)")
CLASSIFIER = typer.Option("auto", help="auto (the fine-tune on the current labels if any, else the linear probe) | semi | probe")


def _options(values: dict, *drop: str, **change) -> dict:
    """A command's options as the api function's keyword arguments: RUN (passed first) and `drop` left out,
    `change` replacing values; `quiet` (no progress bars) also when stderr is not a terminal."""
    kept = {k: v for k, v in values.items() if k != "run_dir" and k not in drop}
    return kept | ({"quiet": kept["quiet"] or not sys.stderr.isatty()} if "quiet" in kept else {}) | change


def _echo(record: dict | None) -> None:  # one JSON line; nothing on a DDP rank > 0 (None: rank 0 reports)
    if record is not None:
        typer.echo(json.dumps(record))


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
    pool_format: str = typer.Option("auto", help="Image folders only: how RUN/pool stores the decoded images: raw uint8 rows | jpeg (quality 90, ~8-20x smaller, decoded on read, slightly lossy) | auto = raw up to 64 px, jpeg above (docs/data.md)"),
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
    num_nodes: Optional[str] = NUM_NODES,
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
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    _echo(api.pretrain(**_options(options)))


# ------------------------------------------------------------------ stage 2 and the feature sets
@app.command()
def probe(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    probe: str = typer.Option("linear", help="linear | svm"),
    kernel: str = typer.Option("linear", help="SVM kernel: linear | rbf"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    num_nodes: Optional[str] = NUM_NODES,
    seed: int = typer.Option(0),
) -> None:
    """Stage 2: fit a probe on the frozen features of the labeled set; print its accuracy as JSON.

    Accuracy is on the test split; a pool without a labeled test set reports cv_accuracy (stratified k-fold on the
    labeled set, k = min(5, smallest class count)).

    Example: alssl probe runs/d --probe svm
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    record = api.probe(run_dir, **_options(options))
    _echo(record)
    if record and record.get("predictions_stable"):  # (None: another node, which only helped embedding)
        from alssl.stopping import stable_message

        typer.echo(f"# {stable_message(record['kappa'])}", err=True)


@app.command()
def features(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    add: Optional[str] = typer.Option(None, "--add", help="Add a feature extractor: cnn | resnet18 | torchvision:NAME | timm:NAME"),
    init: Optional[str] = typer.Option(None, help="With --add: its weights, a state dict file (.pt/.pth/.safetensors) or hub"),
    name: Optional[str] = typer.Option(None, help="With --add: the feature set's name (default: from the backbone and weights)"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    num_nodes: Optional[str] = NUM_NODES,
    use: Optional[str] = typer.Option(None, help="Pin the feature set every command uses (a name), or auto: choose by measurement"),
) -> None:
    """The run's feature sets (stage 1, its start, any you add), each scored on the labels; the strongest is used.

    Without options: list them with their accuracy on the labels (test set, or cross-validation) and which is in use.

    Examples:
      alssl features runs/mine --add timm:vit_small_patch14_dinov2.lvd142m --init hub
      alssl features runs/mine --add cnn --init other_run/checkpoints/backbone.pt --name other
      alssl features runs/mine --use start
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    if (out := api.features(run_dir, **_options(options))) is None:  # another node: it only helped embedding
        return
    line = out.pop("line")
    _echo(out)
    typer.echo(f"# {line}", err=True)


# ------------------------------------------------------------------ stage 3
@app.command()
def query(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    budget: str = typer.Option(..., help="2% of the pool or a count like 500"),
    strategy: str = typer.Option("random", help="random | entropy | margin | svm-margin | kcenter | vaal | typiclust | probcover | badge | cluster-margin"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    num_nodes: Optional[str] = NUM_NODES,
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
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    if (res := api.query(run_dir, **_options(options))) is None:  # another node: it only helped embedding
        return
    if res["reshown"]:
        typer.echo(f"# round {res['round']} is still open; label it, then query again", err=True)
    typer.echo(res["file"])


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
    from alssl import api

    if oracle == (from_file is not None):
        raise UserError("give exactly one of --from FILE.csv or --oracle")
    res = api.label(run_dir, "oracle" if oracle else from_file, any_images=any_images, classes=classes)
    skipped = f" and {res['skipped']} skipped images" if res["skipped"] else ""
    typer.echo(f"imported {res['imported']} labels{skipped}; {res['labeled']} labeled in {res['rounds']} rounds")


@app.command()
def status(run_dir: Path = typer.Argument(..., metavar="RUN"), as_json: bool = typer.Option(False, "--json")) -> None:
    """What the run holds: data, stages done, labeled count per round, open query, last metrics.

    Example: alssl status runs/d
    """
    from alssl import api
    from alssl.reports import print_status

    info = api.status(run_dir)
    if as_json:
        return _echo(info)
    print_status(info)


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
    num_nodes: Optional[str] = NUM_NODES,
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Stage 4: semi-supervised fine-tune from the stage-1 backbone on the labels bought; prints JSON.

    Example: alssl semi-finetune runs/d --method simmatch --steps 2000 --option bn_batch=split
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api
    from alssl.config import key_values

    _echo(api.semi_finetune(run_dir, **_options(options, "option", options=key_values(option))))


# ------------------------------------------------------------------ models out
@app.command("export")
def export_model(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    out: Path = typer.Option(..., help="Folder for model.pt, model.ts and model.json"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    num_nodes: Optional[str] = NUM_NODES,
    force: bool = FORCE,
    classifier: str = CLASSIFIER,
) -> None:
    """The best model the run has (the semi-supervised fine-tune on the current labels, else backbone + linear probe)
    → model.pt (state dict), model.ts (TorchScript: float [B, C, S, S] in [0, 1] → logits) and model.json.

    Example: alssl export runs/mine --out models/mine
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    _echo(api.export(run_dir, **_options(options)))


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    paths: Optional[list[Path]] = typer.Argument(None, metavar="[FILES_OR_DIRS]...", help="More images or folders"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Image files or folders (repeatable; folders are read recursively)"),
    pool: bool = typer.Option(False, "--pool", help="Predict every unlabeled pool image instead (pre-annotations)"),
    out: Path = typer.Option(..., help="CSV to write: path,label,confidence"),
    workers: Optional[int] = typer.Option(None, min=1, help="Decoding processes (default: CPU count, at most 8)"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    num_nodes: Optional[str] = NUM_NODES,
    force: bool = FORCE,
    classifier: str = CLASSIFIER,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Predict classes with the run's best model (as `alssl export` picks it); same preprocessing as training.

    Examples:
      alssl predict runs/mine --data new_photos/ --out predictions.csv
      alssl predict runs/mine --pool --out pool_predictions.csv
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    _echo(api.predict(run_dir, **_options(options, "paths", data=[*(data or []), *(paths or [])])))


# ------------------------------------------------------------------ curves and pipelines (alssl/curves.py)
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
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    jobs: int = typer.Option(1, help="Parallel processes over (probe, strategy, seed) chains"),
    balance: bool = typer.Option(False, "--balance", help="Every strategy with per-class quotas (imbalanced pools; see docs/acquisition.md)"),
    plot_only: Optional[Path] = typer.Option(None, help="Only redraw DIR/curve.png from DIR/curve.csv"),
    force: bool = FORCE,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Budget-curve grid: strategies × budgets × seeds → curve.csv + curve.png/svg. Resumable.

    Example: alssl curve --data digits --strategies random,kcenter,typiclust --budgets 1%,2%,5% --seeds 3 --out curves/d
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    if plot_only is not None:
        return _echo(api.redraw_curve(plot_only))
    if out is None:
        raise UserError("give --out DIR for the curve files (or --plot-only DIR to redraw one)")
    _echo(api.curve(**_options(options, "plot_only")))


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="pipelines/NAME.toml"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: the config's [output] dir)"),
    force: bool = FORCE,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """The whole pipeline from a config: pretrain once, then the budget-curve grid and its plots.

    Example: alssl run pipelines/digits_demo.toml --out runs/demo
    """
    options = dict(locals())  # the command's options: the api function takes the same names
    from alssl import api

    _echo(api.run_pipeline(**_options(options)))


# ------------------------------------------------------------------ labeling (alssl/labeling/, docs/labeling.md)
@app.command("label-ui")
def label_ui(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but 127.0.0.1 lets other machines reach the page (the token still guards it)"),
    port: int = typer.Option(8765, min=0, max=65535, help="Port (0: any free port)"),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open the page in your web browser"),
    accelerator: Optional[str] = ACCELERATOR,
    devices: Optional[str] = DEVICES,
    precision: Optional[str] = PRECISION,
    classes: Optional[str] = typer.Option(None, help="Class list (a,b,c or @classes.txt) for a run that has none yet; stored with the first import"),
) -> None:
    """A local labeling page for the open query: a key or a click per image, Submit imports the round.

    Prints one URL with a random token; the page's JSON API and images refuse requests without it. Every label is
    saved at once to RUN/queries/round-K.partial.csv: Ctrl-C (or a crash) loses nothing, rerun to go on.

    Example: alssl label-ui runs/mine
    """
    from alssl import api, devices as dev
    from alssl.labeling.server import bind, serve_page

    api.class_list(classes)
    dev.use(dev.parse(accelerator, devices, precision, num_nodes=1))  # the whole session (one machine): suggestions embed while it serves
    sock = bind(host, port)  # a taken port answers before anything (torch included) is loaded
    try:
        session = api.label_session(run_dir, classes=classes)
    except BaseException:
        sock.close()
        raise
    serve_page(session, sock, host, browser=browser, say=lambda text, err: typer.echo(text, err=err),
               stop=(KeyboardInterrupt, Terminated))


@app.command()
def tasks(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    out: Path = typer.Option(..., help="Folder for tasks.json and config.xml (and images/ for datasets without image files)"),
    format: str = typer.Option("label-studio", "--format", help="label-studio"),
    document_root: Optional[Path] = typer.Option(None, help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT (default: the pool folder; for datasets without image files, --out)"),
    classes: Optional[str] = typer.Option(None, help="Class list (a,b,c or @classes.txt) for a run that has none yet"),
    force: bool = FORCE,
) -> None:
    """Label Studio tasks for the open query (+ its labeling config); import the export with `alssl label --from`.

    Example: alssl tasks runs/mine --out ls_round1 && alssl label runs/mine --from project-1-export.json
    """
    from alssl import api
    from alssl.errors import unknown
    from alssl.labeling.studio import how_to_import

    if format != "label-studio":
        raise unknown("format", format, ["label-studio"])
    res = api.tasks(run_dir, out, classes=classes, document_root=document_root, force=force)
    has_classes = res.pop("has_classes")
    _echo(res)
    typer.echo(f"# {how_to_import(res, run_dir, has_classes)}", err=True)


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
            with called_from_cli():  # the library's messages name this command's flags
                rc = app(args=argv, standalone_mode=False, prog_name="alssl")
        finally:
            use_devices(None)  # a command's --accelerator/--devices/--precision end with it (in-process callers)
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
