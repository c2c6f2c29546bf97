"""`lbr train --stage lm`: causal-LM pre-training (a model built from a config, `model.from_scratch`) or continued
pre-training (a model) on a weighted mixture of domain folders, packed rows, through the same Ray Data -> Ray Train
+ DeepSpeed path as the other stages. The result, `<output>/lm/model`, is an HF model + tokenizer that any config
can name as `model.name`. With `lm.tokenizer_vocab`, a byte-level BPE tokenizer is trained on the mixture first."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lbr_ray.config import LbrConfig, replace
from lbr_ray.errors import ConfigError
from lbr_ray.train.launcher import StageResult, check_output, ensure_ray, run_stage, stage_paths


def check_sources(cfg: LbrConfig) -> None:
    """Before Ray starts: the mixture names folders that exist and hold text, the weights fit them."""
    from lbr_ray.data.mixture import source_files

    if not cfg.lm.sources:
        raise ConfigError("--stage lm needs lm.sources: the domain folders to pre-train on (with lm.weights)")
    for source in cfg.lm.sources:
        source_files(source)
    if cfg.lm.tokenizer_vocab and not cfg.model.from_scratch:
        raise ConfigError("lm.tokenizer_vocab trains a new tokenizer: only for a model built from its config "
                          "(model.from_scratch: true); a pretrained model keeps its own tokenizer")


def train_lm(cfg: LbrConfig, init: str | None = None, address: str | None = None, t0: float | None = None,
             quiet: bool = False) -> dict[str, StageResult]:
    from lbr_ray.data import mixture
    from lbr_ray.recipes import ib_gl

    t0 = t0 or time.time()
    check_sources(cfg)
    check_output(cfg, "lm")
    ensure_ray(cfg, address, quiet)
    docs, parts = mixture.mixture(cfg)
    for source, part in parts.items():
        print(f"[lbr] lm data: {source}: {part['documents']} documents x {part['factor']} per epoch", flush=True)
    stage_dir = stage_paths(cfg, "lm")[0]
    if cfg.lm.tokenizer_vocab:
        cfg = replace(cfg, model={"name": str(base_with_new_tokenizer(cfg, docs, stage_dir / "base"))})
    ds = {"train": mixture.lm_dataset(cfg, init or cfg.model.name, docs)}
    res = run_stage(cfg, "lm", ib_gl.lm_train_fn, ds, init=init, t0=t0, quiet=quiet)
    print(f"[lbr] lm done in {res.wall_s:.1f}s: loss {res.last.get('loss', float('nan')):.4f}; model: "
          f"{res.model_dir} (name it as model.name in a config)", flush=True)
    out = Path(cfg.run.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"stage": "lm", "wall_s": time.time() - t0, "mixture": parts,
                                                  "model": str(res.model_dir), "last": res.last}, indent=2,
                                                 default=str))
    return {"lm": res}


def base_with_new_tokenizer(cfg: LbrConfig, docs, folder: Path) -> Path:
    """`folder` = the model config of `model.name` with a tokenizer trained on the mixture (kept on --resume)."""
    from transformers import AutoConfig

    from lbr_ray.data.tokenizer import train_tokenizer
    from lbr_ray.model.bottleneck import resolve_model_path

    if cfg.run.resume and (folder / "tokenizer.json").is_file():
        return folder
    t = time.time()
    tok = train_tokenizer((str(r["text"]) for r in docs.iter_rows()), cfg.lm.tokenizer_vocab, folder)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    config.vocab_size, config.pad_token_id = len(tok), tok.pad_token_id
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.save_pretrained(folder)
    print(f"[lbr] lm tokenizer: {len(tok)} tokens trained on the mixture in {time.time() - t:.1f}s -> {folder}",
          flush=True)
    return folder
