"""`kiln serve --tp / --pp` and `kiln bench throughput --tp / --pp` (CPU, gloo).

A served split model answers the OpenAI client with the single-process server's greedy tokens
(that server runs in this process, tests/server_harness.py); SIGTERM, or Ctrl-C to the whole
process group, stops the server and leaves no process of it behind; a worker killed while serving
fails the next request with a 503 that names it, and the server exits with status 1. Every
combination the split model cannot run is refused by name before anything loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.server_harness import KilnServe
from tests.test_parallel import tiny_checkpoint  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent
PROMPT_IDS = [5, 17, 3, 99, 42, 7]
CHAT = [{"role": "user", "content": "Name the capital of France."}]


def _ask(url: str) -> tuple[str, str]:
    """A completion of token ids and a streamed chat, greedy, 8 tokens each."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    text = c.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=8, temperature=0).choices[0].text
    chunks = c.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True)
    chat = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chat


@pytest.fixture(scope="module")
def single_process(tiny_checkpoint):  # noqa: F811
    """What the single-process server answers (served in this process)."""
    from kiln.runtime.async_engine import AsyncLLMEngine
    from kiln.runtime.engine import EngineConfig, LLMEngine
    from kiln.runtime.model import load_model
    from kiln.runtime.server import ServedModel
    from kiln.runtime.tokenizer import Tokenizer

    from tests.server_harness import running

    tok = Tokenizer.from_folder(Path(tiny_checkpoint))
    engine = LLMEngine(load_model(tiny_checkpoint), tok, EngineConfig(max_model_len=128))
    with running([ServedModel("ckpt", AsyncLLMEngine(engine), tok, 128)]) as url:
        return _ask(url)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


class Served(KilnServe):
    """`kiln serve ARGS` in a subprocess (its own session, so that a test can Ctrl-C its process group)."""

    def __init__(self, *args: str):
        super().__init__(*args, new_session=True)

    def __enter__(self) -> Served:
        self.wait_healthy()
        self.workers = [p for p in _children(self.proc.pid)
                        if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        self.family = _children(self.proc.pid)  # the workers and multiprocessing's resource tracker
        return self

    def stop(self, how: str = "term") -> tuple[int, str]:
        """SIGTERM to the server, or SIGINT to its process group (Ctrl-C in a terminal); its exit
        status and output."""
        if how == "term":
            self.proc.terminate()
        else:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait()

    def wait(self) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.__exit__()
            raise AssertionError("kiln serve did not stop") from None
        return self.proc.returncode, out

    def left_behind(self) -> list[int]:
        deadline = time.monotonic() + 30  # a worker reaped by init after the server: moments
        while (left := [p for p in self.family if not _gone(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.mark.parametrize("split, stop", [(("--tp", "2"), "term"), (("--pp", "2"), "int")], ids=["tp2", "pp2"])
def test_served_split_model_matches_single_process(tiny_checkpoint, single_process, split, stop):  # noqa: F811
    with Served(tiny_checkpoint, *split) as s:
        assert len(s.workers) == 1
        got = _ask(s.url)
        rc, out = s.stop(stop)
    assert got == single_process and all(got)
    # stopped cleanly, then ended as the signal says (uvicorn's way): killed by SIGTERM; Ctrl-C: 130
    assert rc == (-signal.SIGTERM if stop == "term" else 130) and "Traceback" not in out, out
    assert "rank" not in out, out  # no worker complained: rank 0 told it to stop
    assert s.left_behind() == []


def test_dead_worker_fails_requests_and_stops_the_server(tiny_checkpoint):  # noqa: F811
    with Served(tiny_checkpoint, "--tp", "2") as s:
        os.kill(s.workers[0], signal.SIGKILL)
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=120)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="ckpt", prompt=PROMPT_IDS, max_tokens=4, temperature=0)
        rc, out = s.wait()
    assert e.value.status_code == 503
    message = e.value.body["message"]
    assert "RankLost" in message and f"kiln-tp-rank1 (pid {s.workers[0]}) was killed by SIGKILL" in message
    assert rc == 1 and "the engine of the split model stopped" in out and "Traceback" not in out, out
    assert s.left_behind() == []


def _kiln(capsys, *args: str) -> tuple[int, str]:
    from kiln.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--tp", "0"], "argument --tp: must be an integer in [1, 1024], got 0"),
    (["--pp", "-1"], "argument --pp"),
    (["--tp", "2", "--device", "cuda"], "--tp 2: tensor parallelism on --device cuda needs --backend cuda"),
    (["--tp", "2", "--backend", "cuda", "--device", "cuda:1"], "--tp 2 --backend cuda: rank r runs on cuda:r"),
    (["--pp", "2", "--backend", "cuda"], "--pp 2: pipeline parallelism runs on the reference backend"),
    (["--tp", "2", "--quantization", "fp8"], "--tp 2 with --quantization fp8"),
    (["--pp", "2", "--kv-cache-dtype", "fp8"], "--pp 2 with --kv-cache-dtype fp8"),
    (["--tp", "2", "--lora", "sql=adapters/sql"], "--tp 2 with --lora"),
    (["--tp", "2", "--pp", "2", "--speculative", "ngram"], "--tp 2 --pp 2 with --speculative"),
    (["--tp", "2", "--model", "other=elsewhere"], "--tp 2: tensor parallelism serves one model"),
])
def test_serve_refusals(capsys, args, says):
    # the checkpoint does not exist: each is refused before anything is opened or loaded
    rc, err = _kiln(capsys, "serve", "no-such-checkpoint", *args)
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_serve_refuses_random_weights(capsys, tmp_path):
    rc, err = _kiln(capsys, "serve", "--random-weights", str(tmp_path / "tiny.json"), "--tp", "2")
    assert rc == 2 and "--tp 2 with --random-weights" in err, err


@pytest.fixture
def tiny_config(tmp_path) -> str:
    from tests.configs import FAMILY_CONFIGS

    path = tmp_path / "llama.json"
    path.write_text(json.dumps(FAMILY_CONFIGS["llama"]))
    return str(path)


@pytest.mark.parametrize("args, says", [
    (["--tp", "2"], "--tp 2: the split model needs 2 CUDA GPUs of this machine"),
    (["--pp", "2", "--device", "cpu", "--lora-adapters", "2"], "--pp 2 with --lora-adapters 2"),
    (["--tp", "2", "--device", "cpu", "--quantization", "fp8"], "--tp 2 with --quantization fp8"),
])
def test_bench_throughput_refusals(capsys, tiny_config, args, says):
    if not args[2:] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    rc, err = _kiln(capsys, "bench", "throughput", "--config", tiny_config, *args)
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_bench_throughput_split_smoke(capsys, tiny_config):
    from kiln.cli import main

    assert main(["bench", "throughput", "--config", tiny_config, "--device", "cpu", "--tp", "2", "--pp", "2",
                 "--requests", "2", "--input-len", "8", "--output-len", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):out.index("\n}") + 2])
    assert (result["tp"], result["pp"], result["requests"]) == (2, 2, 2) and result["output_tok_s"] > 0
    assert not torch.distributed.is_initialized()  # the workers were told to stop, the group left
