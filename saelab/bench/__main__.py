"""Run the benchmark sections: `python -m saelab.bench [--quick] [--steps N] [--device cpu] [--sections topk,...]`.

Size flags (--d-in, --d-sae, --k, --batch) override a section's default size (topk's timed run, variants).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from saelab.allocator import keep_freed_memory
from saelab.bench import SECTIONS, SectionUnavailable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saelab.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run of seconds)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per implementation (default: per section)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)"
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurements")
    for flag in ("d-in", "d-sae", "k", "batch"):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"{flag} of the SAE (default: per section)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="SAE parameter dtype (variants; default float32)",
    )
    p.add_argument(
        "--dead-frac",
        type=float,
        default=None,
        help="share of latents AuxK treats as dead (variants; default 0.05)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)",
    )
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    for name in ("d_in", "d_sae", "k", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dead_frac is not None and not 0 <= args.dead_frac <= 1:
        p.error("--dead-frac must be in [0, 1]")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def run_section(name: str, args: argparse.Namespace) -> list[str]:
    """The lines a section prints, or one line saying why it was skipped."""
    try:
        module = importlib.import_module(f"saelab.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"saelab.bench.{name}":
            return [f"[{name}] skipped: section not available in this checkout"]
        return [f"[{name}] skipped: needs `{e.name}` (install the bench extra: pip install -e '.[bench]')"]
    try:
        return module.main(args)
    except SectionUnavailable as e:
        return [f"[{name}] skipped: {e}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as the CLI trains (saelab/allocator.py); SAELAB_MALLOC=default to compare
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"== {name} ==", flush=True)
        for line in run_section(name, args):
            print(line, flush=True)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
