"""Registry names as plain tuples, importable without torch, so configs and arguments can be checked in
milliseconds before any heavy import. The registries themselves (dicts of callables) live with their code;
`tests/test_config.py::test_names_match_the_registries` keeps these tuples equal to their keys."""

from __future__ import annotations

STRATEGIES = ("random", "entropy", "margin", "svm-margin", "kcenter", "vaal", "typiclust", "probcover", "badge",
              "cluster-margin")
PROBES = ("linear", "svm")
PRETRAIN_METHODS = ("simsiam", "moco", "byol")
BACKBONES = ("cnn", "resnet18", "wrn28_2")
SEMI_METHODS = ("fixmatch", "simmatch", "daso", "pseudolabel", "supervised")
