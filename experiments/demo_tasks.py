"""Small finetuning tasks built from held-out documents of the pretraining corpus.

The demo has no GLUE or SQuAD copy offline, so it builds two tasks of the same *formats* from
documents the pretraining never saw (the documents are split off before data prep):

- ``pairs`` (MRPC-format TSV, a sentence-pair classification): label 1 when sentence 2 directly
  follows sentence 1 in the same article, 0 when it comes from a different article. Negatives are
  drawn from other articles so the task needs topical coherence, not position cues.
- ``cloze QA`` (SQuAD v1.1 JSON, extractive): the context is a paragraph of a few sentences; the
  question is one of its sentences with a span (a number or a capitalised word that does not start
  the sentence) replaced by "what"; the answer is that span at its character offset.

Both are built deterministically from a seed; splits are by document, so no article appears in both
train and dev. Sentence splitting is a simple punctuation rule, which is enough for these tasks.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ANSWER_CANDIDATE = re.compile(r"\b(?:\d[\d,.]*\d|\d|[A-Z][a-z]{2,}(?:\s[A-Z][a-z]{2,})*)\b")
# Capitalised words that are no entity (mid-sentence after a quote or bracket); SQuAD's answer
# normalisation would also reduce the articles to nothing.
_NOT_AN_ANSWER = {"the", "a", "an", "this", "that", "these", "those", "it", "its", "he", "she", "they", "his", "her"}
MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_CHARS = 400


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: split at ., ! or ? followed by space and a capital/digit."""
    sentences = []
    for paragraph in text.split("\n"):
        for piece in _SENTENCE_END.split(paragraph.strip()):
            piece = " ".join(piece.split())
            if len(piece.split()) >= MIN_SENTENCE_WORDS and len(piece) <= MAX_SENTENCE_CHARS:
                sentences.append(piece)
    return sentences


def build_pair_examples(documents: list[Document], rng: random.Random) -> list[tuple[int, str, str]]:
    """(label, sentence1, sentence2) with equal numbers of positives and negatives."""
    per_doc = [split_sentences(d.text) for d in documents]
    usable = [i for i, s in enumerate(per_doc) if len(s) >= 2]
    if len(usable) < 2:
        raise ValueError("the pair task needs at least two held-out documents with two or more sentences each")
    examples = []
    for i in usable:
        sentences = per_doc[i]
        for a, b in zip(sentences[:-1], sentences[1:]):
            examples.append((1, a, b))
            other = rng.choice([j for j in usable if j != i])
            examples.append((0, a, rng.choice(per_doc[other])))
    rng.shuffle(examples)
    return examples


def build_cloze_qa(documents: list[Document], rng: random.Random, sentences_per_paragraph: int = 4) -> list[dict]:
    """SQuAD v1.1 'data' entries: one article per document, paragraphs of a few sentences."""
    articles = []
    for doc_index, doc in enumerate(documents):
        sentences = split_sentences(doc.text)
        paragraphs = []
        for start in range(0, len(sentences), sentences_per_paragraph):
            chunk = sentences[start:start + sentences_per_paragraph]
            context = " ".join(chunk)
            qas = []
            for sent_index, sentence in enumerate(chunk):
                # Skip the sentence's first word: a capitalised sentence start is no named entity.
                candidates = [m for m in _ANSWER_CANDIDATE.finditer(sentence)
                              if m.start() > 0 and m.group(0).lower() not in _NOT_AN_ANSWER]
                if not candidates:
                    continue
                match = rng.choice(candidates)
                question = (sentence[:match.start()] + "what" + sentence[match.end():]).rstrip(".!? ") + "?"
                sentence_offset = context.index(sentence)
                qas.append({
                    "id": f"d{doc_index}p{start}s{sent_index}",
                    "question": question,
                    "answers": [{"text": match.group(0), "answer_start": sentence_offset + match.start()}],
                })
            if qas:
                paragraphs.append({"context": context, "qas": qas})
        if paragraphs:
            articles.append({"title": doc.title, "paragraphs": paragraphs})
    if not articles:
        raise ValueError("the QA task found no answerable sentence in the held-out documents")
    return articles


def _write_mrpc_tsv(path: str, examples: list[tuple[int, str, str]]) -> None:
    # GLUE TSVs are read with quoting off, so write raw lines: no quoting, tabs folded to spaces.
    with open(path, "w", encoding="utf-8") as f:
        f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for n, (label, a, b) in enumerate(examples):
            f.write(f"{label}\t{2 * n}\t{2 * n + 1}\t{_tsv_field(a)}\t{_tsv_field(b)}\n")


def _tsv_field(text: str) -> str:
    return " ".join(text.split())


def write_heldout_tasks(documents: list[Document], out_dir: str, seed: int = 0, dev_fraction: float = 0.3) -> dict:
    """Write ``out_dir/glue/MRPC/{train,dev}.tsv`` and ``out_dir/squad/{train,dev}-v1.1.json``.

    Returns counts per split, for the report.
    """
    if len(documents) < 4:
        raise ValueError(f"need at least 4 held-out documents to build train and dev splits, got {len(documents)}")
    rng = random.Random(seed)
    docs = list(documents)
    rng.shuffle(docs)
    n_dev = max(2, int(round(len(docs) * dev_fraction)))
    splits = {"dev": docs[:n_dev], "train": docs[n_dev:]}

    glue_dir = os.path.join(out_dir, "glue", "MRPC")
    squad_dir = os.path.join(out_dir, "squad")
    os.makedirs(glue_dir, exist_ok=True)
    os.makedirs(squad_dir, exist_ok=True)
    counts = {}
    for split, split_docs in splits.items():
        pairs = build_pair_examples(split_docs, random.Random(f"{seed}-pairs-{split}"))
        _write_mrpc_tsv(os.path.join(glue_dir, f"{split}.tsv"), pairs)
        articles = build_cloze_qa(split_docs, random.Random(f"{seed}-qa-{split}"))
        with open(os.path.join(squad_dir, f"{split}-v1.1.json"), "w", encoding="utf-8") as f:
            json.dump({"version": "1.1", "data": articles}, f, ensure_ascii=False)
        counts[split] = {
            "documents": len(split_docs),
            "pairs": len(pairs),
            "questions": sum(len(p["qas"]) for a in articles for p in a["paragraphs"]),
        }
    return counts
