"""Config files (a sweep's TOML, a report's TOML): read whole, validated by a typed schema.

:func:`read_toml` reads and parses the file (a missing file or a syntax error is one error naming
it); :func:`validate_table` checks one table of it against a pydantic schema with the same rules
and messages as probe parameters and dataset options (:func:`workbench.protocol.params.validate_options`:
unknown keys refused, true / false never a number, the first problem named with its key and the
value given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import BaseModel

from workbench.errors import WorkbenchError
from workbench.protocol.params import validate_options

M = TypeVar("M", bound=BaseModel)


def read_toml(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """The parsed TOML file at ``path``; ``what`` names it in errors ("sweep config"), ``example``
    is the fix line for a syntax error."""
    file = Path(path)
    if not file.is_file():
        raise WorkbenchError(f"{what} {file} does not exist", "check the path")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{file} is not valid TOML: {exc}", example) from None


def validate_table(path: str | Path, schema: type[M], table: Any, where: str) -> M:
    """``table`` (the part of the file at ``where``: ``top level``, ``[executor]``) as ``schema``,
    or one error naming the file, the key and the problem."""
    return validate_options(schema, table, f"{path}: {where}", noun="key")
