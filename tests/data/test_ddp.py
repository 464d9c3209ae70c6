"""DDP on two gloo processes trains one model on disjoint batches, for every activation source.

`ddp_worker.py` runs as rank 0 and rank 1 (started here with LOCAL_RANK set, so Lightning launches
nothing itself); each rank trains a tiny BatchTopK SAE on synthetic, protein (tiny random ESM-2),
recsae (tiny SASRec), uncached and cached text (tiny random Llama) and saves its batch digests and final
state. Here: the two ranks' states are bit-identical (parameters and buffers) and their batches disjoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import make_tiny_esm, save_tiny_causal_lm, write_movielens

from saelab.sae.model import geometric_median

pytestmark = pytest.mark.slow  # two gloo processes train every source

WORKER = Path(__file__).with_name("ddp_worker.py")
SOURCES = ("synthetic", "protein", "recsae", "text_live", "text_cached")
STEPS = 6

ENTRY = """\
ID   T{i}_TEST                Reviewed;          {n} AA.
AC   P{i:05d};
DE   RecName: Full=Test {i};
FT   TRANSMEM        6..24
FT                   /note="Helical"
SQ   SEQUENCE   {n} AA;  5000 MW;  0000000000000000 CRC64;
     {seq}
//
"""


def _swissprot(path: Path, n: int = 20) -> Path:
    import random

    rnd = random.Random(0)

    def run(letters: str, k: int) -> str:
        return "".join(rnd.choice(letters) for _ in range(k))

    # a polar prefix, the 19-residue helix the TRANSMEM line marks, a polar tail of varying length
    seqs = [run("DEKRSTNQ", 5) + run("LIVAFG", 19) + run("DEKRSTNQAG", rnd.randint(8, 20)) for _ in range(n)]
    path.write_text("".join(ENTRY.format(i=i, n=len(s), seq=s) for i, s in enumerate(seqs)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    (root / "movielens").mkdir()
    write_movielens(root / "movielens")
    assets = {
        "esm": str(make_tiny_esm(root / "esm")),
        "swissprot": str(_swissprot(root / "entries.dat")),
        "movielens": str(root / "movielens"),
        "llama": str(save_tiny_causal_lm(root / "llama", "llama", n_layers=3, hidden=32)),
        "cache": str(root / "cache"),
    }
    (root / "assets.json").write_text(json.dumps(assets))
    out = root / "out"
    out.mkdir()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # the worker imports the shared builders in tests/support.py
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(WORKER.parent.parent), os.environ.get("PYTHONPATH")) if p
        ),
    }
    cmd = [sys.executable, str(WORKER), str(root / "assets.json"), str(out), str(STEPS)]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return out


def _load(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("source", SOURCES)
def test_ranks_train_one_model_on_disjoint_batches(runs, source):
    a, b = _load(runs, source)
    assert len(a["batches"]) == len(b["batches"]) == STEPS
    assert not set(a["batches"]) & set(b["batches"]), "the two ranks trained on the same batches"
    assert len(set(a["batches"])) == STEPS  # and a rank never repeats a batch within the run
    assert a["state"].keys() == b["state"].keys()
    assert "sae.b_dec" in a["state"] and "sae.activation.threshold" in a["state"]  # parameters and buffers
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"{source}: {k} differs between the ranks"
    assert float(a["state"]["sae.activation.threshold"]) > 0  # trained: the threshold was estimated


def test_b_dec_init_and_dead_counter_read_every_rank(runs):
    a, b = _load(runs, "helpers")
    # rank 0 held 3 rows and rank 1 held 5: b_dec is the geometric median of all 8, on both ranks
    rows = torch.cat([torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 5)])
    assert torch.equal(a["b_dec"], b["b_dec"])
    torch.testing.assert_close(a["b_dec"], geometric_median(rows))
    # rank 0 fired latent 0, rank 1 latent 1; the other latents waited 3 + 5 tokens
    for r in (a, b):
        assert r["tokens_since_fired"].tolist() == [0, 0, 8, 8]
