"""Rebuild ``workbench/inputs/code.jsonl.gz`` (the ``code`` dataset's corpus) from Python's standard library.

Run with CPython 3.11.7 (the version the shipped file was built from; another version gives other
sources, so the dataset's prompts would change)::

    python data/code/build.py

Source: the pure-Python modules listed in :data:`MODULES`, read from the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``), one document per module, the file's text as
is (comments and docstrings kept, trailing whitespace removed). The Python standard library is
distributed under the Python Software Foundation License Version 2 (Copyright (c) 2001 Python
Software Foundation; All Rights Reserved); each document records it in ``license``.

The output is one JSON object per line: ``{"id", "source", "license", "python", "text"}``,
gzip-compressed with a fixed mtime so rebuilding gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
import platform
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = "3.11.7"
LICENSE = "PSF-2.0 (Python Software Foundation License Version 2; Copyright (c) 2001 Python Software Foundation)"
# Ordinary application-style code: parsing, data structures, text and file handling, networking helpers.
MODULES = [
    "argparse.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "graphlib.py",
    "heapq.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "netrc.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
    "urllib/parse.py",
    "uuid.py",
    "wave.py",
]


def documents() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in MODULES:
        text = (root / name).read_text(encoding="utf-8")
        text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
        docs.append(
            {"id": f"stdlib/{name}", "source": "python-stdlib", "license": LICENSE, "python": PYTHON, "text": text}
        )
    return docs


def main() -> None:
    if platform.python_version() != PYTHON:
        raise SystemExit(f"run with Python {PYTHON} (this is {platform.python_version()}): the sources differ")
    docs = documents()
    out = HERE.parents[1] / "workbench" / "inputs" / "code.jsonl.gz"
    with open(out, "wb") as raw_f:
        with gzip.GzipFile(fileobj=raw_f, mode="wb", mtime=0, filename="") as gz:
            for d in docs:
                gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    n_lines = sum(d["text"].count("\n") for d in docs)
    print(f"{out}: {len(docs)} documents, {n_lines} lines")


if __name__ == "__main__":
    main()
