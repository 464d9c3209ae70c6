"""Loss terms and their sum (the objective axis). Terms never import the SAE or data packages."""

from saelab.objectives.objective import NonFiniteLossError, Objective
from saelab.objectives.terms import FVU, L0, L1, MSE, AuxK, Matryoshka, Ortho, Term, Tilted

__all__ = [
    "Objective",
    "NonFiniteLossError",
    "Term",
    "MSE",
    "FVU",
    "Tilted",
    "L1",
    "L0",
    "AuxK",
    "Ortho",
    "Matryoshka",
]
