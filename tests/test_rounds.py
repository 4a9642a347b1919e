"""Label-CSV validation: a person's file is imported whole or not at all, with the offending rows listed."""

import json
from pathlib import Path

import numpy as np
import pytest

from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.labeling.files import read_label_csv
from alssl.rounds import ORACLE, check_rows, import_labels
from alssl.runs import Run


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def run_with_query(tmp_path, digits):
    run = Run.create(tmp_path / "r", n_pool=len(digits.y_train), config={"data": {"spec": "digits"}})
    run.add_labels(np.array([0]), digits.y_train[[0]],
                   round_meta={"strategy": "random", "budget": "1", "seed": 0, "source": "oracle"})
    run.state["open_query"] = {"round": 1, "budget": "3", "strategy": "random", "seed": 0, "probe": "linear",
                               "file": "queries/round-1.csv", "indices": [5, 9, 12]}
    run.save_state()
    return run


def _parse(text, digits, run):
    return check_rows(run, digits, read_label_csv(text))


def test_good_file_by_index_and_by_id(digits, run_with_query):
    idx, y = _parse("index,label\n5,3\n9,7\n12,0\n", digits, run_with_query)
    assert idx.tolist() == [5, 9, 12] and y.tolist() == [3, 7, 0]
    idx, y = _parse("id,label\ntrain/12,1\ntrain/5,2\ntrain/9,4\n", digits, run_with_query)
    assert idx.tolist() == [12, 5, 9] and y.tolist() == [1, 2, 4]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("5,3\n9,7\n12,0\n", "header"),
        ("index,label\n5,3\n9,7\n12,ten\n", "unknown class 'ten'"),
        ("index,label\n5,3\n5,3\n9,7\n12,0\n", "duplicate row for 'train/5'"),
        ("index,label\n5,3\n9,7\n", "1 queried images have no label"),
        ("index,label\n5,3\n9,7\n12,0\n0,1\n", "(index 0) is already labeled"),
        ("index,label\n5,3\n9,7\n12,0\n99999,1\n", "unknown index 99999"),
        ("index,label\n5,3\n9,7\n12,0\n13,1\n", "(index 13) is not in the open query"),
        ("index,label\nfive,3\n9,7\n12,0\n", "'five' is not an integer"),
        ("id,label\ntrain/5,3\ntrain/9,7\ntrain/77,0\n", "'train/77' (index 77) is not in the open query"),
        ("index,label\n5,3,1\n9,7\n12,0\n", "line 2 has 3 columns, the header has 2"),
    ],
)
def test_bad_rows_reject_the_whole_file(digits, run_with_query, tmp_path, text, needle):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    before = (run_with_query.path / "state.json").read_bytes()
    with pytest.raises(UserError, match="nothing imported|header") as e:
        import_labels(run_with_query, digits, f)
    assert needle in str(e.value)
    assert (run_with_query.path / "state.json").read_bytes() == before


def test_errors_list_several_rows(digits, run_with_query):
    with pytest.raises(UserError) as e:
        _parse("index,label\n5,x\n9,y\n12,0\n", digits, run_with_query)
    assert "line 2" in str(e.value) and "line 3" in str(e.value)


def test_import_closes_round(digits, run_with_query, tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("index,label\n5,3\n9,7\n12,0\n")
    assert import_labels(run_with_query, digits, f) == 3
    run = Run.open(run_with_query.path)
    assert run.state["open_query"] is None
    assert run.labeled_round[[0, 5, 9, 12]].tolist() == [0, 1, 1, 1]
    assert run.labels[[5, 9, 12]].tolist() == [3, 7, 0]
    with pytest.raises(UserError, match="no open query"):
        import_labels(run, digits, ORACLE)


def test_oracle_uses_ground_truth(digits, run_with_query):
    import_labels(run_with_query, digits, ORACLE)
    assert run_with_query.labels[[5, 9, 12]].tolist() == digits.y_train[[5, 9, 12]].tolist()


@pytest.mark.parametrize("text, needle", [
    ("index,label\n--5,3\n", "index '--5' is not an integer"),
    ("index,label\n\u00b3,3\n", "index '\u00b3' is not an integer"),  # str.isdigit() says yes, int() says no
    ("index,label\n5,\u00b2\n9,7\n12,0\n", "unknown class '\u00b2'"),
    ("index,label\n5," + "x" * 140_000 + "\n", "not valid CSV (field larger than field limit"),
])
def test_malformed_cells_are_reported_not_crashed_on(digits, run_with_query, text, needle):
    with pytest.raises(UserError) as e:
        _parse(text, digits, run_with_query)
    assert needle in str(e.value)


def test_every_problem_in_one_pass(digits, run_with_query, tmp_path):
    """Unknown class, duplicate, an id not in the query and a queried image without a row: one error lists all four."""
    f = tmp_path / "labels.csv"
    f.write_text("index,id,label\n5,train/5,kat\n5,train/5,3\n13,train/13,1\n")  # 9 and 12 have no row
    before = (run_with_query.path / "state.json").read_bytes()
    with pytest.raises(UserError) as e:
        import_labels(run_with_query, digits, f)
    msg = str(e.value)
    for needle in ("line 2: unknown class 'kat'", "line 3: duplicate row for 'train/5'",
                   "line 4: 'train/13' (index 13) is not in the open query",
                   "2 queried images have no label ('train/9', 'train/12')"):
        assert needle in msg, (needle, msg)
    assert (run_with_query.path / "state.json").read_bytes() == before


def test_skip_value_marks_images_skipped(digits, run_with_query, tmp_path, monkeypatch):
    """`__skip__` = none of these: skipped in the round, not labeled, never queried again; state.json validates."""
    from alssl.rounds import SKIP, query
    from alssl.runs import state_problem

    f = tmp_path / "labels.csv"
    f.write_text(f"index,label\n5,3\n9,{SKIP}\n12,\n")
    with pytest.raises(UserError, match=f"line 4: empty label \\(write {SKIP}"):
        import_labels(run_with_query, digits, f)
    f.write_text(f"index,label\n5,3\n9,{SKIP}\n12,{SKIP}\n")
    assert import_labels(run_with_query, digits, f) == 1
    run = Run.open(run_with_query.path)
    assert run.state["rounds"][1]["n"] == 1 and run.state["rounds"][1]["skipped"] == [9, 12]
    assert run.labeled_round[[5, 9, 12]].tolist() == [1, -1, -1] and run.skipped_mask.sum() == 2
    assert run.state["rounds"][1]["source"] == str(f)  # outside the run: as given
    for bad, needle in [([9, 0], "holds 0, which is labeled"), ([9, 9, 12], "skipped twice"),
                        (["9"], "not a pool index")]:
        st = json.loads((run.path / "state.json").read_text())
        st["rounds"][1]["skipped"] = bad
        assert needle in state_problem(st), bad
    # the rest of the pool can still be queried, but never a skipped image
    import alssl.feature_sets

    emb = np.random.default_rng(0).random((len(digits.y_train), 4), np.float32)
    monkeypatch.setattr(alssl.feature_sets, "pool_features", lambda path, ds, ckpt=None: (emb, None))
    monkeypatch.setattr(alssl.feature_sets, "choose",
                        lambda run, ds: alssl.feature_sets.Choice("ssl", "test", Path("x")))
    free = np.flatnonzero(~run.labeled_mask & ~run.skipped_mask)
    query(run, digits, budget=str(len(free)), strategy="random", seed=0)
    picked = Run.open(run.path).state["open_query"]["indices"]
    assert sorted(picked) == free.tolist() and not {9, 12} & set(picked)


def test_labels_from_a_python_mapping(digits, run_with_query):
    """{pool index or image id: class name, class id or SKIP} goes through the same checks as a file."""
    from alssl.rounds import SKIP

    before = (run_with_query.path / "state.json").read_bytes()
    with pytest.raises(UserError) as e:
        import_labels(run_with_query, digits, {5: 3, 9: 99, "train/77": "1", 2.5: "1"})
    msg = str(e.value)
    for needle in ("labels rejected, nothing imported", "labels[9]: class id 99 is not one of 0..9",
                   "labels['train/77']: 'train/77' (index 77) is not in the open query",
                   "labels[2.5]: index '2.5' is not an integer", "1 queried images have no label ('train/12')"):
        assert needle in msg, (needle, msg)
    with pytest.raises(UserError, match="labels rejected, nothing imported: 3 queried images have no label"):
        import_labels(run_with_query, digits, {})
    assert (run_with_query.path / "state.json").read_bytes() == before
    assert import_labels(run_with_query, digits, {5: "3", "train/9": 7, np.int64(12): SKIP}) == 2
    run = Run.open(run_with_query.path)
    assert run.labels[[5, 9]].tolist() == [3, 7] and run.state["rounds"][1]["skipped"] == [12]
    assert run.state["rounds"][1]["source"] == "python" and run.state["open_query"] is None


def test_pick_hides_skipped_images_and_starts_model_strategies_at_random(digits):
    """`pick` is the step query and curve share: skipped images are never picked, and with start_random a strategy
    that needs labels draws exactly random's first round."""
    from alssl.rounds import pick

    n = len(digits.y_train)
    emb = digits.x_train.reshape(n, -1).astype(np.float32)
    none, labels = np.zeros(n, bool), np.full(n, -1)
    skipped = np.zeros(n, bool)
    skipped[::2] = True
    args = dict(embeddings=emb, labels=labels, num_classes=10, seed=1, round_k=0)
    picked, _ = pick("kcenter", 20, labeled=none, skipped=skipped, **args)
    assert len(set(picked.tolist())) == 20 and not skipped[picked].any()
    first, _ = pick("entropy", 15, labeled=none, start_random=True, **args)
    assert first.tolist() == pick("random", 15, labeled=none, **args)[0].tolist()
    with pytest.raises(UserError, match="needs labeled samples"):
        pick("entropy", 15, labeled=none, **args)
