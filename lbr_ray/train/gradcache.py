"""GradCache (Gao et al. 2021, arXiv 2101.06983) through a DeepSpeed engine (no Ray): a contrastive loss over a
batch whose activations do not fit at once, with the loss and gradients of the whole batch.

    emb, states = encode_without_graph(engine, batch, "q", chunk)  # pass 1: no graph, each chunk's RNG state kept
    leaf = emb.detach().requires_grad_(); loss = f(leaf, ...)       # the loss on the cached embeddings
    grad, = torch.autograd.grad(loss, [leaf])                       # d loss / d embedding
    with one_reduction(engine):
        backward_chunks(engine, batch, "q", states, grad)           # pass 2: each chunk again, with its graph
    engine.step()

The engine's module answers `module(batch, part=name)` with the embeddings of the rows `batch[name_ids]`,
`batch[name_seg]`. Pass 2 replays each chunk's CPU and GPU random state (as torch.utils.checkpoint does), so dropout
draws the masks of pass 1: the gradients are those of the loss computed on the embeddings of pass 1.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from lbr_ray.errors import ConfigError

# engine.coalesce_grad_reduction (deepspeedai/DeepSpeed#7992)
COALESCE_MIN_DEEPSPEED = "0.19.2"


class RngState:
    """The random state now: the CPU generator and the generator of `like`'s GPU. `with state:` runs its block from
    that state and afterwards restores the state the block started with."""

    def __init__(self, like: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.device_type = like.device.type
        self.devices, self.states = get_device_states(like)  # none for a CPU tensor

    def __enter__(self) -> None:
        kind = self.device_type if self.devices else "cuda"  # no devices: fork_rng touches no GPU
        self._fork = torch.random.fork_rng(devices=self.devices, device_type=kind)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.states, device_type=kind)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def row_chunks(rows: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def sub_batch(batch: dict, part: str, rows: slice) -> dict:
    return {f"{part}_ids": batch[f"{part}_ids"][rows], f"{part}_seg": batch[f"{part}_seg"][rows]}


def encode_without_graph(engine, batch: dict, part: str, size: int) -> tuple[torch.Tensor, list]:
    """Embeddings [N, D] of the rows of `part`, `size` rows at a time, without autograd graph, and each chunk's
    (rows, RngState) for `backward_chunks`."""
    embeddings, states = [], []
    with torch.no_grad():
        for rows in row_chunks(batch[f"{part}_ids"].shape[0], size):
            sub = sub_batch(batch, part, rows)
            states.append((rows, RngState(sub[f"{part}_ids"])))
            embeddings.append(engine(sub, part=part))
    return torch.cat(embeddings), states


def backward_chunks(engine, batch: dict, part: str, states: list, grad: torch.Tensor) -> None:
    """Encode each chunk again with its graph, from its pass-1 random state, and back-propagate its embeddings'
    share of the loss's gradient (d/dθ of <embedding, grad>), accumulating into the parameters' gradients."""
    for rows, state in states:
        with state:
            emb = engine(sub_batch(batch, part, rows), part=part)
        engine.backward(torch.dot(emb.flatten(), grad[rows].to(emb.dtype).flatten()))


def deepspeed_problem(zero_stage: int, version: str, coalesces: bool | None = None) -> str | None:
    """Why DeepSpeed `version` cannot run GradCache's chunk backwards at `zero_stage` as one reduction (None: it
    can); `coalesces`: whether the engine has coalesce_grad_reduction (default: from the version)."""
    if coalesces is None:
        from packaging.version import Version

        coalesces = Version(version) >= Version(COALESCE_MIN_DEEPSPEED)
    if zero_stage == 0 or coalesces:
        return None
    return (f"gr_cl.cache_chunk under ZeRO stage {zero_stage} needs DeepSpeed >= {COALESCE_MIN_DEEPSPEED} "
            f"(engine.coalesce_grad_reduction); this is {version}; upgrade it or set gr_cl.cache_chunk: 0")


def check_engine(engine) -> None:
    """In the worker: refuse, in one line, an engine that cannot reduce several backwards once."""
    import deepspeed

    problem = deepspeed_problem(engine.zero_optimization_stage(), deepspeed.__version__,
                                hasattr(engine, "coalesce_grad_reduction"))
    if problem:
        raise ConfigError(problem)


@contextmanager
def one_reduction(engine):
    """The backwards inside accumulate into the next optimizer step, and the gradients are reduced across workers
    once, at the end. ZeRO-1/2/3: DeepSpeed's coalesce_grad_reduction (each engine.backward alone would reduce per
    chunk under ZeRO-2/3, and two backwards inside one would fail with 'Gradient computed twice for this
    partition'). Stage 0: no_sync, then one all-reduce (each backward alone would average the gradients at every
    chunk, mixing averaged and local ones)."""
    if engine.zero_optimization_stage() > 0:
        with engine.coalesce_grad_reduction():
            yield
        return
    with engine.no_sync():
        yield
    engine.allreduce_gradients()
