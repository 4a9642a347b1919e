"""alssl: self-supervised pretraining + active learning + semi-supervised fine-tuning under a labeling budget.

The Python API (docs/python.md) is `alssl.api`, re-exported here lazily so that `import alssl` loads no torch:
`alssl.pretrain(...)`, `alssl.query(...)`, `alssl.label(...)`, ... have the CLI commands' names and options.
"""

__version__ = "0.1.0"

API = ("open_run", "dataset", "pretrain", "probe", "features", "query", "label", "status", "semi_finetune", "export",
       "predict", "tasks", "label_session", "curve", "redraw_curve", "run_pipeline")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from alssl import api

        return getattr(api, name)
    raise AttributeError(f"module 'alssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
