"""`python -m saelab.bench`: speed and memory of saelab against peer libraries, run side by side.

Every figure is a ratio against a peer (another library; for `variants`, the BatchTopK baseline)
measured in the same process on the same batches, so the numbers are comparable on a busy machine;
nothing here is a timed test.

Sections are modules of this package listed in `SECTIONS`. Each exposes

    def main(args: argparse.Namespace) -> list[str]

and returns the lines to print (a small table and any notes). `args` carries the shared options
`quick` (small sizes, seconds to run), `steps` (timed steps per implementation, None = the section's
default), `device` ("cpu", "cuda", ...), `memory` (False: skip peak-memory measurements), the size
overrides `d_in`, `d_sae`, `k`, `batch` (None = the section's size), and for `variants` `dtype` and
`dead_frac` (None = its defaults); read them with getattr and a default, so a bare Namespace works.
A section whose module is missing, or whose optional dependency (a peer library) is not installed,
is skipped with a one-line message; a section should raise `SectionUnavailable(reason)` for the latter.
"""

from __future__ import annotations

SECTIONS: tuple[str, ...] = ("topk", "variants", "fit", "multi", "parallel", "harvest", "cache")


class SectionUnavailable(RuntimeError):
    """A section cannot run here (e.g. its peer library is not installed); the message says how to fix it."""
