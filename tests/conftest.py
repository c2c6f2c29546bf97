"""Shared fixtures: tiny models built from configs (Llama from the bundled folder, Qwen2 from a config), demo data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
TINY = ROOT / "lbr_ray" / "assets" / "tiny-llama"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_qwen2_dir(tmp: Path, layers: int = 2) -> Path:
    """A Qwen2 config (no BOS token, sink = EOS) next to the bundled tokenizer: a second architecture for tests."""
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.bos_token = None
    tok.save_pretrained(tmp)
    Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                eos_token_id=2, pad_token_id=0, tie_word_embeddings=False).save_pretrained(tmp)
    return tmp


def tiny_llama_dir(tmp: Path, layers: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    AutoTokenizer.from_pretrained(TINY).save_pretrained(tmp)
    cfg = LlamaConfig.from_pretrained(TINY)
    cfg.num_hidden_layers = layers
    cfg.save_pretrained(tmp)
    return tmp


def write_tiny_gguf(out: Path, arch: str = "llama", seed: int = 0):
    """The bundled tiny Llama (random weights, seeded) written as a float32 GGUF file the way llama.cpp's
    convert_hf_to_gguf.py writes a Llama (Q/K rows permuted, gpt2-style BPE tokenizer); returns the HF model."""
    import json

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def permute(w, n_head):  # HF's rotary halves -> GGUF's interleaved pairs
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    cfg = AutoConfig.from_pretrained(TINY)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    tj = json.loads((TINY / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3 = control
    w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in layer.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = permute(t, cfg.num_attention_heads if name == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> folder with config + tokenizer: llama (2 layers), qwen2 (2 layers), llama1 / qwen1 (1 layer)."""
    base = tmp_path_factory.mktemp("models")
    dirs = {"llama": TINY}
    for name, make, layers in (("qwen2", tiny_qwen2_dir, 2), ("llama1", tiny_llama_dir, 1), ("qwen1", tiny_qwen2_dir, 1)):
        d = base / name
        d.mkdir()
        dirs[name] = make(d, layers)
    return dirs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (server mode) on a free 127.0.0.1 port, stopped by pid; yields the client env vars,
    which are also set in os.environ while it runs."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    try:
        wait_port(port)
        os.environ.update(env)
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator (in memory) on a free 127.0.0.1 port, stopped by pid; STORAGE_EMULATOR_HOST points gs://
    paths at it while it runs. Yields a function that creates a bucket."""
    import json
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    # the emulator's HTTP server answers one request at a time; GCS (and pyarrow's client, which downloads a
    # checkpoint's files in parallel and times out waiting) serve many: run it threaded
    code = ("import sys, http.server as h; h.HTTPServer = h.ThreadingHTTPServer; "
            "from gcp_storage_emulator.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host, old = f"http://127.0.0.1:{port}", os.environ.get("STORAGE_EMULATOR_HOST")

    def create_bucket(name: str) -> None:
        urllib.request.urlopen(urllib.request.Request(
            f"{host}/storage/v1/b?project=lbr-test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10).read()

    try:
        wait_port(port)
        os.environ["STORAGE_EMULATOR_HOST"] = host
        yield create_bucket
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def lbr(monkeypatch, capsys):
    """Run `lbr ARGS` in this process; returns (exit code, stderr), stdout in `.out`. Starting Ray fails the test."""
    import sys

    import ray

    def no_ray(*a, **k):
        raise AssertionError("the command reached ray.init: the check must come before Ray starts")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args) -> tuple[int, str]:
        from cli.main import main

        monkeypatch.setattr(sys, "argv", ["lbr", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        run.out = captured.out
        return info.value.code, captured.err.strip()

    return run
