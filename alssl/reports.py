"""What `alssl status` prints: the run's summary (`alssl.api.status`) as text for a person."""

from __future__ import annotations


def print_status(info: dict) -> None:
    """The run at a glance: data, stages (stage 1 against its start, the feature choice), rounds, open query, caches."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{info['run']}[/]  data={info['data']}  pool={info['pool']}  labeled={info['labeled']}")
    if info["image_size"] is not None:
        con.print(f"  image folder: {info['image_size']}px, {info['skipped']} unreadable files skipped, "
                  f"test={info['test']}, classes={', '.join(info['classes'] or []) or 'not set yet'}")
    for name, st in info["stages"].items():
        if name == "features" and "line" in st:  # the last measured choice (probe / features)
            con.print(f"  {st['line']} on {st.get('n_labeled')} labels; {st.get('why')}")
            continue
        if name == "pretrain" and "knn_on" in st:  # stage 1 against its start (docs/features.md)
            con.print(f"  {pretrain_line(st)}")
            continue
        con.print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    table = Table("round", "strategy", "budget", "labels", "skipped", "source")
    for r in info["rounds"]:
        table.add_row(str(r["round"]), str(r["strategy"]), str(r["budget"]), str(r["n"]),
                      str(len(r.get("skipped", []))), str(r["source"]))
    con.print(table)
    if info["skipped_images"]:
        shown = ", ".join(str(s["index"]) for s in info["skipped_images"][:20])
        con.print(f"  skipped (none of the classes, never queried again): {len(info['skipped_images'])} images, "
                  f"pool indices {shown}{', ...' if len(info['skipped_images']) > 20 else ''} "
                  "(`--json` lists them all)")
    if info["open_query"]:
        q = info["open_query"]
        con.print(f"  open query: round {q['round']} ({q['strategy']}, {q['budget']}) → {q['file']}")
    for sha, deltas in info["probcover_delta"].items():
        con.print(f"  probcover delta (features {sha}): " + ", ".join(f"{v:.4g} ({k})" for k, v in deltas.items()))
    for sha, dup in info["near_duplicates"].items():
        con.print(f"  near-duplicates (features {sha}, cosine >= {dup['tau']:g}): {dup['groups']} groups holding "
                  f"{dup['images']} of {dup['pool']} images")
    if info["last_metrics"]:
        con.print(f"  last metrics: {info['last_metrics']}")
    last_probe = info.get("last_probe")
    if last_probe and last_probe.get("predictions_stable"):
        from alssl.stopping import stable_message

        con.print(f"  {stable_message(last_probe['kappa'])} (last probe, round {last_probe['round']})")


def pretrain_line(st: dict) -> str:
    """`pretrain: simsiam cnn, 30 epochs (930 steps, 1202 s); kNN 0.193 → 0.220 (…); RankMe 12.6 → 27.5`."""
    def arrow(a, b, fmt: str) -> str:
        return f"{a:{fmt}} → {b:{fmt}}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "n/a"

    knn = ""
    if isinstance(st.get("knn_accuracy"), (int, float)):
        knn = f"; kNN {arrow(st.get('knn_accuracy_init'), st['knn_accuracy'], '.3f')} ({st['knn_on']})"
    worse = (isinstance(st.get("knn_accuracy"), (int, float)) and isinstance(st.get("knn_accuracy_init"), (int, float))
             and st.get("epochs", 0) > 0 and st["knn_accuracy"] < st["knn_accuracy_init"])
    return (f"pretrain: {st.get('method')} {st.get('backbone')}, {st.get('epochs')} epochs ({st.get('steps')} steps, "
            f"{st.get('seconds')} s){knn}; RankMe {arrow(st.get('rankme_init'), st.get('rankme'), '.1f')} (label-free "
            f"proxy)" + ("; below its start: the run keeps the start, see `alssl features`" if worse else ""))
