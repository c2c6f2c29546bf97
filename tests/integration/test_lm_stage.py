"""`lbr train --stage lm`: a few steps of pre-training on a two-domain mixture with a tokenizer trained on it; the
result is an HF model + tokenizer that a config can name as model.name."""
from __future__ import annotations

import json

import pytest

from lbr_ray.config import load_config

pytestmark = pytest.mark.integration


def test_lm_stage_pretrains_a_base_any_config_can_use(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.recipes.pipeline import train

    cfg = load_config("configs/demo.yaml", [
        "lm.sources=[data/demo/code, data/demo/biology]", "lm.weights=[2, 1]", "lm.tokenizer_vocab=600",
        "lm.seq_len=128", "lm.batch_size=8", "lm.max_steps=6", "lm.warmup_steps=1", "lm.log_every=2",
        "lm.checkpoint_every=6", f"run.output={tmp_path}"])
    res = train(cfg, stage="lm")["lm"]
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert all(m.get("pad_frac", 0) < 0.2 for m in res.metrics if "loss" in m)  # packed rows: little padding
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = summary["mixture"]
    assert set(parts) == {"data/demo/code", "data/demo/biology"}
    n_code, n_bio = (parts[s]["documents"] * parts[s]["factor"] for s in ("data/demo/code", "data/demo/biology"))
    assert n_code / (n_code + n_bio) == pytest.approx(2 / 3, abs=0.01)
    model_dir = tmp_path / "lm" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert 600 <= len(tok) <= 600 + cfg.bottleneck.k_max  # the mixture's own tokenizer (+ bottleneck tokens)
    AutoModelForCausalLM.from_pretrained(model_dir)
    named = load_config("configs/demo.yaml", [f"model.name={model_dir}", "model.from_scratch=false"])
    model, _ = BottleneckLM.build(named.model, named.bottleneck)  # the base as any config's model.name
    assert model.lm.get_input_embeddings().weight.shape[0] == len(tok)
