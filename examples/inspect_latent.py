"""Train a tiny SAE on the embedded SmolLM2 (or take one you have) and look inside it with `saelab.inspect.Lab`.

    python examples/inspect_latent.py OUT_DIR              # trains a tiny SAE into OUT_DIR/run, then inspects it
    python examples/inspect_latent.py OUT_DIR --run RUN    # inspects a run dir or SAE export you already have

Everything it writes goes under OUT_DIR: the run (`OUT_DIR/run`: config, checkpoints, SAELens export),
its activation cache (`OUT_DIR/cache`) and the α-sweep plot. The only thing outside is the one-time
conversion of the embedded model into the saelab cache (`$SAELAB_CACHE`, default ~/.cache/saelab), which
every saelab run on SmolLM2 shares. The tiny SAE (256 latents, k = 8, 150 steps on ~6k tokens of the
physics corpus at block 6) trains in a minute or two on 2 CPU cores (`--steps 40`: faster, rougher); its
latents are rough, the walk-through is the point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from saelab.inspect import Lab

TEXT = "The electron is a subatomic particle with a negative electric charge."
PROMPTS = ["The most important thing about space is", "Yesterday I read that"]


def train_tiny(out: Path, steps: int) -> Path:
    """A real `saelab` run (the CLI, as a user would start it), sized to finish in well under a minute."""
    run = out / "run"
    overrides = [
        "data=text",
        "data/corpus=physics",
        "data/corpus@data.val_corpus=physics",
        "data.corpus.split=train",
        "data.context_len=64",
        "data.train_tokens=6144",
        "data.val_tokens=1024",
        "data.batch_size=128",
        f"data.cache_dir={out / 'cache'}",
        "sae.d_sae=256",
        "sae.activation.k=8",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "+trainer.enable_progress_bar=false",
        f"checkpoint.every_n_steps={steps}",
        "eval/metrics=[core]",
        "logger=none",
        "name=inspect_demo",
        f"+run_dir={run}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "saelab", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for everything this script writes")
    p.add_argument(
        "--run", type=Path, default=None, help="inspect this run dir or SAE export instead of training"
    )
    p.add_argument("--stage", default=None, help="which export of a multi-stage run")
    p.add_argument("--steps", type=int, default=150, help="training steps of the tiny SAE")
    p.add_argument("--latent", type=int, default=None, help="the latent to look at (default: TEXT's top one)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = args.run if args.run is not None else train_tiny(args.out, args.steps)

    # 1. load: the run's config builds the host; the export is read with load_sae
    lab = Lab.load(run, stage=args.stage)
    print(f"\n== {lab}")

    # 2. per-token codes of a text
    codes = lab.encode(TEXT)
    print(f"\n== encode: codes {tuple(codes.codes.shape)} over {len(codes.tokens)} tokens")
    for pos in range(min(4, len(codes.tokens))):
        top = ", ".join(f"{j}:{a:.2f}" for j, a in codes.active(pos)[:4])
        print(f"  {codes.tokens[pos]!r:>14}  {top}")

    # 3. contexts (from <run>/features when saved, else collected now on held-out text) and top latents
    records = lab.records(budget=2048)
    print(f"\n== feature records over {records.n_tokens} tokens; top latents of the text (density-aware):")
    hits = lab.top_latents(TEXT, k=8)
    print(hits)
    latent = args.latent if args.latent is not None else hits[0].latent
    print(f"\n== latent {latent}: density {lab.density(latent):.2e}; top contexts")
    print(lab.contexts(latent, k=5))

    # 4. what the decoder row writes: the logit lens, keywords from it, and any explanation
    print(f"\n== logit lens\n{lab.lens(latent, k=8)}")
    from_lens, from_contexts = lab.keywords(latent)[:5], lab.keywords(latent, source="contexts")[:5]
    print(f"keywords from the lens: {from_lens}; from the top contexts: {from_contexts}")
    keywords = from_contexts or from_lens  # a mid-layer latent's lens is often noise; its contexts less so
    print(f"explanation (autointerp/explanations.jsonl): {lab.explanation(latent)}")

    # 5. the SAE inside the model: next-token loss with the reconstruction spliced in
    loss = lab.spliced_loss(TEXT)
    print(
        f"\n== spliced loss: clean {loss.clean:.3f}, spliced {loss.spliced:.3f}, Δ {loss.delta:+.3f} nats/token"
    )

    # 6. steering: add α·W_dec[latent] at every position. Templeton et al. (2024, "Scaling Monosemanticity")
    # clamp features at multiples of their maximum activation (10x for the Golden Gate feature); α here is
    # 10x the latent's top recorded activation.
    top_act = max((c.act for c in lab.contexts(latent, k=1)), default=1.0)
    alpha = 10.0 * top_act
    print(f"\n== steer latent {latent} with α = {alpha:.1f}\n{lab.steer(latent, alpha, PROMPTS[0], 16)}")

    # 7. the α sweep: concept rate (those keywords) and fluency cost (clean-model perplexity)
    if keywords:
        res = lab.sweep([latent], [alpha / 2, alpha], PROMPTS, concept={latent: keywords}, max_new_tokens=10)
        print(f"\n== α sweep\n{res}")
        print(f"plot: {res.plot(args.out / 'steering.png')}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
