"""Where the commands that run a network for inference (embedding the pool, predicting) run it.

One setting, Lightning Fabric's meaning (docs/scale.md): `accelerator` (auto | cpu | cuda | gpu | mps; auto = the GPU
when present), `devices` (how many; > 1 shards the pool over that many processes, one per device) and `precision`
(32-true | bf16-mixed | 16-mixed: the forward runs under `fabric.autocast()`) and `num_nodes` (machines; > 1: the
same command runs on every node, docs/scale.md). The CLI sets it once per command from
`--accelerator/--devices/--precision/--num-nodes` (defaults from the environment variables ALSSL_ACCELERATOR,
ALSSL_DEVICES, ALSSL_PRECISION, ALSSL_NUM_NODES, else auto / 1 / 32-true / 1); library code reads `current()`.

Lightning Fabric is imported only when it changes something: on a machine without a GPU, one device in 32-bit is
plain torch on the CPU (importing Fabric costs seconds per command).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from alssl.errors import UserError

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class Devices:
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    num_nodes: int = 1

    @property
    def world(self) -> int:
        """Processes over all nodes (Fabric's world size)."""
        return self.devices * self.num_nodes


_current: Devices | None = None  # None: from the environment (parse()) at first use


def parse(accelerator: str | None = None, devices: str | int | None = None, precision: str | None = None,
          num_nodes: str | int | None = None) -> Devices:
    """A validated setting; None takes ALSSL_ACCELERATOR / ALSSL_DEVICES / ALSSL_PRECISION / ALSSL_NUM_NODES, else
    the default. Several nodes need NODE_RANK, MASTER_ADDR and MASTER_PORT in the environment (Lightning's names)."""
    acc = (accelerator or os.environ.get("ALSSL_ACCELERATOR") or "auto").strip().lower()
    dev = str(devices if devices is not None else os.environ.get("ALSSL_DEVICES") or "1").strip()
    nodes = str(num_nodes if num_nodes is not None else os.environ.get("ALSSL_NUM_NODES") or "1").strip()
    prec = (precision or os.environ.get("ALSSL_PRECISION") or "32-true").strip().lower()
    if acc not in ACCELERATORS:
        raise UserError(f"--accelerator {acc!r} is not one of {', '.join(ACCELERATORS)}; e.g. --accelerator auto")
    if not dev.isascii() or not dev.isdigit() or int(dev) < 1:
        raise UserError(f"--devices must be a whole number >= 1 (got {dev!r}); e.g. --devices 1")
    if prec == "32":
        prec = "32-true"
    if prec not in PRECISIONS:
        raise UserError(f"--precision {prec!r} is not one of {', '.join(PRECISIONS)}; e.g. --precision bf16-mixed")
    if not re.fullmatch(r"[0-9]+", nodes) or int(nodes) < 1:
        raise UserError(f"--num-nodes must be a whole number >= 1 (got {nodes!r}); e.g. --num-nodes 1")
    if int(nodes) > 1:
        _check_nodes(int(nodes))
    return Devices(acc, int(dev), prec, int(nodes))


def _check_nodes(num_nodes: int) -> None:
    """The environment every node needs for Fabric's launch over several machines (docs/scale.md)."""
    missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"--num-nodes {num_nodes} needs {', '.join(missing)} set on every node: "
                        f"NODE_RANK=0..{num_nodes - 1} (0 on the node that writes), MASTER_ADDR=<node 0's address>, "
                        f"MASTER_PORT=<a free port on it>")
    if node_rank() >= num_nodes:
        raise UserError(f"NODE_RANK={node_rank()} is not below --num-nodes {num_nodes}; number the nodes "
                        f"0..{num_nodes - 1}")


def node_rank() -> int:
    """This machine's index among the nodes: Lightning's NODE_RANK (else GROUP_RANK), 0 when unset."""
    value = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")).strip() or "0"
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"NODE_RANK={value!r} is not a node index; set NODE_RANK=0 on the first node, 1 on the next, "
                        f"...")
    return int(value)


def global_zero() -> bool:
    """True in the process that writes a run's files: global rank 0 (node 0, local rank 0). A DDP rank > 0 (a
    re-run command line with LOCAL_RANK > 0, or any process on another node) reads the run and writes nothing."""
    return node_rank() == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def use(setting: Devices | None) -> None:
    """Make `setting` the one every later embedding / prediction in this process reads (None: back to the
    environment's / the default)."""
    global _current
    _current = setting


@contextlib.contextmanager
def using(setting: Devices):
    """`setting` in force for the length of a `with` block, then the one before it again (the Python API's calls)."""
    global _current
    before, _current = _current, setting
    try:
        yield setting
    finally:
        _current = before


def current() -> Devices:
    """The setting in force: the last `use(...)`, else the environment variables, else auto / 1 / 32-true."""
    return _current if _current is not None else parse()


def plain_cpu(setting: Devices) -> bool:
    """True when the setting means one CPU process in 32-bit: plain torch, no Fabric."""
    import torch

    if setting.world != 1 or setting.precision != "32-true":
        return False
    return setting.accelerator == "cpu" or (setting.accelerator == "auto" and not torch.cuda.is_available()
                                            and not _mps_available())


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def fabric(setting: Devices, *, strategy: str = "auto"):
    """A configured (not launched) Lightning Fabric for `setting`; a combination it refuses is a UserError."""
    from lightning_fabric import Fabric

    try:
        return Fabric(accelerator=setting.accelerator, devices=setting.devices, num_nodes=setting.num_nodes,
                      strategy=strategy, precision=setting.precision)
    except Exception as exc:  # Fabric reports bad device/precision combinations as ValueError / RuntimeError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot run on --accelerator {setting.accelerator} --devices {setting.devices} --num-nodes "
                        f"{setting.num_nodes} --precision {setting.precision}: {msg}") from None


def single(setting: Devices | None = None):
    """(torch device, autocast context factory) for one process: the CPU without Fabric, else Fabric's device and
    `fabric.autocast`."""
    import torch

    setting = setting or current()
    if plain_cpu(setting):
        return torch.device("cpu"), contextlib.nullcontext
    fab = fabric(Devices(setting.accelerator, 1, setting.precision))
    return fab.device, fab.autocast
