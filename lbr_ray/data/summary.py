"""What one pass over the inputs finds (split sizes, held-out positives, bad records), read in this process (no
Ray): small local data is read here once, by the preflight's record check, instead of a second pass through Ray
Data after Ray has started (`lbr_ray.data.ray_data.summarize` keeps the Ray Data pass for large or remote data)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lbr_ray.errors import DataError

IN_PROCESS_BYTES = 64 << 20  # local data up to this size (on disk) is read in the driver, not through Ray Data


@dataclass
class DataSummary:
    """What one streaming pass over the inputs found."""

    pairs_by_split: Counter = field(default_factory=Counter)
    corpus: int = 0
    bad_by_file: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    heldout_keys: set[str] = field(default_factory=set)  # text keys of dev/test positives

    @property
    def bad(self) -> int:
        return sum(self.bad_by_file.values())

    def count_pair(self, split: str, held: str) -> None:
        """One good pair, as `split.pair_split` gives it."""
        self.pairs_by_split[split] += 1
        if held:
            self.heldout_keys.add(held)

    def require_training_pairs(self, specs) -> None:
        """Stop (DataError) when nothing is left to train on: every record skipped, or none in the train split."""
        if self.pairs_by_split.get("train", 0) > 0:
            return
        where = ", ".join(specs)
        if self.bad and not sum(self.pairs_by_split.values()):
            raise DataError(where, None, f"every pairs record was skipped as bad ({self.bad}; data.on_bad_record="
                                         f"skip), e.g. {self.bad_examples[0]}")
        raise DataError(where, None, f"no training pairs (split: {dict(self.pairs_by_split)}); add data or check "
                                     "data.types / data.split")

    def lines(self) -> list[str]:
        out = [f"pairs: {dict(self.pairs_by_split)}; corpus passages: {self.corpus}"]
        if self.bad:
            out.append(f"skipped {self.bad} bad records: " + ", ".join(f"{f}: {n}" for f, n in self.bad_by_file.items()))
            out += [f"  e.g. {e}" for e in self.bad_examples]
        return out


def input_files(cfg, with_corpus: bool = True) -> dict[str, str]:
    """{file: kind} of the config's pairs (and corpus) inputs."""
    from lbr_ray.data.readers import resolve_paths

    kinds = ("pairs", "corpus") if with_corpus else ("pairs",)
    return {path: kind for kind in kinds if getattr(cfg.data, kind)
            for path in resolve_paths(getattr(cfg.data, kind), kind)}


def small_local(files: dict[str, str], limit: int | None = None) -> bool:
    """All files local and together at most `limit` (default IN_PROCESS_BYTES) bytes on disk."""
    from lbr_ray.storage import is_remote

    limit = IN_PROCESS_BYTES if limit is None else limit
    return not any(is_remote(f) for f in files) and sum(Path(f).stat().st_size for f in files) <= limit


def summarize_files(cfg, files: dict[str, str]) -> DataSummary:
    """Read every record of `files` once in this process: the first bad one raises DataError(file, line)
    (data.on_bad_record=error) or is counted (skip); the same figures as the Ray Data pass."""
    from lbr_ray.data.readers import BadRecords, iter_records
    from lbr_ray.data.split import pair_split

    summary, bad = DataSummary(), BadRecords()
    for path, kind in files.items():
        for rec in iter_records(path, kind, cfg.data.on_bad_record, bad, cfg.data.max_record_bytes):
            if kind == "corpus":
                summary.corpus += 1
                continue
            summary.count_pair(*pair_split(rec["query"], rec["positive"], cfg.data.split))
    summary.bad_by_file, summary.bad_examples = Counter(bad.counts), list(bad.examples)
    return summary
