"""The notebook handle `saelab.inspect.Lab` on a tiny random Llama (export and run dirs, every call against a
direct computation), and the example script end to end on the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ENV, ROOT, SENTENCES, save_tiny_causal_lm

from saelab.analysis.lens import logit_lens
from saelab.hosts.causal_lm import EMBEDDED_ORIGIN, CausalLMHost
from saelab.inspect import Lab
from saelab.io import load_sae, save_sae
from saelab.sae import SAE, TopK

SCALE = 2.0  # the SAE is trained on 2·h: every Lab result must be in host units all the same


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, export dir) of a tiny random Llama and an SAE on its block 1, exported with s = 2."""
    root = tmp_path_factory.mktemp("inspect")
    model = save_tiny_causal_lm(root / "llama", "llama", n_layers=3, hidden=32)
    host = CausalLMHost(str(model), hook=1)
    sae = SAE(32, 48, TopK(6), seed=0)
    export = save_sae(sae, root / "export" / "sae", host.export_metadata, act_scale=SCALE)
    return model, export


def _run_dir(path, model, export, stages=("",)):
    """A run dir as `saelab` leaves it: `.hydra/config.yaml` naming the host, and one export per stage."""
    (path / ".hydra").mkdir(parents=True)
    cfg = {
        "seed": 0,
        "data": {
            "_target_": "saelab.data.text.TextActivations",
            "host": {
                "_target_": "saelab.hosts.causal_lm.CausalLMHost",
                "model": str(model),
                "hook": 1,
                "d_in": 32,
            },
        },
    }
    (path / ".hydra" / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    for s in stages:
        dest = path / s / "sae" if s else path / "sae"
        dest.mkdir(parents=True)
        for f in export.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
    return path


def test_load_an_export_and_encode_in_host_units(tiny):
    model, export = tiny
    lab = Lab.load(export)
    assert lab.host.model_id == str(model) and lab.host.hook == "model.layers.1"
    assert lab.scale == SCALE
    c = lab.encode(SENTENCES[0])
    ids, att = lab.host.prompt_ids([SENTENCES[0]])
    h = lab.host.activations(ids, att)[0, 1:]  # BOS left out
    sae = load_sae(export)
    torch.testing.assert_close(c.codes, sae.encode(h * SCALE) / SCALE)
    assert c.ids.tolist() == ids[0, 1:].tolist()
    assert c.tokens == [lab.host.tokenizer.decode([i]) for i in c.ids.tolist()]
    active = c.active(0)
    assert len(active) == 6 and active == sorted(active, key=lambda p: -p[1])  # TopK(6)


def test_top_latents_by_activation_then_density_aware(tiny, tmp_path):
    model, export = tiny
    export = Path(shutil.copytree(export, tmp_path / "export" / "sae"))  # records get saved beside it
    lab = Lab.load(export, texts=SENTENCES * 3)
    c = lab.encode(SENTENCES[1])
    best = c.codes.max(0).values
    hits = lab.top_latents(SENTENCES[1], k=5)
    assert [h.latent for h in hits] == best.argsort(descending=True)[:5].tolist()  # no records: activation
    assert all(h.density is None for h in hits) and "latent" in str(hits)
    h = hits[0]
    assert h.act == pytest.approx(float(c.codes[h.position, h.latent])) and h.token == c.tokens[h.position]

    rec = lab.records(budget=256, context_len=32)  # collected now from `texts`
    ranked = lab.top_latents(SENTENCES[1], k=48)
    dens = rec.density.float().clamp_min(1 / rec.n_tokens)
    for h in ranked:
        assert h.density == pytest.approx(float(dens[h.latent]))
        assert h.score == pytest.approx(h.act * math.log(1 / h.density), rel=1e-5)
    assert [h.score for h in ranked] == sorted((h.score for h in ranked), reverse=True)

    # saved with the run, the records are found by the next Lab
    rec.save(export.parent)
    again = Lab.load(export)
    assert again.records_if_any() is not None and again.records_if_any().n_tokens == rec.n_tokens


def test_contexts_lens_explanation(tiny, tmp_path):
    model, export = tiny
    run = _run_dir(tmp_path / "run", model, export)
    lab = Lab.load(run, texts=SENTENCES * 3)
    rec = lab.records(budget=256, context_len=32)
    j = int(rec.count.argmax())
    shown = lab.contexts(j, k=3)
    top = rec.latent(j).top[:3]
    assert [s.act for s in shown] == pytest.approx([t.act for t in top])
    centre = lab.host.tokenizer.decode([top[0].tokens[rec.window[0]]])
    assert shown[0].tokens[shown[0].centre] == centre and f"«{centre}»" in shown[0].text
    assert shown[0].acts[shown[0].centre] == pytest.approx(top[0].act, rel=1e-4)
    assert lab.keywords(j, source="contexts") == [
        w for w in lab.keywords(j, source="contexts") if len(w) >= 3
    ]

    lens = lab.lens(j, k=5)
    ref = logit_lens(load_sae(export), lab.host, [j], k=5, scale=SCALE)
    assert lens.promoted_ids.tolist() == ref.promoted_ids.tolist()

    assert lab.explanation(j) is None
    (run / "autointerp").mkdir()
    rows = [
        {"latent": j, "explanation": "physics words", "detection": 0.7},
        {"latent": 3, "explanation": "x"},
    ]
    (run / "autointerp" / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert Lab.load(run).explanation(j) == "physics words"


def test_spliced_loss_and_steer(tiny):
    model, export = tiny
    lab = Lab.load(export)
    text = SENTENCES[2]
    out = lab.spliced_loss(text)
    ids, att = lab.host.prompt_ids([text])
    clean = lab.host.token_losses(ids, att)
    sae = load_sae(export)

    def splice(h):  # every position but BOS gets x̂(s·h)/s
        h = h.clone()
        h[:, 1:] = sae(h[:, 1:].reshape(-1, 32) * SCALE).x_hat.reshape(h[:, 1:].shape) / SCALE
        return h

    with lab.host.spliced(splice):
        spliced = lab.host.token_losses(ids, att)
    assert out.clean == pytest.approx(float(clean.mean()), rel=1e-5)
    assert out.spliced == pytest.approx(float(spliced.mean()), rel=1e-5)
    assert out.delta == pytest.approx(out.spliced - out.clean) and out.n_tokens == ids.shape[1] - 1

    plain, same = lab.steer(3, 0.0, "The committee met", 6)
    assert plain == same == lab.host.generate("The committee met", 6)
    assert lab.steer(3, 50.0, "The committee met", 6).steered != plain


def test_run_dirs_stages_and_errors(tiny, tmp_path):
    model, export = tiny
    multi = _run_dir(tmp_path / "multi", model, export, stages=("batchtopk", "matryoshka"))
    with pytest.raises(ValueError, match=r"one export per stage \(batchtopk, matryoshka\): pass stage="):
        Lab.load(multi)
    lab = Lab.load(multi, stage="matryoshka")
    assert lab.host.model_id == str(model) and lab.dirs == [multi / "matryoshka", multi]
    with pytest.raises(FileNotFoundError, match="no export for stage 'topk'"):
        Lab.load(multi, stage="topk")
    # an export inside a run dir finds the run (its config, its features/ and autointerp/)
    single = _run_dir(tmp_path / "single", model, export)
    assert Lab.load(single / "sae").dirs == [single]

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saelab run dir .* nor an SAE export"):
        Lab.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Lab.load(tmp_path / "missing")
    bare = _run_dir(tmp_path / "bare", model, export, stages=())
    with pytest.raises(FileNotFoundError, match="without an SAE export"):
        Lab.load(bare)
    synthetic = _run_dir(tmp_path / "synthetic", model, export)
    (synthetic / ".hydra" / "config.yaml").write_text("data:\n  _target_: saelab.data.synthetic.Synthetic\n")
    with pytest.raises(ValueError, match="no host model to inspect"):
        Lab.load(synthetic)
    # host= overrides what the run or export names
    other = CausalLMHost(str(model), hook=2)
    assert Lab.load(export, host=other).host is other


def test_an_embedded_model_export_maps_back_to_the_embedded_host(tmp_path):
    """An export made on the embedded SmolLM2 names the upstream HF id and notes the dequantised weights;
    without `saelab_host` (e.g. rewritten by another tool) that note still maps it back, offline. The host is
    built lazily, so nothing is loaded here."""
    origin, note = EMBEDDED_ORIGIN["smollm2"]
    meta = {"model_name": origin, "model_weights": note, "hook_name": "blocks.6.hook_resid_post"}
    lab = Lab.load(save_sae(SAE(576, 8, TopK(2)), tmp_path / "sae", meta))
    assert (lab.host.model_id, lab.host.identity["hook"]) == ("smollm2", "6")
    plain = save_sae(SAE(576, 8, TopK(2)), tmp_path / "plain", {"model_name": origin, "hook_name": "x"})
    with pytest.raises(ValueError, match="names no model or hook"):
        Lab.load(plain)


@pytest.mark.slow
def test_example_script_end_to_end(tmp_path):
    """examples/inspect_latent.py trains a tiny SAE on SmolLM2 through the CLI and walks the whole API;
    everything it writes stays under the folder it is given."""
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "inspect_latent.py"), str(out), "--steps", "40"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for marker in ("== encode", "density-aware", "top contexts", "logit lens", "spliced loss", "steered:"):
        assert marker in p.stdout
    assert (out / "run" / "sae" / "cfg.json").is_file() and (out / "run" / ".hydra" / "config.yaml").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
