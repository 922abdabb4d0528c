"""SQuAD features (long contexts split with a doc stride) and n-best span decoding.

Features: [CLS] question [SEP] context-window [SEP]; a context longer than the window yields
several overlapping features (fast tokenizer, return_overflowing_tokens, stride = overlap).
Offsets map tokens back to context characters, so predictions are exact substrings of the context.
Training labels: the token span of the answer when it lies wholly in the window, else the [CLS]
position (the "no answer in this window" target, which is also how v2.0 marks unanswerable).
Decoding follows the reference BERT run_squad: top n_best start x end logits per feature, spans with
end >= start and at most max_answer_length tokens, score = start + end logit; for v2.0 the null
score is the minimum over the example's features of the [CLS] start + end logit, and the example is
predicted unanswerable when null - best_span > null_score_diff_threshold.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm


@dataclass
class QaFeatures:
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    example_index: list[int]                         # feature -> row of the examples
    cls_index: list[int]
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)   # None off-context
    start_positions: list[int] = field(default_factory=list)                    # train only
    end_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def tensors(self) -> dict[str, list]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        if self.start_positions:
            out["start_positions"] = self.start_positions
            out["end_positions"] = self.end_positions
        return out


def check_lengths(max_seq_length: int, max_query_length: int, doc_stride: int) -> None:
    window = max_seq_length - max_query_length - 3     # [CLS] q [SEP] ctx [SEP]
    if window <= 0:
        raise ValueError(f"max_seq_length ({max_seq_length}) must exceed max_query_length "
                         f"({max_query_length}) + 3.")
    if not 0 <= doc_stride < window:
        raise ValueError(f"doc_stride ({doc_stride}) must be below the context window "
                         f"max_seq_length - max_query_length - 3 = {window}.")


def _truncate_questions(tokenizer, questions: list[str], max_query_length: int) -> list[str]:
    """Cut each question after max_query_length tokens (reference BERT: 64), keeping text intact."""
    # Leading whitespace breaks some tokenizers' offsets; SQuAD has questions that start with it.
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offs in zip(questions, enc["offset_mapping"]):
        out.append(q[: offs[max_query_length - 1][1]] if len(offs) > max_query_length else q)
    return out


def prepare_features(tokenizer, questions: list[str], contexts: list[str],
                     answers: list[dict] | None, max_seq_length: int, doc_stride: int,
                     max_query_length: int, chunk: int = 2000, progress: bool = False) -> QaFeatures:
    """Tokenize examples into features; with `answers` also compute start/end positions."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD needs a fast tokenizer (offset mappings); the model folder's "
                         "tokenizer is a slow one. Add a tokenizer.json to the model folder.")
    if tokenizer.padding_side != "right":
        raise ValueError("SQuAD features assume right padding (question first, then context).")
    check_lengths(max_seq_length, max_query_length, doc_stride)
    if answers is not None:
        check_answer_spans(contexts, answers)
    feats = QaFeatures([], [], [] if "token_type_ids" in tokenizer.model_input_names else None, [], [])
    for lo in tqdm(range(0, len(questions), chunk), desc="tokenize", disable=not progress):
        qs = _truncate_questions(tokenizer, questions[lo:lo + chunk], max_query_length)
        enc = tokenizer(qs, contexts[lo:lo + chunk], truncation="only_second",
                        max_length=max_seq_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        for i in range(len(enc["input_ids"])):
            ex = lo + enc["overflow_to_sample_mapping"][i]
            ids = enc["input_ids"][i]
            seq_ids = enc.sequence_ids(i)
            offs = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            feats.input_ids.append(ids)
            feats.attention_mask.append(enc["attention_mask"][i])
            if feats.token_type_ids is not None:
                feats.token_type_ids.append(enc["token_type_ids"][i])
            feats.example_index.append(ex)
            feats.cls_index.append(cls)
            feats.offsets.append(offs)
            if answers is not None:
                s, e = _answer_positions(answers[ex], offs, cls)
                feats.start_positions.append(s)
                feats.end_positions.append(e)
    return feats


def check_answer_spans(contexts: list[str], answers: list[dict]) -> None:
    """Training labels come from answer_start: refuse an example whose offset does not point at
    its answer text (finetune.squad_data's loaders check and repair offsets; this guards callers
    that build examples themselves)."""
    for i, (context, ans) in enumerate(zip(contexts, answers)):
        if not ans["text"]:
            continue
        text, start = ans["text"][0], ans["answer_start"][0]
        if start < 0 or context[start:start + len(text)] != text:
            raise ValueError(f"Example {i}: answer_start {start} does not point at its answer "
                             f"{text!r} in the context; fix the offsets (finetune.squad_data."
                             f"check_answer_starts repairs small shifts).")


def _answer_positions(answer: dict, offsets: list[tuple[int, int] | None], cls: int
                      ) -> tuple[int, int]:
    if not answer["text"]:
        return cls, cls                                  # v2.0 unanswerable
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return cls, cls                                  # answer not wholly in this window
    start = next(i for i in ctx if offsets[i][1] > start_char)
    end = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    return start, end


def postprocess_predictions(ids: list[str], contexts: list[str], features: QaFeatures,
                            start_logits: np.ndarray, end_logits: np.ndarray, version_2: bool,
                            n_best_size: int = 20, max_answer_length: int = 30,
                            null_score_diff_threshold: float = 0.0
                            ) -> tuple[dict[str, str], dict[str, float], dict[str, list[dict]]]:
    """-> (predictions {qid: text}, null_odds {qid: null - best span score} (v2.0; {} for v1.1),
    nbest {qid: [{text, score}]})."""
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, ex in enumerate(features.example_index):
        by_example[ex].append(f)
    preds, null_odds, nbest = {}, {}, {}
    for ex, (qid, context) in enumerate(zip(ids, contexts)):
        min_null = None
        cands = []
        for f in by_example.get(ex, []):
            s_log, e_log, offs = start_logits[f], end_logits[f], features.offsets[f]
            cls = features.cls_index[f]
            null = float(s_log[cls] + e_log[cls])
            min_null = null if min_null is None or null < min_null else min_null
            top_s = np.argsort(s_log)[::-1][:n_best_size]
            top_e = np.argsort(e_log)[::-1][:n_best_size]
            for a in top_s:
                if a >= len(offs) or offs[a] is None:
                    continue
                for b in top_e:
                    if b >= len(offs) or offs[b] is None or b < a or b - a + 1 > max_answer_length:
                        continue
                    cands.append((float(s_log[a] + e_log[b]), offs[a][0], offs[b][1]))
        cands.sort(key=lambda c: c[0], reverse=True)
        seen, entries = set(), []
        for score, c0, c1 in cands:
            if (c0, c1) in seen:
                continue                                  # same span seen from an overlapping window
            seen.add((c0, c1))
            entries.append({"text": context[c0:c1], "score": score})
            if len(entries) == n_best_size:
                break
        best_text = entries[0]["text"] if entries else ""
        if version_2:
            # With no valid span at all the null answer wins by a large finite margin (JSON-safe).
            best_score = entries[0]["score"] if entries else (min_null or 0.0) - 1e4
            diff = (min_null if min_null is not None else 0.0) - best_score
            null_odds[qid] = diff
            preds[qid] = "" if diff > null_score_diff_threshold else best_text
        else:
            preds[qid] = best_text
        nbest[qid] = entries
    return preds, null_odds, nbest
