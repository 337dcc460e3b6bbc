"""The `clamp` op (OLMo's and MPT's clip_qkv) through every layer: the checker's errors, the
reference against torch, the generated kernel (compiled here, run where a GPU is), and the
TensorRT network (interpreted layer by layer) against the reference."""

from __future__ import annotations

import pytest
import torch
from kiln.dsl import SpecError, check, parse_spec
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend, random_model

SPEC = """\
spec clampy
param vocab: int = 64
param hidden: int = 32
param clip: float = 0.003
weights {
  embed: [vocab, hidden] <- "embed.weight"
  w: [hidden, hidden] <- "w.weight"
}
forward(tokens) {
  x = embedding(tokens, embed)
  h = clamp(linear(x, w), min=-clip, max=clip)
  return linear(h, embed)
}
"""


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clamp") / "clampy.kiln"
    path.write_text(SPEC)
    return path


def _step(vocab: int) -> StepBatch:
    tokens = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(3))
    return StepBatch(tokens, [SeqSlice(0, 9, 0, (0,))])


def _clamped_by_hand(model) -> torch.Tensor:
    w = model.model.weights
    tokens = _step(64).tokens
    h = torch.clamp(w["embed"][tokens] @ w["w"].T, -0.003, 0.003)
    return h @ w["embed"].T


@pytest.mark.parametrize("attrs, message", [
    ("min=1.0, max=-1.0", "clamp: min 1.0 is above max -1.0"),
    ("", "clamp: clamp needs min, max, or both"),
    ("min=true", "attribute 'min' must be float"),
])
def test_bad_bounds_are_spec_errors(attrs, message):
    text = SPEC.replace("min=-clip, max=clip", attrs) if attrs else SPEC.replace(", min=-clip, max=clip", "")
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "clampy.kiln"))
    assert message in info.value.message and info.value.pos.line == 11


def test_reference_clamps(spec_file):
    model = random_model(spec_file, seed=1)
    kv = KVStore(model.plan.sites, 1, 16, torch.float32)
    got = model.model.forward(_step(64), kv, all_logits=True)
    torch.testing.assert_close(got, _clamped_by_hand(model), rtol=1e-6, atol=1e-6)
    # the bound is reached: the op is not a no-op on these weights
    w = model.model.weights
    assert (w["embed"][_step(64).tokens] @ w["w"].T).abs().max() > 0.003


def test_kernel_is_generated_and_compiles(spec_file):
    pytest.importorskip("cuda.bindings")
    from kiln.codegen import nvrtc
    from kiln.codegen.render import render
    from kiln.codegen.show import kernel_specs

    plan = random_model(spec_file).plan
    maps = [s for s in kernel_specs(plan, "bf16") if getattr(s, "body", None) == "map_clamp.cu.j2"]
    assert len(maps) == 1 and dict(maps[0].consts) == {"lo": -0.003, "hi": 0.003}
    src = render(maps[0])
    assert "clampy.kiln:11 h = clamp(" in src.source
    img = nvrtc.compile_source(src.source, src.name, "sm_90a", src.origin)
    assert img.kind == "cubin"


def test_tensorrt_network_matches_reference(spec_file, tmp_path):
    trt_api = pytest.importorskip("kiln.codegen.trt_api")
    try:
        trt = trt_api.load_tensorrt()
    except trt_api.TensorRTMissing as e:
        pytest.skip(str(e))
    from tests.trt_interp import plan_logits

    model = random_model(spec_file, seed=1)
    got = plan_logits(trt, model.plan, model.model.weights, _step(64), tmp_path)
    torch.testing.assert_close(got, _clamped_by_hand(model), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_backend_matches_reference(spec_file, dtype):
    ref = random_model(spec_file, dtype=dtype, device="cuda", seed=1)
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    kvs = [KVStore(ref.plan.sites, 1, 16, ref.dtype, "cuda") for _ in range(2)]
    step = _step(64)
    step = StepBatch(step.tokens.cuda(), step.seqs)
    want = ref.model.forward(step, kvs[0], all_logits=True)
    got = cuda.model.forward(step, kvs[1], all_logits=True)
    assert torch.equal(got, want) if dtype == "fp32" else torch.allclose(got, want, rtol=2e-2, atol=2e-2)
