"""`kiln build --backend tensorrt` on the CPU with TensorRT-RTX (ahead-of-time builds).

For every spec in models/: a random-weight Hugging Face checkpoint at small dimensions ->
a real serialized engine. No machine here can deserialize it (the engine inspector needs a
GPU that TensorRT-RTX supports; tests/gpu/test_trt_run.py does that check there), so on
the CPU we check the engine directory against the network TensorRT was given: the
manifest's I/O tensors, dtypes and profile ranges against the rebuilt network definition
and the generated module's profile, the engine bytes against the I/O names, and the
network's arithmetic against the reference executor through tests/trt_interp.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from kiln.codegen.trt_api import TensorRTMissing, load_tensorrt

try:
    TRT = load_tensorrt()
except TensorRTMissing as e:  # pragma: no cover - CI installs the tensorrt extra
    pytest.skip(f"TensorRT not installed: {e}", allow_module_level=True)

import transformers  # noqa: E402
from kiln.cli import main as cli  # noqa: E402
from kiln.codegen.trt_layers import TrtLoweringError  # noqa: E402
from kiln.codegen.trt_network import Limits, render_network  # noqa: E402
from kiln.dsl.loader import MODELS_DIR  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.build import BuildError, build, build_engine, import_network, read_manifest  # noqa: E402
from kiln.runtime.checkpoint import CheckpointError  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import load_model  # noqa: E402
from kiln.runtime.trt_backend import TrtRuntimeError, step_inputs  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.configs import FAMILY_CONFIGS as CASES  # noqa: E402
from tests.trt_interp import run_network  # noqa: E402

SPECS = sorted(p.stem for p in MODELS_DIR.glob("*.kiln"))
SMALL = dict(max_batch=2, max_tokens=32, max_seq_len=64, page_size=4, archs=("sm86",), progress=False)
T = TRT.module


def _case(spec: str) -> dict:
    if spec not in CASES:
        pytest.fail(f"models/{spec}.kiln has no small config in tests/configs.py FAMILY_CONFIGS")
    return CASES[spec]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """spec name -> folder of a random-weight HF checkpoint (made on first use)."""
    made: dict[str, Path] = {}

    def get(spec: str) -> Path:
        if spec not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**_case(spec)))
            made[spec] = tmp_path_factory.mktemp(spec)
            model.save_pretrained(made[spec])
        return made[spec]
    return get


def _engine_weights(engine: Path, plan) -> dict[str, torch.Tensor]:
    w = load_file(str(engine / "weights.safetensors"))
    for slot in plan.weights.values():
        if slot.source is not None and slot.name not in w:
            w[slot.name] = w[plan.alias_target(slot.name)]
    return w


def _network(engine: Path, weights):
    mod = import_network(engine / "network.py")
    net = T.Builder(T.Logger(T.Logger.ERROR)).create_network(
        1 << int(T.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    owner = mod.build_network(T, net, weights)
    return mod, net, owner


def _steps(vocab: int, tables):
    """Prefill two sequences (crossing pages), then decode and a short chunk."""
    g = torch.Generator().manual_seed(1)
    ctx = [0, 0]
    for lens in ([5, 7], [1, 1], [3, 1], [1, 2]):
        seqs, start = [], 0
        for i, n in enumerate(lens):
            seqs.append(SeqSlice(start, n, ctx[i], tables[i]))
            start, ctx[i] = start + n, ctx[i] + n
        yield StepBatch(torch.randint(0, vocab, (start,), generator=g), seqs)


def _dtype_name(dt) -> str:
    return {T.int32: "int32", T.float32: "fp32", T.float16: "fp16", T.bfloat16: "bf16"}[dt]


def _trt_refusal(spec: str, ckpt) -> str | None:
    """Why TensorRT cannot run the spec (an op it has no lowering for), or None."""
    from kiln.dsl import SpecError, check, load_spec
    from kiln.dsl.checker import check_backend
    from kiln.runtime.checkpoint import open_checkpoint

    try:
        check_backend(check(load_spec(MODELS_DIR / f"{spec}.kiln"), open_checkpoint(ckpt).config), "tensorrt")
    except SpecError as e:
        return str(e).splitlines()[0]
    return None


@pytest.mark.parametrize("spec", SPECS)
def test_engine_for_every_spec(spec, checkpoints, tmp_path):
    why = _trt_refusal(spec, checkpoints(spec))
    if why:  # the build must refuse it at check time, naming the op (tested below), never run it wrongly
        with pytest.raises(BuildError, match="has no TensorRT lowering"):
            build(MODELS_DIR / f"{spec}.kiln", checkpoints(spec), tmp_path / "engine", dtype="fp32", **SMALL)
        return
    ckpt = checkpoints(spec)
    out = build(MODELS_DIR / f"{spec}.kiln", ckpt, tmp_path / "engine", dtype="fp32", **SMALL)
    m = read_manifest(out)  # also checks the listed files and the spec hashes
    assert m["spec"]["name"] == spec and m["backend"] == "tensorrt" and m["target_archs"] == ["sm86"]
    assert m["tensorrt"]["version"] == TRT.version and m["dtype"] == "fp32" and m["page_size"] == 4
    assert {"network.py", "model.engine", "weights.safetensors", "config.json"} <= set(m["files"])

    ref = load_model(ckpt, MODELS_DIR / f"{spec}.kiln")
    mod, net, owner = _network(out, _engine_weights(out, ref.plan))
    io = {x["name"]: x for x in m["io"]}
    tensors = [net.get_input(i) for i in range(net.num_inputs)] + [net.get_output(i) for i in range(net.num_outputs)]
    assert [t.name for t in tensors] == [x["name"] for x in m["io"]]
    for t in tensors:
        assert io[t.name]["mode"] == ("input" if t.is_network_input else "output")
        assert io[t.name]["dtype"] == _dtype_name(t.dtype) and io[t.name]["shape"] == list(t.shape)
    for name, (_, _, prof) in mod.INPUTS.items():
        assert io[name]["profile"] == dict(zip(("min", "opt", "max"), map(list, prof)))
    assert io["tokens"]["profile"]["max"] == [32] and io["kv_page"]["profile"]["max"] == [2 * 64]
    engine = (out / "model.engine").read_bytes()
    assert engine[:4] in (b"vtrt", b"ftrt") and all(x["name"].encode() in engine for x in m["io"])

    # The network's arithmetic, run by the interpreter, against the reference on the same steps.
    pages = 2 * 64 // 4
    kv_ref = KVStore(ref.plan.sites, pages, 4, torch.float32)
    kv_trt = KVStore(ref.plan.sites, pages, 4, torch.float32)
    tables = [(3, 7, 1, 20, 11, 5), (2, 9, 0, 14, 22, 8)]
    for batch in _steps(ref.plan.vocab_size, tables):
        want = ref.model.forward(batch, kv_ref, all_logits=True)
        feed = step_inputs(batch, 4, pages, bool(ref.plan.sites), all_logits=True)
        for i in range(len(ref.plan.sites)):
            feed[f"k_cache.{i}"], feed[f"v_cache.{i}"] = kv_trt.k[i], kv_trt.v[i]
        got = run_network(T, net, feed)["logits"]
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
        for a, b in zip(kv_trt.k + kv_trt.v, kv_ref.k + kv_ref.v):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    del owner


def test_interpreter_check_can_fail(checkpoints, tmp_path):
    """Keys read from the wrong slots must show up as different logits."""
    ckpt = checkpoints("llama")
    ref = load_model(ckpt)
    src = tmp_path / "network.py"
    src.write_text(render_network(ref.plan, "fp32", Limits(2, 32, 64, 4)))
    mod = import_network(src)
    net = T.Builder(T.Logger(T.Logger.ERROR)).create_network(1 << int(T.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    owner = mod.build_network(T, net, ref.model.weights)
    kv_ref, kv_trt = (KVStore(ref.plan.sites, 32, 4, torch.float32) for _ in range(2))
    batch = next(_steps(ref.plan.vocab_size, [(3, 7, 1, 20), (2, 9, 0, 14)]))
    want = ref.model.forward(batch, kv_ref, all_logits=True)
    feed = step_inputs(batch, 4, 32, all_logits=True)
    feed["kv_slot"] = (feed["kv_slot"] + 1) % 4
    for i in range(len(ref.plan.sites)):
        feed[f"k_cache.{i}"], feed[f"v_cache.{i}"] = kv_trt.k[i], kv_trt.v[i]
    got = run_network(T, net, feed)["logits"]
    assert float((got - want).abs().max() / want.abs().max()) > 1e-3
    del owner


def test_half_precision_builds(checkpoints, tmp_path):
    out = build(None, checkpoints("llama"), tmp_path / "e", dtype="bf16", **dict(SMALL, archs=("sm80", "sm89")))
    m = read_manifest(out)
    assert m["target_archs"] == ["sm80", "sm89"] and m["dtype"] == "bf16"
    caches = [x for x in m["io"] if "cache" in x["name"]]
    assert caches and all(x["dtype"] == "bf16" for x in caches)
    assert load_file(str(out / "weights.safetensors"))["embed"].dtype == torch.bfloat16


def test_generated_module_reads_like_code(checkpoints, tmp_path):
    ref = load_model(checkpoints("mixtral"))
    text = render_network(ref.plan, "fp16", Limits(2, 32, 64, 4))
    compile(text, "network.py", "exec")
    lines = text.splitlines()
    files = set()
    for ins in ref.plan.program.instrs:  # every op is preceded by its spec line (the base's for inherited ones)
        where = f"models/{Path(ins.op.pos.file).name}:{ins.op.pos.line}"
        files.add(Path(ins.op.pos.file).name)
        assert any(x.strip().startswith(f"# {where} ") for x in lines), ins.op.text
    assert files == {"mixtral.kiln", "llama.kiln"}  # the MoE layer is Mixtral's, the top-level forward Llama's
    assert "# expert 7" in text and "nn.op(OpKind.MOE, " in text and "moe.combine(nn, [" in text
    # laid out by the template alone: the same text on every machine, whatever formatter is installed
    assert render_network(ref.plan, "fp16", Limits(2, 32, 64, 4)) == text


def test_unhandled_op_names_op_and_line(checkpoints):
    plan = load_model(checkpoints("llama")).plan
    ins = plan.program.instrs[1]
    bad = dataclasses.replace(plan.program, instrs=(plan.program.instrs[0], dataclasses.replace(ins, kind="frobnicate"))
                              + plan.program.instrs[2:])
    with pytest.raises(TrtLoweringError, match=rf"llama.kiln:{ins.op.pos.line}:\d+: op 'frobnicate' has no TensorRT"):
        render_network(dataclasses.replace(plan, program=bad), "fp16", Limits(2, 32, 64, 4))


def _no_leftovers(folder: Path):
    assert [p.name for p in folder.iterdir()] == []


def test_unsupported_op_for_tensorrt_leaves_nothing(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = dict(cfg.get("rope_parameters") or {"rope_theta": 10000.0}, rope_type="dynamic", factor=2.0)
    cfg["rope_parameters"] = cfg["rope_scaling"] = rope
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    with pytest.raises(BuildError, match=r"llama.kiln:\d+:\d+: rope with dynamic NTK scaling"):
        build(None, ckpt, tmp_path / "out" / "e", **SMALL)
    _no_leftovers(tmp_path / "out")


def test_checkpoint_mismatch_leaves_nothing(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        build(None, ckpt, tmp_path / "out" / "e", **SMALL)
    _no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("args,message", [
    (["--dtype", "int8"], "dtype 'int8' is not supported by the tensorrt backend"),
    (["--dtype", "bf16", "--arch", "sm75"], "dtype 'bf16' is not supported on target sm75"),
    (["--arch", "sm90"], "cannot target 'sm90'"),
])
def test_cli_errors_exit_2(checkpoints, tmp_path, capsys, args, message):
    (tmp_path / "out").mkdir()
    rc = cli(["build", "--checkpoint", str(checkpoints("llama")), "--out", str(tmp_path / "out" / "e"), *args])
    assert rc == 2 and message in capsys.readouterr().err
    _no_leftovers(tmp_path / "out")


def test_missing_tensorrt_is_named(monkeypatch):
    monkeypatch.setenv("KILN_TENSORRT", "no_such_tensorrt")
    with pytest.raises(TensorRTMissing, match="no_such_tensorrt: not installed.*tensorrt-rtx-cu13-libs"):
        load_tensorrt()


def test_run_reports_why_engine_cannot_run(checkpoints, tmp_path, capsys):
    out = build(None, checkpoints("gpt2"), tmp_path / "e", dtype="fp16", **SMALL)
    rc = cli(["run", str(out), "--tokens", "1,2,3"])
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu/test_trt_run.py runs engines")
    assert rc == 2 and "cannot run" in err and "no CUDA GPU" in err


def test_step_inputs_rejects_shared_page_writes():
    batch = StepBatch(torch.tensor([1, 2, 3]), [SeqSlice(0, 2, 0, (5,)), SeqSlice(2, 1, 0, (5,))])
    with pytest.raises(TrtRuntimeError, match="not one run of consecutive slots"):
        step_inputs(batch, 4, 8)
    ok = StepBatch(torch.tensor([1, 2, 3]), [SeqSlice(0, 2, 4, (6, 5)), SeqSlice(2, 1, 0, (7,))])
    feed = step_inputs(ok, 4, 8)
    assert feed["page_write_start"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0]
    assert feed["page_write_cu"].tolist() == [0, 0, 0, 0, 0, 0, 2, 2, 3]
    assert feed["write_order"].tolist() == [0, 1, 2] and feed["kv_page"].tolist() == [6, 6, 6, 6, 5, 5, 7]


def test_engine_bytes_are_built_not_copied(checkpoints, tmp_path):
    """Two different weight sets give two different engines (constants are baked in)."""
    ref = load_model(checkpoints("gpt2"))
    src = tmp_path / "network.py"
    src.write_text(render_network(ref.plan, "fp32", Limits(2, 32, 64, 4)))
    a = build_engine(TRT, src, ref.model.weights, ("sm86",))
    other = {k: v + 1.0 for k, v in ref.model.weights.items()}
    b = build_engine(TRT, src, other, ("sm86",))
    assert a != b
