"""Circuits: ablations, faithfulness / completeness / minimality, the explicit graph, edge
scores and edge circuits, each against a slow recomputation from the definition."""

from __future__ import annotations

import json
import random

import pytest
import torch

from circuits.ablation import ABLATIONS, make_ablation, reference_sources
from circuits.baseline import baseline
from circuits.edges import circuit_ld, edge_attribution, exact_edge_effects, prune_dead
from circuits.faithfulness import Evaluator, completeness, faithfulness, head_curve, minimality, prune_heads
from circuits.graph import ModelGraph, graph_for
from circuits.patching import path_patching
from circuits.tasks import Pair
from tests.reference import (
    eager_model,
    reference_edge_circuit_ld,
    reference_head_ablation_ld,
    reference_outputs,
    serial_path_patching,
)
from workbench.errors import WorkbenchError


def template_pairs(model, n: int, seed: int, lengths=(9, 12)) -> list[Pair]:
    """Random token pairs in ``len(lengths)`` templates (one length each; corrupted differs from
    clean at two positions), the template recorded in meta like the IOI task does."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        t = i % len(lengths)
        clean = [rng.randrange(4, model.vocab_size) for _ in range(lengths[t])]
        corrupted = list(clean)
        for pos in rng.sample(range(lengths[t] - 1), 2):
            corrupted[pos] = rng.randrange(4, model.vocab_size)
        a, b = rng.sample(range(4, model.vocab_size), 2)
        pairs.append(Pair(f"s{seed}-{i}", clean, corrupted, a, b, {"template": t}))
    return pairs


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def hf_llama(llama):
    return eager_model(llama.source)


@pytest.fixture(scope="module")
def setup(llama):
    pairs, ref = template_pairs(llama, 4, seed=1), template_pairs(llama, 6, seed=2)
    return pairs, ref, baseline(llama, pairs)


def _replacement_z(hf, mode: str, b: int, pair: Pair, ref: list[Pair], sources) -> dict:
    """The hand-written replacement z per layer ([T, H*d]) for pair ``b``."""
    if mode == "zero":
        return {layer: torch.zeros_like(z) for layer, z in reference_outputs(hf, pair.clean)["z"].items()}
    if mode == "corrupted":
        return reference_outputs(hf, pair.corrupted)["z"]
    if mode == "resample":
        (i,) = sources[b]
        assert ref[i].meta["template"] == pair.meta["template"] and ref[i].corrupted != pair.corrupted
        return reference_outputs(hf, ref[i].corrupted)["z"]
    members = [r for r in ref if r.meta["template"] == pair.meta["template"]]
    assert members and all(len(r.corrupted) == len(pair.clean) for r in members)
    zs = [reference_outputs(hf, r.corrupted)["z"] for r in members]
    return {layer: sum(z[layer] for z in zs) / len(zs) for layer in zs[0]}


@pytest.mark.parametrize("mode", ABLATIONS)
def test_head_ablation_equals_hand_written_o_proj_hooks(llama, hf_llama, setup, mode):
    pairs, ref, base = setup
    abl = make_ablation(llama, base, mode, reference=ref, seed=3)
    ev = Evaluator(llama, base, abl, max_rows=8)  # several stacked variants per forward
    sets = [{(0, 1), (1, 0), (2, 3)}, {(0, 1), (1, 0), (2, 1)}, {(1, 2)}, set(ev.all)]
    ev.lds(sets[:2])  # these two agree below layer 2: computed once up to there, then forked
    ev.lds(sets)
    for b, p in enumerate(pairs):
        z_rep = _replacement_z(hf_llama, mode, b, p, ref, abl.sources)
        for s in sets:
            want = reference_head_ablation_ld(hf_llama, p, s, z_rep)
            assert abs(float(ev.per_prompt[frozenset(s)][b]) - want) < 1e-4, (mode, b, s)
    moved = max(abs(float(ev.per_prompt[frozenset(sets[3])][b] - base.ld_clean[b])) for b in range(len(pairs)))
    assert moved > 1e-3, "ablating every head must change the LD for the test to mean anything"


def test_reference_sources_and_their_errors(llama):
    pairs, ref = template_pairs(llama, 4, seed=1), template_pairs(llama, 6, seed=2)
    mean = reference_sources(pairs, ref, "mean")
    assert all(
        all(ref[i].meta["template"] == p.meta["template"] for i in src) and len(src) == 3 for p, src in zip(pairs, mean)
    )
    # resampling from the pairs themselves never takes a pair's own corrupted prompt
    own = reference_sources(pairs, pairs, "resample", seed=5)
    assert all(pairs[src[0]].corrupted != p.corrupted for p, src in zip(pairs, own))
    lonely = template_pairs(llama, 1, seed=7, lengths=(15,))
    with pytest.raises(WorkbenchError, match="no reference prompt shares its template"):
        reference_sources(lonely, ref, "mean")
    with pytest.raises(WorkbenchError, match="no other reference prompt"):
        reference_sources(lonely, lonely, "resample")
    with pytest.raises(WorkbenchError, match="unknown ablation"):
        make_ablation(llama, baseline(llama, pairs), "median")


def test_faithfulness_completeness_minimality_follow_their_definitions(llama, setup):
    pairs, ref, base = setup
    ev = Evaluator(llama, base, make_ablation(llama, base, "mean", ref))
    C = [(0, 0), (1, 1), (2, 2), (2, 3)]
    f = faithfulness(ev, C)
    F = lambda kept: ev.F(kept)  # noqa: E731
    assert f["ld_clean"] == pytest.approx(float(base.ld_clean.mean()))
    assert f["faithfulness"] == pytest.approx(F(C) / f["ld_clean"])
    assert f["ld_all_heads_ablated"] == pytest.approx(F([]))
    lo, hi = f["ci95"]
    assert lo <= f["faithfulness"] <= hi and hi > lo
    assert faithfulness(ev, ev.all)["faithfulness"] == pytest.approx(1.0)
    comp = completeness(ev, C, n_random=5, greedy_steps=2, seed=1)
    M = ev.all
    for r in comp["records"]:
        K = set(map(tuple, r["K"]))
        assert K <= set(C)
        assert r["score"] == pytest.approx(abs(F(set(C) - K) - F(M - K)))
    assert comp["records"][0]["kind"] == "empty" and comp["records"][0]["score"] == pytest.approx(abs(F(C) - F(M)))
    first = next(r for r in comp["records"] if r["kind"] == "greedy")
    best = max(abs(F(set(C) - {v}) - F(M - {v})) for v in C)
    assert first["score"] == pytest.approx(best) and first["size"] == 1
    mini = minimality(ev, C, n_random=4, seed=2)
    for r in mini.itertuples():
        v = (r.layer, r.head)
        assert r.score_alone == pytest.approx(abs(F(set(C) - {v}) - F(C)))
        K = set(map(tuple, r.K))
        assert (
            v not in K
            and r.score == pytest.approx(abs(F(set(C) - K - {v}) - F(set(C) - K)))
            and r.score >= r.score_alone - 1e-12
        )
    assert mini.score.max() > 1e-4
    # an empty circuit (the target met with every head ablated) is a result, not a crash
    empty = minimality(ev, [], n_random=2)
    assert empty.empty and {"layer", "head", "score_alone", "score", "relative"} <= set(empty.columns)
    assert completeness(ev, [], n_random=2, greedy_steps=2)["records"][0]["score"] == pytest.approx(abs(F([]) - F(M)))


def test_head_curve_finds_the_smallest_prefix_and_pruning_keeps_the_target(llama, setup):
    pairs, ref, base = setup
    ev = Evaluator(llama, base, make_ablation(llama, base, "mean", ref))
    ranking = sorted(ev.all)
    curve, k = head_curve(ev, ranking, sizes=[0, 3, 6, 12], target=0.5)
    assert curve.k.iloc[-1] == 12 and curve.faithfulness.iloc[-1] == pytest.approx(1.0)
    assert k is not None and ev.F(ranking[:k]) / ev.ld_clean >= 0.5
    if k > 0:
        assert ev.F(ranking[: k - 1]) / ev.ld_clean < 0.5, "bisection stops at the first size over the target"
    kept = prune_heads(ev, ranking[:k], 0.5)
    assert set(kept) <= set(ranking[:k]) and ev.F(kept) / ev.ld_clean >= 0.5


# -- the explicit graph ------------------------------------------------------------------------
def test_graph_forward_equals_the_model(llama, tiny_models):
    from tests.test_patching import tiny_pairs

    base = baseline(llama, tiny_pairs(llama, n=5, seed=3))  # unequal lengths: padded batch
    g = ModelGraph(llama)
    pb = base.pb
    with torch.no_grad():
        ld = g.logit_diff(pb.clean, pb.last, pb.correct, pb.incorrect)
    assert (ld - base.ld_clean).abs().max() < 1e-5
    assert g.n_edges == int(g.edge_mask().sum()) and g.downstream_name(g.logits_input) == "logits"
    assert g.upstream_name(g.head_node(2, 3)) == "a2.3" and g.downstream_name(g.k_input(1, 1)) == "a1.1.k"
    with pytest.raises(WorkbenchError, match="Llama-family"):
        ModelGraph(tiny_models["gpt2"])
    assert graph_for(tiny_models["gpt2"]) is None


@pytest.mark.parametrize(
    "receivers,positions",
    [
        (None, "all"),
        ([(2, 1, "q")], "all"),
        ([(2, 3, "k"), (2, 3, "v")], "all"),
        ([(1, 0, "q"), (2, 2, "v")], "all"),
        ([(2, 1, "q")], "last"),
        ([(2, 3, "k"), (2, 0, "v")], "last"),
        ([(1, 0, "q"), (2, 2, "v")], "last"),
    ],
)
def test_read_out_positions_path_patching_equals_full_recomputation(llama, receivers, positions):
    """The fast engine (read-out positions only, no attention between sender and receiver)
    against full forwards through the attention hook and the serial plain-HF loop."""
    from tests.test_patching import tiny_pairs

    pairs = tiny_pairs(llama, n=4, seed=2)  # unequal lengths: the read-out position differs per row
    base = baseline(llama, pairs)
    first = min((r[0] for r in receivers or []), default=llama.n_layers)
    senders = [(layer, h) for layer in range(first) for h in range(llama.n_heads)]
    fast = path_patching(
        llama, base, senders=senders, receivers=receivers, engine="graph", max_rows=8, positions=positions
    )
    full = path_patching(
        llama, base, senders=senders, receivers=receivers, engine="hooks", max_rows=8, positions=positions
    )
    assert (fast.ld - full.ld).abs().max() < 1e-5
    assert (fast.value - full.value).abs().max() < 1e-4
    assert fast.ld.std() > 1e-4
    if positions == "last" and first < llama.n_layers - 1:  # in the last layer only the read-out query matters anyway
        every = path_patching(llama, base, senders=senders, receivers=receivers, engine="graph", positions="all")
        assert (every.ld - fast.ld).abs().max() > 1e-6, "patching one position must differ from patching all"
    want, _, _ = serial_path_patching(llama.source, pairs, senders[:3], receivers, last_only=positions == "last")
    for r in fast.head(3).itertuples():
        assert abs(r.ld - want[(r.layer, r.head)]) < 1e-4


# -- edges ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edge_setup(llama, setup):
    pairs, ref, base = setup
    g = graph_for(llama)
    return g, base, make_ablation(llama, base, "mean", ref, graph=g)


def test_edge_circuit_equals_head_by_head_recomputation(llama, hf_llama, setup, edge_setup):
    pairs, ref, _ = setup
    g, base, abl = edge_setup
    gen = torch.Generator().manual_seed(0)
    keep = (torch.rand(g.n_downstream, g.n_upstream, generator=gen) < 0.6) & g.edge_mask()
    got = circuit_ld(g, base, abl, keep)
    names = {(g.downstream_name(v), g.upstream_name(u)) for v, u in keep.nonzero().tolist()}
    outs = [reference_outputs(hf_llama, r.corrupted)["outputs"] for r in ref]
    for b, p in enumerate(pairs):
        members = [o for o, r in zip(outs, ref) if r.meta["template"] == p.meta["template"]]
        ablated = {name: sum(o[name] for o in members) / len(members) for name in members[0]}
        assert abs(float(got[b]) - reference_edge_circuit_ld(hf_llama, p, names, ablated)) < 1e-4
    full = circuit_ld(g, base, abl, g.edge_mask())
    assert (full - base.ld_clean).abs().max() < 1e-5, "keeping every edge is the clean run"
    assert (got - base.ld_clean).abs().max() > 1e-3


def test_removing_a_heads_out_edges_is_ablating_the_head(llama, edge_setup):
    g, base, abl = edge_setup
    S = [(0, 1), (1, 2), (2, 0)]
    keep = g.edge_mask().clone()
    for layer, h in S:
        keep[:, g.head_node(layer, h)] = False
    ev = Evaluator(llama, base, abl)
    ev.lds([S])
    assert (circuit_ld(g, base, abl, keep) - ev.per_prompt[frozenset(S)]).abs().max() < 1e-5


def test_exact_edge_effects_equal_the_circuit_without_that_edge(edge_setup):
    g, base, abl = edge_setup
    gen = torch.Generator().manual_seed(1)
    all_edges = g.edge_mask().nonzero().tolist()
    edges = [tuple(all_edges[i]) for i in torch.randperm(len(all_edges), generator=gen)[:12].tolist()]
    edges.append((g.logits_input, g.mlp_node(g.L - 1)))
    got = exact_edge_effects(g, base, abl, edges, max_rows=8)
    for (v, u), row in zip(edges, got):
        keep = g.edge_mask().clone()
        keep[v, u] = False
        assert (row - circuit_ld(g, base, abl, keep)).abs().max() < 1e-5
    assert (got - base.ld_clean).abs().max() > 1e-4


def test_eap_is_the_derivative_of_the_edge_circuit(llama, setup):
    """In float64: EAP(u -> v) = -dLD/dk for the weight k of edge (v, u) (central differences)."""
    pairs, ref, base = setup
    g = ModelGraph(llama, dtype=torch.float64)
    abl = make_ablation(llama, base, "corrupted", graph=g)
    sc = edge_attribution(g, base, abl, "eap")
    K = g.edge_mask().double()
    ranked = sc.ranked()
    for v, u in ranked[:4] + ranked[200:202] + [(g.logits_input, 0), (g.mlp_input(1), g.head_node(1, 2))]:
        eps = 1e-5
        kp, km = K.clone(), K.clone()
        kp[v, u] += eps
        km[v, u] -= eps
        fd = -float(circuit_ld(g, base, abl, kp).mean() - circuit_ld(g, base, abl, km).mean()) / (2 * eps)
        assert abs(fd - float(sc.scores[v, u])) < 1e-6 * max(1.0, abs(fd)), (g.downstream_name(v), g.upstream_name(u))
    assert float(sc.scores.abs().nan_to_num(0).max()) > 1e-3


def _plain_node_attribution(hf, base, abl, alphas) -> dict:
    """sum_t (a'_u - a_u) . dLD/da_u per node, mean over prompts, with the gradient of a plain
    HF forward (inputs_embeds on the line from the ablated to the clean embeddings) averaged
    over ``alphas``: what each node's out-edge scores must add up to."""
    H = hf.config.num_attention_heads
    d = hf.config.hidden_size // H
    totals: dict[str, float] = {}
    for b, p in enumerate(base.pairs):
        T = len(p.clean)
        clean_out = reference_outputs(hf, p.clean)
        for a in alphas:
            emb0 = abl.embed[b, :T]
            emb = (emb0 + a * (clean_out["outputs"]["input"] - emb0)).detach().requires_grad_(True)
            zs, ms = {}, {}
            hooks = []
            for layer, block in enumerate(hf.model.layers):

                def pre(m, args, layer=layer):
                    z = args[0]
                    z.retain_grad()
                    zs[layer] = z

                hooks.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
                hooks.append(
                    block.mlp.register_forward_hook(
                        lambda m, a_, out, layer=layer: (out.retain_grad(), ms.__setitem__(layer, out))[1]
                    )
                )
            try:
                logits = hf(inputs_embeds=emb[None]).logits[0, -1]
                (logits[p.correct] - logits[p.incorrect]).backward()
            finally:
                for h in hooks:
                    h.remove()
            contrib = {"input": float(((emb0 - clean_out["outputs"]["input"]) * emb.grad).sum())}
            for layer in zs:
                dz = abl.z[layer][b, :T].reshape(T, H * d) - clean_out["z"][layer]
                for h in range(H):
                    sl = slice(h * d, (h + 1) * d)
                    contrib[f"a{layer}.{h}"] = float((dz[:, sl] * zs[layer].grad[0, :, sl]).sum())
                contrib[f"m{layer}"] = float(
                    ((abl.mlp_out[layer][b, :T] - clean_out["outputs"][f"m{layer}"]) * ms[layer].grad[0]).sum()
                )
            for k, v in contrib.items():
                totals[k] = totals.get(k, 0.0) + v / len(alphas) / len(base.pairs)
    return totals


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_edge_scores_add_up_to_plain_autograd_node_attribution(hf_llama, edge_setup, method):
    g, base, abl = edge_setup
    steps = 3
    sc = edge_attribution(g, base, abl, method, steps=steps)
    alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    want = _plain_node_attribution(hf_llama, base, abl, alphas)
    node = sc.node_scores()
    for u in range(g.n_upstream):
        assert abs(float(node[u]) - want[g.upstream_name(u)]) < 1e-4 * max(1.0, abs(want[g.upstream_name(u)])), (
            g.upstream_name(u)
        )
    assert max(abs(v) for v in want.values()) > 1e-3


def test_eap_ig_with_one_step_is_eap(edge_setup):
    g, base, abl = edge_setup
    a, b = edge_attribution(g, base, abl, "eap"), edge_attribution(g, base, abl, "eap-ig", steps=1)
    assert torch.allclose(a.scores.nan_to_num(0), b.scores.nan_to_num(0), atol=1e-9)
    with pytest.raises(WorkbenchError, match="unknown edge attribution"):
        edge_attribution(g, base, abl, "acdc")


def test_pruning_dead_edges_changes_nothing(edge_setup):
    from circuits.edges import _owners

    g, base, abl = edge_setup
    gen = torch.Generator().manual_seed(3)
    keep = (torch.rand(g.n_downstream, g.n_upstream, generator=gen) < 0.08) & g.edge_mask()
    pruned = prune_dead(g, keep)
    assert bool((pruned <= keep).all()) and int(pruned.sum()) < int(keep.sum())
    assert (circuit_ld(g, base, abl, pruned) - circuit_ld(g, base, abl, keep)).abs().max() < 1e-5
    live = pruned.any(0)  # writers with a kept out-edge
    for v in range(g.n_downstream - 1):
        if pruned[v].any():
            assert any(bool(live[o]) for o in _owners(g, v)), g.downstream_name(v)


def word_pairs_file(path, n: int, seed: int):
    """IOI-shaped pairs in two templates from words the tiny word-level vocabulary knows (the
    IOI task's names are not in it), with their template, as a --pairs JSONL file."""
    from workbench.models.loading import load_model

    tok = load_model("tiny-llama").tokenizer
    vocab = tok.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w.isalpha() and w.islower() and len(w) > 3][:40]
    templates = [
        "{a} and {b} went to the {c} , then {s} gave a book to",
        "when {a} and {b} saw the {c} , {s} said that",
    ]
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b, c, d = rng.sample(words, 4)
        t = templates[i % 2]
        lines.append(
            json.dumps(
                {
                    "id": f"w{seed}-{i}",
                    "template": i % 2,
                    "clean": t.format(a=a, b=b, c=c, s=b),
                    "corrupted": t.format(a=a, b=b, c=c, s=d),
                    "correct": " " + a,
                    "incorrect": " " + b,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_circuit_cli_writes_curves_completeness_minimality(tmp_path, capsys):
    import json

    from workbench.cli import main
    from workbench.runs.parquet import read_parquet

    out = tmp_path / "circ"
    pairs, ref = (
        word_pairs_file(tmp_path / "pairs.jsonl", 6, seed=2),
        word_pairs_file(tmp_path / "ref.jsonl", 16, seed=1),
    )
    assert (
        main(
            [
                "circuit",
                "--model",
                "tiny-llama",
                "--pairs",
                str(pairs),
                "--reference-pairs",
                str(ref),
                "--n-prompts",
                "4",
                "--heldout-pairs",
                str(word_pairs_file(tmp_path / "held.jsonl", 4, seed=3)),
                "--validate-edges",
                "10",
                "--greedy-steps",
                "2",
                "--completeness-random",
                "2",
                "--minimality-random",
                "2",
                "--ig-steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "per template position" in text and "Spearman" in text and "completeness" in text
    doc = json.loads((out / "pairs.jsonl" / "circuit.json").read_text())
    assert doc["ablation"]["mode"] == "mean" and doc["target"] == 0.8
    assert "mean over 16 corrupted prompts" in json.dumps(doc["ablation"]), "the reference pairs define the ablation"
    hc = doc["head_circuit"]
    assert {"faithfulness", "completeness", "minimality", "heldout", "heads"} <= set(hc)
    assert len(doc["curves"]["heads"]) > 3 and doc["curves"]["heads"][-1]["faithfulness"] == 1.0
    assert doc["curves"]["edges"][-1]["faithfulness"] > 0.999
    assert set(doc["edge_validation"]["spearman"]) == {"eap", "eap-ig2"}
    nodes, _ = read_parquet(out / "pairs.jsonl" / "nodes.parquet")
    assert len(nodes) == len(hc["heads"]) >= 1 and "role" in nodes  # these pairs: every head ablated gives F 0.76 < 0.8
    scores, _ = read_parquet(out / "pairs.jsonl" / "edge_scores.parquet")
    assert len(scores) == doc["graph"]["n_edges"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert (
        main(["report", str(out), "--out", str(tmp_path / "circ.html")]) == 0
    )  # the report shows what the circuit explains
    page = (tmp_path / "circ.html").read_text()
    assert "faithfulness vs circuit size" in page and "Faithfulness against size" in page
    assert "under mean ablation (mean over 16 corrupted prompts, per template position)" in page and "Spearman" in page
    rc = main(["circuit", "--model", "tiny-gpt2", "--task", "ioi", "--out", str(tmp_path / "x")])
    assert rc == 2 and "Llama-family" in capsys.readouterr().err
    rc = main(["circuit", "--model", "tiny-llama", "--ablation", "median", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown ablation" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.smollm2
def test_smollm2_graph_ablation_and_edge_circuit(smollm2):
    """On the real model: the explicit graph equals the transformers forward, mean ablation
    equals the hand-written o_proj-hook recomputation, and removing a circuit's out-edges at
    edge level equals ablating its heads through the attention hook."""
    from circuits.tasks import make_task

    pairs, ref = make_task("ioi", smollm2.tokenizer, n=3, seed=1), make_task("ioi", smollm2.tokenizer, n=16, seed=2)
    base = baseline(smollm2, pairs)
    g = ModelGraph(smollm2)
    with torch.no_grad():
        ld = g.logit_diff(base.pb.clean, base.pb.last, base.pb.correct, base.pb.incorrect)
    assert (ld - base.ld_clean).abs().max() < 1e-4
    abl = make_ablation(smollm2, base, "mean", ref, graph=g)
    ev = Evaluator(smollm2, base, abl)
    circuit = [(23, 3), (29, 1), (17, 4), (5, 6), (16, 0), (8, 1), (8, 0)]
    outside = ev.all - set(circuit)
    ev.lds([outside])
    hf = eager_model(smollm2.source)
    for b, p in enumerate(pairs[:2]):
        members = [r for r in ref if r.meta["template"] == p.meta["template"] and len(r.corrupted) == len(p.clean)]
        zs = [reference_outputs(hf, r.corrupted)["z"] for r in members]
        z_rep = {layer: sum(z[layer] for z in zs) / len(zs) for layer in zs[0]}
        assert (
            abs(float(ev.per_prompt[frozenset(outside)][b]) - reference_head_ablation_ld(hf, p, outside, z_rep)) < 1e-3
        )
    keep = g.edge_mask().clone()
    for layer, h in outside:
        keep[:, g.head_node(layer, h)] = False
    assert (circuit_ld(g, base, abl, keep) - ev.per_prompt[frozenset(outside)]).abs().max() < 1e-4
