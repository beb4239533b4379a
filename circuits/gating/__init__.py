"""Causal head gating (Nam et al., NeurIPS 2025): learned sigmoid gates on each head's output,
fit in three stages on any next-token task, read as head roles.

The data path, top to bottom: ``tasks`` (prompts with target tokens) -> ``gates`` (the Z edit)
-> ``objective`` (target log-probability and the clamped-logit L1 term) -> ``fit`` (the three
stages) -> ``roles`` (facilitating / irrelevant / interfering, tidy rows) -> ``checks`` (closing
heads by role; agreement with path patching).
"""
