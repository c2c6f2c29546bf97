"""Stage 2, GR-CL: InfoNCE on bottleneck embeddings (negatives gathered across workers), optional IB loss on
query -> positive (gen_weight), dev R@10 every `eval_every` steps, collapse monitor; Ray Train + DeepSpeed."""
from __future__ import annotations

import logging

import torch
from torch import nn

from lbr_ray.losses import IBGenerativeLoss, InfoNCELoss
from lbr_ray.losses.ib_generative import scored_counts
from lbr_ray.model.encoder import Encoder, encode_shared
from lbr_ray.layout import PAD
from lbr_ray.recipes.setup import build_model
from lbr_ray.train.deepspeed import initialize
from lbr_ray.train.flops import FlopCounter
from lbr_ray.train import gradcache
from lbr_ray.train.loop import train_loop
from lbr_ray.train.telemetry import embedding_stats
from lbr_ray.train.worker import WorkerRun

log = logging.getLogger("lbr_ray")


class GRCLObjective(nn.Module):
    """`objective(batch)`: the step's losses with one graph over the whole batch. With GradCache (gr_cl.cache_chunk,
    `cached_step`): `objective(rows, part="q")` embeds rows of one text column, `objective(rows, part="ib",
    counts=...)` is those rows' share of gen_weight * the batch's IB loss."""

    def __init__(self, model, cfg):
        super().__init__()
        g = cfg.gr_cl
        self.model, self.pooling, self.hard = model, cfg.bottleneck.pooling, g.hard_negatives
        self.nce = InfoNCELoss(g.temperature, symmetric=g.symmetric, gather=g.gather)
        self.gen_weight, self.gen = g.gen_weight, IBGenerativeLoss(cfg.ib_gl.alpha)
        self.counter = FlopCounter(model)
        self.encoded = ["q", "p"] + [f"n{h}" for h in range(self.hard)]  # the columns InfoNCE sees
        self.cache_chunk = g.cache_chunk

    def forward(self, batch: dict, part: str | None = None, counts=None):
        if part == "ib":
            return self.gen_share(batch, counts)
        if part is not None:
            return self.embed(batch, part)
        out = self.contrastive(batch, {name: self.embed(batch, name) for name in self.encoded})
        if self.gen_weight > 0:
            gen_out = self.gen(self.model, batch["ib_ids"], batch["ib_seg"])
            out = self.with_gen(out, batch, gen_out["loss"], gen_out["head_rows"])
        return out

    def embed(self, batch: dict, part: str) -> torch.Tensor:
        return self.model.embed(batch[f"{part}_ids"], batch[f"{part}_seg"], self.pooling)  # [N, D]

    def contrastive(self, batch: dict, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """InfoNCE on the embeddings of the columns `self.encoded`, and the step's metrics."""
        negs = torch.cat([emb[f"n{h}"] for h in range(self.hard)]) if self.hard else None
        keys = None
        if "p_key" in batch:  # text keys: a duplicate of the label is no negative
            keys = {"q": batch["q_key"], "p": batch["p_key"]}
            if self.hard:
                keys["n"] = torch.cat([batch[f"n{h}_key"] for h in range(self.hard)])
        nce = self.nce(emb["q"], emb["p"], negs, keys=keys)
        out = {"loss": nce, "nce_loss": nce.detach()}
        out["flops"] = sum(self.counter.flops(batch[f"{name}_seg"], 0, ib=False) for name in self.encoded)
        stats = embedding_stats(emb["q"])
        out["emb_std"], out["emb_mean_cos"] = (torch.tensor(stats[k]) for k in ("emb_std", "emb_mean_cos"))
        out["tokens"] = sum((batch[k] != PAD).sum() for k in batch if k.endswith("_seg"))
        return out

    def with_gen(self, out: dict, batch: dict, gen: torch.Tensor, head_rows) -> dict:
        """`out` plus gen_weight * the IB loss `gen` on query -> positive (rows batch["ib_*"])."""
        out["gen_loss"], out["loss"] = gen.detach(), out["loss"] + self.gen_weight * gen
        out["flops"] = out["flops"] + self.counter.flops(batch["ib_seg"], head_rows, ib=True)
        return out

    def gen_share(self, rows: dict, counts: tuple) -> dict[str, torch.Tensor]:
        """gen_weight * these rows' share of the batch's IB loss, whose (target, input) means run over the batch's
        `counts` scored positions: summed over the batch's rows, the shares are gen_weight * the IB loss."""
        out = self.gen(self.model, rows["ib_ids"], rows["ib_seg"])
        n_target, n_input = counts
        mine = scored_counts(rows["ib_seg"])
        share = out["target_loss"] * (mine[0] / n_target) if n_target else out["loss"].new_zeros(())
        input_weight = self.gen.alpha if n_target else 1.0
        if input_weight and n_input:
            share = share + input_weight * out["input_loss"] * (mine[1] / n_input)
        return {"loss": self.gen_weight * share, "head_rows": out["head_rows"]}


def cached_step(engine, batch: dict) -> dict[str, torch.Tensor]:
    """One GR-CL step with GradCache (gr_cl.cache_chunk > 0; lbr_ray.train.gradcache): the loss and gradients of
    `engine(batch)` + `engine.backward`, with the activations of cache_chunk rows at a time. The candidates are
    gathered from every worker as in the plain step; the second pass back-propagates d loss / d this worker's
    embeddings, and all chunk backwards of the step reduce the gradients across workers once."""
    objective, size = engine.module, engine.module.cache_chunk
    first = {part: gradcache.encode_without_graph(engine, batch, part, size) for part in objective.encoded}
    emb = {part: cached.detach().requires_grad_() for part, (cached, _) in first.items()}
    out = objective.contrastive(batch, emb)
    grads = torch.autograd.grad(out["loss"], [emb[part] for part in objective.encoded])
    with gradcache.one_reduction(engine):
        for part, grad in zip(objective.encoded, grads):
            gradcache.backward_chunks(engine, batch, part, first[part][1], grad)
        if objective.gen_weight > 0:  # no cross-row terms: chunks accumulate their shares, nothing to cache
            counts, gen, head_rows = scored_counts(batch["ib_seg"]), 0.0, 0
            for rows in gradcache.row_chunks(batch["ib_ids"].shape[0], size):
                share = engine(gradcache.sub_batch(batch, "ib", rows), part="ib", counts=counts)
                if share["loss"].requires_grad:
                    engine.backward(share["loss"])
                gen, head_rows = gen + share["loss"].detach(), head_rows + share["head_rows"]
            out = objective.with_gen(out, batch, gen / objective.gen_weight, head_rows)
    out["loss"] = out["loss"].detach()
    return out


def dev_eval(encoder: Encoder, dev: dict, batch_size: int | None = None, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    """R@10 / NDCG@10 on the small in-domain dev set; the ranks encode a share each (see `encode_shared`)."""
    from lbr_ray.eval.metrics import dev_metrics, retrieve_exact
    from lbr_ray.hardware import encode_batch_size

    batch_size = batch_size or encode_batch_size(torch.cuda.is_available())
    emb = encode_shared(encoder, dev["queries"] + dev["docs"], batch_size, rank, world)
    q, d = emb[: len(dev["queries"])], emb[len(dev["queries"]):]
    top = retrieve_exact(q, d, k=10)[1]
    m = dev_metrics(top, dev["qrels"], ks=(10,))
    return {"dev_recall@10": m["recall@10"], "dev_ndcg@10": m["ndcg@10"]}


def collapse_warning(metrics: dict, cfg) -> bool:
    """The paper's failure signature: near-zero embedding variance or all embeddings pointing one way."""
    bad = metrics.get("emb_std", 1.0) < cfg.gr_cl.collapse_std or metrics.get("emb_mean_cos", 0.0) > cfg.gr_cl.collapse_cos
    if bad:
        log.warning("representation collapse? emb_std=%.3g emb_mean_cos=%.3f at step %d",
                    metrics["emb_std"], metrics["emb_mean_cos"], metrics["step"])
    return bad


def train_fn(config: dict) -> None:
    run = WorkerRun(config, "gr_cl")
    cfg, st = run.cfg, run.cfg.gr_cl
    prefixes = ["q", "p"] + [f"n{h}" for h in range(st.hard_negatives)] + (["ib"] if st.gen_weight > 0 else [])
    batches = run.batches(prefixes, st.batch_size, run.pad_id(config.get("init")), length_groups=st.length_groups)
    model, tok = build_model(cfg, init=config.get("init"))
    run.mark("model")
    encoder = Encoder(model, tok, cfg.bottleneck, cfg.data.max_input_tokens)
    engine = initialize(GRCLObjective(model, cfg), cfg.deepspeed, st, run.world)
    if st.cache_chunk:
        gradcache.check_engine(engine)
        log.info("gr_cl: GradCache, the %d rows per worker of each text column encoded %d at a time (%d chunks), "
                 "one gradient reduction per step", st.batch_size, st.cache_chunk, -(-st.batch_size // st.cache_chunk))
    run.mark("deepspeed")
    state = run.resume(engine)
    dev, last_eval = config.get("dev"), {}

    def dev_at(state) -> dict:  # once per step: the final log and the final checkpoint share one evaluation
        if last_eval.get("step") != state.step:
            last_eval.update(step=state.step, metrics=dev_eval(encoder, dev, rank=run.rank, world=run.world))
        return last_eval["metrics"]

    evaluate = dev_at if dev else None
    if evaluate is not None and st.eval_at_start and state.step == 0:
        run.report({"step": 0, **evaluate(state)})  # the step-0 reference point
    telemetry = run.telemetry(st.max_steps, state)

    def on_log(metrics: dict) -> None:
        metrics["collapse_warning"] = float(collapse_warning(metrics, cfg))
        run.report(metrics)

    def on_checkpoint(state) -> None:
        extra = evaluate(state) if evaluate is not None and state.step == st.max_steps else None
        run.checkpoint(engine, model, tok, state, extra)

    try:
        train_loop(engine, batches, st, state, telemetry, run.world, on_log=on_log, on_checkpoint=on_checkpoint,
                   on_eval=evaluate, eval_every=st.eval_every, forward_backward=cached_step if st.cache_chunk else None)
    finally:
        telemetry.close()
