"""GGUF files (llama.cpp's format) as a model source: converted once to an HF safetensors folder (no Ray).

    folder = cached_folder("SmolLM2-135M-Instruct.Q4_1.gguf")   # ~/.cache/lbr-ray/gguf/<sha256[:16]>/
    report = convert("model.gguf", "models/my-model")           # explicit, with the logit check

transformers reads the GGUF (`from_pretrained(folder, gguf_file=name)`, quantized tensors dequantized to float32);
the converted folder drops the GGUF quantization record, so it loads as an ordinary model everywhere (DeepSpeed,
peft, Ray workers). `convert` checks that the saved folder's logits equal those of transformers' GGUF load.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from lbr_ray.errors import ConfigError
from lbr_ray.storage import cache_root, sha256

MAGIC = b"GGUF"
CHECK_TEXTS = ("The patient was given 5 mg of warfarin.", "def add(a, b):\n    return a + b",
               "Benzene is an aromatic hydrocarbon.")
SOURCE = "lbr_ray_gguf.json"  # written into a converted folder: the file it came from and the check's result


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".gguf")


def check_file(path: str | os.PathLike, option: str = "model.name") -> Path:
    """The GGUF file as a Path, or one ConfigError naming the option: missing, or not GGUF (magic bytes)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{option}: {path} does not exist (a .gguf name must be a local file)")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise ConfigError(f"{option}: {path} is not a GGUF file (it starts with {head!r}, a GGUF file with "
                          f"{MAGIC!r})")
    return p


def load_gguf(path: Path, option: str = "model.name"):
    """(model, tokenizer) as transformers reads the GGUF, in float32; one ConfigError if it cannot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers' per-tensor progress bar is always on: keep it off the console
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001  (the gguf reader and transformers raise many kinds)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{option}: transformers cannot load {path} as a causal LM ({reason})") from None
    lm.hf_quantizer = None  # the weights are already dequantized: save an ordinary model
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    return lm.eval(), tok


def _logits(lm, tok, texts) -> list:
    import torch

    with torch.no_grad():
        return [lm(**tok(t, return_tensors="pt")).logits for t in texts]


def convert(path: str | os.PathLike, out: str | os.PathLike, option: str = "model.name") -> dict:
    """Convert a GGUF file into an HF folder at `out` (written to a temporary folder, moved in place when the
    check passes) and return what was checked: the saved folder's logits against the GGUF load's on CHECK_TEXTS."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    src = check_file(path, option)
    out = Path(out).expanduser()
    hf_logging.disable_progress_bar()  # a bar per tensor, per shard: chatter for the console
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        lm, tok = load_gguf(src, option)
        lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=lm.dtype).eval()
        diffs = [float((a - b).abs().max()) for a, b in zip(_logits(lm, tok, CHECK_TEXTS), _logits(back, tok,
                                                                                                      CHECK_TEXTS))]
        report = {"source": str(src.resolve()), "sha256": sha256(src), "architecture": lm.config.model_type,
                  "parameters": sum(p.numel() for p in lm.parameters()), "vocab": len(tok),
                  "checked_texts": len(CHECK_TEXTS), "max_abs_logit_diff": max(diffs), "dtype": str(lm.dtype)}
        if max(diffs) != 0.0:
            raise ConfigError(f"{option}: {src} converted with logits that differ from transformers' GGUF load "
                              f"by up to {max(diffs):.3g}; not using the conversion")
        (tmp / SOURCE).write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        hf_logging.enable_progress_bar()
    return report


def cached_folder(path: str | os.PathLike, option: str = "model.name") -> Path:
    """The converted folder of a GGUF file, converting it on first use into <cache>/gguf/<sha256[:16]> (a file
    lock keeps concurrent processes, e.g. the Train workers of one machine, from converting it twice)."""
    from filelock import FileLock

    src = check_file(path, option)
    folder = cache_root() / "gguf" / sha256(src)[:16]
    if (folder / SOURCE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / SOURCE).is_file():
            print(f"[lbr] {option}: converting {src} to an HF folder once (cached in {folder})", flush=True)
            convert(src, folder, option)
    return folder
