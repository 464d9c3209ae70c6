"""`lit.compile`: the SAE's forward through `torch.compile`, the same training as eager."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from support import synthetic_small

from saelab.lit import compile_backend
from saelab.train import fit

# aot_eager traces and runs the same aten ops without generating code (inductor needs a C++ compiler and
# tens of seconds); what it checks is that the traced forward, graph breaks included, trains the same SAE
STEPS = [
    *synthetic_small(),
    "trainer.max_steps=6",
    "trainer.limit_val_batches=1",
    "logger=none",
    "export=false",
]


@pytest.mark.parametrize("sae", ["topk", "relu"])
def test_a_compiled_fit_trains_the_same_weights_as_an_eager_one(tmp_path, sae):
    # ReLU + L1: a dense forward; TopK: the sparse path, whose data-dependent branches break the graph
    extra = [f"sae={sae}"] + (["objective/terms=[mse,l1]"] if sae == "relu" else [])
    base = [o for o in STEPS if not (sae == "relu" and o.startswith("sae.activation.k"))]
    eager = fit(compose_cfg([*base, *extra, "lit.compile=false"]), tmp_path / "eager")
    compiled = fit(compose_cfg([*base, *extra, "lit.compile=aot_eager"]), tmp_path / "compiled")
    assert eager.lit.compile_backend is None and compiled.lit.compile_backend == "aot_eager"
    assert compiled.lit._compiled is not None  # the forward did go through torch.compile
    for name, p in eager.sae.state_dict().items():
        torch.testing.assert_close(compiled.sae.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    # the compiled function is not a module: checkpoints keep the eager module's keys
    assert set(compiled.lit.state_dict()) == set(eager.lit.state_dict())


def test_compile_settings_and_an_unknown_backend():
    assert compile_backend(False) is None and compile_backend("false") is None
    assert compile_backend(True) == "inductor" and compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="lit.compile='no_such_backend' is not a torch.compile backend"):
        compile_backend("no_such_backend")
