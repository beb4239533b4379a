"""Causal head gating: the workbench's fit against the reference package ``nam-causal-head-gating``
0.1.0 (PyPI) on the same model, task, data order and initial gates.

    python benchmarks/bench_gate.py [--model smollm2-135m] [--task aba] [--n 64] [--batch-size 32]
        [--inits 4] [--updates 3] [--f64-updates 4] [--cycles 2] [--threads 2]

Prints and writes ``benchmarks/results/gate_peer.json``:

1. **Agreement in float64** (model and gates in float64; the package's CPU autocast off; its
   mask parameters are float32 by construction, so its gates carry float32 rounding): the largest
   gate difference per stage after ``--f64-updates`` updates per stage.
2. **Where float32 differences come from**: the gradient of the first update from both
   implementations (relative difference), and Adam's first step: with ``lr = 1`` it is
   ``lr * g / (|g| + eps)``, about +-1 for every head however small its gradient, so heads whose
   gradient is at the level of float32 rounding (the two sides compute attention with different
   kernels: SDPA with an explicit padding mask here, without a mask there) may step in opposite
   directions. The count of heads with opposite first steps, and their largest |g|, is printed.
   The gates after ``--updates`` float32 updates per stage are compared too (max difference, and
   how many heads get a different role).
3. **The package as shipped** (``torch.amp.autocast("cpu")``: bfloat16 linear layers): gate and
   role differences against the workbench's float32 fit.
4. **Time per update**, in the same process, alternating (``--cycles``): the workbench in float32
   and in bfloat16 (model loaded in bf16), the package in float32 (autocast off) and as shipped
   (bf16 autocast). The package's loop is the baseline a practitioner would run. Speed-ups are
   ratios within a cycle (the machine's load drifts between cycles), their median reported.

Not measured: a GPU (the package's GradScaler and fp16 path on CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chg_peer import package_dataset, package_fit, unused_id  # noqa: E402


def _roles(g: dict) -> object:
    from circuits.gating.roles import head_roles

    return head_roles(g["positive"], g["negative"])


def _fit_ours(model, task, spec, init, order):
    from circuits.gating.fit import fit_head_gates

    t0 = time.perf_counter()
    fit = fit_head_gates(model, task, spec, init=init, order=order)
    return fit.gates, (time.perf_counter() - t0) / len(fit.history)


def first_gradients(model, hf, task, init, batch, spec) -> dict:
    """The first update's gradient (stage none) from the workbench and from the package."""
    from causal_head_gating.core.trainer import CHGTrainer

    from benchmarks.chg_peer import _no_autocast
    from circuits.gating.objective import gating_loss

    mine = init.clone().to(model.dtype).requires_grad_(True)
    loss, _, _ = gating_loss(model, [task[i] for i in batch], mine, 0.0)
    loss.backward()
    data = package_dataset(task, unused_id(task, hf.get_output_embeddings().weight.shape[0]))
    tr = CHGTrainer(hf, data, num_masks=init.shape[0], batch_size=spec.batch_size)
    with torch.no_grad():
        tr.mask_logits.copy_(init)
    b = data.collate_fn([data[i] for i in batch])
    with _no_autocast():
        ploss, _, _ = tr._get_loss(tr.mask_logits, b["input_ids"], b["loss_masks"], 0.0)
    ploss.backward()
    g1, g2 = mine.grad.double(), tr.mask_logits.grad.double()
    flips = torch.sign(g1) != torch.sign(g2)
    return {
        "loss_diff": abs(loss.item() - ploss.item()),
        "grad_rel_diff": float((g1 - g2).norm() / g2.norm()),
        "grad_max_abs": float(g2.abs().max()),
        "opposite_first_steps": int(flips.sum()),
        "largest_grad_among_opposite": float(g2.abs()[flips].max()) if flips.any() else 0.0,
        "n_gates": int(g2.numel()),
    }


PAIRS = {  # name -> (the package's run, the workbench's run): package time / workbench time
    "float32": ("package_float32", "workbench_float32"),
    "vs_shipped": ("package_shipped_bf16_autocast", "workbench_float32"),
    "bf16_vs_shipped": ("package_shipped_bf16_autocast", "workbench_bfloat16"),
}


def speedups(per_update: dict[str, list[float]]) -> dict[str, dict[str, object]]:
    """Package time over workbench time within each cycle (a shared machine's load changes between
    cycles, not within one), and their median."""
    out: dict[str, dict[str, object]] = {}
    for name, (theirs, ours) in PAIRS.items():
        per_cycle = [a / b for a, b in zip(per_update[theirs], per_update[ours])]
        out[name] = {"median": statistics.median(per_cycle), "per_cycle": per_cycle}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="aba")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--inits", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3, help="updates per stage of the float32 / timing fits")
    ap.add_argument("--f64-updates", type=int, default=4)
    ap.add_argument("--f64-batch", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gate_peer.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from circuits.gating.fit import GateSpec, batch_order
    from circuits.gating.gates import init_logits
    from circuits.gating.tasks import make_task
    from workbench.models.loading import load_model

    result: dict = {"model": args.model, "task": args.task, "n": args.n, "threads": args.threads}
    m64 = load_model(args.model, device="cpu", dtype=torch.float64)
    task = make_task(args.task, m64.tokenizer, n=args.n)
    hf64 = AutoModelForCausalLM.from_pretrained(m64.source, dtype=torch.float64)
    k, L, H = args.inits, m64.n_layers, m64.n_heads
    init = init_logits(k, L, H, seed=0)

    # 1. float64
    spec64 = GateSpec(updates=args.f64_updates, reg_updates=args.f64_updates, n_inits=k, batch_size=args.f64_batch)
    order64 = batch_order(len(task), args.f64_batch, 3 * args.f64_updates, 0)
    ours64, _ = _fit_ours(m64, task, spec64, init, order64)
    pk64 = package_fit(hf64, task, init, order64, spec64)
    result["float64"] = {
        "updates_per_stage": args.f64_updates,
        "batch_size": args.f64_batch,
        "max_gate_diff": {s: float((ours64[s] - pk64["gates"][s]).abs().max()) for s in ours64},
    }
    print("float64:", result["float64"])
    del m64, hf64

    # 2-4. float32, bf16, timing
    spec = GateSpec(updates=args.updates, reg_updates=args.updates, n_inits=k, batch_size=args.batch_size)
    order = batch_order(len(task), args.batch_size, 3 * args.updates, 0)
    m32 = load_model(args.model, device="cpu")
    hf32 = AutoModelForCausalLM.from_pretrained(m32.source, dtype=torch.float32)
    result["first_update"] = first_gradients(m32, hf32, task, init, order[0], spec)
    print("first update:", result["first_update"])
    mbf = load_model(args.model, device="cpu", dtype=torch.bfloat16)
    runs = {
        "workbench_float32": lambda: _fit_ours(m32, task, spec, init, order),
        "workbench_bfloat16": lambda: _fit_ours(mbf, task, spec, init, order),
        "package_float32": lambda: package_fit(hf32, task, init, order, spec),
        "package_shipped_bf16_autocast": lambda: package_fit(hf32, task, init, order, spec, autocast=True),
    }
    per_update: dict[str, list[float]] = {name: [] for name in runs}
    gates: dict[str, dict] = {}
    names = list(runs)
    for c in range(args.cycles):
        for name in names[c % len(names) :] + names[: c % len(names)]:
            out = runs[name]()
            if isinstance(out, tuple):
                gates[name], t = out
            else:
                gates[name], t = out["gates"], out["per_update"]
            per_update[name].append(t)
            print(f"cycle {c} {name}: {t:.2f} s/update", flush=True)
    ref = gates["workbench_float32"]
    ref_roles = _roles(ref)
    result["float32_updates_per_stage"] = args.updates
    result["agreement_vs_workbench_float32"] = {
        name: {
            "max_gate_diff": {s: float((g[s] - ref[s]).abs().max()) for s in ref},
            "role_differences": int((_roles(g) != ref_roles).sum()),
        }
        for name, g in gates.items()
        if name != "workbench_float32"
    }
    result["seconds_per_update"] = {name: {"min": min(ts), "all": ts} for name, ts in per_update.items()}
    result["speedup_vs_package"] = speedups(per_update)
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
