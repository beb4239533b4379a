"""Writing an activation store: one forward per batch, activations captured in the attention hook.

:func:`cache_activations` plans the shards (whole prompts, in their given order, up to a byte
budget each), checks that the disk can hold what is left to write, writes ``index.json``, then
for each missing shard runs its prompts in padded batches (right padding, explicit positions,
as the pattern engine does) and keeps only the real positions of each prompt:

- ``q``, ``k``, ``v``: from the ``"workbench"`` attention hook (:mod:`workbench.engine.attention`),
  the tensors the kernel used, post-rotary where the model rotates;
- ``z``: the per-head output the same hook hands to ``Z`` readers (:mod:`workbench.engine.edits`);
- ``resid_pre`` / ``resid_post``: the bridge's ``hook_in`` / ``hook_out`` of each block (the
  block's input and output), or forward hooks on a plain HF block.

Every layer's mask is compared with the one the store will rebuild from its recorded geometry
(:func:`workbench.store.geometry.mask_agrees`); a disagreement is recorded in the manifest and
pattern probes refuse that layer. A shard is written to a temporary file, fsynced and renamed;
the manifest is updated after each, so a killed run resumes at the first missing shard and a
shard that fails its checksum is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from workbench.engine.attention import decoder_layers, hooked_run
from workbench.engine.call import AttentionCall
from workbench.engine.edits import ZReader
from workbench.errors import WorkbenchError
from workbench.files.atomic import WRITER_LOCK, check_folder, make_folder, one_writer
from workbench.files.hashing import sha256_file
from workbench.protocol.run_context import RunContext
from workbench.store import layout
from workbench.store.geometry import layer_geometry, mask_agrees, positional_encoding

DEFAULT_SHARD_BYTES = 256_000_000
MARGIN = 1.02  # safetensors headers, the index and manifest: well under 2 %
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def decoder_blocks(base: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of ``base`` (:func:`workbench.engine.attention.decoder_layers`), or one
    error naming what the store can capture without them."""
    blocks = decoder_layers(base)
    if not blocks:
        raise WorkbenchError(
            f"cannot find the decoder blocks of {type(base).__name__}", "cache q, k, v and z only (--hooks q,k,v,z)"
        )
    return blocks


@contextlib.contextmanager
def residual_hooks(
    base: torch.nn.Module, layers: Sequence[int], on_resid: Callable[[str, int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``on_resid("resid_pre" | "resid_post", layer, [batch, pos, d_model])`` for each block:
    the bridge's ``hook_in`` / ``hook_out`` where the block has them, else the block's own input
    and output."""
    handles = []
    blocks = decoder_blocks(base)
    for layer in layers:
        block = blocks[layer]
        if hasattr(block, "hook_in") and hasattr(block, "hook_out"):
            handles.append(
                block.hook_in.register_forward_hook(lambda m, a, out, L=layer: on_resid("resid_pre", L, out))
            )
            handles.append(
                block.hook_out.register_forward_hook(lambda m, a, out, L=layer: on_resid("resid_post", L, out))
            )
        else:

            def pre(m, args, kwargs, L=layer):
                on_resid("resid_pre", L, args[0] if args else kwargs["hidden_states"])

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(
                block.register_forward_hook(
                    lambda m, a, out, L=layer: on_resid("resid_post", L, out[0] if isinstance(out, tuple) else out)
                )
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Capture(ZReader):
    """The observer that copies each prompt's real positions into the shard's buffers."""

    def __init__(self, hooks: Sequence[str], layers: Sequence[int], geometry: dict[str, Any] | None = None) -> None:
        self.hooks, self.layers = set(hooks), set(layers)
        self.geometry = geometry
        self.buffers: dict[str, torch.Tensor] = {}
        self.rows: list[int] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.mismatch: dict[int, str] = {}
        self.calls: dict[int, AttentionCall] = {}  # the geometry probe keeps its calls

    def begin(self, rows: list[int], lengths: torch.Tensor) -> None:
        self.rows, self.lengths = rows, lengths.cpu()

    def _put(self, hook: str, layer: int, per_token: torch.Tensor) -> None:
        """``per_token``: [batch, pos, ...] of the batch; copies each prompt's real positions."""
        buf = self.buffers.get(layout.tensor_name(hook, layer))
        if buf is None:
            return
        for i, (row, n) in enumerate(zip(self.rows, self.lengths.tolist())):
            buf[row : row + n] = per_token[i, :n].to(buf.dtype)

    def on_attention(self, call: AttentionCall) -> None:
        if self.geometry is None:
            self.calls[call.layer] = call
            return
        if call.layer not in self.layers:
            return
        if call.layer not in self.mismatch and not mask_agrees(
            call, self.lengths, self.geometry["layers"][str(call.layer)]
        ):
            self.mismatch[call.layer] = "the mask the model used is not causal / sliding-window over real tokens"
        for hook, t in (("q", call.query), ("k", call.key), ("v", call.value)):
            if hook in self.hooks:
                self._put(hook, call.layer, t.detach().transpose(1, 2))  # [batch, pos, head, d]

    def read(self, call: AttentionCall, z: torch.Tensor) -> None:
        if self.geometry is not None and "z" in self.hooks and call.layer in self.layers:
            self._put("z", call.layer, z.detach())

    def on_resid(self, hook: str, layer: int, t: torch.Tensor) -> None:
        if hook in self.hooks:
            self._put(hook, layer, t.detach())


def _forward(model, ids: list[list[int]]):
    from workbench.engine.call import base_network
    from workbench.engine.patterns import collate
    from workbench.inputs.prompts import pad_token_id

    batch = collate(ids, pad_token_id(model.tokenizer), model.device)
    base_network(model.hf_model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.positions.clamp_min(0),
        use_cache=False,
    )
    return batch


def probe_geometry(model, ids: list[int]) -> dict[str, Any]:
    """The attention geometry of every layer, from one short forward."""
    cap = Capture([], [])
    d_model: list[int] = []
    base = _base(model)
    with hooked_run(model.hf_model, cap), residual_hooks(base, [0], lambda h, L, t: d_model.append(int(t.shape[-1]))):
        _forward(model, [ids[:2]])
    config = model.hf_model.config.get_text_config()
    layers = {str(L): layer_geometry(call, config) for L, call in sorted(cap.calls.items())}
    if not layers:
        raise WorkbenchError(
            f"{model.name}: no attention layer reached the workbench hook", "this architecture cannot be cached"
        )
    first = layers[min(layers, key=int)]
    return {
        "n_layers": model.n_layers,
        "n_heads": first["n_heads"],
        "n_kv_heads": first["n_kv_heads"],
        "head_dim": first["head_dim"],
        "v_head_dim": first["v_head_dim"],
        "d_model": d_model[0] if d_model else int(config.hidden_size),
        "positional": (pos := positional_encoding(model.hf_model)),
        "keys_post_rotary": pos == "rotary",
        "padding": "absent: only real positions are stored",
        "layers": layers,
    }


def _base(model) -> torch.nn.Module:
    from workbench.engine.call import base_network

    return base_network(model.hf_model)


def plan_shards(lengths: Sequence[int], token_bytes: int, shard_bytes: float) -> list[tuple[int, int]]:
    """Consecutive prompt ranges ``[a, b)`` of at most ``shard_bytes`` each (at least one prompt)."""
    out: list[tuple[int, int]] = []
    a, size = 0, 0
    for i, n in enumerate(lengths):
        if i > a and size + n * token_bytes > shard_bytes:
            out.append((a, i))
            a, size = i, 0
        size += n * token_bytes
    if lengths:
        out.append((a, len(lengths)))
    return out


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written whole or not at all (:func:`workbench.files.atomic.atomic_write_named`)."""
    from safetensors.torch import save_file

    from workbench.files.atomic import atomic_write_named

    atomic_write_named(
        path,
        lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": layout.FORMAT}),
    )


def _same_plan(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between the store on disk and the one asked for (None: the same)."""
    for key, what in (
        ("model_identity", "model"),
        ("tokenizer", "tokenizer"),
        ("hooks", "hooks"),
        ("layers", "layers"),
        ("dtype", "dtype"),
        ("model_dtype", "model dtype"),
        ("prompts", "prompts"),
        ("shards", "shard plan"),
        ("source", "dataset"),
    ):
        if old.get(key) != new.get(key):
            return what
    return None


def _checked_request(
    model, prompts: Sequence[Any], out: Path, hooks: Sequence[str], layers: Sequence[int] | None, dtype: str
) -> tuple[list[str], list[int]]:
    """The hooks (unique, in the order given) and layers (sorted) of a store, once the request is
    known to be sound: known hooks and dtype, layers of the model, prompts with unique ids, and an
    ``out`` that is new, empty or a store. Checked before anything runs or is written."""
    hooks = list(dict.fromkeys(hooks))
    bad = [h for h in hooks if h not in layout.HOOKS]
    if not hooks or bad:
        raise WorkbenchError(
            f"unknown hook(s) {', '.join(bad) or '(none given)'}", f"choose from {','.join(layout.HOOKS)}"
        )
    if dtype not in layout.STORE_DTYPES:
        raise WorkbenchError(f"unknown store dtype {dtype!r}", f"use {', '.join(layout.STORE_DTYPES)}")
    layers = sorted(set(range(model.n_layers) if layers is None else layers))
    wrong = [L for L in layers if not 0 <= L < model.n_layers]
    if not layers or wrong:
        raise WorkbenchError(
            f"layer(s) {wrong or '(none)'} outside 0-{model.n_layers - 1} of {model.name}",
            f"e.g. --layers 0-{model.n_layers - 1}",
        )
    if not prompts:
        raise WorkbenchError("no prompts to cache", "give a non-empty --prompts file or --dataset")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise WorkbenchError(
            f"prompt id {dup!r} appears twice; a store reads prompts by id", "give every prompt a unique id"
        )
    if out.is_dir() and any(p.name != WRITER_LOCK for p in out.iterdir()) and not (out / layout.INDEX).is_file():
        raise WorkbenchError(f"--out {out} is a non-empty folder that holds no store", "choose a new or empty folder")
    return hooks, layers


def _plan_layout(
    prompts: Sequence[Any], lengths: list[int], token_bytes: int, shard_bytes: float
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """Each prompt's first token in the store (and the total last), and the index's prompt and
    shard records for the shards :func:`plan_shards` cuts."""
    ranges = plan_shards(lengths, token_bytes, shard_bytes)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    plan_prompts, shards = [], []
    for s, (a, b) in enumerate(ranges):
        shards.append(
            {
                "name": layout.shard_name(s),
                "prompts": [a, b],
                "n_tokens": offsets[b] - offsets[a],
                "bytes": (offsets[b] - offsets[a]) * token_bytes,
            }
        )
        for i in range(a, b):
            plan_prompts.append(
                {
                    "id": prompts[i].id,
                    "n_tokens": lengths[i],
                    "offset": offsets[i],
                    "shard": s,
                    "row": offsets[i] - offsets[a],
                    "meta": prompts[i].meta,
                }
            )
    return offsets, plan_prompts, shards


def _resumed(out: Path, index: dict[str, Any], manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The index and manifest to go on with: the new ones, or, when ``out`` already holds a store,
    its own (refused unless it plans the same store as ``index``)."""
    if (out / layout.INDEX).is_file():
        old = layout.read_json(out / layout.INDEX, "index")
        differs = _same_plan(old, index)
        if differs:
            raise WorkbenchError(
                f"{out} holds a store of a different {differs}; it cannot be resumed with these settings",
                "choose another --out, or delete the folder to rebuild it",
            )
        index = old
        if (out / layout.MANIFEST).is_file():
            loaded = layout.read_json(out / layout.MANIFEST, "manifest")
            if isinstance(loaded.get("shards"), dict):
                manifest = {**manifest, **loaded}
    return index, manifest


def _verified_shards(
    shards: list[dict[str, Any]], records: dict[str, Any], shard_dir: Path
) -> dict[str, dict[str, Any]]:
    """The manifest's records of the planned shards whose files are on disk with the recorded size
    and checksum: the shards a resumed run need not write again."""
    done = {}
    for s in shards:
        rec, path = records.get(s["name"]), shard_dir / s["name"]
        if rec and path.is_file() and path.stat().st_size == rec.get("size") and sha256_file(path) == rec.get("sha256"):
            done[s["name"]] = rec
    return done


def _remove_stale(shard_dir: Path, todo: list[dict[str, Any]]) -> None:
    """Delete the temporary files of the shards still to write, left by a killed run."""
    for s in todo:  # a process killed inside _write_shard leaves its temp file: the shard is rewritten whole
        for stale in shard_dir.glob(f".{s['name']}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _progress_bar(todo: list[dict[str, Any]]):
    """A progress bar over the tokens of the shards still to write."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(s["n_tokens"] for s in todo), unit="tok", desc="cache", file=sys.stderr)


def cache_activations(model, prompts: Sequence[Any], out: str | Path, **options: Any) -> dict[str, Any]:
    """Write (or resume) the store at ``out`` for ``prompts`` (:class:`~workbench.inputs.prompts.TokenizedPrompt`);
    returns the manifest. Nothing is written when the input is bad or the disk too small.

    ``options`` (keywords): ``hooks`` (default ``("q", "k")``), ``layers`` (all), ``dtype``
    (``"float32"``), ``batch_size`` (``"auto"``), ``shard_bytes``, ``source``, ``command`` (the command
    that resumes it), ``progress``, ``log``. One writer per store: a second ``workbench cache`` into a
    store being written stops at once (``.writer.lock``, released when the writer ends or dies)."""
    out = check_folder(out, "--out folder")
    created = not out.exists()
    make_folder(out, "--out folder")
    try:
        with one_writer(
            out,
            f"activation store {out} is being written by another `workbench cache` right now",
            "wait for it to finish (then re-run to resume), or choose another --out",
        ):
            return _write_store(model, prompts, out, **options)
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {WRITER_LOCK}:  # bad input: leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_store(
    model,
    prompts: Sequence[Any],
    out: str | Path,
    *,
    hooks: Sequence[str] = ("q", "k"),
    layers: Sequence[int] | None = None,
    dtype: str = "float32",
    batch_size: int | str = "auto",
    shard_bytes: float = DEFAULT_SHARD_BYTES,
    source: dict[str, Any] | None = None,
    command: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """:func:`cache_activations` under the store's writer lock."""
    from workbench.models.device import run_halving_on_oom
    from workbench.models.loading import model_identity

    out = Path(out)
    hooks, layers = _checked_request(model, prompts, out, hooks, layers, dtype)

    geometry = probe_geometry(model, prompts[0].ids)
    itemsize = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
    token_bytes = layout.bytes_per_token(geometry, hooks, layers, itemsize)
    lengths = [len(p) for p in prompts]
    offsets, plan_prompts, shards = _plan_layout(prompts, lengths, token_bytes, shard_bytes)
    index = {
        "format": layout.FORMAT,
        "version": layout.VERSION,
        "model": model.name,
        "model_identity": model_identity(model.name),
        "model_info": model.describe(),
        "model_dtype": str(model.dtype).replace("torch.", ""),
        "tokenizer": layout.tokenizer_identity(model.tokenizer),
        "dtype": dtype,
        "hooks": hooks,
        "layers": layers,
        "shapes": {h: s for h, s in layout.token_shapes(geometry).items() if h in hooks},
        "geometry": geometry,
        "source": source or {},
        "n_prompts": len(prompts),
        "n_tokens": offsets[-1],
        "prompts": plan_prompts,
        "shards": shards,
        "command": command or "the same `workbench cache` command",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    index = json.loads(json.dumps(index, default=str))  # as it reads back: resumes compare like with like
    manifest: dict[str, Any] = {"format": layout.FORMAT, "complete": False, "shards": {}, "mask_mismatch": {}}
    index, manifest = _resumed(out, index, manifest)
    shard_dir = out / layout.SHARDS
    done = _verified_shards(shards, manifest["shards"], shard_dir)
    manifest["shards"] = done
    todo = [s for s in shards if s["name"] not in done]
    need = int(sum(s["bytes"] for s in todo) * MARGIN)
    free = _free_bytes(out)
    if need > free:
        raise WorkbenchError(
            f"the store needs about {layout.human_bytes(need)} more and {out} has {layout.human_bytes(free)} free",
            "free some space, choose another --out, or store less: "
            "fewer --hooks / --layers, --dtype float16, fewer prompts",
        )
    make_folder(shard_dir, "--out folder")
    _remove_stale(shard_dir, todo)
    if not (out / layout.INDEX).is_file():
        layout.write_json(out / layout.INDEX, index)
    manifest["complete"] = not todo
    layout.write_json(out / layout.MANIFEST, manifest)
    if done:
        log(f"resuming {out}: {len(done)} of {len(shards)} shards already written")
    log(
        f"caching {len(prompts)} prompts ({offsets[-1]} tokens), {', '.join(hooks)} x {len(layers)} layers as {dtype}: "
        f"{layout.human_bytes(need)} in {len(todo)} shard(s) -> {out}"
    )

    cap = Capture(hooks, layers, geometry)
    ctx = RunContext(batch_size=batch_size)
    bar = _progress_bar(todo) if progress else None
    t0 = time.perf_counter()
    try:
        with hooked_run(model.hf_model, cap), residual_hooks(_base(model), layers, cap.on_resid):
            for s in todo:
                a, b = s["prompts"]
                cap.buffers = {
                    layout.tensor_name(h, L): torch.empty((s["n_tokens"], *index["shapes"][h]), dtype=_DTYPES[dtype])
                    for h in hooks
                    for L in layers
                }
                rows = [offsets[i] - offsets[a] for i in range(a, b)]

                def run(idx: list[int], a: int = a, rows: list[int] = rows) -> None:
                    cap.begin([rows[i] for i in idx], torch.tensor([lengths[a + i] for i in idx]))
                    _forward(model, [prompts[a + i].ids for i in idx])
                    if bar is not None:
                        bar.update(sum(lengths[a + i] for i in idx))

                def too_big(i: int, a: int = a) -> WorkbenchError:
                    return WorkbenchError(
                        f"out of memory on a single prompt of {lengths[a + i]} tokens",
                        "use --model-dtype bfloat16 or shorter prompts",
                    )

                run_halving_on_oom(ctx.plan(lengths[a:b], model.device), run, model.device, too_big)
                tensors = dict(cap.buffers)
                tensors["input_ids"] = torch.tensor([t for i in range(a, b) for t in prompts[i].ids], dtype=torch.int32)
                path = shard_dir / s["name"]
                _write_shard(path, tensors)
                cap.buffers = {}
                manifest["shards"][s["name"]] = {
                    "size": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "n_tokens": s["n_tokens"],
                    "prompts": s["prompts"],
                }
                manifest["mask_mismatch"].update({str(k): v for k, v in cap.mismatch.items()})
                layout.write_json(out / layout.MANIFEST, manifest)
    finally:
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    manifest["total_bytes"] = sum(r["size"] for r in manifest["shards"].values())
    seconds = time.perf_counter() - t0
    manifest["last_run"] = {"seconds": round(seconds, 3), "tokens": sum(s["n_tokens"] for s in todo)}
    layout.write_json(out / layout.MANIFEST, manifest)
    return manifest
