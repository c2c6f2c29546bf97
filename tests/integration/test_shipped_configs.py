"""Every config in configs/ runs as configured on CPU: its dtype, attention backend, gradient checkpointing, LoRA,
R, token limits and ZeRO stage, on a tiny-width model of the same architecture family built from a config (no hub),
for a few steps of both stages and an export; the same texts (some long enough for k >= 2) then embed alike through
GR-CL's own pooling, lbr_ray.Encoder, `lbr eval`'s encoder and the exported sentence-transformers model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lbr_ray.config import load_config, to_dict

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# What a CPU test must change, per shipped config: the hub model becomes a tiny one of the same family, GPUs become
# CPU workers, the real data the demo slice, and the step counts and batches shrink. Nothing else.
CPU_RUN = ["ib_gl.max_steps=2", "ib_gl.batch_size=2", "ib_gl.warmup_steps=1", "ib_gl.log_every=1",
           "ib_gl.checkpoint_every=2", "gr_cl.max_steps=2", "gr_cl.batch_size=4", "gr_cl.warmup_steps=1",
           "gr_cl.log_every=1", "gr_cl.checkpoint_every=2", "gr_cl.eval_every=2", "gr_cl.eval_queries=20",
           "gr_cl.eval_corpus=50", "scaling.num_workers=2", "scaling.use_gpu=false",
           "data.pairs=[data/demo/medical/pairs.jsonl.gz]", "data.corpus=[data/demo/medical/corpus.jsonl.gz]"]
KEPT = {"model": ("dtype", "attn_backend", "lora", "lora_r", "gradient_checkpointing"),
        "bottleneck": ("ratio", "k", "k_min", "k_max", "sink", "pooling"),
        "data": ("max_input_tokens", "max_target_tokens"), "deepspeed": ("zero_stage", "bf16")}


def tiny_qwen2(folder: Path) -> Path:
    """Qwen2 architecture at a tiny width, positions for 512-token inputs and targets, the bundled tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(ROOT / "lbr_ray" / "assets" / "tiny-llama")
    tok.bos_token = None  # like Qwen: no BOS, the sink is EOS
    tok.save_pretrained(folder)
    Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=True).save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    """The bundled 2-layer Llama (SmolLM2 is a Llama): config and tokenizer, random weights."""
    import shutil

    shutil.copytree(ROOT / "lbr_ray" / "assets" / "tiny-llama", folder, dirs_exist_ok=True)
    return folder


FAMILY = {"Qwen/Qwen2.5-0.5B": tiny_qwen2,  # hub name or local base (`make smollm2`) -> a builder of its family
          "models/smollm2-135m": tiny_llama}


def test_every_shipped_config_has_a_cpu_run():
    for name in CONFIGS:
        model = load_config(ROOT / "configs" / name).model.name
        assert model in FAMILY or (ROOT / model).is_dir(), f"configs/{name}: no tiny model of {model}'s family"


@pytest.fixture(scope="module")
def runs(demo_run, tmp_path_factory):
    from lbr_ray.recipes.pipeline import train

    done = {"demo.yaml": demo_run[0]}
    for name in CONFIGS:
        if name in done:
            continue
        cfg_file = ROOT / "configs" / name
        tmp = tmp_path_factory.mktemp(name.replace(".yaml", ""))
        model = load_config(cfg_file).model.name
        over = []
        if model in FAMILY:
            (tmp / "base").mkdir()
            over = [f"model.name={FAMILY[model](tmp / 'base')}", "model.from_scratch=true"]
        cfg = load_config(cfg_file, over + CPU_RUN + [f"run.output={tmp / 'run'}"])
        train(cfg, stage="all")
        done[name] = tmp / "run"
    return done


def long_texts(n_tokens: int) -> list[str]:
    base = ("Chronic kidney disease slowly reduces the filtration rate; anaemia, hypertension and bone disease "
            "follow. ")
    return ["What causes gout?", "insulin", base * 3, base * (n_tokens // 8), base * (n_tokens // 4)]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_as_configured_and_every_embedding_path_agrees(name, runs, tmp_path):
    from lbr_ray.layout import collate_columns
    from lbr_ray.data.ray_data import TokenizeStage2
    from lbr_ray.layout import num_bottleneck
    from lbr_ray.eval.encode import load_encoder
    from lbr_ray.model.encoder import Encoder
    from lbr_ray.recipes.setup import build_model
    from lbr_ray.train.checkpoint import hf_dir

    run = runs[name]
    shipped = load_config(ROOT / "configs" / name)
    cfg = load_config(run / "gr_cl" / "config.yaml")
    for section, keys in KEPT.items():  # the run used the config's own settings
        for key in keys:
            assert getattr(getattr(cfg, section), key) == getattr(getattr(shipped, section), key), f"{section}.{key}"
    model_dir = hf_dir(run)
    texts = long_texts(cfg.data.max_input_tokens)

    # 1. GR-CL's pooling: the training build of the model (dtype, backend, LoRA) on the stage-2 rows
    model, tok = build_model(cfg, init=str(model_dir))
    rows = TokenizeStage2(to_dict(cfg), str(model_dir))({"query": texts, "positive": texts, "negatives": [[]] * 5,
                                                          "_file": ["t"] * 5, "_line": [1] * 5})
    ks = [int((np.asarray(seg) == 2).sum()) for seg in rows["q_seg"]]
    assert max(ks) >= 2 and ks == sorted(ks)  # long texts reach k >= 2
    batch = collate_columns(rows, ["q"], tok.pad_token_id)
    with torch.no_grad():
        training = model.eval().embed(batch["q_ids"], batch["q_seg"], cfg.bottleneck.pooling).float().numpy()
    # 2. lbr_ray.Encoder and 3. the encoder `lbr eval` loads
    encoder = Encoder.from_pretrained(run).encode(texts, batch_size=2)
    evaluated = load_encoder(str(run)).load().encode(texts, batch_size=2)
    tol = 1e-4 if cfg.model.dtype == "float32" else 2e-2  # bf16: LoRA merged vs unmerged, batch shapes
    for other in (encoder, evaluated):
        assert (np.sum(training * other, axis=1) >= 1 - tol).all(), np.sum(training * other, axis=1)
    # 4. the exported sentence-transformers model, with k pinned to the k of the longest texts (--force: a
    #    2-step model's dev R@10 says nothing about which k is best)
    k_long = num_bottleneck(cfg.data.max_input_tokens, cfg.bottleneck)
    folder = tmp_path / "st"
    res = subprocess.run([sys.executable, "-m", "cli.main", "export", str(run), "--to", str(folder), "--k",
                          str(k_long), "--force"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import sys, json; from sentence_transformers import SentenceTransformer; "
            "m = SentenceTransformer(sys.argv[1], device='cpu'); "
            "print(json.dumps(m.encode(json.loads(sys.argv[2]), batch_size=2).tolist())); "
            "print('LBR_IMPORTED', any(k.startswith('lbr_ray') for k in sys.modules))")
    long_ones = [i for i, k in enumerate(ks) if k == k_long]
    assert long_ones
    res = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps([texts[i] for i in long_ones])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    *_, vectors, imported = res.stdout.strip().splitlines()
    assert imported == "LBR_IMPORTED False"
    exported = np.array(json.loads(vectors))
    assert (np.sum(training[long_ones] * exported, axis=1) >= 1 - tol).all(), np.sum(training[long_ones] * exported, 1)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder)  # the same folder is a merged HF causal LM
    from lbr_ray.export.mteb import MTEBModel

    assert np.allclose(MTEBModel(str(run), batch_size=2).encode(texts), encoder, atol=1e-5)
