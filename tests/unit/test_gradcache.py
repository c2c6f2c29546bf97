"""GradCache (gr_cl.cache_chunk) equals the plain GR-CL step: 2 gloo workers, DeepSpeed ZeRO-0/1/2/3 on CPU, a tiny
Llama with dropout on (attention and LoRA): the loss and every trainable parameter's gradient match, the gradients
are reduced across workers as often as in the plain step, and without the RNG replay they do not match.

With dropout on, the reference is the plain step with the encoder run on the same chunks of rows (one graph over the
whole batch, the same dropout masks as GradCache's first pass); with dropout off it is today's step unchanged. One
pair of spawned workers runs every case (DeepSpeed engines built one after another in the same process group)."""
from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
WORLD, ROWS, CHUNK = 2, 4, 3  # rows per worker in chunks of 3 and 1 (a ragged last chunk)
# name -> (zero stage, hard negatives, gradient checkpointing, other overrides); under ZeRO-2 and ZeRO-3 each of
# hard negatives and checkpointing is on in one case and off in another
CASES = {
    "zero2": (2, 0, False, {}),
    "zero2_hard_ckpt": (2, 2, True, {}),
    "zero3_hard": (3, 1, False, {}),
    "zero3_ckpt": (3, 0, True, {}),
    "zero0_hard": (0, 1, False, {}),
    "zero1_hard": (1, 1, False, {}),
    "zero3_full_finetune_symmetric": (3, 1, False, {"model": {"lora": False}, "gr_cl": {"symmetric": True}}),
    "zero2_gen_no_dropout": (2, 1, False, {"gr_cl": {"gen_weight": 0.5, "symmetric": True}}),
    "zero2_bf16_hard_ckpt": (2, 1, True, {"deepspeed": {"bf16": True}}),
}
TOLERANCE = {"zero2_bf16_hard_ckpt": 2e-2}  # bf16 sums in another order
NO_REPLAY = "zero2_hard_ckpt"  # also run with the RNG replay switched off
NO_DROPOUT = {"zero2_gen_no_dropout"}
CURVE = "zero2"  # also trained for CURVE_STEPS steps (lr > 0), plain and cached from the same start
CURVE_STEPS = 3
REL_TOL = 1e-5


def tiny_dropout_llama(folder: Path, dropout: float) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    tiny = ROOT / "lbr_ray/assets/tiny-llama"
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    cfg = LlamaConfig.from_pretrained(tiny)
    cfg.attention_dropout = dropout
    cfg.num_hidden_layers = 1
    cfg.save_pretrained(folder)
    return folder


def case_config(name: str, model_dir: Path):
    from lbr_ray.config import LbrConfig, replace

    zero, hard, ckpt, extra = CASES[name]
    dropout = 0.0 if name in NO_DROPOUT else 0.1
    cfg = replace(LbrConfig(), model={"name": str(model_dir), "from_scratch": True, "lora_dropout": dropout,
                                      "gradient_checkpointing": ckpt},
                  bottleneck={"k": 2}, data={"max_input_tokens": 24, "max_target_tokens": 24},
                  gr_cl={"batch_size": ROWS, "hard_negatives": hard, "cache_chunk": CHUNK, "lr": 0.0,
                         "warmup_steps": 1},
                  deepspeed={"zero_stage": zero})
    return replace(cfg, **extra) if extra else cfg


def global_batch(cfg, tokenizer_path: str) -> dict:
    """WORLD * ROWS demo pairs as the GR-CL data path tokenizes them; negatives are other rows' positives, and one
    positive text appears on both workers (text keys mask the twins)."""
    from lbr_ray.data.ray_data import TokenizeStage2
    from lbr_ray.layout import collate_columns
    from lbr_ray.model.bottleneck import load_tokenizer

    with gzip.open(ROOT / "data/demo/medical/pairs.jsonl.gz", "rt") as f:
        records = [json.loads(next(f)) for _ in range(WORLD * ROWS)]
    queries, positives = [r["query"] for r in records], [r["positive"] for r in records]
    positives[ROWS + 1] = positives[1]
    n = len(records)
    raw = {"query": queries, "positive": positives, "_file": ["demo"] * n, "_line": list(range(n)),
           "negatives": [[positives[(i + 3) % n], positives[(i + 5) % n]] for i in range(n)]}
    g = cfg.gr_cl
    prefixes = ["q", "p"] + [f"n{h}" for h in range(g.hard_negatives)] + (["ib"] if g.gen_weight > 0 else [])
    pad = load_tokenizer(tokenizer_path, cfg.bottleneck.k_max).pad_token_id
    from lbr_ray.config import to_dict

    return collate_columns(TokenizeStage2(to_dict(cfg), tokenizer_path)(raw), prefixes, pad)


def rank_rows(batch: dict, rank: int) -> dict:
    return {k: v[rank * ROWS:(rank + 1) * ROWS] for k, v in batch.items()}


class ReduceCounter:
    """Counts DeepSpeed's gradient reductions (deepspeed.comm's *reduce* collectives) while active."""

    def __init__(self):
        import deepspeed.comm as ds_comm

        self.count, self.active = 0, False
        for name in [n for n in dir(ds_comm) if "reduce" in n and callable(getattr(ds_comm, n))]:
            setattr(ds_comm, name, self._wrap(getattr(ds_comm, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.count += self.active
            return fn(*args, **kwargs)
        return counted

    def run(self, fn, *args) -> tuple[dict, int]:
        self.count, self.active = 0, True
        try:
            return fn(*args), self.count
        finally:
            self.active = False


def chunked_embed(embed, size: int):
    """model.embed on `size` rows at a time, one graph: the plain step with GradCache's dropout masks."""
    from lbr_ray.train.gradcache import row_chunks

    def run(ids, seg, pooling="last"):
        return torch.cat([embed(ids[r], seg[r], pooling) for r in row_chunks(ids.shape[0], size)])
    return run


def build(cfg):
    from lbr_ray.model.bottleneck import BottleneckLM
    from lbr_ray.recipes.gr_cl import GRCLObjective
    from lbr_ray.train.deepspeed import initialize

    torch.manual_seed(0)  # the same weights and LoRA init on both workers
    model, _ = BottleneckLM.build(cfg.model, cfg.bottleneck, seed=0)
    model.train()
    for n, p in model.named_parameters():  # peft starts B at 0, which leaves A without gradient in step 1
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model, initialize(GRCLObjective(model, cfg), cfg.deepspeed, cfg.gr_cl, WORLD)


def run_case(name: str, model_dir: Path, rank: int, counter: ReduceCounter) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from lbr_ray.recipes.gr_cl import cached_step
    from lbr_ray.train import gradcache
    from lbr_ray.train.loop import plain_forward_backward

    cfg = case_config(name, model_dir)
    model, engine = build(cfg)
    gradcache.check_engine(engine)
    batch = rank_rows(global_batch(cfg, str(model_dir)), rank)

    def step(fn) -> dict:
        torch.manual_seed(1234)  # the same dropout stream for every variant
        out, reduces = counter.run(fn, engine, batch)
        grads = {n: safe_get_full_grad(p).detach().float().numpy().copy() for n, p in engine.module.named_parameters()
                 if p.requires_grad}  # numpy: the queue would hand tensors over in shared memory
        engine.step()  # lr 0: the weights stay, DeepSpeed's per-step state resets
        return {"loss": float(out["loss"]), "reduces": reduces, "grads": grads if rank == 0 else None}

    embed = model.embed
    if name not in NO_DROPOUT:
        model.embed = chunked_embed(embed, CHUNK)
    result = {"plain": step(plain_forward_backward)}
    model.embed = embed
    result["cached"] = step(cached_step)
    if name == NO_REPLAY:
        enter, leave = gradcache.RngState.__enter__, gradcache.RngState.__exit__
        gradcache.RngState.__enter__ = gradcache.RngState.__exit__ = lambda *a: None
        try:
            result["no_replay"] = step(cached_step)
        finally:
            gradcache.RngState.__enter__, gradcache.RngState.__exit__ = enter, leave
    result["trainable"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine.destroy()
    if name == CURVE:
        from lbr_ray.config import replace

        result["curve"] = curve(replace(cfg, gr_cl={"lr": 1e-3}), batch, rank)
    return result


def curve(cfg, batch: dict, rank: int) -> dict:
    """CURVE_STEPS training steps from the same start, plain (chunk-aligned encoder) and cached: the losses, and
    the trainable weights at the end."""
    from lbr_ray.recipes.gr_cl import cached_step
    from lbr_ray.train.loop import plain_forward_backward

    out = {}
    for variant, fn in (("plain", plain_forward_backward), ("cached", cached_step)):
        model, engine = build(cfg)
        if variant == "plain":
            model.embed = chunked_embed(model.embed, CHUNK)
        weights = lambda: {n: p.detach().float().numpy().copy()  # noqa: E731
                           for n, p in model.named_parameters() if p.requires_grad}
        start = weights()
        torch.manual_seed(1234)
        losses = []
        for _ in range(CURVE_STEPS):
            losses.append(float(fn(engine, batch)["loss"].detach()))
            engine.step()
        out[variant] = {"losses": losses, "weights": weights() if rank == 0 else None, "start": start}
        engine.destroy()
    return out


def _worker(rank: int, port: int, model_dir: str, dropout_free_dir: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        counter = ReduceCounter()
        out = {name: run_case(name, Path(dropout_free_dir if name in NO_DROPOUT else model_dir), rank, counter)
               for name in CASES}
        queue.put((rank, out))
    except BaseException as e:  # noqa: BLE001 - the test shows it instead of timing out
        import traceback

        queue.put((rank, traceback.format_exc()))
        raise SystemExit(1) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("gradcache")
    model_dir = tiny_dropout_llama(base / "dropout", 0.1)
    plain_dir = tiny_dropout_llama(base / "plain", 0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, str(model_dir), str(plain_dir), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, out in got.items():
        assert isinstance(out, dict), f"worker {rank} failed:\n{out}"
    return got


def rel_l2(a, b) -> float:
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(CASES))
def test_cached_step_equals_the_plain_step(results, name):
    for rank in range(WORLD):
        plain, cached = results[rank][name]["plain"], results[rank][name]["cached"]
        assert cached["loss"] == pytest.approx(plain["loss"], rel=TOLERANCE.get(name, REL_TOL))
        # one gradient reduction per step, as in the plain step (not one per chunk)
        assert cached["reduces"] == plain["reduces"] > 0
    plain, cached = results[0][name]["plain"]["grads"], results[0][name]["cached"]["grads"]
    assert plain.keys() == cached.keys() and sum(g.size for g in plain.values()) == results[0][name]["trainable"]
    worst = max((rel_l2(cached[k], plain[k]), k) for k in plain)
    assert worst[0] <= TOLERANCE.get(name, REL_TOL), worst
    assert all(abs(g).max() > 0 for g in plain.values())  # every trainable parameter has a gradient to compare


def test_without_the_rng_replay_dropout_draws_other_masks(results):
    plain, broken = results[0][NO_REPLAY]["plain"], results[0][NO_REPLAY]["no_replay"]
    assert broken["loss"] == pytest.approx(plain["loss"], rel=REL_TOL)  # pass 1 is the same
    worst = max(rel_l2(broken["grads"][k], plain["grads"][k]) for k in plain["grads"])
    assert worst > 0.1, worst


def test_a_few_training_steps_follow_the_plain_loss_curve(results):
    for rank in range(WORLD):
        plain, cached = results[rank][CURVE]["curve"]["plain"], results[rank][CURVE]["curve"]["cached"]
        assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    plain, cached = (results[0][CURVE]["curve"][v] for v in ("plain", "cached"))
    assert max(rel_l2(plain["weights"][k], plain["start"][k]) for k in plain["start"]) > 1e-3  # it trained
    assert max(rel_l2(cached["weights"][k], plain["weights"][k]) for k in plain["weights"]) <= 1e-4


def test_config_refuses_what_gradcache_cannot_take():
    from lbr_ray.config import load_config
    from lbr_ray.errors import ConfigError

    assert load_config("configs/demo.yaml", ["gr_cl.cache_chunk=8"]).gr_cl.cache_chunk == 8
    for overrides, message in ((["gr_cl.cache_chunk=-1"], "gr_cl.cache_chunk must be >= 0"),
                               (["gr_cl.cache_chunk=8", "gr_cl.grad_accum=2"], "set grad_accum: 1 and raise")):
        with pytest.raises(ConfigError, match=message):
            load_config("configs/demo.yaml", overrides)


def test_a_deepspeed_without_coalesced_reduction_is_refused_in_one_line(monkeypatch):
    """Before Ray starts (the driver's DeepSpeed) and in each worker (its engine): ZeRO-1/2/3 need
    engine.coalesce_grad_reduction (DeepSpeed >= 0.19.2); stage 0 runs on any DeepSpeed."""
    import importlib.metadata
    from types import SimpleNamespace

    from lbr_ray.config import load_config
    from lbr_ray.errors import ConfigError
    from lbr_ray.recipes.preflight import check_gradcache
    from lbr_ray.train.gradcache import check_engine, deepspeed_problem

    assert deepspeed_problem(2, "0.19.2") is None and deepspeed_problem(0, "0.16.0") is None
    assert "needs DeepSpeed >= 0.19.2" in deepspeed_problem(3, "0.18.6")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.18.6")
    with pytest.raises(ConfigError, match=r"ZeRO stage 2 needs DeepSpeed >= 0\.19\.2 .*this is 0\.18\.6") as info:
        check_gradcache(load_config("configs/demo.yaml", ["gr_cl.cache_chunk=8"]))
    assert len(str(info.value).splitlines()) == 1
    check_gradcache(load_config("configs/demo.yaml", ["gr_cl.cache_chunk=8", "deepspeed.zero_stage=0"]))
    with pytest.raises(ConfigError, match="ZeRO stage 3 needs DeepSpeed"):
        check_engine(SimpleNamespace(zero_optimization_stage=lambda: 3))  # an engine without the method
    check_engine(SimpleNamespace(zero_optimization_stage=lambda: 0))
