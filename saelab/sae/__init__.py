"""SAE architectures (the model axis). No loss lives here."""

from saelab.sae.activations import BatchTopK, JumpReLU, ReLU, TopK
from saelab.sae.model import SAE, geometric_median
from saelab.sae.residual import ResidualSAE

__all__ = ["SAE", "ResidualSAE", "ReLU", "TopK", "BatchTopK", "JumpReLU", "geometric_median"]
