"""Losses against hand-computed references; InfoNCE across 2 gloo processes equals one process on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lbr_ray.losses import IBGenerativeLoss, InfoNCELoss
from lbr_ray.layout import B, PAD, SINK, X, Y


def test_ib_loss_is_cross_entropy_on_target_tokens_only():
    torch.manual_seed(0)
    vocab, hidden = 11, 6
    head = torch.nn.Linear(hidden, vocab, bias=False)
    seg = torch.tensor([[SINK, X, X, B, Y, Y, PAD]])
    ids = torch.tensor([[1, 5, 6, 9, 5, 6, 0]])
    h = torch.randn(1, 7, hidden)
    out = IBGenerativeLoss(alpha=0.5).from_hidden(h, head, ids, seg)
    logits = head(h[0])
    # positions 3 (b_k -> y1) and 4 (y1 -> y2) predict targets; positions 0, 1 predict x tokens
    target = F.cross_entropy(logits[[3, 4]], ids[0, [4, 5]])
    inputs = F.cross_entropy(logits[[0, 1]], ids[0, [1, 2]])
    assert torch.allclose(out["target_loss"], target) and torch.allclose(out["input_loss"], inputs)
    assert torch.allclose(out["loss"], target + 0.5 * inputs)
    assert int(out["tokens"]) == 2


def test_plain_lm_rows_use_input_loss():
    head = torch.nn.Linear(4, 7, bias=False)
    seg = torch.tensor([[SINK, X, X, X]])
    ids = torch.tensor([[1, 2, 3, 4]])
    h = torch.randn(1, 4, 4)
    out = IBGenerativeLoss().from_hidden(h, head, ids, seg)
    assert torch.allclose(out["loss"], F.cross_entropy(head(h[0, :3]), ids[0, 1:]))


def test_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(k, 8), dim=-1) for k in (4, 4, 4))
    tau = 0.05
    logits = q @ torch.cat([p, n]).T / tau
    expect = -torch.log_softmax(logits, -1)[torch.arange(4), torch.arange(4)].mean()
    assert torch.allclose(InfoNCELoss(tau)(q, p, n), expect, atol=1e-6)
    sym = (F.cross_entropy(q @ p.T / tau, torch.arange(4)) + F.cross_entropy(p @ q.T / tau, torch.arange(4))) / 2
    assert torch.allclose(InfoNCELoss(tau, symmetric=True)(q, p), sym, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 6)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)


def _loss(enc, q, p, n, symmetric, use_negatives):
    emb = lambda x: F.normalize(enc(x), dim=-1)  # noqa: E731
    return InfoNCELoss(0.05, symmetric=symmetric)(emb(q), emb(p), emb(n) if use_negatives else None)


def _worker(rank, world, port, symmetric, use_negatives, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    enc = _encoder()
    q, p, n = (t.chunk(world)[rank] for t in _data())
    loss = _loss(enc, q, p, n, symmetric, use_negatives)
    loss.backward()
    grads = [param.grad.clone() for param in enc.parameters()]
    for g in grads:  # what DDP / DeepSpeed do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    total = loss.detach().clone()
    dist.all_reduce(total)
    queue.put((rank, float(total) / world, [g.numpy() for g in grads]))
    dist.destroy_process_group()


@pytest.mark.parametrize("symmetric, use_negatives", [(False, False), (False, True), (True, True)])
def test_gathered_loss_and_gradients_equal_single_process(symmetric, use_negatives):
    enc = _encoder()
    loss = _loss(enc, *_data(), symmetric, use_negatives)
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, symmetric, use_negatives, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for _, dist_loss, grads in results:
        assert abs(dist_loss - float(loss)) < 1e-5
        for g, param in zip(grads, enc.parameters()):
            assert torch.allclose(torch.from_numpy(g), param.grad, atol=1e-6)
