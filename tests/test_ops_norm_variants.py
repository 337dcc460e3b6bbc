"""The norm variants (no weight, `offset`, a weight row per `group`), the `relu2` activation and
per-token scalars (`a * b` with b [T, 1]) through every layer: the checker's errors at the op's
line and column, the reference against torch written out by hand, the generated kernels
(compiled here, run where a GPU is), and the TensorRT network (interpreted layer by layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kiln.dsl import SpecError, check, parse_spec
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend, random_model

SPEC = """\
spec variants
param vocab: int = 64
param hidden: int = 32
param head_dim: int = 8
weights {
  embed: [vocab, hidden] <- "embed.weight"
  w: [hidden, hidden] <- "w.weight"
  ln_w: [hidden] <- "ln.weight"
  ln_b: [hidden] <- "ln.bias"
  hn_w: [hidden // head_dim, head_dim] <- "hn.weight"
  hn_b: [hidden // head_dim, head_dim] <- "hn.bias"
  rn_w: [hidden // head_dim, head_dim] <- "rn.weight"
  g: [1, hidden] <- "g.weight"
}
forward(tokens) {
  x = embedding(tokens, embed)
  a = layernorm(x, eps=1e-5)
  b = layernorm(a, ln_w, ln_b, eps=1e-5, offset=1.0)
  c = layernorm(linear(b, w), hn_w, hn_b, eps=1e-5, group=head_dim)
  d = rmsnorm(c, rn_w, eps=1e-6, group=head_dim)
  e = relu2(d) + act(rmsnorm(d, eps=1e-6), fn="relu2")
  f = sigmoid(linear(x, g)) * e
  h = f - linear(x, g) + e * linear(x, g)
  return linear(h, embed)
}
"""


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "variants.kiln"
    path.write_text(SPEC)
    return path


def _step(vocab: int = 64, device: str = "cpu") -> StepBatch:
    tokens = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(3))
    return StepBatch(tokens.to(device), [SeqSlice(0, 9, 0, (0,))])


def _by_hand(model) -> torch.Tensor:
    w = model.model.weights
    x = w["embed"][_step().tokens]
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    a = (x - mu) / torch.sqrt(var + 1e-5)                                  # no weight, no bias
    mu, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
    b = (a - mu) / torch.sqrt(var + 1e-5) * (1.0 + w["ln_w"]) \
        + w["ln_b"]                                                        # layernorm1p
    heads = (b @ w["w"].T).reshape(9, 4, 8)                                 # a weight row per head
    mu, var = heads.mean(-1, keepdim=True), heads.var(-1, unbiased=False, keepdim=True)
    c = ((heads - mu) / torch.sqrt(var + 1e-5) * w["hn_w"].reshape(4, 8) + w["hn_b"].reshape(4, 8)).reshape(9, 32)
    hc = c.reshape(9, 4, 8)
    d = (hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + 1e-6) * w["rn_w"].reshape(4, 8)).reshape(9, 32)
    dn = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-6)
    e = torch.relu(d) ** 2 + torch.relu(dn) ** 2
    s = x @ w["g"].T                                                        # [T, 1]
    h = torch.sigmoid(s) * e - s + e * s
    return h @ w["embed"].T


@pytest.mark.parametrize("old, new, line, col, message", [
    ("hn_w: [hidden // head_dim, head_dim]", "hn_w: [2 * head_dim]", 19, 7,
     "layernorm: norm weight must be [8], got float[16] (or [4, 8] for a row per group)"),
    ("hn_w: [hidden // head_dim, head_dim]", "hn_w: [hidden]", 19, 7,  # flat: [heads, head_dim] says per head
     "layernorm: norm weight must be [8], got float[32] (or [4, 8] for a row per group)"),
    ("hn_w: [hidden // head_dim, head_dim]", "hn_w: [2, 2 * head_dim]", 19, 7,
     "layernorm: norm weight must be [8], got float[2, 16]"),
    ("hn_b: [hidden // head_dim, head_dim]", "hn_b: [4]", 19, 7, "layernorm: norm bias must be [8], got float[4]"),
    ("ln_w: [hidden]", "ln_w: [1, hidden]", 18, 7, "layernorm: norm weight must be [32], got float[1, 32]"),
    ("ln_b: [hidden]", "ln_b: [head_dim]", 18, 7, "layernorm: norm bias must be [32], got float[8]"),
    ("rn_w, eps=1e-6, group=head_dim", "rn_w, eps=1e-6, group=5", 20, 7, "rmsnorm: group must divide the 32 features"),
    ("g: [1, hidden]", "g: [2, hidden]", 22, 29,
     "mul: operands have shapes float[T, 2] and float[T, 32]"),
    ('fn="relu2"', 'fn="relu3"', 21, 18, "act: unknown activation 'relu3'"),
    ("offset=1.0", "offset=true", 18, 49, "attribute 'offset' must be float"),
])
def test_bad_uses_are_spec_errors_at_the_op(old, new, line, col, message):
    assert SPEC.count(old) == 1
    with pytest.raises(SpecError) as info:
        check(parse_spec(SPEC.replace(old, new), "variants.kiln"))
    assert message in info.value.message, info.value.message
    assert (info.value.pos.line, info.value.pos.col) == (line, col), str(info.value)


def test_reference_matches_torch_by_hand(spec_file):
    model = random_model(spec_file, seed=1)
    kv = KVStore(model.plan.sites, 1, 16, torch.float32)
    got = model.model.forward(_step(), kv, all_logits=True)
    torch.testing.assert_close(got, _by_hand(model), rtol=1e-5, atol=1e-5)


def test_variants_are_not_no_ops(spec_file):
    """Each variant changes the result: a shared row instead of one per head, no offset, relu
    instead of relu2, and no per-token gate each give other logits."""
    model = random_model(spec_file, seed=1)
    want = _by_hand(model)
    for old, new in [("offset=1.0", "offset=0.0"), ('fn="relu2"', 'fn="relu"'),
                     ("sigmoid(linear(x, g)) * e", "e")]:
        other = spec_file.parent / f"other_{abs(hash(new))}.kiln"
        other.write_text(SPEC.replace(old, new))
        m = random_model(other, seed=1)
        got = m.model.forward(_step(), KVStore(m.plan.sites, 1, 16, torch.float32), all_logits=True)
        assert (got - want).abs().max() > 1e-3, (old, new)


def test_layernorm_reference_is_torch_layer_norm():
    """Where no variant is used, layernorm is F.layer_norm itself (bit for bit), and the offset
    form is F.layer_norm with weight + offset, as Nemotron's layernorm1p calls it."""
    from kiln.dsl.ops import OPS, OpKind
    op = OPS[OpKind.LAYERNORM]
    x, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)

    class Ins:
        attrs = op.make_attrs(dict(eps=1e-5, offset=1.0, group=None))
    assert torch.equal(op.reference(None, Ins, [x, w, b]), F.layer_norm(x, (16,), w + 1.0, b, 1e-5))
    Ins.attrs = op.make_attrs(dict(eps=1e-5, offset=0.0, group=None))
    assert torch.equal(op.reference(None, Ins, [x, None, None]), F.layer_norm(x, (16,), None, None, 1e-5))
    # a shared [g] row per group equals the same row repeated for every group
    Ins.attrs = op.make_attrs(dict(eps=1e-5, offset=0.0, group=4))
    w4 = torch.randn(4)
    torch.testing.assert_close(op.reference(None, Ins, [x, w4, None]), op.reference(None, Ins, [x, w4.repeat(4), None]))


def test_kernels_are_generated_and_compile(spec_file):
    pytest.importorskip("cuda.bindings")
    from kiln.codegen import nvrtc
    from kiln.codegen.render import render
    from kiln.codegen.show import kernel_specs

    plan = random_model(spec_file).plan
    specs = kernel_specs(plan, "bf16")
    maps = [s for s in specs if getattr(s, "body", None) == "map_relu2.cu.j2"]
    norms = [s for s in specs if type(s).__name__ == "NormSpec"]
    assert len(maps) == 1  # relu2(d) and act(..., fn="relu2"): one kernel (one line); weight-less
    # norms run in torch; grouped norms (a weight and bias row per head) are kernels, a block per head
    assert [(n.kind, n.weight_offset, n.has_bias, n.group, n.per_group_weight) for n in norms] == [
        ("layer", 1.0, True, 0, False), ("layer", 0.0, True, 8, True), ("rms", 0.0, False, 8, True)]
    for s in (maps[0], *norms):
        src = render(s)
        assert "variants.kiln:" in src.source
        assert nvrtc.compile_source(src.source, src.name, "sm_90a", src.origin).kind == "cubin"
    assert "r * r" in render(maps[0]).source


def test_tensorrt_network_matches_by_hand(spec_file, tmp_path):
    trt_api = pytest.importorskip("kiln.codegen.trt_api")
    try:
        trt = trt_api.load_tensorrt()
    except trt_api.TensorRTMissing as e:
        pytest.skip(str(e))
    from tests.trt_interp import plan_logits

    model = random_model(spec_file, seed=1)
    got = plan_logits(trt, model.plan, model.model.weights, _step(), tmp_path)
    torch.testing.assert_close(got, _by_hand(model), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_backend_matches_reference(spec_file, dtype):
    ref = random_model(spec_file, dtype=dtype, device="cuda", seed=1)
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    kvs = [KVStore(ref.plan.sites, 1, 16, ref.dtype, "cuda") for _ in range(2)]
    want = ref.model.forward(_step(device="cuda"), kvs[0], all_logits=True)
    got = cuda.model.forward(_step(device="cuda"), kvs[1], all_logits=True)
    tol = 1e-5 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
