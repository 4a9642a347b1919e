"""Budget-curve figures from a tidy curve.csv: accuracy vs labeled fraction, one panel per arm × probe.

Top row: mean test accuracy per strategy over seeds with a ±1 std band (log x, ticked at the budgets as the user
typed them; `random` dashed black), a secondary x axis with the label count (and labels per class).
Bottom row: the gain over random at each budget (same seeds
paired), with a zero line. Legend outside the data. PNG and SVG.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


NEEDED = ("arm", "probe", "strategy", "seed", "round", "fraction", "labels_per_class", "accuracy")


def read_curve(path: Path) -> list[dict]:
    """The rows of a tidy curve.csv, validated: a malformed file is a UserError (curve.csv is rebuilt from cells/)."""
    from alssl.errors import UserError

    path = Path(path)
    fix = "rerun the `alssl curve` (or `alssl run`) command that made it: curve.csv is rebuilt from cells/"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [k for k in NEEDED if k not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path} is not a curve.csv (no column {', '.join(missing)}); {fix}")
            rows = list(reader)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); {fix}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is malformed ({type(exc).__name__}); {fix}") from None
    seen = set()
    for line, r in enumerate(rows, start=2):
        try:
            for k in ("fraction", "accuracy", "labels_per_class"):
                r[k] = float(r[k])
                if not np.isfinite(r[k]) or r[k] < 0:
                    raise ValueError(k)
            r["seed"], r["round"] = int(r["seed"]), int(r["round"])
            if not 0 < r["fraction"] <= 1 or r["accuracy"] > 1 or r["round"] < 0 or not r["arm"] or not r["strategy"]:
                raise ValueError("range")
        except (TypeError, ValueError):
            raise UserError(f"{path} is malformed (line {line}: a missing, non-numeric or out-of-range value); "
                            f"{fix}") from None
        key = (r["arm"], r["probe"], r["strategy"], r["seed"], r["round"])
        if key in seen:
            raise UserError(f"{path} is malformed (line {line} repeats {key}); {fix}")
        seen.add(key)
    chains: dict = defaultdict(set)
    for key in seen:
        chains[key[:4]].add(key[4])
    gap = next((c for c, rounds in chains.items() if rounds != set(range(max(rounds) + 1))), None)
    if gap is not None:
        raise UserError(f"{path} is malformed ({gap} skips a round: {sorted(chains[gap])}); {fix}")
    return rows


def summarize(rows: list[dict]) -> dict:
    """{(arm, probe): {strategy: (fractions [R], mean [R], std [R], per-seed acc [S, R])}}."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    frac: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[(r["arm"], r["probe"])][r["strategy"]][r["round"]][r["seed"]] = r["accuracy"]
        frac[(r["arm"], r["probe"])][r["strategy"]][r["round"]] = r["fraction"]
    out: dict = {}
    for panel, strategies in acc.items():
        out[panel] = {}
        for s, by_round in strategies.items():
            rounds = sorted(by_round)
            seeds = sorted(set.intersection(*(set(by_round[k]) for k in rounds)))
            a = np.array([[by_round[k][sd] for k in rounds] for sd in seeds])  # [S, R]
            f = np.array([frac[panel][s][k] for k in rounds])
            out[panel][s] = (f, a.mean(0), a.std(0), a, seeds)
    return out


def paired_gain(entry: tuple, rand: tuple | None) -> np.ndarray | None:
    """Accuracy gain over random in points, [S, R] on the seeds both strategies ran; None when there is none."""
    f, _, _, a, seeds = entry
    if rand is None or len(rand[0]) != len(f):
        return None
    common = sorted(set(seeds) & set(rand[4]))
    if not common:
        return None
    return (a[[seeds.index(x) for x in common]] - rand[3][[rand[4].index(x) for x in common]]) * 100


def curve_title(spec: str, pretrain: dict | None, probes: list[str]) -> str:
    """The figure title `make demo` uses: "digits: SimSiam (cnn) features, linear probe" (data by name only)."""
    from alssl.models import data_name

    feats = ""
    if pretrain:
        method = {"simsiam": "SimSiam", "moco": "MoCo v2",
                  "byol": "BYOL"}.get(pretrain.get("method"), pretrain.get("method"))
        feats = (f" random-init ({pretrain.get('backbone')}) features" if pretrain.get("epochs") == 0
                 else f" {method} ({pretrain.get('backbone')}) features")
    return f"{data_name(spec)}:{feats}{',' if feats else ''} {' / '.join(probes)} probe"


def plot_curve(csv_path: Path, out_stem: Path | None = None, *, title: str | None = None) -> tuple[Path, Path]:
    """Draw `curve.png` and `curve.svg` beside curve.csv (or at `out_stem`); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    plt.rcParams["svg.fonttype"] = "none"  # keep text as text in the SVG (editable, searchable)
    rows = read_curve(Path(csv_path))
    if not rows:
        from alssl.errors import UserError

        raise UserError(f"{csv_path} has no rows yet; run `alssl curve` first")
    summary = summarize(rows)
    lpc = {r["fraction"]: r["labels_per_class"] for r in rows}
    count = {r["fraction"]: r.get("n_labeled") for r in rows}
    typed = {r["fraction"]: (r.get("budget") or f"{r['fraction'] * 100:.2g}%") for r in rows}  # "1%", as typed
    panels = sorted(summary, key=lambda p: (p[0] != "probe", p))
    strategies = sorted({s for p in summary.values() for s in p}, key=lambda s: (s != "random", s))
    colors = {s: c for s, c in zip(strategies, plt.cm.tab10.colors * 3)}
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels) + 2.2, 7.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.6]}, sharex="col")
    for j, panel in enumerate(panels):
        ax, gax = axes[0, j], axes[1, j]
        rand = summary[panel].get("random")
        for s in strategies:
            if s not in summary[panel]:
                continue
            f, m, sd, a, seeds = summary[panel][s]
            style = dict(color="black", linestyle="--") if s == "random" else dict(color=colors[s])
            ax.plot(f * 100, m * 100, marker="o", ms=3.5, label=s, **style)
            ax.fill_between(f * 100, (m - sd) * 100, (m + sd) * 100, alpha=0.15, color=style["color"], linewidth=0)
            gain = paired_gain(summary[panel][s], rand) if s != "random" else None
            if gain is not None:
                gax.errorbar(f * 100, gain.mean(0), yerr=gain.std(0), marker="o", ms=3, capsize=2, color=colors[s],
                             label=s)
        arm, probe = panel
        ax.set_title(f"{probe} probe" if arm == "probe"
                     else f"{arm.split(':', 1)[1]} fine-tune (labels from {probe} rounds)")
        ax.set_xscale("log")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        fracs = sorted({f for st in summary[panel].values() for f in st[0].tolist()})
        budgets = [f * 100 for f in fracs]
        top = ax.secondary_xaxis("top")
        top.set_xlabel("labeled images (per class)")
        top.set_xticks(budgets, labels=[f"{count[f]}\n({lpc[f]:.2g})" if count[f] else f"({lpc[f]:.2g})"
                                        for f in fracs])
        top.xaxis.set_minor_locator(ticker.NullLocator())
        gax.axhline(0, color="black", linestyle="--", linewidth=1)
        gax.set_xscale("log")
        gax.set_xlabel("budget: labeled fraction of the pool (log scale)")
        gax.set_ylabel("gain over random (points)")
        gax.grid(True, which="both", alpha=0.3)
        for a in (ax, gax):
            a.set_xticks(budgets, labels=[typed[f] for f in fracs])
            a.xaxis.set_minor_locator(ticker.NullLocator())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="strategy", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 0.96 if title else 1))
    stem = Path(out_stem) if out_stem else Path(csv_path).with_suffix("")
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    from alssl.runs import atomic_write_bytes
    import io

    for path, fmt in ((png, "png"), (svg, "svg")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=130)
        atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)
    return png, svg


def curve_table(csv_path: Path) -> str:
    """A markdown table per panel: mean ± std accuracy (%) per strategy and budget, and the gain over random."""
    summary = summarize(read_curve(Path(csv_path)))
    out = []
    for (arm, probe), by_strategy in sorted(summary.items()):
        rand = by_strategy.get("random")
        fracs = next(iter(by_strategy.values()))[0]
        out.append(f"**{arm} · {probe} probe** — test accuracy %, mean ± std over seeds "
                   "(gain over random, paired seeds)\n")
        out.append("| strategy | " + " | ".join(f"{f * 100:.2g} %" for f in fracs) + " |")
        out.append("|---" * (len(fracs) + 1) + "|")
        for s in sorted(by_strategy, key=lambda s: (s != "random", s)):
            f, m, sd, a, seeds = by_strategy[s]
            gain = paired_gain(by_strategy[s], rand) if s != "random" else None
            cells = []
            for j in range(len(f)):
                cell = f"{m[j] * 100:.1f} ± {sd[j] * 100:.1f}"
                if gain is not None:
                    cell += f" ({gain[:, j].mean():+.1f})"
                cells.append(cell)
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
        probe_arm = summary.get(("probe", probe))
        if arm != "probe" and probe_arm is not None:  # what the fine-tune adds over the probe on the same labels
            out.append(f"**{arm} − {probe} probe on the same labels** — points, mean over paired seeds\n")
            out.append("| strategy | " + " | ".join(f"{f * 100:.2g} %" for f in fracs) + " |")
            out.append("|---" * (len(fracs) + 1) + "|")
            for s in sorted(by_strategy, key=lambda s: (s != "random", s)):
                gain = paired_gain(by_strategy[s], probe_arm.get(s))
                if gain is not None:
                    out.append(f"| {s} | " + " | ".join(f"{g:+.1f}" for g in gain.mean(0)) + " |")
            out.append("")
    return "\n".join(out)
