"""`LLM`: the offline Python API, in the conventions of vLLM and TensorRT-LLM's LLM API.

    from kiln import LLM, SamplingParams
    llm = LLM("path/to/hf_folder_or.gguf")
    for out in llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model import load_model
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path | None = None, *, spec: str | Path | None = None, dtype: str = "fp32",
                 device: str = "cpu", backend: str = "reference", **engine_options):
        if model is None:
            from kiln.runtime.gguf_file import default_model_path
            model = default_model_path()
        loaded = load_model(model, spec=spec, dtype=dtype, device=device, backend=backend)
        if loaded.checkpoint is not None:
            self.tokenizer = Tokenizer.from_checkpoint(loaded.checkpoint)
        else:  # an engine directory: its tokenizer files were copied in by `kiln build`
            self.tokenizer = Tokenizer.from_folder(model)
        self.engine = LLMEngine(loaded, self.tokenizer, EngineConfig(**engine_options))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (all in flight together); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp or SamplingParams()) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
                   for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it grows; `.outputs[i].delta` is the new text of each."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)
