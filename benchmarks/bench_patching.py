"""Path patching of every SmolLM2-135M head as a sender to the logits: batched (ours) against
the serial implementation written the plain way (one sender and one prompt at a time, forward
hooks on o_proj of a plain transformers model, explicit freeze-and-patch runs), on the same IOI
prompts in the same process. Prints both times, the speed-up and the largest difference.

    python benchmarks/bench_patching.py [--n-prompts 8] [--senders all|N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--senders", default="all", help="all, or the first N heads in layer order (quicker)")
    args = ap.parse_args()
    import torch

    from circuits.patching import path_patching
    from circuits.tasks import make_task
    from tests.reference import serial_path_patching
    from workbench.models import load_model

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", device="cpu")
    pairs = make_task("ioi", model.tokenizer, n=args.n_prompts, seed=0)
    senders = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    if args.senders != "all":
        step = max(1, len(senders) // int(args.senders))
        senders = senders[::step][: int(args.senders)]
    t0 = time.perf_counter()
    ours = path_patching(model, pairs, senders=senders)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    serial, _, _ = serial_path_patching(model.source, pairs, senders)
    t_serial = time.perf_counter() - t0
    diff = max(abs(r.ld - serial[(r.layer, r.head)]) for r in ours.itertuples())
    print(f"{len(senders)} senders -> logits, {len(pairs)} IOI pairs, SmolLM2-135M, CPU float32")
    print(f"serial (one sender, one prompt per forward): {t_serial:.1f} s")
    print(f"batched (stacked variants, shared prefix):   {t_ours:.1f} s")
    print(f"speed-up {t_serial / t_ours:.1f}x; max |LD difference| {diff:.2e}")


if __name__ == "__main__":
    main()
