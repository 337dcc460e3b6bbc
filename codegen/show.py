"""`kiln show`: the generated artefacts of a spec, as text — the IR program and the kernels."""

from __future__ import annotations

import math

from kiln.dsl.dtypes import dtype as dtype_of
from kiln.dsl.plan import Plan
from kiln.dsl.sources import Alias

from .fuse import Exec, fuse, origin, unfused


def kernel_specs(plan: Plan, dtype: str = "bf16", page_size: int = 16) -> list:
    """Each distinct kernel spec the cuda backend would compile, first occurrence first."""
    seen, out = set(), []
    for op in unfused(fuse(plan, dtype_of(dtype).torch, page_size)):  # with the GEMV prologues' steps
        # a fused conv -> scan step (fuse.py's ssm_conv_scan) also runs its two kernels, for prefill
        fallbacks = (op.extra["conv"], op.extra["scan"]) if op.extra.get("op") == "conv_scan" else ()
        for spec in (*(op.spec if isinstance(op.spec, tuple) else (op.spec,)), *fallbacks):
            if spec is not None and spec.key() not in seen:
                seen.add(spec.key())
                out.append(spec)
    return out


def decode_gemv_specs(plan: Plan, dtype: str = "bf16", page_size: int = 16, num_sms: int = 132) -> list:
    """The GEMV kernels the cuda backend runs for the GEMM steps of a one-row decode step (plain weights; quantized
    ones run their own GEMVs), with the epilogues it fuses by default (the gated activation, the rotary + KV
    write), sized for a GPU of num_sms SMs (an H100 / H200: 132), first occurrence first."""
    from . import gemv as G  # the launch wrappers' module: imported here so `kiln show --ir` needs no CUDA

    seen, out = set(), []
    for op in fuse(plan, dtype_of(dtype).torch, page_size):
        if op.kind is not Exec.GEMM:
            continue
        gemm = op
        while "gemm" in gemm.extra:  # a prologue's or epilogue's step (or both): the GEMM step as it was
            gemm = gemm.extra["gemm"]
        if any(plan.weights[w.name].quant.quantized for w in gemm.extra["weights"]):
            continue
        start, width = gemm.extra["slices"][-1]
        n, k = start + width, plan.types[gemm.ins[0]].shape[1]
        bias, at = gemm.extra["biases"][0] is not None, origin(gemm.instrs[0])
        starts = {v: s for v, (s, _) in zip(gemm.outs, gemm.extra["slices"])}
        att, epi = op.extra.get("rope"), op.extra.get("epilogue")
        if att is not None and not G.rope_epilogue_refusal(att.spec[0], dtype):
            spec = G.spec_for(n, k, dtype, bias, f"{at} -> {origin(att.instrs[-1])}", num_sms, epilogue=att.spec[0],
                              halves=tuple(starts[v] for v in att.ins))
        elif epi is not None:
            spec = G.spec_for(n, k, dtype, bias, f"{at} -> {origin(epi.instrs[-1])}", num_sms, epilogue=epi.spec,
                              halves=(starts[epi.ins[0]], starts[epi.ins[1]]))
        else:
            spec = G.spec_for(n, k, dtype, bias, at, num_sms)
        if spec.key() not in seen:
            seen.add(spec.key())
            out.append(spec)
    return out


def show_kernels(plan: Plan, dtype: str = "bf16", page_size: int = 16) -> str:
    """Every kernel's source: kernel_specs', then the decode GEMVs' (decode_gemv_specs; their module needs
    cuda-python, the `cuda` extra: without it a closing comment says they are left out)."""
    from .render import render  # jinja templates; imported here so `kiln show --ir` needs none

    sources = [render(spec).source.rstrip() for spec in kernel_specs(plan, dtype, page_size)]
    try:
        sources += [render(spec).source.rstrip() for spec in decode_gemv_specs(plan, dtype, page_size)]
    except ImportError as e:
        sources.append(f"// (the decode GEMVs are left out: {e}; pip install 'kiln[cuda]' shows them)")
    return "\n\n".join(sources) + "\n"


def show_ir(plan: Plan) -> str:
    lines = []
    for ins in plan.program.instrs:
        attrs = ", ".join(f"{k}={v!r}" for k, v in vars(ins.attrs).items() if v is not None)
        ins_ = ", ".join(str(i) if i is not None else "none" for i in ins.inputs)
        t = ", ".join(str(plan.types[o]) for o in ins.outputs)
        outs = ", ".join(map(str, ins.outputs))
        lines.append(f"{outs}: {t} = {ins.kind.value}({ins_}{', ' + attrs if attrs else ''})"
                     f"    # {ins.op.pos.line}")
    return "\n".join(lines) + "\n"


def show_shards(plan: Plan) -> str:
    """`kiln show --tp N`: each weight's shard (its shape on one rank) and each collective, in order."""
    lines = [f"# tensor parallel over {plan.ranks} ranks", "# weights"]
    whole, per_rank = 0, [0] * plan.ranks  # parameters: the model's, and each rank's share of them
    for w in plan.weights.values():
        if w.source is None:
            continue
        d = w.shard
        local = list(w.shape)
        if d.kind == "split":
            local[d.axis] //= d.parts or plan.ranks
        lines.append(f"{w.name}: {list(w.shape)} -> {local} {d}")
        if isinstance(w.source, Alias):  # a tied weight: the same tensor, counted once
            continue
        n, held = math.prod(w.shape), math.prod(local)
        whole += n
        for r in range(plan.ranks):  # an expert lives on its rank, a bias added once on rank 0
            per_rank[r] += held if d.kind not in ("expert", "first") or r == (d.rank if d.kind == "expert" else 0) \
                else 0
    most = max(per_rank)
    lines.insert(1, f"# parameters: {whole:,} in all; the largest rank holds {most:,} (1/{whole / most:.2f} of "
                    f"them; replicated weights are on every rank)")
    lines.append("# collectives")
    lines += [f"{c.kind} {c.value} after {c.op}" for c in plan.collectives if c.kind != "send"]
    if plan.replicated_why:
        lines.append("# replicated (computed whole on every rank)")
        lines += sorted(set(plan.replicated_why))
    return "\n".join(lines) + "\n"


def show_stages(plan: Plan) -> str:
    """`kiln show --pp M`: each pipeline stage (its layers, ranks, KV sites, whole-model weights) and
    each value sent between stages, in order."""
    from kiln.dsl.passes import stage_sites, stage_weights

    tp = plan.ranks
    lines = [f"# pipeline over {len(plan.stages)} stages of {tp} rank{'s' if tp > 1 else ''} "
             f"(a step in up to one micro-batch per stage, the stages overlapping)"]
    for st in plan.stages:
        ranks = f"rank {st.index}" if tp == 1 else f"ranks {st.index * tp}-{st.index * tp + tp - 1}"
        own = stage_weights(plan, st.index)
        glob = [n for n in plan.weights if n in own and not plan.weights[n].scope]
        lines.append(f"stage {st.index}: {st.layers[0]} .. {st.layers[-1]} ({ranks}): {len(st.layers)} layers, "
                     f"{len(stage_sites(plan, st.index))} KV sites, {len(own)} weights"
                     + (f" ({', '.join(glob)} and the layers')" if glob else ""))
    lines.append("# sends")
    lines += [f"send {c.value}: {plan.types[c.value]} {c.op}" for c in plan.collectives if c.kind == "send"]
    return "\n".join(lines) + "\n"
