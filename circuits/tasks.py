"""Clean / corrupted prompt pairs with answer tokens: IOI, Colored Objects, or your own JSONL.

A :class:`Pair` holds the clean and corrupted token ids (same length, so positions align), the
correct and incorrect answer token for the clean prompt, and the texts. The metric everywhere
is the logit difference ``logit(correct) - logit(incorrect)`` at the last position.

- ``ioi`` (Wang et al.): "When Mary and John went to the store, John gave a drink to" -> " Mary"
  (correct, the indirect object) vs " John" (incorrect, the subject). Corrupted: the "ABC"
  variant, the second mention of the subject replaced by a third name. Names are kept only if
  they are one token (with their leading space) for the model's tokenizer.
- ``colored-objects``: "On the table, I see a red pen, a blue book, and a green cup. What color
  is the book? The book is" -> " blue" vs the colour of the object the corrupted prompt asks
  about (corrupted = a different queried object).
- JSONL pairs: ``{"id", "clean", "corrupted", "correct", "incorrect"}`` (texts; answers are
  tokenized as given, so include the leading space).

Prompts start with the tokenizer's default special prefix (BOS for Gemma, nothing for SmolLM2),
as text prompts do; answers are single tokens without it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.prompts import special_prefix

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Paul", "Anna", "David", "Emma", "Mark", "Lisa", "Kate",
         "Mike", "Laura", "Peter", "Jane", "Daniel", "Rachel", "Chris", "Steve", "Ben", "Sam", "Linda", "George", "Lucy", "Adam"]
PLACES = ["store", "park", "school", "office", "restaurant", "hospital", "station", "market", "garden", "library"]
OBJECTS = ["drink", "book", "ring", "letter", "ball", "gift", "key", "bag", "phone", "pen"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {C} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {C} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {C} gave it to",
    "The {PLACE} was quiet when {A} and {B} arrived. {C} handed the {OBJECT} to",
    "Afterwards, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple"]
THINGS = ["pen", "book", "cup", "ball", "key", "hat", "box", "bag", "car", "phone", "lamp", "chair"]
CO_TEMPLATE = "On the table, I see a {c1} {o1}, a {c2} {o2}, and a {c3} {o3}. What color is the {oq}? The {oq} is"


@dataclass
class Pair:
    id: str
    clean: list[int]
    corrupted: list[int]
    correct: int
    incorrect: int
    meta: dict[str, Any] = field(default_factory=dict)


def _single(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _answer_id(tokenizer, text: str, what: str, pid: str) -> int:
    tid = _single(tokenizer, text)
    if tid is None:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise WorkbenchError(f"pair {pid!r}: the {what} answer {text!r} is {n} tokens, not one", "use answers that are single tokens (mind the leading space)")
    return tid


def make_pair(tokenizer, pid: str, clean: str, corrupted: str, correct: str, incorrect: str, meta: dict | None = None) -> Pair:
    prefix = special_prefix(tokenizer)
    c = tokenizer(clean, add_special_tokens=False)["input_ids"]
    x = tokenizer(corrupted, add_special_tokens=False)["input_ids"]
    if not c or not x:
        raise WorkbenchError(f"pair {pid!r} has an empty prompt", "give clean and corrupted text")
    if len(c) != len(x):
        raise WorkbenchError(
            f"pair {pid!r}: clean has {len(c)} tokens and corrupted {len(x)}; positions must align",
            "make the corrupted prompt the same number of tokens (swap single-token words)",
        )
    return Pair(pid, prefix + c, prefix + x, _answer_id(tokenizer, correct, "correct", pid), _answer_id(tokenizer, incorrect, "incorrect", pid),
                {"clean": clean, "corrupted": corrupted, "correct": correct, "incorrect": incorrect, **(meta or {})})


def ioi(tokenizer, n: int = 32, seed: int = 0, templates: list[str] | None = None) -> list[Pair]:
    rng = random.Random(seed)
    names = [nm for nm in NAMES if _single(tokenizer, " " + nm) is not None]
    if len(names) < 3:
        raise WorkbenchError("fewer than 3 names are single tokens for this tokenizer", "bring your own pairs (--pairs FILE.jsonl)")
    templates = templates or IOI_TEMPLATES
    pairs = []
    for i in range(n):
        t = templates[i % len(templates)]
        a, b, c = rng.sample(names, 3)
        io, s = (a, b) if rng.random() < 0.5 else (b, a)  # ABBA and BABA orders
        fill = {"PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS)}
        clean = t.format(A=a, B=b, C=s, **fill)
        corrupted = t.format(A=a, B=b, C=c, **fill)
        pairs.append(make_pair(tokenizer, f"ioi-{seed}-{i:04d}", clean, corrupted, " " + io, " " + s, {"template": i % len(templates)}))
    return pairs


def colored_objects(tokenizer, n: int = 32, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    colors = [c for c in COLORS if _single(tokenizer, " " + c) is not None]
    things = [t for t in THINGS if _single(tokenizer, " " + t) is not None]
    pairs = []
    for i in range(n):
        cs, os_ = rng.sample(colors, 3), rng.sample(things, 3)
        q, q2 = rng.sample(range(3), 2)
        fill = {f"c{k + 1}": cs[k] for k in range(3)} | {f"o{k + 1}": os_[k] for k in range(3)}
        clean = CO_TEMPLATE.format(oq=os_[q], **fill)
        corrupted = CO_TEMPLATE.format(oq=os_[q2], **fill)
        pairs.append(make_pair(tokenizer, f"co-{seed}-{i:04d}", clean, corrupted, " " + cs[q], " " + cs[q2]))
    return pairs


TASKS = {"ioi": ioi, "colored-objects": colored_objects}


def make_task(name: str, tokenizer, n: int = 32, seed: int = 0) -> list[Pair]:
    if name not in TASKS:
        raise WorkbenchError(f"unknown task {name!r}", f"choose from: {', '.join(TASKS)}, or --pairs FILE.jsonl")
    if n < 1:
        raise WorkbenchError(f"the task needs at least one pair, got n={n}", "use --n-prompts 1 or more")
    return TASKS[name](tokenizer, n=n, seed=seed)


def read_pairs(path: str | Path, tokenizer) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"pairs file {path} does not exist", "check the path")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{path}:{lineno}: not valid JSON ({exc.msg})", "one JSON object per line") from None
        missing = [k for k in ("clean", "corrupted", "correct", "incorrect") if k not in obj]
        if missing:
            raise WorkbenchError(f"{path}:{lineno}: missing {', '.join(missing)}", 'give {"id", "clean", "corrupted", "correct", "incorrect"}')
        pairs.append(make_pair(tokenizer, str(obj.get("id", lineno)), obj["clean"], obj["corrupted"], obj["correct"], obj["incorrect"]))
    if not pairs:
        raise WorkbenchError(f"pairs file {path} is empty", "add one pair per line")
    return pairs


def write_pairs(pairs: list[Pair], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"id": p.id, **{k: p.meta[k] for k in ("clean", "corrupted", "correct", "incorrect")}}) + "\n")
