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


BOUNDS = {"fp8": 0.25, "fp8-channel": 0.15, "int8-wo": 0.05, "smoothquant": 0.25, "int4-wo": 0.5}


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
