"""The ``counterfact`` knowledge-conflict dataset: structure, and that SmolLM2 knows its facts."""

from __future__ import annotations

import re

import pytest
import torch

from workbench.datasets import DATASETS, counterfact, make_dataset
from workbench.errors import WorkbenchError


def test_items_have_the_context_fields():
    items = make_dataset("counterfact")
    assert "counterfact" in DATASETS
    assert len(items) == len(counterfact.FACTS) >= 30
    assert len({it.id for it in items}) == len(items)
    for it in items:
        row = it.to_json()
        for key in ("id", "text", "context", "target_context", "target_memory"):
            assert isinstance(row[key], str) and row[key].strip(), (it.id, key)
        ctx, mem = it.meta["target_context"], it.meta["target_memory"]
        assert ctx.startswith(" ") and mem.startswith(" ")
        assert ctx.strip() != mem.strip()
        assert it.meta["context"].endswith(ctx + ".")
        assert not re.search(rf"\b{mem.strip()}\b", it.meta["context"]), (
            it.id
        )  # the passage never gives the true answer
        assert it.text.startswith("Q: ") and not it.text.endswith(" ")
        assert it.meta["relation"] in counterfact.RELATIONS


def test_example_item():
    item = next(it for it in make_dataset("counterfact") if it.id == "counterfact-capital-france")
    assert item.text == "Q: What is the capital of France?\nA: The capital of France is"
    assert item.meta["context"] == "In this story, the capital of France is Rome."
    assert (item.meta["target_context"], item.meta["target_memory"]) == (" Rome", " Paris")
    cloze = next(it for it in make_dataset("counterfact", template="cloze") if it.id == item.id)
    assert cloze.text == "The capital of France is"


def test_seed_and_n_prompts():
    def ids(ps):
        return [p.id for p in ps]

    assert ids(make_dataset("counterfact", seed=3)) == ids(make_dataset("counterfact", seed=3))
    assert ids(make_dataset("counterfact", seed=3)) != ids(make_dataset("counterfact", seed=4))
    assert sorted(ids(make_dataset("counterfact", seed=3))) == sorted(ids(make_dataset("counterfact", seed=4)))
    five = make_dataset("counterfact", n_prompts=5, seed=3)
    assert ids(five) == ids(make_dataset("counterfact", seed=3))[:5]
    assert {p.meta["relation"] for p in make_dataset("counterfact", relations="city")} == {"city"}


def test_bad_options_fail_clearly():
    with pytest.raises(WorkbenchError):
        make_dataset("counterfact", n_prompts=len(counterfact.FACTS) + 1)
    with pytest.raises(WorkbenchError):
        make_dataset("counterfact", template="essay")
    with pytest.raises(WorkbenchError):
        make_dataset("counterfact", context="no placeholders")
    with pytest.raises(WorkbenchError):
        make_dataset("counterfact", relations=["moons"])


@pytest.mark.smollm2
@torch.no_grad()
def test_smollm2_knows_the_facts_without_the_passage(smollm2):
    tok = smollm2.tokenizer

    def first(s):
        return tok(s, add_special_tokens=False)["input_ids"][0]

    items = make_dataset("counterfact")
    for it in items:
        assert first(it.meta["target_context"]) != first(it.meta["target_memory"]), it.id
    rows = [tok(it.text)["input_ids"] for it in items]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor([r + [0] * (int(lengths.max()) - len(r)) for r in rows])  # right-padded: one forward
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    logits = smollm2.hf_model(ids.to(smollm2.device), attention_mask=mask.to(smollm2.device)).logits
    answers = logits[torch.arange(len(items)), lengths - 1].argmax(-1).tolist()
    right = sum(a == first(it.meta["target_memory"]) for a, it in zip(answers, items))
    assert right / len(items) >= 0.6, f"{right}/{len(items)}"
