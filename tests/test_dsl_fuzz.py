"""Property test: mutated valid specs either check or raise SpecError — nothing else escapes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln.dsl import SpecError, check, parse_spec
from kiln.dsl.loader import MODELS_DIR

SPECS = [(MODELS_DIR / "gpt2.kiln").read_text(), (MODELS_DIR / "llama.kiln").read_text()]
TOKENS = ["{", "}", "(", ")", "[", "]", ",", "=", "<-", ":", "?", "|", "none", "true", "0", "1",
          "-1", "1e999", "2 ** 99", "99999999999", '"x"', '"a.{layer}"', "{layer}", "x", "layer",
          "-", "*", "/", "//", ".T", "[0:1]", "if", "else", "and", "not", "return", "block", "param",
          "weights", "forward", "spec", "__x", "class", "\n", "#", "\"", "'", "\\", "@", "é"]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SPECS))
    # Fewer layers keep each check fast; the mutations below still reach every construct.
    text = text.replace("= 32 <- num_hidden_layers", "= 2 <- num_hidden_layers").replace(
        "= 12 <- n_layer", "= 2 <- n_layer")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "swap_lines", "dup_line"]))
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        if kind == "delete":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + " " + draw(st.sampled_from(TOKENS)) + " " + text[i:]
        elif kind == "replace":
            j = draw(st.integers(i, min(len(text), i + 6)))
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[j:]
        else:
            lines = text.splitlines()
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "swap_lines":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines[a])
            text = "\n".join(lines)
    return text


@settings(max_examples=int(__import__("os").environ.get("KILN_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_only_raise_spec_error(text):
    try:
        check(parse_spec(text, "mutant.kiln"))
    except SpecError as e:
        rendered = e.render()
        assert rendered.startswith("mutant.kiln:") or rendered.startswith("error:"), rendered
