"""Out-of-domain control probes scored as the paper scores them (arXiv 2601.03858, `utils/utils.py` and
`utils/data.py` of sislab-unitn/Knowledge-Dynamics-LLMs).

Each item is one chat turn: a system message naming the answer form, the question as the user message,
greedy decoding of 25 new tokens. Parsing and exact match follow the paper's code:

- math (264 items): system "Be brief. Do not add any explanation. Only provide the final result without the
  equation."; the prediction is the first run of digits in the output (the whole output when it has none),
  correct when it equals the reference string.
- SocialIQA (100 items): `Context: {context} Q: {question}` then `A. ...`, `B. ...`, `C. ...` on their own
  lines; system "Be brief. Do not add any explanation. Only answer with 'A', 'B', or 'C'."; the first A/B/C
  letter anywhere in the output maps to 1/2/3, compared with the reference '1'/'2'/'3'.
- MMLU (when the user supplies the test split as a file; it is not shipped): `Q: {question}` then `A. ...`
  to `D. ...`; system "... Only answer with 'A', 'B', 'C', or 'D'."; the first A-D letter maps to 0-3.

A model without a chat template gets the plain text `{system}\\n{question}\\n`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import MathProbe, ReasoningProbe, read_json, read_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ControlSet = Literal["math", "SocialIQA", "MMLU"]

SYSTEM: dict[str, str] = {
    "math": "Be brief. Do not add any explanation. Only provide the final result without the equation.",
    "MMLU": "Be brief. Do not add any explanation. Only answer with 'A', 'B', 'C', or 'D'.",
    "SocialIQA": "Be brief. Do not add any explanation. Only answer with 'A', 'B', or 'C'.",
}
"""The paper's system message per control set."""

MAX_NEW_TOKENS = 25
"""The paper generates 25 new tokens for every probe, control probes included."""


@dataclass(frozen=True)
class MMLUItem:
    """One MMLU test question (`cais/mmlu` fields): 4 choices, `answer` the 0-based index of the right one."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str


def chat_prompt(tokenizer: PreTrainedTokenizerBase, system: str, user: str) -> str:
    """A system + user chat turn with the generation prompt (plain `system\\nuser\\n` without a chat template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(  # type: ignore[return-value]  # tokenize=False: a str
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return f"{system}\n{user}\n"


def _lettered(options: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))


def math_question(item: MathProbe) -> str:
    return item.question


def siqa_question(item: ReasoningProbe) -> str:
    """`Context: ... Q: ...` then the lettered options, as the paper formats SocialIQA."""
    return f"Context: {item.context} Q: {item.question}\n{_lettered(item.options)}"


def mmlu_question(item: MMLUItem) -> str:
    return f"Q: {item.question}\n{_lettered(item.choices)}"


def math_prediction(output: str) -> str:
    """The paper's math prediction: the first run of digits, else the whole output."""
    m = re.search(r"[0-9]+", output)
    return m.group() if m else output


def letter_prediction(output: str, letters: str, offset: int) -> str:
    """The paper's multiple-choice prediction: the first of `letters` anywhere in the output as its index +
    offset (SocialIQA: 'A' -> '1'; MMLU: 'A' -> '0'), else the whole output."""
    m = re.search(f"[{letters}]", output)
    return str(ord(m.group()) - ord("A") + offset) if m else output


def math_hit(output: str, item: MathProbe) -> bool:
    return math_prediction(output) == str(item.answer)


def siqa_hit(output: str, item: ReasoningProbe) -> bool:
    return letter_prediction(output, "ABC", 1) == str(item.answer)


def mmlu_hit(output: str, item: MMLUItem) -> bool:
    return letter_prediction(output, "ABCD", 0) == str(item.answer)


def load_mmlu(path: str | Path) -> list[MMLUItem]:
    """MMLU items from a JSON list or JSONL file of `{question, choices, answer, subject}` records (the fields of
    the `cais/mmlu` test split; `answer` an index 0-3 or a letter A-D). Not shipped: the user supplies it."""
    path = Path(path)
    if not path.is_file():
        raise CircuitdynError(f"{path}: no such MMLU file")
    records = [rec for _, rec in read_jsonl(path)] if path.suffix == ".jsonl" else read_json(path)
    if not isinstance(records, list) or not records:
        raise CircuitdynError(f"{path}: expected a non-empty list of MMLU records")
    items = []
    for i, rec in enumerate(records):
        try:
            answer = rec["answer"]
            answer = "ABCD".index(answer) if isinstance(answer, str) and answer in "ABCD" else int(answer)
            choices = tuple(str(c) for c in rec["choices"])
            if not 0 <= answer < len(choices):
                raise ValueError(f"answer {answer} outside the {len(choices)} choices")
            items.append(MMLUItem(str(i), str(rec["question"]), choices, answer, str(rec.get("subject", ""))))
        except (KeyError, TypeError, ValueError) as err:
            raise CircuitdynError(
                f"{path}: record {i} is malformed ({err!r}); fields question, choices, answer"
            ) from None
    return items
