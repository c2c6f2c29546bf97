"""`lbr plan`: ZeRO arithmetic, the fit verdict and its advice, the one-line refusal at `lbr train` start."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbr_ray.config import load_config
from lbr_ray.plan import GIB, Shape, model_state_bytes, parse_bytes, plan

ROOT = Path(__file__).resolve().parents[2]
QWEN05 = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
              tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """Qwen2.5-0.5B's config (no weights), next to the bundled tokenizer."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("qwen05")
    (d / "config.json").write_text(json.dumps(QWEN05))
    AutoTokenizer.from_pretrained(ROOT / "lbr_ray/assets/tiny-llama").save_pretrained(d)
    return d


def test_zero_stages_split_what_the_paper_says():
    s = Shape(params=1000, trainable=1000, hidden=1, kv=1, inter=1, layers=1, vocab=1)
    z = {stage: model_state_bytes(s, 2, True, stage, 4) for stage in (0, 1, 2, 3)}
    assert z[0] == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert z[1]["optimizer"] == 3000 and z[1]["gradients"] == 2000
    assert z[2]["gradients"] == 500 and z[2]["weights"] == 2000
    assert z[3] == {"weights": 500, "gradients": 500, "optimizer": 3000}
    assert model_state_bytes(s, 2, True, 2, 4, offload=True)["optimizer"] == 0


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("80GB") == 80e9 and parse_bytes("24") == 24 * GIB
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_qwen05_full_finetune_fits_80g_not_8g_and_advice_fits(qwen_dir):
    cfg = load_config(ROOT / "configs/qwen2.5-0.5b-medical.yaml",
                      [f"model.name={qwen_dir}", "model.lora=false", "scaling.use_gpu=true"])
    ib, gr = plan(cfg, gpu_bytes=80 * GIB)
    assert ib.fits and gr.fits and 0.4e9 < ib.parts["weights"] / 2 < 0.6e9  # ~494M parameters, bf16
    assert ib.tokens_per_step == cfg.ib_gl.batch_size * cfg.scaling.num_workers * cfg.ib_gl.grad_accum * (
        1 + cfg.data.max_input_tokens + cfg.bottleneck.k_max + cfg.data.max_target_tokens)
    small = plan(cfg, gpu_bytes=6 * GIB)[0]
    assert small.fits is False and small.advice
    lora = plan(load_config(ROOT / "configs/qwen2.5-0.5b-medical.yaml", [f"model.name={qwen_dir}"]))[0]
    assert lora.parts["optimizer"] < ib.parts["optimizer"] / 20  # LoRA: ~1% trainable


def test_packed_rows_are_planned_at_pack_length(qwen_dir):
    """Issue 21.2: the IB-GL row was always 1 + max_input + k_max + max_target tokens, so the GPU suite's packed
    2,048-token rows were planned at 1,041 tokens (26.5 GiB, 8,328 tokens/step) and pack_length 8,192 the same."""
    plans = {n: plan(load_config(ROOT / "benchmarks/gpu_suite.yaml", [f"model.name={qwen_dir}",
                                                                         f"ib_gl.pack_length={n}"]), ("ib_gl",))[0]
             for n in (2048, 8192)}
    assert plans[2048].tokens_per_step == 8 * 2048 and plans[8192].tokens_per_step == 8 * 8192
    assert 43.5 < plans[2048].total / GIB < 44.5  # rows really 2,048 tokens long: ~44.1 GiB
    for part in ("activations", "logits"):  # the row-length terms scale with the packed rows
        assert plans[8192].parts[part] == pytest.approx(4 * plans[2048].parts[part], rel=1e-3)
    unpacked = plan(load_config(ROOT / "benchmarks/gpu_suite.yaml", [f"model.name={qwen_dir}", "ib_gl.pack=false"]),
                    ("ib_gl",))[0]
    assert unpacked.tokens_per_step == 8 * 1041 and 26 < unpacked.total / GIB < 27


def test_train_refuses_a_plan_that_cannot_fit(qwen_dir, tmp_path, lbr):
    code, err = lbr("train", "--config", "configs/demo.yaml", "--output", tmp_path / "run", "--set",
                    f"model.name={qwen_dir}", "--set", "model.from_scratch=true", "--set", "scaling.gpu_memory=2GiB",
                    "--set", "data.corpus=[]")
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "ib_gl needs about" in err and "more than 2 GiB" in err and "lbr plan" in err
    assert not (tmp_path / "run").exists()


def test_plan_command(qwen_dir, lbr):
    code, _ = lbr("plan", "--config", "configs/qwen2.5-0.5b-medical.yaml", "--set", f"model.name={qwen_dir}",
                  "--gpu-memory", "80GiB", "--num-workers", "4")
    assert code == 0 and "ib_gl:" in lbr.out and "gr_cl:" in lbr.out and "fits in 80 GiB" in lbr.out
    code, _ = lbr("plan", "--config", "configs/qwen2.5-0.5b-medical.yaml", "--set", f"model.name={qwen_dir}",
                  "--set", "model.lora=false", "--gpu-memory", "4GiB")
    assert code == 1 and "does NOT fit in 4 GiB" in lbr.out and "  - " in lbr.out  # with what would fit


def test_gradcache_plan_holds_a_chunk_of_activations_and_the_whole_batch_of_logits(qwen_dir):
    """gr_cl.cache_chunk: activations (and IB-loss logits) of one chunk of rows, the contrastive loss of the whole
    batch, the same tokens per step; a batch too large for the GPU fits with it, and the advice says so."""
    base = [f"model.name={qwen_dir}", "model.gradient_checkpointing=false", "scaling.use_gpu=true"]
    load = lambda *extra: load_config(ROOT / "configs/qwen2.5-0.5b-medical.yaml", base + list(extra))  # noqa: E731
    plain = plan(load(), stages=("gr_cl",), gpu_bytes=24 * GIB)[0]
    cached = plan(load("gr_cl.cache_chunk=8"), stages=("gr_cl",), gpu_bytes=24 * GIB)[0]
    rows = 2 * load().gr_cl.batch_size  # queries and positives
    assert cached.parts["activations"] == pytest.approx(plain.parts["activations"] * 8 / rows)
    assert cached.parts["contrastive"] == plain.parts["contrastive"] > 0
    assert cached.tokens_per_step == plain.tokens_per_step
    full = plan(load("model.lora=false", "deepspeed.zero_stage=3"), stages=("gr_cl",))[0]
    full_cached = plan(load("model.lora=false", "deepspeed.zero_stage=3", "gr_cl.cache_chunk=8"), stages=("gr_cl",))[0]
    assert full_cached.parts["gradients"] == full.parts["gradients"] * 4  # whole until the reduction, 4 workers
    assert plain.fits is False and cached.fits
    assert any(a.startswith("gr_cl.cache_chunk=") for a in plain.advice)
    bigger = plan(load("gr_cl.batch_size=1024", "gr_cl.symmetric=true"), stages=("gr_cl",))[0]
    # 1024 queries x (4096 gathered positives + 4096 gathered queries) fp32 logits, softmax, gradient; embeddings
    assert bigger.parts["contrastive"] == 4 * 3 * 1024 * 8192 + 4 * 2 * (2 * 1024 + 4096) * 896
    gen = plan(load("gr_cl.cache_chunk=8", "gr_cl.gen_weight=0.1"), stages=("gr_cl",))[0]
    assert gen.parts["logits"] == pytest.approx(8 * 512 * 151952 * (2 + 4 + 4))  # the IB loss of a chunk
