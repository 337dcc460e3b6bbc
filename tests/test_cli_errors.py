"""Every subcommand's user errors: exit status 2, one line of message that names the option,
file or model, and no traceback.

Argument values are refused while the arguments are parsed, so most cases run `kiln.cli.main`
in-process without loading anything. The errors that need a checkpoint (its context length,
tokenizer, vocabulary, the device) use a checkpoint whose weights cannot load (its only tensor
is not one the spec needs): had the check come after the weights, the message would name the
missing tensor instead. Each ranged option is also driven at its boundaries: the last value
refused and the first one accepted.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest
import torch
from kiln.cli import build_parser, main
from kiln.runtime.checkpoint import open_checkpoint, save_safetensors_checkpoint
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.tokenizer import Tokenizer

VOCAB = 49152  # the default model's tokenizer, reused by the small checkpoints below
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=64,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=2)


def tiny_llama_tensors(cfg: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """unloadable: config + tokenizer, weights that cannot load; no_tokenizer: the same without
    a tokenizer; tiny: a loadable tiny Llama with the tokenizer; engine: `kiln build` of it."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {}
    for name, tensors, tok in (("unloadable", {"not_a_weight": torch.zeros(2)}, True),
                               ("no_tokenizer", {"not_a_weight": torch.zeros(2)}, False),
                               ("tiny", tiny_llama_tensors(), True)):
        made[name] = save_safetensors_checkpoint(root / name, tensors, TINY)
        if tok:
            tokenizer.save(made[name])
    made["engine"] = root / "engine"
    assert main(["build", "--checkpoint", str(made["tiny"]), "--backend", "cuda", "--dtype", "fp32",
                 "--out", str(made["engine"])]) == 0
    made["engine_no_tokenizer"] = root / "engine_no_tokenizer"
    save_safetensors_checkpoint(root / "tiny_no_tok", tiny_llama_tensors(), TINY)
    assert main(["build", "--checkpoint", str(root / "tiny_no_tok"), "--backend", "cuda", "--dtype", "fp32",
                 "--out", str(made["engine_no_tokenizer"])]) == 0
    return {k: str(v) for k, v in made.items()}


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert "Traceback" not in err + out
    for w in words:
        assert w in err, (w, err)
    return err


# -- refused while parsing: nothing is loaded -------------------------------------------------

PARSE_ERRORS = [
    # generate: the sampling options (SamplingParams' rules), the prompt, the device
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens", "got 0"),
    (["generate", "--prompt", "x", "--max-tokens", "-3"], "--max-tokens", "got -3"),
    (["generate", "--prompt", "x", "--max-tokens", "ten"], "--max-tokens", "'ten'"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature", "got -1"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "x", "--temperature", "inf"], "--temperature"),
    (["generate", "--prompt", "x", "--top-p", "2"], "--top-p", "(0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "x", "--top-k", "-2"], "--top-k"),
    (["generate", "--prompt", "x", "--seed", "1.5"], "--seed"),
    (["generate", "--prompt", "x", "--seed", str(2**63)], "--seed"),
    (["generate", "--prompt", ""], "--prompt", "empty"),
    (["generate", "--prompt", "   "], "--prompt", "empty"),
    (["generate", "--chat", ""], "--chat", "empty"),
    (["generate"], "--prompt", "--chat"),
    (["generate", "--prompt", "x", "--chat", "y"], "--chat", "not allowed"),
    (["generate", "--prompt", "x", "--device", "gpu"], "--device", "'gpu'"),
    (["generate", "--prompt", "x", "--device", "cuda:x"], "--device"),
    (["generate", "--prompt", "x", "--dtype", "fp8"], "--dtype"),
    (["generate", "--prompt", "x", "--backend", "tensorrt"], "--backend"),
    (["generate", "--prompt", "x", "--bogus"], "kiln generate", "--bogus"),
    # run
    (["run", "e", "--tokens", "a,b"], "--tokens", "'a,b'"),
    (["run", "e", "--tokens", "1,-1"], "--tokens"),
    (["run", "e", "--tokens", ""], "--tokens"),
    (["run", "e", "--prompt", ""], "--prompt"),
    (["run", "e", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["run", "e", "--prompt", "x", "--device", "gpu"], "--device"),
    (["run", "e"], "--prompt", "--tokens"),
    # build
    (["build", "--out", ""], "--out"),
    (["build"], "--out"),
    (["build", "--out", "e", "--max-batch", "0"], "--max-batch"),
    (["build", "--out", "e", "--max-tokens", "0"], "--max-tokens"),
    (["build", "--out", "e", "--max-seq-len", "-1"], "--max-seq-len"),
    (["build", "--out", "e", "--page-size", "0"], "--page-size"),
    (["build", "--out", "e", "--backend", "reference"], "--backend"),
    # serve
    (["serve", "--port", "70000"], "--port", "[1, 65535]"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--model", "foo"], "--model", "NAME=PATH"),
    (["serve", "--model", "=x"], "--model"),
    (["serve", "--host", ""], "--host"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--max-waiting", "-1"], "--max-waiting"),
    (["serve", "--max-model-len", "0"], "--max-model-len"),
    (["serve", "--state-snapshots", "-1"], "--state-snapshots", ">= 0"),
    (["serve", "--page-size", "0"], "--page-size"),
    (["serve", "--num-pages", "0"], "--num-pages"),
    (["serve", "--kv-memory-fraction", "0"], "--kv-memory-fraction"),
    (["serve", "--kv-memory-fraction", "1.01"], "--kv-memory-fraction"),
    (["serve", "--max-tokens-per-step", "0"], "--max-tokens-per-step"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes"),
    (["serve", "--request-timeout", "0"], "--request-timeout"),
    (["serve", "--log-level", "loud"], "--log-level"),
    (["serve", "--device", "gpu"], "--device"),
    # bench: each mode has its own options and defaults
    (["bench"], "MODE"),
    (["bench", "sideways"], "sideways"),
    (["bench", "latency"], "--config"),
    (["bench", "latency", "--config", "c", "--device", "cpu"], "kiln bench latency", "--device"),
    (["bench", "latency", "--config", "c", "--prompt", "0"], "--prompt"),
    (["bench", "latency", "--config", "c", "--steps", "0"], "--steps"),
    (["bench", "throughput", "--config", "c", "--requests", "0"], "--requests"),
    (["bench", "throughput", "--config", "c", "--input-len", "0"], "--input-len"),
    (["bench", "throughput", "--config", "c", "--output-len", "0"], "--output-len"),
    (["bench", "throughput", "--config", "c", "--max-batch", "0"], "--max-batch"),
    (["bench", "throughput", "--config", "c", "--max-tokens-per-step", "0"], "--max-tokens-per-step"),
    (["bench", "throughput", "--config", "c", "--kv-fraction", "0"], "--kv-fraction"),
    (["bench", "throughput", "--config", "c", "--hf-batch", "-1"], "--hf-batch"),
    (["bench", "throughput", "--config", "c", "--device", "tpu"], "--device"),
    (["bench", "serve", "--rates", "0"], "--rates"),
    (["bench", "serve", "--rates", "1,x"], "--rates"),
    (["bench", "serve", "--rates", "nan"], "--rates"),
    (["bench", "serve", "--num-requests", "0"], "--num-requests"),
    (["bench", "serve", "--input-len", "0"], "--input-len"),
    (["bench", "serve", "--output-len", "0"], "--output-len"),
    (["bench", "serve", "--timeout", "0"], "--timeout"),
    (["bench", "startup", "--runs", "0"], "--runs"),
    (["bench", "startup", "--chat", ""], "--chat"),
    # check, show, verify
    (["verify"], "--config"),
    (["verify", "--config", "c", "--steps", "0"], "--steps"),
    (["verify", "--config", "c", "--tol", "0"], "--tol"),
    (["verify", "--config", "c", "--tol", "-1"], "--tol"),
    (["show", "llama", "--ir", "--page-size", "0"], "--page-size"),
    (["show", "llama", "--ir", "--dtype", "int4"], "--dtype"),
    (["check", "--bogus"], "kiln check", "--bogus"),
    ([], "COMMAND"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("argv, words", [(a, w) for a, *w in PARSE_ERRORS],
                         ids=[" ".join(a) or "(nothing)" for a, *_ in PARSE_ERRORS])
def test_refused_while_parsing(capsys, argv, words):
    err = one_line_error(capsys, argv, *words)
    assert "error:" in err  # argparse's refusal, before any command ran


# -- boundaries: every ranged option, on each side of each of its bounds ----------------------

# The least each command needs besides the option under test.
REQUIRED = {("generate",): ["--prompt", "x"], ("run",): ["e", "--prompt", "x"], ("build",): ["--out", "e"],
            ("verify",): ["--config", "c"], ("show",): ["llama", "--ir"],
            ("bench", "latency"): ["--config", "c"], ("bench", "throughput"): ["--config", "c"],
            ("bench", "prefix"): ["--config", "c"], ("quantize",): ["ckpt", "--scheme", "fp8", "--out", "o"]}


def _ranged_options():
    """(command path, option, bounds) of every option whose type states a range (int_arg,
    float_arg and SamplingParams' arg_type), found by walking the parser."""
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + (name,))
            elif hasattr(action.type, "bounds"):
                yield path, action.option_strings[-1], action.type.bounds
    return list(walk(build_parser(), ()))


def _sides(lo, hi, lo_open):
    """(refused, accepted) values at each bound, as the command line spells them."""
    def num(v):
        return repr(v) if isinstance(v, float) else str(v)
    refused, accepted = [], []
    if isinstance(lo, int) and not lo_open:
        refused.append(str(lo - 1)), accepted.append(str(lo))
    else:
        refused.append(num(lo) if lo_open else num(lo - 1e-9)), accepted.append(num(lo + 1e-9) if lo_open else num(lo))
    if hi is not None:
        accepted.append(num(hi))
        refused.append(str(hi + 1) if isinstance(hi, int) and not isinstance(lo, float) and hi > 2 else num(hi + 1e-6))
    return refused, accepted


RANGED = _ranged_options()


def test_show_needs_what_to_show(capsys):
    """`kiln show SPEC` alone: one of --kernels, --ir, --tp, --pp (checked by the command, since
    --tp and --pp also combine)."""
    one_line_error(capsys, ["show", "llama"], "--kernels", "--ir", "--tp", "--pp")


def test_every_ranged_option_is_found():
    options = {(path, opt) for path, opt, _ in RANGED}
    assert (("generate",), "--max-tokens") in options and (("serve",), "--port") in options
    assert (("bench", "serve"), "--num-requests") in options and len(options) >= 40


@pytest.mark.parametrize("path, option, bounds", RANGED, ids=[f"{' '.join(p)} {o}" for p, o, _ in RANGED])
def test_each_side_of_each_bound(capsys, path, option, bounds):
    refused, accepted = _sides(*bounds)
    base = [*path, *REQUIRED.get(path, [])]
    if path == ("show",) and option == "--tp":  # --tp is itself one of show's --kernels | --ir | --tp
        base.remove("--ir")
    for value in accepted:
        args = build_parser().parse_args([*base, option, value])
        assert getattr(args, option.lstrip("-").replace("-", "_")) == (float(value) if "." in value or "e" in value
                                                                       else int(value))
    for value in refused:
        one_line_error(capsys, [*base, option, value], option, value)


OTHER_ACCEPTED = [
    (["generate", "--prompt", "x", "--device", "cuda:1"], "device", "cuda:1"),
    (["run", "e", "--tokens", "0"], "tokens", [0]),
    (["serve", "--model", "a=b=c"], "model", ["a=b=c"]),
    (["bench", "serve", "--rates", "inf"], "rates", [float("inf")]),
    (["bench", "serve", "--rates", "0.5,2"], "rates", [0.5, 2.0]),
]


@pytest.mark.parametrize("argv, dest, value", OTHER_ACCEPTED)
def test_other_accepted_values(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_each_bench_mode_has_its_own_defaults():
    parse = build_parser().parse_args
    serve = parse(["bench", "serve"])
    assert (serve.input_len, serve.output_len, serve.num_requests) == (64, 32, 100)
    from kiln.runtime.bench import THROUGHPUT_DEFAULTS, BenchError, check_args

    for device in ("cpu", "cuda"):  # throughput's workload depends on the device: filled in after parsing
        tp = parse(["bench", "throughput", "--config", "c", "--device", device, "--requests", "3"])
        try:
            check_args(tp)
        except BenchError:  # cuda on a machine without one: refused after the defaults are filled in
            pass
        want = dict(THROUGHPUT_DEFAULTS[device], requests=3)
        assert {k: getattr(tp, k) for k in want} == want
    assert THROUGHPUT_DEFAULTS["cuda"]["input_len"] == THROUGHPUT_DEFAULTS["cuda"]["output_len"] == 1000


# -- refused after reading a checkpoint's metadata, before its weights --------------------------


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_checks_that_need_the_checkpoint(capsys, folders):
    bad = folders["unloadable"]
    # The weights of `bad` cannot load: this is the error every case below would otherwise hit.
    one_line_error(capsys, ["generate", bad, "--prompt", "x", "--max-tokens", "8"], "missing tensor")
    one_line_error(capsys, ["generate", bad, "--prompt", "x", "--max-tokens", "99999"],
                   "--max-tokens 99999", "context length", "(64 tokens)")
    one_line_error(capsys, ["generate", bad, "--chat", "x" * 200], "--max-tokens 64", "context length")
    one_line_error(capsys, ["generate", bad, "--prompt", "x", "--system", "s"], "--system", "--chat")
    one_line_error(capsys, ["generate", folders["no_tokenizer"], "--prompt", "x"], "no tokenizer.json",
                   folders["no_tokenizer"])
    one_line_error(capsys, ["generate", bad, "--prompt", "x", "--backend", "cuda"], "--backend cuda", "--device cuda")
    one_line_error(capsys, ["generate", "/no/such/checkpoint", "--prompt", "x"], "/no/such/checkpoint")
    one_line_error(capsys, ["serve", bad, "--max-model-len", "65"], "--max-model-len 65", "(64)")
    one_line_error(capsys, ["serve", "--model", f"a={bad}", "--model", f"a={bad}"], "'a'", "twice")
    one_line_error(capsys, ["serve", bad, "--num-pages", "1", "--page-size", "16"], "--num-pages 1")
    with busy_port() as s:
        port = str(s.getsockname()[1])
        one_line_error(capsys, ["serve", bad, "--port", port], f"127.0.0.1:{port}", "in use")
    one_line_error(capsys, ["serve", bad, "--host", "192.0.2.1", "--port", "8000"], "192.0.2.1:8000")  # not ours
    one_line_error(capsys, ["build", "--checkpoint", bad, "--backend", "cuda", "--out", folders["tiny"]],
                   "already exists")
    # an engine directory's cache is the run dtype: no --kv-cache-dtype (until 2026-12-06 accepted and ignored)
    one_line_error(capsys, ["build", "--checkpoint", bad, "--backend", "cuda", "--out", folders["tiny"] + "-kv",
                            "--kv-cache-dtype", "fp8"], "--kv-cache-dtype")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_on_a_machine_without_one(capsys, folders):
    for argv in (["generate", folders["unloadable"], "--prompt", "x", "--device", "cuda"],
                 ["serve", folders["unloadable"], "--device", "cuda"],
                 ["run", folders["engine"], "--prompt", "x", "--device", "cuda:0"]):
        one_line_error(capsys, argv, "--device cuda", "use --device cpu")


def test_engine_directories(capsys, folders):
    engine = folders["engine"]
    one_line_error(capsys, ["run", engine, "--tokens", str(VOCAB)], "--tokens", f"< {VOCAB}", str(VOCAB))
    one_line_error(capsys, ["run", engine, "--tokens", "99999"], "--tokens", "99999")
    one_line_error(capsys, ["run", engine, "--prompt", "x", "--max-tokens", "99"], "--max-tokens 99",
                   "context length")
    one_line_error(capsys, ["run", folders["engine_no_tokenizer"], "--prompt", "x"], "no tokenizer", "--tokens")
    one_line_error(capsys, ["run", folders["tiny"], "--prompt", "x"], "not an engine directory")
    one_line_error(capsys, ["generate", engine, "--prompt", "x", "--dtype", "bf16"], "--dtype bf16", "fp32")
    one_line_error(capsys, ["generate", engine, "--prompt", "x", "--spec", "gpt2"], "--spec")
    # and what works: token ids in, token ids out, on the CPU without --device
    assert main(["run", engine, "--tokens", "1,2,3", "--max-tokens", "3"]) == 0
    ids = capsys.readouterr().out.strip().split(",")
    assert len(ids) == 3 and all(0 <= int(i) < VOCAB for i in ids)


def test_files_and_servers_that_are_not_there(capsys, tmp_path):
    missing = str(tmp_path / "missing.json")
    one_line_error(capsys, ["bench", "throughput", "--config", missing, "--device", "cpu"], "config file not found")
    one_line_error(capsys, ["bench", "throughput", "--config", missing, "--device", "cpu", "--backend", "cuda"],
                   "--device cpu")
    one_line_error(capsys, ["serve", "--random-weights", missing], "--random-weights", "not found")
    one_line_error(capsys, ["check", "llama", "--config", missing], "config file not found")
    one_line_error(capsys, ["bench", "serve", "--url", "http://10.0.0.1:8000"], "--url", "10.0.0.1")
    with busy_port() as s:  # a port that was just free and is closed again: nothing listens there
        port = s.getsockname()[1]
    one_line_error(capsys, ["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--timeout", "5"],
                   "cannot reach", str(port))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    one_line_error(capsys, ["verify", "--config", str(bad_json)], "invalid JSON", "bad.json:1:2")
    one_line_error(capsys, ["bench", "startup", str(tmp_path / "nothing.gguf"), "--runs", "1"], "nothing.gguf")


def test_a_real_process_exits_2_without_a_traceback():
    """The same through the installed entry point: stderr is one line, the exit status 2."""
    for argv in (["generate", "--prompt", "x", "--max-tokens", "0"], ["serve", "--port", "70000"]):
        r = subprocess.run([sys.executable, "-m", "kiln.cli", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_bad_engine_options_of_the_python_api():
    from kiln import LLM

    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        LLM(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        LLM(kv_memory_fraction=2.0)
    with pytest.raises(ValueError, match=r"max_model_len 100000 exceeds the context length of "
                                         r"SmolLM2-135M-Instruct \(8192\)"):
        LLM(max_model_len=100_000)


def test_engine_directories_work_where_checkpoints_do(capsys, folders):
    """The counterpart of the errors above: an engine directory through generate and serve."""
    from kiln.runtime import server_cli

    assert main(["generate", folders["engine"], "--prompt", "Hello", "--max-tokens", "2"]) == 0
    assert "engine cuda, fp32, cpu" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", folders["engine"], "--max-model-len", "32"])
    app, summary = server_cli._load(args, server_cli._plan(args))
    assert "engine: " + folders["engine"] in summary and "max_model_len 32" in summary


def test_an_lm_head_tied_to_the_embedding_is_not_quantized(capsys, folders):
    """--quantization SCHEME+lm-head quantizes the LM head too; a tied one (the tiny model's, like SmolLM2's) is one
    tensor with the embedding table, which is gathered, not multiplied: refused, naming the head."""
    one_line_error(capsys, ["generate", str(folders["tiny"]), "--prompt", "x", "--max-tokens", "1",
                            "--quantization", "fp8+lm-head"], "--quantization fp8+lm-head", "'lm_head'", "tied")
