"""Retrieval heads as the context grows: niah accuracy by length and depth, retrieval scores,
top heads per length, peak memory of the decoding path.

For each context length (its own process, so the peak RSS is that length's), the niah grid of
``--depths`` is decoded greedily by the retrieval probe (exactly what ``workbench probe retrieval
--dataset niah --context-len L`` runs) and summarised into a small JSON file: accuracy by depth,
each head's mean score over the correctly answered prompts, the share of heads above 0.1, the
top heads, and the peak RSS. ``notebooks/07_long_context.ipynb`` reads that file.

    python benchmarks/retrieval_longctx.py --model smollm2-135m --lengths 1024,2048,4096,8000
    python benchmarks/retrieval_longctx.py --model gemma3-270m --lengths 4096,8192,16384
    python benchmarks/retrieval_longctx.py --model gemma3-270m --lengths 32000 --depths 0.5

``niah`` prompts start with the tokenizer's default prefix (BOS for Gemma, which it needs to
answer at all; nothing for SmolLM2). Lengths already in the output file are skipped, so a
grid can be extended run by run (each length records the depths it ran).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(model_name: str, length: int, depths: list[float], seed: int, max_new_tokens: int) -> dict:
    import torch

    from probes import get_probe
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.loading import load_model
    from workbench.runner import run_probes

    torch.set_grad_enabled(False)
    model = load_model(model_name, device="cpu", dtype="float32")
    items = make_dataset(
        "niah", tokenizer=model.tokenizer, context_len=length, depths=depths, seed=seed, n_ctx=model.n_ctx
    )
    prompts = tokenize_prompts(items, model.tokenizer, model.n_ctx, model.vocab_size)
    probe = get_probe("retrieval", max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    result = run_probes(model, prompts, [probe], batch_size=1, progress=False)
    seconds = time.perf_counter() - t0
    table = result.table
    counted = [o for o in probe.outcomes if o.counted]
    by_prompt = {p.id: p for p in prompts}
    return {
        "length": length,
        "tokens": [len(p) for p in prompts],
        "seconds": seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "prompts": [
            {
                "id": o.prompt_id,
                "depth": by_prompt[o.prompt_id].meta["depth"],
                "answer": by_prompt[o.prompt_id].meta["answer"],
                "response": o.response,
                "recall": o.recall,
                "counted": o.counted,
            }
            for o in probe.outcomes
        ],
        "n_counted": len(counted),
        # mean score per head over the correctly answered prompts, [layer][head] (None: nothing counted)
        "scores": None
        if not counted
        else table.pivot(index="layer", columns="head", values="value").values.round(5).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048,4096,8000")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON file (default data/results/longctx_retrieval_MODEL.json)")
    args = ap.parse_args()
    depths = [float(x) for x in args.depths.split(",")]
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, depths, args.seed, args.max_new_tokens)))
        return
    out = Path(args.out or ROOT / "data" / "results" / f"longctx_retrieval_{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = (
        json.loads(out.read_text())
        if out.exists()
        else {"model": Path(args.model).name, "depths": depths, "lengths": []}
    )
    have = {r["length"] for r in done["lengths"]}
    for length in [int(x) for x in args.lengths.split(",")]:
        if length in have:
            print(f"L={length}: already in {out}")
            continue
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(length),
            "--model",
            args.model,
            "--depths",
            args.depths,
            "--seed",
            str(args.seed),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"L={length}: failed: {why}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        done["lengths"] = sorted(done["lengths"] + [r], key=lambda x: x["length"])
        out.write_text(json.dumps(done, separators=(",", ":")))
        acc = sum(p["recall"] > 0.5 for p in r["prompts"]) / len(r["prompts"])
        print(
            f"L={length}: accuracy {acc:.0%} ({r['n_counted']} counted), {r['seconds']:.0f} s, "
            f"peak {r['peak_gb']:.2f} GB; "
            f"answers {[p['response'] for p in r['prompts']]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
