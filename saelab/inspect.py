"""A notebook handle on one trained text SAE and its host model, as in SAELens's hooked-model workflow.

    from saelab.inspect import Lab
    lab = Lab.load("outputs/train/<run>")        # a run dir, or an export dir (cfg.json + weights)
    lab.encode("The cat sat on the mat")          # per-token codes [seq, d_sae] and the tokens
    lab.top_latents("The cat sat", k=10)          # strongest latents, density-aware when records exist
    lab.contexts(337); lab.lens(337); lab.explanation(337)
    lab.spliced_loss("some text")                 # clean vs spliced next-token CE
    lab.steer(337, alpha=8.0, prompt="My neighbour said")

Everything is in host units: the SAE was trained on s·h (s: the source's `act_scale`, recorded in the export
and multiplied back in by `load_sae`), so codes are f(s·h)/s, as in the feature records, and edits add
α·W_dec[j]/s. What each call does is the library function it wraps: `saelab.analysis.features`
(Bricken et al. 2023, "Towards Monosemanticity": top and quantile-sampled contexts), `saelab.analysis.lens`
(logit lens of decoder rows), `saelab.eval.spliced` (CE with the reconstruction spliced in, as SAELens's
`get_recons_loss`), `saelab.analysis.steering` (activation steering, Turner et al. arXiv:2308.10248, and the
α sweep).

Loading. A run dir has `.hydra/config.yaml` (or `hydra/.hydra/config.yaml` when the run was given
`hydra.run.dir=<run>/hydra`) and an export `sae/` (single-stage recipes) or `<stage>/sae/` (multi-stage
ones: pass `stage=`); the host is built from the run's `data.host` config with Hydra, the one place here
that reads a config (this module is an entry point, like `saelab.train`). An export dir alone names its host
in `cfg.json` metadata: `saelab_host` (an embedded model: "smollm2"), or `model_name` with a
`model_weights` note that matches an embedded model's (`EMBEDDED_ORIGIN`: the upstream id of the
dequantised weights), else `model_name` as an HF id; the hook is `hf_hook_name` (or the block of SAELens's
`blocks.{i}.hook_resid_post`). `host=` overrides either. Feature records are read from `features/` next to
the export or in the run dir, explanations from `autointerp/explanations.jsonl` likewise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.analysis.features import FOLDER as FEATURES
from saelab.analysis.features import FeatureRecords, collect_feature_records
from saelab.analysis.lens import LogitLens, logit_lens
from saelab.analysis.steering import SteeringResult, keywords_from_tokens, steering_sweep, suggest_keywords
from saelab.data.text import Contexts, pack
from saelab.edit import LatentEdit
from saelab.eval.base import in_host_units
from saelab.eval.spliced import sae_splice
from saelab.hosts.causal_lm import EMBEDDED_ORIGIN, CausalLMHost
from saelab.io import load_sae

EXPLANATIONS = Path("autointerp") / "explanations.jsonl"
RUN_CONFIGS = (Path(".hydra") / "config.yaml", Path("hydra") / ".hydra" / "config.yaml")
# the held-out texts contexts are collected from on demand when neither the run nor the caller names any
DEFAULT_CORPUS = "general"


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class Codes:
    """The SAE codes of one text, per token (BOS left out: the SAE never sees it), in host units."""

    text: str
    ids: Int[Tensor, " seq"]
    tokens: list[str]
    codes: Float[Tensor, "seq d_sae"]

    def active(self, position: int) -> list[tuple[int, float]]:
        """(latent, activation) of every latent firing at `position`, strongest first."""
        row = self.codes[position]
        nz = torch.nonzero(row > 0).squeeze(1)
        order = row[nz].argsort(descending=True)
        return [(int(nz[i]), float(row[nz[i]])) for i in order]


@dataclass(frozen=True)
class LatentHit:
    """One latent at its strongest position in a text; `density` is None without feature records."""

    latent: int
    position: int
    token: str
    act: float
    density: float | None
    score: float


class Hits(list):
    """A list of `LatentHit` that prints as a table."""

    def __str__(self) -> str:
        lines = [f"{'latent':>7} {'pos':>4} {'token':<16} {'act':>9} {'density':>9} {'score':>9}"]
        for h in self:
            d = "-" if h.density is None else f"{h.density:.2e}"
            lines.append(
                f"{h.latent:>7} {h.position:>4} {h.token!r:<16} {h.act:>9.3g} {d:>9} {h.score:>9.3g}"
            )
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython
        p.text(str(self))


@dataclass(frozen=True)
class ShownContext:
    """One recorded context of a latent: its window's tokens, the latent's activation at each, and the
    selected position (`centre`, an index into `tokens`)."""

    act: float
    doc: int
    pos: int
    tokens: list[str]
    acts: list[float]
    centre: int

    @property
    def text(self) -> str:
        """The window with the selected token in «»."""
        return "".join(f"«{t}»" if i == self.centre else t for i, t in enumerate(self.tokens))

    def __str__(self) -> str:
        return f"{self.act:9.3g}  {self.text!r}"


class ShownContexts(list):
    """A list of `ShownContext` that prints one per line."""

    def __str__(self) -> str:
        return "\n".join(map(str, self))

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


class SplicedLoss(NamedTuple):
    """Mean next-token CE of a text, clean and with the SAE reconstruction in place of the hook output."""

    clean: float
    spliced: float
    delta: float  # spliced − clean
    n_tokens: int


class Steered(NamedTuple):
    """One prompt continued without and with the edit (same decoding, same seed)."""

    unsteered: str
    steered: str

    def __str__(self) -> str:
        return f"unsteered: {self.unsteered!r}\nsteered:   {self.steered!r}"


# ---------------------------------------------------------------------- the handle
class Lab:
    """One SAE on one causal-LM host, with what the run saved about it (see the module docstring).

    Args:
        sae: the SAE as trained (on s·h, s = `sae.act_scale` as `load_sae` records it, else `scale`).
        host: the causal LM host it reads.
        records: feature records (None: read from `dirs` on first use, else collected on demand).
        dirs: folders searched for `features/` and `autointerp/explanations.jsonl`, first match wins.
        texts: held-out texts for contexts collected on demand (None: the run's validation corpus, or the
            "general" corpus's test split).
        scale: the activation scale s, when the SAE does not record one.
    """

    def __init__(
        self,
        sae,
        host: CausalLMHost,
        records: FeatureRecords | None = None,
        dirs: Sequence[str | Path] = (),
        texts: Sequence[str] | None = None,
        scale: float | None = None,
    ) -> None:
        self.sae, self.host = sae, host
        self.scale = float(scale if scale is not None else (getattr(sae, "act_scale", None) or 1.0))
        self.dirs = [Path(d) for d in dirs]
        self._records, self._texts = records, None if texts is None else list(texts)
        self._records_read = records is not None
        self._corpus_cfg: Any = None  # the run's val_corpus config node, when loaded from a run
        self._explanations: dict[int, str] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        host: CausalLMHost | None = None,
        stage: str | None = None,
        texts: Sequence[str] | None = None,
        device: str | None = None,
    ) -> Lab:
        """A Lab on a run dir (its config builds the host) or an export dir (its metadata names the host).

        `stage`: which export of a multi-stage run (`<run>/<stage>/sae`); `host`: use this host instead;
        `device`: put host and SAE there (default: the run's host device, or cpu).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: no such directory (want a saelab run dir or an SAE export dir)."
            )
        if (path / "cfg.json").is_file():
            export, run = path, _run_above(path)
        elif _run_config(path) is not None:
            export, run = _export_of(path, stage), path
        else:
            raise ValueError(
                f"{path} is neither a saelab run dir (.hydra/config.yaml with an export sae/) nor an SAE export "
                "(cfg.json + sae_weights.safetensors)."
            )
        sae = load_sae(export)
        cfg_file = None if run is None else _run_config(run)
        cfg = None if cfg_file is None else _read_config(cfg_file)
        if host is None:
            host = (
                _host_from_config(cfg, run, device)
                if cfg is not None
                else _host_from_export(export, sae, device)
            )
        if device is not None or host.device != "cpu":
            sae = sae.to(device or host.device)
        dirs = [export, export.parent] if run is None else [export.parent, run]
        lab = cls(sae, host, dirs=list(dict.fromkeys(dirs)), texts=texts)
        if cfg is not None and texts is None:
            lab._corpus_cfg = (cfg.get("data") or {}).get("val_corpus")
        return lab

    # ------------------------------------------------------------------ codes
    @torch.no_grad()
    def encode(self, text: str) -> Codes:
        """Per-token SAE codes of `text` (after BOS, as the activation data has it), in host units."""
        ids, att = self.host.prompt_ids([text])
        h = self.host.activations(ids, att)[0]  # (seq, d_in)
        start = 0 if self.host.bos_id is None else 1  # BOS never reaches the SAE
        W = self.sae.W_dec
        f = self.sae.encode((h[start:] * self.scale).to(W.device, W.dtype)).float().cpu() / self.scale
        row = ids[0, start:]
        return Codes(text, row, self._decode_each(row.tolist()), f)

    def top_latents(self, text: str, k: int = 10) -> Hits:
        """The `k` latents that fire most on `text`, each at its strongest token.

        With feature records the score is act × log(1/density) (density floored at 1/n_tokens), so latents
        that fire everywhere rank below rarer ones of similar strength (the idea of TF-IDF); without them
        it is the activation.
        """
        c = self.encode(text)
        best, where = (
            c.codes.max(0) if c.codes.shape[0] else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        )
        live = torch.nonzero(best > 0).squeeze(1)
        rec = self.records_if_any()
        if rec is not None:
            dens = rec.density.float().clamp_min(1.0 / max(rec.n_tokens, 1))[live]
            score = best[live] * torch.log(1.0 / dens)
        else:
            dens, score = None, best[live]
        order = score.argsort(descending=True)[:k]
        return Hits(
            LatentHit(
                latent=int(live[i]),
                position=int(where[live[i]]),
                token=c.tokens[int(where[live[i]])],
                act=float(best[live[i]]),
                density=None if dens is None else float(dens[i]),
                score=float(score[i]),
            )
            for i in order.tolist()
        )

    # ------------------------------------------------------------------ records and contexts
    def records_if_any(self) -> FeatureRecords | None:
        """Feature records saved with the run (or collected earlier in this session); None if there are none."""
        if not self._records_read:
            self._records_read = True
            d_sae = int(self.sae.W_dec.shape[0])
            for d in self.dirs:
                if (d / FEATURES / "meta.json").is_file():
                    rec = FeatureRecords.load(d)
                    if rec.d_sae == d_sae:
                        self._records = rec
                        break
                    print(
                        f"saelab: not using {d / FEATURES}: its records have {rec.d_sae} latents, the SAE {d_sae}."
                    )
        return self._records

    def records(self, budget: int = 4096, context_len: int = 64, top_k: int = 10) -> FeatureRecords:
        """The saved feature records, else ones collected now over the first `budget` tokens of held-out text
        (`texts`, the run's validation corpus or the general corpus's test split), kept for the session."""
        rec = self.records_if_any()
        if rec is None:
            src = _TextsSource(self.host, self.held_out_texts(), context_len, budget, self.scale)
            rec = collect_feature_records(
                self.sae, src, "val", n_tokens=budget, top_k=top_k, reservoir=64, window=(12, 4)
            )
            self._records = rec
        return rec

    def held_out_texts(self) -> list[str]:
        """The texts on-demand contexts come from (see `records`)."""
        if self._texts is None:
            from saelab.corpora.text import load_corpus

            if self._corpus_cfg is not None:
                from hydra.utils import instantiate

                corpus = instantiate(self._corpus_cfg)
            else:
                corpus = load_corpus(DEFAULT_CORPUS, split="test")
            self._texts = list(corpus.texts)
        return self._texts

    def contexts(self, latent: int, k: int = 10, samples: bool = False, budget: int = 4096) -> ShownContexts:
        """The top-`k` activating contexts of `latent` (or its quantile samples), strongest first."""
        rec = self.records(budget=budget).latent(latent)
        chosen = rec.samples if samples else rec.top
        left = self.records(budget=budget).window[0]
        out = ShownContexts()
        for c in chosen[:k]:
            keep = [i for i, t in enumerate(c.tokens) if t >= 0]
            toks = self._decode_each([c.tokens[i] for i in keep])
            centre = keep.index(left) if left in keep else 0
            out.append(ShownContext(c.act, c.doc, c.pos, toks, [c.acts[i] for i in keep], centre))
        return out

    def density(self, latent: int) -> float | None:
        """Firing density of `latent` in the records (None without records)."""
        rec = self.records_if_any()
        return None if rec is None else float(rec.density[int(latent)])

    # ------------------------------------------------------------------ reading the decoder
    def lens(self, latent: int | Sequence[int], k: int = 10) -> LogitLens:
        """The logit lens of the latent(s): top promoted and suppressed tokens (`saelab.analysis.lens`)."""
        latents = [int(latent)] if isinstance(latent, int) else [int(j) for j in latent]
        return logit_lens(self.sae, self.host, latents, k=k, scale=self.scale)

    def keywords(self, latent: int, k: int = 20, source: str = "lens") -> list[str]:
        """Concept keywords for `latent`: from its logit lens (`suggest_keywords`: promoted tokens), or from its
        top `k` contexts ("contexts": the selected tokens, cleaned the same way), which suits latents of early
        and middle layers, whose lens is often noise."""
        if source == "lens":
            return suggest_keywords(self.sae, self.host, latent, k=k, scale=self.scale)
        if source != "contexts":
            raise ValueError(f'keywords come from "lens" or "contexts", not {source!r}.')
        return keywords_from_tokens([c.tokens[c.centre] for c in self.contexts(latent, k=k)])

    def explanation(self, latent: int) -> str | None:
        """The latent's auto-interpretation explanation from `autointerp/explanations.jsonl`, or None.

        Each line is a JSON object with the latent ("latent", "feature" or "index") and its text
        ("explanation" or "text").
        """
        if self._explanations is None:
            self._explanations = {}
            for d in self.dirs:
                f = d / EXPLANATIONS
                if f.is_file():
                    self._explanations = _read_explanations(f)
                    break
        return self._explanations.get(int(latent))

    # ------------------------------------------------------------------ the model with the SAE in it
    @torch.no_grad()
    def spliced_loss(self, text: str) -> SplicedLoss:
        """Mean next-token CE of `text` (every target after BOS), clean and with the SAE's reconstruction
        x̂(s·h)/s in place of the hook output at every position but BOS (as `saelab.eval.spliced`)."""
        ids, att = self.host.prompt_ids([text])
        if ids.shape[1] < 2:
            raise ValueError(f"{text!r} gives no next-token targets.")
        mask = att.bool().clone()
        if self.host.bos_id is not None:
            mask[:, 0] = False
        clean = self.host.token_losses(ids, att)  # (1, seq − 1)
        with self.host.spliced(
            sae_splice(in_host_units(self.sae, SimpleNamespace(act_scale=self.scale)), mask)
        ):
            spliced = self.host.token_losses(ids, att)
        n = int(att[:, 1:].sum())
        a, b = float(clean.sum()) / n, float(spliced.sum()) / n
        return SplicedLoss(a, b, b - a, n)

    def steer(
        self,
        latent: int,
        alpha: float,
        prompt: str,
        max_new_tokens: int = 32,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> Steered:
        """`prompt` continued without and with h ← h + α·W_dec[latent]/s at every position."""
        kw: dict[str, Any] = dict(greedy=greedy, temperature=temperature, seed=seed)
        edit = LatentEdit(self.sae, [int(latent)], "add", float(alpha), scale=self.scale)
        return Steered(
            self.host.generate(prompt, max_new_tokens, **kw),
            self.host.generate(prompt, max_new_tokens, edit=edit, **kw),
        )

    def sweep(
        self, latents: Sequence[int], alphas: Sequence[float], prompts: Sequence[str], **kwargs: Any
    ) -> SteeringResult:
        """The α sweep of `saelab.analysis.steering.steering_sweep` on this SAE and host."""
        return steering_sweep(self.host, self.sae, latents, alphas, prompts, scale=self.scale, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _decode_each(self, ids: list[int]) -> list[str]:
        return self.host.tokenizer.batch_decode([[i] for i in ids])

    def __repr__(self) -> str:
        d_sae = int(self.sae.W_dec.shape[0])
        return (
            f"Lab({self.host.model_id} @ {self.host.identity['hook']}, d_sae={d_sae}, scale={self.scale:g})"
        )


# ---------------------------------------------------------------------- on-demand collection
class _TextsSource:
    """The least `collect_feature_records` needs to run the host over texts itself (cache=False): packed
    contexts of the texts, the host, and the SAE's activation scale."""

    cache = False
    harvest_batch = 8

    def __init__(
        self, host: CausalLMHost, texts: list[str], context_len: int, budget: int, scale: float
    ) -> None:
        self.host, self.d_in, self.act_scale = host, host.d_in, scale
        tok = host.tokenizer
        self._contexts = pack(tok, texts, context_len, host.bos_id, tok.eos_token_id, budget)

    def contexts(self, split: str) -> Contexts:
        return self._contexts


# ---------------------------------------------------------------------- finding and reading a run
def _run_config(run: Path) -> Path | None:
    return next((run / c for c in RUN_CONFIGS if (run / c).is_file()), None)


def _run_above(export: Path) -> Path | None:
    """The run dir holding an export at `<run>/sae` or `<run>/<stage>/sae`, if any."""
    for d in (export.parent, export.parent.parent):
        if _run_config(d) is not None:
            return d
    return None


def _export_of(run: Path, stage: str | None) -> Path:
    """The export of a run: `<run>/<stage>/sae` for `stage`, else `<run>/sae`, else the only `<run>/*/sae`."""
    if stage is not None:
        export = run / stage / "sae"
        if not (export / "cfg.json").is_file():
            raise FileNotFoundError(f"{run} has no export for stage {stage!r} ({export}/cfg.json).")
        return export
    if (run / "sae" / "cfg.json").is_file():
        return run / "sae"
    stages = sorted(p.parent.parent.name for p in run.glob("*/sae/cfg.json"))
    if len(stages) == 1:
        return run / stages[0] / "sae"
    if stages:
        raise ValueError(f"{run} has one export per stage ({', '.join(stages)}): pass stage=<one of them>.")
    raise FileNotFoundError(
        f"{run} is a run dir without an SAE export (sae/cfg.json): it did not finish, or ran with export=false."
    )


def _read_config(cfg_file: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(cfg_file)


def _host_from_config(cfg, run: Path | None, device: str | None) -> CausalLMHost:
    """The run's `data.host`, instantiated (on `device` when given)."""
    from hydra.utils import instantiate

    data: Any = cfg.get("data") or {}
    if data.get("host") is None:
        raise ValueError(
            f"run {run} trained on {data.get('_target_', 'a source')}, which has no host model to inspect: "
            "Lab needs a text run (data=text), or pass host=."
        )
    host = instantiate(data.host, **({"device": device} if device else {}))
    if not isinstance(host, CausalLMHost):
        raise ValueError(
            f"run {run} has a {type(host).__name__} host: Lab reads causal LMs (CausalLMHost) only."
        )
    return host


_BLOCK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def _host_from_export(export: Path, sae, device: str | None) -> CausalLMHost:
    """The host an export's metadata names (module docstring), hooked where it says."""
    meta = json.loads((export / "cfg.json").read_text()).get("metadata") or {}
    name, weights = meta.get("model_name"), meta.get("model_weights")
    model = meta.get("saelab_host") or next(
        (key for key, (origin, note) in EMBEDDED_ORIGIN.items() if name == origin and weights == note), name
    )
    hook = meta.get("hf_hook_name")
    if hook is None and (m := _BLOCK.match(str(meta.get("hook_name") or ""))):
        hook = int(m.group(1))
    if not model or hook is None:
        raise ValueError(
            f"{export}/cfg.json names no model or hook (metadata.model_name, hf_hook_name / hook_name): "
            "pass host=CausalLMHost(model, hook=...)."
        )
    return CausalLMHost(
        str(model), hook=hook, d_in=int(sae.W_dec.shape[1]), device=device or "cpu", max_length=512
    )


def _read_explanations(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}).") from e
        j = next((d[k] for k in ("latent", "feature", "index") if k in d), None)
        text = next((d[k] for k in ("explanation", "text") if k in d), None)
        if j is not None and text is not None:
            out[int(j)] = str(text)
    return out
