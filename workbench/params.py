"""Typed, range-checked options: probe parameters, dataset options and sweep settings.

Every probe declares its parameters as a pydantic model (``Probe.Params``), every dataset its
options; the CLI (``--param sink.epsilon=0.2``), sweep configs (``[probe_params.sink]``) and
Python (``get_probe("sink", epsilon=0.2)``) all go through :func:`validate_options`, so a
value is checked by one rule wherever it comes from. A bad value becomes one
:class:`~workbench.errors.WorkbenchError` naming the option, what was expected and the fix:
wrong types (``"abc"`` for a number, ``true`` for a whole number), values outside their meaning
(a probability of 5, NaN, a negative count), unknown names and choices outside a ``Literal``.
"""
from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from workbench.errors import WorkbenchError

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base of every option schema: unknown names are errors, NaN/inf are not numbers,
    whole numbers stay whole (``true`` is not 1, ``2.5`` is not 2)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("expected a number, not true/false")
        return value


def parse_cli_value(raw: str) -> Any:
    """A command-line value: JSON when it parses as JSON (numbers, lists, true/false), else the
    string itself (so ``steps=all`` needs no quotes)."""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        return raw  # json accepts NaN/Infinity; keep them strings so validation names them
    return value


def _describe(err: dict[str, Any], what: str, schema: type[BaseModel]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(value)"
    name = f"{what}.{loc}" if what else loc
    kind = err.get("type", "")
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    known = ", ".join(schema.model_fields) or "none"
    if kind == "extra_forbidden":
        return f"unknown option {name!r}", f"known options: {known}"
    if kind == "missing":
        return f"missing option {name!r}", f"give {loc} (options: {known})"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{name} must be one of {expected}, got {shown}", f"use one of {expected}"
    if kind in ("finite_number",):
        return f"{name} must be a finite number, got {shown}", "give a real number (not NaN or infinity)"
    msg = str(err.get("msg", "invalid value")).rstrip(".").removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else "invalid value"
    field = schema.model_fields.get(str(err.get("loc", ("",))[0]))
    hint = f"{field.description}" if field is not None and field.description else f"options: {known}"
    return f"{name}: {msg}, got {shown}", hint


def validate_options(schema: type[M], values: dict[str, Any] | None, what: str = "") -> M:
    """Build ``schema`` from ``values`` or raise one :class:`WorkbenchError` for the first problem.

    ``what`` prefixes option names in messages (``"sink"`` -> ``sink.epsilon``).
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise WorkbenchError(f"{what or 'options'} must be a table of name = value, got {type(values).__name__}",
                             "write options as name = value pairs")
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        message, fix = _describe(exc.errors()[0], what, schema)
        raise WorkbenchError(message, fix) from None


def options_dict(options: BaseModel) -> dict[str, Any]:
    """Plain JSON-able values (for metadata and unit keys)."""
    return options.model_dump(mode="json")
