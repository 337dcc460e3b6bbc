"""Calibrated fp8 KV cache scales: `kiln quantize --scheme fp8-kv` (runtime/quantize.py) writes each
attention module's `k_scale` / `v_scale` in llm-compressor's layout (compressed-tensors
`kv_cache_scheme`), `load_model(..., kv_cache_dtype="fp8")` reads them into the plan's sites
(runtime/quant_formats.py, passes.kv_cache) and the KV store; on a tiny random Llama, whose keys
and values are far below 448 (most of them in e4m3's subnormals at scale 1.0), the calibrated
cache's logits are closer to the float cache's than the uncalibrated one's."""

from __future__ import annotations

import json

import pytest
import torch
from kiln.cli import main
from kiln.dsl import passes
from kiln.dsl.errors import SpecError
from kiln.runtime.checkpoint import CheckpointError
from kiln.runtime.eval import calibration_text
from kiln.runtime.model import SingleSequence, load_model
from kiln.runtime.tokenizer import Tokenizer

from tests.configs import FAMILY_CONFIGS

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

LAYERS = 2
SEQ = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kv-scales"))


def char_tokenizer() -> Tokenizer:
    """One token per character of printable ASCII and newline (a `tokenizers` WordLevel model)."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {"<unk>": 0, "<eos>": 1, "\n": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return Tokenizer(backend, source="characters", eos_token="<eos>", unk_token="<unk>")


def build(root):
    """(root, float folder, calibration text, token ids of it, fp8-kv checkpoint) under `root`
    (tests/gpu/test_kv_scales_gpu.py uses it too)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(FAMILY_CONFIGS["llama"], vocab_size=49152,
                                                      num_hidden_layers=LAYERS))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # keys and values of a few hundredths (at scale 1.0, in e4m3's subnormals);
        for layer in model.model.layers:  # the queries and output projection make up for it
            attn = layer.self_attn
            attn.k_proj.weight *= 0.05
            attn.q_proj.weight *= 20
            attn.v_proj.weight *= 0.05
            attn.o_proj.weight *= 20
    folder = root / "float"
    model.save_pretrained(folder)
    tok = char_tokenizer()  # calibration needs text -> ids only (and the GPU machine lacks SmolLM2's)
    tok.save(folder)
    text = root / "calib.txt"
    text.write_text(calibration_text()[:4000])
    ids = tok.encode(text.read_text(), add_special_tokens=False)
    out = root / "fp8kv"
    assert main(["quantize", str(folder), "--scheme", "fp8-kv", "--calibration", str(text), "--out", str(out),
                 "--samples", "2", "--seq-len", str(SEQ)]) == 0
    return root, folder, text, ids, out


def logits(path, ids, kv="auto"):
    return SingleSequence(load_model(path, kv_cache_dtype=kv), len(ids) + 1).step(ids, all_logits=True)


def err(a, b) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


def test_checkpoint_format(setup):
    _, _, _, _, out = setup
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"] == {}
    kv = qc["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["strategy"], kv["dynamic"]) == ("float", 8, "tensor", False)
    tensors = safetensors.load_file(str(out / "model.safetensors"))
    for i in range(LAYERS):
        for which in ("k_scale", "v_scale"):
            t = tensors[f"model.layers.{i}.self_attn.{which}"]
            assert t.dtype == torch.float32 and t.shape == (1,) and 0 < t.item() < 1
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float32  # weights stay float


def test_scales_are_the_cached_values_amax(setup):
    """Each scale is max |K| (|V|) / 448 over the calibration samples, measured here from what a
    float (run-dtype) cache holds after the float model ran the same samples."""
    _, folder, _, ids, out = setup
    loaded = load_model(folder)
    amax = [[0.0, 0.0] for _ in range(LAYERS)]
    for s in range(2):
        seq = SingleSequence(loaded, SEQ)
        seq.step(ids[s * SEQ:(s + 1) * SEQ])
        for i in range(LAYERS):
            for j, cache in enumerate((seq.kv.k[i], seq.kv.v[i])):  # its own pages: all of them, full
                amax[i][j] = max(amax[i][j], cache.abs().max().item())
    plan = load_model(out, kv_cache_dtype="fp8").plan
    for i, site in enumerate(plan.sites):
        assert site.kv_dtype == "fp8"
        assert site.k_scale == pytest.approx(amax[i][0] / 448, rel=1e-5)
        assert site.v_scale == pytest.approx(amax[i][1] / 448, rel=1e-5)
        assert amax[i][0] < 448 / 8 and amax[i][1] < 448 / 8  # far from what scale 1.0 assumes


def test_calibrated_cache_is_closer_to_float(setup):
    _, folder, _, ids, out = setup
    ids = ids[:SEQ]
    ref = logits(folder, ids)
    assert torch.equal(logits(out, ids), ref)  # a run-dtype cache ignores the scales (as vLLM's "auto")
    calibrated, unit = err(logits(out, ids, "fp8"), ref), err(logits(folder, ids, "fp8"), ref)
    assert calibrated < unit / 2, (calibrated, unit)


def test_store_uses_the_scales(setup):
    """The KV store built from the plan holds the sites' scales, and its fp8 pages hold K / k_scale."""
    _, _, _, ids, out = setup
    loaded = load_model(out, kv_cache_dtype="fp8")
    seq = SingleSequence(loaded, SEQ)
    seq.step(ids[:16])
    for i, site in enumerate(loaded.plan.sites):
        assert (seq.kv.k_scale[i], seq.kv.v_scale[i]) == (site.k_scale, site.v_scale)
        page = seq.kv.k[i][seq.block_table[0]].float()
        assert page.abs().max().item() > 100  # the largest keys land near e4m3's top, not in its subnormals


def _rewrite(setup, name, edit):
    """A copy of the fp8-kv checkpoint with tensor `name` replaced by edit(tensor) (None: removed)."""
    import shutil

    root, _, _, _, out = setup
    bad = root / f"bad-{name.replace('.', '-')}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(out, bad)
    tensors = safetensors.load_file(str(bad / "model.safetensors"))
    t = edit(tensors.pop(name))
    if t is not None:
        tensors[name] = t
    safetensors.save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


def test_wrong_shape_names_the_tensor(setup):
    name = "model.layers.1.self_attn.k_scale"
    bad = _rewrite(setup, name, lambda t: torch.full((5,), t.item()))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_scale'.*shape \[5\]"):
        load_model(bad, kv_cache_dtype="fp8")
    assert main(["eval", "perplexity", str(bad), "--kv-cache-dtype", "fp8", "--max-tokens", "64",
                 "--context", "32"]) == 2


def test_missing_and_bad_values(setup):
    name = "model.layers.0.self_attn.v_scale"
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.self_attn\.v_scale'"):
        load_model(_rewrite(setup, name, lambda t: None), kv_cache_dtype="fp8")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.v_scale'.*finite and > 0"):
        load_model(_rewrite(setup, name, lambda t: -t), kv_cache_dtype="fp8")
    with pytest.raises(SpecError, match="finite floats > 0"):
        passes.kv_cache("fp8", {0: (0.0, 1.0)})
    with pytest.raises(SpecError, match="apply to an fp8 --kv-cache-dtype, not run"):
        passes.kv_cache("run", {0: (1.0, 1.0)})


def test_per_head_scales_read_as_their_largest(setup):
    """compressed-tensors' `attn_head` strategy ([kv_heads] scales): the cache keeps one scale per
    site, the heads' largest (what per-tensor calibration of the same values gives)."""
    name = "model.layers.0.self_attn.k_scale"
    heads = FAMILY_CONFIGS["llama"]["num_key_value_heads"]
    per_head = torch.linspace(0.01, 0.02, heads)
    bad = _rewrite(setup, name, lambda t: per_head)
    assert load_model(bad, kv_cache_dtype="fp8").plan.sites[0].k_scale == pytest.approx(0.02)
