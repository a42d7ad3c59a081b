"""Probing floors and the raw top-1 probe, sparse probing, and the sae-probes concept source, against sklearn and
hand-computed values (offline, small, fast)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zstandard
from fakes import LinArtefact, make
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.activations import TextActivations, pool_mean
from bench.concepts import SAEPROBES_DATA, SAEPROBES_ENV, ConceptSet, get_concept_set, saeprobes_datasets
from bench.planted import make_planted
from metrics import sparse_probing as sparse
from metrics.probing import majority_floor, probing_metrics, top_k_by_mean_diff
from metrics.sparse_probing import sparse_probing_metrics


def sklearn_probe(X_tr, y_tr, X_te, y_te):
    """(accuracy, AUROC) of the documented probe, written out with sklearn directly."""
    p = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="liblinear", random_state=0))
    p.fit(X_tr, y_tr)
    return p.score(X_te, y_te), roc_auc_score(y_te, p.decision_function(X_te))


def naive_top(X, y, k):
    diffs = [abs(X[y == 1, j].mean() - X[y == 0, j].mean()) for j in range(X.shape[1])]
    return sorted(range(X.shape[1]), key=lambda j: (-diffs[j], j))[:k]


# ------------------------------------------------------------------------------------------------
# probing floors, normalised retention, raw top-1 probe


def test_majority_floor_hand_values():
    assert majority_floor(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == 0.25  # train majority 0
    assert majority_floor(np.array([1, 1, 0]), np.array([0, 1, 1, 1])) == 0.75
    assert majority_floor(np.array([0, 1]), np.array([1, 1, 0])) == pytest.approx(1 / 3)  # tie -> negative
    assert np.isnan(majority_floor(np.array([0, 1]), np.array([], dtype=int)))


def test_top_k_by_mean_diff_matches_naive_and_breaks_ties_low():
    g = np.random.default_rng(0)
    X, y = g.normal(size=(30, 50)), np.r_[np.ones(15), np.zeros(15)].astype(int)
    assert top_k_by_mean_diff(X, y, 5).tolist() == naive_top(X, y, 5)
    X2 = np.zeros((4, 3))
    X2[:2, [0, 2]] = 1.0  # columns 0 and 2 tie
    assert top_k_by_mean_diff(X2, np.array([1, 1, 0, 0]), 2).tolist() == [0, 2]
    assert len(top_k_by_mean_diff(X2, np.array([1, 1, 0, 0]), 9)) == 3  # k capped at the width


@pytest.fixture(scope="module")
def planted():
    return make_planted(n_concepts=4, n_background=6, per_concept=12, d=32, seed=3)


def test_probing_floor_top1_and_retentions(planted):
    ta, cs = planted.text_acts, planted.concept_set
    rows = {r.metric: r for r in probing_metrics(planted.oracle, cs, ta)}
    assert rows["probing.acc_floor"].units == pytest.approx({c: 2 / 3 for c in cs.concepts})  # 1 pos : 2 neg
    raw = pool_mean(ta.acts, ta.text_ids, ta.n_texts).numpy()
    ex = cs.examples
    for c in cs.concepts:
        tr, te = ex[(ex.concept == c) & (ex.split == "train")], ex[(ex.concept == c) & (ex.split == "test")]
        y_tr, y_te = (tr.category == "positive").to_numpy().astype(int), (te.category == "positive").to_numpy()
        top = naive_top(raw[tr.text_id], y_tr, 1)
        acc, _ = sklearn_probe(raw[tr.text_id][:, top], y_tr, raw[te.text_id][:, top], y_te)
        assert rows["probing.acc_raw_top1"].units[c] == pytest.approx(acc)
        ro, rw, fl, t1 = (rows[f"probing.{m}"].units[c] for m in ("acc_readout", "acc_raw", "acc_floor",
                                                                   "acc_raw_top1"))
        assert rows["probing.onehot_retention_top1"].units[c] == pytest.approx(ro / t1)
        if rw > fl:
            assert rows["probing.onehot_retention_norm"].units[c] == pytest.approx((ro - fl) / (rw - fl))
    assert rows["probing.acc_readout"].detail.startswith(f"{cs.name}; ")
    assert "floor=0.667" in rows["probing.acc_readout"].detail


def test_retention_norm_is_nan_where_raw_probe_is_at_the_floor():
    # Test split all negatives: the train majority (negative) scores 1.0 there, which no probe beats.
    texts = [f"t{i}" for i in range(9)]
    cats = ["positive", "positive", "negative", "negative", "negative", "negative"] + ["negative"] * 3
    splits = ["train"] * 6 + ["test"] * 3
    cs = ConceptSet("tiny", ["a"], pd.DataFrame({"text": texts, "concept": "a", "category": cats,
                                                 "split": splits}), "test")
    ta = TextActivations(torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), torch.arange(9), 9)
    rows = {r.metric: r for r in probing_metrics(make(LinArtefact, torch.eye(4)), cs, ta)}
    assert rows["probing.acc_floor"].value == 1.0
    assert np.isnan(rows["probing.onehot_retention_norm"].value) and rows["probing.onehot_retention_norm"].n == 0
    assert "norm_undefined=1/1" in rows["probing.acc_raw"].detail


def test_normalisation_hand_value(monkeypatch):
    # Fixed accuracies 0.9 (readout), 1.0 (raw), 0.8 (raw top-1) over a 1:1 floor of 0.5: norm (0.9-0.5)/(1-0.5).
    from metrics import probing

    cs = ConceptSet("tiny", ["a"], pd.DataFrame({"text": [f"t{i}" for i in range(4)], "concept": "a",
                                                 "category": ["positive", "negative"] * 2,
                                                 "split": ["train", "train", "test", "test"]}), "test")
    ta = TextActivations(torch.eye(4), torch.arange(4), 4)
    accs = iter([0.9, 1.0, 0.8])
    monkeypatch.setattr(probing, "probe_accuracy", lambda *a, **k: next(accs))
    rows = {r.metric: r.value for r in probing_metrics(make(LinArtefact, torch.eye(4)), cs, ta)}
    assert rows["probing.acc_floor"] == 0.5
    assert rows["probing.onehot_retention_norm"] == pytest.approx(0.8)
    assert rows["probing.onehot_retention_top1"] == pytest.approx(0.9 / 0.8)
    assert rows["probing.onehot_retention"] == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------
# sparse probing


def planted_sparse(n_texts=80, tokens=3, d=6, seed=0):
    """Two concepts over the same texts: concept a shifts raw dim 2, concept b dim 4; first half is train."""
    g = torch.Generator().manual_seed(seed)
    y = {"a": torch.arange(n_texts) % 2, "b": (torch.arange(n_texts) // 2) % 2}
    tid = torch.arange(n_texts).repeat_interleave(tokens)
    acts = torch.randn(n_texts * tokens, d, generator=g)
    acts[:, 2] += 3.0 * y["a"][tid]
    acts[:, 4] += 1.5 * y["b"][tid]
    rows = [(f"text {i}", c, "positive" if y[c][i] else "negative", "train" if i < n_texts // 2 else "test")
            for c in ("a", "b") for i in range(n_texts)]
    cs = ConceptSet("planted", ["a", "b"], pd.DataFrame(rows, columns=["text", "concept", "category", "split"]), "t")
    assert cs.examples.loc[cs.examples.concept == "a", "text_id"].tolist() == list(range(n_texts))
    return cs, TextActivations(acts, tid, n_texts), y


def dictionary(d=6, K=20, seed=1):
    """A linear dictionary: feature 7 reads raw dim 2 exactly, the others mix every dim except 2."""
    dirs = torch.randn(K, d, generator=torch.Generator().manual_seed(seed))
    dirs[:, 2] = 0.0
    dirs[7] = F.one_hot(torch.tensor(2), d).float()
    return make(LinArtefact, dirs)


def test_sparse_probing_selects_planted_feature_and_matches_sklearn():
    cs, ta, y = planted_sparse()
    art = dictionary()
    rows = {r.metric: r for r in sparse_probing_metrics(art, cs, ta)}
    feats = pool_mean(art.encode(ta.acts), ta.text_ids, ta.n_texts).numpy()
    raw = pool_mean(ta.acts, ta.text_ids, ta.n_texts).numpy()
    tr, te = np.arange(40), np.arange(40, 80)
    for c in cs.concepts:
        y_tr, y_te = y[c].numpy()[tr], y[c].numpy()[te]
        if c == "a":
            assert naive_top(feats[tr], y_tr, 1) == [7]
            assert rows["sparse_probing.acc@1"].units[c] > 0.9
        for k in sparse.KS:
            for X, pre in ((feats, ""), (raw, "raw_")):
                top = naive_top(X[tr], y_tr, k)
                acc, auc = sklearn_probe(X[tr][:, top], y_tr, X[te][:, top], y_te)
                assert rows[f"sparse_probing.{pre}acc@{k}"].units[c] == pytest.approx(acc)
                assert rows[f"sparse_probing.{pre}auc@{k}"].units[c] == pytest.approx(auc)
        acc, auc = sklearn_probe(raw[tr], y_tr, raw[te], y_te)
        assert rows["sparse_probing.raw_full_acc"].units[c] == pytest.approx(acc)
        assert rows["sparse_probing.raw_full_auc"].units[c] == pytest.approx(auc)
    assert rows["sparse_probing.acc@1"].n == 2
    assert rows["sparse_probing.acc@1"].detail == "planted; readout=default; mean-pooled; K=20"
    assert "k capped at K" in sparse_probing_metrics(make(LinArtefact, torch.eye(6)), cs, ta)[0].detail


def test_sparse_probing_groups_under_budget_give_the_same_rows(monkeypatch):
    cs, ta, _ = planted_sparse()
    art = dictionary()
    full = {r.metric: r.units for r in sparse_probing_metrics(art, cs, ta)}
    monkeypatch.setattr(sparse, "POOLED_BUDGET", 10)  # one concept per pooled block
    assert len(sparse._groups(list(sparse.concept_tasks(cs)), art.K)) == 2
    assert {r.metric: r.units for r in sparse_probing_metrics(art, cs, ta)} == full


class CosineEP(LinArtefact):
    """EP-shaped: its dense readout is `cosine`; any other readout here would be the wrong one."""

    method = "ep"
    readouts = ("binary", "cosine")

    def encode(self, x, readout=None):
        if readout != "cosine":
            raise AssertionError(f"sparse probing read EP with {readout!r}")
        return F.normalize(self.check_input(x), dim=1) @ self.directions.T


def test_sparse_probing_reads_ep_through_cosine():
    cs, ta, _ = planted_sparse()
    art = make(CosineEP, dictionary().directions)
    rows = sparse_probing_metrics(art, cs, ta, ks=(1,))
    assert rows[0].detail.startswith("planted; readout=cosine")


# ------------------------------------------------------------------------------------------------
# the sae-probes concept source (a tiny fixture in the package's cleaned_data layout)


def write_zst(path, df):
    path.write_bytes(zstandard.ZstdCompressor().compress(df.to_csv(index=False).encode()))


@pytest.fixture()
def saep_root(tmp_path):
    root = tmp_path / "cleaned_data"
    root.mkdir()
    n = 60
    alpha = pd.DataFrame({"prompt": [f"shared text {i}" for i in range(n)], "prompt_len": 3,
                          "target": [i % 2 for i in range(n)]})
    words = pd.DataFrame({"prompt": [f"shared text {i}" for i in range(20)] + [f"word {i}" for i in range(40)],
                          "target": ["bigram" if i % 3 else "not_bigram" for i in range(n)]})
    words.loc[len(words)] = ["word 0", "not_bigram" if words.loc[20, "target"] == "bigram" else "bigram"]  # clash
    multi = pd.DataFrame({"prompt": [f"m {i}" for i in range(30)], "target": [i % 3 for i in range(30)]})
    tiny = pd.DataFrame({"prompt": ["only positive", "a negative", "another negative"], "target": [1, 0, 0]})
    for name, df in (("1_alpha", alpha), ("2_multi", multi), ("3_words", words), ("4_tiny", tiny)):
        write_zst(root / f"{name}.csv.zst", df)
    return root


def test_saeprobes_labels_sizes_and_skips(saep_root):
    cs = saeprobes_datasets(root=saep_root, per_concept=10)
    assert cs.name == "saeprobes" and cs.concepts == ["1_alpha", "3_words"]
    assert cs.meta["skipped_non_binary"] == ["2_multi"] and cs.meta["skipped_one_class"] == ["4_tiny"]
    assert cs.meta["positive_label"] == {"1_alpha": "1", "3_words": "bigram"}
    assert cs.meta["dropped_conflicting"] == {"3_words": 2}  # "word 0" under both labels
    assert "word 0" not in cs.texts()
    ex = cs.examples
    a = ex[ex.concept == "1_alpha"]
    assert (a.category == "positive").tolist() == [int(t.split()[-1]) % 2 == 1 for t in a.text]
    assert set(ex.category) == {"positive", "negative"}
    counts = cs.counts()
    assert (counts[["positive", "negative"]].to_numpy() == 5).all()  # 10 per class, half per split
    assert cs.meta["n_per_dataset"]["1_alpha"] == {"available": 60, "train": 5, "test": 5}
    assert (ex.groupby("text")["split"].nunique() == 1).all()  # a shared text has one split everywhere
    fixed = saeprobes_datasets(["1_alpha"], root=saep_root, test_examples=8, train_examples=4)
    assert fixed.name == "saeprobes:1_alpha"
    assert fixed.counts().loc[("1_alpha", "test")].tolist() == [8, 8, 0]
    assert fixed.counts().loc[("1_alpha", "train")].tolist() == [4, 4, 0]


def test_saeprobes_provenance_names_the_package_version_not_this_machines_path(saep_root, monkeypatch):
    assert saeprobes_datasets(root=saep_root, per_concept=10).meta["root"] == str(saep_root)  # a folder of one's own

    class Dist:  # the installed distribution, whose data folder is saep_root
        version = "0.4.2"

        def locate_file(self, rel):
            return saep_root if rel == SAEPROBES_DATA else None

    monkeypatch.delenv(SAEPROBES_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    cs = saeprobes_datasets(per_concept=10)
    assert cs.meta["root"] == f"sae-probes 0.4.2, {SAEPROBES_DATA}"
    assert str(saep_root) not in cs.source and "sae-probes 0.4.2" in cs.source


def test_saeprobes_split_is_deterministic_and_seeded(saep_root, monkeypatch):
    monkeypatch.setenv(SAEPROBES_ENV, str(saep_root))
    a, b = get_concept_set("saeprobes:1_alpha"), get_concept_set("saeprobes:1_alpha")
    pd.testing.assert_frame_equal(a.examples, b.examples)
    other = get_concept_set("saeprobes:1_alpha", seed=1)
    assert set(other.examples.text + other.examples.split) != set(a.examples.text + a.examples.split)


def test_saeprobes_errors_name_the_fix(saep_root, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown sae-probes dataset\(s\) \['9_nope'\].*e\.g\. 1_alpha"):
        get_concept_set("saeprobes:1_alpha,9_nope", root=saep_root)
    with pytest.raises(ValueError, match="no usable binary"):
        saeprobes_datasets(["2_multi"], root=saep_root)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (saep_root / "1_alpha.csv.zst").read_bytes()
    (bad / "1_alpha.csv.zst").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted sae-probes data file.*--force-reinstall"):
        saeprobes_datasets(root=bad)
    (bad / "1_alpha.csv.zst").write_bytes(b"not zstd at all")
    with pytest.raises(ValueError, match="corrupted"):
        saeprobes_datasets(root=bad)
    monkeypatch.delenv(SAEPROBES_ENV, raising=False)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps sae-probes==0.4.2"):
        get_concept_set("saeprobes")
