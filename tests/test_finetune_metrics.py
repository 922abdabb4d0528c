"""Finetuning metrics: SQuAD's official normalisation / EM / F1 / no-answer threshold, and the GLUE
metrics against independent formulas and scikit-learn / scipy on random data."""
import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from finetune import metrics as M


# ------------------------------------------------------------------------------------ SQuAD


@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("the cat", "cat"),
    ("A  cat sat on   the mat.", "cat sat on mat"),
    ("An apple, an Orange", "apple orange"),
    ("Denver Broncos", "denver broncos"),
    ("'Norman' comes from \"Norseman\"", "norman comes from norseman"),
    ("theater", "theater"),          # articles only as whole words
    ("", ""),
    ("  ...  ", ""),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_and_f1_hand_examples():
    assert M.compute_exact("The Denver Broncos", "denver broncos!") == 1
    assert M.compute_exact("Denver Broncos", "Broncos") == 0
    # pred 1 token, gold 2 tokens, 1 common: P=1, R=1/2 -> F1=2/3
    assert M.compute_f1("Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    # pred "10th and 11th" (3) vs gold "10th and 11th centuries" (4): P=1, R=3/4 -> 6/7
    assert M.compute_f1("10th and 11th centuries", "10th and 11th") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity (Counter intersection)
    assert M.compute_f1("a b b", "b b b c") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    assert M.compute_f1("Broncos", "Panthers") == 0.0
    # no-answer: F1 is 1 if both empty, else 0
    assert M.compute_f1("", "") == 1.0
    assert M.compute_f1("", "Broncos") == 0.0
    assert M.compute_f1("the", "") == 1.0      # "the" normalises to empty


def _gold_preds():
    gold = {"q1": ["Denver Broncos", "The Denver Broncos"],   # answerable
            "q2": ["February 7, 2016", "February 7"],
            "q3": [],                                         # unanswerable
            "q4": []}
    preds = {"q1": "Denver Broncos", "q2": "February 7", "q3": "", "q4": "Carolina Panthers"}
    return gold, preds


def test_squad_evaluate_v2_with_null_odds():
    gold, preds = _gold_preds()
    out = M.squad_evaluate(gold, preds)
    # exact: q1 1, q2 1 (max over golds), q3 1 (both empty), q4 0 -> 75%
    assert out["exact"] == pytest.approx(75.0)
    assert out["f1"] == pytest.approx(75.0)
    assert out["total"] == 4
    assert out["HasAns_exact"] == pytest.approx(100.0) and out["HasAns_total"] == 2
    assert out["NoAns_exact"] == pytest.approx(50.0) and out["NoAns_total"] == 2
    # With null odds: q4 has the highest no-answer odds, so a threshold just below it abstains on
    # q4 (correct) while keeping q1/q2 answered -> 100%.
    na = {"q1": -3.0, "q2": -2.0, "q3": 0.5, "q4": 2.0}
    out = M.squad_evaluate(gold, preds, na_probs=na, na_prob_thresh=1.0)
    assert out["exact"] == pytest.approx(100.0)         # q4 abstains (2.0 > 1.0), q3 counted
    assert out["best_exact"] == pytest.approx(100.0)
    assert out["best_f1"] == pytest.approx(100.0)
    # Sweep: start 2 (q3, q4 abstain); +q1 -> 3; +q2 -> 4 (best, thresh -2); +q3 ("" pred) -> 4,
    # not strictly better; +q4 -> 3. The official script keeps the first best: -2.0.
    assert out["best_f1_thresh"] == pytest.approx(-2.0)


def test_find_best_thresh_matches_official_sweep():
    # Official logic: start with all-abstain score (#no-answer), add qids by increasing na prob.
    preds = {"a": "x", "b": "y", "c": ""}
    scores = {"a": 1.0, "b": 0.0, "c": 1.0}
    na = {"a": 0.1, "b": 0.2, "c": 0.9}
    has = {"a": True, "b": True, "c": False}
    best, thresh = M.find_best_thresh(preds, scores, na, has)
    # start 1 (c abstains correctly); +a -> 2 at 0.1; +b -> 2; +c (empty pred, diff 0) -> 2
    assert best == pytest.approx(100.0 * 2 / 3)
    assert thresh == pytest.approx(0.1)


def test_squad_evaluate_missing_prediction_skipped_and_errors():
    gold, preds = _gold_preds()
    del preds["q2"]
    assert M.squad_evaluate(gold, preds)["total"] == 3
    with pytest.raises(ValueError):
        M.squad_evaluate(gold, {"zz": "x"})


# ------------------------------------------------------------------------------------- GLUE


def _mcc_by_hand(y, p):
    tp = np.sum((y == 1) & (p == 1)); tn = np.sum((y == 0) & (p == 0))
    fp = np.sum((y == 0) & (p == 1)); fn = np.sum((y == 1) & (p == 0))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def _rank(x):
    # average ranks for ties, as Spearman wants
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        idx = x == v
        ranks[idx] = ranks[idx].mean()
    return ranks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_glue_classification_metrics_random(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    assert M.mcc(y, p) == pytest.approx(_mcc_by_hand(y, p))
    assert M.mcc(y, p) == pytest.approx(matthews_corrcoef(y, p))
    assert M.accuracy(y, p) == pytest.approx(np.mean(y == p))
    tp = np.sum((y == 1) & (p == 1))
    f1 = 2 * tp / (np.sum(p == 1) + np.sum(y == 1))
    assert M.binary_f1(y, p) == pytest.approx(f1)
    assert M.binary_f1(y, p) == pytest.approx(f1_score(y, p))


@pytest.mark.parametrize("seed", [0, 1])
def test_glue_correlation_metrics_random(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(0, 5, 100), 1)          # ties, like STS-B gold scores
    p = y + rng.normal(0, 1.0, 100)
    assert M.pearson(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1])
    assert M.pearson(y, p) == pytest.approx(pearsonr(y, p)[0])
    assert M.spearman(y, p) == pytest.approx(np.corrcoef(_rank(y), _rank(p))[0, 1])
    assert M.spearman(y, p) == pytest.approx(spearmanr(y, p)[0])


def test_glue_metrics_dispatch_and_task_score():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0, 1, 0, 0, 1])
    out = M.glue_metrics(("f1", "accuracy"), y, p)
    assert out["accuracy"] == pytest.approx(0.8)
    assert out["f1"] == pytest.approx(0.8)
    assert M.task_score(out, ("f1", "accuracy")) == pytest.approx(0.8)
    # MNLI: suffixed names select the split's metric
    m = M.glue_metrics(("accuracy_m", "accuracy_mm"), y, p, suffix="_mm")
    assert list(m) == ["accuracy_mm"]
    # constant predictions: correlation undefined -> reported as 0, not NaN
    assert M.glue_metrics(("pearson",), np.array([1.0, 2.0, 3.0]), np.ones(3))["pearson"] == 0.0
