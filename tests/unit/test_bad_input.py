"""Bad input, every kind in docs/errors.md: one line naming the file or option, exit code 2, nothing written that
a later run would trust, and no Ray started (the commands run in-process with ray.init forbidden)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_CFG = str(ROOT / "configs" / "demo.yaml")


def pair(i: int) -> str:
    return json.dumps({"query": f"what is item {i}?", "positive": f"item {i} is a thing", "type": "qa"})


def pairs_file(path: Path, n: int = 40, lines: dict[int, str | bytes] | None = None) -> Path:
    rows: list[bytes] = [pair(i).encode() for i in range(n)]
    for no, text in (lines or {}).items():
        rows[no - 1] = text if isinstance(text, bytes) else text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train(lbr, tmp_path, *args):
    return lbr("train", "--config", DEMO_CFG, "--output", tmp_path / "run", *args)


def no_run_left(tmp_path) -> None:
    """Nothing a later run (or --resume) would pick up: no stage folder, no checkpoint, no model."""
    run = tmp_path / "run"
    assert not run.exists() or not any(run.rglob("checkpoint_*")) and not any(run.rglob("model"))


def test_data_dir_with_empty_pairs_stops_and_never_uses_the_configs_data(lbr, tmp_path):
    (tmp_path / "mydata").mkdir()
    empty = tmp_path / "mydata" / "pairs.jsonl"
    empty.write_text("")
    one_line(*train(lbr, tmp_path, "--data", tmp_path / "mydata"), f"{empty}: the pairs file is empty")
    no_run_left(tmp_path)


def test_data_means_exactly_the_named_data(tmp_path):
    """--data DIR: the pairs and corpus of DIR (none if it has none), never the config's corpus."""
    from cli.train import config_with_options, data_overrides

    d = tmp_path / "d"
    pairs_file(d / "pairs.jsonl")
    cfg = config_with_options(Path(DEMO_CFG), data_overrides(str(d), []))
    assert cfg.data.pairs == (str(d),) and cfg.data.corpus == ()
    (d / "corpus.jsonl").write_text('{"id": 1, "text": "a passage"}\n')
    cfg = config_with_options(Path(DEMO_CFG), data_overrides(str(d), []))
    assert cfg.data.corpus == (str(d),)
    cfg = config_with_options(Path(DEMO_CFG), data_overrides(str(d / "pairs.jsonl"), ["data.corpus=[x.jsonl]"]))
    assert cfg.data.pairs == (str(d / "pairs.jsonl"),) and cfg.data.corpus == ("x.jsonl",)


def test_every_record_skipped(lbr, tmp_path):
    bad = pairs_file(tmp_path / "p" / "pairs.jsonl", n=5, lines={i: '{"query": 1}' for i in range(1, 6)})
    one_line(*train(lbr, tmp_path, "--data", bad, "--set", "data.on_bad_record=skip"),
             str(bad), "every pairs record was skipped as bad (5", "must be a string")
    no_run_left(tmp_path)


def test_invalid_utf8_names_its_line(lbr, tmp_path):
    bad = pairs_file(tmp_path / "p" / "pairs.jsonl", lines={23: b'{"query": "caf\xe9", "positive": "x"}'})
    one_line(*train(lbr, tmp_path, "--data", bad), f"{bad}:23: not UTF-8 text")


def test_invalid_utf8_in_gzip_names_its_line(tmp_path):
    import gzip

    from lbr_ray.data.readers import read_all
    from lbr_ray.errors import DataError

    path = tmp_path / "pairs.jsonl.gz"
    rows = [pair(i).encode() for i in range(9)] + [b'{"query": "\xff\xfe", "positive": "p"}']
    path.write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))
    with pytest.raises(DataError, match=r"pairs.jsonl.gz:10: not UTF-8") as info:
        list(read_all(str(path), "pairs"))
    assert info.value.line == 10


def test_a_50_mb_line_is_refused_without_holding_it(lbr, tmp_path):
    huge = b'{"query": "q", "positive": "' + b"x" * (50 << 20) + b'"}'
    bad = pairs_file(tmp_path / "p" / "pairs.jsonl", n=3, lines={2: huge})
    one_line(*train(lbr, tmp_path, "--data", bad), f"{bad}:2: line longer than data.max_record_bytes")


@pytest.mark.parametrize("record, reason", [
    ('{"query": ["a list"], "positive": "p"}', "field 'query' must be a string, got list"),
    ('{"query": "q", "positive": "p", "negatives": "not a list"}', "field 'negatives' must be a list"),
])
def test_wrong_field_types(lbr, tmp_path, record, reason):
    bad = pairs_file(tmp_path / "p" / "pairs.jsonl", lines={7: record})
    one_line(*train(lbr, tmp_path, "--data", bad), f"{bad}:7: bad pairs record", reason)


def test_missing_field(lbr, tmp_path):
    bad = pairs_file(tmp_path / "p" / "pairs.jsonl", lines={4: '{"query": "q"}'})
    one_line(*train(lbr, tmp_path, "--data", bad), f"{bad}:4", "missing field 'positive'")


def test_bad_corpus_record_in_the_data_folder(lbr, tmp_path):
    pairs_file(tmp_path / "d" / "pairs.jsonl")
    (tmp_path / "d" / "corpus.jsonl").write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n')
    one_line(*train(lbr, tmp_path, "--data", tmp_path / "d"), "corpus.jsonl:2", "missing field 'text'")


def test_unwritable_output(lbr, tmp_path):
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    code, err = lbr("train", "--config", DEMO_CFG, "--data", good, "--output", "/proc/lbr-run")
    one_line(code, err, "--output /proc/lbr-run: cannot write in /proc")


def test_output_that_is_a_file(lbr, tmp_path):
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    code, err = lbr("train", "--config", DEMO_CFG, "--data", good, "--output", good / "run")
    one_line(code, err, f"{good} is a file, not a folder")


def test_full_output_disk(lbr, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - 4096, 4096))
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--data", good), "0.00 GiB free on its disk", "checkpoints need about")
    no_run_left(tmp_path)


def test_k_max_above_the_models_positions(lbr, tmp_path):
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--data", good, "--set", "bottleneck.k_max=2000"),
             "bottleneck.k_max=2000", "exceed the model's max_position_embeddings=1024")


def test_tokenizer_without_pad_or_eos_token(lbr, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    from tests.conftest import TINY

    model = tmp_path / "nopad"
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = tok.eos_token = None
    tok.save_pretrained(model)
    LlamaConfig.from_pretrained(TINY).save_pretrained(model)
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--data", good, "--set", f"model.name={model}"),
             "model.name: the tokenizer of", "has no pad token and no EOS token")


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from transformers import AutoTokenizer

    from lbr_ray.model.bottleneck import load_tokenizer
    from tests.conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path), 4).pad_token == tok.eos_token


def _lbr_model(folder: Path, base: Path, k_max: int) -> Path:
    import shutil

    shutil.copytree(base, folder)
    (folder / "lbr_ray.json").write_text(json.dumps({"format": "lbr-ray", "k_max": k_max, "bottleneck_ids": []}))
    return folder


def test_init_from_another_model(lbr, tmp_path, model_dirs):
    other = _lbr_model(tmp_path / "qwen-stage1", model_dirs["qwen2"], k_max=4)
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--stage", "gr-cl", "--data", good, "--init", other),
             f"--init {other} is a qwen2 model", "model.name 'lbr_ray/assets/tiny-llama' is llama")


def test_init_with_other_bottleneck_tokens(lbr, tmp_path, model_dirs):
    other = _lbr_model(tmp_path / "k8", model_dirs["llama"], k_max=8)
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--stage", "gr-cl", "--data", good, "--init", other),
             f"--init {other}: trained with bottleneck.k_max=8, the config has 4")


def test_init_that_is_not_an_lbr_model(lbr, tmp_path, model_dirs):
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--stage", "gr-cl", "--data", good, "--init", model_dirs["qwen2"]),
             "is not an lbr-ray model or checkpoint")


def test_resume_with_another_model(lbr, tmp_path):
    from lbr_ray.config import load_config, save_config

    stage = tmp_path / "run" / "ib_gl"
    stage.mkdir(parents=True)
    save_config(load_config(DEMO_CFG, ["model.name=some/other-model"]), stage / "config.yaml")
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    one_line(*train(lbr, tmp_path, "--data", good, "--resume"),
             "--resume:", "model.name='some/other-model', the config has 'lbr_ray/assets/tiny-llama'")


def test_unreachable_s3_endpoint(lbr, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    code, err = lbr("train", "--config", DEMO_CFG, "--data", good, "--output", "s3://bucket/run")
    one_line(code, err, "s3://bucket/run: cannot reach the storage", "AWS_ENDPOINT_URL")


def test_s3_output_in_a_missing_bucket(lbr, tmp_path, s3_server):
    good = pairs_file(tmp_path / "p" / "pairs.jsonl")
    code, err = lbr("train", "--config", DEMO_CFG, "--data", good, "--output", "s3://no-such-bucket/run")
    one_line(code, err, "--output s3://no-such-bucket/run: the bucket s3://no-such-bucket does not exist")


def test_eval_unknown_domain(lbr, tmp_path):
    one_line(*lbr("eval", "--baseline", "bm25", "--domains", "astrology", "--data-root", ROOT / "data" / "demo",
                  "--num-workers", "0", "--output", tmp_path / "ev"), "unknown domain 'astrology'")
    assert not (tmp_path / "ev").exists()


def test_eval_model_that_is_not_a_model(lbr, tmp_path):
    one_line(*lbr("eval", "--model", tmp_path, "--domains", "medical", "--data-root", ROOT / "data" / "demo",
                  "--num-workers", "0", "--output", tmp_path / "ev"), str(tmp_path))


def test_tune_with_an_empty_data_file(lbr, tmp_path):
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("\n\n")
    one_line(*lbr("tune", "--config", DEMO_CFG, "--output", tmp_path / "sweep", "--set", f"data.pairs=[{empty}]"),
             f"{empty}: the pairs file is empty")


def test_tune_with_an_unknown_search(lbr, tmp_path):
    one_line(*lbr("tune", "--config", DEMO_CFG, "--output", tmp_path / "sweep", "--set", "tune.search=bayes"),
             "tune.search='bayes' is not one of")


def test_cluster_file_missing(lbr, tmp_path):
    one_line(*lbr("train", "--config", DEMO_CFG, "--cluster", tmp_path / "nope.yaml"),
             f"file not found: {tmp_path / 'nope.yaml'}")


def test_cluster_dashboard_unreachable(lbr, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line(*lbr("train", "--config", DEMO_CFG, "--address", f"http://127.0.0.1:{port}"),
             f"cannot reach the Ray dashboard at http://127.0.0.1:{port}")


def test_empty_data_dir_as_a_new_user_runs_it(tmp_path):
    """The report that started this: a real `lbr` process, `--data DIR` whose pairs.jsonl is empty."""
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "pairs.jsonl").write_text("")
    code = "from cli.main import main; import sys; sys.argv = ['lbr'] + sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "train", "--config", DEMO_CFG, "--data",
                          str(tmp_path / "mydata"), "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 2 and "pairs.jsonl: the pairs file is empty" in out.stderr
    assert "corpus passages" not in out.stdout and not (tmp_path / "run").exists()
