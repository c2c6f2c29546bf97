"""Build the bundled demo slice (data/demo/) from ../shared/data: a deterministic hash sample per domain.

    python scripts/make_demo_slice.py --src ../shared/data --out data/demo
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

from lbr_ray.data.readers import iter_raw, resolve_paths
from lbr_ray.data.split import bucket

PAIRS = {"medical": 3000, "chemistry": 3000, "code": 3000, "biology": 3000}
CORPUS = {"medical": 1500, "chemistry": 1500, "code": 1500}
MAX_CHARS = 2000  # long passages are cut at a word boundary to keep the repo small


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0]


def _sample(files: list[str], n: int, key: str) -> list[dict]:
    rows = [obj for f in files for _, obj in iter_raw(f) if isinstance(obj, dict)]
    rows.sort(key=lambda r: bucket(str(r.get(key)) + str(r.get("positive", r.get("text"))), 2**31))
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default="../shared/data")
    ap.add_argument("--out", default="data/demo")
    args = ap.parse_args()
    for domain, n in PAIRS.items():
        out = Path(args.out) / domain
        out.mkdir(parents=True, exist_ok=True)
        src = Path(args.src) / domain
        parts = {"pairs": (resolve_paths(str(src), "pairs"), n, "query")}
        if domain in CORPUS:
            parts["corpus"] = (resolve_paths(str(src), "corpus"), CORPUS[domain], "id")
        for kind, (files, size, key) in parts.items():
            rows = _sample(files, size, key)
            for r in rows:
                for f in ("positive", "text"):
                    if f in r:
                        r[f] = _cut(r[f])
            with gzip.open(out / f"{kind}.jsonl.gz", "wt", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            print(f"{domain}/{kind}: {len(rows)} records from {len(files)} files")
    shutil.copy(Path(args.src) / "SOURCES.md", Path(args.out) / "SOURCES.md")


if __name__ == "__main__":
    main()
