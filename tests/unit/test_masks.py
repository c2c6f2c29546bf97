"""The IB mask: exact zero attention from target to input in every layer, the 1-layer logit probe (with a plain
causal mask as negative control), backend equivalence, padding and mixed lengths; Llama and Qwen2."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lbr_ray.config.schema import BottleneckConfig, ModelConfig
from lbr_ray.layout import B, PAD, SINK, X, Y, SequenceBuilder, pad_rows
from lbr_ray.model.bottleneck import BottleneckLM
from lbr_ray.model.masks import visibility
from lbr_ray.model.selfcheck import attention_weights, check_mask
from lbr_ray.errors import MaskLeakError
from tests.conftest import TINY as TINY_DIR

TEXTS = ["Aspirin inhibits cyclooxygenase and platelet aggregation in the blood.",
         "short",
         "Insulin resistance precedes type 2 diabetes; metformin lowers hepatic glucose output over months."]


def build(path, backend="dense", k=3, sink=True, lora=False):
    cfg = ModelConfig(name=str(path), from_scratch=True, attn_backend=backend, lora=lora, lora_dropout=0.0)
    model, tok = BottleneckLM.build(cfg, BottleneckConfig(k=k, k_max=4, sink=sink), seed=0)
    return model.eval(), tok


def batch(tok, k=3, texts=TEXTS, target="self"):
    sb = SequenceBuilder(tok, BottleneckConfig(k=k, k_max=4), 24, 24)
    rows = sb.stage1_rows(texts, target, ib=True)
    return pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)


def test_visibility_rule_table():
    seg = torch.tensor([[SINK, X, X, B, B, Y, Y, PAD]])
    allow = visibility(seg)[0]
    assert allow[5, 1:3].sum() == 0 and allow[6, 1:3].sum() == 0  # Y never sees X
    assert allow[5, 3:5].all() and allow[6, 5].item() and allow[5, 0].item()  # Y sees B, earlier Y, the sink
    assert allow[3, 1:3].all() and allow[4, 0:5].all()  # B sees all of X and earlier B
    assert not allow[1, 2] and not allow[5, 6]  # causal
    assert not allow[:7, 7].any()  # nobody attends to padding
    assert not visibility(seg, sink=False)[0, 5, 0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_zero_attention_from_target_to_input_in_every_layer(model_dirs, arch):
    model, tok = build(model_dirs[arch])
    ids, seg = batch(tok)
    attns = attention_weights(model, ids, seg)
    assert len(attns) == model.lm.config.num_hidden_layers
    y_rows, x_cols, b_rows = seg == Y, seg == X, seg == B
    for w in attns:  # [B, heads, T, T]
        for r in range(ids.shape[0]):
            assert torch.count_nonzero(w[r][:, y_rows[r]][:, :, x_cols[r]]) == 0
            assert (w[r][:, b_rows[r]][:, :, x_cols[r]].sum(-1) > 0).all()  # bottleneck reads the input
    assert check_mask(model, ids, seg)["y_to_x_weight"] == 0.0


def _target_logits(model, ids, seg, ib=True):
    hidden = model.hidden(ids, seg, ib=ib)
    return model.lm_head(hidden)[seg == Y]


@pytest.mark.parametrize("arch", ["llama1", "qwen1"])
def test_one_layer_probe_targets_ignore_input_and_react_to_bottleneck(model_dirs, arch):
    model, tok = build(model_dirs[arch])
    ids, seg = batch(tok)
    perturbed_x = ids.clone()
    perturbed_x[seg == X] = torch.randint(5, 200, (int((seg == X).sum()),))
    perturbed_b = ids.clone()
    perturbed_b[seg == B] = torch.randint(5, 200, (int((seg == B).sum()),))  # other tokens in the b slots
    with torch.no_grad():
        base = _target_logits(model, ids, seg)
        assert torch.equal(_target_logits(model, perturbed_x, seg), base)
        assert (_target_logits(model, perturbed_b, seg) - base).abs().max() > 1e-3
        # negative control: with the plain causal mask the same probe sees the input
        causal = _target_logits(model, ids, seg, ib=False)
        assert (_target_logits(model, perturbed_x, seg, ib=False) - causal).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("sink", [True, False])
def test_kv_split_matches_dense_reference(model_dirs, arch, sink):
    dense, tok = build(model_dirs[arch], "dense", sink=sink)
    ids, seg = batch(tok, target="continuation")
    kv = BottleneckLM(dense.lm, dense.bottleneck_ids, "kv_split", sink)
    with torch.no_grad():
        ref, got = dense.hidden(ids, seg), kv.hidden(ids, seg)
    valid = seg != PAD
    assert (ref - got)[valid].abs().max() < 1e-5


def test_flex_matches_dense_reference(model_dirs):
    dense, tok = build(model_dirs["llama"], "dense")
    ids, seg = batch(tok)
    flex, _ = build(model_dirs["llama"], "flex")
    flex.lm.load_state_dict(dense.lm.state_dict())
    with torch.no_grad():
        ref, got = dense.hidden(ids, seg), flex.hidden(ids, seg)
    assert (ref - got)[seg != PAD].abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["dense", "kv_split"])
def test_eager_kernel_matches_sdpa(model_dirs, backend):
    """model.attn_implementation=eager (faster in bf16 on CPU) runs the same masks: the same states, packed too."""
    from lbr_ray.layout import pack

    sdpa, tok = build(model_dirs["llama"], backend)
    cfg = ModelConfig(name=str(model_dirs["llama"]), from_scratch=True, attn_backend=backend, lora=False,
                      attn_implementation="eager")
    eager, _ = BottleneckLM.build(cfg, BottleneckConfig(k=3, k_max=4), seed=0)
    assert eager.lm.config._attn_implementation == "eager" and sdpa.lm.config._attn_implementation == "sdpa"
    ids, seg = batch(tok)
    with torch.no_grad():
        assert (sdpa.hidden(ids, seg) - eager.hidden(ids, seg))[seg != PAD].abs().max() < 1e-5
    if backend == "dense":  # packed rows: the document mask as well
        sb = SequenceBuilder(tok, BottleneckConfig(k=3, k_max=4), 24, 24)
        rows = pack(sb.stage1_rows(TEXTS, "self", ib=True), 200)
        ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
        with torch.no_grad():
            ref, got = sdpa.hidden(ids, seg, packed=True), eager.hidden(ids, seg, packed=True)
        assert (ref - got)[seg != PAD].abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["dense", "kv_split"])
def test_padding_and_mixed_lengths_match_unpadded_rows(model_dirs, backend):
    model, tok = build(model_dirs["llama"], backend)
    ids, seg = batch(tok)
    with torch.no_grad():
        together = model.hidden(ids, seg)
        for r in range(ids.shape[0]):
            n = int((seg[r] != PAD).sum())
            alone = model.hidden(ids[r: r + 1, :n], seg[r: r + 1, :n])
            assert (together[r, :n] - alone[0]).abs().max() < 1e-5


def test_self_check_catches_an_ignored_mask(model_dirs, monkeypatch):
    model, tok = build(model_dirs["llama"])
    ids, seg = batch(tok)
    import lbr_ray.model.selfcheck as sc

    def leaky(decoder, ids, seg, ib=True, sink=True, output_attentions=False):  # a mask silently dropped
        out = decoder(input_ids=ids, attention_mask=(seg != PAD).long(), output_attentions=output_attentions)
        return (out.last_hidden_state, out.attentions) if output_attentions else out.last_hidden_state

    monkeypatch.setattr(sc, "dense_hidden", leaky)
    with pytest.raises(MaskLeakError, match="attend to input"):
        check_mask(model, ids, seg)


def test_lora_model_keeps_mask_and_trains_bottleneck_rows(model_dirs):
    model, tok = build(model_dirs["llama"], lora=True)
    ids, seg = batch(tok)
    check_mask(model, ids, seg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any("trainable_tokens" in n for n in names)
    assert not any(n.endswith("embed_tokens.weight") and "trainable" not in n for n in names)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_embedding_rows_need_no_padding_mask(model_dirs, arch, dtype):
    """Right-padded causal rows run without a mask (the kernels' fast causal path): each embedding equals the row's
    own, unpadded, and equals what the 2-D padding mask gives."""
    model, tok = build(model_dirs[arch])
    model = model.to(dtype)
    sb = SequenceBuilder(tok, BottleneckConfig(k=3, k_max=4), 24, 24)
    rows = sb.embed_rows(TEXTS)
    ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    assert (seg == PAD).any()
    with torch.no_grad():
        batch_emb = model.embed(ids, seg)
        masked = model.decoder(input_ids=ids, attention_mask=(seg != PAD).long()).last_hidden_state
        for r, (i, s) in enumerate(rows):
            alone = model.embed(torch.tensor([i]), torch.tensor([s]))
            assert (batch_emb[r] - alone[0]).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
        from lbr_ray.model.bottleneck import pool_bottleneck

        assert (pool_bottleneck(masked, seg) - batch_emb).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_embed_uses_last_bottleneck_state(model_dirs):
    model, tok = build(model_dirs["llama"])
    sb = SequenceBuilder(tok, BottleneckConfig(k=3, k_max=4), 24, 24)
    rows = sb.embed_rows(TEXTS)
    ids, seg = pad_rows([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    with torch.no_grad():
        emb = model.embed(ids, seg)
        hidden = model.hidden(ids, seg, ib=False)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)))
    for r, (row_ids, _) in enumerate(rows):
        expect = torch.nn.functional.normalize(hidden[r, len(row_ids) - 1], dim=-1)
        assert torch.allclose(emb[r], expect, atol=1e-6)
    with torch.no_grad():
        mean = model.embed(ids, seg, pooling="mean")
    assert not torch.allclose(mean, emb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_pooling_picks_b_k_in_long_bf16_rows(dtype):
    """Issue 13.1: 512 input tokens + k=2 puts b_1, b_2 at positions 513, 514, which round together in bf16."""
    seg = torch.tensor([[SINK] + [X] * 512 + [B] * 2, [SINK] + [X] * 3 + [B] * 2 + [PAD] * 509])
    hidden = torch.randn(2, seg.shape[1], 8).to(dtype)
    from lbr_ray.model.bottleneck import pool_bottleneck

    got = pool_bottleneck(hidden, seg, "last")
    for r, last in enumerate((514, 5)):
        assert torch.equal(got[r], torch.nn.functional.normalize(hidden[r, last].float(), dim=-1))
    mean = pool_bottleneck(hidden, seg, "mean")
    assert torch.allclose(mean[0], torch.nn.functional.normalize(hidden[0, 513:515].float().mean(0), dim=-1))


def test_kv_split_trains_under_gradient_checkpointing(model_dirs):
    """Issue 13.2: in training mode transformers drops the cache of checkpointed layers; kv_split must still run and
    match the dense reference in the forward and in every trainable parameter's gradient (LoRA + bottleneck rows)."""
    def grads(backend):
        cfg = ModelConfig(name=str(model_dirs["qwen2"]), from_scratch=True, attn_backend=backend, lora=True,
                          lora_dropout=0.0, gradient_checkpointing=True)
        model, tok = BottleneckLM.build(cfg, BottleneckConfig(k=2, k_max=4), seed=0)
        ids, seg = batch(tok, k=2, target="continuation")
        hidden = model.train().hidden(ids, seg)
        (hidden[seg == Y] ** 2).mean().backward()
        return hidden.detach()[seg != PAD], {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (h_ref, g_ref), (h_kv, g_kv) = grads("dense"), grads("kv_split")
    assert (h_ref - h_kv).abs().max() < 1e-5
    assert g_ref.keys() == g_kv.keys() and all(g is not None for g in g_kv.values())
    for name, g in g_ref.items():
        assert (g - g_kv[name]).abs().max() <= 1e-3 * g.abs().max() + 1e-8, name


def test_self_check_runs_the_training_path(model_dirs, monkeypatch):
    cfg = ModelConfig(name=str(model_dirs["qwen2"]), from_scratch=True, attn_backend="kv_split", lora=True,
                      gradient_checkpointing=True)
    model, tok = BottleneckLM.build(cfg, BottleneckConfig(k=2, k_max=4), seed=0)
    ids, seg = batch(tok, k=2, target="continuation")
    assert check_mask(model, ids, seg)["backend_grad_rel_diff"] < 1e-3
    import lbr_ray.model.attention.kv_split as kv

    def eval_only(decoder, ids, seg, ib=True, sink=True):  # a backend that only breaks in training mode
        if decoder.training:
            raise RuntimeError("'NoneType' object has no attribute 'key_cache'")
        return kv.kv_split_hidden(decoder, ids, seg, ib, sink)

    model._forward = eval_only
    with pytest.raises(RuntimeError, match="key_cache"):
        check_mask(model, ids, seg)


def test_encoder_dim_under_zero3_partitioning(model_dirs):
    """Issue 13: under ZeRO-3 each rank holds an empty partition of the embedding; its full shape is ds_shape."""
    from lbr_ray.model.encoder import Encoder

    model, tok = build(model_dirs["llama"])
    enc = Encoder(model, tok, BottleneckConfig(k=3, k_max=4), 24)
    hidden = model.decoder.config.hidden_size
    weight = model.decoder.get_input_embeddings().weight
    assert enc.dim == hidden
    full = weight.shape
    weight.data = torch.empty(0)
    weight.ds_shape = full
    assert enc.dim == hidden


def test_self_check_compares_a_dense_backend_with_nothing_twice(model_dirs):
    """Issue 11: with the dense backend the run-start check ran dense against itself (eval and training mode); it
    now runs each forward once, and a backend that is not the dense function itself is still compared."""
    from lbr_ray.model.attention.dense import dense_hidden

    model, tok = build(model_dirs["llama"])
    ids, seg = batch(tok)
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    dense = check_mask(model, ids, seg)
    n_dense = len(calls)
    model._forward = lambda *a, **k: dense_hidden(*a, **k)  # same maths, another function: compared
    calls.clear()
    other = check_mask(model, ids, seg)
    assert len(calls) == n_dense + 2  # + the backend's eval forward and its training-mode forward
    assert dense["backend_rel_diff"] == 0.0 and dense["backend_grad_rel_diff"] == 0.0
    assert other["backend_rel_diff"] < 1e-6 and other["backend_grad_rel_diff"] < 1e-6


def test_a_stage_trains_every_module_of_a_saved_model(tmp_path):
    """from_pretrained leaves a saved model's modules in eval mode (dropout off) while peft's LoRA layers train;
    a stage's model trains all of them (GR-CL's first dev evaluation used to switch them on midway)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lbr_ray.config import load_config
    from lbr_ray.recipes.setup import build_model

    AutoTokenizer.from_pretrained(str(TINY_DIR)).save_pretrained(tmp_path)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY_DIR))).save_pretrained(tmp_path)
    cfg = load_config("configs/demo.yaml", [f"model.name={tmp_path}", "model.from_scratch=false", "model.lora=true"])
    model, _ = build_model(cfg)
    assert all(m.training for m in model.modules())
