"""Head-aware KV-cache policies, and the causal test of head scores they make possible.

Read top to bottom, the modules follow the data path of ``workbench kv``:

- :mod:`workbench.kv.policy`: what each (layer, KV head) keeps (``Full``, ``Window``,
  ``Compensated``, ``Budget``) and the model's geometry (GQA groups, sliding-window layers);
- :mod:`workbench.kv.select`: which keys a head keeps, one function for both forms below;
- :mod:`workbench.kv.masked` (a ``SCORES`` edit over the whole computation) and
  :mod:`workbench.kv.evicted` (a per-head cache whose evicted entries are gone): the two ways to
  run a policy, tested to give the same logits;
- :mod:`workbench.kv.budget`: kv_tokens, kv_fraction and kv_bytes for every point;
- :mod:`workbench.kv.selectors` and :mod:`workbench.kv.duo`: from head scores (the probes',
  RazorAttention's, DuoAttention's learned gates) to policies;
- :mod:`workbench.kv.tasks` and :mod:`workbench.kv.grid`: niah accuracy and next-token loss
  over a grid of selectors x budgets, one prefill per prompt shared by every policy.

The run folder around a grid is :mod:`workbench.runs.kv`; the report section
:mod:`workbench.report.kv`. User guide: docs/kv-cache.md.
"""
