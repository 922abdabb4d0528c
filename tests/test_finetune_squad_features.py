"""SQuAD features with a doc stride (long contexts -> several windows, answer labels) and n-best
span decoding with the v2.0 null-score threshold, on hand-made logits."""
import numpy as np
import pytest

from finetune.squad_features import (QaFeatures, check_lengths, postprocess_predictions,
                                     prepare_features)
from tests.tiny_finetune_models import make_tokenizer


pytestmark = pytest.mark.usefixtures("single_torch_thread")


WORDS = [f"w{i}" for i in range(60)]
CONTEXT = " ".join(WORDS)                       # 60 single-token words


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([CONTEXT, "where is it ? what comes after"])


def test_long_context_windows_and_answer_labels(tokenizer):
    answer = "w40 w41"
    start = CONTEXT.index(answer)
    feats = prepare_features(tokenizer, ["where is it ?"], [CONTEXT],
                             [{"text": [answer], "answer_start": [start]}],
                             max_seq_length=32, doc_stride=8, max_query_length=8)
    # 32 - 4 (question) - 3 specials = 25 context tokens per window, 8 overlap -> stride 17:
    # windows start at 0, 17, 34, 51 -> 4 features for 60 tokens.
    assert len(feats) == 4
    assert feats.example_index == [0, 0, 0, 0]
    first_words = [CONTEXT[next(o for o in offs if o is not None)[0]:].split()[0]
                   for offs in feats.offsets]
    assert first_words == ["w0", "w17", "w34", "w51"]
    for i in range(len(feats)):
        ctx_offsets = [o for o in feats.offsets[i] if o is not None]
        s, e = feats.start_positions[i], feats.end_positions[i]
        window = CONTEXT[ctx_offsets[0][0]:ctx_offsets[-1][1]]
        if answer in window:
            # the labelled tokens map back exactly to the answer text
            assert CONTEXT[feats.offsets[i][s][0]:feats.offsets[i][e][1]] == answer
        else:
            assert s == e == feats.cls_index[i] == 0
    assert sum(s != 0 for s in feats.start_positions) == 2      # windows w17..w41 and w34..w58
    assert all(len(ids) == 32 for ids in feats.input_ids)


def test_unanswerable_labels_cls_and_question_truncation(tokenizer):
    long_q = " ".join(["what"] * 30) + " ?"
    feats = prepare_features(tokenizer, [long_q], [CONTEXT], [{"text": [], "answer_start": []}],
                             max_seq_length=48, doc_stride=8, max_query_length=6)
    assert feats.start_positions[0] == feats.end_positions[0] == 0
    sep = tokenizer.sep_token_id
    assert feats.input_ids[0].index(sep) == 1 + 6               # [CLS] + 6 question tokens


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="doc_stride"):
        check_lengths(64, 24, 40)
    with pytest.raises(ValueError, match="max_query_length"):
        check_lengths(16, 16, 4)


def _features(offsets_list):
    n = len(offsets_list)
    return QaFeatures([[0]] * n, [[1]] * n, None, [0] * n, [0] * n, offsets=offsets_list)


def test_postprocess_picks_best_valid_span_across_windows():
    context = "aa bb cc dd ee"
    # token offsets: [CLS]=None-context, question token None, context tokens ...
    offs1 = [None, None, (0, 2), (3, 5), (6, 8), None]
    offs2 = [None, None, (6, 8), (9, 11), (12, 14), None]
    feats = _features([offs1, offs2])
    feats.example_index = [0, 0]
    s1 = np.array([0.0, 9.0, 1.0, 5.0, 0.0, 0.0])   # index 1 is the question: never a span
    e1 = np.array([0.0, 0.0, 0.0, 1.0, 4.0, 0.0])
    s2 = np.array([0.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    e2 = np.array([0.0, 0.0, 0.0, 0.0, 3.0, 0.0])
    preds, null_odds, nbest = postprocess_predictions(
        ["q"], [context], feats, np.stack([s1, s2]), np.stack([e1, e2]), version_2=False,
        n_best_size=5, max_answer_length=30)
    assert preds == {"q": "bb cc"}                  # 5 + 4 = 9 beats 2 + 3 and 5 + 1
    assert null_odds == {}
    assert nbest["q"][0]["score"] == pytest.approx(9.0)
    # max_answer_length 1 forbids the two-token span: best single token is "bb" (5 + 1 = 6)
    preds, _, _ = postprocess_predictions(["q"], [context], feats, np.stack([s1, s2]),
                                          np.stack([e1, e2]), False, 5, max_answer_length=1)
    assert preds == {"q": "bb"}


def test_postprocess_v2_null_threshold():
    context = "aa bb"
    feats = _features([[None, (0, 2), (3, 5), None]])
    start = np.array([[6.0, 1.0, 2.0, 0.0]])        # null = 6 + 6 = 12; best span "bb" = 2 + 3 = 5
    end = np.array([[6.0, 0.0, 3.0, 0.0]])
    preds, null_odds, _ = postprocess_predictions(["q"], [context], feats, start, end, True, 5, 30,
                                                  null_score_diff_threshold=0.0)
    assert null_odds["q"] == pytest.approx(7.0)
    assert preds["q"] == ""                          # 7 > 0 -> no answer
    preds, _, _ = postprocess_predictions(["q"], [context], feats, start, end, True, 5, 30,
                                          null_score_diff_threshold=7.5)
    assert preds["q"] == "bb"                        # 7 <= 7.5 -> answer
