"""The LM stage's mixture: sampled counts follow the weights; bad mixtures stop with one line (no Ray)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbr_ray.config import load_config
from lbr_ray.data.mixture import copies, mixture_factors, source_files
from lbr_ray.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


def test_sampled_counts_follow_the_weights():
    sizes, weights = [3000, 1000, 500], (1.0, 1.0, 2.0)
    factors = mixture_factors(sizes, weights)
    counts = [sum(copies(f"source {i} doc {d}", f, seed=0) for d in range(n))
              for i, (n, f) in enumerate(zip(sizes, factors))]
    total = sum(sizes)
    for count, w in zip(counts, weights):  # within 3 % of the weight's share of an epoch of sum(sizes) documents
        assert abs(count / total - w / sum(weights)) < 0.03, counts
    assert mixture_factors(sizes, ()) == [1.0, 1.0, 1.0]  # no weights: the data as it comes
    assert copies("x", 2.0, 0) == 2 and copies("x", 1.0, 5) == 1


def test_source_files_split_pairs_and_corpus():
    pairs, corpus = source_files(str(ROOT / "data/demo/medical"))
    assert [Path(f).name for f in pairs] == ["pairs.jsonl.gz"] and [Path(f).name for f in corpus] == ["corpus.jsonl.gz"]
    pairs, corpus = source_files(str(ROOT / "data/demo/biology"))
    assert pairs and not corpus


def _lbr(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cli.main", "train", "--stage", "lm", "--config",
                           "configs/demo.yaml", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("sets, match", [
    (["lm.sources=[data/demo/code, /no/such/folder]"], "/no/such/folder"),
    (["lm.sources=[data/demo/code, data/demo/biology]", "lm.weights=[1, 0]"], "lm.weights must be positive"),
    (["lm.sources=[data/demo/code]", "lm.weights=[1, 2]"], "lm.weights has 2 values for 1 lm.sources"),
    ([], "needs lm.sources"),
])
def test_bad_mixture_is_one_line_and_exit_2(sets, match):
    res = _lbr(*[a for s in sets for a in ("--set", s)])
    assert res.returncode == 2, res.stderr[-2000:]
    assert match in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_lm_stage_on_a_folder_without_text(tmp_path):
    (tmp_path / "README.txt").write_text("not a data file")
    res = _lbr("--set", f"lm.sources=[{tmp_path}]", "--output", str(tmp_path / "run"))
    assert res.returncode == 2 and "no pairs* or corpus* text files" in res.stderr, res.stderr[-2000:]
    with pytest.raises(DataError):
        source_files(str(tmp_path))


def test_weights_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.yaml", ["lm.sources=[a, b]", "lm.weights=[-1, 2, 3]", "lm.seq_len=1"])
    text = str(info.value)
    assert "positive" in text and "3 values for 2" in text and "seq_len" in text
