"""`lbr plan`: ZeRO arithmetic, the fit verdict and its advice, the one-line refusal at `lbr train` start."""
from __future__ import annotations

import json
import subprocess
import sys
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


def test_train_refuses_a_plan_that_cannot_fit(qwen_dir, tmp_path):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "train", "--config", "configs/demo.yaml", "--output",
                          str(tmp_path / "run"), "--set", f"model.name={qwen_dir}", "--set", "model.from_scratch=true",
                          "--set", "scaling.gpu_memory=2GiB", "--set", "data.corpus=[]"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "ib_gl needs about" in line and "more than 2 GiB" in line and "lbr plan" in line
    assert not (tmp_path / "run").exists()


def test_plan_command(qwen_dir):
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "plan", "--config", "configs/qwen2.5-0.5b-medical.yaml",
                          "--set", f"model.name={qwen_dir}", "--gpu-memory", "80GiB", "--num-workers", "4"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ib_gl:" in out.stdout and "gr_cl:" in out.stdout and "fits in 80 GiB" in out.stdout
