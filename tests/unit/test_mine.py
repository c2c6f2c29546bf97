"""`lbr mine` without Ray: the margin removes a planted false negative (BM25 and a dense encoder), dev/test positives
never become negatives, a tiny causal LM mines in-process, GR-CL trains on the written negatives, bad input."""
from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from lbr_ray.data.mine import MineOptions, mine
from lbr_ray.data.split import split_of, text_key
from lbr_ray.eval.baselines import BM25Retriever
from lbr_ray.eval.encode import object_ref

ROOT = Path(__file__).resolve().parents[2]
QUERY = "what causes gout flares in the big toe joint"  # train split (asserted below)
POSITIVE = "Gout flares in the big toe joint are caused by uric acid crystals that form in the joint."
TWIN_POSITIVE = "Uric acid crystals in the big toe joint cause gout flares."  # a second positive of QUERY's twin
PLANTED = "Gout flares in the big toe joint are caused by uric acid crystals that grow in the joint."
TEST_QUERY, TEST_POSITIVE = ("what causes gout flares in the big toe",
                             "Flares of gout in the big toe joint come from uric acid crystals in the joint.")
DEV_QUERY, DEV_POSITIVE = ("why do gout flares hit the big toe joint",
                           "The big toe joint flares with gout when uric acid crystals build up in the joint.")
DISTRACTORS = ["The big toe joint can also hurt after an injury or a sprain.",
               "Joint flares in rheumatoid arthritis affect the small joints of the hands.",
               "Uric acid is a waste product that the kidneys filter out of the blood.",
               "Toe injuries are common in runners and usually heal within weeks.",
               "Gout attacks often start at night with sudden pain in a joint.",
               "Pseudogout flares are caused by calcium crystals in the knee joint.",
               "Crystals of cholesterol can form in the gallbladder.",
               "The big toe bears much of the body's weight when walking."]
OTHER_TRAIN = [("how is gout treated", "Gout is treated with anti-inflammatory drugs and drugs that lower uric acid."),
               ("how is gout diagnosed", "Gout is diagnosed by finding uric acid crystals in the fluid of a joint."),
               ("what are symptoms of gout", "A hot, swollen and very painful joint is the typical symptom of gout.")]


def write_domain(folder: Path, given_negatives: list[str] = ()) -> Path:
    """A domain folder: QUERY (+ a case/whitespace twin with a second positive), a test and a dev pair whose
    positives are close to QUERY (and also corpus passages, and a given negative of QUERY), more training pairs,
    and a corpus with the planted near-duplicate of POSITIVE and distractors."""
    assert split_of(QUERY) == "train" and split_of(TEST_QUERY) == "test" and split_of(DEV_QUERY) == "dev"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [{"query": QUERY, "positive": POSITIVE, "type": "qa", "source": "constructed", "license": "CC0",
              "negatives": list(given_negatives)},
             {"query": QUERY.upper().replace(" ", "  "), "positive": TWIN_POSITIVE, "type": "qa"},
             {"query": TEST_QUERY, "positive": TEST_POSITIVE, "type": "qa", "negatives": [POSITIVE]},
             {"query": DEV_QUERY, "positive": DEV_POSITIVE, "type": "qa"}]
    pairs += [{"query": q, "positive": p, "type": "qa"} for q, p in OTHER_TRAIN]
    assert all(split_of(q) == "train" for q, _ in OTHER_TRAIN)
    corpus = [PLANTED, TEST_POSITIVE, DEV_POSITIVE, *DISTRACTORS]
    with gzip.open(folder / "pairs.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(corpus))
    return folder


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.open(path, "rt")]


class WordsEncoder:
    """A deterministic dense encoder: bag of lower-cased words hashed into 512 dimensions (cosine ~ word overlap)."""

    fingerprint = "test-words-encoder-v1"

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), 512), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, zlib.crc32(w.encode()) % 512] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def retrievers(tmp_path) -> dict:
    return {"bm25": (BM25Retriever(), {}), "dense": (object_ref(WordsEncoder()), {"cache_dir": str(tmp_path / "c")})}


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_the_margin_removes_a_planted_false_negative(tmp_path, kind):
    """A near-duplicate of the positive ranks first among the candidates; the relative margin (its score is within
    5% of the positive's) drops it, and without a margin it would be the hardest negative."""
    domain = write_domain(tmp_path / "med")
    method, extra = retrievers(tmp_path)[kind]
    out = {}
    for margin in (0.05, None):
        path = tmp_path / f"{kind}-{margin}.jsonl.gz"
        doc = mine([str(domain)], [str(domain)], method, path, MineOptions(relative_margin=margin, **extra),
                   log=lambda m: None)
        out[margin] = {r["query"]: r for r in read(path)}
        assert doc["train_queries"] == 4 and doc["train_pairs"] == 5  # QUERY and its twin are one query
    with_margin, without = out[0.05][QUERY], out[None][QUERY]
    assert without["negatives"][0] == PLANTED and without["negatives_mined"] == 4
    assert PLANTED not in with_margin["negatives"] and with_margin["negatives_mined"] >= 1
    assert set(with_margin["negatives"][:with_margin["negatives_mined"]]) <= set(DISTRACTORS + [
        p for _, p in OTHER_TRAIN])
    for rec in out[0.05].values():  # no query's own positives, its twin's included, or itself
        if split_of(rec["query"]) == "train":
            own = {text_key(r["positive"]) for r in out[0.05].values() if r["query"].lower().split() ==
                   rec["query"].lower().split()}
            assert not own & {text_key(n) for n in rec["negatives"]} and len(rec["negatives"]) == 4
    assert with_margin["source"] == "constructed" and with_margin["license"] == "CC0"  # provenance kept


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_held_out_positives_never_become_negatives(tmp_path, kind):
    """The test and dev positives are the closest passages to QUERY after its own positives, are corpus passages
    and a negative QUERY's record already had; with no margin to hide them they still never appear, and the
    dev/test records are written unchanged."""
    domain = write_domain(tmp_path / "med", given_negatives=[TEST_POSITIVE, DISTRACTORS[0]])
    method, extra = retrievers(tmp_path)[kind]
    path = tmp_path / "mined.jsonl.gz"
    doc = mine([str(domain)], [str(domain)], method, path, MineOptions(relative_margin=None, negatives=6,
                                                                       range_max=20, **extra), log=lambda m: None)
    held = {text_key(TEST_POSITIVE), text_key(DEV_POSITIVE)}
    records = read(path)
    for rec in records:
        if split_of(rec["query"]) == "train":
            assert not held & {text_key(n) for n in rec["negatives"]}, rec
    assert doc["heldout_positives_left_out_of_pool"] == 2
    assert doc["given_negatives_dropped_as_dev_test_positives"] == 1
    first = records[0]
    assert first["negatives"][0] == DISTRACTORS[0] and first["negatives_mined"] + first["negatives_random"] + 1 == len(
        first["negatives"])  # the given negative kept first, the held-out one dropped
    inputs = [json.loads(line) for line in gzip.open(domain / "pairs.jsonl.gz", "rt")]
    assert [r for r in records if split_of(r["query"]) != "train"] == [
        r for r in inputs if split_of(r["query"]) != "train"]  # dev/test pairs as they were


def test_a_tiny_causal_lm_mines_in_process(lbr, tmp_path):
    """--baseline base (the eval's CausalLMEncoder, encoding cache and FAISS search) with --num-workers 0: no Ray."""
    domain = write_domain(tmp_path / "med")
    out = tmp_path / "mined" / "pairs-base.jsonl.gz"
    code, err = lbr("mine", domain, "--baseline", "base", "--model", ROOT / "lbr_ray" / "assets" / "tiny-llama",
                    "--from-scratch", "--cache-dir", tmp_path / "cache", "--negatives", "3", "--output", out)
    assert code == 0, err
    assert "training pairs got" in lbr.out and "wrote" in lbr.out
    records = read(out)
    manifest = json.loads((out.parent / "pairs-base.mine.json").read_text())
    assert manifest["retriever"].startswith("base ") and manifest["options"]["negatives"] == 3
    assert manifest["command"].startswith("lbr mine ")
    held = {text_key(TEST_POSITIVE), text_key(DEV_POSITIVE)}
    for rec in records:
        if split_of(rec["query"]) == "train":
            assert len(rec["negatives"]) == 3 and not held & {text_key(n) for n in rec["negatives"]}
            assert rec["negatives_mined"] + rec["negatives_random"] == 3


def test_gr_cl_trains_on_the_mined_negatives(tmp_path):
    """The written file through GR-CL's own path: the driver's pair reading, TokenizeStage2 with
    gr_cl.hard_negatives=2 (rows n0, n1 = each pair's first two negatives) and one loss + backward of the objective,
    whose loss grows with the hard negatives in the softmax (same model, same batch)."""
    import torch

    from lbr_ray.config import load_config, to_dict
    from lbr_ray.data import ray_data
    from lbr_ray.layout import collate_columns
    from lbr_ray.recipes.gr_cl import GRCLObjective
    from lbr_ray.recipes.setup import build_model

    domain, path = write_domain(tmp_path / "med"), tmp_path / "mined.jsonl.gz"
    mine([str(domain)], [str(domain)], BM25Retriever(), path, MineOptions(negatives=2), log=lambda m: None)
    model, losses = None, {}
    for hard in (0, 2):
        cfg = load_config("configs/demo.yaml", [f"data.pairs=[{path}]", f"gr_cl.hard_negatives={hard}"])
        rows = ray_data._local_pairs(cfg, "train")
        assert len(rows) == 5 and all(len(r["negatives"]) == 2 for r in rows)
        udf = ray_data.TokenizeStage2(to_dict(cfg), cfg.model.name)
        out = udf(ray_data.as_batch(rows))
        if hard:
            assert [list(x) for x in out["n1_ids"]] == [ids for ids, _ in udf.builder.embed_rows(
                [r["negatives"][1] for r in rows])]
        if model is None:
            model, tok = build_model(cfg)
        model.zero_grad()
        loss = GRCLObjective(model, cfg)(collate_columns(out, ["q", "p"] + [f"n{h}" for h in range(hard)],
                                                         tok.pad_token_id))["loss"]
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)
        losses[hard] = loss.item()
    assert losses[2] > losses[0]  # 10 more candidates in each query's softmax


def one_line(code: int, err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_input_is_one_line(lbr, tmp_path):
    domain = write_domain(tmp_path / "med")
    out = tmp_path / "m.jsonl.gz"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pairs.jsonl").write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": \n')
    one_line(*lbr("mine", broken, "--output", out), f"{broken / 'pairs.jsonl'}:2: broken JSON")
    (broken / "pairs.jsonl").write_text('{"query": "a", "positive": 3}\n')
    one_line(*lbr("mine", broken, "--output", out), f"{broken / 'pairs.jsonl'}:1:", "'positive' must be a string")
    one_line(*lbr("mine", tmp_path / "nope", "--output", out), "nope", "does not exist")
    one_line(*lbr("mine", domain, "--output", tmp_path / "m.jsonl"), "*.jsonl.gz")
    one_line(*lbr("mine", domain / "pairs.jsonl.gz", "--output", domain / "pairs.jsonl.gz"), "one of the input")
    one_line(*lbr("mine", domain, "--range-min", "5", "--range-max", "3", "--output", out), "--range-min 5")
    one_line(*lbr("mine", domain, "--negatives", "9", "--range-max", "5", "--output", out), "--negatives 9")
    one_line(*lbr("mine", domain, "--baseline", "base", "--output", out), "--baseline base needs --model")
    one_line(*lbr("mine", domain, "--model", tmp_path, "--output", out), str(tmp_path))
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    (only_test / "pairs.jsonl").write_text(json.dumps({"query": TEST_QUERY, "positive": TEST_POSITIVE}) + "\n")
    one_line(*lbr("mine", only_test, "--output", out), "no pair", "train split")
    assert not out.exists()
