"""A sweep's run folder: the parts of the current config, and nothing else.

**Units and keys.** A *unit* is one (model, dataset, probe). Its table is written atomically to
``parts/<model>__<dataset>__<probe>__<key>.parquet``; the key hashes everything that decides its
numbers (:meth:`Unit.identity`): the model's identity (a local folder's config and weights, a hub
snapshot), device type and dtype, the dataset and every option (incl. ``n_prompts`` and ``seed``),
a prompts file's content, ``prepend_bos``, the probe, its version and its parameters with
defaults filled in. ``batch_size`` is not in the key: a prompt's numbers do not depend on its
batch (tested to 1e-5).

**The run folder reports exactly its current config.** A re-run checks every existing part against
the checksum recorded in ``run.json`` (or, for a part written just before a kill, by reading it
whole), sets aside parts that are unreadable or that no current unit names (an earlier config) in
``superseded/<time>/``, says so, and computes what is missing. So a sweep killed at any point
(even SIGKILL) continues with nothing lost or duplicated, a corrupted part is recomputed, and
``load_results`` / ``query`` / ``report`` never mix two versions of a unit.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from workbench.files import targets
from workbench.runs.config import Unit

MANIFEST = "run.json"


# -- the run folder ---------------------------------------------------------------------------
def _readable(path: targets.Target) -> bool:
    from workbench.runs.parquet import read_table

    try:
        read_table(path)
        return True
    except Exception:
        return False


class RunFolder:
    """``OUT/parts/*.parquet`` plus ``OUT/run.json``: every finished part with its size and
    SHA-256; ``OUT/superseded/<time>/`` holds what was set aside. ``OUT`` is a path or an
    fsspec URL (:mod:`workbench.files.targets`)."""

    def __init__(self, out: str | Path) -> None:
        self.out = targets.as_target(out)
        self.parts = targets.join(self.out, "parts")
        self.manifest_path = targets.join(self.out, MANIFEST)
        self.manifest: dict[str, Any] = {"format": 1, "parts": {}}
        if targets.is_file(self.manifest_path):
            try:
                loaded = json.loads(targets.read_bytes(self.manifest_path))
                if isinstance(loaded, dict) and isinstance(loaded.get("parts"), dict):
                    self.manifest = loaded
            except (ValueError, OSError):
                pass  # a damaged manifest: every part is verified by reading it
        self._aside: targets.Target | None = None

    def save(self) -> None:
        targets.write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))

    def aside_dir(self) -> targets.Target:
        if self._aside is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            self._aside = targets.join(self.out, "superseded", stamp)
        return self._aside

    def set_aside(self, path: targets.Target, why: str) -> targets.Target:
        """Move a part to ``superseded/<time>/<why>/``: a rename on a file system; on an object
        store a copy and a delete, recorded under ``set_aside`` in ``run.json`` (a crash between
        the two leaves the part in both places, and the next run sets it aside again)."""
        name = targets.name(path)
        dest = targets.join(self.aside_dir(), why, name)
        targets.move(path, dest)
        self.manifest["parts"].pop(name, None)
        if targets.is_url(str(self.out)):
            self.manifest.setdefault("set_aside", []).append(
                {
                    "part": name,
                    "to": str(dest),
                    "why": why,
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
        return dest

    def is_sound(self, path: targets.Target) -> bool:
        """The part matches its recorded checksum; a part without a record (written just before
        a kill, or by an older version) must read whole, and is then recorded."""
        name = targets.name(path)
        entry = self.manifest["parts"].get(name)
        if entry is not None:
            return targets.size(path) == entry.get("size") and targets.sha256(path) == entry.get("sha256")
        if not _readable(path):
            return False
        self.manifest["parts"][name] = {"size": targets.size(path), "sha256": targets.sha256(path)}
        return True

    def record(self, info: dict[str, Any]) -> None:
        self.manifest["parts"][info["filename"]] = {k: v for k, v in info.items() if k != "filename"}
        self.save()

    def reconcile(self, units: list[Unit], log: Callable[[str], None]) -> tuple[set[str], dict[str, int]]:
        """Set aside parts no unit names and parts that are damaged; the names of sound parts."""
        wanted = {u.filename for u in units}
        moved = {"stale": 0, "corrupt": 0}
        sound: set[str] = set()
        for part in (targets.join(self.parts, n) for n in targets.list_names(self.parts, ".parquet")):
            if targets.name(part) not in wanted:
                self.set_aside(part, "stale")
                moved["stale"] += 1
            elif self.is_sound(part):
                sound.add(targets.name(part))
            else:
                self.set_aside(part, "corrupt")
                moved["corrupt"] += 1
        for name in list(self.manifest["parts"]):
            if name not in sound:
                self.manifest["parts"].pop(name)
        if moved["stale"]:
            log(
                f"set aside {moved['stale']} part(s) of an earlier config in {targets.join(self.aside_dir(), 'stale')} "
                "(this run reports its current config only)"
            )
        if moved["corrupt"]:
            log(
                f"set aside {moved['corrupt']} unreadable or damaged part(s) in "
                f"{targets.join(self.aside_dir(), 'corrupt')}; recomputing them"
            )
        self.save() if targets.is_dir(self.out) else None
        return sound, moved
