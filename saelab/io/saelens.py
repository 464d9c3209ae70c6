"""Export and import in the SAELens v6 on-disk format: `cfg.json` + `sae_weights.safetensors`.

Layout (anchors §3): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus
`threshold` [d_sae] for JumpReLU-type SAEs. saelab activations map to SAELens architectures as
ReLU → "standard", TopK → "topk", JumpReLU and BatchTopK (its inference threshold) → "jumprelu".
`metadata.saelab_activation` records the original activation so saelab reloads it unchanged.
A residual (boosted) SAE is exported "stitched": one JumpReLU SAE whose dictionary is the base's
followed by the residual's, with identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saelab.files import atomic_dir
from saelab.sae import SAE, BatchTopK, JumpReLU, ReLU, ResidualSAE, TopK

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


def save_sae(sae: SAE | ResidualSAE, path: str | Path, metadata: dict | None = None) -> Path:
    """Write `sae` to `path` in SAELens format (atomically) and return the path."""
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
        save_file(sd, str(tmp / "sae_weights.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return Path(path)


def _build_activation(arch: str, cfg: dict, d_sae: int):
    spec = (cfg.get("metadata") or {}).get("saelab_activation") or {}
    name = spec.get("name")
    if name == "batchtopk":
        return BatchTopK(spec["k"], spec.get("threshold_momentum", 0.99))
    if name == "jumprelu" or (name is None and arch == "jumprelu"):
        return JumpReLU(d_sae, bandwidth=spec.get("bandwidth", 0.001))
    if name == "topk" or (name is None and arch == "topk"):
        k = spec.get("k", cfg.get("k"))
        if k is None:
            raise ValueError("a topk SAELens export needs k in cfg.json (or metadata.saelab_activation).")
        return TopK(int(k))
    if name == "relu" or (name is None and arch == "standard"):
        return ReLU()
    raise ValueError(f"cannot load SAELens architecture {arch!r}: saelab reads standard, topk and jumprelu.")


def load_sae(path: str | Path | None) -> SAE:
    """Read a SAELens-format directory (written by saelab or by SAELens) into a saelab `SAE`."""
    if path is None:
        raise ValueError("no SAE export directory given (for sae=residual set sae.base.path=<export dir>).")
    path = Path(path)
    cfg_file, w_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(
            f"{path} is not a SAELens export: it needs cfg.json and sae_weights.safetensors."
        )
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(
            f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it first."
        )
    sd = load_file(str(w_file))
    if "log_threshold" in sd and "threshold" not in sd:
        sd["threshold"] = sd.pop("log_threshold").exp()
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    act = _build_activation(arch, cfg, d_sae)
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    sae = SAE(d_in, d_sae, act, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), dtype=dtype)
    sae.load_weights(w_file)
    if isinstance(act, BatchTopK):
        act.threshold.copy_(sd["threshold"].max())
    return sae.eval()
