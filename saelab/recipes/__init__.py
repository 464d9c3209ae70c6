"""Recipes: plain `run(cfg) -> results` pipelines, chosen by `recipe:` in the config."""
