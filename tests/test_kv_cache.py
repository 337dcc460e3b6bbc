import pytest
import torch
from kiln.dsl.plan import AttentionSite
from kiln.runtime.kv_cache import (
    BlockPool,
    KVCacheError,
    OutOfPages,
    PageAccountingError,
    describe_capacity,
    kv_bytes_per_page,
    pages_for_memory,
)
from kiln.runtime.kv_store import KVStore, page_sites


def test_allocate_lowest_ids_first_and_reuse_after_free():
    pool = BlockPool(num_pages=8, page_size=4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([1, 3])
    assert (pool.num_free, pool.num_used) == (5, 3)
    assert pool.allocate(3) == [1, 3, 5]
    assert pool.usage == 6 / 8


def test_allocate_is_all_or_nothing():
    pool = BlockPool(num_pages=4, page_size=16)
    pool.allocate(3)
    with pytest.raises(OutOfPages, match="need 2 KV cache pages, only 1 of 4 free"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]


def test_refcounts_free_only_at_zero():
    pool = BlockPool(num_pages=4, page_size=2)
    a = pool.allocate(2)
    pool.incref(a)
    assert pool.refcount(0) == 2
    pool.free(a)
    assert pool.num_free == 2 and pool.refcount(0) == 1
    pool.free(a)
    assert pool.num_free == 4 and pool.refcount(1) == 0


def test_freeing_a_free_page_raises_and_changes_nothing():
    pool = BlockPool(num_pages=4, page_size=2)
    pool.allocate(2)
    with pytest.raises(PageAccountingError, match="page 2"):
        pool.free([0, 2])
    assert pool.refcount(0) == 1 and pool.num_free == 2
    with pytest.raises(PageAccountingError, match="page 1 2 time"):
        pool.free([1, 1])
    with pytest.raises(PageAccountingError, match="free"):
        pool.incref([3])
    with pytest.raises(PageAccountingError, match="not in"):
        pool.free([9])


def test_block_table_ensure_release_fork():
    pool = BlockPool(num_pages=6, page_size=4)
    t: list[int] = []
    pool.ensure(t, 1)
    assert t == [0]
    pool.ensure(t, 4)  # still one page
    assert t == [0]
    pool.ensure(t, 9)
    assert t == [0, 1, 2]
    u: list[int] = []
    pool.ensure(u, 5)
    assert u == [3, 4]
    with pytest.raises(OutOfPages):
        pool.ensure(u, 13)  # needs 2 more, 1 free
    assert u == [3, 4] and pool.num_free == 1
    f = pool.fork(t)
    assert f == t and f is not t and pool.refcount(2) == 2
    pool.release(t)
    assert t == [] and pool.num_free == 1  # fork still holds 0, 1, 2
    pool.release(f)
    pool.release(u)
    assert pool.num_free == 6
    assert pool.allocate(6) == [0, 1, 2, 3, 4, 5]


def test_bad_pool_arguments():
    with pytest.raises(KVCacheError, match="num_pages"):
        BlockPool(0, 16)
    with pytest.raises(KVCacheError, match="page_size"):
        BlockPool(4, 0)
    with pytest.raises(KVCacheError, match="non-negative"):
        BlockPool(4, 4).allocate(-1)


def test_capacity_sizing():
    # 32 layers, 8 kv heads of 128, bf16, 16-token pages: 2 * 32 * 8 * 128 * 2 * 16 = 2 MiB / page
    sites = [(8, 128, 128, 2)] * 32
    bpp = kv_bytes_per_page(16, sites)
    assert bpp == 16 * 32 * 8 * (128 + 128) * 2
    # differing K and V head dims count separately
    assert kv_bytes_per_page(4, [(2, 192, 128, 1)]) == 4 * 2 * 320
    free = int(41.2 * 1024**3)
    n = pages_for_memory(free, 0.9, bpp)
    assert n == int(free * 0.9) // bpp
    assert n * bpp <= free * 0.9 < (n + 1) * bpp
    line = describe_capacity(2048, 16, bpp, 0.9, free)
    assert line == "KV cache: 2,048 pages x 16 tokens = 32,768 tokens, 4.0 GiB (90% of free 41.2 GiB)"
    with pytest.raises(KVCacheError, match="fraction"):
        pages_for_memory(free, 1.5, bpp)
    with pytest.raises(KVCacheError, match="site 1"):
        kv_bytes_per_page(16, [(8, 128, 128, 2), (0, 128, 128, 2)])


@pytest.mark.parametrize("kv_dtype", ["run", "fp8"])
def test_capacity_sizing_counts_the_bytes_the_store_allocates(kv_dtype):
    # The sizing's bytes a page are those KVStore's tensors take, fp8 pages at one byte a value (session 27: an
    # fp8 cache was sized at two, so it filled half the memory it was given); a site without KV heads (another
    # pipeline stage's) takes none.
    sites = [AttentionSite(i, f"layers.{i}.attn", 8, h, 64, 32, kv_dtype=kv_dtype) for i, h in enumerate((2, 4, 0))]
    store = KVStore([s for s in sites if s.kv_heads], 3, 16, torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in store.k + store.v)
    assert kv_bytes_per_page(16, page_sites(sites, torch.bfloat16)) * 3 == allocated
    assert allocated == 3 * 16 * 6 * (64 + 32) * (1 if kv_dtype == "fp8" else 2)
