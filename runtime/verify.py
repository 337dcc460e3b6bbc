"""`kiln verify`: a spec against Hugging Face transformers on a randomly initialised model.

Builds the transformers model of a config.json with random weights, saves it as a
safetensors checkpoint, loads that through Kiln, and compares logits over a prefill and
`steps` greedy decode steps (both sides fed the same tokens, HF's greedy choices).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import SingleSequence, load_model


@dataclass
class StepError:
    step: int  # 0 = prefill
    max_abs: float
    max_rel: float  # max |kiln - hf| / max |hf| over the step's logits
    same_token: bool


@dataclass
class VerifyReport:
    spec: str
    architecture: str
    steps: list[StepError] = field(default_factory=list)

    @property
    def max_rel(self) -> float:
        return max(s.max_rel for s in self.steps)

    @property
    def max_abs(self) -> float:
        return max(s.max_abs for s in self.steps)

    @property
    def tokens_agree(self) -> int:
        return sum(s.same_token for s in self.steps)

    def ok(self, tol: float) -> bool:
        return self.max_rel <= tol and self.tokens_agree == len(self.steps)


class VerifyError(Exception):
    """transformers refuses the config: nothing to compare against (the message names the file)."""


def hf_random_model(config: dict[str, Any], seed: int = 0):
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():  # random init leaves some tensors (norms, biases) at constants: perturb all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def verify(config: dict[str, Any], spec: str | Path | None = None, steps: int = 32,
           prompt_len: int = 11, seed: int = 0, workdir: str | Path | None = None,
           config_file: str = "config.json") -> VerifyReport:
    try:  # a config transformers itself rejects is the user's to fix, not a Kiln failure
        model = hf_random_model(config, seed)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises while building it is about the config
        reason = " ".join(str(e.__cause__ or e).split())
        raise VerifyError(f"{config_file}: transformers cannot build a model from this config: "
                          f"{reason[:400]}{' ...' if len(reason) > 400 else ''}") from None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded = load_model(tmp, spec=spec, dtype="fp32")
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    report = VerifyReport(str(spec or loaded.plan.spec.file), model.config.architectures[0]
                          if model.config.architectures else type(model).__name__)
    seq = SingleSequence(loaded, prompt_len + steps + 1)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        ref = out.logits[0]  # [L, V]
        mine = seq.step(prompt[0].tolist(), all_logits=True)
        report.steps.append(_compare(0, mine, ref))
        for i in range(1, steps + 1):
            token = int(ref[-1].argmax())
            # transformers 5 names it `cache` (Mamba's forward takes no past_key_values)
            out = model(torch.tensor([[token]]), cache=past, use_cache=True)
            past = out.past_key_values
            ref = out.logits[0]
            mine = seq.step([token], all_logits=True)
            report.steps.append(_compare(i, mine, ref))
    return report


def _compare(step: int, mine: torch.Tensor, ref: torch.Tensor) -> StepError:
    diff = (mine.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-30)
    same = bool((mine[-1].argmax() == ref[-1].argmax()).item())
    return StepError(step, float(diff.max()), float(diff.max() / scale), same)
