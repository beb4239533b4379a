"""Option validation (issue 10, items 5, 7 and 8): probe parameters and dataset options of the
wrong type or outside their meaning are one WorkbenchError naming the option; good values give
the same prompts as before; absurd sizes fail before any work."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from typing import Literal

import pytest
from pydantic import Field

from workbench.datasets import DATASETS, OPTIONS, make_dataset
from workbench.errors import WorkbenchError
from workbench.protocol.params import Float, Int, Options, parse_cli_value, validate_options


class SinkLike(Options):
    epsilon: Float = Field(0.3, ge=0, le=1)


class Mixed(Options):
    steps: Literal["first", "all"] = "first"
    max_new_tokens: Int = Field(8, ge=1)
    greedy: bool = True
    name: str = "x"
    sizes: Int | list[Int] = 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epsilon": "abc"}, "sink.epsilon: expected a number, got 'abc'"),
        ({"epsilon": 5}, "sink.epsilon: must be <= 1, got 5"),
        ({"epsilon": -0.1}, "sink.epsilon: must be >= 0, got -0.1"),
        ({"epsilon": float("nan")}, "sink.epsilon: must be a finite number, got NaN"),
        ({"epsilon": float("inf")}, "sink.epsilon: must be a finite number, got Infinity"),
        ({"epsilon": "nan"}, "sink.epsilon: must be a finite number, got 'nan'"),
        ({"epsilon": True}, "sink.epsilon: expected a number, got true"),
        ({"epsilon": [0.1]}, "sink.epsilon: expected a number, got [0.1]"),
        ({"epsilon": None}, "sink.epsilon: expected a number, got null"),
        ({"bogus": 1}, "sink: unknown parameter 'bogus' (known: epsilon)"),
    ],
)
def test_bad_values_name_the_option(values, message):
    with pytest.raises(WorkbenchError) as err:
        validate_options(SinkLike, values, "sink")
    assert err.value.message == message
    assert "epsilon" in err.value.fix and "\n" not in err.value.message


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": "some"}, "x.steps: must be one of 'first', 'all', got 'some'"),
        ({"max_new_tokens": True}, "x.max_new_tokens: expected a whole number, got true"),
        ({"max_new_tokens": 2.5}, "x.max_new_tokens: expected a whole number, got 2.5"),
        ({"max_new_tokens": "many"}, "x.max_new_tokens: expected a whole number, got 'many'"),
        ({"max_new_tokens": 0}, "x.max_new_tokens: must be >= 1, got 0"),
        ({"greedy": "maybe"}, "x.greedy: expected true or false, got 'maybe'"),
        ({"greedy": 2}, "x.greedy: expected true or false, got 2"),
        ({"sizes": "abc"}, "x.sizes: expected a whole number, got 'abc'"),
        ({"sizes": [1, "b"]}, "x.sizes[1]: expected a whole number, got 'b'"),
        ({"sizes": [1, False]}, "x.sizes[1]: expected a whole number, got false"),
        ({"name": [1]}, "x.name: expected a string, got [1]"),
    ],
)
def test_types_choices_and_bools(values, message):
    with pytest.raises(WorkbenchError) as err:
        validate_options(Mixed, values, "x")
    assert err.value.message == message


def test_lax_cli_values_are_read():
    assert validate_options(SinkLike, {"epsilon": "0.2"}, "sink").epsilon == 0.2
    got = validate_options(Mixed, {"max_new_tokens": "3", "greedy": "false", "name": "12", "sizes": [1, "2"]}, "x")
    assert (got.max_new_tokens, got.greedy, got.name, got.sizes) == (3, False, "12", [1, 2])
    with pytest.raises(WorkbenchError, match="x.name: expected a string, got 12"):
        validate_options(Mixed, {"name": 12}, "x")  # a number in a TOML file is not a folder name
    assert validate_options(Mixed, {}, "x").model_dump() == {
        "steps": "first",
        "max_new_tokens": 8,
        "greedy": True,
        "name": "x",
        "sizes": 4,
    }


@pytest.mark.parametrize(
    "raw, value",
    [
        ("0.2", 0.2),
        ("true", True),
        ("3", 3),
        ("[1, 2]", [1, 2]),
        ('"x"', "x"),
        ("abc", "abc"),
        ("", ""),
        ("0,0.5", "0,0.5"),
        ("NaN", "nan"),
        ("[" * 100_000, "[" * 100_000),
    ],
)
def test_parse_cli_value(raw, value):
    got = parse_cli_value(raw)
    if value == "nan":
        assert isinstance(got, float) and math.isnan(got)  # JSON's NaN: rejected later by the schema
    else:
        assert got == value


def test_parse_cli_value_leaves_text_options_as_typed():
    assert parse_cli_value("2024", Mixed, "name") == "2024"
    assert parse_cli_value("all", Mixed, "steps") == "all"
    assert parse_cli_value("3", Mixed, "max_new_tokens") == 3
    assert parse_cli_value("[1, 2]", Mixed, "sizes") == [1, 2]
    assert parse_cli_value("3", Mixed, "unknown") == 3  # reported as unknown later


def test_bare_number_fields_refuse_booleans_too():
    """A plugin author writing plain int / float gets the same strictness as Int / Float."""

    class Plain(Options):
        n: int = 3
        x: float = 0.5
        either: int | bool = 1

    for values, message in (
        ({"n": True}, "x.n: expected a whole number, got true"),
        ({"x": False}, "x.x: expected a number, got false"),
    ):
        with pytest.raises(WorkbenchError) as exc:
            validate_options(Plain, values, "x")
        assert exc.value.message == message
    assert validate_options(Plain, {"either": True}, "x").either is True
    assert validate_options(Plain, {"n": "4", "x": "0.25"}, "x").model_dump() == {"n": 4, "x": 0.25, "either": 1}


# -- dataset options ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


def make(name: str, tok, **options):
    return make_dataset(name, tokenizer=tok if name in ("repeated-random", "niah") else None, **options)


BAD = [
    ("prose", {"n_prompts": 100_000_000}, "--n-prompts must be at most 1000000, got 100000000"),
    ("niah", {"n_prompts": 1_000_001}, "--n-prompts must be at most 1000000, got 1000001"),
    ("prose", {"n_prompts": 0}, "--n-prompts must be at least 1, got 0"),
    ("prose", {"n_prompts": 1e9}, "prose.n_prompts: must be <= 1000000, got 1000000000.0"),
    ("prose", {"n_prompts": "1e9"}, "prose.n_prompts: expected a whole number, got '1e9'"),
    ("prose", {"n_prompts": "many"}, "prose.n_prompts: expected a whole number, got 'many'"),
    ("prose", {"n_prompts": True}, "prose.n_prompts: expected a whole number, got true"),
    ("prose", {"seed": "abc"}, "prose.seed: expected a whole number, got 'abc'"),
    ("prose", {"seed": 1.5}, "prose.seed: expected a whole number, got 1.5"),
    ("prose", {"min_words": 0}, "prose.min_words: must be >= 1, got 0"),
    ("prose", {"min_words": 50, "max_words": 10}, "prose: need min_words <= max_words, got 50 and 10"),
    ("prose", {"min_words": 10**9, "max_words": 10**9}, "prose.min_words: no document has 1000000000 words"),
    ("prose", {"max_words": "lots"}, "prose.max_words: expected a whole number, got 'lots'"),
    ("prose", {"bogus": 1}, "prose: unknown option 'bogus' (known: n_prompts, seed, min_words, max_words)"),
    ("repeated-random", {"period": 1}, "repeated-random.period: must be >= 2, got 1"),
    ("repeated-random", {"period": "x"}, "repeated-random.period: expected a whole number, got 'x'"),
    ("repeated-random", {"repeats": 10**9}, "repeated-random: each prompt would be 50000000000 tokens"),
    (
        "repeated-random",
        {"prepend_bos": "perhaps"},
        "repeated-random.prepend_bos: expected true or false, got 'perhaps'",
    ),
    ("repeated-random", {"vocab_size": 0}, "repeated-random.vocab_size: must be >= 1, got 0"),
    ("repeated-random", {"period": 100_000}, "period 100000 exceeds the"),
    ("niah", {"depths": [0, 1.5]}, "niah.depths[1]: must be <= 1, got 1.5"),
    ("niah", {"depths": -0.5}, "niah.depths: must be >= 0, got -0.5"),
    ("niah", {"depths": [0, "mid"]}, "niah.depths[1]: expected a number, got 'mid'"),
    ("niah", {"depths": []}, "niah.depths: list should have at least 1 item"),
    ("niah", {"depths": float("nan")}, "niah.depths: must be a finite number, got NaN"),
    ("niah", {"context_len": []}, "niah.context_len: list should have at least 1 item"),
    ("niah", {"context_len": 0}, "niah.context_len: must be >= 1, got 0"),
    ("niah", {"context_len": 10**12}, "niah.context_len: must be <= 1048576, got 1000000000000"),
    ("niah", {"context_len": [128, "long"]}, "niah.context_len[1]: expected a whole number, got 'long'"),
    ("niah", {"shared_haystack": "sometimes"}, "niah.shared_haystack: expected true or false, got 'sometimes'"),
    ("niah", {"answer_digits": -1}, "niah.answer_digits: must be >= 0, got -1"),
    ("niah", {"answer_digits": 100}, "niah.answer_digits: must be <= 18, got 100"),
    ("niah", {"needle": "no placeholders"}, "niah.needle: needs the placeholders {place}, {answer}"),
    ("niah", {"needle": "the {place} is {answer} {oops}"}, "niah.needle: unknown placeholder {oops}"),
    ("niah", {"question": "what about the {thing}?"}, "niah.question: unknown placeholder {thing}"),
    ("niah", {"n_ctx": 0}, "niah.n_ctx: must be >= 1, got 0"),
    ("shapes", {"question": "size"}, "shapes.question: must be one of 'color', 'shape', got 'size'"),
    ("shapes", {"n_prompts": 20_000}, "shapes.n_prompts: must be <= 10000, got 20000"),
    ("shapes", {"folder": 3.5}, "shapes.folder: expected a string, got 3.5"),
    ("counterfact", {"template": "essay"}, "counterfact.template: must be one of 'qa', 'cloze', got 'essay'"),
    (
        "counterfact",
        {"relations": ["capital", "colour"]},
        "counterfact.relations[1]: must be one of 'capital', 'language', 'continent', 'city', got 'colour'",
    ),
    (
        "counterfact",
        {"relations": "colour"},
        "counterfact.relations: must be one of 'capital', 'language', 'continent', 'city', got 'colour'",
    ),
    ("counterfact", {"relations": []}, "counterfact.relations: list should have at least 1 item"),
    (
        "counterfact",
        {"context": "no placeholders"},
        "counterfact.context: needs the placeholders {statement}, {answer}",
    ),
    ("counterfact", {"context": "{statement} {answer} {x}"}, "counterfact.context: unknown placeholder {x}"),
    ("counterfact", {"n_prompts": 500}, "counterfact has 41 facts, asked for 500"),
]


@pytest.mark.parametrize("name, options, message", BAD, ids=[f"{n}-{'-'.join(o)}" for n, o, _ in BAD])
def test_bad_dataset_options(tok, name, options, message):
    with pytest.raises(WorkbenchError) as err:
        make(name, tok, **options)
    assert err.value.message.startswith(message), err.value.message
    assert err.value.fix and "\n" not in err.value.message


def test_shapes_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkbenchError, match="cannot create the shapes image folder"):
        make_dataset("shapes", n_prompts=1, folder=str(tmp_path / "file" / "sub"))


def test_the_prompt_cap_is_checked_before_any_work(monkeypatch):
    import workbench.datasets.prose as prose

    monkeypatch.setattr(prose, "load_documents", lambda: pytest.fail("work started before the cap was checked"))
    with pytest.raises(WorkbenchError, match=r"at most 1000000") as err:
        make_dataset("prose", n_prompts=100_000_000)
    assert "1000000" in err.value.fix


def test_schemas_match_the_make_signatures():
    """Every make() parameter is an option (tokenizer aside) with the same default."""
    for name, (fn, _) in DATASETS.items():
        params = {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "tokenizer"}
        fields = OPTIONS[name].model_fields
        assert list(fields) == list(params), name
        for k, default in params.items():
            assert fields[k].default == default, (name, k)
    from typing import get_args

    from workbench.datasets import counterfact

    assert set(get_args(counterfact.Relation)) == set(counterfact.RELATIONS)


# Digests of the prompts each case gave before the option schemas existed (same seed, same
# options): validation must not change what good values produce.
GOOD = {
    "prose-default": ("prose", {}, "d8afbda19170e25f"),
    "prose-opts": ("prose", dict(n_prompts=5, seed=3, min_words=10, max_words=30), "1c6b588f2564543d"),
    "repeated": (
        "repeated-random",
        dict(n_prompts=4, seed=1, period=20, repeats=3, prepend_bos=True),
        "16d9b24460131bf3",
    ),
    "niah-grid": (
        "niah",
        dict(n_prompts=6, seed=2, context_len=[128, 200], depths=[0, 0.5, 1], shared_haystack=True),
        "4a8550ae045a7ee9",
    ),
    "niah-words": ("niah", dict(n_prompts=2, context_len=300, depths=0.25, answer_digits=0), "a75d238833821b32"),
    "shapes": ("shapes", dict(n_prompts=4, seed=5, question="shape"), "f51f521b83615e4f"),
    "counterfact-default": ("counterfact", {}, "5b36b494b6d0c78a"),
    "counterfact-opts": (
        "counterfact",
        dict(n_prompts=10, seed=4, template="cloze", relations=["capital", "city"]),
        "8642d1171e950557",
    ),
    "counterfact-one": ("counterfact", dict(relations="language"), "f5dd58c6a06057d6"),
}


def _digest(prompts) -> str:
    rows = [{k: v for k, v in p.to_json().items() if k != "image"} for p in prompts]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", list(GOOD))
def test_good_values_give_the_same_prompts_as_before(tok, tmp_path, case):
    name, options, digest = GOOD[case]
    if name == "shapes":
        options = {**options, "folder": str(tmp_path)}
    assert _digest(make(name, tok, **options)) == digest
    # the same values given as text (a TOML string, an unparsed CLI value) are read the same
    assert _digest(make(name, tok, **{k: _as_text(v) for k, v in options.items()})) == digest


def _as_text(v):
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return [str(x) for x in v]
    return v


class Lists(Options):
    layers: list[Int] | None = Field(None)
    names: list[str] = Field(default_factory=list)


@pytest.mark.parametrize(
    "name, raw, value",
    [
        ("layers", "1,2", [1, 2]),  # as the shell makes it easy; was "expected a list, got '1,2'"
        ("layers", "3", [3]),
        ("layers", "[4, 5]", [4, 5]),
        ("layers", "null", None),
        ("names", "a,b", ["a", "b"]),
    ],
)
def test_a_list_option_reads_a_comma_list(name, raw, value):
    parsed = parse_cli_value(raw, Lists, name)
    assert parsed == value
    assert getattr(validate_options(Lists, {name: parsed}, "x"), name) == value


def test_a_default_made_by_a_factory_is_described_by_its_value():
    from workbench.protocol.params import describe_options

    assert describe_options(Lists) == "layers (default null), names (default [])"
