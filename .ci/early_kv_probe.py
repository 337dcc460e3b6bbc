"""Can tests/gpu/test_decode_early_kv.py fail? (GPU; a development tool, issue #12.)

Runs that test's graph (poison the new tokens' rows -> qkv GEMV with the rotary + KV write -> decode attention
with its first K/V copies before the wait) with a kernel whose re-read of the new token's row is cut out of its
source, and counts the replays whose output differs from the wait-at-entry kernel's (or holds NaN): the race
the re-read exists for, seen or not. Then the shipped early kernel, which must show none.
Usage (device): PYTHONPATH=... python3 .ci/early_kv_probe.py
"""

from __future__ import annotations

import dataclasses

import torch
from kiln.codegen import launch
from kiln.codegen import render as R
from kiln.codegen.specs import DecodeAttnSpec

from tests.gpu.test_decode_early_kv import DT, KV, D, H, P, _graph
from tests.gpu.test_kernels import paged_layout

REPLAYS = 200


def main() -> None:
    for dtype, kv_fp8 in (("bf16", False), ("bf16", True)):
        for ctx in ([1024], [1, 17, 100, 1000]):
            torch.manual_seed(0)
            dt = DT[dtype]
            tables, pages = paged_layout(ctx, P)
            x = torch.randn(len(ctx), 4096, device="cuda").to(dt)
            w = (torch.randn((H + 2 * KV) * D, 4096, device="cuda") / 64).to(dt)
            cache0 = [(torch.randn(pages, KV, P, D, device="cuda") * (2 if kv_fp8 else 1)).to(
                torch.float8_e4m3fn if kv_fp8 else dt) for _ in range(2)]
            plain = _graph("0", dtype, kv_fp8, ctx, tables, x, w, cache0)
            tag = f"early-kv-test 1 {dtype} fp8={kv_fp8}"
            spec = DecodeAttnSpec(H, KV, D, P, D ** -0.5, dtype=dtype, kv_fp8=kv_fp8, origin=tag)
            saved, R.EARLY_KV = R.EARLY_KV, "1"
            src = R.render.__wrapped__(spec)  # the early kernel's source, past render's cache
            R.EARLY_KV = saved
            cut = src.source.replace("if (j == fresh_j) {", "if (false) {")
            key = (spec, torch.cuda.current_device())
            for name, text in (("re-read cut", cut), ("shipped", src.source)):
                launch._loaded[key] = launch.LoadedKernel(dataclasses.replace(src, source=text),
                                                          torch.device("cuda", key[1]))
                early = _graph("1", dtype, kv_fp8, ctx, tables, x, w, cache0)
                bad = 0
                for _ in range(REPLAYS):
                    plain[0]()
                    want = plain[1].clone()
                    early[0]()
                    bad += not torch.equal(early[1], want)
                torch.cuda.synchronize()
                print(f"{dtype} fp8 cache={kv_fp8} contexts {ctx}: {name}: {bad} of {REPLAYS} replays differ",
                      flush=True)
            launch._loaded.pop(key)


if __name__ == "__main__":
    main()
