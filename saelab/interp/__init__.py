"""Auto-interpretation of SAE latents (Paulo et al. 2024, arXiv:2410.13928): chat clients, prompts,
contexts, the explainer and the scorers; the evaluator that runs them is `saelab.eval.autointerp`."""
