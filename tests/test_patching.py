"""Patching: batched equals the plain serial way; identities that must hold exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from circuits.baseline import baseline, logit_diff, pair_batch
from circuits.patching import _VariantZPatcher, activation_patching, attribution_patching, path_patching
from circuits.tasks import Pair, make_pair, make_task, read_pairs
from tests.reference import serial_path_patching
from workbench.errors import WorkbenchError


def tiny_pairs(model, n=4, seed=0):
    """Random token pairs differing at two positions (lengths vary across pairs)."""
    import random

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        L = rng.randint(8, 14)
        clean = [rng.randrange(4, model.vocab_size) for _ in range(L)]
        corrupted = list(clean)
        for pos in rng.sample(range(L - 1), 2):
            corrupted[pos] = rng.randrange(4, model.vocab_size)
        a, b = rng.sample(range(4, model.vocab_size), 2)
        pairs.append(Pair(f"t{i}", clean, corrupted, a, b))
    return pairs


def test_logit_difference_is_the_models_own_under_a_final_soft_cap(tmp_path):
    """Gemma 2 soft-caps the head's logits (``c tanh(logit / c)``) after the unembedding: the
    logit difference every patching method reads is the one the model's own forward gives, on a
    padded batch of unequal lengths (a cap of 0.5 keeps every logit small, so leaving it out
    fails)."""
    from tests.tiny_gemma import gemma_config, save_tiny
    from workbench.models.loading import load_model

    cfg = gemma_config("gemma2")
    cfg.final_logit_softcapping = 0.5
    model = load_model(str(save_tiny(tmp_path, cfg)), device="cpu")
    pb = pair_batch(model, tiny_pairs(model))
    assert len(set(pb.clean.lengths.tolist())) > 1
    got = logit_diff(model, pb.clean, pb)
    with torch.no_grad():
        logits = model.hf_model(input_ids=pb.clean.input_ids, attention_mask=pb.clean.attention_mask).logits
    rows = torch.arange(pb.size)
    want = logits[rows, pb.last, pb.correct] - logits[rows, pb.last, pb.incorrect]
    assert torch.allclose(got, want, atol=1e-5)
    assert want.abs().max() < 1.0


@pytest.mark.parametrize("engine", ["graph", "hooks"])
@pytest.mark.parametrize("receivers", [None, [(2, 1, "q")], [(2, 3, "k"), (2, 3, "v")]])
def test_batched_path_patching_equals_serial(tiny_models, receivers, engine):
    model = tiny_models["llama"]
    pairs = tiny_pairs(model)
    senders = [(0, 0), (0, 3), (1, 1), (1, 2)]
    got = path_patching(
        model, pairs, senders=senders, receivers=receivers, max_rows=8, engine=engine
    )  # 2 senders per chunk
    want, ld_clean, ld_corrupted = serial_path_patching(model.source, pairs, senders, receivers)
    for r in got.itertuples():
        assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4
        # the normalised effect, compared un-normalised (the tiny model's clean - corrupted is ~1e-3)
        assert abs(r.value * (ld_clean - ld_corrupted) - (want[(r.layer, r.head)] - ld_clean)) < 1e-4
    assert got.ld.std() > 1e-3, "senders must differ in effect for the test to mean anything"


def test_clean_equals_corrupted_gives_zero_effect(tiny_models):
    """Freezing every head to the "corrupted" z changes nothing when that z is the clean one
    (a pair whose prompts are the same tokens is rejected, so the corrupted run is replaced)."""
    model = tiny_models["llama"]
    base = baseline(model, tiny_pairs(model))
    same = dataclasses.replace(base, z_corrupted=base.z_clean)
    masks = {layer: torch.ones(1, 1, model.n_heads, dtype=torch.bool) for layer in range(model.n_layers)}
    ld = logit_diff(model, same.pb.clean, same.pb, 1, [_VariantZPatcher(same, 1, masks, freeze=True)])
    assert (ld - base.ld_clean).abs().max() < 1e-5
    moved = logit_diff(model, base.pb.clean, base.pb, 1, [_VariantZPatcher(base, 1, masks, freeze=True)])
    assert (moved - base.ld_clean).abs().max() > 1e-3, "the real corrupted z must change the answer"


def test_patching_all_heads_and_embeddings_reproduces_corrupted(tiny_models):
    model = tiny_models["llama"]
    base = baseline(model, tiny_pairs(model, seed=3))
    masks = {layer: torch.ones(1, 1, model.n_heads, dtype=torch.bool) for layer in range(model.n_layers)}
    corrupted_embeds = model.hf_model.get_input_embeddings()(base.pb.corrupted.input_ids)
    h = model.hf_model.get_input_embeddings().register_forward_hook(lambda mod, a, out: corrupted_embeds)
    try:
        ld = logit_diff(model, base.pb.clean, base.pb, 1, [_VariantZPatcher(base, 1, masks, freeze=False)])
    finally:
        h.remove()
    assert (ld - base.ld_corrupted).abs().max() < 1e-4
    # the layer-0 residual input is the embeddings: patching it alone gives exactly -1
    res = activation_patching(model, base, component="resid_pre")
    assert abs(res[res.layer == 0].value.iloc[0] + 1) < 1e-4


def test_activation_patching_per_position_sums_and_cis(tiny_models):
    model = tiny_models["gpt2"]
    pairs = tiny_pairs(model, seed=5)
    base = baseline(model, pairs)
    allpos = activation_patching(model, base, heads=[(1, 2), (2, 0)], n_boot=200)
    assert {"ci_low", "ci_high"} <= set(allpos.columns)
    assert ((allpos.ci_low <= allpos.value + 1e-9) & (allpos.value <= allpos.ci_high + 1e-9)).all()
    per = activation_patching(model, base, heads=[(1, 2)], per_position=True)
    assert len(per) == base.pb.clean.input_ids.shape[1]
    for comp in ("attn_out", "mlp_out"):
        out = activation_patching(model, base, component=comp)
        assert len(out) == model.n_layers and out.value.notna().all()


def test_attribution_patching_tracks_exact_patching(tiny_models):
    from scipy.stats import spearmanr

    model = tiny_models["llama"]
    base = baseline(model, tiny_pairs(model, n=6, seed=7))
    exact = activation_patching(model, base)
    attr = attribution_patching(model, base)
    merged = exact.merge(attr, on=["layer", "head"], suffixes=("_exact", "_attr"))
    rho = spearmanr(merged.value_exact, merged.value_attr).statistic
    assert rho > 0.5, rho
    assert all(p.requires_grad for p in model.hf_model.parameters())


def _record_z(zs: dict, layer: int):
    """o_proj pre-hook that stores the layer's z (detached) in ``zs``: the corrupted run's z."""

    def hook(mod, args):
        zs[layer] = args[0].detach()

    return hook


def _keep_z(leaves: dict, layer: int):
    """o_proj pre-hook that keeps the layer's z in ``leaves`` with its grad retained, for dLD/dz."""

    def hook(mod, args):  # the total derivative: z stays in the graph, its grad retained
        args[0].retain_grad()
        leaves[layer] = args[0]

    return hook


def _plain_attribution(source, pairs) -> dict:
    """Attribution patching from its definition, one pair at a time on a plain eager HF model:
    dLD/dz . (z_corrupted - z_clean) summed over positions and the head's dimensions, averaged
    over pairs, divided by (mean LD_clean - mean LD_corrupted). z is o_proj's input."""
    from tests.reference import eager_model

    hf = eager_model(source)
    cfg = hf.config
    H, d = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for p in hf.parameters():
        p.requires_grad_(False)
    est, ld_c, ld_x = {}, [], []
    for pair in pairs:
        zs = {}
        hooks = [
            block.self_attn.o_proj.register_forward_pre_hook(_record_z(zs, layer))
            for layer, block in enumerate(hf.model.layers)
        ]
        with torch.no_grad():
            lx = hf(torch.tensor([pair.corrupted])).logits[0, -1]
        for h in hooks:
            h.remove()
        z_corr, leaves = dict(zs), {}
        hooks = [
            block.self_attn.o_proj.register_forward_pre_hook(_keep_z(leaves, layer))
            for layer, block in enumerate(hf.model.layers)
        ]
        hooks.append(hf.get_input_embeddings().register_forward_hook(lambda mod, a, out: out.requires_grad_(True)))
        lc = hf(torch.tensor([pair.clean])).logits[0, -1]
        ld = lc[pair.correct] - lc[pair.incorrect]
        ld.backward()
        for h in hooks:
            h.remove()
        ld_c.append(float(ld.detach()))
        ld_x.append(float(lx[pair.correct] - lx[pair.incorrect]))
        for layer, z in leaves.items():
            g = (z.grad * (z_corr[layer] - z.detach()))[0].reshape(-1, H, d).sum((0, 2))
            for h in range(H):
                est[(layer, h)] = est.get((layer, h), 0.0) + float(g[h]) / len(pairs)
    denom = sum(ld_c) / len(ld_c) - sum(ld_x) / len(ld_x)
    return {k: v / denom for k, v in est.items()}


def test_attribution_patching_equals_its_definition(tiny_models):
    """Per head, the batched estimate (padded pairs of unequal lengths, one backward) equals the
    first-order formula computed pair by pair with plain autograd."""
    model = tiny_models["llama"]
    pairs = tiny_pairs(model, n=5, seed=3)
    got = attribution_patching(model, pairs)
    want = _plain_attribution(model.source, pairs)
    scale = max(abs(v) for v in want.values())
    assert scale > 1e-3
    for r in got.itertuples():
        assert abs(r.value - want[(r.layer, r.head)]) < 1e-4 * max(1.0, scale), (
            r.layer,
            r.head,
            r.value,
            want[(r.layer, r.head)],
        )


def test_bad_patching_input(tiny_models, tmp_path):
    model = tiny_models["llama"]
    pairs = tiny_pairs(model)
    with pytest.raises(WorkbenchError, match="does not precede"):
        path_patching(model, pairs, senders=[(2, 0)], receivers=[(1, 0, "q")])
    with pytest.raises(WorkbenchError, match="no prompt pairs"):
        baseline(model, [])
    tok = model.tokenizer
    with pytest.raises(WorkbenchError, match="positions must align"):
        make_pair(tok, "x", "the king said", "the king said unto them", " king", " said")
    with pytest.raises(WorkbenchError, match="not one"):
        make_pair(tok, "x", "the king said", "the man said", " king said", " said")
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        json.dumps(
            {"id": "a", "clean": "the king said", "corrupted": "the man said", "correct": " king", "incorrect": " man"}
        )
        + "\n"
    )
    assert len(read_pairs(f, tok)) == 1
    with pytest.raises(WorkbenchError, match="unknown task"):
        make_task("nope", tok)


def test_discovery_faithfulness_and_overlap(tiny_models):
    from circuits.discovery import discover_circuit, faithfulness, label_roles, overlap

    model = tiny_models["llama"]
    base = baseline(model, tiny_pairs(model, n=4, seed=11))
    circ = discover_circuit(model, base, threshold=0.2, max_rounds=2, max_receivers=2)
    assert len(circ.nodes) > 0 and set(circ.edges.receiver) >= {"logits"}
    direct = path_patching(model, base)
    strong = {(int(r.layer), int(r.head)) for r in direct.itertuples() if abs(r.value) > 0.2}
    assert strong <= set(circ.heads)
    for e in circ.edges.itertuples():
        assert e.sender_layer < e.receiver_layer
    everything = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    full = faithfulness(model, base, everything)
    assert abs(full["faithfulness"] - 1) < 1e-6, "keeping every head keeps the clean LD"
    part = faithfulness(model, base, circ.heads)
    assert part["n_heads"] == len(circ.heads) and part["ld_clean"] == full["ld_clean"]
    roles = label_roles(circ, None, task="ioi")
    assert set(roles.role) <= {
        "name mover",
        "negative name mover",
        "S-inhibition",
        "name mover, feeds a logit head",
        "negative name mover, feeds a logit head",
        "other",
    }
    ov = overlap([(1, 1), (2, 3), (0, 0)], [(2, 3), (0, 0), (1, 2), (1, 3)])
    assert ov["jaccard"] == 2 / 5 and ov["recall_a_in_b"] == 2 / 3 and ov["recall_b_in_a"] == 0.5


# pairs in the tiny word-level vocabulary (its IOI names and colours are mostly [UNK])
TINY_PAIRS = [
    {"id": "a", "clean": "the king said", "corrupted": "the man said", "correct": " king", "incorrect": " man"},
    {"id": "b", "clean": "the old man said", "corrupted": "the good man said", "correct": " old", "incorrect": " good"},
    {"id": "c", "clean": "the great day", "corrupted": "the old day", "correct": " great", "incorrect": " old"},
    {"id": "d", "clean": "a dead man", "corrupted": "a good man", "correct": " dead", "incorrect": " good"},
]


def test_patch_cli(tmp_path, capsys):
    from workbench.cli import main
    from workbench.runs.parquet import read_parquet

    out = tmp_path / "p.parquet"
    pairs = tmp_path / "tiny_pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in TINY_PAIRS))
    assert main(["patch", "attribution", "--model", "tiny-llama", "--pairs", str(pairs), "--out", str(out)]) == 0
    df, meta = read_parquet(out)
    assert {"layer", "head", "value", "exact"} <= set(df.columns) and "spearman_vs_exact" in meta["summary"]
    assert (
        main(
            [
                "patch",
                "path",
                "--model",
                "tiny-llama",
                "--pairs",
                str(pairs),
                "--n-prompts",
                "3",
                "--receivers",
                "2.1.q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    df, _ = read_parquet(out)
    assert df.layer.max() < 2
    rc = main(["patch", "activation", "--model", "tiny-llama", "--task", "ioi", "--out", str(out)])
    assert rc == 2 and "fewer than 3 names" in capsys.readouterr().err
    rc = main(
        ["patch", "path", "--model", "tiny-llama", "--pairs", str(pairs), "--receivers", "9.1", "--out", str(out)]
    )
    assert rc == 2 and "not a head of this model" in capsys.readouterr().err
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        '{"clean": "the king said", "corrupted": "the king said unto them", "correct": " king", "incorrect": " said"}\n'
    )
    rc = main(["patch", "activation", "--model", "tiny-llama", "--pairs", str(bad), "--out", str(out)])
    assert rc == 2 and "positions must align" in capsys.readouterr().err
    bad.write_text("")
    rc = main(["patch", "activation", "--model", "tiny-llama", "--pairs", str(bad), "--out", str(out)])
    assert rc == 2 and "is empty" in capsys.readouterr().err


@pytest.mark.smollm2
def test_smollm2_ioi_and_path_patching_equals_serial(smollm2):
    pairs = make_task("ioi", smollm2.tokenizer, n=3, seed=1)
    base = baseline(smollm2, pairs)
    senders = [(23, 3), (20, 0), (9, 4), (0, 2)]
    got = path_patching(smollm2, base, senders=senders, engine="graph")
    full = path_patching(smollm2, base, senders=senders, engine="hooks")
    assert (got.ld - full.ld).abs().max() < 1e-5, "read-out-position engine = full recomputation"
    want, ld_clean, _ = serial_path_patching(smollm2.source, pairs, senders)
    for r in got.itertuples():
        assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4
    assert ld_clean > 2, "SmolLM2 solves IOI"
    for positions in ("all", "last"):
        got = path_patching(
            smollm2,
            base,
            senders=[(9, 4), (12, 1)],
            receivers=[(23, 3, "q"), (20, 0, "k")],
            positions=positions,
            engine="graph",
        )
        full = path_patching(
            smollm2,
            base,
            senders=[(9, 4), (12, 1)],
            receivers=[(23, 3, "q"), (20, 0, "k")],
            positions=positions,
            engine="hooks",
        )
        assert (got.ld - full.ld).abs().max() < 1e-5
    want, _, _ = serial_path_patching(smollm2.source, pairs, [(9, 4), (12, 1)], [(23, 3, "q")])
    got = path_patching(smollm2, base, senders=[(9, 4), (12, 1)], receivers=[(23, 3, "q")])
    for r in got.itertuples():
        assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4


@pytest.mark.smollm2
def test_task_export_round_trips(tmp_path, capsys):
    from transformers import AutoTokenizer

    from workbench.cli import main
    from workbench.models.embedded import ensure_embedded

    tok = AutoTokenizer.from_pretrained(ensure_embedded(quiet=True))
    out = tmp_path / "ioi.jsonl"
    assert main(["task", "ioi", "--model", "smollm2-135m", "--n-prompts", "5", "--seed", "2", "--out", str(out)]) == 0
    back = read_pairs(out, tok)
    orig = make_task("ioi", tok, n=5, seed=2)
    assert [(p.clean, p.corrupted, p.correct, p.incorrect) for p in back] == [
        (p.clean, p.corrupted, p.correct, p.incorrect) for p in orig
    ]
    assert main(["task", "ioi", "--model", "tiny-llama", "--out", str(tmp_path / "tiny.jsonl")]) == 2
    assert "fewer than 3 names" in capsys.readouterr().err and not (tmp_path / "tiny.jsonl").exists()
