"""Export and import in the SAELens v6 on-disk format: `cfg.json` + `sae_weights.safetensors`.

Layout (anchors §3): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus
`threshold` [d_sae] for JumpReLU-type SAEs. saelab activations map to SAELens architectures as
ReLU → "standard", TopK → "topk", JumpReLU and BatchTopK (its inference threshold) → "jumprelu".
`metadata.saelab_activation` records the original activation so saelab reloads it unchanged.
A residual (boosted) SAE is exported "stitched": one JumpReLU SAE whose dictionary is the base's
followed by the residual's, with identical outputs.

An export reads the host's raw activations h, as SAELens, SAEBench and Neuronpedia feed them. A source
that normalises its inputs trains the SAE on s·h (`act_scale`, E‖s·h‖² = d_in); that scale is folded into
the written weights (b_enc, b_dec and threshold ÷ s, `saelab.sae.model.rescale_inputs`), so the export
gives codes f(s·h)/s and reconstruction x̂(s·h)/s for h. `metadata.act_scale` and
`metadata.saelab_folded_scale` record s; `load_sae` multiplies it back in, returning the SAE as trained.
`source_metadata` names the host model, hook, context size, BOS and data set the way SAELens does.

`metadata.saelab_weights_sha256` is the sha256 of `sae_weights.safetensors`; `load_sae` and `sae.init_from`
check it (exports without one, from SAELens or an older saelab, load unchecked, as do weights another tool
rewrote: `saelab.files.WRITER_TAG`), and `load_sae` checks that
`cfg.json` is consistent (known architecture, positive integer d_in/d_sae, k ≤ d_sae, tensor shapes) before
building anything, so a damaged export stops with one line naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saelab.files import CorruptFile, atomic_dir, save_safetensors
from saelab.sae import SAE, BatchTopK, JumpReLU, ReLU, ResidualSAE, TopK
from saelab.sae.model import (
    FOLDED_SCALE_KEY,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_KEY,
    fix_export,
    read_export,
    rescale_inputs,
    scale_of,
)

SAELENS_VERSION = (
    "6.54.12"  # the format version written (v6 layout; checked with sae_lens.SAE.load_from_disk)
)


def _activation_spec(act) -> tuple[str, dict, dict]:
    """(SAELens architecture, extra cfg keys, saelab activation spec)."""
    if isinstance(act, TopK):
        return "topk", {"k": act.k, "rescale_acts_by_decoder_norm": False}, {"name": "topk", "k": act.k}
    if isinstance(act, BatchTopK):
        spec = {"name": "batchtopk", "k": act.k, "threshold_momentum": act.threshold_momentum}
        return "jumprelu", {}, spec
    if isinstance(act, JumpReLU):
        return "jumprelu", {}, {"name": "jumprelu", "bandwidth": act.bandwidth}
    if isinstance(act, ReLU):
        return "standard", {}, {"name": "relu"}
    raise TypeError(f"no SAELens architecture for activation {type(act).__name__}")


def _threshold(act, d_sae: int) -> torch.Tensor | None:
    if isinstance(act, BatchTopK):
        return torch.full((d_sae,), max(float(act.threshold), 0.0))
    if isinstance(act, JumpReLU):
        return act.threshold.detach().float().clone()
    return None


def _weights(sae: SAE) -> tuple[dict[str, torch.Tensor], bool]:
    sd = {n: getattr(sae, n).detach().contiguous().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return sd, sae.apply_b_dec_to_input


def _stitched(sae: ResidualSAE) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    base, res = sae.base, sae.residual
    th_b, th_r = _threshold(base.activation, base.d_sae), _threshold(res.activation, res.d_sae)
    if th_b is None and isinstance(base.activation, ReLU):
        th_b = torch.zeros(base.d_sae)
    if th_r is None and isinstance(res.activation, ReLU):
        th_r = torch.zeros(res.d_sae)
    if th_b is None or th_r is None:
        raise TypeError(
            "a residual SAE exports as one stitched JumpReLU SAE only when base and residual use "
            "ReLU, JumpReLU or BatchTopK activations; export base and residual separately instead."
        )
    # fold the base's input centring into its encoder bias: (x − b)W + c = xW + (c − bW)
    b_enc_base = base.b_enc - (base.b_dec @ base.W_enc if base.apply_b_dec_to_input else 0)
    sd = {
        "W_enc": torch.cat([base.W_enc, res.W_enc], 1),
        "b_enc": torch.cat([b_enc_base, res.b_enc]),
        "W_dec": torch.cat([base.W_dec, res.W_dec], 0),
        "b_dec": base.b_dec + res.b_dec,
    }
    return (
        {k: v.detach().contiguous().clone() for k, v in sd.items()},
        {"stitched": [base.d_sae, res.d_sae]},
        torch.cat([th_b, th_r]),
    )


def check_exportable(sae: SAE | ResidualSAE) -> None:
    """Raise the TypeError `save_sae` would raise for this SAE's architecture, without writing anything:
    `saelab.stage.train_stage` calls it before the fit, so a run that could not be exported stops before
    it trains, not after."""
    if isinstance(sae, ResidualSAE):
        _stitched(sae)
    else:
        _activation_spec(sae.activation)


def source_metadata(source: Any) -> dict[str, Any]:
    """The SAELens metadata of an SAE trained on `source`: the fields SAELens, SAEBench and Neuronpedia key on.

    The source's host gives `model_name`, `hook_name` (SAELens naming), `hf_hook_name` and any note on its
    weights (`export_metadata`). A text source adds `context_size` (its `context_len`), `prepend_bos` (its
    contexts open with BOS when the host has one) and `dataset_path` (the training corpus); a protein
    source adds its window length with the start and end tokens. Fields a source cannot fill are left out.
    """
    host = getattr(source, "host", None)
    meta = dict(getattr(host, "export_metadata", None) or {})
    if host is not None and "model_name" not in meta:
        meta["model_name"] = getattr(host, "model_id", None) or type(host).__name__
    if getattr(source, "context_len", None) is not None:
        meta["context_size"] = int(source.context_len)
        meta["prepend_bos"] = getattr(host, "bos_id", None) is not None
    elif getattr(source, "max_residues", None) is not None and host is not None:
        # sequences are cut into windows of at most this many residues, between start and end tokens
        longest = min(int(source.max_residues), int(getattr(host, "max_residues", source.max_residues)))
        meta["context_size"] = longest + 2
    name = getattr(getattr(source, "corpus", None), "name", None)
    if name:
        meta["dataset_path"] = str(name)
    elif hasattr(source, "files"):
        meta["dataset_path"] = ",".join(source.files or []) or "Swiss-Prot entries of Debian emboss-test"
    return meta


def save_sae(
    sae: SAE | ResidualSAE,
    path: str | Path,
    metadata: dict | None = None,
    act_scale: float | None = None,
) -> Path:
    """Write `sae` to `path` in SAELens format (atomically) and return the path.

    Args:
        sae: the SAE (a residual SAE is written stitched).
        path: the export directory.
        metadata: extra `cfg.json` metadata (`source_metadata` gives the host, hook and data fields).
        act_scale: the scale s of the inputs the SAE was trained on (s·h); folded into the written weights so
            the export reads h. Default: the scale `load_sae` recorded on the SAE (or its base), else 1.
    """
    if act_scale is None:
        trained = sae.base if isinstance(sae, ResidualSAE) else sae
        act_scale = float(getattr(trained, "act_scale", None) or 1.0)
    recorded = (metadata or {}).get("act_scale", act_scale)
    if recorded != act_scale:  # a scale only recorded, not folded, would leave the export in s·h units
        raise ValueError(
            f"metadata act_scale={recorded} but the weights are folded with {act_scale}: "
            "pass the scale as save_sae(..., act_scale=...)."
        )
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION, "saelab": True}
    meta.update(metadata or {})
    extra: dict[str, Any]
    threshold: torch.Tensor | None
    if isinstance(sae, ResidualSAE):
        sd, extra_meta, threshold = _stitched(sae)
        arch, extra, apply_b_dec = "jumprelu", {}, False
        meta.update(extra_meta)
        meta["saelab_activation"] = {"name": "jumprelu", "bandwidth": 0.001}
    else:
        sd, apply_b_dec = _weights(sae)
        arch, extra, spec = _activation_spec(sae.activation)
        threshold = _threshold(sae.activation, sae.d_sae)
        meta["saelab_activation"] = spec
    if threshold is not None:
        sd["threshold"] = threshold.to(sd["W_enc"].dtype).contiguous()
    sd = rescale_inputs(sd, 1.0 / act_scale)
    meta["act_scale"] = meta[FOLDED_SCALE_KEY] = float(act_scale)
    dtype = str(sd["W_enc"].dtype).replace("torch.", "")
    cfg = {
        "architecture": arch,
        "d_in": int(sd["W_enc"].shape[0]),
        "d_sae": int(sd["W_enc"].shape[1]),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(apply_b_dec),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "model_name": None,
            "hook_name": None,
            "context_size": None,
            "prepend_bos": True,
            **meta,
        },
    }
    with atomic_dir(path) as tmp:
        cfg["metadata"][WEIGHTS_SHA256_KEY] = save_safetensors(sd, tmp / WEIGHTS_FILE)
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return Path(path)


ARCHITECTURES = ("standard", "topk", "jumprelu")  # the SAELens architectures saelab reads
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")  # names in metadata.saelab_activation


def _bad(cfg_file: Path, problem: str) -> CorruptFile:
    return CorruptFile(f"{cfg_file}: {problem}. {fix_export(cfg_file.parent)}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_cfg(cfg: dict, cfg_file: Path) -> tuple[str, int, int]:
    """(architecture, d_in, d_sae) of a `cfg.json`, after checking every field `load_sae` uses; a bad one
    raises one line naming the file and the field."""
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{cfg_file}: architecture={arch!r} is not one saelab reads ({', '.join(ARCHITECTURES)})."
        )
    for name in ("d_in", "d_sae"):
        if not _positive_int(cfg.get(name)):
            raise _bad(cfg_file, f"{name}={cfg.get(name)!r} is not a positive integer")
    d_sae = cfg["d_sae"]
    spec = cfg["metadata"].get("saelab_activation") if cfg.get("metadata") else None
    if spec is not None and (not isinstance(spec, dict) or spec.get("name") not in ACTIVATIONS):
        raise _bad(cfg_file, f"metadata.saelab_activation={spec!r} is none of {', '.join(ACTIVATIONS)}")
    act_name = (spec or {}).get("name")
    if act_name in ("topk", "batchtopk") or (act_name is None and arch == "topk"):
        field, k = (
            ("metadata.saelab_activation.k", spec["k"]) if spec and "k" in spec else ("k", cfg.get("k"))
        )
        if not _positive_int(k):
            raise _bad(cfg_file, f"{field}={k!r} is not a positive integer")
        if k > d_sae:
            raise _bad(cfg_file, f"{field}={k} exceeds d_sae={d_sae}")
    return arch, cfg["d_in"], d_sae


def _check_shapes(sd: dict[str, torch.Tensor], d_in: int, d_sae: int, w_file: Path) -> None:
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if "threshold" in sd:
        want["threshold"] = (d_sae,)
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise CorruptFile(
                f"{w_file}: {name} has shape {tuple(sd[name].shape)}, but cfg.json's d_in={d_in}, "
                f"d_sae={d_sae} make it {shape}. {fix_export(w_file.parent)}"
            )


def _build_activation(arch: str, cfg: dict, d_sae: int):
    spec = (cfg.get("metadata") or {}).get("saelab_activation") or {}
    name = spec.get("name")
    if name == "batchtopk":
        return BatchTopK(spec["k"] if "k" in spec else cfg["k"], spec.get("threshold_momentum", 0.99))
    if name == "jumprelu" or (name is None and arch == "jumprelu"):
        return JumpReLU(d_sae, bandwidth=spec.get("bandwidth", 0.001))
    if name == "topk" or (name is None and arch == "topk"):
        return TopK(spec["k"] if "k" in spec else cfg["k"])  # checked by _check_cfg
    return ReLU()


def load_sae(path: str | Path | None, trainable: bool = False) -> SAE:
    """Read a SAELens-format directory (written by saelab or by SAELens) into a saelab `SAE`.

    The SAE comes back as trained: an export whose inputs were scaled by s in training (`act_scale`, folded
    out on export) reads s·h again, and records s as `sae.act_scale` (1.0 otherwise). It is ready for
    inference (eval mode, no parameter gradients) unless `trainable`, which gives train mode and gradients.
    The weights' recorded sha256 and the fields of `cfg.json` are checked first (`CorruptFile` on a mismatch).
    """
    if path is None:
        raise ValueError("no SAE export directory given (for sae=residual set sae.base.path=<export dir>).")
    path = Path(path)
    cfg_file, w_file = path / "cfg.json", path / WEIGHTS_FILE
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(
            f"{path} is not a SAELens export: it needs cfg.json and sae_weights.safetensors."
        )
    export = read_export(path)  # checksum, readable JSON and tensors; a folded input scale multiplied back in
    cfg = export.cfg
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(
            f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it first."
        )
    arch, d_in, d_sae = _check_cfg(cfg, cfg_file)
    _check_shapes(export.weights, d_in, d_sae, export.file)
    act = _build_activation(arch, cfg, d_sae)
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    try:
        sae = SAE(
            d_in, d_sae, act, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), dtype=dtype
        )
    except ValueError as e:  # e.g. an unknown dtype: the message names the field
        raise _bad(cfg_file, str(e).rstrip(".")) from e
    sae.set_weights(export.weights, export.file)
    # a plain attribute, not state: `save_sae` folds it out again when this SAE is exported anew
    # (setattr because nn.Module's __setattr__ is typed for tensors and modules only)
    setattr(sae, "act_scale", scale_of(cfg.get("metadata") or {}, cfg_file))  # noqa: B010
    return sae.train(trainable).requires_grad_(trainable)
