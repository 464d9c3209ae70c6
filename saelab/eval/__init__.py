"""Evaluation metrics and evaluation loops."""
