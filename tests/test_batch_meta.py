"""`host_meta` (the vectorised step metadata every GPU step uploads) against the per-token
definitions in runtime/batch.py's docstring, on random mixed batches."""

import random

import numpy as np
import pytest
import torch
from kiln.runtime.batch import SeqSlice, StepBatch, host_meta

PAGE = 16


def random_batch(rng: random.Random, num_seqs: int) -> StepBatch:
    seqs, start, free = [], 0, list(range(10_000))
    rng.shuffle(free)  # pages of a sequence are scattered, as after churn in the block pool
    for _ in range(num_seqs):
        context = rng.choice([0, 0, rng.randrange(1, 300)])
        length = rng.choice([1, 1, rng.randrange(1, 200)])
        pages = -(-(context + length) // PAGE) + rng.randrange(0, 2)  # tables may hold a spare page
        seqs.append(SeqSlice(start, length, context, tuple(free.pop() for _ in range(pages)), rng.random() < 0.9))
        start += length
    return StepBatch(torch.arange(start) * 7, seqs)


@pytest.mark.parametrize("seed", range(6))
def test_host_meta_matches_per_token_definitions(seed):
    rng = random.Random(seed)
    batch = random_batch(rng, rng.choice([1, 3, 40, 160]))
    batch.validate(PAGE)
    width = max(len(s.block_table) for s in batch.seqs) + rng.randrange(0, 5)
    m = host_meta(batch, PAGE, width)

    assert m.positions.dtype == np.int64 and m.slots.dtype == np.int32
    assert m.block_tables.dtype == m.kv_lens.dtype == m.cu_seqlens.dtype == np.int32
    assert m.positions.tolist() == batch.positions().tolist()
    slots = [s.block_table[p // PAGE] * PAGE + p % PAGE for s in batch.seqs
             for p in range(s.context, s.context + s.length)]
    assert m.slots.tolist() == slots
    assert m.block_tables.shape == (len(batch.seqs), width)
    for row, s in zip(m.block_tables.tolist(), batch.seqs):
        assert row == list(s.block_table) + [0] * (width - len(s.block_table))
    assert m.kv_lens.tolist() == [s.context + s.length for s in batch.seqs]
    assert m.cu_seqlens.tolist() == [0] + [s.end for s in batch.seqs]
    assert m.lengths.tolist() == [s.length for s in batch.seqs]


def test_host_meta_refuses_a_table_wider_than_the_buffer():
    batch = StepBatch(torch.zeros(40, dtype=torch.long), [SeqSlice(0, 40, 0, (5, 6, 7))])
    with pytest.raises(ValueError, match="3 pages does not fit a width of 2"):
        host_meta(batch, PAGE, 2)


def test_decode_graph_buffers():
    """What a replayed decode graph reads, for a batch smaller than the graph (padding rows)."""
    from kiln.runtime.cuda_backend import fill_decode_buffers

    rng = random.Random(7)
    seqs = []
    for i in range(5):
        context = rng.randrange(0, 100)
        seqs.append(SeqSlice(i, 1, context, tuple(rng.sample(range(1000), -(-(context + 1) // PAGE)))))
    batch = StepBatch(torch.tensor([11, 12, 13, 14, 15]), seqs)
    host = np.full((5, 8), 99, np.int64)  # stale values from an earlier, wider step
    tables = np.full((8, 10), 99, np.int32)
    fill_decode_buffers(batch, PAGE, host, tables)
    assert host[0].tolist() == [11, 12, 13, 14, 15, 0, 0, 0]
    assert host[1].tolist() == [s.context for s in seqs] + [0] * 3
    assert host[2, 0] == max(s.context + 1 for s in seqs)
    assert host[3].tolist() == [s.block_table[s.context // PAGE] * PAGE + s.context % PAGE for s in seqs] + [-1] * 3
    assert host[4].tolist() == [s.context + 1 for s in seqs] + [1] * 3
    for row, s in zip(tables.tolist(), seqs):
        assert row == list(s.block_table) + [0] * (10 - len(s.block_table))
    assert not tables[5:].any()
