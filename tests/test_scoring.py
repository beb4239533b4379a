"""workbench.engine.scoring: per-token losses and last logits of padded batches under edits equal
one plain HF forward per prompt with the same edit made by hand."""

from __future__ import annotations

import pytest
import torch

from workbench.engine.edits import WeightsEdit, sites_of
from workbench.engine.scoring import classify, is_labelled, last_logits, read_choices, token_losses
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import TokenizedPrompt
from workbench.models.loading import load_model
from workbench.protocol.run_context import RunContext


class FirstKeyOnly(WeightsEdit):
    """All of (layer 1, head 0)'s attention on the first token."""

    def sites(self):
        return sites_of([(1, 0)])

    def edit(self, call, x):
        return torch.where(x.first_key, 1.0, 0.0).expand_as(x.values)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


PROMPTS = [TokenizedPrompt(str(i), [(7 * i + 3 * j) % 500 + 1 for j in range(n)]) for i, n in enumerate([9, 17, 5])]


def _reference(model, ids, edit: bool):
    """One prompt alone, with (layer 1, head 0)'s output replaced by the first token's value."""
    hf = model.hf_model
    handle = None
    if edit:
        attn = hf.model.layers[1].self_attn
        d = attn.head_dim

        def pre(module, args):
            (z,) = args
            v = hf.model.layers[1].self_attn.v_proj(normed[0])  # [1, T, kv*d]
            group = attn.config.num_attention_heads // attn.config.num_key_value_heads
            z = z.clone()
            z[..., 0:d] = v[:, :1, (0 // group) * d : (0 // group + 1) * d]
            return (z,)

        normed = []
        h1 = hf.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, o: normed.append(o))
        handle = [h1, attn.o_proj.register_forward_pre_hook(pre)]
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        for h in handle or []:
            h.remove()
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return loss, logits[-1]


@pytest.mark.parametrize("edit", [False, True])
def test_padded_batches_equal_one_prompt_at_a_time(model, edit):
    edits = [FirstKeyOnly()] if edit else []
    ctx = RunContext(batch_size=3)
    losses = token_losses(model, PROMPTS, ctx, edits)
    logits = last_logits(model, PROMPTS, ctx, edits)
    for i, p in enumerate(PROMPTS):
        ref_loss, ref_last = _reference(model, p.ids, edit)
        assert losses[i].shape == (len(p) - 1,)
        torch.testing.assert_close(losses[i], ref_loss, atol=2e-5, rtol=0)
        torch.testing.assert_close(logits[i].double(), ref_last, atol=2e-4, rtol=0)
    if edit:  # the edit changed something (else the test could not fail)
        plain = token_losses(model, PROMPTS, ctx)
        assert max((a - b).abs().max() for a, b in zip(plain, losses)) > 1e-3


def test_last_logits_are_the_same_whether_the_model_projects_only_the_last_position_or_every_one(model, monkeypatch):
    from workbench.engine import scoring

    ctx = RunContext(batch_size=3)
    projected = last_logits(model, PROMPTS, ctx, [FirstKeyOnly()])
    monkeypatch.setattr(scoring, "_keeps_logits", lambda hf: False)
    gathered = last_logits(model, PROMPTS, ctx, [FirstKeyOnly()])
    torch.testing.assert_close(projected, gathered, atol=1e-5, rtol=0)
    assert scoring._keeps_logits.__name__ == "<lambda>"  # the second path really ran


def _first(model, word):
    return model.tokenizer(word, add_special_tokens=False)["input_ids"][0]


def test_classify_scores_each_prompts_own_choices_against_the_plain_model(model):
    """Per-prompt choices (two or three), gold given as ``label`` or ``label_index``, a padded
    batch: predictions and gold log-probabilities equal a plain forward of each prompt alone."""
    words = ["with", "they", "the", "of"]
    metas = [
        {"choices": words[:2], "label": "they"},
        {"choices": words[1:4], "label_index": 2},
        {"choices": [words[3], words[0]], "label": words[0], "label_index": 1},
    ]
    prompts = [TokenizedPrompt(p.id, p.ids, m) for p, m in zip(PROMPTS, metas)]
    assert is_labelled(prompts) and not is_labelled(PROMPTS)
    choices = read_choices(model.tokenizer, prompts)
    assert choices.gold.tolist() == [1, 2, 1]
    for over in ("choices", "vocab"):
        got = classify(model, prompts, choices, RunContext(batch_size=3), over=over)
        for r, p in enumerate(prompts):
            _, last = _reference(model, p.ids, edit=False)
            lp = torch.log_softmax(last, -1)[[_first(model, w) for w in p.meta["choices"]]]
            if over == "choices":
                lp = lp - torch.logsumexp(lp, -1)
            gold = int(choices.gold[r])
            assert bool(got.correct[r]) == (int(lp.argmax()) == gold)
            assert float(got.gold_logprob[r]) == pytest.approx(float(lp[gold]), abs=1e-5)
    edited = classify(model, prompts, choices, edits=[FirstKeyOnly()], over="vocab")
    assert not torch.allclose(edited.gold_logprob, got.gold_logprob), "edits reach the scores"


@pytest.mark.parametrize(
    "meta, says",
    [
        ({"choices": ["with", "they"]}, "no choices/label"),
        ({"label": "with"}, "no choices/label"),
        ({"choices": ["with"], "label": "with"}, "no choices/label"),
        ({"choices": ["with", "they"], "label": "of"}, "not one of its choices"),
        ({"choices": ["with", "they"], "label_index": 2}, "does not index"),
        ({"choices": ["with", "they"], "label_index": True}, "does not index"),
        ({"choices": ["with", "they"], "label": "with", "label_index": 1}, "disagree"),
        ({"choices": ["with", "with"], "label": "with"}, "distinct"),
    ],
)
def test_bad_labels_get_one_clear_error(model, meta, says):
    with pytest.raises(WorkbenchError, match=says):
        read_choices(model.tokenizer, [TokenizedPrompt("x", [5, 6, 7], meta)], "zerotuning")
