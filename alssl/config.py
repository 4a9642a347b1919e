"""Pipeline configs (`alssl run pipelines/NAME.toml`): tomllib + dataclasses, unknown keys rejected with a suggestion."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from alssl.errors import UserError, suggest


@dataclass
class DataSection:
    spec: str = "digits"
    imbalance: float | None = None
    seed: int = 0


@dataclass
class PretrainSection:
    method: str = "simsiam"
    backbone: str = "cnn"
    epochs: int = 20
    batch_size: int = 256
    lr: float | None = None
    eman: bool = False
    seed: int = 0
    from_run: str | None = None  # reuse another run's stage-1 backbone instead of pretraining


@dataclass
class CurveSection:
    strategies: list[str] = field(default_factory=lambda: ["random", "entropy", "kcenter", "typiclust"])
    budgets: list[str] = field(default_factory=lambda: ["1%", "2%", "5%", "10%"])
    seeds: int = 3
    probes: list[str] = field(default_factory=lambda: ["linear"])
    semi: str | None = None
    semi_steps: int = 500
    jobs: int = 1
    delta: float | None = None


@dataclass
class OutputSection:
    dir: str = "runs/pipeline"
    title: str | None = None


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
    kwargs = {}
    for key, value in raw.items():
        f = names[key]
        default = f.default_factory() if callable(f.default_factory) else f.default
        if default is not None and type(default) is not type(value) and not (isinstance(default, float) and isinstance(value, int)):
            if not (isinstance(default, list) and isinstance(value, list)):
                raise UserError(f"{where}{key} must be {type(default).__name__} (got {value!r}); fix it in the config")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline TOML; every problem is a UserError naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist; see pipelines/ for examples")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config {path} is not valid TOML ({exc}); fix the syntax") from None
    sections = {f.name: f for f in fields(PipelineConfig)}
    parts = {}
    for name, body in raw.items():
        if name not in sections:
            raise UserError(f"unknown section [{name}] in {path}{suggest(name, sections)}; valid sections: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise UserError(f"{name} must be a [{name}] table in {path}")
        parts[name] = _build(sections[name].default_factory, body, f"{name}.")
    return PipelineConfig(**parts)
