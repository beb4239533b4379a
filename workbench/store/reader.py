"""Reading an activation store: memory-mapped, lazy, per layer and per prompt.

:func:`open_store` reads ``index.json`` and ``manifest.json`` only; shards are opened with
safetensors' ``safe_open`` (a memory map) the first time a tensor of theirs is read, and a read
touches only the rows asked for. :meth:`ActivationStore.dataset` is a ``torch.utils.data.Dataset``
of single-token rows for training a linear probe or a sparse autoencoder; it keeps no open file
when pickled, so ``DataLoader(num_workers=N)`` workers open their own maps.
"""

from __future__ import annotations

import bisect
import shlex
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from workbench.errors import WorkbenchError
from workbench.files.hashing import sha256_file
from workbench.store import layout


class ActivationStore:
    """An activation store on disk (see :mod:`workbench.store`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise WorkbenchError(
                f"activation store {self.path} does not exist", "give the --out folder of `workbench cache`"
            )
        self.index = layout.read_json(self.path / layout.INDEX, "index")
        if self.index.get("format") != layout.FORMAT:
            raise WorkbenchError(
                f"{self.path} is not a workbench activation store", "give the --out folder of `workbench cache`"
            )
        if int(self.index.get("version", 0)) > layout.VERSION:
            raise WorkbenchError(
                f"{self.path} was written by a newer workbench (store version {self.index.get('version')})",
                "upgrade the workbench to read it",
            )
        mpath = self.path / layout.MANIFEST
        self.manifest = layout.read_json(mpath, "manifest") if mpath.is_file() else {"complete": False, "shards": {}}
        self._by_id = {p["id"]: i for i, p in enumerate(self.index["prompts"])}
        self._starts = [p["offset"] for p in self.index["prompts"]]
        self._handles: dict[str, Any] = {}

    # -- what the store holds ------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete")) and all(
            s["name"] in self.manifest.get("shards", {}) for s in self.index["shards"]
        )

    @property
    def hooks(self) -> list[str]:
        return list(self.index["hooks"])

    @property
    def layers(self) -> list[int]:
        return list(self.index["layers"])

    @property
    def geometry(self) -> dict[str, Any]:
        return self.index["geometry"]

    @property
    def prompt_ids(self) -> list[str]:
        return [p["id"] for p in self.index["prompts"]]

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    @property
    def resume_command(self) -> str:
        """The ``workbench cache`` command that resumes this store, with ``--out`` naming where the
        store is now (it may have been moved since it was written)."""
        command = self.index.get("command")
        if not command:
            return "the `workbench cache` command that wrote it"
        try:
            words = shlex.split(str(command))
        except ValueError:
            return str(command)
        if "--out" in words[:-1]:
            words[words.index("--out") + 1] = str(self.path)
        return shlex.join(words)

    def require_complete(self) -> None:
        """Refuse an interrupted store, naming the command that finishes it."""
        if not self.complete:
            done, total = len(self.manifest.get("shards", {})), len(self.index["shards"])
            raise WorkbenchError(
                f"activation store {self.path} is incomplete ({done} of {total} shards written; "
                "the run that wrote it was interrupted)",
                f"resume it: {self.resume_command}",
            )

    def verify(self) -> list[str]:
        """Names of shards that are missing or fail their recorded size / SHA-256 (reads every byte)."""
        bad = []
        for s in self.index["shards"]:
            rec, path = self.manifest.get("shards", {}).get(s["name"]), self.path / layout.SHARDS / s["name"]
            if (
                not rec
                or not path.is_file()
                or path.stat().st_size != rec.get("size")
                or sha256_file(path) != rec.get("sha256")
            ):
                bad.append(s["name"])
        return bad

    def _check_shard(self, name: str, path: Path) -> None:
        """A shard is read only when it is the one the manifest recorded: present, of its size and
        of its SHA-256 (every byte is hashed once per process and shard: a shard changed in place,
        size unchanged, would otherwise give wrong numbers without a word)."""
        rec = self.manifest.get("shards", {}).get(name)
        if rec is None:
            raise WorkbenchError(
                f"shard {name} of {self.path} is not written yet (the run that wrote the store was interrupted)",
                f"resume the store: {self.resume_command}",
            )
        if not path.is_file():
            raise WorkbenchError(
                f"shard {name} of {self.path} is missing: the manifest records it, but the file is gone",
                f"resume the store to write it again: {self.resume_command}",
            )
        damage = (
            "has the wrong size"
            if path.stat().st_size != rec.get("size")
            else "fails its recorded SHA-256"
            if sha256_file(path) != rec.get("sha256")
            else None
        )
        if damage:
            raise WorkbenchError(
                f"shard {name} of {self.path} {damage}: it changed after it was written",
                f"delete it and resume the store: {self.resume_command}",
            )

    # -- reads ----------------------------------------------------------------------------------
    def _shard(self, s: int):
        name = self.index["shards"][s]["name"]
        handle = self._handles.get(name)
        if handle is None:
            from safetensors import safe_open

            path = self.path / layout.SHARDS / name
            self._check_shard(name, path)
            handle = self._handles[name] = safe_open(str(path), framework="pt")
        return handle

    def _entry(self, prompt: str | int) -> dict[str, Any]:
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            return self.index["prompts"][prompt]
        if prompt not in self._by_id:
            raise WorkbenchError(
                f"prompt {prompt!r} is not in {self.path}", f"its prompts: {', '.join(self.prompt_ids[:5])}, ..."
            )
        return self.index["prompts"][self._by_id[prompt]]

    def _check(self, hook: str, layer: int) -> None:
        if hook not in self.hooks:
            raise WorkbenchError(
                f"{self.path} holds hooks {','.join(self.hooks)}, not {hook}",
                f"cache it: workbench cache ... --hooks {hook}",
            )
        if layer not in self.layers:
            raise WorkbenchError(
                f"{self.path} holds layers {self.layers[0]}-{self.layers[-1]} ({len(self.layers)}), not {layer}",
                "cache it with --layers",
            )

    def get(self, hook: str, layer: int, prompt: str | int) -> Tensor:
        """One prompt's activations at one layer, ``[tokens, ...]`` in the store's dtype."""
        self._check(hook, layer)
        e = self._entry(prompt)
        return self._shard(e["shard"]).get_slice(layout.tensor_name(hook, layer))[e["row"] : e["row"] + e["n_tokens"]]

    def tokens(self, prompt: str | int) -> list[int]:
        e = self._entry(prompt)
        return self._shard(e["shard"]).get_slice("input_ids")[e["row"] : e["row"] + e["n_tokens"]].tolist()

    def meta(self, prompt: str | int) -> dict[str, Any]:
        return dict(self._entry(prompt).get("meta") or {})

    def row(self, hook: str, layer: int, token: int) -> Tensor:
        """The activation of the ``token``-th stored token (over all prompts, in order)."""
        if not 0 <= token < self.n_tokens:
            raise IndexError(token)
        e = self.index["prompts"][bisect.bisect_right(self._starts, token) - 1]
        r = e["row"] + token - e["offset"]
        return self._shard(e["shard"]).get_slice(layout.tensor_name(hook, layer))[r : r + 1][0]

    def dataset(self, hook: str = "resid_post", layer: int = 0) -> "TokenActivations":
        """A torch ``Dataset`` of the store's tokens at ``(hook, layer)``: item ``i`` is one row."""
        self.require_complete()
        self._check(hook, layer)
        return TokenActivations(self.path, hook, layer)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}: {self.index['model']}, {len(self.prompt_ids)} prompts, "
            f"{self.n_tokens} tokens, hooks {','.join(self.hooks)}, {len(self.layers)} layers, "
            f"{self.index['dtype']}{'' if self.complete else ', INCOMPLETE'})"
        )


class TokenActivations(Dataset):
    """Token rows of one (hook, layer) of a store, read lazily from the shards' memory maps."""

    def __init__(self, path: str | Path, hook: str, layer: int) -> None:
        self.store = ActivationStore(path)
        self.hook, self.layer = hook, layer

    def __len__(self) -> int:
        return self.store.n_tokens

    def __getitem__(self, i: int) -> Tensor:
        if i < 0:
            i += len(self)
        return self.store.row(self.hook, self.layer, i)


def open_store(path: str | Path) -> ActivationStore:
    """Open the activation store at ``path`` (reads only its index and manifest)."""
    return ActivationStore(path)
