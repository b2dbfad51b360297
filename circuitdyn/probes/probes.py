"""Probe sets (facts to recall) and the attribution inputs built from them.

Probes come from the paper's seed files (`validation_probes.json`, `math_probes.json`,
`reasoning_probes.json`, shipped in `circuitdyn/data/`) or from our own JSONL format, one JSON
object per line (`circuitdyn/schemas/probes.schema.json`):
`{"id", "entity", "question", "answer"}` plus optional `prompt` (a cloze used verbatim),
`question_type`, `group`, `ne_label`, `ne_frequency`, `chunk` (the sentence stating the fact).

`build_fact_prompts` turns probes into `FactPrompt`s: clean prompt tokens (chat template with the
paper's instruction, or a plain Q/A form), answer tokens, and a same-length corrupted prompt in which
the entity mention is swapped for another entity of the set with the same token length; where no
such entity exists the corruption is Gaussian noise on the entity's token embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Answer the following question using as few words as possible."
"""The instruction the paper's probes put before each question."""

LEARNED_THRESHOLD = 0.6
"""An entity is learned when the mean ROUGE-1 recall over its probes reaches this (the paper's value)."""

PROBES_SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "probes.schema.json"

# Seed question categories -> short question_type names (stable: they are part of probe ids).
QUESTION_TYPES = {
    "Factual Question": "factual",
    "Time-Sensitive Question": "time-sensitive",
    "Temporal Understanding Question": "temporal",
    "Entity Linking Question": "entity-linking",
}
REPHRASED = "Rephrased Questions"

Template = Literal["auto", "chat", "plain"]


@dataclass(frozen=True)
class FactPrompt:
    """One fact as the attribution engine consumes it: token ids only, already templated.

    The engine runs `clean_tokens + answer_tokens` (teacher-forced) and the corrupted twin
    `corrupted_tokens + answer_tokens`; both prompts have the same length so positions align.
    For noise corruption `corrupted_tokens == clean_tokens` and the engine adds Gaussian noise
    (3x the embedding std, seeded) to the input embeddings at `noise_positions`.
    """

    fact_id: str
    clean_tokens: tuple[int, ...]
    corrupted_tokens: tuple[int, ...]
    answer_tokens: tuple[int, ...]
    corruption: str
    noise_positions: tuple[int, ...] = ()
    contrast_token: int | None = None


@dataclass(frozen=True)
class Probe:
    """One factual question about one entity, with its gold answer and provenance."""

    id: str
    entity: str
    question: str
    answer: str
    prompt: str | None = None
    question_type: str | None = None
    group: str | None = None
    ne_label: str | None = None
    ne_frequency: str | None = None
    chunk: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The probe as one JSONL record (None fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class MathProbe:
    """An arithmetic out-of-domain control probe (scored by exact match of the number)."""

    id: str
    question: str
    answer: str
    type: str


@dataclass(frozen=True)
class ReasoningProbe:
    """A SocialIQA multiple-choice control probe; `answer` is the 1-based index of the right option."""

    id: str
    context: str
    question: str
    options: tuple[str, str, str]
    answer: int
    type: str


# --------------------------------------------------------------------------- files


DATA_DIR = Path(__file__).parents[1] / "data"
"""The probe sets shipped inside the package (see `circuitdyn/data/README.md` for sources and licences)."""


def seed_data_dir() -> Path:
    """The folder holding the paper's probe files: `$CIRCUITDYN_SEED_DATA` when set, else the packaged copy."""
    env = os.environ.get("CIRCUITDYN_SEED_DATA")
    path = Path(env) if env else DATA_DIR
    if not (path / "validation_probes.json").is_file():
        where = "CIRCUITDYN_SEED_DATA" if env else "the package (a broken install?)"
        raise CircuitdynError(
            f"{path}: seed data not found (no validation_probes.json); set CIRCUITDYN_SEED_DATA to the folder "
            f"holding the paper's probe files (looked at {where})"
        )
    return path


def read_json(path: Path) -> Any:
    """A JSON file's content; a missing file or bad JSON is a CircuitdynError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CircuitdynError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CircuitdynError(f"{path}: invalid JSON ({err})") from None


def slug(text: str) -> str:
    """A lowercase ASCII-ish identifier for an entity name (`Herbie Hancock` -> `herbie-hancock`)."""
    s = re.sub(r"[^\w]+", "-", text.strip().lower(), flags=re.UNICODE).strip("-")
    return s or "x"


def _check_probe(p: Probe, where: str) -> None:
    for name in ("id", "entity", "question", "answer"):
        value = getattr(p, name)
        if not isinstance(value, str) or not value.strip():
            raise CircuitdynError(f"{where}: probe {p.id!r} has an empty or missing '{name}' ({value!r})")


def _seed_probes(data: Any, path: Path, rephrased: bool) -> list[Probe]:
    if not isinstance(data, dict):
        raise CircuitdynError(f"{path}: expected an object mapping entity -> question types")
    probes: list[Probe] = []
    for entity, block in data.items():
        if not isinstance(block, dict):
            raise CircuitdynError(f"{path}: entity {entity!r} is not an object")
        label, freq = block.get("ne_label"), block.get("ne_frequency")
        chunks: dict[str, str] = {}
        for category, qtype in QUESTION_TYPES.items():
            for i, item in enumerate(block.get(category) or []):
                question = str(item.get("question", "")).strip()
                chunks[question] = item.get("chunk")
                probes.append(
                    Probe(
                        id=f"{slug(entity)}/{qtype}/{i}",
                        entity=entity,
                        question=question,
                        answer=str(item.get("answer", "")).strip(),
                        question_type=qtype,
                        group="original",
                        ne_label=label,
                        ne_frequency=freq,
                        chunk=item.get("chunk"),
                    )
                )
        if rephrased:
            for i, item in enumerate(block.get(REPHRASED) or []):
                original = str(item.get("original_question", "")).strip()
                probes.append(
                    Probe(
                        id=f"{slug(entity)}/rephrased/{i}",
                        entity=entity,
                        question=str(item.get("question", "")).strip(),
                        answer=str(item.get("answer", "")).strip(),
                        question_type=QUESTION_TYPES.get(item.get("question_type"), item.get("question_type")),
                        group="rephrased",
                        ne_label=label,
                        ne_frequency=freq,
                        chunk=chunks.get(original),
                    )
                )
    return probes


@lru_cache(maxsize=1)
def _probe_schema() -> dict[str, Any]:
    return json.loads(PROBES_SCHEMA_PATH.read_text())


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a UTF-8 JSONL file; errors name file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CircuitdynError(f"{path}: not UTF-8 text ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise CircuitdynError(f"{path}:{n}: invalid JSON ({err})") from None


def _jsonl_probes(path: Path) -> list[Probe]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_probe_schema())
    probes: list[Probe] = []
    for n, rec in read_jsonl(path):
        errors = sorted(validator.iter_errors(rec), key=lambda e: list(e.path))
        if errors:
            field = ".".join(str(p) for p in errors[0].absolute_path) or "(record)"
            raise CircuitdynError(f"{path}:{n}: field '{field}' is invalid: {errors[0].message}")
        probes.append(Probe(**{k: rec.get(k) for k in Probe.__dataclass_fields__}))
    return probes


def load_probes(path: str | Path | None = None, *, rephrased: bool = True) -> list[Probe]:
    """Read a probe set: the seed `validation_probes.json` (default) or one of our JSONL files.

    Seed probe ids are stable: `<entity-slug>/<question_type>/<index>` and
    `<entity-slug>/rephrased/<index>`. `rephrased=False` leaves out the seed's rephrasings.
    Every probe must have a non-empty id, entity, question and answer, and ids must be unique.
    """
    path = Path(path) if path is not None else seed_data_dir() / "validation_probes.json"
    if not path.is_file():
        raise CircuitdynError(f"{path}: no such probe file")
    if path.suffix == ".jsonl":
        probes = _jsonl_probes(path)
    else:
        probes = _seed_probes(read_json(path), path, rephrased)
    if not probes:
        raise CircuitdynError(f"{path}: holds no probes")
    seen: set[str] = set()
    for p in probes:
        _check_probe(p, str(path))
        if p.id in seen:
            raise CircuitdynError(f"{path}: duplicate probe id {p.id!r}")
        seen.add(p.id)
    return probes


def write_probes_jsonl(probes: Iterable[Probe], path: str | Path) -> Path:
    """Write probes in our JSONL format (atomically)."""
    from circuitdyn.io import write_text_atomic

    return write_text_atomic(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in probes))


def load_math_probes(path: str | Path | None = None) -> list[MathProbe]:
    """The seed's arithmetic control probes (`{id: {question, answer, type}}`), in file order."""
    path = Path(path) if path is not None else seed_data_dir() / "math_probes.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise CircuitdynError(f"{path}: expected an object mapping id -> probe")
    out = []
    for key, item in data.items():
        if "question" not in item or "answer" not in item:
            raise CircuitdynError(f"{path}: math probe {key!r} lacks 'question' or 'answer'")
        out.append(MathProbe(str(key), str(item["question"]), str(item["answer"]).strip(), str(item.get("type", ""))))
    return out


def load_reasoning_probes(path: str | Path | None = None) -> list[ReasoningProbe]:
    """The seed's SocialIQA control probes (context, question, answerA/B/C, answer '1'/'2'/'3')."""
    path = Path(path) if path is not None else seed_data_dir() / "reasoning_probes.json"
    data = read_json(path)
    if not isinstance(data, list):
        raise CircuitdynError(f"{path}: expected a list of SocialIQA items")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(
                ReasoningProbe(
                    id=str(i),
                    context=item["context"],
                    question=item["question"],
                    options=(item["answerA"], item["answerB"], item["answerC"]),
                    answer=int(item["answer"]),
                    type=str(item.get("type", "")),
                )
            )
        except (KeyError, ValueError, TypeError) as err:
            raise CircuitdynError(f"{path}: item {i} is malformed ({err!r})") from None
    return out


def sample(items: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """A deterministic sample of n items (all when n is None or >= len), kept in the original order."""
    if n is None or n >= len(items):
        return list(items)
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return [items[i] for i in sorted(ranked[:n])]


# --------------------------------------------------------------------------- entities


def entities(probes: Iterable[Probe]) -> list[str]:
    """Entity names in first-seen order."""
    return list(dict.fromkeys(p.entity for p in probes))


def select_entities(
    probes: Sequence[Probe],
    names: Sequence[str] | None = None,
    *,
    n: int | None = None,
    ne_frequency: str | None = None,
    ne_label: str | None = None,
) -> list[Probe]:
    """The probes of chosen entities: by name, or the first n per filter, balanced across
    (ne_label, ne_frequency) cells in file order so a small slice mixes people/places and low/high exposure.
    An unknown name is an error.
    """
    known = entities(probes)
    if names is not None:
        missing = [x for x in names if x not in known]
        if missing:
            raise CircuitdynError(f"unknown entity {missing[0]!r} (not in the probe set; e.g. {known[:3]})")
        chosen = list(dict.fromkeys(names))
    else:
        meta = {p.entity: (p.ne_label, p.ne_frequency) for p in probes}
        pool = [
            e
            for e in known
            if (ne_label is None or meta[e][0] == ne_label) and (ne_frequency is None or meta[e][1] == ne_frequency)
        ]
        if not pool:
            raise CircuitdynError(f"no entity with ne_label={ne_label!r} ne_frequency={ne_frequency!r}")
        cells: dict[tuple, list[str]] = {}
        for e in pool:
            cells.setdefault(meta[e], []).append(e)
        chosen, i = [], 0
        while len(chosen) < (len(pool) if n is None else min(n, len(pool))):
            for cell in cells.values():
                if i < len(cell) and len(chosen) < (n or len(pool)):
                    chosen.append(cell[i])
            i += 1
    keep = set(chosen)
    order = {e: i for i, e in enumerate(chosen)}
    return sorted((p for p in probes if p.entity in keep), key=lambda p: order[p.entity])


def entity_documents(probes: Iterable[Probe]) -> dict[str, str]:
    """The CPT corpus the paper's probes come from: each entity's distinct `chunk` sentences, joined."""
    docs: dict[str, list[str]] = {}
    for p in probes:
        if p.chunk and p.chunk.strip():
            sentences = docs.setdefault(p.entity, [])
            s = p.chunk.strip()
            if s not in sentences:
                sentences.append(s)
    return {e: " ".join(s if s.endswith((".", "!", "?")) else s + "." for s in ss) for e, ss in docs.items()}


def mention_forms(entity: str) -> list[str]:
    """How a question may name the entity: the full name, then its capitalised words (last first)."""
    parts = [w for w in entity.split() if len(w) >= 3 and w[0].isupper()]
    return list(dict.fromkeys([entity, *reversed(parts)]))


def find_mention(text: str, entity: str) -> tuple[str, list[tuple[int, int]]] | None:
    """The entity's mentions in text: the first form found (full name before single words) and the
    character spans of every non-overlapping occurrence of any form, in text order."""
    spans: list[tuple[int, int]] = []
    primary = None
    for form in mention_forms(entity):
        for m in re.finditer(rf"(?<!\w){re.escape(form)}(?!\w)", text):
            if all(m.end() <= s or m.start() >= e for s, e in spans):
                spans.append(m.span())
                primary = primary or form
    return (primary, sorted(spans)) if primary else None


# --------------------------------------------------------------------------- prompts


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(
    probe: Probe,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template = "auto",
    instruction: str = INSTRUCTION,
) -> str:
    """The text the model sees before its answer.

    A probe's own `prompt` (cloze) is used verbatim. Otherwise "chat" applies the tokenizer's chat
    template to one user turn "{instruction}\\n{question}" with the generation prompt (as the paper's
    probes of instruction-tuned models do); "plain" writes "{instruction}\\nQuestion: {question}\\nAnswer:";
    "auto" is chat when the tokenizer has a template, else plain.
    """
    q = probe.question
    if probe.prompt:
        return probe.prompt
    if template == "auto":
        template = "chat" if _has_chat_template(tokenizer) else "plain"
    if template == "chat":
        if not _has_chat_template(tokenizer):
            raise CircuitdynError("template='chat' but the tokenizer has no chat template; use template='plain'")
        content = f"{instruction}\n{q}" if instruction else q
        return tokenizer.apply_chat_template(  # type: ignore[return-value]  # tokenize=False: a str
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template == "plain":
        head = f"{instruction}\n" if instruction else ""
        return f"{head}Question: {q}\nAnswer:"
    raise CircuitdynError(f"unknown template {template!r} (use 'auto', 'chat' or 'plain')")


def answer_text(prompt: str, answer: str) -> str:
    """The gold answer as it continues the prompt: with a leading space after a non-space character."""
    return answer if (not prompt or prompt[-1].isspace()) else " " + answer


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, templated: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets. Chat text already holds its special tokens; plain text gets the
    tokenizer's usual ones (e.g. BOS)."""
    if not getattr(tokenizer, "is_fast", False):
        raise CircuitdynError(f"{type(tokenizer).__name__}: a fast tokenizer is needed (character offsets)")
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _positions(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]


def _swap_candidates(fact_id: str, entity: str, form: str, pool: dict[str, str | None]) -> list[tuple[str, str]]:
    """(replacement string, its entity) from other entities, ordered deterministically: an entity of the same
    label first, then the same kind of mention (full name vs. one word; a surname before a first name), then
    a hash of (fact id, candidate)."""
    full = form == entity
    label = pool.get(entity)
    ranked: list[tuple[tuple, str, str]] = []
    for other, other_label in pool.items():
        if other == entity:
            continue
        words = other.split()
        for cand in mention_forms(other):
            if cand in entity or entity in cand:
                continue
            same = 0 if (label is None or other_label == label) else 1
            kind = 0 if (cand == other) == full else 1
            surname = 0 if cand in (other, words[-1]) else 1
            h = hashlib.sha256(f"{fact_id}|{cand}".encode()).hexdigest()
            ranked.append(((same, kind, surname, h), cand, other))
    return list(dict.fromkeys((c, o) for _, c, o in sorted(ranked)))


def _first_token(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> int | None:
    ids = tokenizer(answer_text(prompt, answer), add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


def _contrast_token(
    probe: Probe,
    prompt: str,
    gold: int,
    swapped_in: str | None,
    answers: dict[str, list[Probe]],
    tokenizer: PreTrainedTokenizerBase,
) -> int | None:
    """The corrupted prompt's answer as one token, for the `logit-diff` metric.

    With an entity swap: the answer of the swapped-in entity's probe of the same question type (the first
    such probe whose first answer token differs from the gold one), else any of its answers. With noise
    (no entity to swap in): the answer of another entity's probe of the same question type, chosen by a
    hash of the fact id. None when no answer of the pool starts with another token.
    """

    def ranked(ps: list[Probe]) -> list[Probe]:
        same = [q for q in ps if q.question_type == probe.question_type]
        return same + [q for q in ps if q.question_type != probe.question_type]

    if swapped_in is not None:
        candidates = ranked(answers.get(swapped_in, []))
    else:
        others = [q for e, ps in answers.items() if e != probe.entity for q in ps]
        others.sort(key=lambda q: hashlib.sha256(f"{probe.id}|{q.id}".encode()).hexdigest())
        candidates = ranked(others)
    for q in candidates:
        tok = _first_token(tokenizer, prompt, q.answer)
        if tok is not None and tok != gold:
            return tok
    return None


def build_fact_prompts(
    probes: Sequence[Probe],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template = "auto",
    instruction: str = INSTRUCTION,
    pool: Iterable[Probe | str] | None = None,
    variant: int | Mapping[str, int] = 0,
) -> list[FactPrompt]:
    """Token-level attribution inputs for each probe (order kept). Prefer `circuitdyn.probes.facts.load_facts`,
    the one road from a probe file to facts that every command takes.

    `variant` k > 0 takes the (k+1)-th valid swap partner instead of the first (or the last valid one when
    there are fewer): another corruption of the same kind, for measuring method noise; a mapping gives each
    probe id its own k (missing ids: 0).

    Clean prompt: `prompt_text(...)`. Answer: the gold answer's tokens as they continue the prompt.
    Corruption (recorded in `FactPrompt.corruption`):
    - `swap:<name>`: every mention of the entity replaced by another entity of `pool` (default: the
      entities of `probes`) whose text gives a prompt of the same token length that differs only at the
      mention's positions; the candidate is chosen deterministically (see `_swap_candidates`).
    - `noise`: no such entity; `noise_positions` are the mention's token positions (causal-tracing noise).
    - `noise-question`: the question does not name the entity; noise on all of the question's tokens.
    `contrast_token` is the corrupted prompt's answer (`_contrast_token`), used by the `logit-diff` metric.
    `corruption_counts(facts)` reports how many facts got each kind.
    """
    pool_map: dict[str, str | None] = {}
    answers: dict[str, list[Probe]] = {}
    for item in probes if pool is None else pool:
        if isinstance(item, Probe):
            pool_map.setdefault(item.entity, item.ne_label)
            answers.setdefault(item.entity, []).append(item)
        else:
            pool_map.setdefault(str(item), None)
    for p in probes:
        pool_map.setdefault(p.entity, p.ne_label)
        if p not in answers.get(p.entity, []):
            answers.setdefault(p.entity, []).append(p)
    facts = []
    for p in probes:
        _check_probe(p, "build_fact_prompts")
        text = prompt_text(p, tokenizer, template=template, instruction=instruction)
        templated = template != "plain" and not p.prompt and _has_chat_template(tokenizer)
        ids, offsets = _encode(tokenizer, text, templated)
        answer = tokenizer(answer_text(text, p.answer), add_special_tokens=False)["input_ids"]
        if not answer:
            raise CircuitdynError(f"probe {p.id!r}: the answer {p.answer!r} tokenizes to nothing")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in answer:
            raise CircuitdynError(
                f"probe {p.id!r}: the answer {p.answer!r} has text the tokenizer does not know "
                f"(it would be scored as {tokenizer.unk_token!r}); fix the answer or leave it out"
            )
        found = find_mention(text, p.entity)
        if found is None:
            qstart = text.rfind(p.question)
            spans = [(qstart, qstart + len(p.question))] if qstart >= 0 else [(0, len(text))]
            positions = _positions(offsets, spans)
            contrast = _contrast_token(p, text, answer[0], None, answers, tokenizer)
            facts.append(
                FactPrompt(p.id, tuple(ids), tuple(ids), tuple(answer), "noise-question", tuple(positions), contrast)
            )
            continue
        form, spans = found
        positions = _positions(offsets, spans)
        outside = [i for i in range(len(ids)) if i not in set(positions)]
        chosen = None
        found_valid = 0
        k = variant.get(p.id, 0) if isinstance(variant, Mapping) else variant
        for cand, other in _swap_candidates(p.id, p.entity, form, pool_map):
            pieces, last = [], 0
            for s, e in spans:
                pieces += [text[last:s], cand]
                last = e
            corrupted_text = "".join(pieces) + text[last:]
            cids, _ = _encode(tokenizer, corrupted_text, templated)
            if (
                len(cids) == len(ids)
                and all(cids[i] == ids[i] for i in outside)
                and any(cids[i] != ids[i] for i in positions)
            ):
                chosen = (cand, other, cids)
                found_valid += 1
                if found_valid > k:
                    break
        if chosen is None:
            contrast = _contrast_token(p, text, answer[0], None, answers, tokenizer)
            facts.append(FactPrompt(p.id, tuple(ids), tuple(ids), tuple(answer), "noise", tuple(positions), contrast))
        else:
            contrast = _contrast_token(p, text, answer[0], chosen[1], answers, tokenizer)
            facts.append(
                FactPrompt(
                    p.id, tuple(ids), tuple(chosen[2]), tuple(answer), f"swap:{chosen[0]}", contrast_token=contrast
                )
            )
    return facts


def corruption_counts(facts: Iterable[FactPrompt]) -> dict[str, int]:
    """How many facts got each corruption kind: `swap`, `noise`, `noise-question`."""
    return dict(Counter(f.corruption.split(":", 1)[0] for f in facts))


def corruption_summary(facts: Iterable[FactPrompt]) -> str:
    """`swap 10, noise 2`: how many facts of each corruption kind."""
    return ", ".join(f"{k} {v}" for k, v in sorted(corruption_counts(facts).items()))


# --------------------------------------------------------------------------- scoring


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)


def rouge1(prediction: str, reference: str) -> tuple[float, float]:
    """ROUGE-1 (recall, F1) of a generation against the gold answer (the paper's probe score)."""
    s = _rouge().score(reference, prediction)["rouge1"]
    return float(s.recall), float(s.fmeasure)
