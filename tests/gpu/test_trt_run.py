"""TensorRT engines on the GPU: logits and KV cache against the reference executor, and the
engine inspector's view of the engine against manifest.json.

Runs wherever a TensorRT runtime can execute on the present GPU (full TensorRT, or
TensorRT-RTX on a GPU it targets: sm80/86/89/120); skipped elsewhere with the reason
(TensorRT-RTX refuses compute capability 9.0, e.g. the H100).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from kiln.codegen.trt_api import RTX_ARCHS, TensorRTMissing, load_tensorrt  # noqa: E402

try:
    TRT = load_tensorrt()
except TensorRTMissing as e:
    pytest.skip(str(e), allow_module_level=True)
_major, _minor = torch.cuda.get_device_capability()
ARCH = f"sm{_major}{_minor}"
if TRT.rtx and ARCH not in RTX_ARCHS:
    pytest.skip(f"{TRT.flavor} {TRT.version} cannot run on this GPU ({ARCH}); it targets "
                f"{', '.join(RTX_ARCHS)}", allow_module_level=True)

import transformers  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.build import build, read_manifest  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import load_engine, load_model  # noqa: E402
from kiln.runtime.trt_backend import can_run  # noqa: E402

CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=512,
                  max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=128, n_layer=2, n_head=4,
                 vocab_size=512, n_positions=256),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def engine(request, tmp_path_factory):
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp(f"{request.param}-ckpt")
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CONFIGS[request.param])) \
        .save_pretrained(ckpt)
    out = build(None, ckpt, tmp_path_factory.mktemp(request.param) / "engine", dtype="fp16", max_batch=4,
                max_tokens=128, max_seq_len=128, page_size=16, archs=(ARCH,) if TRT.rtx else None, progress=False)
    ok, why = can_run(read_manifest(out))
    if not ok:
        pytest.skip(why)
    return ckpt, out


def test_logits_and_cache_match_reference(engine):
    ckpt, out = engine
    trt_model = load_engine(out, "cuda")
    ref = load_model(ckpt, dtype="fp16", device="cuda")
    pages = 24
    kv_ref, kv_trt = (KVStore(ref.plan.sites, pages, 16, torch.float16, "cuda") for _ in range(2))
    tables = [tuple(range(0, 8)), tuple(range(16, 8, -1)), (17, 23, 18)]
    ctx = [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    for lens in ([37, 5, 20], [1, 1, 1], [9, 1, 3], [1, 1, 1]):
        seqs, start = [], 0
        for i, n in enumerate(lens):
            seqs.append(SeqSlice(start, n, ctx[i], tables[i]))
            start, ctx[i] = start + n, ctx[i] + n
        batch = StepBatch(torch.randint(0, ref.plan.vocab_size, (start,), generator=g).cuda(), seqs)
        want = ref.model.forward(batch, kv_ref, all_logits=True)
        got = trt_model.model.forward(batch, kv_trt, all_logits=True)
        torch.cuda.synchronize()
        assert float((got - want).norm() / want.norm()) < 2e-2
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or float((got - want).abs().max()) < 5e-2
        for a, b in zip(kv_trt.k + kv_trt.v, kv_ref.k + kv_ref.v):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_inspector_matches_manifest(engine):
    _, out = engine
    m = read_manifest(out)
    t = TRT.module
    eng = t.Runtime(t.Logger(t.Logger.WARNING)).deserialize_cuda_engine((out / "model.engine").read_bytes())
    assert eng is not None
    kinds = {t.int32: "int32", t.float32: "fp32", t.float16: "fp16", t.bfloat16: "bf16"}
    names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
    assert sorted(names) == sorted(x["name"] for x in m["io"])
    for x in m["io"]:
        name = x["name"]
        assert (eng.get_tensor_mode(name) == t.TensorIOMode.INPUT) == (x["mode"] == "input")
        assert kinds[eng.get_tensor_dtype(name)] == x["dtype"] and list(eng.get_tensor_shape(name)) == x["shape"]
        if x["profile"] is not None:
            lo, opt, hi = eng.get_tensor_profile_shape(name, 0)
            assert [list(lo), list(opt), list(hi)] == [x["profile"][k] for k in ("min", "opt", "max")]
    info = eng.create_engine_inspector().get_engine_information(t.LayerInformationFormat.JSON)
    assert "Layers" in info or "layers" in info.lower()
