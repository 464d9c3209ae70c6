"""Analyses of trained SAEs and the plots that show them."""
