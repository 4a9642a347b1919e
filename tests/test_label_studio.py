"""Label Studio round trip: tasks out, exports in. The fixtures in tests/fixtures/label_studio/ are real exports
(JSON, JSON-MIN, CSV) of a real Label Studio (scripts/label_studio_roundtrip.py, docs/labeling.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.labeling.files import export_kind, read_export
from alssl.labeling.studio import labeling_config
from alssl.rounds import import_labels
from alssl.runs import Run

FIXTURES = Path(__file__).parent / "fixtures" / "label_studio"
EXPORTS = ["export.json", "export-min.json", "export.csv"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture
def run(tmp_path, digits, expected) -> Run:
    """The run the fixtures were exported for: round 0 labeled, round 1 (the tasks) open."""
    r = Run.create(tmp_path / "r", n_pool=digits.n_pool, config={"data": {"spec": "digits"}})
    r0 = np.asarray(expected["round0"])
    r.add_labels(r0, digits.y_train[r0],
                 round_meta={"strategy": "random", "budget": "10", "seed": 0, "source": "oracle"})
    tasks = json.loads((FIXTURES / "tasks.json").read_text())
    r.state["open_query"] = {"round": 1, "budget": "10", "strategy": "random", "seed": 0, "probe": "linear",
                             "file": "queries/round-1.csv", "indices": sorted(t["data"]["alssl_index"] for t in tasks)}
    r.save_state()
    return r


def _labels(run: Run, digits, idx) -> dict[str, str]:
    return {str(i): digits.classes[run.labels[int(i)]] for i in idx}


@pytest.mark.parametrize("name", EXPORTS)
def test_real_exports_import(run, digits, expected, name):
    assert import_labels(run, digits, FIXTURES / name) == len(expected["labels"])
    after = Run.open(run.path)
    assert after.state["open_query"] is None and after.n_rounds == 2
    # the latest non-cancelled annotation wins (the script corrected task 1 and skipped task 2 once)
    assert _labels(after, digits, expected["labels"]) == expected["labels"]


def test_export_kinds():
    assert export_kind(FIXTURES / "export.json", "[]") == "json"
    assert export_kind(Path("x.txt"), (FIXTURES / "export-min.json").read_text()) == "json"
    assert export_kind(Path("x.csv"), (FIXTURES / "export.csv").read_text()) == "csv"
    assert export_kind(Path("x.csv"), "index,label\n1,cat\n") is None


def test_tasks_and_config_shape():
    tasks = json.loads((FIXTURES / "tasks.json").read_text())
    t = tasks[0]
    assert t["data"]["image"].startswith("/data/local-files/?d=images/train/")
    assert isinstance(t["data"]["alssl_index"], int) and t["data"]["alssl_id"] == f"train/{t['data']['alssl_index']}"
    pred = t["predictions"][0]
    assert pred["result"][0]["value"]["choices"][0] in [str(c) for c in range(10)] and 0 < pred["score"] <= 1
    cfg = labeling_config(["cat", 'say "hi" & <b>'])
    assert '<Choice value="cat"/>' in cfg and '<Choice value="say &quot;hi&quot; &amp; &lt;b&gt;"/>' in cfg \
            and 'name="label"' in cfg


def _full_task(task_id, data, *choices_and_flags):
    anns = []
    for k, (choice, cancelled) in enumerate(choices_and_flags):
        anns.append({"id": 100 * task_id + k, "was_cancelled": cancelled, "updated_at": f"2026-01-01T00:00:0{k}Z",
                     "result": [] if choice is None else [{"from_name": "label", "to_name": "image", "type": "choices",
                                                           "value": {"choices": [choice]}}]})
    return {"id": task_id, "data": data, "annotations": anns}


def _write(tmp_path, tasks) -> Path:
    f = tmp_path / "export.json"
    f.write_text(json.dumps(tasks))
    return f


def _tasks_for(run) -> list[dict]:
    return [_full_task(n + 1, {"image": f"/data/local-files/?d=images/train/{i}.png", "alssl_index": i}, ("3", False))
            for n, i in enumerate(run.state["open_query"]["indices"])]


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda t: t[0]["annotations"][0]["result"][0]["value"].update(choices=["zebra"]),
         ["task 1 (alssl_index", "unknown class 'zebra'"]),
        (lambda t: t[1]["data"].update(alssl_index=3), ["task 2 (alssl_index 3)", "is not in the open query"]),
        (lambda t: t.append(json.loads(json.dumps(t[2])) | {"id": 99}),
         ["task 99", "duplicate row", "first on task 3"]),
        (lambda t: t[0].update(annotations=[]), ["task 1", "no annotation"]),
        (lambda t: t[0]["data"].update(alssl_index="x7"), ["task 1 (alssl_index x7)", "not an integer"]),
        (lambda t: (t[0]["data"].pop("alssl_index"), t[0]["data"].update(image="/data/upload/1/cat.jpg")),
         ["task 1", "not an image of the pool"]),
        (lambda t: t[0]["annotations"][0]["result"][0]["value"].update(choices=["1", "2"]),
         ["task 1", "2 classes chosen"]),
    ],
)
def test_malformed_export_imports_nothing(run, digits, tmp_path, change, needles):
    tasks = _tasks_for(run)
    change(tasks)
    before = (run.path / "state.json").read_bytes()
    with pytest.raises(UserError) as e:
        import_labels(run, digits, _write(tmp_path, tasks))
    assert "nothing imported" in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert (run.path / "state.json").read_bytes() == before


def test_every_problem_listed_at_once(run, digits, tmp_path):
    tasks = _tasks_for(run)
    tasks[0]["annotations"][0]["result"][0]["value"]["choices"] = ["zebra"]
    tasks[1]["data"]["alssl_index"] = 3
    tasks.append(json.loads(json.dumps(tasks[2])) | {"id": 99})
    with pytest.raises(UserError) as e:
        import_labels(run, digits, _write(tmp_path, tasks))
    msg = str(e.value)
    assert "task 1 " in msg and "task 2 " in msg and "task 99 " in msg


def test_skipped_task_is_recorded_as_skipped(run, digits, tmp_path):
    """Label Studio's Skip (every annotation of the task cancelled) = none of these; the round imports."""
    tasks = _tasks_for(run)
    tasks[0]["annotations"] = [{"id": 7, "was_cancelled": True, "result": [], "updated_at": "2026-01-01T00:00:00Z"}]
    i0 = tasks[0]["data"]["alssl_index"]
    assert import_labels(run, digits, _write(tmp_path, tasks)) == len(tasks) - 1
    after = Run.open(run.path)
    assert after.state["open_query"] is None and after.state["rounds"][1]["skipped"] == [i0]
    assert after.labeled_round[i0] == -1 and after.state["rounds"][1]["n"] == len(tasks) - 1


def test_latest_non_cancelled_annotation_and_image_path_mapping(run, digits, tmp_path):
    idx = run.state["open_query"]["indices"]
    tasks = []
    for n, i in enumerate(idx):
        data = {"image": f"/data/local-files/?d=some/root/images/train/{i}.png"}  # no alssl_index: mapped by path
        tasks.append(_full_task(n + 1, data, ("1", False), ("2", False), ("7", True)))  # 2 is latest non-cancelled
    assert import_labels(run, digits, _write(tmp_path, tasks)) == len(idx)
    assert set(Run.open(run.path).labels[idx].tolist()) == {2}


def test_tasks_of_earlier_rounds_are_skipped(run, digits, expected, tmp_path, capsys):
    tasks = _tasks_for(run)
    i0 = expected["round0"][0]
    tasks.append(_full_task(50, {"image": "x", "alssl_index": i0}, ("3", False)))  # a reused project: round 0's task
    assert import_labels(run, digits, _write(tmp_path, tasks)) == len(tasks) - 1
    assert "skipped 1 Label Studio task(s)" in capsys.readouterr().err


def test_min_and_csv_records(digits, run):
    idx = run.state["open_query"]["indices"]
    records = [{"image": "x", "alssl_index": i, "id": n, "label": "4", "annotation_id": n, "updated_at": "2026"}
               for n, i in enumerate(idx)]
    records.append({"image": "x", "alssl_index": idx[0], "id": 0, "label": {"choices": ["5"]}, "annotation_id": 77,
                    "updated_at": "2027"})  # a later annotation of task 0
    rows, problems, _ = read_export(json.dumps(records), "json", dataset=digits, labeled=run.labeled_mask)
    assert not problems and dict((r[1], r[3]) for r in rows)[str(idx[0])] == "5" and len(rows) == len(idx)
    csv_text = "alssl_index,annotation_id,annotator,id,image,label,updated_at\n" + "".join(
        f"{i},{n},1,{n},x,{'' if n == 0 else '6'},2026\n" for n, i in enumerate(idx))
    rows, problems, _ = read_export(csv_text, "csv", dataset=digits, labeled=run.labeled_mask)
    assert len(rows) == len(idx) - 1 and len(problems) == 1
    assert problems[0].startswith(f"task 0 (alssl_index {idx[0]}): no annotation (or only cancelled ones") \
            and "JSON" in problems[0]
    # a cancelled_annotations count (what Label Studio writes for a skipped task) makes it a skip
    skipped = csv_text.replace("updated_at\n", "updated_at,cancelled_annotations\n").replace(",2026\n", ",2026,1\n", 1)
    rows, problems, _ = read_export(skipped, "csv", dataset=digits, labeled=run.labeled_mask)
    assert not problems and rows[0][1:] == (str(idx[0]), None, "__skip__")


def test_any_accepts_an_export(tmp_path, digits):
    r = Run.create(tmp_path / "any", n_pool=digits.n_pool, config={"data": {"spec": "digits"}})
    tasks = [_full_task(n + 1, {"image": "x", "alssl_index": i}, (str(digits.y_train[i]), False))
             for n, i in enumerate([4, 8, 15])]
    assert import_labels(r, digits, _write(tmp_path, tasks), any_images=True) == 3
    assert Run.open(r.path).labels[[4, 8, 15]].tolist() == digits.y_train[[4, 8, 15]].tolist()


def test_fixtures_are_small():
    """(Committed; scripts/label_studio_roundtrip.py --fixtures tests/fixtures/label_studio regenerates them.)"""
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 200_000


def test_export_without_a_label_field(digits, run):
    records = [{"image": "x", "alssl_index": i, "id": n, "choice": "4"}
               for n, i in enumerate(run.state["open_query"]["indices"])]
    with pytest.raises(UserError, match="no 'label' field"):
        read_export(json.dumps(records), "json", dataset=digits, labeled=run.labeled_mask)


@pytest.mark.parametrize("text, needle", [('[{"id": 1,', "not valid JSON"), ("[1, 2]", "not a Label Studio export"),
                                          ('"tasks"', "not a Label Studio export")])
def test_not_an_export(digits, run, tmp_path, text, needle):
    f = tmp_path / "export.json"
    f.write_text(text)
    with pytest.raises(UserError, match=needle):
        import_labels(run, digits, f)
