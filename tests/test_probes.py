"""Probe readers, the attribution inputs built from probes, and generation scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import circuitdyn
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import (
    INSTRUCTION,
    Probe,
    answer_text,
    build_fact_prompts,
    corruption_counts,
    entities,
    entity_documents,
    find_mention,
    load_math_probes,
    load_probes,
    load_reasoning_probes,
    mention_forms,
    prompt_text,
    rouge1,
    sample,
    seed_data_dir,
    select_entities,
    write_probes_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seed_probes() -> list[Probe]:
    return load_probes()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_seed_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CIRCUITDYN_SEED_DATA", raising=False)
    packaged = Path(circuitdyn.__file__).parent / "data"
    assert seed_data_dir() == packaged and (packaged / "validation_probes.json").is_file()
    monkeypatch.setenv("CIRCUITDYN_SEED_DATA", str(tmp_path))
    with pytest.raises(CircuitdynError, match="CIRCUITDYN_SEED_DATA"):
        seed_data_dir()


def test_seed_probes_ids_and_fields(seed_probes: list[Probe]) -> None:
    assert len(seed_probes) == 1000
    assert len({p.id for p in seed_probes}) == 1000
    first = seed_probes[0]
    assert first.id == "herbie-hancock/factual/0"
    assert first.answer == "Trumpeter Donald Byrd's group"
    assert (first.ne_label, first.ne_frequency, first.group) == ("PERSON", "low", "original")
    assert len(entities(seed_probes)) == 100
    rephrased = [p for p in seed_probes if p.group == "rephrased"]
    assert rephrased and all(
        p.question_type in {"factual", "time-sensitive", "temporal", "entity-linking"} for p in rephrased
    )
    assert sum(p.chunk is not None for p in rephrased) > 0.9 * len(rephrased)
    assert load_probes() == seed_probes  # deterministic
    assert len(load_probes(rephrased=False)) == 1000 - len(rephrased)


def test_control_probes() -> None:
    math = load_math_probes()
    assert len(math) == 264 and math[0].question == "What is 5 + 1?" and math[0].answer == "6"
    siqa = load_reasoning_probes()
    assert len(siqa) == 100 and siqa[0].answer == 2 and len(siqa[0].options) == 3
    assert sample(math, 5) == sample(math, 5) and len(sample(math, 5)) == 5
    assert sample(math, None) == math


def test_jsonl_roundtrip(tmp_path: Path, seed_probes: list[Probe]) -> None:
    path = write_probes_jsonl(seed_probes[:20], tmp_path / "p.jsonl")
    assert load_probes(path) == seed_probes[:20]
    cloze = Probe("c1", "Herbie Hancock", "Who?", "Donald Byrd", prompt="Hancock started with")
    path = write_probes_jsonl([cloze], tmp_path / "c.jsonl")
    assert load_probes(path) == [cloze]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"id": "a", "entity": "X", "question": "Q?", "answer": ""}', "field 'answer' is invalid"),
        ('{"id": "a", "entity": "X", "question": "Q?", "answer": "   "}', "field 'answer' is invalid"),
        ('{"id": "a", "entity": "X", "question": "Q?"}', "'answer' is a required property"),
        ('{"id": "a", "entity": "", "question": "Q?", "answer": "A"}', "field 'entity' is invalid"),
        ('{"id": "a", "entity": "X", "question": "Q?", "answer": "A", "colour": 1}', "'colour' was unexpected"),
        ("{not json", "invalid JSON"),
    ],
)
def test_jsonl_bad_records(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "entity": "X", "question": "Q?", "answer": "A"}\n' + line + "\n")
    with pytest.raises(CircuitdynError, match=match) as err:
        load_probes(path)
    assert "bad.jsonl:2" in str(err.value)


def test_probe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CircuitdynError, match="no such probe file"):
        load_probes(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CircuitdynError, match="no probes"):
        load_probes(tmp_path / "empty.jsonl")
    rec = '{"id": "a", "entity": "X", "question": "Q?", "answer": "A"}\n'
    (tmp_path / "dup.jsonl").write_text(rec + rec)
    with pytest.raises(CircuitdynError, match="duplicate probe id 'a'"):
        load_probes(tmp_path / "dup.jsonl")


def test_spec_example_manifest_is_valid() -> None:
    """checkpoints_spec/ documents the layout; its example manifest passes the packaged schema."""
    from circuitdyn.runs.checkpoints import validate_manifest

    example = REPO / "checkpoints_spec" / "run.example.json"
    validate_manifest(json.loads(example.read_text()), example)


def test_select_entities(seed_probes: list[Probe]) -> None:
    sel = select_entities(seed_probes, n=8)
    names = entities(sel)
    assert len(names) == 8
    cells = {(p.ne_label, p.ne_frequency) for p in sel}
    assert len(cells) == 4  # balanced over PERSON/GPE x low/high
    assert select_entities(seed_probes, n=8) == sel
    assert entities(select_entities(seed_probes, ["Russia", "Patna"])) == ["Russia", "Patna"]
    assert {p.ne_label for p in select_entities(seed_probes, n=3, ne_label="GPE")} == {"GPE"}
    with pytest.raises(CircuitdynError, match="unknown entity 'Atlantis'"):
        select_entities(seed_probes, ["Russia", "Atlantis"])
    docs = entity_documents(sel)
    assert set(docs) == set(names)
    assert "Donald Byrd's group" in docs["Herbie Hancock"]


def test_find_mention() -> None:
    form, spans = find_mention("What is Hancock's role at the Herbie Hancock Institute?", "Herbie Hancock")
    assert form == "Herbie Hancock" and len(spans) == 2
    assert find_mention("What is the capital of Bihar?", "Patna") is None


def test_prompt_text_templates(tokenizer, seed_probes: list[Probe]) -> None:
    p = seed_probes[0]
    chat = prompt_text(p, tokenizer, template="chat")
    assert chat.startswith("<|im_start|>user " + INSTRUCTION) and chat.endswith("<|im_start|>assistant ")
    assert prompt_text(p, tokenizer) == chat  # auto -> chat when the tokenizer has a template
    assert prompt_text(p, tokenizer, template="plain").endswith(f"Question: {p.question}\nAnswer:")
    cloze = Probe("c", p.entity, p.question, p.answer, prompt="Hancock started his career with")
    assert prompt_text(cloze, tokenizer) == "Hancock started his career with"
    with pytest.raises(CircuitdynError, match="unknown template"):
        prompt_text(p, tokenizer, template="fancy")  # type: ignore[arg-type]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_build_fact_prompts(tokenizer, seed_probes: list[Probe], template: str) -> None:
    probes = select_entities(seed_probes, n=8)
    facts = build_fact_prompts(probes, tokenizer, template=template)
    assert [f.fact_id for f in facts] == [p.id for p in probes]
    counts = corruption_counts(facts)
    assert sum(counts.values()) == len(probes) and counts.get("swap", 0) > len(probes) // 2
    by_id = {p.id: p for p in probes}
    for f in facts:
        p = by_id[f.fact_id]
        assert len(f.clean_tokens) == len(f.corrupted_tokens)
        assert tokenizer.decode(f.answer_tokens).strip() == p.answer
        clean_text = tokenizer.decode(f.clean_tokens)
        assert p.question in clean_text
        if f.corruption.startswith("swap:"):
            other = f.corruption.split(":", 1)[1]
            assert other not in p.entity and f.noise_positions == ()
            assert other in tokenizer.decode(f.corrupted_tokens)
            # the prompts differ exactly at tokens of the entity's mention (its positions: the noise fallback's)
            mention = set(build_fact_prompts([p], tokenizer, template=template)[0].noise_positions)
            changed = {i for i, (a, b) in enumerate(zip(f.clean_tokens, f.corrupted_tokens)) if a != b}
            assert changed and changed <= mention
            # logit-diff contrast: an answer of the swapped-in entity, never the gold answer's first token
            (swapped_in,) = [e for e in entities(probes) if other in mention_forms(e)]
            text = prompt_text(p, tokenizer, template=template)
            theirs = {
                tokenizer(answer_text(text, q.answer), add_special_tokens=False)["input_ids"][0]
                for q in probes
                if q.entity == swapped_in
            }
            assert f.contrast_token in theirs and f.contrast_token != f.answer_tokens[0]
        else:
            assert f.corruption in {"noise", "noise-question"}
            assert f.clean_tokens == f.corrupted_tokens and f.noise_positions
            assert max(f.noise_positions) < len(f.clean_tokens)
            assert f.contrast_token != f.answer_tokens[0]
    assert build_fact_prompts(probes, tokenizer, template=template) == facts  # deterministic


def test_variant_takes_another_swap_partner(tokenizer, seed_probes: list[Probe]) -> None:
    """`variant=1` corrupts with the next valid swap partner: same kind of corruption, another entity."""
    probes = select_entities(seed_probes, n=8)
    first = build_fact_prompts(probes, tokenizer)
    second = build_fact_prompts(probes, tokenizer, variant=1)
    assert [f.corruption.split(":")[0] for f in second] == [f.corruption.split(":")[0] for f in first]
    swaps = [(a, b) for a, b in zip(first, second) if a.corruption.startswith("swap:")]
    assert sum(a.corruption != b.corruption for a, b in swaps) > len(swaps) // 2
    assert all(a.clean_tokens == b.clean_tokens and len(b.corrupted_tokens) == len(b.clean_tokens) for a, b in swaps)


def test_swap_candidates_prefer_same_label_and_same_kind_of_mention() -> None:
    """Swap partners are ranked: same entity label first, then a mention of the same kind (full name for a
    full name; a surname before a first name for a one-word mention)."""
    from circuitdyn.probes.probes import _swap_candidates

    pool = {"Russia": "GPE", "Herbie Hancock": "PERSON", "Patna": "GPE", "Miles Davis": "PERSON"}
    full = _swap_candidates("f", "Herbie Hancock", "Herbie Hancock", pool)
    assert full[:3] == [("Miles Davis", "Miles Davis"), ("Davis", "Miles Davis"), ("Miles", "Miles Davis")]
    assert set(full[3:]) == {("Russia", "Russia"), ("Patna", "Patna")}
    one_word = _swap_candidates("f", "Herbie Hancock", "Hancock", pool)
    assert one_word[:3] == [("Davis", "Miles Davis"), ("Miles", "Miles Davis"), ("Miles Davis", "Miles Davis")]
    place = _swap_candidates("f", "Russia", "Russia", pool)
    assert place[0] == ("Patna", "Patna")


def test_noise_fallbacks(tokenizer, seed_probes: list[Probe]) -> None:
    hancock = [p for p in seed_probes if p.entity == "Herbie Hancock"][:2]
    facts = build_fact_prompts(hancock, tokenizer)  # only one entity in the set: nothing to swap with
    assert corruption_counts(facts) == {"noise": 2}
    mention = tokenizer.decode([facts[0].clean_tokens[i] for i in facts[0].noise_positions])
    assert "Hancock" in mention
    bihar = [p for p in seed_probes if p.question == "What is the capital of Bihar?"]
    facts = build_fact_prompts(bihar, tokenizer, pool=seed_probes)
    assert facts[0].corruption == "noise-question"
    assert "capital of Bihar" in tokenizer.decode([facts[0].clean_tokens[i] for i in facts[0].noise_positions])


def test_build_fact_prompts_bad_input(tokenizer) -> None:
    with pytest.raises(CircuitdynError, match="empty or missing 'answer'"):
        build_fact_prompts([Probe("x", "Russia", "What is Russia?", "")], tokenizer)
    plain_tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain_tok.chat_template = None
    with pytest.raises(CircuitdynError, match="no chat template"):
        build_fact_prompts([Probe("x", "Russia", "What is Russia?", "A")], plain_tok, template="chat")


def test_scoring() -> None:
    recall, f1 = rouge1("Donald Byrd's group", "Trumpeter Donald Byrd's group")
    assert recall == pytest.approx(0.8) and 0.8 < f1 < 1
    assert rouge1("", "Chairman") == (0.0, 0.0)
