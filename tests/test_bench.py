"""`kiln bench throughput --device cpu`: the benchmark's own code (the engine loop, the TTFT /
TPOT bookkeeping, the split of time by kind of step) run on a tiny model in CI. Nothing here
is a measurement: the assertions are about counts, which the run determines exactly."""

from __future__ import annotations

import json

import pytest
from kiln.cli import build_parser, main
from kiln.runtime.bench import throughput

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def args_for(config, *extra):
    return build_parser().parse_args(["bench", "throughput", "--device", "cpu", "--backend", "reference",
                                      "--config", config, "--spec", "llama", *extra])


@pytest.mark.parametrize("page", [None, "7"])
def test_throughput_counts_steps_by_kind(config, page):
    # 6 requests of 12 prompt tokens, 4 at a time, 16 tokens a step: prompts need >= 72/16 steps.
    r = throughput(args_for(config, "--requests", "6", "--input-len", "12", "--output-len", "5",
                            "--max-batch", "4", "--max-tokens-per-step", "16", *(("--page-size", page) if page else ())))
    assert r["requests"] == 6 and r["output_tok_s"] > 0 and r["preemptions"] == 0
    assert r["page_size"] == int(page or 16)
    assert r["mixed_steps"] >= 5  # 72 prompt tokens at <= 16 a step
    assert r["decode_steps"] >= 4  # the last 4 tokens of the last request are decode-only steps
    assert r["decode_steps_s"] + r["mixed_steps_s"] <= r["seconds"]
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]


def test_warm_up_stays_out_of_the_timed_run(config):
    """The warm-up request (and on a GPU the decode graphs' capture) runs before the timed region: the
    reported counters cover the workload alone (its prompt tokens, no prefix hits from the warm-up's
    prompt), the same as with --no-warmup."""
    common = ("--requests", "5", "--input-len", "20", "--output-len", "4", "--max-batch", "4",
              "--max-tokens-per-step", "16")
    warm = throughput(args_for(config, *common))
    cold = throughput(args_for(config, *common, "--no-warmup"))
    assert warm["graphs_captured"] == 0 and warm["warmup_s"] > 0 and "graphs_captured" not in cold
    for r in (warm, cold):
        assert r["prefix_query_tokens"] == 5 * 20 and r["prefix_hit_tokens"] == 0 and r["preemptions"] == 0
    assert (warm["mixed_steps"], warm["decode_steps"]) == (cold["mixed_steps"], cold["decode_steps"])


def test_cli_smoke_run_and_refusals(config, capsys):
    assert main(["bench", "throughput", "--device", "cpu", "--backend", "reference", "--config", config,
                 "--requests", "2", "--input-len", "4", "--output-len", "3"]) == 0
    out = capsys.readouterr().out
    assert "CPU (smoke run, not a benchmark)" in out and "| decode_steps |" in out
    # latency measures a GPU: it has no --device; throughput refuses --device cpu with --backend cuda
    assert main(["bench", "latency", "--device", "cpu", "--backend", "reference", "--config", config]) == 2
    assert "kiln bench latency: error: unrecognized arguments: --device cpu" in capsys.readouterr().err
    assert main(["bench", "throughput", "--device", "cpu", "--backend", "cuda", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln bench throughput: --device cpu runs the reference backend") and err.count("\n") == 1


def test_sweep_table_puts_published_figures_beside_ours():
    from kiln.runtime import peers
    from kiln.runtime.bench import PEERS

    table = peers.load(PEERS)
    assert set(table.figures) == set(peers.SWEEP_SHAPES)
    assert [str(p) for p in table.peers("H200", (1000, 1000))] == ["17,744 (fp8)"]
    assert peers.card_of("NVIDIA H200") == "H200" and peers.card_of("NVIDIA L4") is None
    text = peers.sweep_table(table, "H100", {(1000, 1000): 7055.0, (2048, 128): 1000.0}, "bf16")
    assert "| 1000/1000 | 7,055 | 7,055 (fp16), 15,220 (fp8) | 1.00x vs fp16, 0.46x vs fp8 |" in text
    assert "| 2048/128 | 1,000 | 1,904 (fp16), 3,450 (fp8) |" in text and "perf-overview" in text


def test_sweep_of_some_shapes_labels_its_precision(config, capsys):
    """--sweep SHAPES runs those shapes only (a CPU smoke run divides them by 64) and labels Kiln's
    column with what it ran: quantized weights and an fp8 KV cache are named, as the peers' FP8 is."""
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--requests", "2",
                 "--max-batch", "2", "--quantization", "int8-wo", "--kv-cache-dtype", "fp8",
                 "--sweep", "128/128,2048/128"]) == 0
    out = capsys.readouterr().out
    assert out.count("output tok/s") == 2 and "128/128:" in out and "2048/128:" in out and "1000/1000:" not in out
    assert "| Kiln (fp32, weights int8-wo, KV fp8) |" in out
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--sweep", "100/100"]) == 2
    err = capsys.readouterr().err
    assert "--sweep 100/100: '100/100' is not a shape of the published table" in err and err.count("\n") == 1


def test_sweep_and_paired_runs_build_the_model_once(config, capsys, monkeypatch):
    """A sweep builds one model for all its shapes (each shape its own engine: a KV cache sized for it, every
    request of it finished), and a paired run (--lora-adapters: without, then with) one for both halves; each
    run's counts are what a run on a fresh model gives."""
    from kiln.runtime import bench
    built = []
    real = bench.random_model

    def counting(*a, **k):  # the real builder, counted
        built.append(a[1]["hidden_size"])
        return real(*a, **k)

    monkeypatch.setattr(bench, "random_model", counting)
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--requests", "3",
                 "--max-batch", "2", "--sweep", "128/128,2048/128,1000/1000"]) == 0
    assert built == [TINY["hidden_size"]]
    assert capsys.readouterr().out.count("output tok/s") == 3
    fresh = throughput(args_for(config, "--requests", "3", "--max-batch", "2", "--input-len", "16",
                                "--output-len", "5"))
    # every prompt token in a step with prompt tokens (no prefix hits: random prompts), the step times in order
    assert fresh["prompt_tokens_per_mixed_step"] * fresh["mixed_steps"] == 3 * 16
    assert 0 < fresh["mixed_step_ms_p50"] <= fresh["mixed_step_ms_p90"] <= fresh["mixed_step_ms_max"]
    m = bench.bench_model(args_for(config))
    for _ in range(2):  # the same model twice: the same counts as a fresh one's
        again = throughput(args_for(config, "--requests", "3", "--max-batch", "2", "--input-len", "16",
                                    "--output-len", "5"), m)
        assert {k: again[k] for k in ("decode_steps", "mixed_steps", "preemptions", "requests")} \
            == {k: fresh[k] for k in ("decode_steps", "mixed_steps", "preemptions", "requests")}
    built.clear()
    r = throughput(args_for(config, "--requests", "2", "--max-batch", "2", "--input-len", "8", "--output-len", "4",
                            "--lora-adapters", "2", "--lora-rank", "4"))
    assert len(built) == 1 and r["lora_adapters"] == 2 and r["base_output_tok_s"] > 0


def test_static_fp8_activation_scale_runs_and_is_named(config, capsys):
    """--fp8-act-scale S (with --quantization fp8): the run's activations quantized with that static scale (the
    path a calibrated checkpoint takes), named in the header; without fp8 weights it is refused by name."""
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--requests", "2",
                 "--input-len", "4", "--output-len", "3", "--quantization", "fp8", "--fp8-act-scale", "0.05"]) == 0
    assert "weights fp8, activations static (scale 0.05)" in capsys.readouterr().out
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--fp8-act-scale", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--fp8-act-scale quantizes the activations of fp8 weights" in err and err.count("\n") == 1
    assert main(["bench", "throughput", "--device", "cpu", "--config", config, "--quantization", "fp8",
                 "--fp8-act-scale", "0"]) == 2
    assert "--fp8-act-scale" in capsys.readouterr().err
