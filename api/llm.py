"""`LLM`: the offline Python API, in the conventions of vLLM and TensorRT-LLM's LLM API.

    from kiln import LLM, SamplingParams
    llm = LLM("path/to/hf_folder_or.gguf_or_engine_dir")      # LLM(): the embedded SmolLM2
    for out in llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=16)):
        print(out.outputs[0].text)

On the CPU the KV cache holds `max_num_seqs` sequences of `max_model_len` tokens (defaults 8
and the model's context length, at most 2,048); on a GPU it takes `kv_memory_fraction` of the
free memory. Engine options are EngineConfig's fields (prefix caching is on unless
`enable_prefix_caching=False`).

Constrained decoding: `SamplingParams(guided=GuidedDecodingParams(json=schema))` (or regex=,
choice=, grammar=, json_object=True; a dict of those fields works too): see runtime/guided.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from kiln.runtime.engine import DEFAULT_MAX_NUM_SEQS, EngineConfig, LLMEngine
from kiln.runtime.generate import ModelSource
from kiln.runtime.guided import GuidedDecodingParams
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams

Prompt = str | list[int]
__all__ = ["LLM", "SamplingParams", "GuidedDecodingParams"]


class LLM:
    def __init__(self, model: str | Path | None = None, *, spec: str | Path | None = None, dtype: str | None = None,
                 device: str = "cpu", backend: str | None = None, quantization: str | None = None,
                 kv_cache_dtype: str | None = None, lora_adapters: dict[str, str | Path] | None = None,
                 draft: str | Path | None = None, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                 pipeline_parallel_size: int = 1, **engine_options):
        """`model`: a Hugging Face folder, a .gguf file, an engine directory, or None / "default" (the
        embedded model). `dtype` (default fp32, or an engine directory's own), `backend` (default
        reference), `quantization` (an on-load scheme, kiln.dsl.quant.SCHEMES), `lora_adapters`
        ({name: PEFT adapter folder}; a request runs one with SamplingParams(lora=name)), engine options:
        EngineConfig's fields (max_num_seqs, max_model_len, ..., speculative="ngram" | "draft",
        num_speculative_tokens). `draft`: the draft model's checkpoint for speculative decoding (it
        must share the target's tokenizer; loaded with the same dtype, device and backend).
        `tensor_parallel_size` > 1: the model split over that many processes of this machine (the
        reference backend on the CPU today; `expert_parallel`: MoE experts whole per rank); they exit
        with `shutdown()` or at the end of the program. `pipeline_parallel_size` > 1: its layers in that
        many stages, each on its own process(es) (x `tensor_parallel_size`)."""
        if draft is not None and engine_options.get("speculative") is None:
            engine_options["speculative"] = "draft"
        config = EngineConfig(**engine_options)  # bad options fail before the model loads
        source = ModelSource.open(model, spec=None if spec is None else str(spec), dtype=dtype, device=device,
                                  backend=backend, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                                  tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel,
                                  pipeline_parallel_size=pipeline_parallel_size)
        if tensor_parallel_size > 1 and (draft is not None or lora_adapters):
            raise ValueError("tensor_parallel_size > 1 does not combine with a draft model or LoRA adapters yet")
        if pipeline_parallel_size > 1 and (draft is not None or lora_adapters):
            raise ValueError("pipeline_parallel_size > 1 does not combine with a draft model or LoRA adapters yet")
        if config.max_model_len is not None and source.context_len is not None \
                and config.max_model_len > source.context_len:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the context length of {source.name} "
                             f"({source.context_len})")
        if config.max_num_seqs is None and source.max_num_seqs is not None:
            config.max_num_seqs = min(source.max_num_seqs, DEFAULT_MAX_NUM_SEQS["cuda"])
        self.tokenizer = source.tokenizer
        draft_model = None
        if config.speculative == "draft":
            from kiln.runtime.generate import open_draft

            draft_model = open_draft(draft, source, dtype=dtype, device=device, backend=backend).load()
        self.engine = LLMEngine(source.load(), self.tokenizer, config, context_len=source.context_len,
                                draft=draft_model)
        for name, path in (lora_adapters or {}).items():  # PEFT folders; a request picks one by
            self.load_lora(name, path)                     # SamplingParams(lora=NAME)

    def shutdown(self) -> None:
        """Stop the other ranks' processes of a tensor-parallel model (nothing otherwise)."""
        if hasattr(self.engine.model, "procs"):
            self.engine.model.shutdown()

    def load_lora(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) as `name`;
        kiln.runtime.lora.LoraError when it does not fit the model."""
        self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (all in flight together); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([(p, None) for p in prompts], sampling_params)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the model's chat template;
        each output's `prompt` is the rendered template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self._run([(self.tokenizer.encode(t, add_special_tokens=False), t) for t in texts], sampling_params)

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

    def _run(self, prompts: list[tuple[Prompt, str | None]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp or SamplingParams(), prompt_text=text)
               for (p, text), sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]
