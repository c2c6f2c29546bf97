"""BottleneckLM: any Hugging Face causal LM plus k_max trainable bottleneck tokens (no Ray).

    model, tok = BottleneckLM.build(cfg.model, cfg.bottleneck, seed=0)
    hidden = model.hidden(ids, seg)                 # IB-masked forward, [B, T, H]
    emb = model.embed(ids, seg)                     # [B, D], L2-normalised last (or mean) bottleneck state
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lbr_ray.config.schema import BottleneckConfig, ModelConfig
from lbr_ray.errors import ConfigError
from lbr_ray.layout import B, add_bottleneck_tokens
from lbr_ray.model.attention import ATTN_IMPLEMENTATION, get_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def resolve_model_path(name: str) -> str:
    """A local folder (as given, or relative to the lbr-ray checkout, e.g. lbr_ray/assets/tiny-llama), a local copy
    of an s3:// / gs:// folder, the converted folder of a .gguf file (lbr_ray.model.gguf), or a hub id."""
    from lbr_ray.model.gguf import cached_folder, is_gguf
    from lbr_ray.storage import is_remote, local_copy

    if is_remote(name):
        return local_copy(name)
    if is_gguf(name):
        return str(cached_folder(name))
    for candidate in (Path(name).expanduser(), PACKAGE_ROOT / name):
        if candidate.is_dir():
            return str(candidate)
    return name


def load_tokenizer(name: str, k_max: int):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a tokenizer from {name!r} ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"model.name: the tokenizer of {name!r} has no pad token and no EOS token to pad "
                              "with; set pad_token in its tokenizer_config.json")
        tok.pad_token = tok.eos_token  # the usual choice for decoder-only LMs; padded positions are masked out
    add_bottleneck_tokens(tok, k_max)
    return tok


def load_causal_lm(cfg: ModelConfig, vocab_size: int, seed: int = 0, attn_implementation: str | None = None):
    """Load (or, with from_scratch, build from its config) the HF causal LM and make room for new tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.name)
    attn = attn_implementation or cfg.attn_implementation or ATTN_IMPLEMENTATION[cfg.attn_backend]
    try:
        if cfg.from_scratch:
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(path)
            lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype], attn_implementation=attn)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], attn_implementation=attn)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a causal LM from {cfg.name!r} ({str(e).splitlines()[0]})") from None
    old = lm.get_input_embeddings().weight.shape[0]
    if vocab_size > old:  # new bottleneck rows start at the mean embedding
        lm.resize_token_embeddings(vocab_size, mean_resizing=True)
    return lm


class BottleneckLM(nn.Module):
    """Wraps an HF causal LM (optionally peft-wrapped); `backend` picks how the IB mask runs."""

    def __init__(self, lm: nn.Module, bottleneck_ids: list[int], backend: str = "dense", sink: bool = True):
        super().__init__()
        self.lm = lm
        self.bottleneck_ids = list(bottleneck_ids)
        self.backend = backend
        self.sink = sink
        self._forward = get_backend(backend)

    @classmethod
    def build(cls, model_cfg: ModelConfig, b_cfg: BottleneckConfig, seed: int = 0, lora: bool | None = None):
        tok = load_tokenizer(model_cfg.name, b_cfg.k_max)
        lm = load_causal_lm(model_cfg, len(tok), seed)
        b_ids = add_bottleneck_tokens(tok, b_cfg.k_max)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(lm)
        if model_cfg.lora if lora is None else lora:
            lm = apply_lora(lm, model_cfg, b_ids)
        return cls(lm, b_ids, model_cfg.attn_backend, b_cfg.sink), tok

    @property
    def decoder(self) -> nn.Module:
        """The transformer body (returns final-norm hidden states); LoRA layers live inside it."""
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.get_output_embeddings()

    def hidden(self, ids: torch.Tensor, seg: torch.Tensor, ib: bool = True, packed: bool = False) -> torch.Tensor:
        """Final hidden states [B, T, H] under the IB mask (ib=True) or the plain causal mask. `packed`: rows may
        hold several units (lbr_ray.layout.pack); the IB mask always keeps documents apart, the plain causal
        mask does so only when told. Unpacked causal rows need no mask at all: they are right-padded
        (layout.pad_rows), and under a causal mask no real token sees a later pad, so the kernels run their
        mask-free causal path (states at pad positions are never read)."""
        if not ib and not packed:
            return self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        return self._forward(self.decoder, ids, seg, ib=ib, sink=self.sink)

    def embed(self, ids: torch.Tensor, seg: torch.Tensor, pooling: str = "last") -> torch.Tensor:
        """Embedding of `[sink][x][b]` rows with the plain causal mask: L2-normalised b_k (or mean b) state [B, H]."""
        hidden = self.hidden(ids, seg, ib=False)
        return pool_bottleneck(hidden, seg, pooling)


def pool_bottleneck(hidden: torch.Tensor, seg: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """L2-normalised b_k state (`last`) or mean of the b states, in float32; positions are integer arithmetic
    (in bf16, integers above 256 round together and would pick an earlier bottleneck token)."""
    is_b = seg == B  # [B, T]
    if pooling == "mean":
        pooled = (hidden.float() * is_b[..., None]).sum(1) / is_b.sum(1, keepdim=True).clamp(min=1)
    elif pooling == "last":
        pos = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
        last = torch.where(is_b, pos, -1).amax(1)  # index of b_k
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose 'last' or 'mean'")
    return F.normalize(pooled.float(), dim=-1)


def enable_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant gradient checkpointing: kv_split reads keys/values computed inside checkpointed layers (see
    kv_split.py); transformers >= 5.x calls it activation checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(lm: nn.Module, cfg: ModelConfig, bottleneck_ids: list[int]) -> nn.Module:
    """LoRA on all linear layers plus trainable bottleneck embedding rows (peft's trainable_token_indices)."""
    from peft import LoraConfig, get_peft_model

    emb_name = next(n for n, m in lm.named_modules() if m is lm.get_input_embeddings()).split(".")[-1]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",
                      trainable_token_indices={emb_name: list(bottleneck_ids)})
    return get_peft_model(lm, lora)


def merged_lm(model: BottleneckLM, dtype: str | None = None) -> nn.Module:
    """A plain HF causal LM with LoRA and trainable tokens merged in (a copy when peft-wrapped), in `dtype` when
    given. LoRA merges in float32: under DeepSpeed bf16 the module is bf16, and a bf16 merge would round away the
    small LoRA updates."""
    import copy

    lm = model.lm
    if hasattr(lm, "merge_and_unload"):
        lm = copy.deepcopy(lm)
        lm = (lm.float() if next(lm.parameters()).dtype != torch.float32 else lm).merge_and_unload()
    elif dtype and next(lm.parameters()).dtype != DTYPES[dtype]:
        lm = copy.deepcopy(lm)  # never cast the model being trained
    return lm.to(DTYPES[dtype]) if dtype else lm
