"""Pipeline configs (`alssl run pipelines/NAME.toml`): tomllib + dataclasses, unknown keys rejected with a suggestion.

Each section checks its own values in `__post_init__` (type, range, registry name), so a bad value is refused
before `alssl run` writes anything, with one message naming the key and the fix.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from alssl import names
from alssl.errors import UserError, suggest


# ---------------------------------------------------------------- value rules
def _rule(default: Any = None, *, factory: Callable[[], Any] | None = None, lo: float | None = None,
          gt: float | None = None, hi: float | None = None,
          choices: tuple[str, Iterable[str]] | None = None,
          kind: str = "", nonempty: bool = False) -> Any:
    """A dataclass field with its checks: lo ≤ v ≤ hi, v > gt, v (or each item) a name in choices, not empty."""
    meta = {"lo": lo, "gt": gt, "hi": hi, "choices": choices, "kind": kind, "nonempty": nonempty}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is int:
        return type(value) is int  # TOML true is not 1
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)  # nan / inf are not settings
    return type(value) is hint


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        parts = [h for h in typing.get_args(hint) if h is not type(None)]
        text = " or ".join(_describe(h) for h in parts)
        return text + (" (or leave the key out)" if len(parts) < len(typing.get_args(hint)) else "")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return "a list of " + _describe(item).replace("an integer", "integers").replace("a string", "strings")
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_section(obj: Any) -> None:
    """Type-, range- and name-check every field of a config section (called from `__post_init__`)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        key, value, m = f"{obj.SECTION}.{f.name}", getattr(obj, f.name), f.metadata
        hint = hints[f.name]
        want = m.get("kind") or _describe(hint)
        if not _type_ok(value, hint):
            raise UserError(f"{key} must be {want} (got {value!r}); fix it in the config")
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (m.get("lo") is not None and value < m["lo"]) or (m.get("hi") is not None and value > m["hi"]) \
                    or (m.get("gt") is not None and value <= m["gt"]):
                raise UserError(f"{key} must be {want} (got {value!r}); fix it in the config")
        if m.get("nonempty") and not value:
            raise UserError(f"{key} must not be empty; fix it in the config")
        if m.get("choices") is not None:
            noun, known = m["choices"][0], sorted(m["choices"][1])
            for v in value if isinstance(value, list) else [value]:
                if v not in known:
                    raise UserError(f'{key}: unknown {noun} "{v}"{suggest(v, known)}; choose from {", ".join(known)}')
        if isinstance(value, list) and len(set(map(str, value))) != len(value):
            raise UserError(f"{key} lists a value twice ({value}); list each once")


def key_values(items: list[str]) -> dict:
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


# ---------------------------------------------------------------- sections
@dataclass
class DataSection:
    SECTION: ClassVar[str] = "data"
    spec: str = _rule("digits", nonempty=True)
    imbalance: float | None = _rule(None, lo=1.0, kind="a ratio >= 1 (largest / smallest class)")
    seed: int = _rule(0, lo=0, hi=2**32 - 1, kind=f"an integer in 0..{2**32 - 1}")

    def __post_init__(self) -> None:
        check_section(self)


@dataclass
class PretrainSection:
    SECTION: ClassVar[str] = "pretrain"
    method: str = _rule("simsiam", choices=("method", names.PRETRAIN_METHODS))
    backbone: str = _rule("cnn", nonempty=True,
                          kind=f"a backbone name ({' | '.join(names.BACKBONES)} | torchvision:NAME | timm:NAME)")
    epochs: int = _rule(20, lo=0, kind="an integer >= 0 (0 = random-init baseline)")
    batch_size: int = _rule(256, lo=2, kind="an integer >= 2")
    lr: float | None = _rule(None, gt=0, kind="a positive number (or leave the key out for the method's recipe)")
    eman: bool = _rule(False)
    seed: int = _rule(0, lo=0, hi=2**32 - 1, kind=f"an integer in 0..{2**32 - 1}")
    hflip: bool | None = _rule(None, kind="true or false (or leave the key out: on for colour images)")
    momentum: float = _rule(0.99, lo=0.0, kind="a number in [0, 1)")
    momentum_schedule: str | None = _rule(None, choices=("momentum schedule", ("cosine",)),
                                          kind='"cosine" (or leave the key out)')
    queue_size: int | None = _rule(None, lo=1, kind="an integer >= 1 (or leave the key out)")
    temperature: float = _rule(0.2, gt=0, kind="a positive number")
    init: str | None = _rule(None, nonempty=True, kind='a state dict path or "hub" (or leave the key out)')
    from_run: str | None = _rule(None, nonempty=True,  # reuse another run's stage-1 backbone instead of pretraining
                                 kind="a run dir path (a string), or leave the key out to pretrain")

    def __post_init__(self) -> None:
        check_section(self)
        if not self.backbone.startswith(("torchvision:", "timm:")) and self.backbone not in names.BACKBONES:
            raise UserError(f'pretrain.backbone: unknown backbone "{self.backbone}"'
                            f"{suggest(self.backbone, names.BACKBONES)}; "
                            f"choose from {', '.join(names.BACKBONES)}, torchvision:NAME or timm:NAME")
        if self.momentum >= 1.0:
            raise UserError(f"pretrain.momentum must be a number in [0, 1) (got {self.momentum!r}); fix it in the "
                            f"config")

    def args(self, config_dir: Path) -> PretrainArgs:
        """The stage-1 run this section asks for: the same object `alssl pretrain` and `alssl.pretrain` build (an
        `init` path relative to the config's folder)."""
        init = self.init
        if init is not None and init != "hub":
            init = str((config_dir / Path(init).expanduser()).resolve())
        return PretrainArgs(**{f.name: getattr(self, f.name) for f in fields(PretrainArgs)} | {"init": init})

    def curve_args(self, config_dir: Path) -> dict:
        """The pretrain settings a pipeline's curve stores (OUT/pretrain/run.toml): the seven it has always stored,
        plus any other key set away from its default (so a curve made before these keys resumes unchanged)."""
        full, default = self.args(config_dir).as_config(), PretrainArgs().as_config()
        base = ("method", "backbone", "epochs", "batch_size", "lr", "eman", "seed")
        return {k: v for k, v in full.items() if k in base or v != default[k]}


@dataclass
class PretrainArgs:
    """What a stage-1 run is made with (run.toml [pretrain]): `alssl pretrain`'s options, `alssl.pretrain(...)`'s
    keywords. A rerun must give the same values (then it resumes): `check_same_run` is the diff of the two."""
    method: str = "simsiam"
    backbone: str = "cnn"
    epochs: int = 20
    batch_size: int = 256
    lr: float | None = None
    eman: bool = False
    seed: int = 0
    hflip: bool | None = None
    momentum: float = 0.99
    momentum_schedule: str | None = None
    queue_size: int | None = None
    temperature: float = 0.2
    init: str | None = None  # a state dict's absolute path, or "hub"

    def __post_init__(self) -> None:  # the torch-free checks: a refused value answers before torch is imported
        from alssl.errors import check_positive, check_seed, unknown

        if self.method not in names.PRETRAIN_METHODS:
            raise unknown("method", self.method, names.PRETRAIN_METHODS)
        if not self.backbone.startswith(("torchvision:", "timm:")) and self.backbone not in names.BACKBONES:
            raise unknown("backbone", self.backbone, names.BACKBONES)
        check_seed(self.seed)
        if self.lr is not None:
            check_positive(self.lr, "--lr")
        check_positive(self.temperature, "--temperature")

    def as_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_same_run(self, run, data_cfg: dict) -> None:
        """Refuse a rerun of `run` that asks for anything else than the run was made with (naming the first
        difference); the data's resolved keys (classes, image size) are compared only when given again."""
        old, new = run.config.get("pretrain", {}), self.as_config()
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (not {v})" for k, v in new.items() if old.get(k) != v]
        old_data = run.data_config
        for key in ("spec", "imbalance", "test", "strict", "jpeg_draft"):
            if old_data.get(key) != data_cfg.get(key):
                diff.append(f"{'--data' if key == 'spec' else '--' + key} {old_data.get(key)} "
                            f"(not {data_cfg.get(key)})")
        old_data = old_data | {"pool_format": old_data.get("pool_format", "raw")}  # runs made before: raw rows
        for key in ("classes", "image_size", "pool_format"):  # resolved at creation: compare only when given again
            if data_cfg.get(key) is not None and old_data.get(key) != data_cfg[key]:
                diff.append(f"--{key.replace('_', '-')} {old_data.get(key)} (not {data_cfg[key]})")
        if diff:
            raise UserError(f"{run.path} was made with {diff[0]}; rerun with the same arguments to resume, or pick a "
                            f"new --out")


@dataclass
class SemiArgs:
    """What defines a stage-4 fine-tune (with its labels and options: the digest in RUN/semi/METHOD-Nlab-DIGEST):
    `alssl semi-finetune`'s options, `alssl.semi_finetune(...)`'s keywords. The same values again resume it."""
    method: str = "fixmatch"
    steps: int = 1000
    batch_size: int = 64
    mu: int = 7
    tau: float = 0.95
    lambda_u: float = 1.0
    lr: float = 0.03
    teacher: str = "ema"
    seed: int = 0

    def __post_init__(self) -> None:  # torch-free checks, before anything is loaded
        from alssl.errors import check_positive, check_seed, unknown

        if self.method not in names.SEMI_METHODS:
            raise unknown("method", self.method, names.SEMI_METHODS)
        check_seed(self.seed)
        check_positive(self.lr, "--lr")
        if self.teacher not in ("ema", "eman"):
            raise unknown("teacher", self.teacher, ["ema", "eman"])

    def as_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class CurveSection:
    SECTION: ClassVar[str] = "curve"
    strategies: list[str] = _rule(factory=lambda: ["random", "entropy", "kcenter", "typiclust"],
                                  choices=("strategy", names.STRATEGIES),
                                  nonempty=True)
    budgets: list[str | int] = _rule(factory=lambda: ["1%", "2%", "5%", "10%"], nonempty=True,
                                     kind='a list of budgets like ["1%", "2%"] or [10, 20]')
    seeds: int = _rule(3, lo=1, kind="an integer >= 1")
    probes: list[str] = _rule(factory=lambda: ["linear"], choices=("probe", names.PROBES), nonempty=True)
    semi: str | None = _rule(None, choices=("semi method", names.SEMI_METHODS),
                             kind='a semi method name such as "fixmatch" (or leave the key out)')
    semi_steps: int = _rule(500, lo=1, kind="an integer >= 1")
    semi_batch_size: int = _rule(64, lo=1, kind="an integer >= 1")
    semi_mu: int = _rule(7, lo=1, kind="an integer >= 1")
    jobs: int = _rule(1, lo=1, kind="an integer >= 1")
    delta: float | None = _rule(None, gt=0, kind="a positive number (ProbCover radius), or leave the key out")

    def __post_init__(self) -> None:
        check_section(self)
        for b in self.budgets:
            if isinstance(b, int) and b < 1:
                raise UserError(f"curve.budgets: {b} is not a budget (a count >= 1 or a percentage like \"2%\"); "
                                "fix it in the config")


@dataclass
class OutputSection:
    SECTION: ClassVar[str] = "output"
    dir: str = _rule("runs/pipeline", nonempty=True)
    title: str | None = _rule(None)

    def __post_init__(self) -> None:
        check_section(self)


@dataclass
class PipelineConfig:
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    curve: CurveSection = field(default_factory=CurveSection)
    output: OutputSection = field(default_factory=OutputSection)


def _build(cls: type, raw: dict, where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in names:
            raise UserError(f"unknown key {where}{key}{suggest(key, names)}; valid keys: {', '.join(names)}")
    return cls(**raw)  # the section's __post_init__ checks every value


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline TOML; every problem is a UserError naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist; see pipelines/ for examples")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config {path} is not valid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise UserError(f"cannot read config {path} ({exc.strerror}); check its permissions") from None
    sections = {f.name: f for f in fields(PipelineConfig)}
    parts = {}
    for name, body in raw.items():
        if name not in sections:
            raise UserError(f"unknown section [{name}] in {path}{suggest(name, sections)}; "
                            f"valid sections: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise UserError(f"{name} must be a [{name}] table in {path}")
        try:
            parts[name] = _build(sections[name].default_factory, body, f"{name}.")
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    return PipelineConfig(**parts)
