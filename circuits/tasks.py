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
from workbench.inputs.prompts import json_kind, read_lines, special_prefix

NAMES = [
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Tom",
    "James",
    "Sarah",
    "Paul",
    "Anna",
    "David",
    "Emma",
    "Mark",
    "Lisa",
    "Kate",
    "Mike",
    "Laura",
    "Peter",
    "Jane",
    "Daniel",
    "Rachel",
    "Chris",
    "Steve",
    "Ben",
    "Sam",
    "Linda",
    "George",
    "Lucy",
    "Adam",
]
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
    """The one token ``word`` is, or None (several tokens, none, or the unknown token: every
    out-of-vocabulary word would be the same answer)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if len(ids) == 1 and (unk is None or ids[0] != unk) else None


def _answer_id(tokenizer, text: str, what: str, pid: str) -> int:
    tid = _single(tokenizer, text)
    if tid is None:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n == 1:
            raise WorkbenchError(
                f"pair {pid!r}: the {what} answer {text!r} is not in the tokenizer's vocabulary "
                "(it becomes the unknown token)",
                "use answers that are single tokens of this model's vocabulary",
            )
        raise WorkbenchError(
            f"pair {pid!r}: the {what} answer {text!r} is {n} tokens, not one",
            "use answers that are single tokens (mind the leading space)",
        )
    return tid


def check_pair(p: Pair) -> None:
    """Reject a pair whose logit difference cannot measure anything: the same answer token twice
    (LD is 0 on both prompts) or the same tokens clean and corrupted (LD_clean = LD_corrupted).
    Either would be NaN alone and, among good pairs, silently dilute the mean effect."""
    if not p.clean or not p.corrupted:
        raise WorkbenchError(f"pair {p.id!r} has an empty prompt", "give clean and corrupted text")
    if len(p.clean) != len(p.corrupted):
        raise WorkbenchError(
            f"pair {p.id!r}: clean has {len(p.clean)} tokens and corrupted {len(p.corrupted)}; positions must align",
            "make the corrupted prompt the same number of tokens (swap single-token words)",
        )
    texts = p.meta
    if p.correct == p.incorrect:
        answers = (
            f" ({texts['correct']!r} and {texts['incorrect']!r})" if "correct" in texts and "incorrect" in texts else ""
        )
        raise WorkbenchError(
            f"pair {p.id!r}: the correct and incorrect answers{answers} are the same token (id {p.correct}), "
            "so the logit difference is always 0",
            "give two answers that are different tokens for this model",
        )
    if list(p.clean) == list(p.corrupted):
        prompts = (
            f" ({texts['clean']!r} and {texts['corrupted']!r})" if "clean" in texts and "corrupted" in texts else ""
        )
        raise WorkbenchError(
            f"pair {p.id!r}: the clean and corrupted prompts{prompts} are the same tokens, "
            "so patching cannot change anything",
            "corrupt the prompt with a word the tokenizer knows (a different token)",
        )


def make_pair(
    tokenizer, pid: str, clean: str, corrupted: str, correct: str, incorrect: str, meta: dict | None = None
) -> Pair:
    prefix = special_prefix(tokenizer)
    c = tokenizer(clean, add_special_tokens=False)["input_ids"]
    x = tokenizer(corrupted, add_special_tokens=False)["input_ids"]
    if not c or not x:
        raise WorkbenchError(f"pair {pid!r} has an empty prompt", "give clean and corrupted text")
    pair = Pair(
        pid,
        prefix + list(c),
        prefix + list(x),
        _answer_id(tokenizer, correct, "correct", pid),
        _answer_id(tokenizer, incorrect, "incorrect", pid),
        {"clean": clean, "corrupted": corrupted, "correct": correct, "incorrect": incorrect, **(meta or {})},
    )
    check_pair(pair)
    return pair


def ioi(tokenizer, n: int = 32, seed: int = 0, templates: list[str] | None = None) -> list[Pair]:
    rng = random.Random(seed)
    names = [nm for nm in NAMES if _single(tokenizer, " " + nm) is not None]
    if len(names) < 3:
        raise WorkbenchError(
            "fewer than 3 names are single tokens for this tokenizer", "bring your own pairs (--pairs FILE.jsonl)"
        )
    templates = templates or IOI_TEMPLATES
    pairs = []
    for i in range(n):
        t = templates[i % len(templates)]
        a, b, c = rng.sample(names, 3)
        io, s = (a, b) if rng.random() < 0.5 else (b, a)  # ABBA and BABA orders
        fill = {"PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS)}
        clean = t.format(A=a, B=b, C=s, **fill)
        corrupted = t.format(A=a, B=b, C=c, **fill)
        pairs.append(
            make_pair(
                tokenizer, f"ioi-{seed}-{i:04d}", clean, corrupted, " " + io, " " + s, {"template": i % len(templates)}
            )
        )
    return pairs


def colored_objects(tokenizer, n: int = 32, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    colors = [c for c in COLORS if _single(tokenizer, " " + c) is not None]
    things = [t for t in THINGS if _single(tokenizer, " " + t) is not None]
    if len(colors) < 3 or len(things) < 3:
        raise WorkbenchError(
            "fewer than 3 colours or objects are single tokens for this tokenizer "
            f"({len(colors)} colours, {len(things)} objects)",
            "bring your own pairs (--pairs FILE.jsonl)",
        )
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


PAIR_FIELDS = ("clean", "corrupted", "correct", "incorrect")
PAIR_FORMAT = '{"id": "p1", "clean": "...", "corrupted": "...", "correct": " A", "incorrect": " B"}'


def _pair_from_line(obj: Any, lineno: int, tokenizer) -> Pair:
    if not isinstance(obj, dict):
        raise WorkbenchError(f"expected a JSON object, got {json_kind(obj)}", f"one pair per line: {PAIR_FORMAT}")
    missing = [k for k in PAIR_FIELDS if k not in obj]
    if missing:
        raise WorkbenchError(
            f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}",
            f"give every pair {PAIR_FORMAT}",
        )
    pid = obj.get("id", lineno)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise WorkbenchError(f"'id' must be a string or an integer, got {json_kind(pid)}", 'e.g. "id": "p1"')
    for k in PAIR_FIELDS:
        if not isinstance(obj[k], str):
            raise WorkbenchError(
                f"'{k}' must be a string, got {json_kind(obj[k])}", f'quote the text, e.g. "{k}": "..."'
            )
        if not obj[k].strip():
            raise WorkbenchError(
                f"'{k}' is empty",
                "give clean and corrupted prompts and two single-token answers (with their leading space)",
            )
    template = obj.get("template")
    if template is not None and (isinstance(template, bool) or not isinstance(template, (str, int))):
        raise WorkbenchError(
            f"'template' must be a string or an integer, got {json_kind(template)}",
            'name the template the pair was made from, e.g. "template": 3 (pairs of one template align token by token)',
        )
    meta = {"template": template} if template is not None else None
    return make_pair(tokenizer, str(pid), obj["clean"], obj["corrupted"], obj["correct"], obj["incorrect"], meta)


def read_pairs(path: str | Path, tokenizer) -> list[Pair]:
    """Parse a pairs JSONL file; every problem is one WorkbenchError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"pairs file {path} does not exist", "check the path")
    pairs: list[Pair] = []
    seen: set[str] = set()
    for lineno, line in enumerate(read_lines(path, "pairs"), 1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkbenchError(
                    f"not valid JSON ({exc.msg})", f"one JSON object per line: {PAIR_FORMAT}"
                ) from None
            pair = _pair_from_line(obj, lineno, tokenizer)
            if pair.id in seen:
                raise WorkbenchError(f"duplicate pair id {pair.id!r}", "give every pair its own id")
        except WorkbenchError as exc:
            raise WorkbenchError(f"{path}:{lineno}: {exc.message}", exc.fix) from None
        seen.add(pair.id)
        pairs.append(pair)
    if not pairs:
        raise WorkbenchError(f"pairs file {path} is empty", "add one pair per line")
    return pairs


def write_pairs(pairs: list[Pair], path: str | Path) -> Path:
    """Write pairs as JSONL (the format :func:`read_pairs` accepts), atomically."""
    from workbench.files.atomic import atomic_write_text

    keys = ("clean", "corrupted", "correct", "incorrect")
    return atomic_write_text(
        path,
        "".join(
            json.dumps(
                {
                    "id": p.id,
                    **{k: p.meta[k] for k in keys},
                    **({"template": p.meta["template"]} if p.meta.get("template") is not None else {}),
                }
            )
            + "\n"
            for p in pairs
        ),
    )
