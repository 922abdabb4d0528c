"""Finetuning metrics: SQuAD's official normalisation / EM / F1 / no-answer threshold, and the GLUE
metrics against independent formulas and scikit-learn / scipy on random data."""
import collections
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
    assert M.compute_f1("the", "") == 1.0      # "the" normalises to empty (v2.0's rule)


def test_v1_f1_has_no_empty_answer_rule():
    """evaluate-v1.1's f1_score returns 0 whenever no token is shared, empty or not."""
    assert M.f1_v1("the", "") == 0.0           # v2.0's compute_f1 gives 1 here
    assert M.f1_v1("", "") == 0.0
    assert M.f1_v1(".", "a") == 0.0
    assert M.f1_v1("Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    assert M.f1_v1("a b b", "b b b c") == pytest.approx(M.compute_f1("a b b", "b b b c"))


def test_squad_evaluate_v1_edge_cases_match_official_v11():
    """Hand-computed with evaluate-v1.1.py's logic: max over every gold answer as given."""
    gold = {"q1": ["the"],                    # normalises to "" -> EM("", "") = 1, F1 = 0
            "q2": [".", "Paris"],             # "." normalises to "" -> EM 1 via ".", F1 0
            "q3": ["Denver Broncos"],         # F1 2/3, EM 0
            "q4": ["Carolina"]}               # no prediction: 0, still in the total
    preds = {"q1": "", "q2": "", "q3": "Broncos"}
    out = M.squad_evaluate_v1(gold, preds)
    assert out["total"] == 4
    assert out["exact"] == pytest.approx(100.0 * 2 / 4)
    assert out["f1"] == pytest.approx(100.0 * (2 / 3) / 4)
    # one question at a time, as the issue states them
    assert M.squad_evaluate_v1({"q": ["the"]}, {"q": ""}) == {"exact": 100.0, "f1": 0.0, "total": 1}
    assert M.squad_evaluate_v1({"q": [".", "Paris"]}, {"q": ""})["exact"] == 100.0
    with pytest.raises(ValueError, match="no gold answer"):
        M.squad_evaluate_v1({"q": []}, {"q": ""})
    with pytest.raises(ValueError, match="No prediction"):
        M.squad_evaluate_v1({"q": ["x"]}, {"z": "x"})


def test_squad_evaluate_v2_has_answer_from_presence_of_answers():
    """evaluate-v2.0.py: has-answer = bool(qa["answers"]); golds normalising to "" are dropped
    for scoring only. Hand-computed:
    a gold ["the"]       pred ""      -> golds [""]: EM 1, F1 1, HasAns
    b gold [".", "Paris"] pred ""     -> golds ["Paris"]: EM 0, F1 0, HasAns
    c gold []            pred ""      -> EM 1, F1 1, NoAns
    d gold []            pred "Paris" -> EM 0, F1 0, NoAns"""
    gold = {"a": ["the"], "b": [".", "Paris"], "c": [], "d": []}
    preds = {"a": "", "b": "", "c": "", "d": "Paris"}
    na = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    out = M.squad_evaluate(gold, preds, na_probs=na)
    assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(50.0)
    assert out["HasAns_total"] == 2 and out["HasAns_exact"] == pytest.approx(50.0)
    assert out["NoAns_total"] == 2 and out["NoAns_exact"] == pytest.approx(50.0)
    # Threshold search: start at #no-answer = 2; a (has answer, score 1) -> 3 at 0.1 (best);
    # b +0; c ("" pred) +0; d (non-empty pred on a no-answer question) -1 -> 2.
    assert out["best_f1"] == pytest.approx(75.0) and out["best_f1_thresh"] == pytest.approx(0.1)
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == pytest.approx(0.1)


# A transcription of the official scripts' functions (evaluate-v1.1.py, evaluate-v2.0.py), kept
# in the shape of the originals, as an oracle for random answers full of articles and punctuation.
def _official_v11(dataset, predictions):
    def f1_score(prediction, ground_truth):
        p, g = M.normalize_answer(prediction).split(), M.normalize_answer(ground_truth).split()
        num_same = sum((collections.Counter(p) & collections.Counter(g)).values())
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(p), 1.0 * num_same / len(g)
        return (2 * precision * recall) / (precision + recall)

    def exact_match_score(prediction, ground_truth):
        return M.normalize_answer(prediction) == M.normalize_answer(ground_truth)

    f1 = exact_match = total = 0
    for qa in dataset:
        total += 1
        if qa["id"] not in predictions:
            continue
        gts = [a["text"] for a in qa["answers"]]
        exact_match += max(exact_match_score(predictions[qa["id"]], g) for g in gts)
        f1 += max(f1_score(predictions[qa["id"]], g) for g in gts)
    return {"exact": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _official_v20(dataset, preds, na_probs, na_prob_thresh=1.0):
    def get_tokens(s):
        return M.normalize_answer(s).split() if s else []

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    has_ans = {qa["id"]: bool(qa["answers"]) for qa in dataset}
    exact_raw, f1_raw = {}, {}
    for qa in dataset:
        golds = [a["text"] for a in qa["answers"] if M.normalize_answer(a["text"])] or [""]
        exact_raw[qa["id"]] = max(int(M.normalize_answer(a) == M.normalize_answer(preds[qa["id"]]))
                                  for a in golds)
        f1_raw[qa["id"]] = max(compute_f1(a, preds[qa["id"]]) for a in golds)

    def best(scores):
        cur = best_score = sum(1 for k in has_ans if not has_ans[k])
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            cur += scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
            if cur > best_score:
                best_score, best_thresh = cur, na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    def apply_no_ans_threshold(scores):
        return {k: float(not has_ans[k]) if na_probs[k] > na_prob_thresh else s
                for k, s in scores.items()}

    exact, f1 = apply_no_ans_threshold(exact_raw), apply_no_ans_threshold(f1_raw)
    n = len(exact)
    out = {"exact": 100.0 * sum(exact.values()) / n, "f1": 100.0 * sum(f1.values()) / n}
    for prefix, want in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in has_ans.items() if v == want]
        if qids:
            out[f"{prefix}_total"] = len(qids)
            out[f"{prefix}_exact"] = 100.0 * sum(exact[k] for k in qids) / len(qids)
            out[f"{prefix}_f1"] = 100.0 * sum(f1[k] for k in qids) / len(qids)
    out["best_exact"], out["best_exact_thresh"] = best(exact_raw)
    out["best_f1"], out["best_f1_thresh"] = best(f1_raw)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_squad_metrics_equal_the_official_scripts_on_random_answers(seed):
    rng = np.random.default_rng(seed)
    words = ["the", "a", "an", ".", ",", "Paris", "paris!", "Denver", "Broncos", "1", "an apple"]

    def phrase():
        return " ".join(rng.choice(words, size=int(rng.integers(0, 4))))

    dataset, gold, preds, na = [], {}, {}, {}
    for i in range(60):
        answers = [] if rng.random() < 0.25 else [phrase() for _ in range(int(rng.integers(1, 4)))]
        dataset.append({"id": f"q{i}", "answers": [{"text": t} for t in answers]})
        gold[f"q{i}"], preds[f"q{i}"] = answers, phrase()
        na[f"q{i}"] = float(rng.integers(-4, 4)) / 2          # ties, as real null odds can have
    ours = M.squad_evaluate(gold, preds, na_probs=na)
    official = _official_v20(dataset, preds, na)
    for key, value in official.items():
        assert ours[key] == pytest.approx(value), key
    v1_data = [qa for qa in dataset if qa["answers"]]
    v1_gold = {qa["id"]: gold[qa["id"]] for qa in v1_data}
    v1_preds = {k: preds[k] for k in list(v1_gold)[::2]}      # half the questions unanswered
    ours1, official1 = M.squad_evaluate_v1(v1_gold, v1_preds), _official_v11(v1_data, v1_preds)
    assert ours1["exact"] == pytest.approx(official1["exact"])
    assert ours1["f1"] == pytest.approx(official1["f1"])


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
