"""The step loop shared by both stages (no Ray): DeepSpeed engine, batches, hooks for log/eval/checkpoint."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from lbr_ray.config.schema import StageConfig
from lbr_ray.train.checkpoint import LoopState
from lbr_ray.train.telemetry import Telemetry


def train_loop(engine, batches: Callable[[int], Iterable[dict]], stage: StageConfig, state: LoopState,
               telemetry: Telemetry, world: int, on_log: Callable[[dict], None],
               on_checkpoint: Callable[[LoopState], None],
               on_eval: Callable[[LoopState], dict] | None = None, eval_every: int = 0,
               forward_backward: Callable[[object, dict], dict] | None = None) -> LoopState:
    """Run micro-batches until `stage.max_steps` optimizer steps; `batches(epoch)` yields that epoch's data.
    `forward_backward(engine, batch)` runs a micro-batch's forward and backward (default: `engine(batch)`, then
    `engine.backward` of its "loss") and returns its metrics dict.

    On resume, `state.batch_in_epoch` batches of the current epoch are skipped, so the data stream continues
    where the checkpoint left it (same files, same seed).
    """
    last_saved = state.step
    while state.step < stage.max_steps and state.epoch < stage.epochs:
        for i, batch in enumerate(batches(state.epoch)):
            if i < state.batch_in_epoch:
                continue
            boundary = engine.is_gradient_accumulation_boundary()
            out = (forward_backward or plain_forward_backward)(engine, batch)
            engine.step()  # optimizer + schedule step on accumulation boundaries only
            state.batch_in_epoch = i + 1
            tokens = int(out.pop("tokens"))  # this rank's; telemetry.flush sums the ranks for tokens/s
            state.tokens += tokens * world  # all ranks', assuming balanced shards (equal split, fixed batch)
            telemetry.add(out, tokens)
            if not boundary:
                continue
            state.step += 1
            evaluate = on_eval is not None and eval_every and state.step % eval_every == 0
            if evaluate or state.step % stage.log_every == 0 or state.step == stage.max_steps:
                metrics = telemetry.flush(state.step, engine.get_lr()[0], world)  # .item()-style sync point
                if evaluate:  # on its own schedule, not only on logging steps
                    metrics.update(on_eval(state))
                telemetry.show(metrics)
                on_log(metrics)
            if state.step % stage.checkpoint_every == 0 and state.step < stage.max_steps:
                on_checkpoint(state)
                last_saved = state.step
            if state.step >= stage.max_steps:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        break
    if last_saved != state.step:
        on_checkpoint(state)
    return state


def plain_forward_backward(engine, batch: dict) -> dict:
    out = engine(batch)  # dict: loss, tokens (non-pad tokens in this micro-batch), extra scalars to log
    engine.backward(out["loss"])
    return out
