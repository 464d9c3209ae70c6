"""Reading and writing SAEs: SAELens and sparsify formats, atomic file writes."""

from saelab.io.atomic import atomic_dir, atomic_write_json, atomic_write_text
from saelab.io.saelens import load_sae, save_sae
from saelab.io.sparsify import load_sparsify, save_sparsify

__all__ = [
    "save_sae",
    "load_sae",
    "save_sparsify",
    "load_sparsify",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
]
