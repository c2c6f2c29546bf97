"""What each stage trains on (held-out positives stay out) and how --match-compute estimates tokens; no Ray cluster."""
from __future__ import annotations

import pytest

from lbr_ray.config import load_config, to_dict
from lbr_ray.data import ray_data
from lbr_ray.data.readers import read_all
from lbr_ray.data.split import split_of, text_key
from lbr_ray.layout import SequenceBuilder
from lbr_ray.model.bottleneck import load_tokenizer
from lbr_ray.recipes.pipeline import mean_row_tokens


def test_held_out_positives_never_reach_stage_1_or_hard_negatives():
    """Issue 13.5: a dev/test positive that is also a training pair's positive (or a hard negative) was trained on."""
    held = {text_key("the answer to a test query")}
    row = {"query": "a training query", "positive": "the  answer to a test query"}  # same text up to whitespace
    assert ray_data.pair_texts(row, held) == [{"text": "a training query"}]
    assert not ray_data.keeps_pair_row(row, held) and ray_data.keeps_pair_row({"positive": "other"}, held)
    assert not ray_data.keeps_corpus_row({"text": "the answer to a test query", "_error": ""}, held)


def test_hard_negatives_that_are_held_out_positives_are_dropped(tmp_path):
    cfg = load_config("configs/demo.yaml", ["gr_cl.hard_negatives=1"])
    udf = ray_data.TokenizeStage2(to_dict(cfg), cfg.model.name, {text_key("leaked")})
    batch = {"query": ["q"], "positive": ["p"], "negatives": [["leaked", "fine negative"]], "_file": ["f"],
             "_line": [3]}
    tok = load_tokenizer(cfg.model.name, cfg.bottleneck.k_max)
    expect = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    assert list(udf(batch)["n0_ids"][0]) == expect.embed_rows(["fine negative"])[0][0]
    from lbr_ray.errors import DataError

    with pytest.raises(DataError, match="f:3: .*only dev/test positives as negatives"):
        udf({**batch, "negatives": [["leaked"]]})


def test_match_compute_measures_the_rows_stage_1_builds():
    """Issue 13.6: `ib_gl.target: pair` was estimated as continuation rows of positives only."""
    cfg = load_config("configs/demo.yaml", ["run.variant=cl", "ib_gl.target=pair"])
    per_row1, _ = mean_row_tokens(cfg, sample=100_000)  # every training pair
    tok = load_tokenizer(cfg.model.name, cfg.bottleneck.k_max)
    sb = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)
    train = [r for r in read_all(cfg.data.pairs, "pairs") if split_of(r["query"], cfg.data.split) == "train"]
    rows = sb.pair_rows([r["query"] for r in train], [r["positive"] for r in train])
    assert per_row1 == pytest.approx(sum(len(ids) for ids, _ in rows) / len(rows))
    # target self: queries, positives and corpus passages (the old estimate sampled positives only)
    cfg = load_config("configs/demo.yaml", ["run.variant=cl", "ib_gl.target=self"])
    per_row1, _ = mean_row_tokens(cfg, sample=100_000)
    texts = [t for r in train for t in (r["query"], r["positive"])]
    texts += [r["text"] for r in read_all(cfg.data.corpus, "corpus")]
    rows = sb.stage1_rows(texts, "self", ib=True)
    assert per_row1 == pytest.approx(sum(len(ids) for ids, _ in rows) / len(rows))


def test_stage_2_rows_carry_text_keys_to_the_loss():
    """Duplicate positives get equal keys, which collate hands to InfoNCE (which masks them as negatives)."""
    from lbr_ray.layout import collate_columns

    cfg = load_config("configs/demo.yaml")
    udf = ray_data.TokenizeStage2(to_dict(cfg), cfg.model.name)
    out = udf({"query": ["a", "b", "c"], "positive": ["same text", "same  text", "other"], "negatives": [[], [], []],
               "_file": ["f"] * 3, "_line": [1, 2, 3]})
    batch = collate_columns(out, ["q", "p"], pad_id=0)
    keys = batch["p_key"].tolist()
    assert keys[0] == keys[1] != keys[2] and len(set(batch["q_key"].tolist())) == 3


def test_the_driver_parses_each_data_file_once_per_run(monkeypatch, tmp_path):
    """Issue 22: the summary, stage 1's rows, the dev set, stage 2's pairs and --match-compute each read the data;
    the first read parses each file, later ones replay it, and a changed file is parsed again."""
    import gzip
    import shutil

    from lbr_ray.data import readers
    from lbr_ray.data.summary import input_files, summarize_files
    from lbr_ray.eval.sets import dev_eval_set

    for name in ("pairs.jsonl.gz", "corpus.jsonl.gz"):
        shutil.copy(f"data/demo/medical/{name}", tmp_path / name)
    cfg = load_config("configs/demo.yaml", [f"data.pairs=[{tmp_path / 'pairs.jsonl.gz'}]",
                                            f"data.corpus=[{tmp_path / 'corpus.jsonl.gz'}]"])
    parsed = []
    real = readers._parse
    monkeypatch.setattr(readers, "_parse", lambda path, *a: parsed.append(path) or real(path, *a))
    summary = summarize_files(cfg, input_files(cfg))
    rows1 = ray_data.stage1_rows(cfg, summary.heldout_keys)
    dev = dev_eval_set(cfg)
    rows2 = ray_data._local_pairs(cfg, "train")
    mean_row_tokens(cfg, summary.heldout_keys, sample=8)
    assert sorted(parsed) == sorted(str(tmp_path / n) for n in ("pairs.jsonl.gz", "corpus.jsonl.gz"))
    assert len(rows1) > len(rows2) == summary.pairs_by_split["train"] and len(dev.queries) == 200
    with gzip.open(tmp_path / "pairs.jsonl.gz", "at") as fh:  # the file changes: it is parsed again
        fh.write('{"query": "one more question?", "positive": "one more answer", "type": "qa", "source": "t"}\n')
    assert len(ray_data._local_pairs(cfg, "train")) + len(ray_data._local_pairs(cfg, "dev")) + \
        len(ray_data._local_pairs(cfg, "test")) == sum(summary.pairs_by_split.values()) + 1
    assert len(parsed) == 3
