"""Auto-interpretation: the OpenAI-compatible client against a local test server (round trip, batching,
retries, the answer cache and a resumed run), the scorers' metrics against hand-computed values, parsing of
messy answers, non-activating windows, the evaluator end to end on a planted-token source with a scripted
server (right answers give 1.0, inverted ones 0.0) and with a scripted log-probability scorer (balanced
accuracy and AUROC by hand, cached and resumed), P(Yes) of `HFChatLM` against a plain HF forward, the config
built by Hydra with `_target_` clients, and one tiny real run with the embedded SmolLM2."""

from __future__ import annotations

import collections
import inspect
import itertools
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from saelab.analysis.features import collect_feature_records
from saelab.data.text import ActivationStore
from saelab.eval.autointerp import AutoInterp
from saelab.eval.base import applies
from saelab.interp.clients import (
    CachedChatLM,
    ChatServerError,
    HFChatLM,
    OpenAIChatLM,
    cache_key,
    make_client,
    read_cache,
    read_probabilities,
    supports_logprob,
)
from saelab.interp.contexts import Example, mark, non_activating_contexts
from saelab.interp.explain import parse_explanation
from saelab.interp.prompts import load_prompts, render
from saelab.interp.score import (
    Item,
    auroc,
    balanced_accuracy,
    classifier_prompts,
    detection_items,
    fuzzing_items,
    parse_labels,
    score_answers,
    score_probabilities,
    yes_no_prompts,
)
from saelab.sae import SAE, ReLU, TopK


# ---------------------------------------------------------------------- a scripted chat server
def _snippets(user: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", user, flags=re.MULTILINE)


def scripted_answer(chat: list[dict], invert: bool = False) -> str:
    """What a perfect (or perfectly wrong) interpreter of the planted-word source answers.

    Explainer: the most frequent marked word. Detection: 1 for snippets holding the explained word.
    Fuzzing: 1 for snippets whose marked spans hold only the explained word.
    """
    system, user = chat[0]["content"], chat[-1]["content"]
    if (
        "Explanation:" in system
        and "Snippets:" in user
        and "marking" not in system
        and "would fire" not in system
    ):
        marked = [w for s in re.findall(r"<<(.*?)>>", user) for w in s.split()]
        return f"Explanation: the word {collections.Counter(marked).most_common(1)[0][0]}"
    word = re.search(r"Explanation: the word (\S+)", user)
    target = word.group(1) if word else "\0"
    labels = []
    for s in _snippets(user):
        if "marking" in system:
            spans = re.findall(r"<<(.*?)>>", s)
            ok = bool(spans) and all(w == target for sp in spans for w in sp.split())
        else:
            ok = re.search(rf"(?<!\w){re.escape(target)}(?!\w)", s) is not None
        labels.append(int(ok) ^ int(invert))
    return json.dumps(labels)


class _Server:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1 (random port), answering `scripted_answer`."""

    def __init__(
        self,
        invert: bool = False,
        fail_first: int = 0,
        status: int = 503,
        down_after: int | None = None,
        garbage: bool = False,
    ) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.invert, self.fail_left, self.status = invert, fail_first, status
        self.down_after, self.garbage, self.served = down_after, garbage, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    fail = outer.fail_left > 0 or (
                        outer.down_after is not None and outer.served >= outer.down_after
                    )
                    outer.fail_left -= int(outer.fail_left > 0)
                    outer.served += int(not fail)
                    if not fail:
                        outer.requests.append(body)
                        outer.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions" or fail:
                    self.send_response(404 if self.path != "/v1/chat/completions" else outer.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "no"}')
                    return
                text = scripted_answer(body["messages"], outer.invert)
                reply = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": text}}]}
                ).encode()
                if outer.garbage:
                    reply = b"<html>502 Bad Gateway</html>"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Scripted:
    """A ChatLM answering `scripted_answer` in process (no server)."""

    model_id = "scripted"

    def __init__(self) -> None:
        self.sent = 0

    def complete(self, prompts, max_tokens=64, temperature=0.0):
        self.sent += len(prompts)
        return [scripted_answer(c) for c in prompts]


def _chats(n: int) -> list[list[dict]]:
    """n distinct detection chats over the words w0..w9."""
    return [
        render(
            "detection",
            explanation=f"the word w{i % 10}",
            examples=f"1. a w{i % 10} b\n2. c w{(i + 1) % 10} d",
            n=2,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------- (a) client and cache
def test_openai_client_round_trip_batches_and_headers(monkeypatch):
    monkeypatch.setenv("SAELAB_TEST_KEY", "sk-test")
    chats = _chats(6)
    with _Server() as srv:
        client = OpenAIChatLM("fake-model", srv.url, api_key_env="SAELAB_TEST_KEY", concurrency=3)
        got = client.complete(chats, max_tokens=7, temperature=0.0)
    assert got == ["[1, 0]"] * 6  # each chat's explained word is in snippet 1 only
    assert len(srv.requests) == 6
    assert sorted(json.dumps(r["messages"]) for r in srv.requests) == sorted(json.dumps(c) for c in chats)
    assert {(r["model"], r["max_tokens"], r["temperature"]) for r in srv.requests} == {("fake-model", 7, 0.0)}
    assert {h.get("Authorization") for h in srv.headers} == {"Bearer sk-test"}


def test_openai_client_retries_server_errors_and_stops_on_refusals():
    with _Server(fail_first=2, status=503) as srv:
        client = OpenAIChatLM("m", srv.url, api_key_env="", max_retries=2)
        assert client.complete(_chats(1)) == ["[1, 0]"]
        assert len(srv.requests) == 1
    with _Server(fail_first=5, status=400) as srv:
        client = OpenAIChatLM("m", srv.url, api_key_env="", max_retries=3)
        with pytest.raises(ChatServerError, match="HTTP 400"):
            client.complete(_chats(1))
        assert srv.fail_left == 4  # one try, no retry for a refusal
    with _Server(fail_first=9, status=503) as srv:
        client = OpenAIChatLM("m", srv.url, api_key_env="", max_retries=1)
        with pytest.raises(ChatServerError, match="failed 2 times"):
            client.complete(_chats(1))


def test_cache_makes_a_second_run_send_nothing(tmp_path):
    chats = _chats(10)
    path = tmp_path / "autointerp" / "cache.jsonl"
    with _Server() as srv:
        first = CachedChatLM(OpenAIChatLM("m", srv.url, api_key_env=""), path, chunk=4)
        a = first.complete(chats + chats[:3], max_tokens=5)  # repeats inside one call are sent once
        assert len(srv.requests) == 10 and first.sent == 10
        second = CachedChatLM(OpenAIChatLM("m", srv.url, api_key_env=""), path, chunk=4)
        b = second.complete(chats, max_tokens=5)
        assert len(srv.requests) == 10 and second.sent == 0
        assert b == a[:10]
        # other sampling settings are other prompts
        second.complete(chats[:2], max_tokens=6)
        assert len(srv.requests) == 12
    lines = path.read_text().splitlines()
    assert len(lines) == 12
    assert {json.loads(ln)["key"] for ln in lines[:10]} == {cache_key("openai:m", c, 5, 0.0) for c in chats}


def test_a_killed_run_resumes_with_only_the_missing_prompts(tmp_path):
    chats = _chats(10)
    path = tmp_path / "cache.jsonl"
    with _Server() as srv:
        full = CachedChatLM(OpenAIChatLM("m", srv.url, api_key_env=""), tmp_path / "full.jsonl")
        want = full.complete(chats)
        # the killed run: the first 5 answers written, the 6th cut mid-line
        lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:5]) + lines[5][:25])
        assert len(read_cache(path)) == 5
        n0 = len(srv.requests)
        resumed = CachedChatLM(OpenAIChatLM("m", srv.url, api_key_env=""), path, chunk=3)
        assert resumed.complete(chats) == want
        assert resumed.sent == 5 and len(srv.requests) - n0 == 5
        sent = {json.dumps(r["messages"]) for r in srv.requests[n0:]}
        assert sent == {json.dumps(c) for c in chats[5:]}
    # the damaged line is skipped and every later line is whole
    assert len(read_cache(path)) == 10
    again = CachedChatLM(OpenAIChatLM("m", "http://127.0.0.1:9/v1", api_key_env="", max_retries=0), path)
    assert again.complete(chats) == want and again.sent == 0  # no server needed


OPENAI = "saelab.interp.clients.OpenAIChatLM"


def test_make_client_builds_target_nodes_and_passes_clients_through():
    c = make_client({"_target_": OPENAI, "model": "m", "base_url": "http://x:1/v1/", "concurrency": 5})
    assert isinstance(c, OpenAIChatLM) and c.url == "http://x:1/v1/chat/completions" and c.concurrency == 5
    assert make_client(c) is c
    hf = make_client({"_target_": "saelab.interp.clients.HFChatLM", "batch_size": 3})
    assert isinstance(hf, HFChatLM) and hf.batch_size == 3 and hf._host is None  # nothing loaded yet
    with pytest.raises(ValueError, match="needs `_target_`"):
        make_client({"kind": "openai", "model": "m"})
    with pytest.raises(TypeError, match="must be a ChatLM"):
        make_client("openai")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- (b) metrics by hand
def test_balanced_accuracy_by_hand():
    # 3 positives (2 right), 5 negatives (4 right): ½(2/3 + 4/5)
    truth = [1, 1, 1, 0, 0, 0, 0, 0]
    pred = [1, 0, 1, 0, 0, 1, 0, 0]
    assert balanced_accuracy(truth, pred) == pytest.approx(0.5 * (2 / 3 + 4 / 5))
    assert balanced_accuracy(truth, [1] * 8) == pytest.approx(0.5)  # constant answers are chance
    assert balanced_accuracy(truth, [1 - t for t in truth]) == 0.0
    assert np.isnan(balanced_accuracy([1, 1], [1, 0]))


def _auroc_pairs(s, y) -> float:
    """P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) over every positive/negative pair."""
    pos = [a for a, t in zip(s, y, strict=True) if t]
    neg = [a for a, t in zip(s, y, strict=True) if not t]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_by_hand_and_against_pair_counting():
    # positives 0.9, 0.4, 0.4; negatives 0.4, 0.1: pairs won 2 + 0.5 + 1 + 0.5 + 1 = 5 of 6
    assert auroc([0.9, 0.4, 0.4, 0.4, 0.1], [1, 1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert auroc([3, 2, 1], [1, 1, 0]) == 1.0 and auroc([1, 2, 3], [1, 1, 0]) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 5, 23).astype(float)  # many ties
        y = rng.integers(0, 2, 23)
        y[:2] = [0, 1]
        assert auroc(s, y) == pytest.approx(_auroc_pairs(s, y))
    assert np.isnan(auroc([1.0, 2.0], [1, 1]))


def test_score_answers_counts_unparsed_prompts_apart():
    labels = [[1, 0, 1], [0, 0, 1], [1, 1, 0]]
    answers = ["[1, 0, 0]", "I am not sure.", "1: yes 2: yes 3: no"]
    s = score_answers(labels, answers)
    # parsed: truth 1 0 1 1 1 0, pred 1 0 0 1 1 0 → TPR 3/4, TNR 2/2
    assert s.n_items == 9 and s.n_unparsed == 3
    assert s.score == pytest.approx(0.5 * (3 / 4 + 1.0))
    assert np.isnan(score_answers([[1, 0]], ["no idea"]).score)


# ---------------------------------------------------------------------- (c) parsing
@pytest.mark.parametrize(
    ("answer", "n", "want"),
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("Sure! Here is my answer:\n[0,1,1,0]\nHope this helps.", 4, [0, 1, 1, 0]),
        ("[1, 0, 1] is the format; my answer: [0, 0]", 2, [0, 0]),  # the list of the right length
        ("[yes, no, Yes]", 3, [1, 0, 1]),
        ("Example 1: 1\nExample 2: 0\nExample 3: 1", 3, [1, 0, 1]),
        ("1. yes\n2. no", 2, [1, 0]),
        ("1 0 0 1", 4, [1, 0, 0, 1]),
        ("0110", 4, [0, 1, 1, 0]),
        ("No. Yes. Yes.", 3, [0, 1, 1]),
        ("[1, 4, 2, 3, 1]", 5, None),
        ("[1, 0, 1]", 4, None),
        ("", 2, None),
        ("The feature fires in snippet 1 and 3 out of 10.", 2, None),
    ],
)
def test_parse_labels_reads_messy_answers(answer, n, want):
    assert parse_labels(answer, n) == want


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        ("Explanation: the word zebra", "the word zebra"),
        ("Let me think.\nThe marked words are animals.\nExplanation: <<animal>> names.", "animal names."),
        ('explanation:\n"years after in"', "years after in"),
        ("  numbers in dates  \nmore text", "numbers in dates"),
        ("", ""),
    ],
)
def test_parse_explanation(answer, want):
    assert parse_explanation(answer) == want


def test_marking_and_prompt_rendering():
    ex = Example([" the", " cat", " sat", " on", "\n", " mats"], [0.0, 2.0, 0.5, 0.0, 0.0, 1.0])
    assert ex.text(ex.flags()) == " the <<cat sat>> on\\n <<mats>>"
    assert ex.text(ex.flags(0.2)) == " the <<cat sat>> on\\n <<mats>>"  # 0.5 > 0.2 · 2
    assert ex.text(ex.flags(0.25)) == " the <<cat>> sat on\\n <<mats>>"  # 0.5 is not > 0.25 · 2
    assert ex.text(ex.flags(0.6)) == " the <<cat>> sat on\\n mats"
    assert mark(["a", "b"], [False, False]) == "ab"
    chat = render("detection", explanation="cats", examples="1. x\n2. y", n=2)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[-1]["content"].endswith("1. x\n2. y\nAnswer with 2 numbers.")
    assert set(load_prompts()) >= {"explainer", "detection", "fuzzing"}


def test_items_have_the_right_labels_and_balance():
    pos = [Example([" a", " z", " b", " c"], [0, 1.0, 0, 0]) for _ in range(5)]
    neg = [Example([" a", " b"], [0, 0]) for _ in range(5)]
    det = detection_items(pos, neg, random.Random(0))
    assert sorted(i.label for i in det) == [0] * 5 + [1] * 5 and all("<<" not in i.text for i in det)
    fz = fuzzing_items(pos, random.Random(0))
    assert sorted(i.label for i in fz) == [0, 0, 1, 1, 1]
    for it in fz:
        assert ("<<z>>" in it.text) == bool(it.label) and it.text.count("<<") == 1
    chats = classifier_prompts("fuzzing", "z", fz, per_prompt=2)
    assert [len(lab) for _, lab in chats] == [2, 2, 1]
    assert [lab for _, lab in chats] == [[i.label for i in fz[k : k + 2]] for k in (0, 2, 4)]


# ---------------------------------------------------------------------- a planted-word source
V, WORDS = 30, [f" w{i}" for i in range(30)]


class _Tokenizer:
    def decode(self, ids) -> str:
        return "".join(WORDS[i] for i in ids)


class _Host:
    tokenizer = _Tokenizer()

    def generate(self, prompt, max_new_tokens=32):  # applies_to asks only that it exists
        raise NotImplementedError


class _PlantedSource:
    """Activations = one-hot(token) + noise: with `planted_sae`, latent j fires exactly on word j."""

    def __init__(self, n_docs: int = 60, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(15, 45, (n_docs,), generator=g)
        self.doc_id = torch.cat([torch.full((int(n),), d) for d, n in enumerate(lengths)])
        self.doc_pos = torch.cat([torch.arange(int(n)) for n in lengths])
        self.token_ids = torch.randint(0, V, (len(self.doc_id),), generator=g)
        self.acts = torch.nn.functional.one_hot(self.token_ids, V).float()
        self.acts += 0.1 * torch.rand(self.acts.shape, generator=g)
        self.host = _Host()
        self._store = ActivationStore(
            self.acts, self.token_ids, {"doc_id": self.doc_id, "doc_pos": self.doc_pos}
        )

    def store(self, split: str) -> ActivationStore:
        return self._store


def planted_sae() -> SAE:
    sae = SAE(V, V, ReLU(), b_dec_init="zeros", seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(V))
        sae.W_dec.copy_(torch.eye(V))
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    return sae.eval()


class _BagOfWords:
    """An embedder for tests: unit bag-of-words vectors over w0..w29."""

    def encode(self, texts):
        out = np.zeros((len(texts), V), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\bw(\d+)\b", t):
                out[i, int(w)] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-9)


def test_non_activating_windows_never_fire_and_are_the_store_rows():
    src, sae = _PlantedSource(), planted_sae()
    rec = collect_feature_records(sae, src, window=(3, 2), reservoir=64)
    neg = non_activating_contexts(sae, src, [0, 4, 7], n=12, n_rows=rec.n_tokens, window=(3, 2), seed=1)
    row_of = {(int(d), int(p)): r for r, (d, p) in enumerate(zip(src.doc_id, src.doc_pos, strict=True))}
    for j, ctxs in neg.items():
        assert len(ctxs) == 12 and len({(c.doc, c.pos) for c in ctxs}) == 12
        for c in ctxs:
            r = row_of[(c.doc, c.pos)]
            for o, t in zip(range(-3, 3), c.tokens, strict=True):
                if t >= 0:
                    assert src.doc_id[r + o] == c.doc and t == int(src.token_ids[r + o]) != j
            assert max(c.acts) == 0.0 and sum(t >= 0 for t in c.tokens) >= 3


def _interp(tmp_path, **kw) -> AutoInterp:
    base = {
        "n_latents": 4, "scorers": ["detection", "fuzzing", "embedding"], "embedder": _BagOfWords(),
        "tokens": None, "window": [4, 2], "n_quantiles": 4, "per_quantile": 6, "reservoir": 64,
        "explain_top": 6, "explain_samples": 4, "n_score": 8, "examples_per_prompt": 4, "batch_size": 3,
    }  # fmt: skip
    return AutoInterp(**{**base, **kw})


def test_evaluator_with_a_perfect_and_an_inverted_scorer(tmp_path, capsys):
    src, sae = _PlantedSource(), planted_sae()
    with _Server() as srv:
        client = {"_target_": OPENAI, "model": "scripted", "base_url": srv.url, "api_key_env": ""}
        ev = _interp(tmp_path, explainer=client)
        assert applies(ev, src) is None and ev.scoring == "generate" and ev.scorer is ev.explainer
        res = ev(sae, src, tmp_path / "run")
        n_sent = len(srv.requests)
        # a rerun is answered from the cache
        again = _interp(tmp_path, explainer=client)(sae, src, tmp_path / "run")
        assert len(srv.requests) == n_sent
    assert again.metrics == res.metrics
    rows = res.data["autointerp"]["latents"]
    assert len(rows) == 4 == res.metrics["autointerp_n_latents"]
    for r in rows:
        assert r["explanation"] == f"the word w{r['latent']}"
        assert r["n_activating"] == r["n_non_activating"] == 8
        assert r["detection"] == 1.0 and r["fuzzing"] == 1.0 and r["embedding"] == 1.0
    assert res.metrics["autointerp_detection"] == 1.0 and res.metrics["autointerp_detection_unparsed"] == 0.0
    assert res.tables["autointerp"].headers[:3] == ["latent", "density", "explanation"]
    saved = [
        json.loads(ln)
        for ln in (tmp_path / "run" / "autointerp" / "explanations.jsonl").read_text().splitlines()
    ]
    assert [s["latent"] for s in saved] == [r["latent"] for r in rows]
    # prompts sent: 4 explanations + 4 latents × (16 detection + 8 fuzzing contexts) / 4 per prompt
    assert n_sent == 4 + 4 * (4 + 2)

    with _Server(invert=True) as srv:
        client = {"_target_": OPENAI, "model": "inverted", "base_url": srv.url, "api_key_env": ""}
        bad = _interp(tmp_path, explainer=client, scorers=["detection", "fuzzing"])(
            sae, src, tmp_path / "run2"
        )
    assert bad.metrics["autointerp_detection"] == 0.0 and bad.metrics["autointerp_fuzzing"] == 0.0
    assert "autointerp_embedding" not in bad.metrics


def test_an_endpoint_that_goes_down_keeps_the_finished_answers_and_a_rerun_resumes(tmp_path):
    src, sae = _PlantedSource(), planted_sae()

    def client(srv):
        return {"_target_": OPENAI, "model": "m", "base_url": srv.url, "api_key_env": "", "max_retries": 0}

    with _Server() as srv:
        want = _interp(tmp_path, explainer=client(srv))(sae, src, tmp_path / "ref")
        assert len(srv.requests) == 28  # 4 explanations + 4 latents × 6 scoring prompts
    run = tmp_path / "run"
    # down after 10 answers: the explanations (chunks of 3 + 1) and two scoring chunks are saved; the
    # chunk in flight (prompts 11-13) is lost whole
    with _Server(down_after=10) as srv:
        with pytest.raises(ChatServerError) as err:
            _interp(tmp_path, explainer=client(srv))(sae, src, run)
    msg = str(err.value)
    assert msg.startswith("autointerp stopped after 6 of 24 prompts: ") and "HTTP 503" in msg
    assert f"kept in {run / 'autointerp' / 'cache.jsonl'}: rerun the same command" in msg
    assert len(read_cache(run / "autointerp" / "cache.jsonl")) == 10
    assert not (run / "autointerp" / "explanations.jsonl").exists()  # no half-finished result
    with _Server() as srv:
        got = _interp(tmp_path, explainer=client(srv))(sae, src, run)
        assert len(srv.requests) == 28 - 10  # only the missing prompts
    assert got.metrics == want.metrics and got.metrics["autointerp_detection"] == 1.0
    # an endpoint answering something that is not a chat completion
    with _Server(garbage=True) as srv:
        with pytest.raises(ChatServerError, match=r"stopped after 0 of 4 prompts: .*not a chat completion"):
            _interp(tmp_path, explainer=client(srv))(sae, src, tmp_path / "garbage")


def test_no_latent_with_enough_contexts_gives_an_empty_table(tmp_path, capsys):
    src, sae = _PlantedSource(), planted_sae()
    client = _Scripted()
    res = _interp(tmp_path, explainer=client, min_examples=1000)(sae, src, tmp_path)
    assert "no latent has enough contexts" in capsys.readouterr().out and client.sent == 0
    assert res.metrics["autointerp_n_latents"] == 0 and res.tables["autointerp"].rows == []
    assert res.tables["autointerp"].headers[:3] == ["latent", "density", "explanation"]
    assert (tmp_path / "autointerp" / "explanations.jsonl").read_text() == ""


class _WrongExplainer(_Scripted):
    """Explains latent j as the word of latent j + 1 (a wrong explanation); scores like `_Scripted`."""

    def complete(self, prompts, max_tokens=64, temperature=0.0):
        out = super().complete(prompts, max_tokens, temperature)
        shift = lambda m: f"the word w{(int(m.group(1)) + 1) % V}"  # noqa: E731
        return [re.sub(r"(?<=^Explanation: )the word w(\d+)", shift, a) for a in out]


def test_a_wrong_explanation_scores_near_chance_with_a_perfect_scorer(tmp_path):
    src, sae = _PlantedSource(), planted_sae()
    res = _interp(tmp_path, explainer=_WrongExplainer(), n_latents=8, n_score=12)(sae, src, tmp_path)
    rows = res.data["autointerp"]["latents"]
    assert all(r["explanation"] == f"the word w{(r['latent'] + 1) % V}" for r in rows) and len(rows) == 8
    assert abs(res.metrics["autointerp_detection"] - 0.5) < 0.1
    assert res.metrics["autointerp_fuzzing"] == 0.5  # every marking is judged wrong


def test_evaluator_reuses_records_of_this_sae_only(tmp_path, capsys):
    src, sae = _PlantedSource(), planted_sae()
    kw = {"window": (4, 2), "n_quantiles": 4, "per_quantile": 6, "reservoir": 64}
    collect_feature_records(sae, src, **kw).save(tmp_path / "run")
    ev = _interp(tmp_path, scorers=["embedding"], latents=[3, 5], explainer=_Scripted())
    rec = ev.feature_records(sae, src, tmp_path / "run" / "stage")  # found in the parent (the run dir)
    assert rec.n_tokens == len(src.doc_id) and "not reusing" not in capsys.readouterr().out
    other = planted_sae()
    with torch.no_grad():
        other.b_enc.fill_(-0.55)  # the same latents fire, with other activations
    ev.feature_records(other, src, tmp_path / "run" / "stage")
    assert "their activations are not this SAE's" in capsys.readouterr().out
    res = ev(sae, src, tmp_path / "run" / "stage")
    assert [r["latent"] for r in res.data["autointerp"]["latents"]] == [3, 5]
    assert res.metrics["autointerp_embedding"] == 1.0 and "autointerp_detection" not in res.metrics


def test_applies_only_to_text_sources_with_a_causal_lm_host():
    ev = AutoInterp()
    assert applies(ev, object()) is not None and "causal-LM host" in applies(ev, object())

    class NoLM:
        host = object()

        def store(self, split):
            return None

    assert "not a causal LM" in applies(ev, NoLM())


def test_config_builds_with_target_clients(cfg_factory):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = cfg_factory(["eval/metrics=[autointerp]"])
    node = OmegaConf.to_container(cfg.eval.metrics.autointerp, resolve=True)
    assert node.pop("_target_") == "saelab.eval.autointerp.AutoInterp"
    assert node["explainer"] == {"_target_": "saelab.interp.clients.HFChatLM", "model": "smollm2"}
    inspect.signature(AutoInterp).bind(**node)
    ev = instantiate(cfg.eval.metrics.autointerp)  # as saelab.stage.evaluators builds it
    assert isinstance(ev, AutoInterp) and isinstance(ev.explainer, HFChatLM)
    assert ev.scorer is ev.explainer  # one model, loaded once
    assert ev.explainer.model_id == "hf:smollm2-135m-instruct-q4_1:float32" and ev.explainer._host is None
    assert ev.scoring == "logprob" and ev.scorers == ["detection", "fuzzing", "embedding"]
    # an OpenAI-compatible explainer from the command line: its scorer follows, scoring falls back
    url = "http://127.0.0.1:9/v1"
    cfg = cfg_factory(
        [
            "eval/metrics=[autointerp]",
            f"++eval.metrics.autointerp.explainer={{_target_: {OPENAI}, model: big, base_url: '{url}'}}",
        ]
    )
    ev = instantiate(cfg.eval.metrics.autointerp)
    assert isinstance(ev.explainer, OpenAIChatLM) and ev.explainer.url == url + "/chat/completions"
    assert ev.scorer is ev.explainer and ev.scoring == "generate"
    # an explicit local scorer beside a remote explainer
    cfg = cfg_factory(
        [
            "eval/metrics=[autointerp]",
            f"++eval.metrics.autointerp.explainer={{_target_: {OPENAI}, model: big, base_url: '{url}'}}",
            "eval.metrics.autointerp.scorer={_target_: saelab.interp.clients.HFChatLM, batch_size: 4}",
        ]
    )
    ev = instantiate(cfg.eval.metrics.autointerp)
    assert isinstance(ev.scorer, HFChatLM) and ev.scorer.batch_size == 4 and ev.scoring == "logprob"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown autointerp scorers"):
        AutoInterp(scorers=["detection", "simulation"])
    with pytest.raises(ValueError, match="needs a scorer with yes_probability"):
        AutoInterp(explainer=_Scripted(), scoring="logprob")
    with pytest.raises(ValueError, match="logprob, generate or null"):
        AutoInterp(scoring="sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        AutoInterp(latents=[99]).choose_latents(
            collect_feature_records(planted_sae(), _PlantedSource(), reservoir=16)
        )


# ---------------------------------------------------------------------- (e) log-probability scoring
def test_score_probabilities_by_hand():
    # positives p = 0.9, 0.6, 0.3; negatives p = 0.6, 0.2, 0.1, 0.7
    labels = [1, 0, 1, 0, 1, 0, 0]
    p = [0.9, 0.6, 0.6, 0.2, 0.3, 0.1, 0.7]
    s = score_probabilities(labels, p)
    # p > ½: TPR 2/3 (0.9, 0.6), TNR 2/4 (0.2, 0.1 right; 0.6, 0.7 wrong)
    assert s.score == pytest.approx(0.5 * (2 / 3 + 2 / 4))
    # pairs won: 0.9 beats all 4; 0.6 beats 0.2, 0.1, ties 0.6 (½), loses to 0.7; 0.3 beats 0.2, 0.1
    assert s.auroc == pytest.approx((4 + 2.5 + 2) / 12)
    assert s.n_items == 7 and s.n_unparsed == 0 and s.pred == [1, 1, 1, 0, 0, 0, 1] and s.p_yes == p
    # every p on one side of ½: chance balanced accuracy, yet the ranking is perfect
    low = score_probabilities([1, 1, 0, 0], [0.4, 0.3, 0.2, 0.1])
    assert low.score == 0.5 and low.auroc == 1.0
    assert np.isnan(score_probabilities([1, 1], [0.9, 0.1]).auroc)


def test_yes_no_prompts_ask_one_context_each():
    items = [Item(" a <<z>> b", 1), Item(" c d", 0)]
    got = yes_no_prompts("fuzzing", "the word z", items)
    assert [y for _, y in got] == [1, 0]
    chat = got[0][0]
    assert chat[-1]["content"].startswith("Explanation: the word z\nSnippet: a <<z>> b\n")
    assert chat[-1]["content"].endswith("Answer Yes or No.")
    assert {m["content"] for m in chat if m["role"] == "assistant"} == {"Yes", "No"}
    det = yes_no_prompts("detection", "the word z", items)[1][0]
    assert "Snippet: c d\nDoes this snippet contain" in det[-1]["content"]


class _ScriptedProbs(_Scripted):
    """A scripted explainer whose scorer reads P(Yes): `p_pos` for a right context, `p_neg` for a wrong one
    (detection: the snippet holds the explained word; fuzzing: the marked words are only that word)."""

    def __init__(self, p_pos: float = 0.9, p_neg: float = 0.2, model_id: str = "scripted-probs") -> None:
        super().__init__()
        self.p_pos, self.p_neg, self.model_id = p_pos, p_neg, model_id
        self.read = 0

    def yes_probability(self, prompts, yes="Yes", no="No"):
        self.read += len(prompts)
        out = []
        for chat in prompts:
            user = chat[-1]["content"]
            target = re.search(r"Explanation: the word (\S+)", user).group(1)
            snippet = re.search(r"^Snippet: (.*)$", user, flags=re.MULTILINE).group(1)
            if "marked words" in user:
                spans = re.findall(r"<<(.*?)>>", snippet)
                ok = bool(spans) and all(w == target for sp in spans for w in sp.split())
            else:
                ok = re.search(rf"(?<!\w){re.escape(target)}(?!\w)", snippet) is not None
            out.append(self.p_pos if ok else self.p_neg)
        return out


@pytest.mark.parametrize(
    ("p_pos", "p_neg", "ba", "auc"),
    [
        (0.9, 0.2, 1.0, 1.0),  # right and confident
        (0.4, 0.1, 0.5, 1.0),  # every answer "No" at ½, but the ranking is right
        (0.6, 0.7, 0.5, 0.0),  # every answer "Yes", ranked backwards
        (0.2, 0.8, 0.0, 0.0),  # inverted
    ],
)
def test_evaluator_logprob_mode_by_hand(tmp_path, p_pos, p_neg, ba, auc):
    src, sae = _PlantedSource(), planted_sae()
    client = _ScriptedProbs(p_pos, p_neg)
    ev = _interp(tmp_path, explainer=client, embedder=_BagOfWords())
    assert ev.scoring == "logprob" and ev.scorer is client
    res = ev(sae, src, tmp_path / "run")
    rows = res.data["autointerp"]["latents"]
    assert len(rows) == 4 and res.data["autointerp"]["scoring"] == "logprob"
    for r in rows:
        assert r["explanation"] == f"the word w{r['latent']}"
        assert (r["detection"], r["detection_auroc"], r["fuzzing"], r["fuzzing_auroc"]) == (ba, auc, ba, auc)
        assert r["detection_items"] == 16 and r["fuzzing_items"] == 8 and r["detection_unparsed"] == 0
    for kind in ("detection", "fuzzing"):
        assert res.metrics[f"autointerp_{kind}"] == ba and res.metrics[f"autointerp_{kind}_auroc"] == auc
        assert res.metrics[f"autointerp_{kind}_unparsed"] == 0.0
    assert "autointerp_embedding_auroc" not in res.metrics
    assert res.tables["autointerp"].headers[3:] == [
        "detection", "detection_auroc", "fuzzing", "fuzzing_auroc", "embedding"
    ]  # fmt: skip
    # one chat per context, no generation: 4 explanations + 4 latents × (16 + 8) contexts
    assert client.sent == 4 and client.read == 4 * 24


def test_evaluator_logprob_mode_resumes_from_its_cache(tmp_path):
    src, sae = _PlantedSource(), planted_sae()
    first = _ScriptedProbs(0.7, 0.35)
    res = _interp(tmp_path, explainer=first)(sae, src, tmp_path / "run")
    cache = tmp_path / "run" / "autointerp" / "cache.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    assert len(read_cache(cache)) == 4 and len(read_probabilities(cache)) == 4 * 24 == len(lines) - 4
    # a rerun reads everything back
    again = _ScriptedProbs(0.7, 0.35)
    assert _interp(tmp_path, explainer=again)(sae, src, tmp_path / "run").metrics == res.metrics
    assert again.sent == 0 and again.read == 0
    # a killed run: the explanations and 30 probabilities written, the 31st cut mid-line
    cache.write_text("".join(lines[:34]) + lines[34][:30])
    resumed = _ScriptedProbs(0.7, 0.35)
    assert _interp(tmp_path, explainer=resumed)(sae, src, tmp_path / "run").metrics == res.metrics
    assert resumed.sent == 0 and resumed.read == 4 * 24 - 30


def test_cached_yes_probability_keys_and_refusals(tmp_path):
    chats = [c for c, _ in yes_no_prompts("detection", "the word w1", [Item(" w1 b", 1), Item(" c", 0)])]
    inner = _ScriptedProbs(0.123456789012345, 1 / 3)
    cached = CachedChatLM(inner, tmp_path / "c.jsonl", chunk=1)
    assert supports_logprob(cached) and supports_logprob(inner) and not supports_logprob(_Scripted())
    want = [0.123456789012345, 1 / 3]
    assert cached.yes_probability(chats + chats) == want * 2 and inner.read == 2  # repeats read once
    assert CachedChatLM(inner, tmp_path / "c.jsonl").yes_probability(chats) == want  # exact floats back
    assert inner.read == 2
    # other answer words are another key; so is a generated answer to the same chat
    cached.yes_probability(chats[:1], yes="Y", no="N")
    assert inner.read == 3
    k_gen, k_lp = cache_key("m", chats[0], 64, 0.0), cache_key("m", chats[0], mode="logprob:Yes/No")
    assert k_gen != k_lp != cache_key("m", chats[0], mode="logprob:Y/N")
    cached.complete(chats[:1])
    assert len(read_cache(tmp_path / "c.jsonl")) == 1 and len(read_probabilities(tmp_path / "c.jsonl")) == 3
    with pytest.raises(TypeError, match="has no yes_probability"):
        CachedChatLM(_Scripted(), tmp_path / "d.jsonl").yes_probability(chats)
    assert not supports_logprob(CachedChatLM(_Scripted(), tmp_path / "d.jsonl"))


# ---------------------------------------------------------------------- (d) the embedded SmolLM2
def test_hf_chat_lm_batches_with_left_padding_like_one_at_a_time(tmp_path):
    from saelab.interp.clients import HFChatLM

    lm = HFChatLM(batch_size=2)
    chats = [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    ]
    assert lm.render(chats[0]).endswith("<|im_start|>assistant\n")
    both = lm.complete(chats, max_tokens=5)
    alone = [lm.complete([c], max_tokens=5)[0] for c in chats]
    assert both == alone and all(isinstance(a, str) and a for a in both) and both[0] != both[1]
    cached = CachedChatLM(lm, tmp_path / "c.jsonl")
    assert cached.complete(chats, max_tokens=5) == both and cached.sent == 2
    assert CachedChatLM(lm, tmp_path / "c.jsonl").complete(chats, max_tokens=5) == both


def test_yes_probability_against_a_plain_hf_forward(tmp_path):
    """P(Yes) of a batch (left-padded, two lengths) equals softmax over the Yes / No logits of an unpadded
    forward of each chat, its template rendered by the tokenizer with the assistant turn opened."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saelab.hosts.causal_lm import embedded_model_dir

    items = [Item("he was born in 1987 in a small town", 1), Item("the cat sat", 0)]
    chats = [c for c, _ in yes_no_prompts("detection", "four-digit years", items)]
    lm = HFChatLM(batch_size=2)
    got = lm.yes_probability(chats)

    path = embedded_model_dir("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    want = []
    for chat in chats:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]  # (vocab,)
        want.append(float(torch.softmax(logits[[yes, no]], 0)[0]))
    assert len({len(tok(lm.render(c))["input_ids"]) for c in chats}) == 2  # the batch was padded
    assert got == pytest.approx(want, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in got)
    cached = CachedChatLM(lm, tmp_path / "c.jsonl")
    assert cached.yes_probability(chats) == got and cached.sent == 2
    assert CachedChatLM(lm, tmp_path / "c.jsonl").yes_probability(chats) == got


# ≈ 15–30 s on 2 CPU cores (model load included); it took 2 min when the cores were shared at load 7
def test_tiny_real_run_with_the_embedded_smollm2(tmp_path):
    from support import SENTENCES

    from saelab.data.text import TextActivations
    from saelab.hosts.causal_lm import CausalLMHost

    torch.manual_seed(0)
    host = CausalLMHost("smollm2", hook=3)
    src = TextActivations(
        host, SENTENCES, list(itertools.chain(SENTENCES, SENTENCES[::-1])), context_len=32, train_tokens=64,
        val_tokens=120, batch_size=32, harvest_batch=4, cache=False,
    )  # fmt: skip
    sae = SAE(576, 64, TopK(4), seed=0).eval()
    ev = AutoInterp(
        n_latents=2, tokens=None, window=[4, 1], n_quantiles=2, per_quantile=4, reservoir=32,
        explain_top=2, explain_samples=1, n_score=2, min_examples=2, examples_per_prompt=4,
        explain_max_tokens=16, score_max_tokens=12, batch_size=8, seed=0,
    )  # fmt: skip
    assert applies(ev, src) is None and ev.scoring == "logprob"
    res = ev(sae, src, tmp_path)
    rows = res.data["autointerp"]["latents"]
    assert len(rows) == 2 == res.metrics["autointerp_n_latents"]
    for r in rows:
        assert isinstance(r["explanation"], str) and r["explanation"].strip()
        assert r["n_activating"] == r["n_non_activating"] == 2
        assert r["detection_items"] == 4 and r["detection_unparsed"] == 0
        assert r["fuzzing_items"] in (1, 2)  # a window firing throughout has no wrong marks
        for k in ("detection", "detection_auroc", "fuzzing", "fuzzing_auroc", "embedding"):
            assert np.isnan(r[k]) or 0.0 <= r[k] <= 1.0
        assert 0.0 <= r["detection_auroc"] <= 1.0  # two of each class: always defined
    assert 0.0 <= res.metrics["autointerp_embedding"] <= 1.0
    assert res.data["autointerp"]["explainer"] == res.data["autointerp"]["scorer"]
    assert res.data["autointerp"]["explainer"] == "hf:smollm2-135m-instruct-q4_1:float32"
    assert len(read_probabilities(tmp_path / "autointerp" / "cache.jsonl")) == 2 * 4 + sum(
        r["fuzzing_items"] for r in rows
    )
    assert (tmp_path / "autointerp" / "cache.jsonl").is_file()


# ≈ 1 min on 2 CPU cores (model load included)
@pytest.mark.slow
def test_the_embedded_smollm2_ranks_by_a_right_explanation_but_is_far_from_1():
    """Detection by the real scorer on a latent that fires exactly on " cat": what SmolLM2-135M gives.

    A scorer that follows the question gives the right explanation an AUROC near 1 and a wrong one
    near 0.5 (the stand-in scorer above does). SmolLM2-135M (4-bit) does not: P(Yes) stays near 0.1 for
    every snippet, so the balanced accuracy of P(Yes) > ½ is 0.5 for both. The AUROC of its P(Yes)
    separates them, but only a little for the right one. Measured: right 0.625, wrong 0.33. The test
    holds that line (right above chance and clearly above wrong), not a score near 1.
    """
    from saelab.interp.clients import HFChatLM

    pos = [
        "the cat sat on the mat", "my cat likes fish", "a black cat crossed the road",
        "she fed the cat at noon", "the cat slept all day", "we adopted a cat last year",
        "his cat is very old", "the cat chased a mouse",
    ]  # fmt: skip
    neg = [
        "the train left the station late", "he wrote a long letter", "rain fell on the roof",
        "the market opened early", "they painted the fence blue", "prices rose in march",
        "the river runs to the sea", "a new bridge was built",
    ]  # fmt: skip
    items = [Item(t, 1) for t in pos] + [Item(t, 0) for t in neg]
    lm = HFChatLM(batch_size=8)
    got = {}
    for name, expl in (("right", "the word cat"), ("wrong", "the word ocean")):
        chats = [c for c, _ in yes_no_prompts("detection", expl, items)]
        got[name] = score_probabilities([i.label for i in items], lm.yes_probability(chats))
    print({k: (v.score, round(v.auroc, 3), max(v.p_yes)) for k, v in got.items()})
    assert got["right"].auroc >= 0.55 and got["right"].auroc - got["wrong"].auroc >= 0.2
