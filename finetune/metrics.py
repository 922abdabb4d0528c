"""Official metrics: GLUE (scikit-learn / scipy) and SQuAD EM/F1 (the official evaluate scripts).

The SQuAD part re-implements both scripts of https://rajpurkar.github.io/SQuAD-explorer/, which
differ on edge cases, so each version is scored by its own script's logic:
- evaluate-v1.1.py (`squad_evaluate_v1`): EM / F1 max over every gold answer as given; F1 is 0
  when no token is shared, even when both sides normalise to nothing (gold "the" vs ""); a
  question without a prediction scores 0 and still counts in the total.
- evaluate-v2.0.py (`squad_evaluate`): gold answers that normalise to "" are dropped ([""] when
  none is left); F1 is 1 when both sides are empty; "has answer" means the question has gold
  answers at all (not that one survives normalisation); questions without a prediction are left
  out; the no-answer threshold and the best-threshold search.
"""
from __future__ import annotations

import collections
import logging
import re
import string
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- GLUE


def mcc(labels: Sequence[int], preds: Sequence[int]) -> float:
    return float(matthews_corrcoef(labels, preds))


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    return float(accuracy_score(labels, preds))


def binary_f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """F1 of the positive class (id 1: equivalent / duplicate), as GLUE reports for MRPC and QQP."""
    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))


def pearson(labels: Sequence[float], preds: Sequence[float]) -> float:
    with warnings.catch_warnings():            # constant input -> NaN, handled by glue_metrics
        warnings.simplefilter("ignore")
        return float(pearsonr(preds, labels)[0])


def spearman(labels: Sequence[float], preds: Sequence[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(preds, labels)[0])


_GLUE_METRIC_FNS = {"mcc": mcc, "accuracy": accuracy, "f1": binary_f1, "pearson": pearson,
                    "spearman": spearman}


def glue_metrics(metric_names: Sequence[str], labels: np.ndarray, preds: np.ndarray,
                 suffix: str = "") -> dict[str, float]:
    """Metrics for one dev split. Names may carry the split suffix already (accuracy_m)."""
    out = {}
    for name in metric_names:
        if suffix and not name.endswith(suffix):
            continue
        base = name[: -len(suffix)] if suffix else name
        value = _GLUE_METRIC_FNS[base](labels, preds)
        # Constant predictions make correlations undefined (NaN); report 0 so averages still work.
        out[name] = 0.0 if np.isnan(value) else value
    return out


def task_score(metrics: Mapping[str, float], metric_names: Sequence[str]) -> float:
    """GLUE's per-task score: the unweighted mean of the task's metrics (MRPC: (F1 + acc) / 2,
    STS-B: (Pearson + Spearman) / 2, MNLI: (acc_m + acc_mm) / 2)."""
    return float(np.mean([metrics[m] for m in metric_names]))


# ---------------------------------------------------------------------------------------- SQuAD


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official order)."""
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_v1(a_gold: str, a_pred: str) -> float:
    """evaluate-v1.1's f1_score: no special case for empty answers (no shared token -> 0)."""
    gold_toks = normalize_answer(a_gold).split()
    pred_toks = normalize_answer(a_pred).split()
    num_same = sum((collections.Counter(pred_toks) & collections.Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def squad_evaluate_v1(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str]
                      ) -> dict[str, float]:
    """evaluate-v1.1.py: {exact, f1, total} in %, max over all gold answers as given (none
    dropped). A question without a prediction scores 0 and counts in the total (the official
    script prints 'Unanswered question ... will receive score 0')."""
    if not gold:
        raise ValueError("squad_evaluate_v1 needs at least one gold question.")
    exact = f1 = 0.0
    missing = 0
    for qid, answers in gold.items():
        if not answers:
            raise ValueError(f"SQuAD v1.1 question {qid!r} has no gold answer; v1.1 data has one "
                             f"or more for every question (is this v2.0 data? use squad_v2).")
        if qid not in preds:
            missing += 1
            continue
        exact += max(float(compute_exact(a, preds[qid])) for a in answers)
        f1 += max(f1_v1(a, preds[qid]) for a in answers)
    if missing == len(gold):
        raise ValueError("No prediction matches a gold question id.")
    if missing:
        log.warning("%d unanswered questions receive score 0 (as in evaluate-v1.1)", missing)
    total = len(gold)
    return {"exact": 100.0 * exact / total, "f1": 100.0 * f1 / total, "total": total}


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def gold_answers_for_eval(answer_texts: Sequence[str]) -> list[str]:
    """Gold answers whose normalised text is non-empty; [""] for an unanswerable question."""
    golds = [a for a in answer_texts if normalize_answer(a)]
    return golds or [""]


def get_raw_scores(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """gold: qid -> answer texts ([] when unanswerable). Questions without a prediction are
    skipped, as in the official script (which prints 'Missing prediction')."""
    exact_scores, f1_scores = {}, {}
    for qid, answers in gold.items():
        if qid not in preds:
            continue
        golds = gold_answers_for_eval(answers)
        exact_scores[qid] = max(compute_exact(a, preds[qid]) for a in golds)
        f1_scores[qid] = max(compute_f1(a, preds[qid]) for a in golds)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float],
                           qid_to_has_ans: Mapping[str, bool], na_prob_thresh: float
                           ) -> dict[str, float]:
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        new_scores[qid] = float(not qid_to_has_ans[qid]) if pred_na else s
    return new_scores


def make_eval_dict(exact_scores: Mapping[str, float], f1_scores: Mapping[str, float],
                   qid_list: Sequence[str] | None = None) -> dict[str, float]:
    if not qid_list:
        total = len(exact_scores)
        return {"exact": 100.0 * sum(exact_scores.values()) / total,
                "f1": 100.0 * sum(f1_scores.values()) / total, "total": total}
    total = len(qid_list)
    return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
            "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}


def find_best_thresh(preds: Mapping[str, str], scores: Mapping[str, float],
                     na_probs: Mapping[str, float], qid_to_has_ans: Mapping[str, bool]
                     ) -> tuple[float, float]:
    """Sweep the no-answer threshold over the sorted na_probs (official logic)."""
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), float(best_thresh)


def squad_evaluate(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str],
                   na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0
                   ) -> dict[str, float]:
    """The official evaluate-v2.0 output (for v1.1 data use squad_evaluate_v1): exact, f1, total,
    HasAns_*/NoAns_* and, when na_probs (the null odds) are given, best_exact / best_f1 with their
    thresholds. Scores are in %."""
    if not gold:
        raise ValueError("squad_evaluate needs at least one gold question.")
    # As make_qid_to_has_ans: a question with gold answers "has an answer" even when all of them
    # normalise to "" (gold "the"); that decides the HasAns/NoAns splits and the threshold search.
    qid_to_has_ans = {qid: bool(answers) for qid, answers in gold.items()}
    has_ans = [k for k, v in qid_to_has_ans.items() if v]
    no_ans = [k for k, v in qid_to_has_ans.items() if not v]
    probs = dict(na_probs) if na_probs is not None else {k: 0.0 for k in preds}
    exact_raw, f1_raw = get_raw_scores(gold, preds)
    if not exact_raw:
        raise ValueError("No prediction matches a gold question id.")
    exact_thresh = apply_no_ans_threshold(exact_raw, probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, probs, qid_to_has_ans, na_prob_thresh)
    out = make_eval_dict(exact_thresh, f1_thresh)
    for prefix, qids in (("HasAns", has_ans), ("NoAns", no_ans)):
        qids = [q for q in qids if q in exact_thresh]
        if qids:
            sub = make_eval_dict(exact_thresh, f1_thresh, qid_list=qids)
            out.update({f"{prefix}_{k}": v for k, v in sub.items()})
    if na_probs is not None:
        best_exact, exact_t = find_best_thresh(preds, exact_raw, probs, qid_to_has_ans)
        best_f1, f1_t = find_best_thresh(preds, f1_raw, probs, qid_to_has_ans)
        out.update(best_exact=best_exact, best_exact_thresh=exact_t,
                   best_f1=best_f1, best_f1_thresh=f1_t)
    return out
