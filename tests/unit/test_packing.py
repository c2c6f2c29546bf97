"""Packed rows (lbr_ray.layout.pack): several units per row, nothing visible across units. A packed row gives the
same per-unit states, loss and gradients as its units in separate rows; a token's logits do not move when another
packed document changes; the run-start self-check covers packed rows and catches a leak across documents."""
from __future__ import annotations

import pytest
import torch

from lbr_ray.config import load_config
from lbr_ray.config.schema import BottleneckConfig, ModelConfig
from lbr_ray.errors import ConfigError, MaskLeakError
from lbr_ray.layout import (PAD, SINK, X, Y, SequenceBuilder, documents, max_unit_length, pack, pad_rows,
                            padding_fraction, positions)
from lbr_ray.losses import IBGenerativeLoss
from lbr_ray.model.bottleneck import BottleneckLM
from lbr_ray.model.selfcheck import check_mask

TEXTS = ["Aspirin inhibits cyclooxygenase and platelet aggregation in the blood.",
         "short",
         "Insulin resistance precedes type 2 diabetes; metformin lowers hepatic glucose output over months.",
         "def add(a, b): return a + b",
         "Enzymes lower the activation energy of a reaction."]


def build(path, backend="dense", dtype="float32"):
    cfg = ModelConfig(name=str(path), from_scratch=True, attn_backend=backend, lora=False, dtype=dtype)
    model, tok = BottleneckLM.build(cfg, BottleneckConfig(ratio=4, k_max=4), seed=0)
    return model, tok


def units(tok, target="continuation"):
    return SequenceBuilder(tok, BottleneckConfig(ratio=4, k_max=4), 24, 24).stage1_rows(TEXTS, target, ib=True)


def test_pack_first_fit_decreasing_keeps_units_whole():
    rows = [([7] * n, [SINK] + [X] * (n - 1)) for n in (5, 9, 3, 6, 2, 4)]
    packed = pack(rows, 10)
    assert sorted(len(r[0]) for r in packed) == [9, 10, 10]  # 9 | 6+4 | 5+3+2
    assert sum(len(r[0]) for r in packed) == 29 and all(len(r[0]) == len(r[1]) <= 10 for r in packed)
    with pytest.raises(ValueError, match="does not fit"):
        pack(rows, 8)
    with pytest.raises(ValueError, match="sink"):
        pack([([1, 2], [X, X])], 8)


def test_documents_and_positions_restart_at_each_sink():
    seg = torch.tensor([[SINK, X, Y, SINK, X, X, SINK, Y, PAD, PAD]])
    assert documents(seg).tolist() == [[1, 1, 1, 2, 2, 2, 3, 3, 3, 3]]
    assert positions(seg).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert positions(torch.tensor([[SINK, X, X, PAD]])).tolist() == [[0, 1, 2, 3]]  # one unit: 0..T-1


def test_padding_fraction():
    assert padding_fraction([2, 4, 3, 3], 2) == pytest.approx(1 - 12 / 14)  # batches padded to 4 and 3
    assert padding_fraction([2, 4, 3, 3, 9], 2, pad_to=5) == pytest.approx(1 - 12 / 20)  # last batch dropped


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_row_equals_separate_rows_loss_and_gradients(model_dirs, arch):
    model, tok = build(model_dirs[arch])
    rows = units(tok)
    packed = pack(rows, max_unit_length(24, 24, 4) * 2)
    assert len(packed) < len(rows)  # really packed
    sep_ids, sep_seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    pk_ids, pk_seg = pad_rows([r[0] for r in packed], [r[1] for r in packed], tok.pad_token_id, length=120)
    loss_fn = IBGenerativeLoss(alpha=0.5)  # target and input loss both exercised

    def loss_and_grads(ids, seg, is_packed):
        model.zero_grad()
        out = loss_fn(model, ids, seg, packed=is_packed)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sep, g_sep = loss_and_grads(sep_ids, sep_seg, False)
    pk, g_pk = loss_and_grads(pk_ids, pk_seg, True)
    assert int(sep["tokens"]) == int(pk["tokens"])
    for key in ("loss", "target_loss", "input_loss"):
        assert abs(float(sep[key]) - float(pk[key])) < 1e-5, key
    assert g_sep.keys() == g_pk.keys() and len(g_sep) > 0
    for n in g_sep:
        assert torch.allclose(g_sep[n], g_pk[n], rtol=1e-4, atol=1e-6), n

    with torch.no_grad():  # per-unit states: every unit's positions in the packed row match its own row
        h_sep, h_pk = model.hidden(sep_ids, sep_seg), model.hidden(pk_ids, pk_seg)
    found = 0
    for r in range(pk_ids.shape[0]):
        doc = documents(pk_seg[r:r + 1])[0]
        for d in doc[pk_seg[r] != PAD].unique():
            where = (doc == d) & (pk_seg[r] != PAD)
            unit = pk_ids[r][where].tolist()
            i = next(i for i, row in enumerate(rows) if row[0] == unit)
            n = len(unit)
            assert (h_pk[r][where] - h_sep[i, :n]).abs().max() < 1e-5
            found += 1
    assert found == len(rows)


def test_packed_bf16_loss_within_dtype_tolerance(model_dirs):
    model, tok = build(model_dirs["llama"], dtype="bfloat16")
    rows = units(tok)
    packed = pack(rows, 200)
    loss_fn = IBGenerativeLoss()
    with torch.no_grad():
        sep = loss_fn(model, *pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id))["loss"]
        pk = loss_fn(model, *pad_rows([r[0] for r in packed], [r[1] for r in packed], tok.pad_token_id))["loss"]
    assert abs(float(sep) - float(pk)) < 2e-2 * abs(float(sep))


@pytest.mark.parametrize("ib", [True, False])
def test_isolation_other_document_does_not_change_logits(model_dirs, ib):
    """IB rows and plain-text LM documents (the pre-training packing): changing the document packed in front of
    another leaves the other's logits bit-for-bit alone (causality alone would not), and changes its own."""
    model, tok = build(model_dirs["llama"])
    sb = SequenceBuilder(tok, BottleneckConfig(ratio=4, k_max=4), 24, 24)
    if ib:
        rows = sb.stage1_rows(TEXTS[:2], "self", ib=True)
    else:
        rows = sb.lm_document_rows(TEXTS[:2], length=64)
    assert len(pack(rows, 200)) == 1
    other, mine = rows
    changed = ([(t % 50) + 10 if g == X else t for t, g in zip(*other)], other[1])  # new input text
    m = len(other[0])

    def logits(front, doc_mask=True):
        ids, seg = pad_rows([front[0] + mine[0]], [front[1] + mine[1]], tok.pad_token_id)
        with torch.no_grad():
            return model.lm_head(model.hidden(ids, seg, ib=ib, packed=doc_mask))[0]

    a, b = logits(other), logits(changed)
    assert torch.equal(a[m:], b[m:])
    assert not torch.allclose(a[:m], b[:m])
    if not ib:  # negative control: the plain causal mask without documents lets the change through
        assert not torch.allclose(logits(other, False)[m:], logits(changed, False)[m:])


def test_lm_document_rows_cut_long_documents():
    from transformers import AutoTokenizer

    from tests.conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY)
    sb = SequenceBuilder(tok, BottleneckConfig(ratio=4, k_max=4), 8, 8)
    text = " ".join(["insulin resistance precedes diabetes"] * 20)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    rows = sb.lm_document_rows([text, "short"], length=16)
    assert all(len(r[0]) <= 16 and r[1][0] == SINK for r in rows)
    assert sum(len(r[0]) - 1 for r in rows[:-1]) == n  # every token kept, in chunks of <= 15 + a sink
    assert all(len(r[0]) <= 16 for r in pack(rows, 16))


def test_self_check_covers_packed_rows(model_dirs, monkeypatch):
    model, tok = build(model_dirs["llama"])
    rows = units(tok)
    rows = pack(rows, sum(len(r[0]) for r in rows)) + rows
    ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    result = check_mask(model, ids, seg)
    assert result["cross_doc_weight"] == 0.0 and result["packed_rel_diff"] < 1e-4

    import lbr_ray.model.masks as masks  # a mask that forgets document boundaries is caught

    monkeypatch.setattr(masks, "documents", lambda s: torch.zeros_like(s))
    with pytest.raises(MaskLeakError, match="across packed documents"):
        check_mask(model, ids, seg)


def test_pack_config_checks():
    cfg = load_config(None, ["ib_gl.pack=true"])
    from lbr_ray.config.load import pack_length

    assert pack_length(cfg) == 1 + 128 + 16 + 128
    with pytest.raises(ConfigError, match="kv_split"):
        load_config(None, ["ib_gl.pack=true", "model.attn_backend=kv_split"])
    with pytest.raises(ConfigError, match="shorter than the longest unit"):
        load_config(None, ["ib_gl.pack=true", "ib_gl.pack_length=64"])
    with pytest.raises(ValueError, match="packed rows"):  # the backend itself refuses too
        from lbr_ray.model.attention.kv_split import kv_split_hidden

        kv_split_hidden(None, torch.zeros(1, 6, dtype=torch.long), torch.tensor([[SINK, X, Y, SINK, X, Y]]))
