"""Run-start checks that the IB mask really is applied by the model in use (no Ray).

A transformers upgrade can silently drop a custom mask, so before training we verify, on a real batch:
1. in every layer (eager attention), the weight from each target row to each input column is exactly 0,
   while bottleneck rows do attend to the input;
2. the target rows' states differ from a plain causal forward (the mask is not ignored);
3. the chosen backend matches the dense reference, in eval mode and in a training-mode forward + backward
   (gradient checkpointing and all, with dropout off so that the two are comparable); when the backend *is* the
   dense reference, nothing is compared and each forward runs once (the gradient check still runs);
4. for packed rows (several units in one row): no weight crosses a document boundary, and every unit's states
   equal those of the same unit run alone.
"""
from __future__ import annotations

import contextlib

import torch

from lbr_ray.errors import MaskLeakError
from lbr_ray.model.attention.dense import dense_hidden
from lbr_ray.layout import B, PAD, SINK, X, Y, documents

SELF_CHECK_TEXTS = [
    "Aspirin irreversibly inhibits cyclooxygenase and reduces platelet aggregation.",
    "def add(a, b): return a + b",
    "Enzymes lower the activation energy of a reaction.",
]


@contextlib.contextmanager
def attn_implementation(model, name: str):
    """Temporarily switch the HF attention implementation (e.g. to eager to read attention weights)."""
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    old = lm.config._attn_implementation
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(old)


def attention_weights(model, ids: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-layer eager attention weights [B, heads, T, T] under the IB mask."""
    with attn_implementation(model, "eager"):
        _, attns = dense_hidden(model.decoder, ids, seg, ib=True, sink=model.sink, output_attentions=True)
    return attns


@torch.no_grad()
def check_mask(model, ids: torch.Tensor, seg: torch.Tensor, rtol: float | None = None) -> dict[str, float]:
    """Raise MaskLeakError if the mask leaks or the backend disagrees with the dense reference.

    Backends are compared by max |difference| / max |reference| over valid positions; the tolerance defaults to
    1e-4 in float32 and 3e-2 in bfloat16/float16 (kernels accumulate in different orders)."""
    was_training = model.training
    model.eval()
    try:
        y_rows = (seg == Y)[:, None, :, None]
        x_cols = (seg == X)[:, None, None, :]
        b_rows = (seg == B)[:, None, :, None]
        doc = documents(seg)
        other_doc = (doc[:, :, None] != doc[:, None, :])[:, None]
        packed = bool(((seg == SINK).sum(1) > 1).any())
        leak, cross, b_to_x = 0.0, 0.0, float("inf")
        for layer, w in enumerate(attention_weights(model, ids, seg)):
            leak = max(leak, float((w * (y_rows & x_cols)).abs().max()))
            cross = max(cross, float((w * other_doc).abs().max()))
            b_to_x = min(b_to_x, float((w * (b_rows & x_cols)).sum(-1).amax()))
        if leak != 0.0:
            raise MaskLeakError(f"target tokens attend to input tokens (max weight {leak:.3g}): the IB mask leaks")
        if cross != 0.0:
            raise MaskLeakError(f"tokens attend across packed documents (max weight {cross:.3g}): packing leaks")
        if not b_to_x > 0:
            raise MaskLeakError("bottleneck tokens do not attend to the input: the mask blocks too much")
        valid = seg != PAD
        ref = dense_hidden(model.decoder, ids, seg, ib=True, sink=model.sink)
        causal = model.hidden(ids, seg, ib=False, packed=packed)
        masked_effect = float((ref - causal)[seg == Y].abs().max())
        if masked_effect == 0.0:
            raise MaskLeakError("the custom mask is ignored: IB and plain causal forwards give the same targets")
        if rtol is None:
            rtol = 1e-4 if ref.dtype == torch.float32 else 3e-2
        got = ref if is_dense(model) else model.hidden(ids, seg)
        diff = float((got - ref)[valid].abs().max() / ref[valid].abs().max())
        if diff > rtol:
            raise MaskLeakError(f"backend {model.backend!r} differs from the dense reference by {diff:.3g} "
                                f"(relative) > {rtol}")
        result = {"y_to_x_weight": leak, "backend_rel_diff": diff, "mask_effect": masked_effect,
                  "backend_grad_rel_diff": check_training_path(model, ids, seg, rtol)}
        if packed:
            result["cross_doc_weight"] = cross
            result["packed_rel_diff"] = _check_packed(model, ids, seg, doc, rtol, got)
        return result
    finally:
        model.train(was_training)


def is_dense(model) -> bool:
    """The model's backend is the dense reference itself (comparing the two would compare a function with itself)."""
    return getattr(model, "_forward", None) is dense_hidden


@contextlib.contextmanager
def no_dropout(model):
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    old = [m.p for m in drops]
    for m in drops:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(drops, old):
            m.p = p


def check_training_path(model, ids: torch.Tensor, seg: torch.Tensor, rtol: float) -> float:
    """Forward + backward of the backend in training mode (where gradient checkpointing is active) against the
    dense reference: the states must agree within `rtol` and every trainable tensor the reference reaches must get a
    gradient; returns the global gradient difference |g - ref| / |ref| (L2 over all trainable tensors), which must
    stay below 1e-3 in float32 and 0.5 in bf16/fp16 (where rounding in two different kernels compounds through the
    backward pass: 0.27 measured on a 2-layer Qwen2 with LoRA, 2e-5 in float32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    valid = seg != PAD

    def run(forward):
        h = forward()
        return h.detach(), torch.autograd.grad(h[seg == Y].float().pow(2).mean(), params, allow_unused=True)

    with torch.enable_grad(), no_dropout(model):
        ref_h, ref = run(lambda: dense_hidden(model.decoder, ids, seg, ib=True, sink=model.sink))
        got_h, got = (ref_h, ref) if is_dense(model) else run(lambda: model.hidden(ids, seg))
    diff = float((got_h - ref_h)[valid].abs().max() / ref_h[valid].abs().max())
    if diff > rtol:
        raise MaskLeakError(f"backend {model.backend!r} differs from the dense reference in training mode by "
                            f"{diff:.3g} (relative) > {rtol}")
    pairs = [(g, r) for g, r in zip(got, ref) if r is not None and bool(r.abs().max() > 0)]
    if not pairs:
        raise MaskLeakError("no trainable parameter gets a gradient from the targets")
    if any(g is None or not torch.isfinite(g).all() for g, _ in pairs):
        raise MaskLeakError(f"backend {model.backend!r} leaves trainable parameters without a (finite) gradient")
    num = sum(float((g.float() - r.float()).pow(2).sum()) for g, r in pairs)
    den = sum(float(r.float().pow(2).sum()) for _, r in pairs)
    grad_diff = (num / den) ** 0.5
    limit = 1e-3 if ref_h.dtype == torch.float32 else 0.5
    if grad_diff > limit:
        raise MaskLeakError(f"backend {model.backend!r} gradients differ from the dense reference by {grad_diff:.3g} "
                            f"(relative L2) > {limit}")
    return grad_diff


def _check_packed(model, ids: torch.Tensor, seg: torch.Tensor, doc: torch.Tensor, rtol: float,
                  packed_hidden: torch.Tensor | None = None) -> float:
    """Every unit of a packed row, run alone, gives the states it gets inside the packed row (`packed_hidden`:
    the backend's eval-mode states of the whole batch, when already computed)."""
    worst = 0.0
    packed_hidden = model.hidden(ids, seg) if packed_hidden is None else packed_hidden
    for r in range(ids.shape[0]):
        for d in doc[r][seg[r] != PAD].unique():
            where = (doc[r] == d) & (seg[r] != PAD)
            alone = model.hidden(ids[r][where][None], seg[r][where][None])[0]
            ref = packed_hidden[r][where]
            worst = max(worst, float((alone - ref).abs().max() / ref.abs().max()))
    if worst > rtol:
        raise MaskLeakError(f"a packed unit differs from the same unit alone by {worst:.3g} (relative) > {rtol}")
    return worst
