"""The two record kinds lbr-ray reads, and their field checks (no Ray).

Pairs:  {"query": str, "positive": str, "negatives": [str] (optional), "type": str (optional), ...}
Corpus: {"id": str | int, "text": str, "title": str (optional), ...}
Extra fields (source, license, provenance) are kept but not required.
"""
from __future__ import annotations

from typing import Any

PAIR_FIELDS = ("query", "positive", "negatives", "type", "source")
CORPUS_FIELDS = ("id", "text", "title", "source")
KINDS = ("pairs", "corpus")


def _text(record: dict, name: str, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def check_pair(record: Any) -> dict:
    """Return the normalised pair or raise ValueError saying which field is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    negatives = record.get("negatives") or []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise ValueError("field 'negatives' must be a list of non-empty strings")
    return {
        "query": _text(record, "query"),
        "positive": _text(record, "positive"),
        "negatives": negatives,
        "type": _text(record, "type", required=False) or "unknown",
        "source": _text(record, "source", required=False) or "",
    }


def check_corpus(record: Any) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    doc_id = record.get("id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
        raise ValueError("field 'id' must be a non-empty string or integer")
    return {
        "id": str(doc_id),
        "text": _text(record, "text"),
        "title": _text(record, "title", required=False) or "",
        "source": _text(record, "source", required=False) or "",
    }


CHECKS = {"pairs": check_pair, "corpus": check_corpus}
