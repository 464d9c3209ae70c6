"""Reading and writing SAEs: the SAELens and sparsify formats."""

from saelab.io.saelens import load_sae, save_sae, source_metadata
from saelab.io.sparsify import load_sparsify, save_sparsify

__all__ = ["save_sae", "load_sae", "source_metadata", "save_sparsify", "load_sparsify"]
