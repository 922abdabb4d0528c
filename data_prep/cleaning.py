"""Wikitext -> plain text with mwparserfromhell (a maintained parser, not hand regexes).

Kept: prose, link labels, list items, headings' text. Dropped: templates, references, tables,
galleries, math, comments, and links into non-article namespaces (files, images, categories,
interwiki), which carry captions or metadata rather than running text.

Public API::

    wikitext_to_text(raw: str) -> str   # raw = "<title>\\n<wikitext>" as produced by the readers
"""
from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Tag, Text, Wikilink

_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source", "noinclude"}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_MANY_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_SPACES = re.compile(r"[ \t]{2,}")
# Safety net, not the parser: mwparserfromhell leaves a <ref> as text when its surroundings fail to
# parse (e.g. inside an unbalanced quote template); such leftovers would be pure citation noise.
_LEFTOVER_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)


def _link_is_metadata(title: str) -> bool:
    title = title.strip().lower().lstrip(":")
    # Interlanguage/namespace links look like "de:Anarchismus"; a colon before any space marks them.
    head = title.split(" ", 1)[0]
    return title.startswith(_DROP_LINK_PREFIXES) or (":" in head and not title.startswith("wikt:"))


def _strip(code) -> str:
    """Plain text of a parsed wikicode tree, dropping unwanted nodes at any depth."""
    out = []
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            if not _link_is_metadata(str(node.title)):
                out.append(_strip(node.text) if node.text is not None else _strip(node.title))
        elif isinstance(node, Tag):
            name = str(node.tag).strip().lower()
            if name in _DROP_TAGS:
                continue
            if name in ("br", "li", "dd", "dt", "p") or node.self_closing:
                out.append("\n" if name in ("li", "dd", "dt", "p") else " ")
            if node.contents is not None:
                out.append(_strip(node.contents))
        elif isinstance(node, Heading):
            out.append(_strip(node.title).strip())
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, ExternalLink):
            if node.title is not None:   # bare URLs carry no prose
                out.append(_strip(node.title))
        # Templates, comments, template arguments: dropped.
    return "".join(out)


def wikitext_to_text(raw: str) -> str:
    title, _, body = raw.partition("\n")
    text = _LEFTOVER_REFS.sub("", _strip(mwparserfromhell.parse(body)))
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    text = _MANY_BLANK_LINES.sub("\n\n", text).strip()
    if not text:
        return ""   # an article with no prose left counts as an empty document
    return f"{title.strip()}\n\n{text}" if title.strip() else text
