"""Stage 2, GR-CL: InfoNCE on bottleneck embeddings (negatives gathered across workers), optional IB loss on
query -> positive (gen_weight), dev R@10 every `eval_every` steps, collapse monitor; Ray Train + DeepSpeed."""
from __future__ import annotations

import logging

import torch
from torch import nn

from lbr_ray.losses import IBGenerativeLoss, InfoNCELoss
from lbr_ray.model.encoder import Encoder, encode_shared
from lbr_ray.layout import PAD
from lbr_ray.recipes.setup import build_model
from lbr_ray.train.deepspeed import initialize
from lbr_ray.train.flops import FlopCounter
from lbr_ray.train.loop import train_loop
from lbr_ray.train.telemetry import embedding_stats
from lbr_ray.train.worker import WorkerRun

log = logging.getLogger("lbr_ray")


class GRCLObjective(nn.Module):
    def __init__(self, model, cfg):
        super().__init__()
        g = cfg.gr_cl
        self.model, self.pooling, self.hard = model, cfg.bottleneck.pooling, g.hard_negatives
        self.nce = InfoNCELoss(g.temperature, symmetric=g.symmetric, gather=g.gather)
        self.gen_weight, self.gen = g.gen_weight, IBGenerativeLoss(cfg.ib_gl.alpha)
        self.counter = FlopCounter(model)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        embed = lambda p: self.model.embed(batch[f"{p}_ids"], batch[f"{p}_seg"], self.pooling)  # noqa: E731
        q, p = embed("q"), embed("p")  # [N, D] each
        negs = torch.cat([embed(f"n{h}") for h in range(self.hard)]) if self.hard else None
        keys = None
        if "p_key" in batch:  # text keys: a duplicate of the label is no negative
            keys = {"q": batch["q_key"], "p": batch["p_key"]}
            if self.hard:
                keys["n"] = torch.cat([batch[f"n{h}_key"] for h in range(self.hard)])
        nce = self.nce(q, p, negs, keys=keys)
        out = {"loss": nce, "nce_loss": nce.detach()}
        prefixes = ["q", "p"] + [f"n{h}" for h in range(self.hard)]
        flops = sum(self.counter.flops(batch[f"{name}_seg"], 0, ib=False) for name in prefixes)
        if self.gen_weight > 0:
            gen_out = self.gen(self.model, batch["ib_ids"], batch["ib_seg"])
            gen = gen_out["loss"]
            out["gen_loss"], out["loss"] = gen.detach(), nce + self.gen_weight * gen
            flops = flops + self.counter.flops(batch["ib_seg"], gen_out["head_rows"], ib=True)
        out["flops"] = flops
        stats = embedding_stats(q)
        out["emb_std"], out["emb_mean_cos"] = (torch.tensor(stats[k]) for k in ("emb_std", "emb_mean_cos"))
        out["tokens"] = sum((batch[k] != PAD).sum() for k in batch if k.endswith("_seg"))
        return out


def dev_eval(encoder: Encoder, dev: dict, batch_size: int = 64, rank: int = 0, world: int = 1) -> dict[str, float]:
    """R@10 / NDCG@10 on the small in-domain dev set; the ranks encode a share each (see `encode_shared`)."""
    from lbr_ray.eval.metrics import dev_metrics, retrieve_exact

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
    run.mark("deepspeed")
    state = run.resume(engine)
    dev, last_eval = config.get("dev"), {}

    def dev_at(state) -> dict:  # once per step: the final log and the final checkpoint share one evaluation
        if last_eval.get("step") != state.step:
            last_eval.update(step=state.step, metrics=dev_eval(encoder, dev, rank=run.rank, world=run.world))
        return last_eval["metrics"]

    evaluate = dev_at if dev else None
    if evaluate is not None and state.step == 0:
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
                   on_eval=evaluate, eval_every=st.eval_every)
    finally:
        telemetry.close()
