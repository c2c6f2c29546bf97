"""`lbr export`: a trained lbr-ray model as a folder that is at once
- a Hugging Face causal LM (merged weights, `AutoModelForCausalLM.from_pretrained(DIR)`), with lbr_ray.json, and
- a sentence-transformers model (`SentenceTransformer(DIR).encode(texts)`), which imports nothing from lbr-ray:
  the tokenizer's post-processor appends `[sink] text [b_1..b_k]`, pooling takes the last token, then L2 norm.

That second form needs a fixed k. With R-based k (k = clamp(ceil(n / R), k_min, k_max)) the number of bottleneck
tokens depends on the text's length, which a static tokenizer template cannot express. When every admissible length
gives the same k, export pins it (exact). Otherwise export measures (lbr_ray.export.fixed_k): dev R@10 of the run's
per-text k against each fixed k on the run's dev set, exports the best fixed k (or the `--k N` asked for), prints
what it loses and refuses a loss above `max_loss` unless forced; lbr_ray.Encoder keeps R-based k exact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lbr_ray.errors import LbrError
from lbr_ray.export.fixed_k import DEFAULT_MAX_LOSS, admissible_ks, check_loss, find_run_config, measure
from lbr_ray.model.encoder import CARD
from lbr_ray.train.checkpoint import local_hf_dir

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def fixed_k(card: dict, k: int | None = None) -> int | None:
    """The k the exported tokenizer appends when no measurement is needed: the card's one k (a fixed k, or R-based
    k that every admissible length maps to) when `k` is None or equal to it; None when export must measure."""
    if k is not None and not 1 <= k <= card["k_max"]:
        raise LbrError(f"--k must be between 1 and {card['k_max']} (the model's bottleneck tokens), got {k}")
    ks = admissible_ks(card)
    if len(ks) == 1 and k in (None, ks[0]):
        return ks[0]
    return None


def export(checkpoint: str | Path, out: str | Path, k: int | None = None, max_loss: float = DEFAULT_MAX_LOSS,
           force: bool = False, config: str | Path | None = None, log=print) -> Path:
    """Write the merged HF model + sentence-transformers folder to `out`; returns it. With R-based k (or a `k`
    other than the model's), the fixed k is measured first and the export refused if it loses more than
    `max_loss` dev R@10 (unless `force`)."""
    from transformers import AutoConfig, AutoTokenizer

    src, out = local_hf_dir(checkpoint), Path(out)
    card = json.loads((src / CARD).read_text())
    if card["pooling"] != "last":
        raise LbrError("sentence-transformers export supports pooling=last only (mean over bottleneck tokens "
                          "needs lbr_ray.Encoder)")
    if out.exists() and any(out.iterdir()):
        raise LbrError(f"--to {out} exists and is not empty; choose a new folder")
    exact = fixed_k(card, k)
    measured = None
    if exact is None:
        run_config = Path(config) if config else find_run_config(src)
        if run_config is None and k is not None and force:
            log(f"export: no run config next to {src}, so what k={k} costs is not measured (--force)")
        else:
            if run_config is None:
                raise LbrError(f"this model's k follows R={card['ratio']} ({admissible_ks(card)} by length) and a "
                               f"fixed k must be measured on the run's dev set, but no run config.yaml is next to "
                               f"{src}: pass --config (the config the run trained with), or --k N --force")
            measured = measure(src, card, k, run_config, log=log)
            for line in measured.lines():
                log(line)
            log(f"export: fixed k={measured.chosen} changes dev R@10 by {-measured.loss:+.4f} against the run's "
                f"per-text k (threshold --max-loss {max_loss})")
            check_loss(measured, max_loss, force)
            k = measured.chosen
    else:
        k = exact
    shutil.copytree(src, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    _append_bottleneck(tok, card["bottleneck_ids"][:k], card["sink_id"] if "sink_id" in card else None)
    tok.save_pretrained(out)
    dim = AutoConfig.from_pretrained(src).hidden_size
    (out / "modules.json").write_text(json.dumps(MODULES, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": card["max_input_tokens"] + 1 + k, "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True}))
    (out / "2_Normalize").mkdir(exist_ok=True)
    choice = {"exact": exact is not None, **(measured.to_dict() if measured else {})}
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"similarity_fn_name": "cosine", "lbr_ray": {"k": k, "source": str(src), **choice}}))
    card_out = {**card, "k": k, "exported_for": "sentence-transformers", "export_k_choice": choice}
    (out / CARD).write_text(json.dumps(card_out, indent=2))
    return out


def _append_bottleneck(tok, b_ids: list[int], sink_id: int | None) -> None:
    """Make the fast tokenizer itself produce `[sink] text [b_1..b_k]` (no lbr-ray code at inference)."""
    from tokenizers import processors

    from lbr_ray.layout import sink_token_id

    sink = sink_id if sink_id is not None else sink_token_id(tok)
    names = [tok.convert_ids_to_tokens(i) for i in [sink, *b_ids]]
    single = " ".join([f"{names[0]}:0", "$A:0", *[f"{n}:0" for n in names[1:]]])
    special = list({n: tok.convert_tokens_to_ids(n) for n in names}.items())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
