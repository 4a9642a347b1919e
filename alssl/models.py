"""A model you can take away: the best classifier a run has, as a state dict, TorchScript and a JSON card; predictions.

The best classifier is the semi-supervised fine-tune trained on the run's current labeled set (its EMA/EMAN teacher,
the model its accuracy was measured with; the most accurate if there are several), else the frozen stage-1 backbone
with the linear probe folded into one `nn.Linear`: logits = W·(f − μ)/σ + b = (W/σ)·f + (b − W·μ/σ), so the exported
model predicts exactly what `alssl probe` fits (scikit-learn's StandardScaler + LogisticRegression, seed 0).
Classes the labeled set lacks get weight 0 and bias −1e9 (probability 0), as the probe reports them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl import __version__
from alssl.backbones import TimmBackbone, TorchvisionBackbone, build_backbone, load_backbone_checkpoint
from alssl.data import Dataset
from alssl.errors import UserError, unknown, warn
from alssl.probes import MISSING, cross_val_accuracy, fit_probe
from alssl.runs import _UMASK, Run, atomic_write_bytes, atomic_write_text, read_json, torch_load

PREPROCESSING = ("resize the shorter side to image_size (bilinear, antialiased; JPEGs may be decoded at 1/2-1/8 scale "
                 "first with PIL's draft mode when the shorter side is at least 2x image_size), centre crop "
                 "image_size x image_size, RGB (or grayscale when channels = 1), float in [0, 1], NCHW; "
                 "the model normalises with mean/std itself")
PREPROCESSING_NO_DRAFT = ("torchvision's Resize(image_size) + CenterCrop(image_size) on a plain PIL decode (bilinear, "
                          "antialiased; the run was built with --no-jpeg-draft), RGB (or grayscale when channels = 1), "
                          "float in [0, 1], NCHW; the model normalises with mean/std itself")


class Classifier(nn.Module):
    """Float images [B, C, S, S] in [0, 1] -> logits [B, K]; the per-channel normalisation is inside."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))


def folded_linear_probe(probe, num_classes: int, dim: int) -> nn.Linear:
    """The fitted linear probe (StandardScaler + LogisticRegression on present classes) as one Linear [K, D]."""
    weight = np.zeros((num_classes, dim), np.float64)
    bias = np.full(num_classes, MISSING, np.float64)
    if probe.model is None:  # one class only: it wins everywhere
        bias[probe.classes] = 0.0
    else:
        coef, intercept = probe.model.coef_, probe.model.intercept_  # [K', D], [K'] (binary: [1, D], [1])
        mu, sigma = probe.scaler.mean_, probe.scaler.scale_
        w, b = coef / sigma, intercept - (coef / sigma) @ mu
        if len(probe.classes) == 2 and len(coef) == 1:  # binary: logits (0, d) as Probe._raw
            weight[probe.classes[1]], bias[probe.classes[1]], bias[probe.classes[0]] = w[0], b[0], 0.0
        else:
            weight[probe.classes], bias[probe.classes] = w, b
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return head


def _semi_problem(state, result) -> str | None:
    """What is wrong with a finished fine-tune's state.pt / result.json (the parts export reads), or None."""
    if not isinstance(result, dict) or not isinstance(result.get("backbone"), str) \
            or not isinstance(result.get("method"), str):
        return "result.json lacks its backbone or method"
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict) \
            or not isinstance(state.get("teacher"), dict):
        return "state.pt is not an alssl fine-tune state (fingerprint, teacher)"
    teacher = state["teacher"]
    if not all(isinstance(v, torch.Tensor) for v in teacher.values()) \
            or not {"head.weight", "head.bias"} <= teacher.keys():
        return "state.pt's teacher weights are not tensors with a head"
    return None


def _semi_candidates(run: Run, labeled_digest: str) -> list[tuple[Path, dict]]:
    """Finished fine-tunes of this run trained on exactly the current labeled set: (dir, result.json).

    A fine-tune still running (or killed) has no result.json yet and is not a candidate; a finished one whose files
    are damaged is a UserError naming it (never a traceback, never silently another model)."""
    out = []
    for d in sorted((run.path / "semi").glob("*/")):
        if not (d / "result.json").exists():
            continue
        fix = f"delete {d} (that fine-tune is dropped) or rerun the `alssl semi-finetune` that made it"
        try:
            result = json.loads((d / "result.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise UserError(f"{d / 'result.json'} is unreadable ({type(exc).__name__}); {fix}") from None
        try:
            state = torch_load(d / "state.pt")
        except UserError as exc:
            raise UserError(f"{exc}".split("; ")[0] + f"; {fix}") from None
        problem = _semi_problem(state, result)
        if problem:
            raise UserError(f"{d} is damaged ({problem}); {fix}")
        if state["fingerprint"].get("labeled") == labeled_digest:
            out.append((d, result))
    return out


CLASSIFIERS = ("auto", "semi", "probe")


def best_classifier(run: Run, dataset: Dataset, classifier: str = "auto") -> tuple[Classifier, dict]:
    """The best model the run has (module doc) and a record of how it was made.

    `classifier`: "auto" (the fine-tune on the current labels if there is one, else the linear probe), "semi" or
    "probe". The linear probe on the same labels is always measured: a fine-tune's record carries it as
    `probe_accuracy`, its baseline, and a fine-tune that scores below it says so in one warning."""
    from alssl.semi.trainer import array_digest

    if classifier not in CLASSIFIERS:
        raise unknown("classifier", classifier, CLASSIFIERS)
    idx = run.labeled_indices
    if len(idx) == 0:
        raise UserError(f"{run.path} has no labels yet, so there is no classifier to use; label some images first "
                        f"(`alssl query {run.path} --budget 2%`, then `alssl label {run.path} --from FILE.csv`)")
    y = run.labels[idx]
    pre = run.stages.get("pretrain", {})
    record = {"n_labeled": int(len(idx)), "rounds": run.n_rounds, "pretrain": pre.get("method"),
              "pretrain_epochs": pre.get("epochs")}
    found = _semi_candidates(run, array_digest(idx, y)) if classifier != "probe" else []
    if classifier == "semi" and not found:
        raise UserError(f"{run.path} has no finished semi-supervised fine-tune on its current {len(idx)} labels; run "
                        f"`alssl semi-finetune {run.path}` first, or use --classifier probe")
    probe_model, probe_record = _probe_classifier(run, dataset, idx, y)
    if not found:
        return probe_model, record | probe_record
    model, semi_record = _semi_classifier(run, dataset, found)
    acc, base = semi_record["accuracy"], probe_record["accuracy"]
    if acc is not None and base is not None and acc < base \
            and probe_record["accuracy_on"] == semi_record["accuracy_on"]:
        warn(f"the fine-tune {semi_record['semi_dir']} scores {acc:.3f} on the test set, below the linear probe's "
             f"{base:.3f} on the same labels; it is used since "
             + ("you asked for it" if classifier == "semi" else "a fine-tune is preferred (--classifier auto)")
             + ": pass --classifier probe to use the probe, or fine-tune longer")
    return model, record | semi_record | {"probe_accuracy": base}


def _semi_classifier(run: Run, dataset: Dataset, found: list[tuple[Path, dict]]) -> tuple[Classifier, dict]:
    """The most accurate finished fine-tune on the current labels (its EMA/EMAN teacher)."""
    d, result = max(found, key=lambda c: (c[1].get("accuracy") or -1.0, (c[0] / "result.json").stat().st_mtime))
    teacher = torch_load(d / "state.pt")["teacher"]
    backbone = build_backbone(result["backbone"], dataset.channels)
    head = nn.Linear(backbone.dim, dataset.num_classes)
    try:
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")})
        head.load_state_dict({"weight": teacher["head.weight"], "bias": teacher["head.bias"]})
    except (RuntimeError, ValueError) as exc:  # missing keys, other shapes
        reason = str(exc).strip().splitlines()[0][:160]
        raise UserError(f"{d / 'state.pt'} does not fit backbone {result['backbone']} ({reason}); delete {d} "
                        f"(that fine-tune is dropped) or rerun the `alssl semi-finetune` that made it") from None
    if not all(bool(torch.isfinite(t).all()) for t in [*backbone.state_dict().values(), *head.state_dict().values()]
               if t.is_floating_point()):
        raise UserError(f"{d / 'state.pt'} holds non-finite weights; delete {d} (that fine-tune is dropped) or "
                        f"rerun the `alssl semi-finetune` that made it")
    acc = result.get("accuracy")
    record = {"classifier": f"semi:{result['method']}", "semi_method": result["method"],
              "features": result.get("features"), "features_why": result.get("features_why"),
              "semi_steps": result.get("steps"), "backbone": result["backbone"],
              "semi_dir": str(d.relative_to(run.path)),
              "accuracy": acc, "accuracy_on": f"test set ({len(dataset.x_test)} images)" if acc is not None else None}
    return Classifier(backbone, head, dataset.mean, dataset.std).eval(), record


def _probe_classifier(run: Run, dataset: Dataset, idx: np.ndarray, y: np.ndarray) -> tuple[Classifier, dict]:
    """The backbone of the feature set in use + the linear probe on the labels, folded into one Linear."""
    from alssl.feature_sets import choose, pool_features

    choice = choose(run, dataset)  # the feature set measured strongest on the labels (alssl/feature_sets.py)
    backbone, meta = load_backbone_checkpoint(choice.path, expect_channels=dataset.channels)
    train, test = pool_features(run.path, dataset, choice.path)
    probe = fit_probe("linear", train[idx], y, num_classes=dataset.num_classes, seed=0)
    head = folded_linear_probe(probe, dataset.num_classes, train.shape[1])
    if dataset.has_test:
        acc, on = probe.accuracy(test, dataset.y_test), f"test set ({len(test)} images)"
    else:
        acc, k = cross_val_accuracy("linear", train[idx], y, num_classes=dataset.num_classes)
        on = f"{k}-fold cross-validation on the labeled set" if acc is not None else None
    record = {**choice.record(), "feature_scores": {n: s.get("cv_accuracy") for n, s in choice.scores.items()},
              "classifier": "linear-probe", "semi_method": None, "backbone": meta["backbone"],
              "accuracy": None if acc is None else round(float(acc), 4), "accuracy_on": on}
    return Classifier(backbone, head, dataset.mean, dataset.std).eval(), record


def suggestions(run: Run, dataset: Dataset, indices: list[int]) -> dict[int, tuple[str, float]]:
    """The run's best classifier's (class, confidence) for each queried image; {} when the run has no labels yet
    (or no model can be built: a warning says why)."""
    return model_suggestions(run, dataset, indices)[0]


def model_suggestions(run: Run, dataset: Dataset, indices: list[int]
                      ) -> tuple[dict[int, tuple[str, float]], dict | None]:
    """(suggestions as `suggestions` gives them, the model's record: its accuracy and what it was measured on)."""
    if not indices or not run.labeled_mask.any():
        return {}, None
    try:
        model, record = best_classifier(run, dataset)
        ks, conf = predict_rows(model, dataset.x_train[np.asarray(indices, dtype=np.int64)])
    except UserError as exc:
        warn(f"no suggestions: {exc}")
        return {}, None
    out = {i: (dataset.classes[int(k)], round(float(c), 4)) for i, k, c in zip(indices, ks.tolist(), conf.tolist())}
    return out, {k: record.get(k) for k in ("classifier", "n_labeled", "accuracy", "accuracy_on")}


EXPORT_FILES = ["model.pt", "model.ts", "model.json"]


def is_export_dir(out: Path) -> bool:
    """Whether `out` holds an earlier `alssl export` (its model.json is an alssl model card)."""
    card = read_json(out / "model.json")
    return isinstance(card, dict) and "alssl_version" in card and "classes" in card


def is_predictions_csv(out: Path) -> bool:
    """Whether `out` is an earlier `alssl predict` output (a CSV starting with the header path,label,confidence)."""
    try:
        with open(out, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.startswith(b"path,label,confidence")


def data_name(spec: str) -> str:
    """A data SPEC by name only (a shared model card carries no local path): digits, cifar10:NAME, FILE.npz, FOLDER."""
    if spec.startswith("cifar10:"):
        return "cifar10:" + Path(spec[len("cifar10:"):]).name
    return Path(spec).name or spec


def export(run: Run, dataset: Dataset, out: Path, *, classifier: str = "auto") -> dict:
    """Write out/model.pt, out/model.ts and out/model.json; returns the model card."""
    model, record = best_classifier(run, dataset, classifier)
    S, C = dataset.image_size, dataset.channels
    card = {"classes": list(dataset.classes), "image_size": S, "channels": C, "mean": list(dataset.mean),
            "std": list(dataset.std), "input": f"float32 [B, {C}, {S}, {S}] in [0, 1]", "output": "logits [B, K]",
            "preprocessing": PREPROCESSING if run.data_config.get("jpeg_draft", True) else PREPROCESSING_NO_DRAFT,
            **record, "data": data_name(run.data_config["spec"]), "alssl_version": __version__}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ marks TorchScript deprecated; it still runs everywhere
        warnings.simplefilter("ignore", FutureWarning)
        # timm ViTs built with dynamic_img_size branch on the input's size: traced at S×S, the size model.json states
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.rand(2, C, S, S), check_trace=True)
        torch.jit.save(traced, buf)
    state = plain_state_dict(model)
    if getattr(model.backbone, "head_name", None) is not None:  # torchvision:NAME / timm:NAME
        card["state_dict_of"] = (f"torchvision.models.{model.backbone.arch}(num_classes={len(dataset.classes)})"
                                 if isinstance(model.backbone, TorchvisionBackbone) else
                                 f"timm.create_model({model.backbone.arch!r}, num_classes={len(dataset.classes)}, "
                                 f"in_chans={C})")
    sbuf = io.BytesIO()
    torch.save(state, sbuf)
    atomic_write_bytes(out / "model.pt", sbuf.getvalue())
    atomic_write_bytes(out / "model.ts", buf.getvalue())
    atomic_write_text(out / "model.json", json.dumps(card, indent=1) + "\n")
    return card


def plain_state_dict(model: Classifier) -> dict:
    """model.pt's contents. For torchvision:NAME / timm:NAME backbones exactly the state dict of the library's own
    model with K classes (`torchvision.models.NAME(num_classes=K)`, `timm.create_model(NAME, num_classes=K)`): the
    trained classifier sits where the library's classifier sits, and normalisation is left to the user (mean/std are
    in model.json). Other backbones: `backbone.*`, `head.*` and the `mean`/`std` buffers."""
    bb = model.backbone
    if isinstance(bb, (TorchvisionBackbone, TimmBackbone)):
        state = dict(bb.net.state_dict())
        state[f"{bb.head_name}.weight"], state[f"{bb.head_name}.bias"] = model.head.weight, model.head.bias
    else:
        state = model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------- predictions
@torch.no_grad()
def predict_batches(model: Classifier, x, batch_size: int = 256, *, quiet: bool = True, label: str = "predicting"):
    """Yield (class ids [B], top-1 softmax probability [B]) batch by batch for uint8 images x [N, S, S, C] (anything
    sliceable: an array, a DiskPool, rows of one): on the device `alssl.devices.current()` names, under its autocast,
    the next batch read (and pinned on CUDA) by a background thread meanwhile; a progress bar unless quiet."""
    from alssl import devices as dev
    from alssl.prefetch import ahead
    from alssl.progress import progress_bar

    device, autocast = dev.single()
    model = model.eval().to(device)

    def read(i: int) -> torch.Tensor:  # uint8 [B, C, S, S]; the model scales to [0, 1] on the device
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).permute(0, 3, 1, 2)
        return xb.pin_memory() if device.type == "cuda" else xb

    bar, task = progress_bar(label, len(x), 0, quiet=quiet)
    with bar or contextlib.nullcontext():
        for _, xb in ahead(read, range(0, len(x), batch_size), device=device):
            with autocast():
                logits = model(xb.to(device, non_blocking=True).float().div_(255.0))  # [B, K]
            c, k = torch.softmax(logits.float().cpu().double(), dim=1).max(dim=1)
            if bar is not None:
                bar.update(task, advance=len(k))
            yield k.numpy(), c.numpy()


def predict_rows(model: Classifier, x, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(class ids [N], top-1 softmax probability [N]) for uint8 images [N, S, S, C] (an array or a DiskPool)."""
    parts = list(predict_batches(model, x, batch_size))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def image_paths(sources: list[Path]) -> list[tuple[str, Path]]:
    """(name to report, file) for every image in the given files and folders (folders: recursive, sorted)."""
    from alssl.data.folder import scan_folder

    out = []
    for src in sources:
        if src.is_dir():
            out += [(os.path.join(str(src), rel), src / rel) for rel, _, _ in scan_folder(src)]
        elif src.is_file():
            out.append((str(src), src))
        else:
            raise UserError(f"{src} does not exist; give image files or folders of images to --data")
    if not out:
        raise UserError(f"no image files in {', '.join(map(str, sources))} (.jpg .jpeg .png .bmp .webp .tif .tiff "
                        f".gif); give image files or folders")
    return out


def predictions_csv(names: list[str], labels: np.ndarray, conf: np.ndarray, classes: list[str],
                    extra: dict[str, list] | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "confidence", *(extra or {})])
    cols = list((extra or {}).values())
    for j, (name, k, c) in enumerate(zip(names, labels.tolist(), conf.tolist())):
        w.writerow([name, classes[k], f"{c:.6f}", *(col[j] for col in cols)])
    return buf.getvalue()


def predict_files(run: Run, dataset: Dataset, sources: list[Path], out: Path, *, workers: int | None = None,
                  quiet: bool = True, classifier: str = "auto") -> dict:
    """Predict every image in `sources` with the run's best classifier; write `out` (path,label,confidence)."""
    from alssl.data.folder import DiskPool, decode_files, default_workers

    model, record = best_classifier(run, dataset, classifier)
    files = image_paths(sources)
    with tempfile.TemporaryDirectory(prefix="alssl-predict-") as tmp:
        res = decode_files(Path("/"), [str(p.resolve()) for _, p in files], dest=Path(tmp) / "x.npy",
                           image_size=dataset.image_size, channels=dataset.channels,
                           workers=workers or default_workers(), label="images", quiet=quiet,
                           draft=run.data_config.get("jpeg_draft", True))
        kept = set(res["kept"])
        names = [n for n, p in files if str(p.resolve()) in kept]
        labels, conf = predict_rows(model, DiskPool(Path(tmp) / "x.npy")) if kept else (np.zeros(0, int), np.zeros(0))
    if res["skipped"]:
        rel, why = res["skipped"][0]
        warn(f"skipped {len(res['skipped'])} unreadable file(s), e.g. {rel}: {why}")
    if not names:
        raise UserError("none of the given images could be read; check the files")
    atomic_write_text(out, predictions_csv(names, labels, conf, dataset.classes))
    return {"predictions": str(out), "n": len(names), "skipped": len(res["skipped"]),
            "classifier": record["classifier"]}


def predict_pool(run: Run, dataset: Dataset, out: Path, *, classifier: str = "auto", quiet: bool = True) -> dict:
    """Predict every unlabeled pool image (pre-annotations for labelers); columns path,label,confidence,index.

    Streamed: batches are predicted on the device and their rows appended to a temp file beside `out`, which is
    fsynced and renamed into place at the end (memory stays flat in the pool size)."""
    from alssl.rounds import _Rows

    model, record = best_classifier(run, dataset, classifier)
    idx = np.flatnonzero(~run.labeled_mask)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "label", "confidence", "index"])
            done = 0
            for labels, conf in predict_batches(model, _Rows(dataset.x_train, idx), quiet=quiet,
                                                label="predicting the pool"):
                rows = idx[done : done + len(labels)]
                w.writerows([dataset.ids[i], dataset.classes[k], f"{c:.6f}", i]
                            for i, k, c in zip(rows.tolist(), labels.tolist(), conf.tolist()))
                done += len(labels)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"predictions": str(out), "n": int(len(idx)), "classifier": record["classifier"]}
