"""Export of a model with R-based k: the fixed k is measured on the run's dev set, the loss is reported, a loss above
--max-loss is refused unless forced, and the exported sentence-transformers model scores what was measured."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lbr_ray.config import load_config, save_config
from lbr_ray.errors import LbrError

# k = clamp(ceil(n / 16), 1, 4) over inputs of up to 48 tokens: k in {1, 2, 3} by length
SMALL = ["data.max_input_tokens=48", "data.max_target_tokens=48", "bottleneck.ratio=16", "bottleneck.k_max=4",
         "gr_cl.eval_queries=40", "gr_cl.eval_corpus=150"]


def fake_run(folder, overrides):
    """A run folder as `lbr train` leaves it (<run>/gr_cl/model + <run>/gr_cl/config.yaml), random weights."""
    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.train.checkpoint import export_hf

    cfg = load_config("configs/demo.yaml", overrides + [f"run.output={folder}"])
    model, tok = BottleneckLM.build(cfg.model, cfg.bottleneck, seed=0)
    export_hf(model, tok, cfg, "gr_cl", folder / "gr_cl" / "model")
    save_config(cfg, folder / "gr_cl" / "config.yaml")
    return folder, cfg


@pytest.fixture(scope="module")
def r_run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("rk"), SMALL)


@pytest.fixture(scope="module")
def best_export(r_run, tmp_path_factory):
    from lbr_ray.export.sentence_transformers import export

    out = tmp_path_factory.mktemp("st") / "best"
    lines = []
    export(r_run[0], out, max_loss=1.0, log=lines.append)
    return out, json.loads((out / "lbr_ray.json").read_text())["export_k_choice"], lines


def recall_at_10(encode, dev) -> float:
    from lbr_ray.eval.metrics import dev_metrics, retrieve_exact

    q, d = encode(dev.queries), encode(dev.doc_texts)
    return dev_metrics(retrieve_exact(q, d, k=10)[1], dev.qrels, ks=(10,))["recall@10"]


def test_export_measures_every_fixed_k_against_the_per_text_k(r_run, best_export):
    from lbr_ray.eval.sets import dev_eval_set
    from lbr_ray.model.encoder import Encoder

    folder, cfg = r_run
    out, choice, lines = best_export
    fixed = {int(k): v for k, v in choice["dev_recall@10_fixed_k"].items()}
    assert sorted(fixed) == [1, 2, 3, 4] and not choice["exact"]
    assert choice["k"] == max(sorted(fixed), key=lambda k: (fixed[k], -k))  # the best fixed k is exported
    assert choice["dev_recall@10_loss"] == pytest.approx(choice["dev_recall@10_per_text_k"] - fixed[choice["k"]])
    dev = dev_eval_set(cfg)
    assert choice["dev_queries"] == len(dev.queries) == 40
    per_text = recall_at_10(lambda t: Encoder.from_pretrained(folder).encode(t), dev)  # the run's own model
    assert choice["dev_recall@10_per_text_k"] == pytest.approx(per_text)
    assert any("per-text k" in line for line in lines) and any("<- chosen" in line for line in lines)
    assert json.loads((out / "lbr_ray.json").read_text())["k"] == choice["k"]


def test_one_pass_gives_every_fixed_k_and_the_per_text_k(r_run):
    import dataclasses

    import numpy as np

    from lbr_ray.export.fixed_k import embeddings_by_k
    from lbr_ray.model.encoder import Encoder

    enc = Encoder.from_pretrained(r_run[0])
    texts = ["insulin", "What are the symptoms of diabetes?", "A long passage about kidneys. " * 20]
    own, fixed = embeddings_by_k(enc, texts, batch_size=2)
    assert (np.sum(own * enc.encode(texts), axis=1) > 0.9999).all()  # per-text k, as the run embeds
    for j in range(4):
        exact = Encoder(enc.model, enc.tokenizer, dataclasses.replace(enc.bottleneck, k=j + 1), 48).encode(texts)
        assert (np.sum(fixed[j] * exact, axis=1) > 0.9999).all(), j


def test_exported_model_scores_what_export_measured(r_run, best_export):
    from sentence_transformers import SentenceTransformer

    from lbr_ray.eval.sets import dev_eval_set

    out, choice, _ = best_export
    st = SentenceTransformer(str(out), device="cpu")
    value = recall_at_10(lambda t: st.encode(t, batch_size=32), dev_eval_set(r_run[1]))
    assert value == pytest.approx(choice["dev_recall@10_fixed_k"][str(choice["k"])], abs=1.01 / 40)


def test_loss_above_threshold_is_refused_unless_forced(r_run, best_export, tmp_path):
    from lbr_ray.export.sentence_transformers import export

    _, choice, _ = best_export
    fixed = {int(k): v for k, v in choice["dev_recall@10_fixed_k"].items()}
    worst = min(sorted(fixed), key=lambda k: (fixed[k], k))
    loss = choice["dev_recall@10_per_text_k"] - fixed[worst]
    with pytest.raises(LbrError, match=f"fixed k={worst} loses"):
        export(r_run[0], tmp_path / "refused", k=worst, max_loss=loss - 1e-6, log=lambda _: None)
    assert not (tmp_path / "refused").exists()
    out = export(r_run[0], tmp_path / "forced", k=worst, max_loss=loss - 1e-6, force=True, log=lambda _: None)
    assert json.loads((out / "lbr_ray.json").read_text())["k"] == worst
    export(r_run[0], tmp_path / "allowed", k=worst, max_loss=loss + 1e-6, log=lambda _: None)


def test_fixed_k_model_exports_exactly_without_measuring(tmp_path):
    from lbr_ray.export.sentence_transformers import export

    folder, _ = fake_run(tmp_path / "run", SMALL + ["bottleneck.k=2"])
    (folder / "gr_cl" / "config.yaml").unlink()  # no dev set: nothing may need measuring
    out = export(folder, tmp_path / "st", log=lambda _: None)
    card = json.loads((out / "lbr_ray.json").read_text())
    assert card["k"] == 2 and card["export_k_choice"] == {"exact": True}


def test_cli_refusal_is_one_line_exit_2(r_run, tmp_path):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "export", str(r_run[0]), "--to", str(tmp_path / "x"),
                          "--k", "4", "--max-loss", "-1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "loses" in out.stderr and "--force" in out.stderr and "Traceback" not in out.stderr
    assert "fixed k=4" in out.stdout  # the measured table was printed before the refusal

