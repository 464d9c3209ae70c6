"""The variants benchmark section: a smoke run on tiny sizes, and the command-line size overrides."""

from __future__ import annotations

import argparse

import pytest

from saelab.bench.__main__ import main, parse_args
from saelab.bench.topk import FULL, Size
from saelab.bench.variants import variants


def test_bench_variants_tiny_prints_a_ratio_per_variant(capsys):
    argv = ["--quick", "--steps", "1", "--device", "cpu", "--sections", "variants"]
    assert main([*argv, "--d-in", "16", "--d-sae", "128", "--k", "4", "--batch", "32"]) == 0
    text = capsys.readouterr().out
    assert "d_in=16 d_sae=128 k=4 batch=32" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    assert rows["batchtopk"][1] == "1.000×"
    for name in ("ortsae/1", "ortsae/5", "matryoshka"):
        assert float(rows[name][1].rstrip("×")) > 0
    assert "≤ 1.10×" in " ".join(rows["ortsae/5"]) and "≤ 1.20×" in " ".join(rows["matryoshka"])


def test_variant_terms_follow_the_papers():
    by_name = {v.name: v for v in variants()}
    ortho5 = by_name["ortsae/5"].terms["ortho"]
    assert (ortho5.coeff, ortho5.every_n_steps, ortho5.chunk_size) == (0.25, 5, 8192)  # K(65536) = 8
    assert by_name["ortsae/1"].terms["ortho"].every_n_steps == 1
    assert by_name["matryoshka"].terms["matryoshka"].prefixes(65536, None) == [
        4096,
        8192,
        16384,
        32768,
        65536,
    ]
    assert set(by_name["batchtopk"].terms) == {"mse", "auxk"}


def test_size_flags_override_a_sections_size():
    args = parse_args(["--d-sae", "2048", "--batch", "64"])
    assert FULL.with_args(args) == Size(FULL.d_in, 2048, FULL.k, 64)
    assert FULL.with_args(argparse.Namespace()) == FULL
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--k", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--dead-frac", "1.5"])
