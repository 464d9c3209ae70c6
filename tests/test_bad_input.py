"""Bad input stops with one line that names the key (or path) and says what to do.

Most cases run the entry function in-process (`saelab.__main__.run_recipe` on a composed config, what the
CLI calls) and read the line the CLI would print (`friendly_error`); two go through the CLI itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_cfg
from support import ROOT, SENTENCES, run_cli, save_tiny_causal_lm

from saelab.__main__ import friendly_error, run_recipe
from saelab.data.cache import build_cache
from saelab.data.text import TextActivations
from saelab.hosts import base as hosts_base
from saelab.hosts.causal_lm import EMBEDDED, CausalLMHost, _load, embedded_model_dir
from saelab.hosts.masked_lm import load_masked_lm
from saelab.io import save_sae
from saelab.objectives import MSE, Objective
from saelab.sae import SAE, TopK
from saelab.train import apply_debug
from saelab.types import SAEOutput, TrainState

# a run of a few steps on small synthetic data: a check that is missing lets it run (and end) in seconds
TINY = {
    "logger": "none",
    "trainer.max_steps": "4",
    "trainer.val_check_interval": "2",
    "trainer.limit_val_batches": "1",
    "checkpoint.every_n_steps": "2",
    "data.batch_size": "64",
    "sae.d_sae": "64",
    "eval/metrics": "[core]",
}


def user_line(overrides: list[str], run_dir: Path) -> str:
    """What `saelab <overrides>` prints after `saelab: error: ` (run in-process, tiny sizes)."""
    given = dict(o.split("=", 1) for o in overrides)
    sizes = {k: v for k, v in TINY.items() if not (given.get("sae") == "residual" and k == "sae.d_sae")}
    cfg = compose_cfg([f"{k}={v}" for k, v in (sizes | given).items()] + [f"+run_dir={run_dir}"])
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is part of the line checked below
        run_recipe(cfg)
    return friendly_error(info.value)


def assert_one_line(line: str, *parts: str) -> None:
    assert "\n" not in line, line
    for part in parts:
        assert part in line, f"{part!r} not in: {line}"


@pytest.mark.parametrize(
    "overrides,parts",
    [
        (["trainer.max_steps=abc"], ["trainer.max_steps='abc' is not an integer", "set trainer.max_steps"]),
        (["sae.d_sae=abc"], ["sae.d_sae='abc' is not a positive integer", "set sae.d_sae"]),
        (["sae.d_sae="], ["sae.d_sae is empty", "set sae.d_sae to a positive integer"]),
        (["sae.d_sae=12.5"], ["sae.d_sae=12.5 is not a positive integer"]),  # was truncated to 12
        (["optim.optimizer.lr=abc"], ["optim.optimizer.lr='abc' is not a positive number"]),
        (
            ["objective.terms.auxk.coeff=abc"],
            ["objective.terms.auxk.coeff='abc' is not a non-negative number"],
        ),
        (["objective/terms=[]"], ["the objective has no terms", "objective/terms=[mse,auxk]"]),
        (["sae=residual"], ["sae=residual has no base SAE", "set sae.base.path="]),
        (["data.batch_size=0"], ["data.batch_size=0 is not a positive integer", "set data.batch_size"]),
        # beyond the named keys: every typed parameter of a `_target_`, and keys no parameter takes
        (["objective.terms.auxk.k_aux=abc"], ["objective.terms.auxk.k_aux='abc' is not an integer"]),
        (["+sae.dsae=64"], ["sae.dsae is not a parameter of saelab.sae.SAE", "remove it"]),
    ],
)
def test_bad_value_names_its_key(tmp_path, overrides, parts):
    line = user_line(overrides, tmp_path)
    assert_one_line(line, "ConfigError: ", *parts)
    assert not (tmp_path / "checkpoints").exists(), "the run started before the value was checked"


def test_text_width_override_names_data_d_in(tmp_path):
    overrides = ["data=text", "data.d_in=512", "data.train_tokens=1024", "data.val_tokens=512"]
    line = user_line([*overrides, f"data.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert_one_line(line, "data.d_in=512", "data.host.d_in=576", "set data.d_in=576")


def test_cli_prints_one_line_for_a_bad_value(tmp_path):
    p = run_cli("sae.d_sae=", "logger=none", run_dir=tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("saelab: error: ")]
    part = "saelab: error: ConfigError: sae.d_sae is empty: set sae.d_sae to a positive integer"
    assert len(errors) == 1 and errors[0].startswith(part), p.stderr
    assert "Traceback" not in p.stderr


def test_nan_loss_hint_names_keys_that_exist():
    x = torch.full((2, 3), float("nan"))
    out = SAEOutput(x=x, x_hat=torch.zeros(2, 3), pre_acts=torch.zeros(2, 4), dense=torch.zeros(2, 4))
    with pytest.raises(Exception) as info:  # noqa: PT011
        Objective({"mse": MSE()})(out, None, TrainState())  # type: ignore[arg-type]
    line = str(info.value)
    assert "lower optim.optimizer.lr" in line and "objective.terms.mse.coeff" in line, line
    cfg = compose_cfg([])
    assert cfg.optim.optimizer.lr > 0 and cfg.objective.terms.mse.coeff > 0  # the keys it names exist


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=3, hidden=32)


def test_text_source_checks_its_width_against_the_host(tiny_llama, tmp_path):
    """Built from Python (no config check): the first harvested chunk names data.d_in."""
    host = CausalLMHost(str(tiny_llama), hook=1)  # width 32, not declared
    texts = SENTENCES * 6
    dm = TextActivations(
        host, texts, texts, d_in=99, context_len=16, train_tokens=128, val_tokens=32, batch_size=32,
        cache=True, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        dm.store("train")
    assert_one_line(str(info.value), "data.d_in=99", "set data.d_in=32")


def test_truncated_converted_model_names_its_folder(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "models" / EMBEDDED["smollm2"][2]
    shutil.copytree(tiny_llama, folder)
    (folder / ".complete").write_text("converted\n")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    _load.cache_clear()
    try:
        with pytest.raises(Exception) as info:  # noqa: PT011
            _ = CausalLMHost("smollm2").model
    finally:
        _load.cache_clear()  # later tests load the real embedded model again
    assert_one_line(friendly_error(info.value), str(folder), "delete that folder", "converts it again")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only. Permission bits do not stop root, so under root creating a file or folder
    below it is also refused, with the EACCES the kernel gives anyone else."""
    folder.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        p = Path(os.fsdecode(path))
        return p.resolve().is_relative_to(folder.resolve()) and not p.exists()

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.geteuid() == 0:
                mp.setattr(os, "open", open_)
                mp.setattr(os, "mkdir", mkdir_)
            yield folder
    finally:
        folder.chmod(0o755)


def _chunks(n: int = 64, d: int = 8):
    g = np.random.default_rng(0)
    return [(g.standard_normal((n, d)).astype(np.float32), np.arange(n))]


CACHE = {"host_id": "h", "hook": "0", "corpus_fingerprint": "c", "d_in": 8, "progress": False}


def test_read_only_activation_cache_says_what_to_do(tmp_path):
    root = tmp_path / "activations"
    built = build_cache(root, _chunks(), **CACHE)  # a cache that exists stays readable
    with read_only(root):
        assert build_cache(root, _chunks(), **CACHE).n_tokens == built.n_tokens
        with pytest.raises(OSError) as info:
            build_cache(root, _chunks(), **CACHE | {"corpus_fingerprint": "other"})
    assert_one_line(friendly_error(info.value), str(root), "data.cache_dir", "data.cache=false")


def test_unwritable_cache_root_names_saelab_cache(tmp_path, monkeypatch):
    from saelab.assets import cache_dir

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "ro" / "cache"))
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"), pytest.raises(OSError) as info:
        cache_dir()
    assert_one_line(friendly_error(info.value), str(tmp_path / "ro" / "cache"), "set SAELAB_CACHE")


def test_read_only_cache_cannot_take_the_model_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    with read_only(tmp_path), pytest.raises(OSError) as info:
        embedded_model_dir("smollm2")
    assert_one_line(friendly_error(info.value), str(tmp_path / "models"), "set SAELAB_CACHE to a writable")


def test_read_only_cache_still_embeds(tmp_path, monkeypatch, capsys):
    from saelab.hosts.embedder import SentenceEmbedder

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    with read_only(tmp_path):
        vecs = SentenceEmbedder(progress=False).encode(SENTENCES[:2])
    assert vecs.shape[0] == 2 and "not caching embeddings" in capsys.readouterr().out


def test_residual_on_a_topk_base_stops_before_training(tmp_path):
    base = save_sae(SAE(64, 32, TopK(4)), tmp_path / "base")  # a TopK export cannot be stitched
    line = user_line(["sae=residual", f"sae.base.path={base}", "sae.residual.d_sae=32"], tmp_path / "run")
    assert_one_line(line, "TopK base", "sae.base.path", "export=false")
    assert not (tmp_path / "run" / "checkpoints").exists(), "the SAE was trained before the export failed"


PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def no_network(monkeypatch):
    """Online mode with the HF hub at a local port nothing listens on."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXIES):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    probe = getattr(hosts_base, "_reachable", None)  # its answer is kept per process
    if probe is not None:
        probe.cache_clear()
    yield
    if probe is not None:
        probe.cache_clear()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "load,parts",
    [
        (
            lambda: load_masked_lm("facebook/esm2_t6_8M_UR50D", hook=3),
            ["data.host.source", "cannot be reached", "data/host=antiberty"],
        ),
        (
            lambda: CausalLMHost("EleutherAI/pythia-70m", hook=3).model,
            ["data.host.model", "cannot be reached", "data/host=smollm2"],
        ),
    ],
    ids=["esm2", "pythia"],
)
def test_online_host_without_network_fails_fast(no_network, load, parts):
    t0 = time.perf_counter()
    with pytest.raises(OSError) as info:
        load()
    seconds = time.perf_counter() - t0
    assert_one_line(friendly_error(info.value), *parts)
    assert seconds < 15, f"took {seconds:.0f} s to fail"


HOLDER = """
import sys, time
from saelab.data.cache import build_cache

def slow():
    print("holding", flush=True)
    time.sleep(60)
    yield

build_cache(sys.argv[1], slow, host_id="h", hook="0", corpus_fingerprint="c", d_in=8, progress=False)
"""


def test_waiting_job_names_the_lock_holder(tmp_path, capsys):
    root = tmp_path / "activations"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(Exception) as info:  # noqa: PT011
            build_cache(root, _chunks(), **CACHE, lock_timeout=1.0)
    finally:
        holder.kill()
        holder.wait()
    waiting = capsys.readouterr().err
    assert f"is being built by process {holder.pid} on {socket.gethostname()}" in waiting, waiting
    assert_one_line(friendly_error(info.value), f"locked by process {holder.pid}", "after 1 s")


def test_every_shipped_config_passes_the_checks(tmp_path):
    """No false alarms: every experiment, every sae and every data option pass (and +debug=tiny's sizes)."""
    from saelab.checks import check_config

    configs = [[f"+experiment={p.stem}"] for p in sorted((CONF / "experiment").glob("*.yaml"))]
    configs += [[f"data={p.stem}"] for p in sorted((CONF / "data").glob("*.yaml"))]
    for sae in sorted(p.stem for p in (CONF / "sae").glob("*.yaml")):
        configs.append([f"sae={sae}", *([f"sae.base.path={tmp_path}"] if sae == "residual" else [])])
    configs += [["+experiment=boost_domain", "+debug=tiny"], ["+experiment=ortsae_text", "+debug=tiny"]]
    for overrides in configs:
        check_config(apply_debug(compose_cfg(overrides)))
