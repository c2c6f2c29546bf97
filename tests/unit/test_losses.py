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


def _encoder():  # float64: the sharded and the single-process sums differ in order, not beyond rounding
    torch.manual_seed(0)
    return torch.nn.Linear(8, 6, dtype=torch.float64)


def _data():
    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    p[5] = p[1]  # the same positive on both ranks (rank 0 row 1, rank 1 row 1)
    n[6] = p[2]  # a hard negative that is another row's positive
    q[7] = q[3]  # the same query on both ranks (rank 0 row 3, rank 1 row 3), with different positives
    keys = {"q": torch.arange(8), "p": torch.arange(8) + 100, "n": torch.arange(8) + 200}
    keys["p"][5], keys["n"][6], keys["q"][7] = keys["p"][1], keys["p"][2], keys["q"][3]
    return q, p, n, keys


def _loss(enc, q, p, n, keys, symmetric, use_negatives):
    emb = lambda x: F.normalize(enc(x), dim=-1)  # noqa: E731
    return InfoNCELoss(0.05, symmetric=symmetric)(emb(q), emb(p), emb(n) if use_negatives else None, keys=keys)


def _worker(rank, world, port, symmetric, use_negatives, use_keys, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    enc = _encoder()
    q, p, n, keys = _data()
    q, p, n = (t.chunk(world)[rank] for t in (q, p, n))
    keys = {k: v.chunk(world)[rank] for k, v in keys.items()} if use_keys else None
    loss = _loss(enc, q, p, n, keys, symmetric, use_negatives)
    loss.backward()
    grads = [param.grad.clone() for param in enc.parameters()]
    for g in grads:  # what DDP / DeepSpeed do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    total = loss.detach().clone()
    dist.all_reduce(total)
    queue.put((rank, float(total) / world, [g.numpy() for g in grads]))
    dist.destroy_process_group()


@pytest.mark.parametrize("symmetric, use_negatives, use_keys", [(False, False, False), (False, True, False),
                                                                (True, True, False), (True, True, True)])
def test_gathered_loss_and_gradients_equal_single_process(symmetric, use_negatives, use_keys):
    enc = _encoder()
    q, p, n, keys = _data()
    loss = _loss(enc, q, p, n, keys if use_keys else None, symmetric, use_negatives)
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, symmetric, use_negatives, use_keys, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for _, dist_loss, grads in results:
        assert abs(dist_loss - float(loss)) < 1e-5
        for g, param in zip(grads, enc.parameters()):
            assert torch.allclose(torch.from_numpy(g), param.grad, atol=1e-6)


def test_duplicate_texts_in_a_batch_are_not_negatives():
    """Issue 13: two queries with the same positive text made each other's positive a false negative."""
    x = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    q = F.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2]]), dim=-1)
    p = torch.cat([x, x])  # the same positive twice
    nce = InfoNCELoss(0.05, gather=False)
    assert torch.allclose(nce(q, p), torch.log(torch.tensor(2.0)))  # unmasked: the twin is an equal negative
    keys = {"q": torch.tensor([1, 2]), "p": torch.tensor([7, 7])}
    assert float(nce(q, p, keys=keys)) == 0.0
    negatives = torch.cat([x, F.normalize(torch.tensor([[0.0, 1.0]]), dim=-1)])  # hard negative 0 = the positive
    masked = nce(q, p, negatives, keys={**keys, "n": torch.tensor([7, 9])})
    ref = F.cross_entropy(torch.stack([q[i] @ torch.stack([p[i], negatives[1]]).T for i in range(2)]) / 0.05,
                          torch.zeros(2, dtype=torch.long))
    assert torch.allclose(masked, ref)


def test_twin_queries_and_shared_positives_are_not_negatives():
    """Issue 21.3: two pairs with the same query made each one's positive a negative of the other (loss floor log 2
    where it is 0), and in the symmetric term a query sharing this row's positive was a negative."""
    tau, log2 = 0.05, torch.log(torch.tensor(2.0))
    x = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    tilted = F.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2]]), dim=-1)
    nce, sym = InfoNCELoss(tau, gather=False), InfoNCELoss(tau, symmetric=True, gather=False)
    twins = {"q": torch.tensor([1, 1]), "p": torch.tensor([7, 8])}  # one query text, two positives
    assert torch.allclose(nce(torch.cat([x, x]), tilted), log2)  # unmasked: the floor
    assert float(nce(torch.cat([x, x]), tilted, keys=twins)) == 0.0
    shared = {"q": torch.tensor([1, 2]), "p": torch.tensor([7, 7])}  # two queries, one positive text
    assert torch.allclose(sym(tilted, torch.cat([x, x])), log2)  # unmasked: each term log 2
    assert float(sym(tilted, torch.cat([x, x]), keys=shared)) == 0.0
    # three rows, rows 0 and 1 twins: by hand, each row's cross-entropy over the candidates it keeps
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    q = torch.stack([q[0], q[0], q[2]])
    keys = {"q": torch.tensor([1, 1, 2]), "p": torch.tensor([7, 8, 9])}
    keep = [[0, 2], [1, 2], [0, 1, 2]]  # row 0 drops p1, row 1 drops p0 (forward); q1 / q0 likewise (backward)

    def ce(sim: torch.Tensor) -> torch.Tensor:
        return torch.stack([-torch.log_softmax(sim[i, keep[i]] / tau, -1)[keep[i].index(i)] for i in range(3)]).mean()

    assert torch.allclose(nce(q, p, keys=keys), ce(q @ p.T), atol=1e-6)
    assert torch.allclose(sym(q, p, keys=keys), (ce(q @ p.T) + ce(p @ q.T)) / 2, atol=1e-6)
