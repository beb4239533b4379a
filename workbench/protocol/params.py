"""Validating user-given option values (probe parameters, dataset options) with pydantic.

Values come from the command line (``--param sink.epsilon=0.2``: strings, read as JSON when
they parse, see :func:`parse_cli_value`) or from a sweep's TOML, so validation is lax where that
helps ("0.2" is a number, "true" a boolean) and strict where lax would hide a mistake: a
boolean is not a number (for any number field; :data:`Int` / :data:`Float` say so explicitly),
NaN and infinities are not numbers, and unknown keys are errors. :func:`validate_options` turns the first problem into
one :class:`~workbench.errors.WorkbenchError`::

    sink.epsilon: expected a number, got 'abc'
    sink.epsilon: must be <= 1, got 5
    sink: unknown parameter 'bogus' (known: epsilon)
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from workbench.errors import WorkbenchError


class _NoBool:
    """Validator marking a number type that refuses booleans (lax mode would read True as 1)."""

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def __call__(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("bool_not_number", "expected {expected}", {"expected": self.expected})
        return value


Int = Annotated[int, BeforeValidator(_NoBool("a whole number"))]
Float = Annotated[float, BeforeValidator(_NoBool("a number"))]
M = TypeVar("M", bound=BaseModel)


def _bare_numbers(tp: Any) -> list[Any]:
    """``int`` / ``float`` inside ``tp`` not wrapped as :data:`Int` / :data:`Float`."""
    if tp in (int, float):
        return [tp]
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        marked = any(isinstance(getattr(m, "func", None), _NoBool) for m in meta)
        return [] if marked and base in (int, float) else _bare_numbers(base)
    if typing.get_origin(tp) is Literal:
        return []
    return [x for arg in typing.get_args(tp) for x in _bare_numbers(arg)]


def _accepts_bool(tp: Any) -> bool:
    """Whether a field's type takes true / false as such (bool, or a union with bool, or Any)."""
    if tp is bool or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _accepts_bool(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_bool(a) for a in typing.get_args(tp))
    return False


class Options(BaseModel):
    """Base of every option schema: unknown keys refused, no NaN / inf, numbers given as text
    accepted (lax), but true / false never taken for a number (whatever the field is annotated
    with: bare ``int`` / ``float`` are as safe as :data:`Int` / :data:`Float`), and not a number
    for a text option (give CLI text through :func:`parse_cli_value` with the schema, which
    leaves text options unparsed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            field = cls.model_fields.get(info.field_name or "")
            if field is not None and _bare_numbers(field.annotation) and not _accepts_bool(field.annotation):
                kind = "a whole number" if int in _bare_numbers(field.annotation) else "a number"
                raise PydanticCustomError("bool_not_number", "expected {expected}", {"expected": kind})
        return value


def _text_only(tp: Any) -> bool:
    """Whether a field takes text only (``str``, a Literal of strings, optionally None)."""
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin is Annotated:
        return _text_only(typing.get_args(tp)[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return origin in (typing.Union, types.UnionType) and bool(args) and all(_text_only(a) for a in args)


def parse_cli_value(raw: str, schema: type[BaseModel] | None = None, name: str | None = None) -> Any:
    """A command-line value: JSON when it parses (``0.2``, ``true``, ``[1, 2]``, ``"x"``), else
    the string. Given the schema and option name, a text-only option keeps the text as typed
    (``--option folder=2024`` is the folder "2024", not the number)."""
    field = schema.model_fields.get(name) if schema is not None and name is not None else None
    if field is not None and _text_only(field.annotation):
        return raw
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        value = raw
    if field is not None and _list_only(field.annotation) and not isinstance(value, list) and value is not None:
        # a list option written as the shell makes it easy: layers=1,2 or layers=3 (JSON [1, 2] works too)
        return [parse_cli_value(part.strip()) for part in str(raw).split(",") if part.strip()]
    return value


def _list_only(tp: Any) -> bool:
    """Whether an option's type is a list (or a list or None)."""
    origin = typing.get_origin(tp)
    if origin is list:
        return True
    if origin is Annotated:
        return _list_only(typing.get_args(tp)[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return origin in (typing.Union, types.UnionType) and len(args) == 1 and _list_only(args[0])


def _show(value: Any, limit: int = 60) -> str:
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(what: str, loc: tuple) -> str:
    """``what.field[2]`` from a pydantic location (union-member tags such as 'list[int]' dropped)."""
    out = what
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 0:
            out += f".{part}"
    return out


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a table",
    "literal": "one of the choices",
}


def _expected(kind: str) -> str:
    for prefix, words in _TYPE_WORDS.items():
        if kind.startswith(prefix):
            return words
    return ""


def _listy(err: dict) -> bool:
    """Whether an error comes from the list member of a union (or a list element)."""
    return any(isinstance(p, int) or (isinstance(p, str) and p.startswith(("list[", "tuple["))) for p in err["loc"][1:])


def _pick(errors: list[dict], values: dict[str, Any]) -> dict:
    """The error to report: the first field's; within a union, one from the member matching
    the input's shape (the list member for a list, a scalar member for a scalar)."""
    first = errors[0]
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    if len(same) == 1 or not first["loc"]:
        return first
    given = values.get(first["loc"][0])
    if isinstance(given, (list, tuple)):
        match = [e for e in same if _listy(e)]
    else:
        match = [e for e in same if not _listy(e) and e["type"] not in ("list_type", "tuple_type")]
    return (match or same)[0]


def _plain_message(kind: str, where: str, ctx: dict, got: str) -> str | None:
    """The message for a value missing, a bool given for a number, or a number not finite or not
    whole (the kinds with a fixed wording); None for any other kind."""
    if kind == "missing":
        return f"{where}: missing"
    if kind == "bool_not_number":
        return f"{where}: expected {ctx['expected']}, got {got}"
    if kind == "finite_number":
        return f"{where}: must be a finite number, got {got}"
    if kind == "int_from_float":
        return f"{where}: expected a whole number, got {got}"
    return None


def _message(err: dict, schema: type[BaseModel], what: str, noun: str) -> str:
    kind, ctx, loc = err["type"], err.get("ctx") or {}, tuple(err["loc"])
    got = _show(err.get("input"))
    if kind == "extra_forbidden":
        return f"{what}: unknown {noun} {loc[-1]!r} (known: {', '.join(schema.model_fields) or 'none'})"
    where = _where(what, loc)
    plain = _plain_message(kind, where, ctx, got)
    if plain is not None:
        return plain
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "less_than_equal": ("<=", "le"),
        "greater_than": (">", "gt"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        limit = ctx.get(key)
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"{where}: must be {op} {limit}, got {got}"
    if kind == "literal_error":
        return f"{where}: must be one of {str(ctx.get('expected', '')).replace(' or ', ', ')}, got {got}"
    if kind in ("too_short", "too_long"):
        return f"{where}: {err['msg'][0].lower() + err['msg'][1:]}"
    if kind == "value_error":
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    expected = _expected(kind)
    if expected:
        return f"{where}: expected {expected}, got {got}"
    return f"{where}: {err['msg'][0].lower() + err['msg'][1:]}, got {got}"


def describe_options(schema: type[BaseModel]) -> str:
    """``name (default value)`` for every option, for fix lines and listings."""
    parts = []
    for name, field in schema.model_fields.items():
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        default = "required" if field.is_required() else f"default {_show(value)}"
        parts.append(f"{name} ({default})")
    return ", ".join(parts) or "none"


def validate_options(
    schema: type[M], values: dict[str, Any], what: str, fix: str | None = None, noun: str = "parameter"
) -> M:
    """``schema(**values)``, or a :class:`WorkbenchError` naming ``what.option``, the problem and
    the value given (the first problem only). A field may carry its own fix as
    ``Field(json_schema_extra={"fix": "..."})``; else the fix lists the valid options."""
    if not isinstance(values, dict):
        raise WorkbenchError(
            f"{what} must be a table of name = value pairs, got {_show(values)}",
            fix or f"{what} options: {describe_options(schema)}",
        )
    try:
        return schema(**values)
    except ValidationError as exc:
        err = _pick(exc.errors(), values)
        name = err["loc"][0] if err["loc"] else None
        field = schema.model_fields.get(name) if isinstance(name, str) else None
        extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
        hint = extra.get("fix") or fix or f"{what} options: {describe_options(schema)}"
        raise WorkbenchError(_message(err, schema, what, noun), str(hint)) from None


def options_dict(options: BaseModel) -> dict[str, Any]:
    """Plain JSON-able values of validated options (for metadata and sweep unit keys)."""
    return options.model_dump(mode="json")


__all__ = ["Float", "Int", "Options", "describe_options", "options_dict", "parse_cli_value", "validate_options"]
