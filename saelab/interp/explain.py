"""The explainer: one short explanation of a latent from its marked activating contexts.

Paulo et al. 2024 (arXiv:2410.13928 §2.2): the explainer LM reads a latent's top-activating contexts and a
few contexts sampled across its activation quantiles, with the firing tokens marked <<like this>>, and
answers with a one-line explanation. The prompt (`prompts.yaml`, entry `explainer`) asks for a final line
"Explanation: ..."; `parse_explanation` takes that line, or the first line of text when it is missing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from saelab.interp.contexts import Example
from saelab.interp.prompts import Chat, render


def numbered(texts: Sequence[str]) -> str:
    """ "1. first\\n2. second..." as the prompts list their snippets."""
    return "\n".join(f"{i}. {t.strip()}" for i, t in enumerate(texts, 1))


def explainer_prompt(examples: Sequence[Example], mark_frac: float = 0.0, prompts: str | None = None) -> Chat:
    """The explainer chat for a latent's activating `examples` (firing tokens marked, see `Example.flags`)."""
    return render("explainer", prompts, examples=numbered([e.text(e.flags(mark_frac)) for e in examples]))


_LEAD = re.compile(r"^\W*(explanation|answer)\s*[:\-]\s*", re.IGNORECASE)


def parse_explanation(answer: str, max_chars: int = 200) -> str:
    """The explanation in an explainer's answer: the text after its last "Explanation:", else its first
    non-empty line; markers, quotes and surrounding space removed, cut to `max_chars`. "" when there is none."""
    lines = [ln.strip() for ln in answer.replace("\r", "").split("\n") if ln.strip()]
    tagged = [ln for ln in lines if re.search(r"explanation\s*:", ln, re.IGNORECASE)]
    if tagged:
        line = re.split(r"explanation\s*:", tagged[-1], flags=re.IGNORECASE)[-1]
        if not line.strip():  # "Explanation:" alone on its line: the text is on the next one
            after = lines.index(tagged[-1]) + 1
            line = lines[after] if after < len(lines) else ""
    else:
        line = lines[0] if lines else ""
    line = _LEAD.sub("", line).replace("<<", "").replace(">>", "")
    line = line.strip().strip("\"'`*").strip()
    return line[:max_chars].rstrip()
