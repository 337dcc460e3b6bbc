"""Pre-quantized checkpoints (runtime/quant_formats.py): each format is written the way its own
tool writes it — compressed-tensors by the library itself, AutoAWQ, GPTQ and ModelOpt FP8 by
writers that transliterate those tools' packing code — then loaded with `load_model(path)` (the
format detected from config.json) and compared with the same weights dequantized by the format's
own reader (compressed-tensors' decompressor; (q - zero) * scale from the unpacked integers for
the others), as a float checkpoint, through the reference backend in fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kiln.dsl import passes
from kiln.dsl.quant import QWeight
from kiln.runtime.checkpoint import CheckpointError
from kiln.runtime.model import SingleSequence, load_model
from kiln.runtime.quant_formats import AWQ_ORDER
from safetensors.torch import load_file, save_file

from tests.configs import FAMILY_CONFIGS

transformers = pytest.importorskip("transformers")

# hidden and intermediate sizes in whole groups of 128 (group-128 int4 formats)
CONFIG = dict(FAMILY_CONFIGS["llama"], hidden_size=256, intermediate_size=384, num_attention_heads=4,
              num_key_value_heads=2)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
TOKENS = [1, 17, 200, 45, 3, 99, 250, 7, 64, 128, 5]
GROUP = 128


def hf_model():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**CONFIG)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def modules(model):
    return [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers) for m in LINEARS]


def write(folder, config: dict, tensors: dict, extra_files: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    for name, value in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(value))
    return folder


def logits(path) -> torch.Tensor:
    loaded = load_model(path)
    return SingleSequence(loaded, 32).step(TOKENS, all_logits=True)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def float_copy(tmp, model, weights: dict[str, torch.Tensor], name="dequantized"):
    """A float checkpoint of `model` with `weights` (module -> [out, in]) in place of its linears."""
    keys = set(hf_model().state_dict())  # not the quantization parameters a library left on the model
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    for m, w in weights.items():
        sd[f"{m}.weight"] = w.float()
    return write(tmp / name, model.config.to_dict(), sd)


# ---------------------------------------------------------------- compressed-tensors, by the library


def ct_checkpoint(tmp, preset: str, ignore=("lm_head",), name=None, input_scale=0.02):
    """A checkpoint compressed by compressed-tensors with one of its preset schemes (min-max
    scales computed by its own calculate_qparams), and the same weights decompressed by it."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = hf_model()
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=list(ignore))
    apply_quantization_config(model, qc, show_progress=False)
    for _, mod in model.named_modules():
        if not hasattr(mod, "quantization_scheme"):
            continue
        a, w = mod.quantization_scheme.weights, mod.weight.data
        if a.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif a.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            g = w.reshape(w.shape[0], -1, a.group_size)
            lo, hi = g.amin(2), g.amax(2)
        s, z = calculate_qparams(lo, hi, a)
        mod.weight_scale.data = s.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data = z.reshape(mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype)
        if hasattr(mod, "input_scale"):
            mod.input_scale.data.fill_(input_scale)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    folder = write(tmp / (name or preset), model.config.to_dict(), dict(model.state_dict()))
    comp.update_config(str(folder))
    comp.decompress_model(model)
    deq = {m: model.get_submodule(m).weight.data for m in modules(model)}
    assert ct.__version__
    return folder, float_copy(tmp, model, deq, (name or preset) + "-deq")


def test_compressed_tensors_int4_and_fp8_weights_equal_dequantized(tmp_path):
    # weight-only schemes: the loaded model computes with exactly the decompressed weights
    for preset in ("W4A16_ASYM", "W4A16"):
        q, deq = ct_checkpoint(tmp_path, preset)
        weights = load_model(q).model.weights
        assert sum(isinstance(w, QWeight) and w.desc.dtype == "int4" for w in weights.values()) == 2 * len(LINEARS)
        assert rel(logits(q), logits(deq)) < 1e-3, preset


def assert_stored_fp8(loaded, name, w, want):
    """A per-tensor fp8 weight is the checkpoint's exactly, unless it has siblings (linears of the
    same input, one GEMM on the cuda backend) with a larger scale: then it was requantized to that
    scale on load (dsl.quant.share_scale), within one e4m3 rounding step of the stored values."""
    groups = [g for g in passes.sibling_groups(loaded.plan) if name in g]
    got = w.dequantize()
    if torch.equal(got, want):
        return
    assert groups and w.desc.scale_layout == "per_tensor", name
    step = 2.0 ** -3 * want.abs() + float(w.scale) * 2.0 ** -9  # half an e4m3 ulp, subnormals included
    assert ((got - want).abs() <= step).all(), name


def test_compressed_tensors_fp8_w8a8(tmp_path):
    for preset in ("FP8", "FP8_DYNAMIC"):
        q, deq = ct_checkpoint(tmp_path, preset)
        loaded, ref = load_model(q), load_model(deq)
        quantized = [(n, w) for n, w in loaded.model.weights.items() if isinstance(w, QWeight)]
        assert len(quantized) == 2 * len(LINEARS)
        for n, w in quantized:  # the stored fp8 values and scales, exactly as the library decompresses them
            assert_stored_fp8(loaded, n, w, ref.model.weights[n].float())
            if preset == "FP8":
                assert w.desc.act_static and w.input_scale.item() == pytest.approx(0.02)
            else:
                assert w.desc.act == "fp8_token" and w.desc.scale_layout == "per_channel"
        # activations are quantized too: close to the float model, not equal
        assert rel(logits(q), logits(deq)) < 5e-2


def test_compressed_tensors_ignore_list(tmp_path):
    q, deq = ct_checkpoint(tmp_path, "W4A16_ASYM", ignore=("lm_head", "re:.*down_proj"), name="ignore")
    weights = load_model(q).model.weights
    assert not any(isinstance(w, QWeight) for n, w in weights.items() if "down" in n)
    assert sum(isinstance(w, QWeight) for w in weights.values()) == 2 * (len(LINEARS) - 1)
    assert rel(logits(q), logits(deq)) < 1e-3


# ---------------------------------------------------------------- AutoAWQ, GPTQ, ModelOpt writers


def int4_grid(w: torch.Tensor, group: int = GROUP):
    """Asymmetric min-max int4 per group: (q [out, in], zero [out, groups], scale [out, groups])."""
    out, n_in = w.shape
    wg = w.float().reshape(out, n_in // group, group)
    lo, hi = wg.amin(2), wg.amax(2)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()  # the formats store fp16 scales
    zero = (-lo / scale).round().clamp(0, 15)
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).reshape(out, n_in)
    return q.to(torch.int32), zero.to(torch.int32), scale


def awq_pack(intweight_in_out: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing, transliterated: [rows, cols] -> [rows, cols / 8]."""
    rows, cols = intweight_in_out.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight_in_out[:, col * 8 + AWQ_ORDER[i]].long() << (i * 4)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def gptq_pack_rows(intweight_in_out: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack for qweight: input rows 8r .. 8r + 7 into row r, in order."""
    rows, cols = intweight_in_out.shape
    packed = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows // 8):
        for j in range(8):
            packed[r] |= intweight_in_out[8 * r + j].long() << (4 * j)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def gptq_pack_cols(z: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qzeros packing: columns 8c .. 8c + 7 into column c, in order."""
    return gptq_pack_rows(z.t().contiguous()).t().contiguous()


def awq_checkpoint(tmp, model, qc_over=None, drop=None, name="awq"):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    deq = {}
    for m in modules(model):
        w = sd.pop(f"{m}.weight")
        q, zero, scale = int4_grid(w)
        g = torch.arange(w.shape[1]) // GROUP
        deq[m] = (q.float() - zero[:, g]) * scale[:, g]
        sd[f"{m}.qweight"] = awq_pack(q.t().contiguous())
        sd[f"{m}.qzeros"] = awq_pack(zero.t().contiguous())
        sd[f"{m}.scales"] = scale.t().contiguous().half()
    for k in drop or ():
        sd.pop(k)
    qc = dict(dict(quant_method="awq", bits=4, group_size=GROUP, zero_point=True, version="gemm",
                   modules_to_not_convert=None), **(qc_over or {}))
    return write(tmp / name, dict(model.config.to_dict(), quantization_config=qc), sd), \
        float_copy(tmp, model, deq, name + "-deq")


def gptq_checkpoint(tmp, model, act_order: bool, qc_over=None, drop=None, name="gptq", fmt="gptq", lm_head=False):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    deq = {}
    for m in modules(model) + (["lm_head"] if lm_head else []):
        w = sd.pop(f"{m}.weight")
        n_in = w.shape[1]
        # act-order: a column permutation defines the groups, g_idx names each column's group
        perm = torch.randperm(n_in, generator=gen) if act_order else torch.arange(n_in)
        q_p, zero, scale = int4_grid(w[:, perm])
        q = torch.empty_like(q_p)
        q[:, perm] = q_p
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // GROUP).to(torch.int32)
        deq[m] = (q.float() - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
        zero = zero.clamp(min=1)  # v1 stores zero - 1: a zero of 0 would not fit (AutoGPTQ's known limit)
        deq[m] = (q.float() - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
        sd[f"{m}.qweight"] = gptq_pack_rows(q.t().contiguous())
        sd[f"{m}.qzeros"] = gptq_pack_cols((zero - (1 if fmt == "gptq" else 0)).t().contiguous())
        sd[f"{m}.scales"] = scale.t().contiguous().half()
        sd[f"{m}.g_idx"] = g_idx
    for k in drop or ():
        sd.pop(k)
    qc = dict(dict(quant_method="gptq", bits=4, group_size=GROUP, desc_act=act_order, sym=False,
                   checkpoint_format=fmt), **(dict(lm_head=True) if lm_head else {}), **(qc_over or {}))
    return write(tmp / name, dict(model.config.to_dict(), quantization_config=qc), sd), \
        float_copy(tmp, model, deq, name + "-deq")


def modelopt_checkpoint(tmp, model, in_config: bool, name="modelopt", lm_head: bool = False):
    """ModelOpt FP8 as TensorRT-LLM's quantize script exports it (hf_quant_config.json); lm_head: the LM head
    quantized too (its --quantize_lm_head: not in exclude_modules)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    deq = {}
    for m in modules(model) + (["lm_head"] if lm_head else []):
        w = sd[f"{m}.weight"].float()
        s = w.abs().amax() / 448.0
        q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        deq[m] = q.float() * s
        sd[f"{m}.weight"], sd[f"{m}.weight_scale"], sd[f"{m}.input_scale"] = q, s.reshape(()), torch.tensor(0.03)
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": [] if lm_head else ["lm_head"]}
    config = model.config.to_dict()
    if in_config:
        config["quantization_config"] = dict(quant_method="modelopt", **quant)
    files = {"hf_quant_config.json": {"producer": {"name": "modelopt", "version": "0.19.0"}, "quantization": quant}}
    return write(tmp / name, config, sd, files), float_copy(tmp, model, deq, name + "-deq")


def test_awq_equals_dequantized(tmp_path):
    q, deq = awq_checkpoint(tmp_path, hf_model())
    assert rel(logits(q), logits(deq)) < 1e-3


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_equals_dequantized(tmp_path, act_order, fmt):
    q, deq = gptq_checkpoint(tmp_path, hf_model(), act_order, fmt=fmt)
    loaded = load_model(q)
    quantized = [w for w in loaded.model.weights.values() if isinstance(w, QWeight)]
    assert len(quantized) == 2 * len(LINEARS) and all(w.desc.act_order == act_order for w in quantized)
    assert all((w.g_idx is not None) == act_order for w in quantized)
    assert rel(logits(q), logits(deq)) < 1e-3


def test_gptq_with_the_lm_head_quantized(tmp_path):
    """GPTQModel's `lm_head: true`: the LM head stored as qweight / qzeros / scales / g_idx too, read as such."""
    q, deq = gptq_checkpoint(tmp_path, hf_model(), False, lm_head=True)
    loaded = load_model(q)
    assert isinstance(loaded.model.weights["lm_head"], QWeight)
    assert rel(logits(q), logits(deq)) < 1e-3


@pytest.mark.parametrize("in_config", [False, True])
def test_modelopt_fp8(tmp_path, in_config):
    q, deq = modelopt_checkpoint(tmp_path, hf_model(), in_config)
    loaded, ref = load_model(q), load_model(deq)
    quantized = [(n, w) for n, w in loaded.model.weights.items() if isinstance(w, QWeight)]
    assert len(quantized) == 2 * len(LINEARS)
    for n, w in quantized:
        assert_stored_fp8(loaded, n, w, ref.model.weights[n].float())
        assert w.desc.act_static and w.input_scale.item() == pytest.approx(0.03)
    # W8A8: the activations are quantized too (a static scale), and q/k/v and gate/up share one scale
    assert rel(logits(q), logits(deq)) < 8e-2


def test_modelopt_fp8_with_the_lm_head_quantized(tmp_path):
    """exclude_modules without lm_head: the LM head stored fp8 too, read as such (not as a float tensor)."""
    q, deq = modelopt_checkpoint(tmp_path, hf_model(), True, lm_head=True)
    loaded, ref = load_model(q), load_model(deq)
    assert isinstance(loaded.model.weights["lm_head"], QWeight)
    assert_stored_fp8(loaded, "lm_head", loaded.model.weights["lm_head"], ref.model.weights["lm_head"].float())
    assert rel(logits(q), logits(deq)) < 8e-2


# ---------------------------------------------------------------- bad input: one message naming the key or tensor


def test_unknown_quant_method(tmp_path):
    model = hf_model()
    folder = write(tmp_path / "bnb", dict(model.config.to_dict(), quantization_config={"quant_method": "bitsandbytes"}),
                   dict(model.state_dict()))
    with pytest.raises(CheckpointError, match=r"quant_method 'bitsandbytes' is not supported; supported: "
                                              r"compressed-tensors, awq, gptq, modelopt"):
        load_model(folder)


def test_bad_inputs(tmp_path):
    model = hf_model()
    m = "model.layers.0.self_attn.q_proj"
    q, _ = awq_checkpoint(tmp_path, model, qc_over={"bits": 8}, name="awq8")
    with pytest.raises(CheckpointError, match=r"quantization_config.bits is 8; AWQ"):
        load_model(q)
    q, _ = gptq_checkpoint(tmp_path, model, True, drop=[f"{m}.g_idx"], name="no-gidx")
    with pytest.raises(CheckpointError, match=rf"missing tensor '{m}.g_idx'.*desc_act is true"):
        load_model(q)
    q, _ = gptq_checkpoint(tmp_path, model, False, qc_over={"checkpoint_format": "marlin"}, name="marlin")
    with pytest.raises(CheckpointError, match=r"checkpoint_format 'marlin' is not supported"):
        load_model(q)
    # a scale of the wrong shape (one group short), in each format
    q, _ = awq_checkpoint(tmp_path, model, name="awq-bad")
    sd = load_file(str(q / "model.safetensors"))
    sd[f"{m}.scales"] = sd[f"{m}.scales"][:1]
    save_file(sd, str(q / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{m}.scales' .* has shape \[1, 256\]; quantized weight "
                                              r"'layer.0.wq' \[256, 256\] needs \[2, 256\] \(one scale per group\)"):
        load_model(q)
    folder, _ = ct_checkpoint(tmp_path, "FP8_DYNAMIC", name="ct-bad")
    sd = load_file(str(folder / "model.safetensors"))
    sd[f"{m}.weight_scale"] = sd[f"{m}.weight_scale"][:7]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{m}.weight_scale' .* has shape \[7, 1\]"):
        load_model(folder)
    shutil.rmtree(folder)
