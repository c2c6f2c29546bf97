"""Train a byte-level BPE tokenizer on a stream of texts (no Ray): the LM stage's tokenizer, the tiny demo model's."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos (the sink), eos, unk


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path):
    """Byte-level BPE (every byte is in the alphabet: no unknown characters) saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast
