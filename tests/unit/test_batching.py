"""CPU-speed batching: length-grouped GR-CL batches (less padding, every row once, seeded) and the dev set encoded
in shares by the ranks (the gathered embeddings equal one process's, every rank runs as many forward passes)."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch

from lbr_ray.layout import length_groups, padding_fraction
from lbr_ray.model.encoder import encode_shared
from tests.unit.test_losses import _free_port


def test_length_groups_cut_padding_and_keep_every_row_once():
    lengths = np.random.default_rng(0).integers(5, 100, size=16 * 50 + 7)
    batches = length_groups(lengths, 16, np.random.default_rng(1))
    assert len(batches) == 50 and all(len(b) == 16 for b in batches)
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen) == 800  # each row at most once; only the 7 left over are dropped
    grouped = padding_fraction([int(lengths[i]) for b in batches for i in b], 16)
    assert grouped < 0.03 < 0.3 < padding_fraction(lengths.tolist(), 16)  # sorted runs: almost no padding
    again = length_groups(lengths, 16, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded: a resumed run sees the same batches
    order = [int(lengths[b].max()) for b in batches]
    assert order != sorted(order)  # the batches come in a random order, not shortest first


def test_length_groups_of_two_columns_sort_by_the_longer_then_the_shorter():
    """Query and positive rows pad separately: equal positives (truncated at the limit) group by query length."""
    rng = np.random.default_rng(0)
    q, p = rng.integers(5, 40, size=64), np.where(rng.random(64) < 0.5, 100, rng.integers(20, 100, size=64))
    batches = length_groups(np.stack([q, p], 1), 8, np.random.default_rng(0))
    cost = sum(8 * (q[b].max() + p[b].max()) for b in batches)
    by_sum = np.argsort(q + p, kind="stable")
    cost_sum = sum(8 * (q[by_sum[s: s + 8]].max() + p[by_sum[s: s + 8]].max()) for s in range(0, 64, 8))
    assert cost < cost_sum  # less padding than sorting by the total length
    assert all(len(set(p[b])) == 1 for b in batches if 100 in p[b] and p[b].min() == 100)


class CountingEncoder:
    """Embeds a text as a fixed function of its length and first letter; counts its forward passes."""

    def __init__(self):
        self.model, self.calls = torch.nn.Linear(1, 1), 0

    def encode(self, texts, batch_size):
        self.calls += -(-len(texts) // batch_size)
        return np.array([[len(t), ord(t[0]), 1.0] for t in texts], dtype=np.float32)


TEXTS = [f"{chr(97 + i % 26)}" * (i + 1) for i in range(11)]


def _worker(rank, world, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    enc = CountingEncoder()
    queue.put((rank, encode_shared(enc, TEXTS, 2, rank, world), enc.calls))
    dist.destroy_process_group()


def test_ranks_encode_shares_that_gather_into_one_process_result():
    whole = CountingEncoder().encode(TEXTS, 2)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for proc in procs:
        proc.join(timeout=60)
    for _, emb, calls in results:
        np.testing.assert_array_equal(emb, whole)  # every rank holds every text's embedding, in order
        assert calls == 3  # 6 texts each (rank 1's 5 padded by one): 3 batches of 2 on both ranks
