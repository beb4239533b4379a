"""A practitioner's kvpress loop over a grid of presses x compression ratios (runs in .venv-kvpress).

This script runs INSIDE the peer's own venv (``benchmarks/kvpress_peer/setup_venv.sh``: kvpress 0.5.5,
transformers 5.2.0, torch 2.13.0 CPU) and imports only kvpress, transformers, torch and the standard
library, never the workbench. ``benchmarks/bench_kv.py`` writes the items (token ids) from the main
venv, runs this file with the peer venv's python and compares the rows it writes.

What it does is kvpress' own pipeline (NVIDIA/kvpress, ``kvpress/pipeline.py``,
``KVPressTextGenerationPipeline._forward`` / ``generate_answer``), at the token-id level:

* question-agnostic (the pipeline's convention): prefill the context under ``with press(model):``,
  then feed the question with ``position_ids`` continuing the uncompressed positions, greedy-decode
  up to ``max_new_tokens`` (stop at EOS), remove the answer from the cache;
* question-aware (``evaluation/evaluate.py``'s ``compress_questions``: the question is moved into the
  compressed context): prefill context + question under the press; the first answer token comes
  from that prefill's last logits (the pipeline would need a non-empty question suffix instead);
* loss: prefill ``tokens[:N - T]`` under the press, teacher-force ``tokens[N - T:]`` against the
  compressed cache; mean NLL of the ``T - 1`` predictions of ``tokens[N - T + 1:]`` (the workbench
  grid's convention, ``workbench/kv/tasks.py``: every scored prediction reads the compressed cache).

With ``"score_answers": true`` in the items file, niah rows also get the answer's NLL (teacher-forced
after the question on the same compressed cache); off by default, so the timed loop does what the
workbench grid does and no more.

DuoAttentionPress with our own head scores: kvpress fetches DuoAttention patterns from GitHub for
six checkpoints only (``PATTERNS_DICT``); ``load_attention_pattern`` is memoised in the module-level
``cachetools.LRUCache`` ``kvpress.presses.duo_attention_press.cache`` keyed by
``model.config.name_or_path``, so putting ``(sink_size, recent_size, scores[L, Hkv])`` there under
that key makes ``post_init_from_model`` use them (and kvpress' own selection rule: the
``round(L * Hkv * head_compression_ratio)`` lowest scores become streaming heads).

Usage: python peer_loop.py ITEMS.json MODEL_DIR OUT.json [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from importlib.metadata import version

import torch
import torch.nn.functional as F
from kvpress import DuoAttentionPress, SnapKVPress, StreamingLLMPress
from kvpress.presses import duo_attention_press
from transformers import AutoModelForCausalLM, DynamicCache


def make_press(spec: dict, ratio: float, model) -> object | None:
    """One press object for one compression ratio (``None``: no press, the full cache)."""
    name = spec["name"]
    if name == "none":
        return None
    if name == "streaming_llm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=int(spec.get("n_sink", 4)))
    if name == "snapkv":
        return SnapKVPress(
            compression_ratio=ratio,
            window_size=int(spec.get("window_size", 64)),
            kernel_size=int(spec.get("kernel_size", 5)),
        )
    if name == "duo_attention":
        import numpy as np

        scores = np.asarray(spec["head_scores"], dtype=float)
        # kvpress memoises the GitHub pattern per checkpoint name: give it ours under that key
        duo_attention_press.cache[model.config.name_or_path] = (int(spec["sink"]), int(spec["recent"]), scores)
        return DuoAttentionPress(head_compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}")


def _ctx(press, model):
    import contextlib

    return press(model) if press is not None else contextlib.nullcontext()


def _positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).unsqueeze(0)


def _cache_lengths(cache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def _truncate(cache, lengths: list[int]) -> None:
    """kvpress' ``_remove_answer_from_cache`` (full-attention cache layers only)."""
    for layer, n in zip(cache.layers, lengths):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


def _nll(logits: torch.Tensor, targets: list[int]) -> list[float]:
    logp = F.log_softmax(logits.float(), dim=-1)
    return [-float(logp[i, t]) for i, t in enumerate(targets)]


def _greedy(model, cache, first: int, pos: int, max_new: int, eos: set[int]) -> list[int]:
    out = [first]
    while len(out) < max_new and out[-1] not in eos:
        logits = model(
            input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, position_ids=_positions(pos, 1)
        ).logits
        out.append(int(logits[0, -1].argmax()))
        pos += 1
    return out


def _kept(cache) -> list[int]:
    return _cache_lengths(cache)


def run_niah(model, item: dict, press, protocol: str, max_new: int, eos: set[int], score: bool = False) -> dict:
    """Compress, then greedy decoding (and with ``score`` the answer's teacher-forced NLL) on one cache."""
    ctx, q, ans = item["context"], item["question"], item["answer_ids"]
    cache = DynamicCache()  # as the pipeline does (no config: every layer a full DynamicLayer)
    nll: list[float] = []
    if protocol == "question-agnostic":
        with _ctx(press, model):
            model.model(input_ids=torch.tensor([ctx]), past_key_values=cache)
        kept = _kept(cache)
        c = len(ctx)
        # with ``score``, one forward of question + answer[:-1]: its logit at the question's end gives
        # the first answer token (greedy) and the answer's NLL comes from the same pass
        feed = q + ans[:-1] if score else q
        logits = model(
            input_ids=torch.tensor([feed]), past_key_values=cache, position_ids=_positions(c, len(feed))
        ).logits[0]
        first = int(logits[len(q) - 1].argmax())
        if score:
            nll = _nll(logits[len(q) - 1 :], ans)
            _truncate(cache, [n + len(q) for n in kept])
        start = c + len(q)
    else:
        with _ctx(press, model):
            logits0 = model(input_ids=torch.tensor([ctx + q]), past_key_values=cache, logits_to_keep=1).logits[0]
        kept = _kept(cache)
        first = int(logits0[-1].argmax())
        start = len(ctx) + len(q)
        if score:
            nll = _nll(logits0[-1:], ans[:1])
            if len(ans) > 1:
                feed, pos = torch.tensor([ans[:-1]]), _positions(start, len(ans) - 1)
                logits = model(input_ids=feed, past_key_values=cache, position_ids=pos).logits[0]
                nll += _nll(logits, ans[1:])
            _truncate(cache, kept)
    gen = _greedy(model, cache, first, start, max_new, eos)
    out = {"generated": gen, "kv_kept": kept, "press_compression_ratio": _reported(press)}
    if nll:
        out["loss"] = sum(nll) / len(nll)
    return out


def run_loss(model, item: dict, press) -> dict:
    """Prefill ``tokens[:N - T]`` under the press, feed the last ``T`` against the compressed cache;
    mean NLL of their ``T - 1`` next-token predictions (each one made from the compressed cache)."""
    tokens, t = item["tokens"], int(item["tail"])
    c = len(tokens) - t
    cache = DynamicCache()  # as the pipeline does
    with _ctx(press, model):
        model.model(input_ids=torch.tensor([tokens[:c]]), past_key_values=cache)
    kept = _kept(cache)
    logits = model(input_ids=torch.tensor([tokens[c:]]), past_key_values=cache, position_ids=_positions(c, t)).logits[0]
    nll = _nll(logits[:-1], tokens[c + 1 :])
    return {"loss": sum(nll) / len(nll), "kv_kept": kept, "press_compression_ratio": _reported(press)}


def _reported(press) -> float | None:
    if press is None:
        return 0.0
    if isinstance(press, DuoAttentionPress):
        return press.compression_ratio_
    return float(press.compression_ratio)


def _jobs(spec_all: dict) -> list[tuple[dict, float]]:
    jobs = [({"name": "none"}, 0.0)]
    for spec in spec_all["presses"]:
        jobs += [(spec, float(r)) for r in spec["ratios"]]
    return jobs


def _one(model, spec, ratio, task, item, protocol, max_new, eos, score=False) -> dict:
    row = {"item": item["id"], "task": task, "press": spec["name"], "ratio": ratio, "protocol": protocol}
    press = make_press(spec, ratio, model)
    try:
        with torch.inference_mode():
            if task == "niah":
                out = run_niah(model, item, press, protocol, max_new, eos, score)
            else:
                out = run_loss(model, item, press)
        row.update(out)
        if isinstance(press, DuoAttentionPress):
            row["streaming_mask"] = press.streaming_mask.int().tolist()
    except Exception as exc:  # a press that fails is a finding, not a crash of the grid
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=6)
    return row


def run(spec_all: dict, model) -> list[dict]:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    max_new = int(spec_all.get("max_new_tokens", 8))
    score = bool(spec_all.get("score_answers", False))
    rows = []
    for spec, ratio in _jobs(spec_all):
        for protocol in spec_all.get("protocols", ["question-agnostic"]):
            for item in spec_all.get("niah", []):
                rows.append(_one(model, spec, ratio, "niah", item, protocol, max_new, eos, score))
        for item in spec_all.get("loss", []):
            rows.append(_one(model, spec, ratio, "loss", item, "question-agnostic", max_new, eos))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.items) as f:
        spec_all = json.load(f)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = run(spec_all, model)
    wall = time.perf_counter() - t1
    out = {
        "rows": rows,
        "wall_seconds": wall,
        "load_seconds": t_load,
        "threads": torch.get_num_threads(),
        "versions": {
            "kvpress": version("kvpress"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model_class": type(model).__name__,
        "n_errors": sum("error" in r for r in rows),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"kvpress loop: {len(rows)} rows, {out['n_errors']} errors, {wall:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
