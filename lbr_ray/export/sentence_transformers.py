"""`lbr export`: a trained lbr-ray model as a folder that is at once
- a Hugging Face causal LM (merged weights, `AutoModelForCausalLM.from_pretrained(DIR)`), with lbr_ray.json, and
- a sentence-transformers model (`SentenceTransformer(DIR).encode(texts)`), which imports nothing from lbr-ray:
  the tokenizer's post-processor appends `[sink] text [b_1..b_k]`, pooling takes the last token, then L2 norm.

That second form needs a fixed k. With R-based k (k = clamp(ceil(n / R), k_min, k_max)) the number of bottleneck
tokens depends on the text's length, which a static tokenizer template cannot express: export pins k only when
every admissible length gives the same k; otherwise it asks for `--k N` (a deliberate, documented change of the
model's input) or for lbr_ray.Encoder, which handles R-based k exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lbr_ray.layout import num_bottleneck
from lbr_ray.errors import LbrError
from lbr_ray.model.encoder import CARD, bottleneck_from_card
from lbr_ray.train.checkpoint import local_hf_dir

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def fixed_k(card: dict, k: int | None = None) -> int:
    """The k the exported tokenizer appends: `k`, the card's fixed k, or the one k every length maps to."""
    if k is not None:
        if not 1 <= k <= card["k_max"]:
            raise LbrError(f"--k must be between 1 and {card['k_max']} (the model's bottleneck tokens), got {k}")
        return k
    cfg = bottleneck_from_card(card)
    ks = {num_bottleneck(n, cfg) for n in range(1, card["max_input_tokens"] + 1)}
    if len(ks) > 1:
        raise LbrError(f"this model's k follows R={card['ratio']} and varies with text length ({sorted(ks)}); "
                          "sentence-transformers needs a fixed k: pass --k N, or embed with lbr_ray.Encoder")
    return ks.pop()


def export(checkpoint: str | Path, out: str | Path, k: int | None = None) -> Path:
    """Write the merged HF model + sentence-transformers folder to `out`; returns it."""
    from transformers import AutoConfig, AutoTokenizer

    src, out = local_hf_dir(checkpoint), Path(out)
    card = json.loads((src / CARD).read_text())
    if card["pooling"] != "last":
        raise LbrError("sentence-transformers export supports pooling=last only (mean over bottleneck tokens "
                          "needs lbr_ray.Encoder)")
    k = fixed_k(card, k)
    if out.exists() and any(out.iterdir()):
        raise LbrError(f"--to {out} exists and is not empty; choose a new folder")
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
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"similarity_fn_name": "cosine", "lbr_ray": {"k": k, "source": str(src)}}))
    card_out = {**card, "k": k, "exported_for": "sentence-transformers"}
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
