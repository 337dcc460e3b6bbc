"""`kiln quantize` (runtime/quantize.py): on a tiny random Llama (hidden 256) saved with
save_pretrained and given the default model's tokenizer, each scheme writes a checkpoint that
`load_model` reads back through its standard format; its logits stay close to the float model's,
and the calibrated schemes (AWQ, GPTQ, SmoothQuant) are closer to it than round-to-nearest on the
calibration text. A few input channels of each norm are made large (outliers, as real LLMs have):
that is the situation calibration exists for."""

from __future__ import annotations

import json

import pytest
import torch
from kiln.cli import main
from kiln.dsl.quant import QWeight
from kiln.runtime.checkpoint import open_checkpoint
from kiln.runtime.eval import calibration_text
from kiln.runtime.model import SingleSequence, load_model
from kiln.runtime.quantize import quantize_checkpoint
from kiln.runtime.tokenizer import Tokenizer

from tests.configs import FAMILY_CONFIGS

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kiln.runtime.gguf_file import default_model_path

    root = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(FAMILY_CONFIGS["llama"], hidden_size=256, intermediate_size=384,
                                                      vocab_size=49152, num_hidden_layers=2))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(256)[:6]] = 12.0  # outlier channels
    folder = root / "float"
    model.save_pretrained(folder)
    tok = Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))
    tok.save(folder)
    text = root / "calib.txt"
    text.write_text(calibration_text()[:6000])
    ids = tok.encode(text.read_text(), add_special_tokens=False)[:96]
    return root, folder, text, ids


def logits(path, ids):
    return SingleSequence(load_model(path), len(ids) + 1).step(ids, all_logits=True)


def err(a, b) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


def quantize(setup, scheme, name=None, *extra):
    root, folder, text, _ = setup
    out = root / (name or scheme)
    rc = main(["quantize", str(folder), "--scheme", scheme, "--calibration", str(text), "--out", str(out),
               "--samples", "4", "--seq-len", "128", *extra])
    assert rc == 0
    return out


BOUNDS = {"fp8": 0.25, "fp8-static": 0.25, "fp8-channel": 0.15, "int8-wo": 0.05, "smoothquant": 0.25,
          "int4-wo": 0.5}


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_scheme_loads_and_is_close(setup, scheme):
    _, folder, _, ids = setup
    out = quantize(setup, scheme)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file()
    e = err(logits(out, ids), logits(folder, ids))
    assert e < BOUNDS[scheme]


@pytest.mark.parametrize("scheme,extra", [("awq", ()), ("gptq", ()), ("gptq", ("--act-order",)),
                                          ("smoothquant", ())])
def test_calibration_beats_round_to_nearest(setup, scheme, extra):
    root, folder, _, ids = setup
    ref = logits(folder, ids)
    out = quantize(setup, scheme, "calibrated-" + scheme + "".join(extra), *extra)
    if scheme == "smoothquant":  # the same W8A8 format without smoothing
        baseline = quantize_checkpoint(folder, "smoothquant", root / "w8a8-plain", str(setup[2]), samples=4,
                                       seq_len=128, migrate=False, progress=False)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["config_groups"]["group_0"]["input_activations"]["type"] == "int"
    else:
        baseline = root / "int4-wo" if (root / "int4-wo").exists() else quantize(setup, "int4-wo")
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == scheme
    calibrated, plain = err(logits(out, ids), ref), err(logits(baseline, ids), ref)
    assert calibrated < plain, (scheme, calibrated, plain)


def test_fp8_static_writes_calibrated_activation_scales(setup):
    """fp8-static (llm-compressor's FP8 static scheme): every linear gets an fp32 [1] `input_scale`, the largest
    |input| the float model's calibration pass saw / 448, which load_model reads as a static per-tensor activation
    scale (the path TensorRT-LLM's FP8 checkpoints take); siblings of one input share what they saw."""
    from safetensors.torch import load_file

    root = setup[0]
    out = root / "fp8-static" if (root / "fp8-static").exists() else quantize(setup, "fp8-static")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    act = qc["config_groups"]["group_0"]["input_activations"]
    assert (act["type"], act["strategy"], act["dynamic"]) == ("float", "tensor", False)
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update({k: v for k, v in load_file(f).items() if k.endswith(".input_scale")})
    assert len(stored) == 7 * 2 and all(v.dtype == torch.float32 and v.shape == (1,) and v > 0 for v in stored.values())
    layer = "model.layers.0."
    assert stored[layer + "self_attn.q_proj.input_scale"] == stored[layer + "self_attn.v_proj.input_scale"]
    assert stored[layer + "mlp.gate_proj.input_scale"] == stored[layer + "mlp.up_proj.input_scale"]
    weights = load_model(out).model.weights
    loaded = [w for w in weights.values() if isinstance(w, QWeight)]
    assert len(loaded) == 7 * 2 and all(w.desc.act_static and float(w.input_scale) > 0 for w in loaded)


def test_failure_leaves_nothing(setup, capsys):
    root, folder, _, _ = setup
    out = root / "never"
    missing = root / "missing.txt"
    assert main(["quantize", str(folder), "--scheme", "awq", "--calibration", str(missing), "--out", str(out)]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert not out.exists() and not list(root.glob(".never.*"))
    short = root / "short.txt"
    short.write_text("two words")
    assert main(["quantize", str(folder), "--scheme", "gptq", "--calibration", str(short), "--out", str(out)]) == 2
    assert "fewer than one sample of --seq-len" in capsys.readouterr().err
    assert not out.exists() and not list(root.glob(".never.*"))
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["quantize", str(folder), "--scheme", "fp8", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep"


# ---------------------------------------------------------------- GGUF input, --group-size


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (what the loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A random Llama (hidden 128, intermediate 192) written as a GGUF file the way llama.cpp's
    converter writes one: Q/K rows permuted, the MLP weights Q8_0 blocks, the default model's
    tokenizer metadata. Returns (path, the HF model with the GGUF's dequantized weights)."""
    gguf = pytest.importorskip("gguf")
    from kiln.runtime.gguf_file import default_model_path

    root = tmp_path_factory.mktemp("quantize-gguf")
    torch.manual_seed(1)
    config = transformers.AutoConfig.for_model(**dict(FAMILY_CONFIGS["llama"], hidden_size=128, intermediate_size=192,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                                      num_hidden_layers=2, tie_word_embeddings=True))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    src = open_checkpoint(default_model_path())
    path = root / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(128)
    w.add_feed_forward_length(192)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    w.add_tokenizer_model(src.metadata("tokenizer.ggml.model"))
    w.add_tokenizer_pre(src.metadata("tokenizer.ggml.pre"))
    w.add_token_list(src.metadata("tokenizer.ggml.tokens"))
    w.add_token_types(src.metadata("tokenizer.ggml.token_type"))
    w.add_token_merges(src.metadata("tokenizer.ggml.merges"))
    w.add_bos_token_id(src.metadata("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(src.metadata("tokenizer.ggml.eos_token_id"))
    w.add_chat_template(src.metadata("tokenizer.chat_template"))
    q8 = gguf.GGMLQuantizationType.Q8_0
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    with torch.no_grad():
        for i in range(2):
            for hf, g in names.items():
                t = sd[f"model.layers.{i}.{hf}.weight"]
                t = permute(t, 4) if g == "attn_q" else permute(t, 2) if g == "attn_k" else t
                if g.startswith("ffn_") and g != "ffn_norm":  # Q8_0 blocks: the float weight is their dequantization
                    blocks = gguf.quants.quantize(t.numpy(), q8)
                    w.add_tensor(f"blk.{i}.{g}.weight", blocks, raw_dtype=q8)
                    deq = torch.from_numpy(gguf.quants.dequantize(blocks, q8)).reshape(t.shape)
                    model.get_parameter(f"model.layers.{i}.{hf}.weight").copy_(deq)
                else:
                    w.add_tensor(f"blk.{i}.{g}.weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def test_gguf_input_writes_a_hugging_face_checkpoint(gguf_model, tmp_path):
    """The written tensors are the GGUF's dequantized weights in Hugging Face order (q/k rows
    unpermuted), config.json and the tokenizer load back, and the logits equal quantizing the
    GGUF on load — and HF transformers' on the same weights, for the float tensors written."""
    from kiln.dsl.quant import SCHEMES, quantize_weight

    path, model = gguf_model
    out = tmp_path / "fp8"
    assert main(["quantize", str(path), "--scheme", "fp8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "gguf_architecture" not in config
    ckpt = open_checkpoint(out)
    sd = model.state_dict()
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        want = quantize_weight(sd[f"{name}.weight"].float(), SCHEMES["fp8"].weight)
        assert torch.equal(ckpt.get(f"{name}.weight").float(), want.q.float()), name
        assert torch.equal(ckpt.get(f"{name}.weight_scale").reshape(()), want.scale.reshape(())), name
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(ckpt.get(name), sd[name].float()), name
    text = "The quick brown fox jumps over the lazy dog."
    gguf_tok = Tokenizer.from_checkpoint(open_checkpoint(path))
    assert Tokenizer.from_checkpoint(ckpt).encode(text) == gguf_tok.encode(text)
    ids = gguf_tok.encode(text, add_special_tokens=False)
    got = logits(out, ids)
    on_load = SingleSequence(load_model(path, quantization="fp8"), len(ids) + 1).step(ids, all_logits=True)
    assert err(got, on_load) < 1e-5
    # the float model the fp8 one was made from is HF's model with the GGUF's weights
    out32 = tmp_path / "int8"
    assert main(["quantize", str(path), "--scheme", "int8-wo", "--out", str(out32)]) == 0
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    assert err(logits(out32, ids), ref) < 0.05


def test_group_size(gguf_model, tmp_path, capsys):
    """--group-size reaches the written format and the loaded weights; a group that does not
    divide a weight's input features is one error naming that weight, and nothing is written."""
    path, model = gguf_model
    bad = tmp_path / "bad"
    assert main(["quantize", str(path), "--scheme", "int4-wo", "--out", str(bad)]) == 2  # 192 % 128
    msg = capsys.readouterr().err
    assert "w_down" in msg and "192 input features" in msg and "--group-size" in msg and "Traceback" not in msg
    assert not bad.exists() and not list(tmp_path.glob(".bad.*"))
    assert main(["quantize", str(path), "--scheme", "fp8", "--group-size", "64", "--out", str(bad)]) == 2
    assert "--group-size applies to the int4 schemes" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text()[:4000])
    ids = Tokenizer.from_checkpoint(open_checkpoint(path)).encode("Hello, world. " * 4, add_special_tokens=False)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    for scheme, key in (("int4-wo", None), ("awq", "group_size"), ("gptq", "group_size")):
        out = tmp_path / scheme
        assert main(["quantize", str(path), "--scheme", scheme, "--group-size", "64", "--calibration", str(text),
                     "--samples", "2", "--seq-len", "64", "--out", str(out)]) == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        got = qc[key] if key else qc["config_groups"]["group_0"]["weights"]["group_size"]
        assert got == 64, scheme
        loaded = load_model(out)
        descs = {s.quant for s in loaded.plan.weights.values() if s.quant.quantized}
        assert {d.group_size for d in descs} == {64}, scheme
        assert err(SingleSequence(loaded, len(ids) + 1).step(ids, all_logits=True), ref) < 0.3, scheme


def test_readme_accuracy_commands_parse():
    """The README's "Quantization accuracy" table lists the command of every row; each must be
    one the CLI takes (parsed only: the 16k-token evaluations are not run in CI)."""
    import re
    import shlex
    from pathlib import Path

    from kiln.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quantization accuracy", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    commands = [c.strip() for line in table for cell in re.findall(r"`(kiln [^`]+)`", line) for c in cell.split("&&")]
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "kiln", command
        args = parser.parse_args(argv[1:])
        assert args.fn is not None, command


def test_kl_base_compares_a_written_checkpoint_with_its_float_model(gguf_model, tmp_path, capsys):
    """`kiln eval perplexity OUT --kl-divergence` alone compares OUT with itself (it loads quantized
    either way); `--kl-base` names the float model it came from."""
    path, _ = gguf_model
    out = tmp_path / "int8"
    assert main(["quantize", str(path), "--scheme", "int8-wo", "--out", str(out)]) == 0
    capsys.readouterr()
    common = ["eval", "perplexity", str(out), "--kl-divergence", "--context", "32", "--max-tokens", "96", "--json"]
    assert main(common) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(common + ["--kl-base", str(path)]) == 0
    based = json.loads(capsys.readouterr().out)
    assert alone["kl_mean"] == 0 and based["kl_mean"] > 0 and based["ppl"] == alone["ppl"]
    assert based["ppl_base"] != based["ppl"]
    assert main(["eval", "perplexity", str(out), "--kl-base", str(path), "--max-tokens", "96", "--context", "32"]) == 2
    assert "--kl-base applies with --kl-divergence" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["fp8", "int4-wo"])
def test_lm_head_quantized_too(setup, scheme):
    """--lm-head: the LM head written quantized (compressed-tensors, left out of `ignore`), read back quantized,
    and the logits those of quantizing on load with SCHEME+lm-head (the same rounding; scales stored as
    written)."""
    _, folder, _, ids = setup
    out = quantize(setup, scheme, scheme + "-lm-head", "--lm-head")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == []
    m = load_model(out)
    assert m.plan.weights["lm_head"].quant.quantized and isinstance(m.model.weights["lm_head"], QWeight)
    ours = SingleSequence(m, len(ids) + 1).step(ids, all_logits=True)
    on_load = SingleSequence(load_model(folder, quantization=scheme + "+lm-head"), len(ids) + 1).step(
        ids, all_logits=True)
    assert err(ours, on_load) < 1e-3
    assert err(ours, logits(quantize(setup, scheme) if not (setup[0] / scheme).exists() else setup[0] / scheme,
                            ids)) > 1e-3  # the head's rounding shows


def test_lm_head_needs_a_round_to_nearest_scheme(setup, capsys):
    root, folder, _, _ = setup
    rc = main(["quantize", str(folder), "--scheme", "awq", "--lm-head", "--out", str(root / "never-awq")])
    err_text = capsys.readouterr().err
    assert rc == 2 and "--lm-head applies to the round-to-nearest schemes" in err_text, err_text
    assert not (root / "never-awq").exists()


def _llama_plan(**over):
    from kiln.dsl import load_spec, passes

    cfg = dict(FAMILY_CONFIGS["llama"], hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
               **over)
    return passes.build(load_spec("models/llama.kiln"), cfg)


def test_awq_folds_the_down_projection_into_up_and_leaves_queries_and_keys_unclipped():
    """AutoAWQ's up_proj -> down_proj smoothing: each layer's down projection reads act(gate) * up, so its s folds
    into up's rows; the linears feeding attention's queries and keys (through rotary) are the ones left unclipped."""
    from kiln.runtime.quantize import product_folds, query_key_slots

    plan = _llama_plan()
    slots = {n for n in plan.weights if n.split(".")[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    assert product_folds(plan, slots) == [(f"layer.{i}.w_down", f"layer.{i}.w_up", None) for i in range(2)]
    assert query_key_slots(plan) == {f"layer.{i}.{w}" for i in range(2) for w in ("wq", "wk")}
    # up not quantized (not watched): nothing to fold into
    assert product_folds(plan, slots - {"layer.0.w_up"}) == [("layer.1.w_down", "layer.1.w_up", None)]


def test_awq_fold_keeps_the_float_model():
    """Dividing up's rows (and bias) by s and multiplying down's columns by s leaves the MLP's output unchanged."""
    torch.manual_seed(0)
    h, gate, up, down, bias = torch.randn(5, 16), torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24), \
        torch.randn(24)
    s = torch.rand(24) * 4 + 0.25
    mlp = torch.nn.functional.silu(h @ gate.t()) * (h @ up.t() + bias) @ down.t()
    folded = torch.nn.functional.silu(h @ gate.t()) * (h @ (up / s[:, None]).t() + bias / s) @ (down * s).t()
    torch.testing.assert_close(folded, mlp, rtol=1e-5, atol=1e-5)


def test_awq_clip_never_worse_than_round_to_nearest_per_group():
    """The clip search scores each group's share of the output on the calibration rows; the unclipped weight is one
    of its candidates, so no group's error grows, and with heavy-tailed weights some shrink."""
    from kiln.runtime.quantize import awq_clip, rtn_int4

    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 128))
    x = torch.randn(256, 128)
    group = 32

    def group_err(q):
        d = (q - w).reshape(32, 4, group)
        return torch.einsum("tgk,cgk->ctg", x.reshape(256, 4, group), d).pow(2).mean(1)

    plain, clipped = group_err(rtn_int4(w, group)), group_err(rtn_int4(awq_clip(w, x, group), group))
    assert (clipped <= plain * (1 + 1e-5)).all()
    assert (clipped < 0.9 * plain).sum() > 8
    assert awq_clip(w, x, group).abs().le(w.abs()).all()
