"""``counterfact``: knowledge-conflict items for the ``context`` probe.

Simple world facts a small model knows (capitals, official languages, continents, the cities of
famous landmarks), each with a false answer of the same type. An item asks for the fact and
puts a short passage asserting the false answer in front:

    context: "In this story, the capital of France is Rome."
    text:    "Q: What is the capital of France?\\nA: The capital of France is"
    target_context: " Rome"    target_memory: " Paris"

The facts were kept because SmolLM2-135M answers all of them right without the passage
(greedy first token with the default ``qa`` template; tests/test_counterfact.py checks it), and
each pair of answers differs in its first SmolLM2 token. ``template="cloze"`` drops the question
line ("The capital of France is"); the bare cloze is much weaker on SmolLM2-135M (about 60% right
without the passage: it often continues with " the" or " fact"). Other tokenizers may merge the
two first tokens (a word-level tokenizer maps unknown names to the same ``[UNK]``): drop those
items before running the probe (notebooks/05_context_divergence.ipynb does).

Pattern views (:mod:`workbench.datasets.view`): :func:`view_rows` declares the item as the
context probe reads it, passage first.

Fields (in ``meta``): ``context``, ``target_context``, ``target_memory`` (with the leading
space), ``relation``, ``subject``. Item ids name the fact, so they do not depend on the seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from workbench.errors import WorkbenchError
from workbench.inputs.conditions import passage_ids
from workbench.inputs.prompts import Prompt

from .options import DatasetOptions, check_template
from .view import PatternRows, square_rows

DESCRIPTION = "knowledge conflicts: a fact question after a passage asserting a false answer (for the context probe)"

# relation: (question, statement ending right before the answer)
RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("What is the capital of {s}?", "the capital of {s} is"),
    "language": ("What is the official language of {s}?", "the official language of {s} is"),
    "continent": ("On which continent is {s}?", "{s} is on the continent of"),
    "city": ("In which city is {s}?", "{s} is in"),
}

# (relation, subject, true answer, false answer of the same type)
FACTS: list[tuple[str, str, str, str]] = [
    ("capital", "France", "Paris", "Rome"),
    ("capital", "Italy", "Rome", "Madrid"),
    ("capital", "Spain", "Madrid", "Berlin"),
    ("capital", "Germany", "Berlin", "Vienna"),
    ("capital", "Japan", "Tokyo", "Seoul"),
    ("capital", "England", "London", "Dublin"),
    ("capital", "Russia", "Moscow", "Cairo"),
    ("capital", "Egypt", "Cairo", "Athens"),
    ("capital", "Greece", "Athens", "Lisbon"),
    ("capital", "Austria", "Vienna", "Prague"),
    ("capital", "Ireland", "Dublin", "Oslo"),
    ("capital", "Portugal", "Lisbon", "Stockholm"),
    ("capital", "China", "Beijing", "Tokyo"),
    ("capital", "Norway", "Oslo", "Helsinki"),
    ("capital", "Sweden", "Stockholm", "Budapest"),
    ("capital", "Hungary", "Budapest", "Warsaw"),
    ("capital", "South Korea", "Seoul", "Bangkok"),
    ("capital", "Peru", "Lima", "Havana"),
    ("capital", "Belgium", "Brussels", "Copenhagen"),
    ("capital", "Iran", "Tehran", "Baghdad"),
    ("language", "France", "French", "German"),
    ("language", "Germany", "German", "Italian"),
    ("language", "Spain", "Spanish", "Dutch"),
    ("language", "Italy", "Italian", "Swedish"),
    ("language", "Japan", "Japanese", "Korean"),
    ("language", "Russia", "Russian", "Turkish"),
    ("language", "Brazil", "Portuguese", "Greek"),
    ("language", "Greece", "Greek", "Spanish"),
    ("continent", "Egypt", "Africa", "Europe"),
    ("continent", "France", "Europe", "Asia"),
    ("continent", "Japan", "Asia", "Africa"),
    ("continent", "Kenya", "Africa", "South America"),
    ("continent", "China", "Asia", "Europe"),
    ("continent", "India", "Asia", "Europe"),
    ("city", "the Eiffel Tower", "Paris", "London"),
    ("city", "the Colosseum", "Rome", "Berlin"),
    ("city", "Big Ben", "London", "Paris"),
    ("city", "the Statue of Liberty", "New York", "Rome"),
    ("city", "the Kremlin", "Moscow", "Madrid"),
    ("city", "the Acropolis", "Athens", "Vienna"),
    ("city", "the Brandenburg Gate", "Berlin", "Tokyo"),
]

TEMPLATES = {
    "qa": "Q: {question}\nA: {Statement}",
    "cloze": "{Statement}",
}
CONTEXT = "In this story, {statement} {answer}."


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


Relation = Literal["capital", "language", "continent", "city"]


class Options(DatasetOptions):
    template: Literal["qa", "cloze"] = "qa"
    context: str = CONTEXT
    relations: Relation | Annotated[list[Relation], Field(min_length=1)] | None = None

    @field_validator("context")
    @classmethod
    def _context(cls, text: str) -> str:
        return check_template(text, required=("statement", "answer"))


def make(
    n_prompts: int | None = None,
    seed: int = 0,
    template: str = "qa",
    context: str = CONTEXT,
    relations: str | list[str] | None = None,
) -> list[Prompt]:
    """``n_prompts`` facts (default: all of them) in an order shuffled by ``seed``.

    ``template``: ``qa`` (question, then the answer sentence) or ``cloze`` (the sentence alone).
    ``context``: the passage, with ``{statement}`` (e.g. "the capital of France is") and
    ``{answer}`` (the false answer). ``relations``: keep only these (capital, language,
    continent, city).
    """
    if template not in TEMPLATES:
        raise WorkbenchError(f"unknown counterfact template {template!r}", f"choose from: {', '.join(TEMPLATES)}")
    if "{statement}" not in context or "{answer}" not in context:
        raise WorkbenchError(
            "the counterfact context needs {statement} and {answer} placeholders",
            "e.g. 'In this story, {statement} {answer}.'",
        )
    if relations is not None:
        relations = [relations] if isinstance(relations, str) else list(relations)
        bad = [r for r in relations if r not in RELATIONS]
        if bad:
            raise WorkbenchError(f"unknown counterfact relation {bad[0]!r}", f"choose from: {', '.join(RELATIONS)}")
    facts = [f for f in FACTS if relations is None or f[0] in relations]
    n = len(facts) if n_prompts is None else n_prompts
    if not 1 <= n <= len(facts):
        raise WorkbenchError(f"counterfact has {len(facts)} facts, asked for {n}", f"ask for 1 to {len(facts)} prompts")
    random.Random(seed).shuffle(facts)
    prompts = []
    for relation, subject, true, false in facts[:n]:
        question, statement = RELATIONS[relation]
        statement = statement.format(s=subject)
        text = TEMPLATES[template].format(
            question=_upper_first(question.format(s=subject)), Statement=_upper_first(statement)
        )
        passage = context.format(statement=statement, answer=false)
        meta = {
            "context": passage,
            "target_context": " " + false,
            "target_memory": " " + true,
            "relation": relation,
            "subject": subject,
        }
        prompts.append(Prompt(id=f"counterfact-{relation}-{_slug(subject)}", text=text, meta=meta))
    return prompts


def view_rows(ids: list[int], meta: dict[str, Any], text: str | None = None, tokenizer: Any = None) -> PatternRows:
    """An item's pattern view: the passage, a line break and the question, tokenized as the
    context probe builds its run with the context (:func:`workbench.inputs.conditions.passage_ids`,
    as :func:`~workbench.inputs.conditions.passage_pair` does, with its default separator), as a
    square of the first rows, the passage marked. Without a passage or text: the question alone
    (:func:`square_rows`). A probe that reads the question alone (a sink measured on
    counterfact) is then shown on more than it saw; the context probe is what this dataset is for."""
    passage = meta.get("context")
    if not isinstance(passage, str) or not passage.strip() or text is None or tokenizer is None:
        return square_rows(ids, meta)
    full, n_prefix = passage_ids(tokenizer, passage, text)
    return replace(square_rows(full, meta), mark=(0, n_prefix), mark_label="passage")
