"""LoRA adapters (runtime/lora.py) against transformers + PEFT, fp32 on the CPU.

Adapters are made by PEFT itself (`get_peft_model` with random A and B, `save_pretrained`) on
the tiny random models of tests/configs.py; Kiln loads the saved folder and its logits must
equal PEFT's. A batch mixing adapters must give each request what it gets alone.
"""

from __future__ import annotations

import pytest
import torch
from kiln.llm import LLM
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.lora import LoraError, UnknownLora
from kiln.runtime.model import load_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.verify import hf_random_model

from tests.configs import FAMILY_CONFIGS

peft = pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]


def make_adapter(model, out, r, targets, seed, alpha=None, rslora=False):
    """A PEFT adapter with random A and B (PEFT's init zeroes B) saved to `out`; the PEFT model."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets, init_lora_weights=False,
                          use_rslora=rslora)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out)
    return pm


def kiln_logits(loaded, ids: list[int], adapter: int) -> torch.Tensor:
    kv = KVStore(loaded.plan.sites, 4, 16, torch.float32, torch.device("cpu"))
    batch = StepBatch(torch.tensor(ids), [SeqSlice(0, len(ids), 0, (2, 0, 1, 3), adapter=adapter)])
    with torch.no_grad():
        return loaded.model.forward(batch, kv, all_logits=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf_random_model(FAMILY_CONFIGS["llama"]).save_pretrained(d)
    return d


def _check_against_peft(base_dir, config, adapters, tmp_path):
    """adapters: [(r, targets, rslora)]: each through PEFT and through one LoraSet."""
    from kiln.runtime.lora import LoraSet

    loaded = load_model(base_dir)
    lora = LoraSet(loaded.plan)
    loaded.model.lora = lora
    ids = torch.randint(0, config["vocab_size"], (13,), generator=torch.Generator().manual_seed(3)).tolist()
    for i, (r, targets, rslora) in enumerate(adapters):
        hf = hf_random_model(config)
        pm = make_adapter(hf, tmp_path / f"a{i}", r, targets, seed=10 + i, rslora=rslora)
        lora.load(f"a{i}", tmp_path / f"a{i}")
        with torch.no_grad():
            ref = pm(torch.tensor([ids])).logits[0]
            with pm.disable_adapter():
                base = pm(torch.tensor([ids])).logits[0]
        assert (ref - base).abs().max() > 1e-2  # the adapter changes the logits
        for slot in (i, -1):  # the adapter, then the base model from the same set
            mine = kiln_logits(loaded, ids, slot)
            want = ref if slot >= 0 else base
            assert float((mine - want).abs().max() / want.abs().max()) <= 1e-4


def test_llama_adapters_match_peft(llama, tmp_path):
    # Different ranks (padded to 16 in one stack), all modules or attention only, rsLoRA scaling.
    _check_against_peft(llama, FAMILY_CONFIGS["llama"], [(8, ALL, False), (4, ATTN, True), (20, ["down_proj"], False)],
                        tmp_path)


def test_moe_attention_adapter_matches_peft(tmp_path):
    # Qwen3-MoE: attention modules (transformers stores the experts as fused parameters, not
    # nn.Linear modules, so PEFT's LoRA cannot target them; Kiln refuses expert targets).
    config = FAMILY_CONFIGS["qwen3_moe"]
    d = tmp_path / "base"
    hf_random_model(config).save_pretrained(d)
    _check_against_peft(d, config, [(8, ATTN, False)], tmp_path)


def test_fused_qkv_slices_match_peft(tmp_path):
    # Phi-3 reads q, k, v as row slices of one qkv_proj: B's rows split the same way, exactly.
    config = FAMILY_CONFIGS["phi3"]
    d = tmp_path / "base"
    hf_random_model(config).save_pretrained(d)
    _check_against_peft(d, config, [(8, ["qkv_proj", "o_proj", "gate_up_proj"], False)], tmp_path)


def test_mixed_batch_equals_each_alone(llama, tmp_path):
    config = FAMILY_CONFIGS["llama"]
    paths = {}
    for i in range(8):
        paths[f"ad{i}"] = tmp_path / f"ad{i}"
        make_adapter(hf_random_model(config), paths[f"ad{i}"], r=(4, 8, 16, 12)[i % 4],
                     targets=ALL if i % 2 else ATTN, seed=100 + i)
    llm = _llm(llama, paths)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (5 + i,), generator=gen).tolist() for i in range(9)]
    names = [f"ad{i}" for i in range(8)] + [None]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, lora=n) for n in names]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], [sp])[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # the adapters do differ
    # The same prompt under two adapters and the base model: three different continuations.
    outs = llm.generate([prompts[0]] * 3, [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, lora=n)
                                          for n in ("ad0", "ad1", None)])
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3


def _llm(base, paths) -> LLM:
    from kiln.runtime.engine import EngineConfig, LLMEngine

    llm = LLM.__new__(LLM)  # the tiny checkpoint has no tokenizer: token-id prompts only
    llm.tokenizer = None
    llm.engine = LLMEngine(load_model(base), None, EngineConfig(max_num_seqs=16, max_model_len=64))
    for name, path in paths.items():
        llm.load_lora(name, path)
    return llm


def test_bad_adapters_are_clear_errors(llama, tmp_path):
    llm = _llm(llama, {})
    with pytest.raises(LoraError, match="no such directory"):
        llm.load_lora("x", tmp_path / "missing")
    # An adapter made for another model shape: the shapes are named.
    other = dict(FAMILY_CONFIGS["llama"], hidden_size=32, intermediate_size=64)
    make_adapter(hf_random_model(other), tmp_path / "wide", 4, ATTN, seed=1)
    with pytest.raises(LoraError, match=r"q_proj.*do not fit weight 'layer\.0\.wq'|do not fit weight"):
        llm.load_lora("wide", tmp_path / "wide")
    # A module the model does not have (a GPT-2 adapter on llama).
    gpt2 = FAMILY_CONFIGS["gpt2"]
    make_adapter(hf_random_model(gpt2), tmp_path / "gpt2", 4, ["c_attn"], seed=2)
    with pytest.raises(LoraError, match="transformer.h.0.attn.c_attn.*not a linear weight"):
        llm.load_lora("gpt2", tmp_path / "gpt2")
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(LoraError, match="adapter_config.json"):
        llm.load_lora("nocfg", tmp_path / "nocfg")
    # An unknown adapter name on a request, and unloading one that is not loaded.
    with pytest.raises(UnknownLora, match="'nope'"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, lora="nope"))
    with pytest.raises(UnknownLora, match="'nope'"):
        llm.unload_lora("nope")
    # Still serving: a good adapter loads, runs, unloads, and its name is free again.
    make_adapter(hf_random_model(FAMILY_CONFIGS["llama"]), tmp_path / "good", 4, ATTN, seed=3)
    llm.load_lora("good", tmp_path / "good")
    with pytest.raises(LoraError, match="already loaded"):
        llm.load_lora("good", tmp_path / "good")
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, lora="good"))[0].outputs[0].token_ids
    llm.unload_lora("good")
    with pytest.raises(UnknownLora):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, lora="good"))


def test_moe_expert_targets_are_refused(tmp_path):
    from kiln.runtime.lora import LoraSet
    from safetensors.torch import save_file

    loaded_cfg = FAMILY_CONFIGS["mixtral"]
    d = tmp_path / "base"
    hf_random_model(loaded_cfg).save_pretrained(d)
    loaded = load_model(d)
    ad = tmp_path / "experts"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    m = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1"
    save_file({f"{m}.lora_A.weight": torch.zeros(4, 64), f"{m}.lora_B.weight": torch.zeros(128, 4)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="experts"):
        LoraSet(loaded.plan).load("e", ad)


def write_adapter(path, layers: int, hidden: int, r: int, seed: int, modules=("q_proj", "v_proj"), out=None,
                  widths=None, scale: float = 0.3):
    """A PEFT-format adapter written directly (the served tiny model has no transformers twin); A and B drawn
    from N(0, scale^2)."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "use_rslora": False}))
    tensors = {}
    for layer in range(layers):
        for m in modules:
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            width = out or (widths or {}).get(m) or (hidden // 2 if m in ("k_proj", "v_proj") else hidden)
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(width, r, generator=gen) * scale
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_server_adapters_as_models(tmp_path):
    httpx = pytest.importorskip("httpx")
    from tests.server_harness import TINY, offline_llm, running, served

    a = write_adapter(tmp_path / "a", TINY["num_hidden_layers"], TINY["hidden_size"], 8, seed=1)
    b = write_adapter(tmp_path / "b", TINY["num_hidden_layers"], TINY["hidden_size"], 16, seed=2)
    bad = write_adapter(tmp_path / "bad", TINY["num_hidden_layers"], TINY["hidden_size"], 8, seed=3, out=7)
    oracle = offline_llm()
    oracle.load_lora("a", a)
    oracle.load_lora("b", b)
    model = served()
    model.engine.engine.load_lora("a", a)  # as `kiln serve --lora a=PATH` does
    with running([model]) as url:
        def post(route, body):
            return httpx.post(f"{url}/v1/{route}", json=body, timeout=60)

        assert post("load_lora_adapter", {"lora_name": "b", "lora_path": str(b)}).status_code == 200
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        assert ids == ["tiny", "a", "b"]
        for name in ("a", "b", "tiny"):
            r = post("completions", {"model": name, "prompt": "The sky is", "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == name
            want = oracle.generate(["The sky is"], SamplingParams(temperature=0.0, max_tokens=6,
                                                                  lora=None if name == "tiny" else name))
            assert r.json()["choices"][0]["text"] == want[0].outputs[0].text
        # Bad input: each a 4xx naming it; the server keeps serving.
        r = post("completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
        r = post("load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path / "missing")})
        assert r.status_code == 400 and "no such directory" in r.json()["error"]["message"]
        r = post("load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert r.status_code == 400 and "do not fit weight" in r.json()["error"]["message"]
        r = post("load_lora_adapter", {"lora_name": "a", "lora_path": str(b)})
        assert r.status_code == 400 and "already" in r.json()["error"]["message"]
        r = post("load_lora_adapter", {"lora_name": "c"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        r = post("unload_lora_adapter", {"lora_name": "nope"})
        assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
        assert post("unload_lora_adapter", {"lora_name": "b"}).status_code == 200
        assert post("completions", {"model": "b", "prompt": "x", "max_tokens": 2}).status_code == 404
        r = post("chat/completions", {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "a"
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_sgmv_kernel_compiles_for_sm90a(dtype, tmp_path, monkeypatch):
    from kiln.codegen import nvrtc
    from kiln.codegen.lora_kernels import LoraSpec
    from kiln.codegen.render import render

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))  # compile for real
    ks = render(LoraSpec(4096, 6144, 48, 16, dtype, origin="models/llama.kiln:30:5 linear"))
    lines = ks.source.splitlines()
    for entry in ks.entries:  # each entry point carries its spec origin
        at = next(i for i, line in enumerate(lines) if f" {entry}(" in line and "__global__" in line)
        assert lines[at - 1] == "// origin: models/llama.kiln:30:5 linear"
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
    assert img.kind == "cubin" and all(e.encode() in img.data for e in ks.entries)
