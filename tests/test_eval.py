"""`kiln eval perplexity` (runtime/eval.py): perplexity against transformers on the same random
weights, computed here independently (the windows restated from the documented rule, the loss
from transformers' logits); KL divergence of a model from itself and from a perturbed copy; the
texts; the command line and its errors. fp32, CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kiln.cli import main
from kiln.runtime.checkpoint import open_checkpoint
from kiln.runtime.eval import EvalError, calibration_text, default_text, evaluate, kl_divergence, windows
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.model import load_model
from kiln.runtime.tokenizer import Tokenizer

from tests.configs import FAMILY_CONFIGS

transformers = pytest.importorskip("transformers")


def hf_checkpoint(folder, **over):
    """A random-init transformers Llama saved with save_pretrained; returns (folder, the model)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(FAMILY_CONFIGS["llama"], **over))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    return folder, model


def hf_ppl(model, tokens: list[int], context: int, stride: int, bos: int | None = None) -> tuple[float, int]:
    """exp(mean NLL) by transformers, windows restated from the rule: a window of `context` tokens
    every `stride`, its last min(stride, context // 2) tokens scored, its first token BOS if given."""
    scored = min(stride, context // 2)
    nll = []
    with torch.no_grad():
        for start in range(0, len(tokens) - context + 1, stride):
            ids = list(tokens[start:start + context])
            if bos is not None:
                ids[0] = bos
            logits = model(torch.tensor([ids])).logits[0].double()
            targets = torch.tensor(ids[context - scored:])
            nll.append(torch.nn.functional.cross_entropy(logits[context - scored - 1:context - 1], targets,
                                                         reduction="none"))
    nll = torch.cat(nll)
    return math.exp(float(nll.mean())), nll.numel()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.parametrize("stride, bos", [(None, None), (8, 1), (12, None)])
def test_perplexity_equals_transformers(tiny, stride, bos):
    folder, hf = tiny
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    result = evaluate(load_model(folder), tokens, context=32, stride=stride, bos=bos)
    want, n = hf_ppl(hf, tokens, 32, stride or 32, bos)
    assert result.tokens == n
    assert result.ppl == pytest.approx(want, rel=1e-5)
    assert result.summary()["ppl"] == pytest.approx(want, rel=1e-5)


def test_windows_follow_the_rule():
    # non-overlapping: the second half of each full window; the tail is dropped
    assert [(w.start, w.scored) for w in windows(100, 32)] == [(0, 16), (32, 16), (64, 16)]
    # sliding with stride <= context / 2: every target after the first window's context, once
    for stride in (1, 5, 16):
        targets = [w.start + 32 - w.scored + i for w in windows(100, 32, stride) for i in range(w.scored)]
        assert targets == list(range(32 - stride, targets[-1] + 1))
    assert windows(31, 32) == []
    with pytest.raises(ValueError):
        windows(100, 32, 33)


def test_kl_divergence_of_a_model_from_itself_and_from_a_perturbed_copy(tiny):
    folder, _ = tiny
    tokens = torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(2)).tolist()
    model, same = load_model(folder), load_model(folder)
    r = evaluate(model, tokens, context=32, stride=16, base=same)
    assert r.kl.shape == r.nll.shape and abs(r.kl).max() <= 1e-6
    assert r.same_top.all() and (r.base_nll == r.nll).all()
    assert r.summary()["kl_mean"] <= 1e-6 and r.summary()["same_top"] == 1.0
    g = torch.Generator().manual_seed(3)
    for w in same.model.weights.values():  # the base stays; the copy moves
        w.add_(torch.randn(w.shape, generator=g) * 0.01)
    r = evaluate(same, tokens, context=32, stride=16, base=model)
    assert (r.kl > 0).all() and r.summary()["kl_mean"] > 1e-4
    assert r.summary()["ppl_base"] == pytest.approx(evaluate(model, tokens, 32, 16).ppl, rel=1e-6)


def test_kl_divergence_is_torchs():
    g = torch.Generator().manual_seed(4)
    base, other = torch.randn(5, 50, generator=g) * 3, torch.randn(5, 50, generator=g) * 3
    want = torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(base, -1), log_target=True,
                                      reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(base, other), want, atol=1e-6)


def test_evaluation_and_calibration_texts_never_overlap(tmp_path):
    text = default_text()
    assert len(text) > 100_000 and text == default_text()
    try:
        calib = calibration_text()
    except EvalError as e:
        pytest.skip(str(e))
    assert len(calib) > 10_000

    def paragraphs(t):
        return {" ".join(p.split()) for p in t.split("\n\n") if len(p.strip()) >= 40}

    assert not paragraphs(text) & paragraphs(calib)
    with pytest.raises(EvalError, match=str(tmp_path / "absent")):
        calibration_text(tmp_path / "absent")


# -- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A tiny Llama of the default model's vocabulary, with its tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("cli")
    folder, hf = hf_checkpoint(root / "ckpt", vocab_size=49152)
    tok = Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))
    tok.save(folder)
    text = root / "text.txt"
    text.write_text(default_text()[:2000])
    return str(folder), hf, tok, text


def test_cli_json_equals_transformers(capsys, with_tokenizer):
    folder, hf, tok, text = with_tokenizer
    assert main(["eval", "perplexity", folder, "--text", str(text), "--context", "32", "--stride", "16",
                 "--max-tokens", "200", "--kl-divergence", "--json"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert "perplexity" in err  # the table and the progress bar
    tokens = tok.encode(text.read_text(), add_special_tokens=False)[:200]
    want, n = hf_ppl(hf, tokens, 32, 16)
    assert (s["tokens"], s["tokens_used"], s["context"], s["stride"]) == (n, 200, 32, 16)
    assert s["ppl"] == pytest.approx(want, rel=1e-5)
    assert s["kl_mean"] == 0 and s["same_top"] == 1.0 and s["quantization"] == "none"
    assert main(["eval", "perplexity", folder, "--text", str(text), "--context", "32", "--max-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out  # without --json: the table on stdout


def one_line_error(capsys, argv: list[str], *words: str) -> None:
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in out + err, err
    for w in words:
        assert w in err, (w, err)


def test_cli_errors(capsys, with_tokenizer, tmp_path):
    folder, _, _, text = with_tokenizer
    base = ["eval", "perplexity", folder]
    one_line_error(capsys, [*base, "--text", str(tmp_path / "missing.txt")], "--text", "missing.txt", "no such file")
    one_line_error(capsys, [*base, "--text", str(tmp_path)], "--text", "directory")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    one_line_error(capsys, [*base, "--text", str(tmp_path / "latin1.txt")], "latin1.txt", "UTF-8")
    one_line_error(capsys, [*base, "--text", str(text), "--context", "1"], "--context", "got 1")
    one_line_error(capsys, [*base, "--text", str(text), "--context", "x"], "--context", "'x'")
    one_line_error(capsys, [*base, "--text", str(text), "--context", "129"], "--context 129", "(128 tokens)")
    one_line_error(capsys, [*base, "--text", str(text), "--context", "32", "--stride", "33"], "--stride 33")
    one_line_error(capsys, [*base, "--text", str(text), "--context", "32", "--max-tokens", "31"], "--max-tokens 31")
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    one_line_error(capsys, [*base, "--text", str(short), "--context", "32"], str(short), "fewer than one window")
    one_line_error(capsys, [*base, "--quantization", "fp9"], "--quantization", "'fp9'", "none")
    one_line_error(capsys, [*base, "--device", "gpu"], "--device")
    one_line_error(capsys, ["eval", "perplexity", str(tmp_path / "nothing.gguf")], "nothing.gguf")
    one_line_error(capsys, ["eval"], "MODE")
