"""KILN_MIXED_GRAPHS_LARGE's host side (runtime/cuda_backend.py): the buckets a large mixed step replays in
(large_mixed_key) and the sequence metadata its graph is refilled with (_large_layout), checked against what the
graph's kernels read: the decode kernel maps sequence i to token row i for i < the decode bucket, the prefill
kernel reads the sequences after it through cu_seqlens, kv_lens and the block tables."""

import random

import numpy as np
import pytest
import torch
from kiln.runtime import cuda_backend as CB
from kiln.runtime.batch import SeqSlice, StepBatch, host_meta

PAGE = 16


def mixed_batch(rng: random.Random, decode: int, prompts: list[int]) -> StepBatch:
    """`decode` one-token sequences (with context) first, as the scheduler orders a step, then prompt chunks."""
    seqs, start, page = [], 0, 0
    for n, ctx in [(1, rng.randrange(1, 500)) for _ in range(decode)] + [(n, rng.choice([0, 37])) for n in prompts]:
        pages = -(-(ctx + n) // PAGE)
        seqs.append(SeqSlice(start, n, ctx, tuple(range(page, page + pages))))
        start, page = start + n, page + pages
    return StepBatch(torch.arange(start), seqs)


def test_large_mixed_key_buckets(monkeypatch):
    monkeypatch.setattr(CB, "MIXED_SPLIT", "1")
    rng = random.Random(0)
    b = mixed_batch(rng, 100, [1500, 300])
    assert CB.large_mixed_key(b, 102, 256) == (2, 2048, 130, 128)  # 100 decode rows in the bucket of 128
    assert CB.large_mixed_key(b, 102, 100) == (2, 2048, 102, 100)  # the bucket past max_batch: max_batch
    assert CB.large_mixed_key(b, 102, 96) is None  # decode rows past max_batch
    assert CB.large_mixed_key(b, 103, 256) is None  # a sequence that samples more than one row
    assert CB.large_mixed_key(mixed_batch(rng, 0, [900, 900, 900]), 3, 256) == (8, 3072, 8, 0)
    assert CB.large_mixed_key(mixed_batch(rng, 8, []), 8, 256) is None  # pure decode: the decode graphs'
    assert CB.large_mixed_key(mixed_batch(rng, 3, [20000]), 4, 256) is None  # past the largest token bucket
    assert CB.large_mixed_key(mixed_batch(rng, 500, [8]), 501, 1024) == (2, 1024, 514, 512)  # tokens >= decode rows
    assert CB.large_mixed_key(mixed_batch(rng, 3, [10] * 65), 68, 256) is None  # past the largest prompt bucket
    monkeypatch.setattr(CB, "MIXED_SPLIT", "0")  # no decode kernel: every row a prompt sequence of one token
    assert CB.large_mixed_key(mixed_batch(rng, 30, [500]), 31, 256) == (32, 1024, 32, 0)
    assert CB.large_mixed_key(b, 102, 256) is None  # 102 sequences: past LARGE_SEQS


@pytest.mark.parametrize("seed", range(4))
def test_large_layout_gives_each_kernel_its_sequences(seed):
    rng = random.Random(seed)
    D, prompts = rng.choice([1, 5, 100]), [rng.randrange(2, 400) for _ in range(rng.randint(1, 5))]
    batch = mixed_batch(rng, D, prompts)
    key = CB.large_mixed_key(batch, len(batch.seqs), 256)
    p, t, rows, d = key
    n, T = d + p, batch.num_tokens
    width = 64
    h = host_meta(batch, PAGE, width)
    ints = np.full(2 * n + 3, -7, np.int32)
    tables = np.full((n, width), -7, np.int32)
    CB._large_layout(h, d, n, T, ints, tables)
    kv, cu = ints[:n], ints[n:2 * n + 1]
    assert (ints[2 * n + 1:] == -7).all()  # longest and real tokens: the caller's
    for i, s in enumerate(batch.seqs[:D]):  # the decode kernel: sequence i is row i, i < D
        assert kv[i] == s.context + 1 and tables[i, :len(s.block_table)].tolist() == list(s.block_table)
        assert s.start == i
    assert (kv[D:d] == 1).all() and (tables[D:d] == 0).all()  # its padding: one token on page 0
    assert d <= t and d - D <= T - D + (t - T)  # its padding rows are token rows (prompt or padding) of the graph
    for j, s in enumerate(batch.seqs[D:]):  # the prefill kernel: sequences d.., rows through cu_seqlens
        i = d + j
        assert (cu[i], cu[i + 1]) == (s.start, s.start + s.length)
        assert kv[i] == s.context + s.length
        assert tables[i, :len(s.block_table)].tolist() == list(s.block_table)
    P = len(batch.seqs) - D
    assert (kv[d + P:] == 0).all() and (cu[d + P + 1:] == T).all() and (tables[d + P:] == 0).all()
    assert (np.diff(cu[d:]) >= 0).all()
