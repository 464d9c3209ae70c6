"""Feature browser: the data it writes (summaries, windows, tolerant inputs, escaping, atomic rewrite, CLI),
then the site itself in headless Chromium (no console errors, every latent listed, search, sorting, a latent
page with its highlighted tokens, markup in tokens shown as text, a screenshot).

The browser tests drive Debian's /usr/bin/chromium through playwright and skip only where it is absent."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from saelab.analysis.browser import (
    RecordArrays,
    browser_index,
    chunk_name,
    explanation_records,
    latent_detail,
    lens_records,
    main,
    read_explanations,
    read_lens,
    token_texts,
    write_browser,
)
from saelab.analysis.features import FeatureRecords, collect_feature_records
from saelab.data.text import ActivationStore
from saelab.sae import SAE, TopK

CHROMIUM = Path("/usr/bin/chromium")
ESCAPE = "</script><b>&\"'"
XSS = '<img src=x onerror="window.pwned=1">'
VOCAB = {
    10: " the",
    11: " dog",
    12: ESCAPE,
    13: "\n",
    14: " cat",
    15: " sat",
    16: "é✓\u2028\ud800",  # a line separator and a lone surrogate, as a byte-level decode can give
    17: "",
    18: XSS,
}
LEFT, RIGHT = 2, 1  # window: centre at index 2 of 4
N_TOKENS = 1000
# latent → (count, act_sum, {hist bin: n}, top contexts, samples); a context is (tokens, acts[, quantile])
SPEC: dict[int, tuple] = {
    0: (
        50,
        100.0,
        {3: 30, 4: 20},
        [([10, 15, 11, 13], [0.0, 0.5, 3.0, 0.0]), ([14, 10, 11, 15], [0.0, 0.0, 1.5, 0.2])],
        [([10, 10, 11, 10], [0.0, 0.0, 0.25, 0.0], 0), ([15, 10, 11, 13], [0.0, 0.0, 2.0, 0.0], 1)],
    ),
    1: (200, 200.0, {4: 200}, [([17, 11, 14, 15], [0.0, 0.0, 2.0, 0.0])], []),
    2: (0, 0.0, {}, [], []),
    3: (5, 15.0, {5: 5}, [([10, 16, 12, 18], [0.0, 0.1, 4.0, 0.3])], []),
    4: (10, 8.0, {4: 10}, [([-1, -1, 15, 10], [0.0, 0.0, 1.0, 0.0])], []),  # at the start of its document
}
DENSITY = {j: s[0] / N_TOKENS for j, s in SPEC.items()}
MAX_ACT = {0: 3.0, 1: 2.0, 2: 0.0, 3: 4.0, 4: 1.0}
EXPLANATIONS = {
    0: {"explanation": "Dogs and puppies", "scores": {"detection": 0.9, "fuzzing": 0.7}},
    1: {"explanation": "cats sitting", "scores": {"detection": 0.4}},
    3: {"explanation": "HTML markup </script>", "scores": {"detection": 0.6}},
}
LENS = {
    0: {"promoted": [[" bark", 2.5], [" puppy", 1.9]], "suppressed": [[" meow", -1.2]]},
    1: {"promoted": [[" purr", 3.1]], "suppressed": []},
}


def _records() -> FeatureRecords:
    """Records of five latents built by hand from `SPEC` (window (2, 1), 2 top slots, 2 quantiles × 1)."""
    d, k, s, w = len(SPEC), 2, 2, LEFT + RIGHT + 1
    arrays: dict[str, torch.Tensor] = {}
    for prefix, m in (("top", k), ("sample", s)):
        arrays[f"{prefix}_act"] = torch.zeros(d, m)
        for name in ("row", "doc", "pos"):
            arrays[f"{prefix}_{name}"] = torch.full((d, m), -1, dtype=torch.long)
        arrays[f"{prefix}_tokens"] = torch.full((d, m, w), -1, dtype=torch.int32)
        arrays[f"{prefix}_window_acts"] = torch.zeros(d, m, w)
    arrays["sample_quantile"] = torch.full((d, s), -1, dtype=torch.long)
    n_bins = 8
    count, act_sum, hist = (
        torch.zeros(d, dtype=torch.long),
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, n_bins, dtype=torch.long),
    )
    for j, (n, total, bins, top, samples) in SPEC.items():
        count[j], act_sum[j] = n, total
        for b, c in bins.items():
            hist[j, b] = c
        for prefix, contexts in (("top", top), ("sample", samples)):
            for slot, (toks, acts, *q) in enumerate(contexts):
                arrays[f"{prefix}_row"][j, slot] = 100 * j + slot
                arrays[f"{prefix}_doc"][j, slot] = j
                arrays[f"{prefix}_pos"][j, slot] = 7 + slot
                arrays[f"{prefix}_act"][j, slot] = acts[LEFT]
                arrays[f"{prefix}_tokens"][j, slot] = torch.tensor(toks, dtype=torch.int32)
                arrays[f"{prefix}_window_acts"][j, slot] = torch.tensor(acts)
                if q:
                    arrays["sample_quantile"][j, slot] = q[0]
    return FeatureRecords(
        n_tokens=N_TOKENS,
        window=(LEFT, RIGHT),
        log10_range=(-2.0, 2.0),
        count=count,
        act_sum=act_sum,
        hist=hist,
        meta={"split": "val", "n_quantiles": 2, "per_quantile": 1},
        **arrays,
    )


def _read_js(path: Path) -> object:
    """The JSON literal inside a data script (`window.X = {...};` or `window.SAELAB.addChunk(k, [...]);`)."""
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r"window\.SAELAB_INDEX = (.*);\n|window\.SAELAB\.addChunk\(\d+, (.*)\);\n", text, re.S)
    assert m, text[:200]
    return json.loads(m.group(1) or m.group(2))


def _write(run_dir: Path, **kw) -> Path:
    kw = {"records": _records(), "lens": LENS, "explanations": EXPLANATIONS, "decode": VOCAB.get, **kw}
    return write_browser(run_dir, **kw)


# ---------------------------------------------------------------------- data (always run)
def test_index_summarises_every_latent():
    rec = _records()
    beyond = {99: {"explanation": "no such latent", "scores": {"extra": 1.0}}}
    index = browser_index(rec, lens_records(LENS), explanation_records({**EXPLANATIONS, **beyond}), VOCAB)
    assert index["d_sae"] == 5 and index["n_tokens"] == N_TOKENS
    assert index["count"] == [SPEC[j][0] for j in range(5)]
    assert index["density"] == pytest.approx([DENSITY[j] for j in range(5)])
    assert index["max_act"] == pytest.approx([MAX_ACT[j] for j in range(5)])
    assert index["mean_act"] == pytest.approx([2.0, 1.0, 0.0, 3.0, 0.8])
    # tokens with a positive activation in the top windows, highest first, each once
    assert index["tokens"] == [[11, 15], [14], [], [12, 18, 16], [15]]
    assert index["lens_tokens"][0] == [" bark", " puppy", " meow"] and index["lens_tokens"][2] == []
    assert index["score_keys"] == ["detection", "fuzzing"]
    assert index["scores"]["detection"] == [0.9, 0.4, None, 0.6, None]
    assert index["explanation"][3] == "HTML markup </script>" and index["explanation"][2] is None
    assert index["vocab"]["12"] == ESCAPE


def test_latent_detail_keeps_contexts_inside_the_document():
    tables = RecordArrays(_records())
    d0 = latent_detail(tables, 0, lens_records(LENS), explanation_records(EXPLANATIONS))
    assert [c["act"] for c in d0["top"]] == [3.0, 1.5]
    assert d0["top"][0] == {
        "act": 3.0,
        "doc": 0,
        "pos": 7,
        "centre": 2,
        "t": [10, 15, 11, 13],
        "a": [0, 0.5, 3, 0],
    }
    assert [(c["q"], c["act"]) for c in d0["samples"]] == [(0, 0.25), (1, 2.0)]
    assert d0["hist"][3:5] == [30, 20] and sum(d0["hist"]) == 50
    assert d0["lens"]["promoted"][0] == [" bark", 2.5] and d0["scores"] == {"detection": 0.9, "fuzzing": 0.7}
    d4 = latent_detail(tables, 4, {}, {})
    assert d4["top"][0]["t"] == [15, 10] and d4["top"][0]["centre"] == 0  # −1 (outside the doc) dropped
    dead = latent_detail(tables, 2, {}, {})
    assert dead["top"] == [] and dead["samples"] == [] and dead["count"] == 0 and dead["lens"] is None


def test_data_files_escape_markup_and_odd_unicode(tmp_path):
    index_html = _write(tmp_path / "run", chunk=2)
    site = index_html.parent
    assert sorted(p.name for p in (site / "data").iterdir()) == [
        "index.js",
        *(chunk_name(k) for k in range(3)),
    ]
    for path in (site / "data").iterdir():
        raw = path.read_bytes()
        raw.decode("ascii")  # every non-ASCII character, U+2028 and lone surrogates included, is escaped
        for bad in (b"</script", b"<b>", b"<img", b"&"):
            assert bad not in raw, (path.name, bad)
    index = _read_js(site / "data" / "index.js")
    assert index["vocab"]["12"] == ESCAPE and index["vocab"]["16"] == VOCAB[16] and index["vocab"]["17"] == ""
    chunk = _read_js(site / "data" / chunk_name(1))
    assert [d["latent"] for d in chunk] == [2, 3]
    assert chunk[1]["explanation"] == "HTML markup </script>"
    page = index_html.read_text(encoding="utf-8")
    assert "<title>run · saelab features</title>" in page and "saelab.analysis.browser" in page


def test_explanations_file_is_read_tolerantly(tmp_path):
    run = tmp_path / "run"
    (run / "autointerp").mkdir(parents=True)
    lines = [
        json.dumps({"latent": 0, "explanation": "dogs", "detection": 0.8, "fuzzing": 0.6, "n_examples": 20}),
        json.dumps(
            {"latent": "1", "explanation": "cats", "scores": {"detection": 0.5, "simulation": {"ev": 0.3}}}
        ),
        "not json",
        json.dumps({"explanation": "no latent id"}),
        "",
        json.dumps({"latent": 0, "fuzzing": 0.65}),  # a second line for latent 0: scores merge
        '{"latent": 3, "explanation": "half writ',  # the producer is still writing
    ]
    (run / "autointerp" / "explanations.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 3 line"):
        got = read_explanations(run)
    assert got == {
        0: {"explanation": "dogs", "scores": {"detection": 0.8, "fuzzing": 0.65}},
        1: {"explanation": "cats", "scores": {"detection": 0.5, "simulation/ev": 0.3}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        site = write_browser(run, records=_records(), decode=VOCAB.get).parent
    index = _read_js(site / "data" / "index.js")
    assert index["score_keys"] == ["detection", "fuzzing", "simulation/ev"]
    assert index["explanation"][:2] == ["dogs", "cats"] and index["scores"]["fuzzing"][0] == 0.65
    assert explanation_records({"2": "plain string"}) == {2: {"explanation": "plain string", "scores": {}}}


def test_lens_is_read_from_the_features_folder_in_either_layout(tmp_path):
    from saelab.analysis.lens import LogitLens

    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    as_records = [{"latent": j, "norm_applied": True, **r} for j, r in LENS.items()]
    (run / "features" / "lens.json").write_text(json.dumps(as_records), encoding="utf-8")
    assert read_lens(run) == LENS
    (run / "features" / "lens.json").write_text(json.dumps({str(j): r for j, r in LENS.items()}))
    assert read_lens(run) == LENS
    assert read_lens(tmp_path / "elsewhere") == {}
    lens = LogitLens(
        latents=[1],
        promoted_ids=torch.tensor([[5]]),
        promoted_logits=torch.tensor([[3.0]]),
        promoted_tokens=[[" purr"]],
        suppressed_ids=torch.tensor([[6]]),
        suppressed_logits=torch.tensor([[-2.0]]),
        suppressed_tokens=[[" bark"]],
        norm_applied=True,
    )
    assert lens_records(lens) == {1: {"promoted": [[" purr", 3.0]], "suppressed": [[" bark", -2.0]]}}


def test_rewrite_replaces_the_folder_and_refuses_a_foreign_one(tmp_path):
    run = tmp_path / "run"
    first = _write(run)
    (first.parent / "stale.txt").write_text("old")
    second = _write(run, explanations={0: {"explanation": "wolves", "scores": {}}})
    assert second == first == run / "browser" / "index.html"
    assert not (run / "browser" / "stale.txt").exists()
    assert _read_js(run / "browser" / "data" / "index.js")["explanation"][0] == "wolves"
    assert [p.name for p in run.iterdir()] == ["browser"]  # no temporary folders left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saelab feature browser"):
        _write(run, out=tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_cli_reads_saved_records_and_their_token_texts(tmp_path, capsys):
    run = tmp_path / "run"
    rec = _records()
    rec.save(run, decode=lambda t: VOCAB[t])
    assert token_texts(rec, run) == VOCAB  # from the decoded windows in latents.jsonl
    assert main([str(run)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == run / "browser" / "index.html" and path.is_file()
    assert _read_js(run / "browser" / "data" / "index.js")["vocab"]["12"] == ESCAPE
    assert main([str(tmp_path / "nothing")]) == 1
    assert "no feature records" in capsys.readouterr().err


def test_records_collected_from_a_source_make_a_browser(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = [9, 20, 11]
    n = sum(lengths)
    doc_id = torch.cat([torch.full((L,), d) for d, L in enumerate(lengths)])
    doc_pos = torch.cat([torch.arange(L) for L in lengths])
    store = ActivationStore(
        torch.randn(n, 8, generator=g),
        torch.randint(2, 50, (n,), generator=g),
        {"doc_id": doc_id, "doc_pos": doc_pos},
    )
    source = type("Source", (), {"act_scale": 1.0, "store": lambda self, split: store})()
    rec = collect_feature_records(
        SAE(8, 12, TopK(3), seed=1).eval(), source, top_k=4, window=(3, 1), reservoir=16
    )
    site = write_browser(tmp_path / "run", records=rec, decode=lambda t: f"w{t}", chunk=5).parent
    index = _read_js(site / "data" / "index.js")
    assert index["d_sae"] == 12 and index["count"] == rec.count.tolist()
    details = [d for k in range(3) for d in _read_js(site / "data" / chunk_name(k))]
    assert [d["latent"] for d in details] == list(range(12))
    for d in details:
        for c in d["top"]:
            assert c["a"][c["centre"]] == pytest.approx(c["act"], rel=1e-3)
            assert all(index["vocab"][str(t)] == f"w{t}" for t in c["t"])


# ---------------------------------------------------------------------- the site in Chromium
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run these"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    # chunk=2: latents 0–1, 2–3, 4 live in three files, so opening pages loads several
    return _write(tmp_path_factory.mktemp("site") / "run", chunk=2)


class _Page:
    """A page of the site with its console errors and uncaught exceptions collected."""

    def __init__(self, browser, site: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        self.url = site.as_uri()

    def open(self, route: str = "") -> None:
        self.page.goto(self.url + route)
        if route.startswith("#/latent/"):
            self.page.wait_for_selector(f"#latent-view[data-latent='{route.rsplit('/', 1)[1]}']")
        else:
            self.page.wait_for_selector("#latents tbody tr")

    def rows(self) -> list[int]:
        return [
            int(x)
            for x in self.page.eval_on_selector_all(
                "#latents tbody tr", "rs => rs.map(r => r.dataset.latent)"
            )
        ]

    def search(self, q: str) -> list[int]:
        self.page.fill("#search", q)
        return self.rows()


@pytest.fixture
def page(browser, site):
    p = _Page(browser, site)
    yield p
    errors, safe = p.errors, p.page.evaluate("window.pwned === undefined")
    p.context.close()
    assert not errors, errors
    assert safe, "markup in a token ran as HTML"


def test_index_lists_every_latent_without_console_errors(page):
    page.open()
    assert page.rows() == [0, 1, 2, 3, 4]
    assert page.page.text_content("#count") == "5 of 5 latents"
    headers = page.page.eval_on_selector_all("#latents th", "ths => ths.map(t => t.textContent)")
    assert headers == [
        "Latent",
        "Density",
        "Max act",
        "Mean act",
        "detection",
        "fuzzing",
        "Explanation",
        "Top tokens",
    ]
    row0 = page.page.eval_on_selector_all("tr[data-latent='0'] td", "tds => tds.map(t => t.textContent)")
    assert row0[:6] == ["0", "5%", "3", "2", "0.9", "0.7"] and row0[6] == "Dogs and puppies"
    page.page.check("#hide-dead")
    assert page.rows() == [0, 1, 3, 4]
    assert not page.errors


@pytest.mark.parametrize(
    "query, want",
    [
        ("3", [3]),
        ("#4", [4]),
        ("id:0", [0]),
        ("puppies", [0]),  # a word of the explanation, any case
        ("expl:CAT", [1]),
        ("tok:dog", [0]),  # a token it fires on in its top contexts
        ("tok:sat", [0, 4]),
        ("tok:the", []),  # in the windows, but never fired on
        ("tok:purr", [1]),  # a logit-lens token
        ("meow", [0]),
        (f"tok:{ESCAPE}", [3]),
        ("", [0, 1, 2, 3, 4]),
    ],
)
def test_search_filters_rows(page, query, want):
    page.open()
    assert page.search(query) == want
    assert page.page.text_content("#count").startswith(f"{len(want)} of 5")


def test_sorting_by_density_activation_and_score(page):
    page.open()
    by_density = sorted(DENSITY, key=lambda j: -DENSITY[j])
    page.page.click("th[data-key='density']")
    assert page.rows() == by_density == [1, 0, 4, 3, 2]
    assert page.page.get_attribute("th[data-key='density']", "aria-sort") == "descending"
    page.page.click("th[data-key='density']")
    assert page.rows() == by_density[::-1]
    page.page.click("th[data-key='max_act']")
    assert page.rows() == sorted(MAX_ACT, key=lambda j: -MAX_ACT[j])
    page.page.click("th[data-key='score:detection']")
    assert page.rows() == [0, 3, 1, 2, 4]  # latents without a score last
    page.search("tok:sat")  # sorting holds under a search
    assert page.rows() == [0, 4]


def test_latent_page_highlights_tokens_by_activation(page, tmp_path):
    page.open()
    page.page.click("tr[data-latent='0'] a")
    page.page.wait_for_selector("#latent-view[data-latent='0']")
    p = page.page
    assert p.text_content("#latent-view h1") == "Latent 0"
    assert p.text_content(".explanation .text") == "Dogs and puppies"
    contexts = p.query_selector_all("#top-contexts .ctx")
    assert len(contexts) == 2
    toks = contexts[0].query_selector_all(".tok")
    assert [t.text_content() for t in toks] == [" the", " sat", " dog", "↵"]  # the newline shown as ↵
    centre = contexts[0].query_selector(".tok.centre")
    assert centre.text_content() == " dog" and float(centre.get_attribute("data-act")) == 3.0
    assert centre.get_attribute("title").startswith("act 3\n")
    colours = [t.evaluate("e => getComputedStyle(e).backgroundColor") for t in toks]
    assert colours[2] == "rgb(242, 120, 20)"  # the max activation: full intensity
    assert colours[1].startswith("rgba(242, 120, 20, ")  # 0.5 / 3, which Chromium keeps in 8 bits
    assert float(colours[1][19:-1]) == pytest.approx(0.5 / 3, abs=1 / 255)
    assert colours[0] == colours[3] == "rgba(0, 0, 0, 0)"  # not firing: no background
    assert "act 0.5" in toks[1].get_attribute("title")
    assert p.eval_on_selector_all("#samples h3", "hs => hs.map(h => h.textContent)") == [
        "quantile 1 of 2 (weakest)",
        "quantile 2 of 2",
    ]
    assert p.eval_on_selector_all("#samples .ctx", "cs => cs.length") == 2
    bars = p.eval_on_selector_all("svg.hist rect.bar", "rs => rs.map(r => Number(r.dataset.count))")
    assert sum(bars) == 50 and max(bars) == 30
    lens = p.eval_on_selector_all(".lens .chip", "cs => cs.map(c => c.firstChild.textContent)")
    assert lens == [" bark", " puppy", " meow"]
    shot = tmp_path / "latent0.png"
    p.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"\nlatent page screenshot: {shot}")
    p.go_back()  # back to the index, search and rows intact
    p.wait_for_selector("#index-view:not([hidden])")
    assert page.rows() == [0, 1, 2, 3, 4]


def test_markup_in_tokens_renders_as_text(page):
    page.open("#/latent/3")
    p = page.page
    toks = p.query_selector_all("#top-contexts .tok")
    assert [t.text_content() for t in toks] == [" the", "é✓\u2424\ud800", ESCAPE, XSS]
    assert p.text_content("#top-contexts .tok.centre") == ESCAPE
    assert p.text_content(".explanation .text") == "HTML markup </script>"
    assert p.eval_on_selector_all("#latent-view b, #latent-view img", "es => es.length") == 0
    page.open()
    chips = p.eval_on_selector_all("tr[data-latent='3'] .chip", "cs => cs.map(c => c.textContent)")
    assert chips[:2] == [ESCAPE, XSS]
    assert p.eval_on_selector_all("#latents b, #latents img", "es => es.length") == 0


def test_dead_and_missing_latents_and_keyboard_navigation(page):
    page.open("#/latent/2")
    assert "never fired" in page.page.text_content("#top-contexts")
    page.page.keyboard.press("ArrowRight")
    page.page.wait_for_selector("#latent-view[data-latent='3']")
    page.page.goto(page.url + "#/latent/99")
    page.page.wait_for_selector("#latent-view .error")
    assert "no latent 99" in page.page.text_content("#latent-view .error")
