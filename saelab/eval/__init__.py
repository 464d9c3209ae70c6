"""Evaluators (`conf/eval/metrics/`): an SAE and an activation source in, named metrics, tables and figures out.

`saelab.eval.base` has the interface (`Evaluator`, `EvalResult`, `evaluate`); one module per family:
`core` (core), `geometry` (geometry, composition, unique_features), `synthetic` (recovery), `absorption`
(ground truth or first-letter), `spliced`, `coverage`, `enrichment`, `protein_fidelity`, `ranking`. Streaming metric accumulators are in `metrics`. Nothing is imported here,
so the training loop can use `metrics` without loading hosts or plotting.
"""
