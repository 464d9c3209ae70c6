"""The topk benchmark section: the saelab bf16-mixed row, its parity line and the dense-matmul roofline."""

from __future__ import annotations

import pytest
import torch

from saelab.bench.__main__ import main
from saelab.bench.topk import FULL, MatmulRunner, SaelabRunner, Size, bf16_parity, make_batches, step_flops

TINY = Size(16, 128, 4, 32)


def test_step_flops_count_the_encoder_product_and_the_sparse_decoder():
    fl = step_flops(FULL)
    enc = 2 * FULL.batch * FULL.d_in * FULL.d_sae  # 103 GFLOP for 4096 × 768 × 16384
    dec = 2 * FULL.batch * FULL.k * FULL.d_in
    assert fl == {"encoder": enc, "encoder_x3": 3 * enc, "decoder_x3": 3 * dec, "total": 3 * enc + 3 * dec}


def test_bf16_mixed_runner_autocasts_the_forward_and_keeps_fp32_training_state():
    runner = SaelabRunner(TINY, "cpu", bf16_mixed=True)
    assert runner.name == "saelab bf16-mixed"
    seen = []
    runner.sae.register_forward_hook(lambda m, i, o: seen.append((o.pre_acts.dtype, o.x_hat.dtype)))
    x = make_batches(TINY, 1, "cpu")[0]
    loss = runner.step(x)
    assert seen == [(torch.bfloat16, torch.float32)] and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in runner.sae.parameters())
    moments = [v for s in runner.opt.state.values() for v in s.values() if v.ndim]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@pytest.mark.parametrize("affine", [False, True])
def test_matmul_runner_times_the_encoder_shapes_in_its_dtype(affine):
    runner = MatmulRunner(TINY, "cpu", torch.bfloat16, affine=affine)
    x = make_batches(TINY, 1, "cpu")[0]
    y = runner.step(x)
    assert runner.name.startswith("x @ W bfloat16") and y.dtype == torch.bfloat16
    assert y.shape == (TINY.batch, TINY.d_sae)
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ runner.W.float(), rtol=2e-2, atol=2e-2)


def test_bf16_parity_is_within_bf16_rounding():
    p = bf16_parity("cpu")
    assert p["same"] >= 0.8  # most rows keep their top-k; the others swap latents whose π tie in bf16
    assert p["x_hat"] < 2**-6 and p["loss"] < 0.05  # a few bf16 roundings (u = 2⁻⁸) of each code


def test_bench_topk_tiny_prints_the_bf16_row_and_the_roofline(capsys):
    pytest.importorskip(
        "sparsify", reason="the topk section compares with sparsify (pip install -e '.[bench]')"
    )
    argv = ["--quick", "--steps", "1", "--device", "cpu", "--sections", "topk", "--no-memory"]
    assert main([*argv, "--d-in", "16", "--d-sae", "128", "--k", "4", "--batch", "32"]) == 0
    text = capsys.readouterr().out
    assert "d_in=16 d_sae=128 k=4 batch=32" in text and "skipped:" not in text
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():  # the first table's rows (the roofline table repeats the names)
        rows.setdefault(line.split("  ")[0].strip(), line.split())
    bf16 = rows["saelab bf16-mixed"]
    assert float(bf16[2].replace(",", "")) > 0 and bf16[3].endswith("x")  # samples/s, × sparsify fp32
    assert "saelab bf16-mixed/sparsify fp32:" in text
    assert "roofline: x @ W, [32, 16] @ [16, 128]: fp32" in text and "bf16-mixed vs fp32 saelab:" in text
    assert "step FLOPs: encoder 2·batch·d_in·d_sae" in text and "step ÷ x @ W" in text
