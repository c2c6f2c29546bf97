"""GGUF as a model source: a tiny Llama written as GGUF converts to an HF folder with the original's logits; bad
files get one line and exit 2; model.name / --baseline base accept the file (converted once, cached)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, write_tiny_gguf
from tests.unit.test_cli import lbr


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_converted_folder_has_the_original_models_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lbr_ray.model.gguf import SOURCE, convert

    path, original = tiny_gguf
    report = convert(path, tmp_path / "out")
    assert report["max_abs_logit_diff"] == 0.0 and report["architecture"] == "llama"
    assert json.loads((tmp_path / "out" / SOURCE).read_text())["sha256"] == report["sha256"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert getattr(back.config, "quantization_config", None) is None  # an ordinary folder, not a GGUF load
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok(["Aspirin inhibits platelet aggregation."], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the Q/K permutation undone, every tensor in place: the model the GGUF was made from
        assert torch.equal(back(ids).logits, original(ids).logits)


def test_lbr_convert_prints_its_check(tiny_gguf, tmp_path):
    out = lbr("convert", str(tiny_gguf[0]), "--to", str(tmp_path / "m"), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "logits of the saved folder equal the GGUF load's on 3 texts (max |difference| 0)" in out.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_bad_gguf_files_are_one_line_exit_2(tmp_path):
    from lbr_ray.errors import ConfigError
    from lbr_ray.model.gguf import cached_folder, convert

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    out = lbr("convert", str(not_gguf), "--to", str(tmp_path / "a"), cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert f"GGUF_FILE: {not_gguf} is not a GGUF file" in out.stderr
    odd = tmp_path / "odd.gguf"
    write_tiny_gguf(odd, arch="notanarch")
    with pytest.raises(ConfigError, match="model.name: transformers cannot load .*odd.gguf as a causal LM "
                                          r"\(GGUF model with architecture notanarch is not supported yet.\)"):
        convert(odd, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b-*"))  # nothing half-written
    with pytest.raises(ConfigError, match="model.name: .*missing.gguf does not exist"):
        cached_folder(tmp_path / "missing.gguf")


def test_model_name_gguf_is_converted_once_and_builds(tiny_gguf, tmp_path, monkeypatch):
    from lbr_ray.config.schema import BottleneckConfig, ModelConfig
    from lbr_ray.eval.baselines import base_ref
    from lbr_ray.model.bottleneck import BottleneckLM, resolve_model_path

    monkeypatch.setenv("LBR_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(str(tiny_gguf[0]))
    assert folder.startswith(str(tmp_path / "cache" / "gguf"))
    stamp = (tmp_path / "cache" / "gguf").glob("*/model.safetensors").__next__().stat().st_mtime_ns
    assert resolve_model_path(str(tiny_gguf[0])) == folder  # a cache hit: nothing converted again
    assert next((tmp_path / "cache" / "gguf").glob("*/model.safetensors")).stat().st_mtime_ns == stamp
    model, tok = BottleneckLM.build(ModelConfig(name=str(tiny_gguf[0]), lora=True), BottleneckConfig(k_max=2))
    assert len(model.bottleneck_ids) == 2 and model.lm.get_base_model().config.model_type == "llama"
    assert base_ref(str(tiny_gguf[0])).path == folder
