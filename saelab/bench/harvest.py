"""Benchmark section `harvest`: tokens/s of saelab's activation harvest vs a bare truncated HF forward.

Both sides run SmolLM2-135M-Instruct (the embedded default, hook = block 6's residual output) on the same
packed contexts of the general corpus (16 × 128 tokens per forward; `--quick`: 8 × 64):

* bare: the HF base model with its block list cut to blocks 0..6 and the final norm removed, called
  directly (`model.model(input_ids, attention_mask).last_hidden_state`), i.e. the least a harvester can do;
* saelab: `saelab.data.text.harvest` over `CausalLMHost.activations` (a forward hook that stops the full
  model after block 6), including dropping BOS/padding positions and the copy to CPU float32.

The two run interleaved, batch by batch, for `--steps` rounds (default 3; `--quick`: 2), so a busy machine
slows both alike; the overhead is the ratio of the summed times, reported next to the 10 % target.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from saelab.bench import SectionUnavailable

HOOK = 6
TARGET = 0.10


def _bare(model: nn.Module, hook: int):
    """A callable running only blocks 0..hook of `model` (norm removed): the bare truncated forward."""
    base = model.get_submodule("model")  # the decoder stack of a Llama-layout *ForCausalLM
    layers, norm = base.layers, base.norm
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.model.layers is not a list of blocks.")

    def fwd(input_ids, attention_mask):
        base.layers, base.norm = layers[: hook + 1], nn.Identity()
        try:
            with torch.no_grad():
                return base(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
        finally:
            base.layers, base.norm = layers, norm

    return fwd


def main(args: argparse.Namespace) -> list[str]:
    from saelab.assets import AssetMissing
    from saelab.corpora.text import load_corpus
    from saelab.data.text import Contexts, harvest, pack
    from saelab.hosts.causal_lm import CausalLMHost

    torch.manual_seed(0)
    quick = bool(getattr(args, "quick", False))
    rounds = int(args.steps) if getattr(args, "steps", None) else (2 if quick else 3)
    batch, ctx_len, n_batches = (8, 64, 2) if quick else (16, 128, 4)
    device = getattr(args, "device", "cpu") or "cpu"
    try:
        host = CausalLMHost("smollm2", hook=HOOK, d_in=576, device=device)
        model = host.model
        corpus = load_corpus("general", "train", max_docs=200)
    except AssetMissing as e:
        raise SectionUnavailable(str(e)) from e
    ctx = pack(host.tokenizer, corpus.texts, ctx_len, host.bos_id, host.tokenizer.eos_token_id, None)
    ctx = ctx.slice(0, batch * n_batches)
    bare = _bare(model, HOOK)
    # the two paths must produce the same activations (else the comparison is void)
    c0 = ctx.slice(0, batch)
    ref = bare(c0.input_ids.to(device), c0.attention_mask.to(device))
    torch.testing.assert_close(host.activations(c0.input_ids, c0.attention_mask), ref, rtol=1e-5, atol=1e-4)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t_bare = t_sae = 0.0
    n_tok = 0
    for _ in range(rounds):
        for i in range(0, len(ctx), batch):
            c = ctx.slice(i, i + batch)
            sync()
            t0 = time.perf_counter()
            bare(c.input_ids.to(device), c.attention_mask.to(device))
            sync()
            t1 = time.perf_counter()
            for _ in harvest(host, Contexts(c.input_ids, c.attention_mask, c.sae_mask), batch, "bench"):
                pass
            sync()
            t2 = time.perf_counter()
            t_bare += t1 - t0
            t_sae += t2 - t1
            n_tok += c.input_ids.numel()
    overhead = t_sae / t_bare - 1
    verdict = "ok" if overhead <= TARGET else "ABOVE TARGET"
    return [
        f"SmolLM2-135M, hook model.layers.{HOOK}, {batch}×{ctx_len} tokens per forward, {rounds} rounds × "
        f"{n_batches} batches, device {device}",
        "| path | tokens/s |",
        "|---|---|",
        f"| bare truncated HF forward | {n_tok / t_bare:,.0f} |",
        f"| saelab harvest (hook + stop, mask, copy) | {n_tok / t_sae:,.0f} |",
        f"overhead: {overhead:+.1%} (target ≤ {TARGET:.0%}): {verdict}",
    ]
