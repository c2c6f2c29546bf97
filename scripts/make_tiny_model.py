"""Build the offline tiny model folder (lbr_ray/assets/tiny-llama): a BPE tokenizer trained on the demo slice
plus a 2-layer Llama config. Weights are made at run time from the config (`model.from_scratch: true`).

    python scripts/make_tiny_model.py
"""
from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from lbr_ray.data.readers import read_all
from lbr_ray.data.tokenizer import train_tokenizer

OUT = Path(__file__).resolve().parents[1] / "lbr_ray" / "assets" / "tiny-llama"


def texts():
    for domain in ("medical", "chemistry", "code", "biology"):
        root = f"data/demo/{domain}"
        for r in read_all(root, "pairs"):
            yield r["query"]
            yield r["positive"]
        if domain != "biology":
            for r in read_all(root, "corpus"):
                yield r["text"]


def main(vocab_size: int = 8192) -> None:
    fast = train_tokenizer(texts(), vocab_size, OUT)
    LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True).save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
