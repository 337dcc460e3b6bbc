"""The `tensorrt` backend: runs a serialized engine built by `kiln build --backend tensorrt`.

Same interface as runtime/reference.py: `forward(batch, kv, all_logits)` on the shared
paged KV cache (`[pages, kv_heads, page_size, head_dim]` per site), which the engine
updates in place. `step_inputs` is the host side of the network's index inputs (see
codegen/trt_layers.py); it runs on the CPU and is tested against the reference there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from kiln.dsl.plan import Plan

from .batch import StepBatch
from .kv_store import KVStore


class TrtRuntimeError(Exception):
    """An engine that cannot run here, or a step it cannot take; names the reason."""


def step_inputs(batch: StepBatch, page_size: int, num_pages: int, attention: bool = True,
                all_logits: bool = False) -> dict[str, torch.Tensor]:
    """int32 CPU tensors for the network's inputs (all but the KV caches) for one step."""
    batch.validate(page_size)
    i32 = torch.int32
    tokens = batch.tokens.to("cpu", i32)
    t = tokens.shape[0]
    positions = batch.positions().to("cpu", i32)
    rows = torch.arange(t, dtype=i32) if all_logits else torch.tensor(batch.sample_rows(), dtype=i32)
    out = {"tokens": tokens, "positions": positions, "logit_rows": rows}
    if not attention:
        return out
    lengths = torch.tensor([s.length for s in batch.seqs])
    out["token_seq"] = torch.repeat_interleave(torch.arange(len(batch.seqs), dtype=i32), lengths)
    kv_page, kv_slot, kv_seq, kv_pos, dest = [], [], [], [], []
    for n, s in enumerate(batch.seqs):
        table = torch.as_tensor(s.block_table, dtype=torch.long)
        pos = torch.arange(s.context + s.length)
        kv_page.append(table[pos // page_size])
        kv_slot.append(pos % page_size)
        kv_seq.append(torch.full_like(pos, n))
        kv_pos.append(pos)
        dest.append(table[pos[s.context:] // page_size])  # page of each new token
    for name, parts in (("kv_page", kv_page), ("kv_slot", kv_slot), ("kv_seq", kv_seq), ("kv_pos", kv_pos)):
        out[name] = torch.cat(parts).to(i32)
    pages = torch.cat(dest)  # [T]
    if int(pages.max()) >= num_pages:
        raise TrtRuntimeError(f"block table names page {int(pages.max())}, the KV store has {num_pages}")
    order = torch.argsort(pages, stable=True)  # tokens grouped by page, positions ascending inside
    counts = torch.bincount(pages, minlength=num_pages)
    slots = positions.long() % page_size  # [T]
    start = torch.full((num_pages,), page_size, dtype=torch.long).scatter_reduce(0, pages, slots, "amin")
    start = torch.where(counts > 0, start, 0)  # the first slot each page receives (0 if none)
    # Each written page must receive one contiguous run of slots from one sequence.
    written = slots[order]
    expect = start[pages[order]] + (torch.arange(t) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts))
    if not torch.equal(written, expect):
        raise TrtRuntimeError("a step's writes to one KV page are not one run of consecutive slots "
                              "(is a page shared by two sequences while written?)")
    out["write_order"] = order.to(i32)
    out["page_write_start"] = start.to(i32)
    out["page_write_cu"] = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(i32)
    return out


def can_run(manifest: dict) -> tuple[bool, str]:
    """Whether this machine can execute the engine, and if not, why."""
    from kiln.codegen.trt_api import TensorRTMissing, load_tensorrt

    try:
        trt = load_tensorrt(manifest["tensorrt"]["module"])
    except TensorRTMissing as e:
        return False, str(e)
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm{major}{minor}"
    if arch not in manifest["target_archs"]:
        return False, (f"the engine targets {', '.join(manifest['target_archs'])} ({trt.flavor} {trt.version}); "
                       f"this GPU is {arch}")
    return True, ""


class TrtModel:
    backend = "tensorrt"

    def __init__(self, plan: Plan, engine_dir: Path, manifest: dict, device: str = "cuda"):
        from kiln.codegen.trt_api import load_tensorrt

        ok, why = can_run(manifest)
        if not ok:
            raise TrtRuntimeError(f"cannot run {engine_dir}: {why}")
        self.plan, self.manifest = plan, manifest
        self.device = torch.device(device)
        self.trt = load_tensorrt(manifest["tensorrt"]["module"]).module
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((Path(engine_dir) / "model.engine").read_bytes())
        if self.engine is None:
            raise TrtRuntimeError(f"{engine_dir}/model.engine could not be deserialized (see TensorRT's log above)")
        self.context = self.engine.create_execution_context()
        self.names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}

    def reserve(self, max_seqs: int, max_context: int) -> None:
        m = self.manifest
        if max_seqs > m["max_batch"] or max_context > m["max_seq_len"]:
            raise TrtRuntimeError(f"the engine was built for {m['max_batch']} sequences of {m['max_seq_len']} "
                                  f"tokens; asked for {max_seqs} of {max_context} (rebuild with larger "
                                  f"--max-batch / --max-seq-len)")

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        m = self.manifest
        if kv.page_size != m["page_size"]:
            raise TrtRuntimeError(f"KV store has page size {kv.page_size}, the engine was built for {m['page_size']}")
        if kv.num_pages > m["max_pages"]:
            raise TrtRuntimeError(f"KV store has {kv.num_pages} pages, the engine takes at most {m['max_pages']}")
        if batch.num_tokens > m["max_tokens"] or len(batch.seqs) > m["max_batch"]:
            raise TrtRuntimeError(f"step of {batch.num_tokens} tokens in {len(batch.seqs)} sequences exceeds the "
                                  f"engine's {m['max_tokens']} tokens / {m['max_batch']} sequences")
        ins = step_inputs(batch, kv.page_size, kv.num_pages, bool(self.plan.sites), all_logits)
        keep = []
        for name, t in ins.items():
            if name in self.names:
                t = t.to(self.device).contiguous()
                keep.append(t)
                self._bind(name, t, True)
        for i in range(len(self.plan.sites)):
            for kind, store in (("k", kv.k), ("v", kv.v)):
                self._bind(f"{kind}_cache.{i}", store[i], True)
                self._bind(f"{kind}_cache_out.{i}", store[i], False)  # the same memory: updated in place
        logits = torch.empty(ins["logit_rows"].shape[0], self.plan.vocab_size, dtype=torch.float32,
                             device=self.device)
        self._bind("logits", logits, False)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise TrtRuntimeError("TensorRT failed to execute the step (see its log above)")
        return logits

    def _bind(self, name: str, t: torch.Tensor, is_input: bool) -> None:
        if is_input:
            self.context.set_input_shape(name, tuple(t.shape))
        self.context.set_tensor_address(name, t.data_ptr())
