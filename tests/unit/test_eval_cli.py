"""`lbr eval` options, bad input (one clear error each) and the report files, without Ray (--num-workers 0)."""
import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from lbr_ray.errors import ConfigError, LbrError
from lbr_ray.eval.encode import EncoderError
from lbr_ray.eval.sets import EvalSetError

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "data" / "demo")
runner = CliRunner()
SMALL = ["--data-root", DEMO, "--num-workers", "0", "--max-queries", "20", "--max-corpus", "100"]


def _invoke(*args):
    return runner.invoke(app, ["eval", *args])


def test_bm25_writes_all_reports(tmp_path):
    res = _invoke("--baseline", "bm25", "--domains", "medical,chemistry", *SMALL, "--output", str(tmp_path))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["domains"]) == {"medical", "chemistry"} and report["method"] == "bm25"
    with open(tmp_path / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["domain"] == "medical" and rows[0]["group"] == "all"
    assert {"recall@10", "ndcg@10", "mrr@10", "recall@100", "n_queries", "corpus_size"} <= set(rows[0])
    md = (tmp_path / "report.md").read_text()
    assert "| medical |" in md and "type:term_ctx" in md and "NDCG@10" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_draws_the_difficulties_that_have_queries(tmp_path):
    """A domain whose non-hard queries are all 'moderate' (medical's HPO term definitions) gets moderate bars, and a
    difficulty no domain has (here 'easy') gets no empty bar slots."""
    from lbr_ray.eval.report import bar_chart

    def row(group, r):
        return {"group": group, "recall@10": r, "ndcg@10": r / 2}

    results = {"model": "m", "domains": {"medical": {"rows": [row("all", 0.9), row("hard", 0.8), row("moderate", 1.0)]},
                                         "biology": {"rows": [row("all", 0.7), row("moderate", 0.7)]}}}
    assert bar_chart(results, tmp_path / "r.png") == [
        "all R@10", "all NDCG@10", "hard R@10", "hard NDCG@10", "moderate R@10", "moderate NDCG@10"]
    assert (tmp_path / "r.png").stat().st_size > 5000


@pytest.mark.parametrize("args,error,match", [
    (["--baseline", "bm25", "--domains", "physics"], EvalSetError, "unknown domain 'physics'"),
    (["--baseline", "nope"], ConfigError, "--baseline must be one of"),
    ([], ConfigError, "--model is required"),
    (["--model", DEMO], EncoderError, "not an lbr-ray or sentence-transformers model"),
    (["--baseline", "base"], ConfigError, "--model is required"),
    (["--baseline", "bm25", "--data-root", "/no/such/folder"], LbrError, "is not a folder"),
])
def test_bad_input_is_one_clear_error(args, error, match):
    res = _invoke(*SMALL[2:], *args) if "--data-root" in args else _invoke(*SMALL, *args)
    assert isinstance(res.exception, error), res.output
    assert match in str(res.exception)


def test_console_entry_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", "eval", "--baseline", "bm25",
                           "--domains", "physics", "--data-root", DEMO], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown domain 'physics'") and "Traceback" not in proc.stderr


def test_eval_uses_the_split_recorded_in_the_model_card(tmp_path):
    """Issue 13.4: a model trained with a custom data.split was scored on the default test queries, some of which
    it had trained on. The card records the split; `lbr eval` uses it unless --split says otherwise."""
    from lbr_ray.config import replace
    from lbr_ray.config.schema import LbrConfig, ModelConfig, SplitConfig
    from lbr_ray.data.split import split_of
    from lbr_ray.eval.sets import build_eval_set
    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.train.checkpoint import export_hf

    cfg = replace(LbrConfig(), data={"split": SplitConfig(test_buckets=(5,), dev_buckets=(6,))},
                  bottleneck={"k": 2, "k_max": 2})
    model, tok = BottleneckLM.build(ModelConfig(from_scratch=True, lora=False), cfg.bottleneck)
    export_hf(model, tok, cfg, "gr_cl", tmp_path / "model")
    res = _invoke("--model", str(tmp_path / "model"), "--domains", "medical", *SMALL, "--output", str(tmp_path / "r"))
    assert res.exit_code == 0, res.output
    assert "test queries from the model's training split" in res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["options"]["split"]["test_buckets"] == [5]
    custom = build_eval_set(DEMO, "medical", cfg.data.split, max_queries=20, max_corpus=100)
    assert all(split_of(q, cfg.data.split) == "test" for q in custom.queries)
    assert report["domains"]["medical"]["rows"][0]["n_queries"] == len(custom.queries)
    res = _invoke("--model", str(tmp_path / "model"), "--domains", "medical", *SMALL, "--split", "default",
                  "--output", str(tmp_path / "d"))
    assert json.loads((tmp_path / "d" / "report.json").read_text())["options"]["split"]["test_buckets"] == [0]


def test_index_auto_end_to_end_scores_like_exact_search(tmp_path):
    """Issue 21.4: `lbr eval --index auto` encoded and searched, then failed (KeyError 'scores'); only its search
    helper was tested. Through the CLI on a small set: it ends, and where it keeps exact search (a 100-passage
    corpus) it scores what --index Flat scores."""
    from lbr_ray.config.schema import LbrConfig, ModelConfig
    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.train.checkpoint import export_hf

    cfg = LbrConfig()
    model, tok = BottleneckLM.build(ModelConfig(from_scratch=True, lora=False), cfg.bottleneck)
    export_hf(model, tok, cfg, "gr_cl", tmp_path / "model")
    rows = {}
    for index in ("Flat", "auto"):
        res = _invoke("--model", str(tmp_path / "model"), "--domains", "medical", *SMALL, "--index", index,
                      "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / index))
        assert res.exit_code == 0, res.output
        rows[index] = json.loads((tmp_path / index / "report.json").read_text())["domains"]["medical"]
    assert rows["auto"]["used"] in ("ann", "exact") and rows["auto"]["ann_recall@10"] == 1.0
    assert rows["auto"]["rows"] == rows["Flat"]["rows"]


def test_console_has_no_hf_progress_bars(tmp_path):
    """Loading a model prints no "Loading weights" bar through `lbr` (framework chatter), but does
    when the user asks for them (HF_HUB_DISABLE_PROGRESS_BARS=0)."""
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    args = ["eval", "--baseline", "minilm", "--domains", "medical", "--data-root", DEMO, "--num-workers", "0",
            "--max-queries", "5", "--max-corpus", "20", "--output", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    for cache, extra_env, bars in (("a", {}, False), ("b", {"HF_HUB_DISABLE_PROGRESS_BARS": "0"}, True)):
        out = subprocess.run([sys.executable, "-c", code, *args, "--cache-dir", str(tmp_path / cache)],
                             capture_output=True, text=True, timeout=300, env={**env, **extra_env}, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("Loading weights" in out.stdout + out.stderr) == bars, out.stderr[-2000:]
