"""Rebuild ``prose.jsonl.gz`` from two public-domain texts packaged by Debian.

Run on a Debian machine (as root or with sudo for the apt step)::

    apt-get install -y bible-kjv dict-devil
    python data/prose/build.py

Sources (both public domain, copyright expired):
- The King James Version of the Bible (Debian ``bible-kjv-text``), one document per chapter,
  verse numbers removed, verses joined into running prose.
- Ambrose Bierce, *The Devil's Dictionary* (1911; Debian ``dict-devil``), the preface and
  the entries, one document per entry, headword kept as the first word.

The output is one JSON object per line: ``{"id", "source", "text"}``, gzip-compressed with a
fixed mtime so rebuilding gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def kjv_documents() -> list[dict]:
    raw = subprocess.run(["bible", "Genesis 1:1-Revelation 22:21"], capture_output=True, text=True, check=True).stdout
    docs: list[dict] = []
    chapter, verses = None, []

    def flush() -> None:
        if chapter and verses:
            text = " ".join(" ".join(verses).split())
            docs.append({"id": f"kjv/{chapter}", "source": "kjv", "text": text})

    for line in raw.splitlines():
        head = re.fullmatch(r"([1-3]?\s?[A-Za-z ]+) (\d+)", line.strip())
        if head and not line.startswith(" "):
            flush()
            chapter, verses = f"{head.group(1).strip()} {head.group(2)}", []
            continue
        m = re.match(r"\s+\d+ (.*)", line)
        if m:
            verses.append(m.group(1))
        elif line.strip():
            verses.append(line.strip())
    flush()
    return docs


def devil_documents() -> list[dict]:
    raw = gzip.open("/usr/share/dictd/devil.dict.dz", "rt", encoding="latin-1").read()
    start = raw.index("PREFACE")
    body = raw[start:]
    # Entries start with an upper-case headword followed by a comma or a period at line start.
    parts = re.split(r"\n(?=[A-Z][A-Z' -]+[,.] )", body)
    docs = []
    for i, part in enumerate(parts):
        text = " ".join(part.split())
        if len(text.split()) < 8:
            continue
        head = text.split(",")[0].split(".")[0][:40].strip().lower().replace(" ", "-")
        docs.append({"id": f"devil/{i:04d}-{head}", "source": "devil", "text": text})
    return docs


def main() -> None:
    docs = devil_documents() + kjv_documents()
    out = HERE.parents[1] / "workbench" / "inputs" / "prose.jsonl.gz"
    with open(out, "wb") as raw_f:
        with gzip.GzipFile(fileobj=raw_f, mode="wb", mtime=0, filename="") as gz:
            for d in docs:
                gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    n_words = sum(len(d["text"].split()) for d in docs)
    print(f"{out}: {len(docs)} documents, {n_words} words")


if __name__ == "__main__":
    main()
