"""At scale (issue 28): the feature cache is a memory-mapped .npy written shard by shard, peak memory flat in N,
1 process = 2 processes (gloo), the device options validated, predict --pool streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from alssl import devices as dev
from alssl.backbones import load_backbone_checkpoint
from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.feature_sets import embed, embed_to_file, feature_paths, pool_features
from alssl.pretraining import pretrain
from alssl.runs import Run
from conftest import ROOT
from conftest import run_cli_inprocess as run_main


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, 24))


def _pixels(n: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_two_gloo_processes_write_the_same_features_as_one(tmp_path, monkeypatch):
    x, net = _pixels(301), _net()  # 301 rows: the two shards differ in size (150 / 151)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=24, batch_size=64)
    one = embed_to_file(net, x, tmp_path / "one.npy", setting=dev.Devices("cpu", 1, "32-true"), **stats)
    two = embed_to_file(net, x, tmp_path / "two.npy", setting=dev.Devices("cpu", 2, "32-true"), **stats)
    assert isinstance(one, np.memmap) and isinstance(two, np.memmap)
    assert one.shape == two.shape == (301, 24) and one.dtype == two.dtype == np.float32
    assert float(np.abs(np.asarray(one) - np.asarray(two)).max()) <= 1e-5
    ref = embed(net, x, mean=stats["mean"], std=stats["std"])  # the in-memory reference
    assert float(np.abs(np.asarray(one) - ref).max()) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy", "two.npy"]  # no temp file left
    monkeypatch.setenv("ALSSL_FAULT_DISK_FULL", "1")
    with pytest.raises(UserError, match="free disk space"):  # a full disk: one error line, nothing left behind
        embed_to_file(net, x, tmp_path / "full.npy", **stats)
    monkeypatch.delenv("ALSSL_FAULT_DISK_FULL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy", "two.npy"]
    half = embed_to_file(net, x, tmp_path / "half.npy", dtype=np.float16, **stats)
    assert half.dtype == np.float16 and float(np.abs(half.astype(np.float32) - ref).max()) < 1e-2


def test_the_feature_cache_is_a_memory_mapped_npy_per_split(tmp_path, capsys):
    ds = load_dataset("digits", seed=0)
    run = Run.create(tmp_path / "run", n_pool=ds.n_pool, config={})
    pretrain(ds, run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    ckpt = run.checkpoints / "backbone.pt"
    (run.path / "features").mkdir(exist_ok=True)
    old = feature_paths(run.path, ckpt)[0].with_name(feature_paths(run.path, ckpt)[0].name[:16] + ".npz")
    old.write_bytes(b"an old .npz cache")  # the format before: simply recomputed, then removed
    train, test = pool_features(run.path, ds)
    train_path, test_path = feature_paths(run.path, ckpt)
    assert isinstance(train, np.memmap) and isinstance(test, np.memmap) and not train.flags.writeable
    assert train.shape[0] == ds.n_pool and test.shape == (len(ds.x_test), train.shape[1])
    assert train_path.is_file() and test_path.is_file() and not old.exists()
    ref = embed(load_backbone_checkpoint(ckpt)[0], ds.x_train, mean=ds.mean, std=ds.std)
    assert float(np.abs(np.asarray(train) - ref).max()) <= 1e-5
    stamp = train_path.stat().st_mtime_ns
    pool_features(run.path, ds)
    assert train_path.stat().st_mtime_ns == stamp  # read back, not recomputed
    with open(train_path, "r+b") as f:  # a truncated cache file is recomputed
        f.truncate(1000)
    capsys.readouterr()
    again, _ = pool_features(run.path, ds)
    assert "recomputing" in capsys.readouterr().err
    again = np.asarray(again)
    assert np.array_equal(again, ref.astype(np.float32)) or float(np.abs(again - ref).max()) <= 1e-5


RSS_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np, torch
    from alssl.data.folder import DiskPool
    from alssl.feature_sets import _new_npy, embed_to_file

    n, folder = int(sys.argv[1]), Path(sys.argv[2])
    pool = folder / f"pool-{n}.npy"
    offset = _new_npy(pool, (n, 16, 16, 3), np.dtype(np.uint8))  # a synthetic on-disk pool, written in chunks
    rng = np.random.default_rng(0)
    with open(pool, "r+b") as f:
        f.seek(offset)
        for i in range(0, n, 8192):
            f.write(rng.integers(0, 256, (min(8192, n - i), 16, 16, 3), dtype=np.uint8).tobytes())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 512))
    out = embed_to_file(net, DiskPool(pool), folder / f"features-{n}.npy", mean=(0.5,) * 3, std=(0.25,) * 3, dim=512)
    assert out.shape == (n, 512)
    # peak RSS of this process: VmHWM (ru_maxrss would carry over the forking parent's peak across exec)
    print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_of_an_embedding_is_flat_in_the_pool_size(tmp_path):
    """200k × 512 float32 features are 400 MB: holding them (or an .npz of them) in RAM would show here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    peak = {}
    for n in (20_000, 200_000):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(n), str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peak[n] = int(r.stdout.strip().splitlines()[-1])
    assert peak[200_000] - peak[20_000] <= 300 * 2**20, peak


def test_device_options_are_checked_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ALSSL_PRECISION", "bf16-mixed")
    seen, parse = [], dev.parse
    monkeypatch.setattr(dev, "parse", lambda *args: seen.append(parse(*args)) or seen[-1])
    r = run_main("query", str(tmp_path / "no-run"), "--budget", "5", "--accelerator", "cpu", "--devices", "2")
    assert r.returncode == 2  # no such run, but the setting was taken first: flags, then the environment
    assert seen == [dev.Devices("cpu", 2, "bf16-mixed")] and dev._current is None  # and it ends with the command
    monkeypatch.undo()
    for args, words in ((["--devices", "0"], "--devices"), (["--accelerator", "tpu9"], "--accelerator"),
                        (["--precision", "8-bit"], "--precision")):
        r = run_main("probe", str(tmp_path / "no-run"), *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert dev.parse("cpu", "2", "32") == dev.Devices("cpu", 2, "32-true")
    assert dev._current is None  # no command's setting outlives it


@pytest.mark.parametrize("method", ["fixmatch", "simmatch", "daso", "pseudolabel", "supervised"])
def test_stage4_runs_under_bf16_autocast(tmp_path, method):
    """`semi-finetune --precision bf16-mixed`: every method's forward and loss under bf16 autocast, banks and queues
    kept in float32; finite loss, a checkpoint, a result."""
    from alssl.semi import semi_finetune

    ds = load_dataset("digits", seed=0)
    li = np.sort(np.random.default_rng(0).choice(ds.n_pool, 50, replace=False))
    res = semi_finetune(ds, labeled_idx=li, labeled_y=ds.y_train[li], out_dir=tmp_path / method, method=method,
                        backbone="cnn", steps=3, batch_size=8, mu=2, ckpt_every=3, quiet=True, precision="bf16-mixed")
    assert res["accuracy"] is not None and (tmp_path / method / "state.pt").is_file()
    r = run_main("semi-finetune", str(tmp_path / "no-run"), "--precision", "16-mixed")
    assert r.returncode == 2 and "bf16-mixed" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_stage4_devices_are_checked_before_anything_runs(tmp_path):
    """`semi-finetune --devices`: a bad count, or a global batch that does not split evenly over the ranks, is one
    `error:` line (exit 2) before a run is opened or a process launched; the library refuses the same."""
    from alssl.errors import UserError
    from alssl.semi import semi_finetune

    for args, words in ((["--devices", "0"], "--devices must be"), (["--devices", "2", "--batch-size", "7"],
                                                                    "multiple of 2")):
        r = run_main("semi-finetune", str(tmp_path / "no-run"), *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    ds = load_dataset("digits", seed=0)
    li = np.arange(20)
    with pytest.raises(UserError, match="multiple of 2"):
        semi_finetune(ds, labeled_idx=li, labeled_y=ds.y_train[li], out_dir=tmp_path / "x", batch_size=7, devices=2,
                      device="cpu")
    assert not (tmp_path / "x").exists()


def test_the_cli_embeds_on_two_processes(tmp_path):
    """`alssl features RUN --accelerator cpu --devices 2` (a real command process forking its two gloo ranks) writes
    the cache a one-process embedding writes."""
    import shutil

    from conftest import run_cli

    ds = load_dataset("digits", seed=0)
    run = Run.create(tmp_path / "run", n_pool=ds.n_pool, config={"data": {"spec": "digits", "seed": 0},
                                                                   "pretrain": {"backbone": "cnn"}})
    pretrain(ds, run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    shutil.copytree(run.path, tmp_path / "one")
    one, _ = pool_features(tmp_path / "one", ds, tmp_path / "one" / "checkpoints" / "backbone.pt")
    r = run_cli("features", str(run.path), "--accelerator", "cpu", "--devices", "2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "MEMBER: 2/2" in r.stderr  # Fabric's line: the second rank joined
    two = np.load(feature_paths(run.path, run.checkpoints / "backbone.pt")[0], mmap_mode="r")
    assert float(np.abs(np.asarray(two) - np.asarray(one)).max()) <= 1e-5


def test_num_nodes_is_checked_before_anything_runs(tmp_path, monkeypatch):
    """`--num-nodes`: a bad count, or several nodes without the environment Fabric's launch needs on every node
    (NODE_RANK, MASTER_ADDR, MASTER_PORT), is one `error:` line (exit 2)."""
    for key in ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "ALSSL_NUM_NODES"):
        monkeypatch.delenv(key, raising=False)
    for args, env, words in ((["--num-nodes", "0"], {}, "--num-nodes must be"),
                             (["--num-nodes", "2"], {}, "NODE_RANK, MASTER_ADDR, MASTER_PORT"),
                             ([], {"ALSSL_NUM_NODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": "29500"}, "NODE_RANK=2 is not below --num-nodes 2")):
        for command in (["probe"], ["semi-finetune"], ["pretrain", "--out"]):
            r = run_main(*command, str(tmp_path / "no-run"), *args, env=env)
            assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "no-run").exists()


def test_two_nodes_embed_the_cache_one_process_writes(tmp_path):
    """Two nodes simulated on this machine: `alssl probe RUN --num-nodes 2 --devices 1` started twice, NODE_RANK 0
    and 1 with one MASTER_ADDR / MASTER_PORT (as on two machines sharing RUN). Both ranks embed their shard into one
    file that node 0 creates and renames; the cache equals a one-process embedding; node 1 prints and logs nothing."""
    import socket

    import alssl

    ds = load_dataset("digits", seed=0)
    run = Run.create(tmp_path / "run", n_pool=ds.n_pool, config={"data": {"spec": "digits", "seed": 0},
                                                                   "pretrain": {"backbone": "cnn"}})
    pretrain(ds, run, epochs=0, batch_size=128, quiet=True, knn_every=0)
    alssl.query(run.path, budget=30, accelerator="cpu")  # embeds on one process: the reference
    alssl.label(run.path, "oracle")
    paths = feature_paths(run.path, run.checkpoints / "backbone.pt")
    one = [np.load(p) for p in paths]
    for p in paths:
        p.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")}
    nodes = [subprocess.Popen([sys.executable, "-m", "alssl", "probe", str(run.path), "--accelerator", "cpu",
                               "--devices", "1", "--num-nodes", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**base, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for rank in (1, 0)]
    (out1, err1), (out0, err0) = (p.communicate(timeout=300) for p in nodes)
    assert [p.returncode for p in nodes] == [0, 0], (err0, err1)
    assert "MEMBER: 2/2" in err1 and out1 == ""  # node 1 took part as global rank 1 and reported nothing
    assert json.loads(out0)["n_labeled"] == 30
    for p, ref in zip(paths, one):
        two = np.load(p, mmap_mode="r")
        assert two.shape == ref.shape and float(np.abs(np.asarray(two) - ref).max()) <= 1e-5
    assert not [f for f in paths[0].parent.iterdir() if f.name.endswith(".tmp")]
    probes = [m for m in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines())
              if m.get("stage") == "probe"]
    assert len(probes) == 1  # one writer: global rank 0
