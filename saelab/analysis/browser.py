"""A static HTML feature browser over a run's feature records: one folder that opens from `file://`.

`write_browser(run_dir)` writes `<run_dir>/browser/` (atomically, `saelab.files.atomic_dir`):

- `index.html` and `app.js`: a one-page app with hash routing (`#/latent/12`), plain DOM and inline SVG,
  no server, no network, no external library;
- `data/index.js`: one row per latent (density, count, mean and max activation, explanation and its
  autointerp scores, the tokens it fires on in its top contexts, its logit-lens tokens) and the token
  id → text table;
- `data/latents-NNNNN.js`: the per-latent pages' data (histogram, top contexts, quantile samples, logit
  lens), `CHUNK` latents a file, loaded by a `<script>` tag when a latent is opened, so an SAE with 10⁵
  latents opens as fast as one with ten. Data files are scripts, not JSON, because browsers refuse
  `fetch()` of `file://` URLs.

The index searches by latent id (`12`, `#12`, `id:12`), by a word of the explanation (`expl:dog`), or by
a token the latent fires on in its top contexts or promotes/suppresses in its logit lens (`tok:dog`,
compared trimmed and case-folded); plain text matches explanation or token. Columns sort by density, max
and mean activation and each autointerp score. A latent page shows the records of
`saelab.analysis.features` (density, the log-spaced activation histogram, top contexts and quantile
samples with each token's background ∝ its activation / the latent's max activation and the value in its
tooltip), the logit lens (`saelab.analysis.lens.LogitLens.record` format) and the explanation.

Inputs that are not given are read from the run dir when present: `features/` (`FeatureRecords.load`),
`features/lens.json` (latent → {"promoted": [[token, value], ...], "suppressed": [...]}, or a list of
such records carrying "latent") and `autointerp/explanations.jsonl` (one JSON object a line with
"latent", "explanation" and scores, either in a "scores" object or as top-level numbers; lines that do
not parse, e.g. one a producer is still writing, are skipped with a warning). Token text comes from
`decode` (token id → str) or else from the decoded windows that `FeatureRecords.save(decode=...)` put in
`features/latents.jsonl`; tokens with no text show as ⟨id⟩.

All text reaches the page through `textContent` (never `innerHTML`), and the data files escape `<`, `>`,
`&` and every non-ASCII character, so tokens holding markup, quotes, newlines or lone surrogates show as
the text they are.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from saelab.analysis.features import FOLDER as FEATURES
from saelab.analysis.features import FeatureRecords
from saelab.files import atomic_dir, read_json

FOLDER = "browser"
CHUNK = 128  # latents per detail file
FORMAT_VERSION = 1
GENERATOR = "saelab.analysis.browser"  # marks a folder this module may replace
LENS_FILE = "lens.json"  # under features/
EXPLANATIONS_FILE = Path("autointerp") / "explanations.jsonl"
_LATENT_KEYS = ("latent", "latent_id", "feature", "feature_id")
# top-level numbers of an explanation line that are not scores
_NOT_SCORES = {*_LATENT_KEYS, "layer", "count", "seed", "index", "id", "tokens"}


# ---------------------------------------------------------------------- entry point
def write_browser(
    run_dir: str | Path,
    records: FeatureRecords | None = None,
    lens: Any = None,
    explanations: Mapping | None = None,
    out: str | Path | None = None,
    *,
    decode: Callable[[int], str] | None = None,
    chunk: int = CHUNK,
) -> Path:
    """Write the feature browser of `run_dir` and return the path of its `index.html`.

    `records`: the feature records (None: `FeatureRecords.load(run_dir)`); `lens`: latent →
    {"promoted": [[token, value], ...], "suppressed": [...]} or a `LogitLens` (None: `features/lens.json`
    if present); `explanations`: latent → {"explanation": str, "scores": {name: float}} (None:
    `autointerp/explanations.jsonl` if present); `out`: the folder to write (None: `<run_dir>/browser`),
    replaced as a whole; `decode`: token id → text (None: the texts saved in `features/latents.jsonl`).
    """
    run_dir = Path(run_dir)
    if records is None:
        records = FeatureRecords.load(run_dir)
    lens_table = read_lens(run_dir) if lens is None else lens_records(lens)
    expl_table = read_explanations(run_dir) if explanations is None else explanation_records(explanations)
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}.")
    target = Path(out) if out is not None else run_dir / FOLDER
    _check_replaceable(target)
    vocab = token_texts(records, run_dir, decode)
    index = browser_index(records, lens_table, expl_table, vocab, chunk=chunk, title=run_dir.resolve().name)
    tables = RecordArrays(records)
    with atomic_dir(target) as tmp:
        (tmp / "index.html").write_text(_page(index["title"]), encoding="utf-8")
        (tmp / "app.js").write_text(APP_JS, encoding="utf-8")
        (tmp / "data").mkdir()
        (tmp / "data" / "index.js").write_text(f"window.SAELAB_INDEX = {to_js(index)};\n", encoding="ascii")
        for k, start in enumerate(range(0, records.d_sae, chunk)):
            page = latent_details(tables, start, min(start + chunk, records.d_sae), lens_table, expl_table)
            (tmp / "data" / chunk_name(k)).write_text(
                f"window.SAELAB.addChunk({k}, {to_js(page)});\n", encoding="ascii"
            )
    return target / "index.html"


def chunk_name(k: int) -> str:
    """File name of the k-th detail chunk (latents k·chunk … (k+1)·chunk − 1)."""
    return f"latents-{k:05d}.js"


def _check_replaceable(target: Path) -> None:
    """`atomic_dir` replaces the whole folder: refuse one that holds anything but an earlier browser."""
    if not target.exists():
        return
    page = target / "index.html"
    ours = page.is_file() and GENERATOR in page.read_text(encoding="utf-8", errors="replace")[:2000]
    if not target.is_dir() or (any(target.iterdir()) and not ours):
        raise FileExistsError(
            f"{target} exists and is not a saelab feature browser; writing the browser would replace it "
            "as a whole. Pass another `out` folder (or move that one away)."
        )


# ---------------------------------------------------------------------- inputs
def read_lens(run_dir: str | Path) -> dict[int, dict[str, list]]:
    """The logit lens saved at `run_dir/features/lens.json`, as `lens_records`; {} when there is none."""
    path = Path(run_dir) / FEATURES / LENS_FILE
    if not path.is_file():
        return {}
    return lens_records(read_json(path, f"Delete {path} or write it again."))


def lens_records(lens: Any) -> dict[int, dict[str, list]]:
    """latent → {"promoted": [[token, value], ...], "suppressed": [...]} from a `LogitLens`, a mapping
    latent → record, a list of records with "latent", or {"records": [...]}; bad entries are dropped."""
    if lens is None:
        return {}
    if hasattr(lens, "record") and hasattr(lens, "latents"):  # saelab.analysis.lens.LogitLens
        lens = {j: lens.record(j) for j in lens.latents}
    if isinstance(lens, Mapping) and isinstance(lens.get("records"), list):
        lens = lens["records"]
    items: Iterable[tuple[Any, Any]]
    if isinstance(lens, Mapping):
        items = lens.items()
    elif isinstance(lens, list):
        items = ((_latent_of(r), r) for r in lens if isinstance(r, Mapping))
    else:
        raise TypeError(f"lens must be a LogitLens, a mapping latent → record or a list; got {type(lens)}.")
    out: dict[int, dict[str, list]] = {}
    for key, rec in items:
        j = _as_int(key)
        if j is None or not isinstance(rec, Mapping):
            continue
        out[j] = {side: _token_values(rec.get(side)) for side in ("promoted", "suppressed")}
    return out


def _token_values(pairs: Any) -> list[list]:
    """[[token, value], ...] from pairs or {"token": .., "value"/"logit": ..} objects."""
    out = []
    for p in pairs if isinstance(pairs, list | tuple) else []:
        if isinstance(p, Mapping):
            tok, val = p.get("token"), p.get("value", p.get("logit"))
        elif isinstance(p, list | tuple) and len(p) == 2:
            tok, val = p
        else:
            continue
        if tok is not None:
            out.append([str(tok), _number(val)])
    return out


def read_explanations(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The explanations of `run_dir/autointerp/explanations.jsonl`, as `explanation_records`; {} when absent.

    Lines that are not JSON objects with a latent id are skipped (one warning says how many); a latent on
    several lines keeps the last explanation and the union of the scores."""
    path = Path(run_dir) / EXPLANATIONS_FILE
    if not path.is_file():
        return {}
    out: dict[int, dict[str, Any]] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            j = _latent_of(obj) if isinstance(obj, Mapping) else None
            if j is None:
                bad += 1
                continue
            _merge(out, j, _explanation(obj))
    if bad:
        warnings.warn(
            f"{path}: skipped {bad} line(s) that are not JSON objects with a latent id.", stacklevel=2
        )
    return out


def explanation_records(explanations: Mapping) -> dict[int, dict[str, Any]]:
    """latent → {"explanation": str | None, "scores": {name: float}} from a mapping latent → dict (with
    "explanation" and "scores" or top-level score numbers) or latent → explanation string."""
    out: dict[int, dict[str, Any]] = {}
    for key, value in explanations.items():
        j = _as_int(key)
        if j is None:
            continue
        _merge(out, j, _explanation(value) if isinstance(value, Mapping) else {"explanation": str(value)})
    return out


def _merge(out: dict[int, dict[str, Any]], j: int, e: dict[str, Any]) -> None:
    old = out.setdefault(j, {"explanation": None, "scores": {}})
    if e.get("explanation") is not None:
        old["explanation"] = e["explanation"]
    old["scores"].update(e.get("scores", {}))


def _explanation(obj: Mapping) -> dict[str, Any]:
    """{"explanation", "scores"} of one record: numbers in its "scores" object (one level of nesting is
    flattened to "outer/inner") and its other top-level numbers."""
    text = obj.get("explanation")
    scores: dict[str, float] = {}
    for k, v in obj.items():
        if k in _NOT_SCORES or str(k).startswith("n_") or k in ("explanation", "scores"):
            continue
        if _is_number(v):
            scores[str(k)] = float(v)
    nested: Any = obj.get("scores")
    if isinstance(nested, Mapping):
        for k, v in nested.items():
            if _is_number(v):
                scores[str(k)] = float(v)
            elif isinstance(v, Mapping):
                scores.update({f"{k}/{k2}": float(v2) for k2, v2 in v.items() if _is_number(v2)})
    elif _is_number(nested):
        scores["score"] = float(nested)
    return {"explanation": None if text is None else str(text), "scores": scores}


def _latent_of(obj: Mapping) -> int | None:
    for k in _LATENT_KEYS:
        if k in obj:
            return _as_int(obj[k])
    return None


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) and f >= 0 else None


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _number(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def token_texts(
    records: FeatureRecords, run_dir: str | Path, decode: Callable[[int], str] | None = None
) -> dict[int, str]:
    """Text of every token id in the records' windows: from `decode`, else from the decoded windows of
    `run_dir/features/latents.jsonl` (written by `FeatureRecords.save(decode=...)`); ids with no text are
    left out."""
    ids = np.unique(
        np.concatenate([records.top_tokens.reshape(-1).numpy(), records.sample_tokens.reshape(-1).numpy()])
    )
    wanted = {int(t) for t in ids if t >= 0}
    if decode is not None:
        return {t: str(decode(t)) for t in sorted(wanted)}
    found: dict[int, str] = {}
    path = Path(run_dir) / FEATURES / "latents.jsonl"
    if not path.is_file() or not wanted:
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            for ctx in [*obj.get("top", []), *obj.get("samples", [])]:
                for t, s in zip(ctx.get("tokens", []), ctx.get("text") or []):
                    if s is not None and t in wanted:
                        found[t] = str(s)
            if len(found) == len(wanted):
                break
    return found


# ---------------------------------------------------------------------- page data
class RecordArrays:
    """The records' arrays as numpy, converted once for the per-latent pages."""

    def __init__(self, records: FeatureRecords) -> None:
        self.records = records
        self.a = {k: getattr(records, k).numpy() for k in FeatureRecords._ARRAYS}
        self.left = records.window[0]


def browser_index(
    records: FeatureRecords,
    lens: Mapping[int, dict],
    explanations: Mapping[int, dict],
    vocab: Mapping[int, str],
    chunk: int = CHUNK,
    title: str = "",
) -> dict[str, Any]:
    """The index data: run facts, the token table and one column per field over all latents."""
    d = records.d_sae
    count = records.count.numpy().astype(np.int64)
    density = count / max(records.n_tokens, 1)
    mean = np.where(count > 0, records.act_sum.numpy() / np.maximum(count, 1), 0.0)
    top_act = records.top_act.numpy()
    max_act = top_act[:, 0] if top_act.shape[1] else np.zeros(d)
    toks, wacts = records.top_tokens.numpy(), records.top_window_acts.numpy()
    expl = [explanations.get(i, {}) for i in range(d)]  # latents beyond d_sae are left out
    score_keys = sorted({k for e in expl for k in e.get("scores", {})})
    return {
        "format": FORMAT_VERSION,
        "title": title,
        "d_sae": d,
        "n_tokens": records.n_tokens,
        "window": list(records.window),
        "log10_range": list(records.log10_range),
        "meta": json.loads(json.dumps(records.meta, default=str)),
        "chunk": chunk,
        "score_keys": score_keys,
        "vocab": {str(t): s for t, s in sorted(vocab.items())},
        "count": count.tolist(),
        "density": _sig(density, 6),
        "max_act": _sig(max_act),
        "mean_act": _sig(mean),
        "explanation": [e.get("explanation") for e in expl],
        "scores": {k: [_number(e.get("scores", {}).get(k)) for e in expl] for k in score_keys},
        "tokens": [firing_tokens(toks[i], wacts[i]) for i in range(d)],
        "lens_tokens": [
            [t for side in ("promoted", "suppressed") for t, _ in lens.get(i, {}).get(side, [])]
            for i in range(d)
        ],
    }


def firing_tokens(tokens: np.ndarray, acts: np.ndarray) -> list[int]:
    """Distinct token ids with a positive activation in a latent's [k, w] top windows, highest activation first."""
    m = (acts > 0) & (tokens >= 0)
    t, a = tokens[m], acts[m]
    order = np.argsort(-a, kind="stable")
    _, first = np.unique(t[order], return_index=True)
    return t[order][np.sort(first)].astype(int).tolist()


def latent_detail(
    tables: RecordArrays, i: int, lens: Mapping[int, dict], explanations: Mapping[int, dict]
) -> dict[str, Any]:
    """One latent page's data: counts, histogram, top contexts, quantile samples, lens, explanation."""
    return latent_details(tables, i, i + 1, lens, explanations)[0]


def latent_details(
    tables: RecordArrays, start: int, stop: int, lens: Mapping[int, dict], explanations: Mapping[int, dict]
) -> list[dict[str, Any]]:
    """`latent_detail` of latents start … stop − 1, rounding and converting their arrays in one go."""
    a, n_tokens, left = tables.a, tables.records.n_tokens, tables.left
    n_quantiles = int(tables.records.meta.get("n_quantiles", 0) or 0)
    sl = slice(start, stop)

    def contexts(prefix: str) -> list[list[dict[str, Any]]]:
        rows = a[f"{prefix}_row"][sl] >= 0
        act = _round_sig(a[f"{prefix}_act"][sl]).tolist()
        doc, pos = a[f"{prefix}_doc"][sl].tolist(), a[f"{prefix}_pos"][sl].tolist()
        toks = a[f"{prefix}_tokens"][sl].tolist()
        wacts = _round_sig(a[f"{prefix}_window_acts"][sl]).tolist()
        quantile = a["sample_quantile"][sl].tolist() if prefix == "sample" else None
        out = []
        for r in range(stop - start):
            latent = []
            for s in np.nonzero(rows[r])[0].tolist():
                t, w, centre = toks[r][s], wacts[r][s], left
                if min(t) < 0:  # positions outside the document are −1
                    keep = [x >= 0 for x in t]
                    centre = sum(keep[:left])
                    t, w = [x for x, k in zip(t, keep) if k], [x for x, k in zip(w, keep) if k]
                c: dict[str, Any] = {
                    "act": act[r][s],
                    "doc": doc[r][s],
                    "pos": pos[r][s],
                    "centre": centre,
                    "t": t,
                    "a": w,
                }
                if quantile is not None:
                    c["q"] = quantile[r][s]
                latent.append(c)
            out.append(latent)
        return out

    count = a["count"][sl].astype(np.int64)
    mean = _round_sig(np.where(count > 0, a["act_sum"][sl] / np.maximum(count, 1), 0.0)).tolist()
    top_act = a["top_act"][sl]
    max_act = _round_sig(top_act[:, 0] if top_act.shape[1] else np.zeros(stop - start)).tolist()
    hist = a["hist"][sl].astype(np.int64).tolist()
    top, samples = contexts("top"), contexts("sample")
    out = []
    for r, i in enumerate(range(start, stop)):
        e = explanations.get(i, {})
        out.append(
            {
                "latent": i,
                "count": int(count[r]),
                "density": int(count[r]) / max(n_tokens, 1),
                "mean_act": mean[r],
                "max_act": max_act[r],
                "hist": hist[r],
                "top": top[r],
                "samples": samples[r],
                "n_quantiles": n_quantiles,
                "lens": lens.get(i),
                "explanation": e.get("explanation"),
                "scores": e.get("scores", {}),
            }
        )
    return out


def _sig(x: np.ndarray, digits: int = 4) -> list[float]:
    """`_round_sig` as a flat list."""
    return _round_sig(np.asarray(x).reshape(-1), digits).tolist()


def _round_sig(x: np.ndarray, digits: int = 4) -> np.ndarray:
    """Values rounded to `digits` significant digits (short JSON), same shape; non-finite ones become 0."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    out = x.copy()
    nz = x != 0
    v = x[nz]
    k = digits - 1 - np.floor(np.log10(np.abs(v)))  # decimals to keep
    up = k >= 0
    # dividing the rounded integer by an exact power of ten gives the double nearest the decimal
    v[up] = np.round(v[up] * 10.0 ** k[up]) / 10.0 ** k[up]
    v[~up] = np.round(v[~up] / 10.0 ** -k[~up]) * 10.0 ** -k[~up]
    out[nz] = v
    return out


def to_js(obj: Any) -> str:
    """JSON as a JavaScript literal that is safe anywhere: ASCII only (so U+2028, lone surrogates and odd
    unicode are \\u escapes) and `<`, `>`, `&` escaped, so no string can close a script or open a tag."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str) -> str:
    t = html.escape(f"{title} · saelab features" if title else "saelab features")
    return PAGE_HTML.replace("@TITLE@", t).replace("@GENERATOR@", GENERATOR)


# ---------------------------------------------------------------------- the page
PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="@GENERATOR@">
<link rel="icon" href="data:,">
<title>@TITLE@</title>
<style>
:root { --fg: #1d2330; --muted: #687083; --line: #e2e5ec; --accent: #2456c6; --bg-soft: #f6f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg); }
main { max-width: 1180px; margin: 0 auto; padding: 18px 22px 40px; }
h1 { font-size: 22px; margin: 6px 0 4px; }
h2 { font-size: 15px; margin: 22px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 13px; margin: 12px 0 4px; color: var(--muted); font-weight: 600; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
.error { color: #b3261e; }
.toolbar { display: flex; gap: 14px; align-items: center; margin: 12px 0; flex-wrap: wrap; }
#search { width: 420px; max-width: 100%; padding: 7px 10px; font: inherit; border: 1px solid #c5cad6; border-radius: 6px; }
table.latents { border-collapse: collapse; width: 100%; }
table.latents th, table.latents td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
table.latents th { position: sticky; top: 0; background: #fff; font-weight: 600; white-space: nowrap; }
table.latents th.sortable { cursor: pointer; user-select: none; }
table.latents th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; }
table.latents th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
table.latents td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
table.latents th.num { text-align: right; }
table.latents td.expl { max-width: 360px; }
table.latents tr.dead td { color: var(--muted); }
table.latents tbody tr:hover { background: var(--bg-soft); }
.chip { display: inline-block; margin: 0 3px 3px 0; padding: 0 5px; border-radius: 4px; background: #eef1f7;
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; white-space: pre; }
.chip .val { color: var(--muted); margin-left: 5px; }
.nav { display: flex; gap: 16px; margin-bottom: 4px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px; margin: 10px 0; }
.stat { background: var(--bg-soft); border-radius: 6px; padding: 6px 10px; }
.stat .k { color: var(--muted); font-size: 12px; }
.stat .v { font-size: 16px; font-variant-numeric: tabular-nums; }
.explanation { font-size: 16px; margin: 8px 0; padding: 8px 12px; border-left: 3px solid var(--accent); background: var(--bg-soft); }
.scores { margin-top: 4px; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; }
.lens-list .chip.pos { background: #e3f3e6; }
.lens-list .chip.neg { background: #fbe4e2; }
.ctx { display: flex; gap: 10px; align-items: baseline; padding: 3px 0; border-bottom: 1px dotted var(--line); }
.ctx-act { flex: 0 0 64px; text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); font-size: 12px; }
.ctx-text { flex: 1; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; line-height: 1.9; overflow-wrap: anywhere; }
.ctx-where { flex: 0 0 auto; color: var(--muted); font-size: 11px; }
.tok { white-space: pre; border-radius: 2px; padding: 1px 0; }
.tok.centre { outline: 1.5px solid #c2410c; outline-offset: 0; }
.tok.special { color: var(--muted); }
svg.hist { display: block; max-width: 100%; height: auto; }
svg.hist rect.bar { fill: #f28c28; }
svg.hist rect.bar:hover { fill: #c2410c; }
svg.hist text { font-size: 10px; fill: var(--muted); }
svg.hist line { stroke: #b8bdc9; }
button { font: inherit; padding: 4px 12px; border: 1px solid #c5cad6; background: #fff; border-radius: 6px; cursor: pointer; }
</style>
</head>
<body>
<main>
<section id="index-view" hidden>
  <h1 id="title"></h1>
  <div id="summary" class="muted"></div>
  <div class="toolbar">
    <input id="search" type="search" autocomplete="off" spellcheck="false"
      placeholder="search: 12 · explanation words · tok:the">
    <label><input id="hide-dead" type="checkbox"> hide dead latents</label>
    <span id="count" class="muted"></span>
  </div>
  <table class="latents" id="latents"><thead><tr></tr></thead><tbody></tbody></table>
  <p><button id="more" hidden>show more</button></p>
</section>
<section id="latent-view" hidden></section>
<noscript>This feature browser needs JavaScript.</noscript>
</main>
<script src="data/index.js"></script>
<script src="app.js"></script>
</body>
</html>
"""

APP_JS = r"""// saelab feature browser: plain DOM, every data string set through textContent.
(function () {
  "use strict";
  const D = window.SAELAB_INDEX;
  const $ = (sel) => document.querySelector(sel);
  if (!D) {
    document.querySelector("main").textContent = "data/index.js did not load: write the browser again.";
    return;
  }
  const vocab = D.vocab;
  const SVG = "http://www.w3.org/2000/svg";

  function h(tag, props, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c !== null && c !== undefined) e.append(c);  // strings become text nodes
    return e;
  }
  function s(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x), d = digits || 3;
    return a >= 1e-3 && a < 1e5 ? String(Number(x.toPrecision(d))) : x.toExponential(d - 1);
  }
  const pct = (x) => (x === 0 ? "0" : fmt(x * 100, 3) + "%");
  const SYMBOLS = { "\r\n": "\u21b5", "\n": "\u21b5", "\r": "\u240d", "\t": "\u21e5", "\u2028": "\u2424", "\u2029": "\u00b6" };
  // newlines and other control characters as visible symbols, so a context stays on one line
  function visible(t) {
    return t.replace(/\r\n|[\u0000-\u001f\u007f\u2028\u2029]/g,
      (c) => SYMBOLS[c] || "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  }
  function tokenLabel(id) {
    const t = vocab[id];
    if (t === undefined) return { text: "\u27e8" + id + "\u27e9", raw: null, special: true };
    if (t === "") return { text: "\u2205", raw: t, special: true };
    return { text: visible(t), raw: t, special: false };
  }
  const norm = (t) => t.trim().toLowerCase();

  // ------------------------------------------------------------------ index rows
  const rows = D.count.map((count, id) => {
    const scores = {};
    for (const k of D.score_keys) scores[k] = D.scores[k][id];
    const r = {
      id, count, density: D.density[id], max_act: D.max_act[id], mean_act: D.mean_act[id],
      explanation: D.explanation[id], scores, tokens: D.tokens[id], lens: D.lens_tokens[id],
    };
    r.expl = (r.explanation || "").toLowerCase();
    r.tokset = new Set(r.tokens.map((t) => norm(vocab[t] === undefined ? "" : vocab[t])).concat(r.lens.map(norm)));
    r.tokset.delete("");
    return r;
  });
  const COLUMNS = [
    { key: "id", label: "Latent", num: true },
    { key: "density", label: "Density", num: true },
    { key: "max_act", label: "Max act", num: true },
    { key: "mean_act", label: "Mean act", num: true },
    ...D.score_keys.map((k) => ({ key: "score:" + k, label: k, num: true })),
    { key: null, label: "Explanation" },
    { key: null, label: "Top tokens" },
  ];
  const PAGE = 500;
  let sortKey = "id", sortDir = 1, limit = PAGE, indexScroll = 0, built = false;

  function value(r, key) { return key.startsWith("score:") ? r.scores[key.slice(6)] : r[key]; }
  function compare(a, b) {
    const x = value(a, sortKey), y = value(b, sortKey);
    const xm = x === null || x === undefined, ym = y === null || y === undefined;
    if (xm || ym) return xm && ym ? a.id - b.id : (xm ? 1 : -1);  // missing values last either way
    return (x - y) * sortDir || a.id - b.id;
  }
  function matcher(q) {
    q = q.trim();
    if (!q) return () => true;
    let m = /^(?:#|id:)?\s*(\d+)$/i.exec(q);
    if (m) { const id = Number(m[1]); return (r) => r.id === id; }
    m = /^(?:tok|token):([\s\S]*)$/i.exec(q);
    if (m) { const t = norm(m[1]); return (r) => r.tokset.has(t); }
    m = /^(?:expl|explanation):([\s\S]*)$/i.exec(q);
    if (m) { const t = m[1].trim().toLowerCase(); return (r) => r.expl.includes(t); }
    const t = q.toLowerCase();
    return (r) => r.expl.includes(t) || r.tokset.has(t);
  }
  function rowElement(r) {
    const cells = [
      h("td", { class: "num" }, [h("a", { href: "#/latent/" + r.id, text: String(r.id) })]),
      h("td", { class: "num", title: r.count + " of " + D.n_tokens + " tokens", text: pct(r.density) }),
      h("td", { class: "num", text: fmt(r.max_act) }),
      h("td", { class: "num", text: fmt(r.mean_act) }),
      ...D.score_keys.map((k) => h("td", { class: "num", text: fmt(r.scores[k]) })),
      h("td", { class: "expl", text: r.explanation || "" }),
      h("td", { class: "tokens" }, r.tokens.slice(0, 6).map((t) => {
        const l = tokenLabel(t);
        return h("span", { class: "chip", text: l.text });
      })),
    ];
    return h("tr", { "data-latent": String(r.id), class: r.count === 0 ? "dead" : null }, cells);
  }
  function renderIndex() {
    const match = matcher($("#search").value);
    const hideDead = $("#hide-dead").checked;
    const shown = rows.filter((r) => match(r) && !(hideDead && r.count === 0)).sort(compare);
    $("#latents tbody").replaceChildren(...shown.slice(0, limit).map(rowElement));
    $("#count").textContent = shown.length + " of " + rows.length + " latents"
      + (shown.length > limit ? " (first " + limit + " shown)" : "");
    $("#more").hidden = shown.length <= limit;
    for (const th of document.querySelectorAll("#latents th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none");
    }
  }
  function buildIndex() {
    $("#title").textContent = D.title ? D.title : "saelab features";
    const m = D.meta || {};
    $("#summary").textContent = D.d_sae + " latents \u00b7 " + D.n_tokens + " tokens"
      + (m.split ? " of split " + m.split : "") + (m.source ? " \u00b7 " + m.source : "");
    $("#latents thead tr").replaceChildren(...COLUMNS.map((c) => h("th", {
      class: (c.key ? "sortable" : "") + (c.num ? " num" : ""), "data-key": c.key, text: c.label,
      onclick: c.key ? () => {
        if (sortKey === c.key) sortDir = -sortDir;
        else { sortKey = c.key; sortDir = c.key === "id" ? 1 : -1; }
        renderIndex();
      } : null,
    })));
    $("#search").addEventListener("input", () => { limit = PAGE; renderIndex(); });
    $("#hide-dead").addEventListener("change", () => { limit = PAGE; renderIndex(); });
    $("#more").addEventListener("click", () => { limit += PAGE; renderIndex(); });
    built = true;
    renderIndex();
  }

  // ------------------------------------------------------------------ detail chunks
  const chunks = new Map(), pending = new Map();
  window.SAELAB = { addChunk(k, list) { chunks.set(k, list); } };
  function loadChunk(k) {
    if (chunks.has(k)) return Promise.resolve(chunks.get(k));
    if (!pending.has(k)) {
      pending.set(k, new Promise((resolve, reject) => {
        const el = document.createElement("script");
        el.src = "data/latents-" + String(k).padStart(5, "0") + ".js";
        el.onload = () => (chunks.has(k) ? resolve(chunks.get(k)) : reject(new Error(el.src + " holds no data")));
        el.onerror = () => { pending.delete(k); reject(new Error("could not load " + el.src)); };
        document.head.append(el);
      }));
    }
    return pending.get(k);
  }

  // ------------------------------------------------------------------ latent page
  function histogram(counts, lo, hi) {
    const n = counts.length;
    let first = counts.findIndex((c) => c > 0);
    if (first < 0) return h("p", { class: "muted", text: "never fired" });
    let last = n - 1;
    while (counts[last] === 0) last--;
    first = Math.max(0, first - 1); last = Math.min(n - 1, last + 1);
    const W = 560, H = 170, L = 48, R = 12, T = 10, B = 30;
    const bins = last - first + 1, bw = (W - L - R) / bins;
    const ymax = Math.max(...counts.slice(first, last + 1));
    const edge = (i) => lo + (hi - lo) * i / n;  // log10 of the i-th bin edge
    const x = (i) => L + (i - first) * bw;
    const svg = s("svg", { class: "hist", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img" });
    svg.append(s("title", {}, "activation histogram (log-spaced bins), " + ymax + " in the fullest bin"));
    for (let i = first; i <= last; i++) {
      const bh = counts[i] / ymax * (H - T - B);
      const r = s("rect", { class: "bar", x: x(i) + 0.5, y: H - B - bh, width: Math.max(bw - 1, 1), height: bh,
        "data-count": counts[i] });
      r.append(s("title", {}, "[" + fmt(10 ** edge(i)) + ", " + fmt(10 ** edge(i + 1)) + "): " + counts[i]));
      svg.append(r);
    }
    svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B }));
    svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B }));
    svg.append(s("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(ymax)));
    svg.append(s("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    const a = edge(first), b = edge(last + 1), xAt = (v) => L + (v - a) / (b - a) * (W - L - R);
    const ticks = [];
    for (let d = Math.ceil(a); d <= Math.floor(b); d++) ticks.push(d);
    if (ticks.length < 2) ticks.splice(0, ticks.length, a, b);
    for (const t of ticks) {
      svg.append(s("line", { x1: xAt(t), x2: xAt(t), y1: H - B, y2: H - B + 4 }));
      svg.append(s("text", { x: xAt(t), y: H - B + 15, "text-anchor": "middle" }, fmt(10 ** t, 2)));
    }
    svg.append(s("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "activation (log scale)"));
    return svg;
  }
  function contextElement(c, maxAct) {
    const text = h("span", { class: "ctx-text" });
    c.t.forEach((t, i) => {
      const a = c.a[i], l = tokenLabel(t);
      const span = h("span", {
        class: "tok" + (i === c.centre ? " centre" : "") + (l.special ? " special" : ""),
        text: l.text, "data-act": String(a),
        title: "act " + fmt(a, 4) + "\n" + (l.raw === null ? "token id " + t : JSON.stringify(l.raw) + " (id " + t + ")"),
      });
      if (a > 0) span.style.backgroundColor = "rgba(242, 120, 20, " + Math.min(1, a / maxAct).toFixed(3) + ")";
      text.append(span);
    });
    return h("div", { class: "ctx" }, [
      h("span", { class: "ctx-act", text: fmt(c.act) }), text,
      h("span", { class: "ctx-where", text: "doc " + c.doc + " \u00b7 pos " + c.pos }),
    ]);
  }
  function lensList(title, pairs, cls) {
    return h("div", { class: "lens-list " + cls }, [h("h3", { text: title }),
      ...(pairs.length ? pairs.map(([t, v]) => h("span", { class: "chip " + cls, title: JSON.stringify(t) }, [
        visible(t), h("span", { class: "val", text: (v > 0 ? "+" : "") + fmt(v) })]))
        : [h("span", { class: "muted", text: "none" })])]);
  }
  function stat(k, v, title) {
    return h("div", { class: "stat", title }, [h("div", { class: "k", text: k }), h("div", { class: "v", text: v })]);
  }
  function nav(id) {
    const links = [h("a", { href: "#/", text: "\u2190 all latents" })];
    if (id > 0) links.push(h("a", { href: "#/latent/" + (id - 1), text: "\u2039 " + (id - 1) }));
    if (id < D.d_sae - 1) links.push(h("a", { href: "#/latent/" + (id + 1), text: (id + 1) + " \u203a" }));
    return h("div", { class: "nav" }, links);
  }
  function renderLatent(view, L) {
    const maxAct = L.max_act > 0 ? L.max_act : 1;
    const parts = [nav(L.latent), h("h1", { text: "Latent " + L.latent })];
    if (L.explanation !== null || Object.keys(L.scores).length) {
      parts.push(h("div", { class: "explanation" }, [
        h("div", { class: "text", text: L.explanation === null ? "(no explanation)" : L.explanation }),
        h("div", { class: "scores" }, Object.entries(L.scores).map(([k, v]) =>
          h("span", { class: "chip score", "data-score": k }, [k, h("span", { class: "val", text: fmt(v) })]))),
      ]));
    }
    parts.push(h("div", { class: "stats" }, [
      stat("density", pct(L.density), L.density + ""),
      stat("fires on", L.count + " of " + D.n_tokens + " tokens"),
      stat("mean act when firing", fmt(L.mean_act)),
      stat("max act", fmt(L.max_act)),
    ]));
    parts.push(h("h2", { text: "Activation histogram" }), histogram(L.hist, D.log10_range[0], D.log10_range[1]));
    if (L.lens) {
      parts.push(h("h2", { text: "Logit lens" }), h("div", { class: "cols lens" }, [
        lensList("promoted", L.lens.promoted, "pos"), lensList("suppressed", L.lens.suppressed, "neg")]));
    }
    parts.push(h("h2", { text: "Top activations" }));
    const top = h("div", { id: "top-contexts" }, L.top.map((c) => contextElement(c, maxAct)));
    if (!L.top.length) top.append(h("p", { class: "muted", text: "never fired in " + D.n_tokens + " tokens" }));
    parts.push(top);
    if (L.samples.length) {
      parts.push(h("h2", { text: "Quantile samples" }));
      const box = h("div", { id: "samples" });
      let q = null;
      for (const c of L.samples) {
        if (c.q !== q) {
          q = c.q;
          box.append(h("h3", { text: "quantile " + (q + 1) + (L.n_quantiles ? " of " + L.n_quantiles : "")
            + (q === 0 ? " (weakest)" : "") }));
        }
        box.append(contextElement(c, maxAct));
      }
      parts.push(box);
    }
    view.replaceChildren(...parts);
    view.dataset.latent = String(L.latent);
    document.title = "Latent " + L.latent + " \u00b7 " + (D.title || "saelab features");
  }
  let ticket = 0;
  function showLatent(id) {
    if (!$("#index-view").hidden) indexScroll = window.scrollY;
    $("#index-view").hidden = true;
    const view = $("#latent-view");
    view.hidden = false;
    delete view.dataset.latent;
    const mine = ++ticket;
    if (!(id >= 0 && id < D.d_sae)) {
      view.replaceChildren(nav(0), h("p", { class: "error",
        text: "There is no latent " + id + ": this SAE has " + D.d_sae + " (0\u2013" + (D.d_sae - 1) + ")." }));
      return;
    }
    view.replaceChildren(nav(id), h("h1", { text: "Latent " + id }), h("p", { class: "muted", text: "loading\u2026" }));
    loadChunk(Math.floor(id / D.chunk)).then((list) => {
      if (mine === ticket) { renderLatent(view, list[id % D.chunk]); window.scrollTo(0, 0); }
    }, (err) => {
      if (mine === ticket) view.append(h("p", { class: "error", text: err.message }));
    });
  }
  function showIndex() {
    ticket++;
    $("#latent-view").hidden = true;
    $("#index-view").hidden = false;
    document.title = D.title ? D.title + " \u00b7 saelab features" : "saelab features";
    if (!built) buildIndex();
    window.scrollTo(0, indexScroll);
  }
  function route() {
    const m = /^#\/latent\/(\d+)$/.exec(location.hash);
    if (m) showLatent(Number(m[1])); else showIndex();
  }
  document.addEventListener("keydown", (e) => {
    const id = Number($("#latent-view").dataset.latent);
    if ($("#latent-view").hidden || Number.isNaN(id) || e.target.tagName === "INPUT") return;
    if (e.key === "ArrowLeft" && id > 0) location.hash = "#/latent/" + (id - 1);
    if (e.key === "ArrowRight" && id < D.d_sae - 1) location.hash = "#/latent/" + (id + 1);
    if (e.key === "Escape") location.hash = "#/";
  });
  window.addEventListener("hashchange", route);
  route();
})();
"""


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m saelab.analysis.browser",
        description="Write the static feature browser of a run dir (from its features/ records) and print "
        "the path of its index.html.",
    )
    ap.add_argument("run_dir", type=Path, help="run dir holding features/ (FeatureRecords.save)")
    ap.add_argument("--out", type=Path, default=None, help="folder to write (default: RUN_DIR/browser)")
    args = ap.parse_args(argv)
    try:
        path = write_browser(args.run_dir, out=args.out)
    except (FileNotFoundError, FileExistsError) as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
