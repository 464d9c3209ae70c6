"""Chat-LM clients for the explainer and the scorers: a local HF model, an OpenAI-compatible server, a cache.

Every client answers a batch of chats, `complete(prompts, max_tokens, temperature) -> list[str]`, where a
chat is a list of {"role", "content"} messages, and names itself by `model_id` (part of the cache key).
Clients are built by Hydra from `_target_` nodes (`explainer: {_target_: saelab.interp.clients.HFChatLM}`).

- `HFChatLM`: any HF causal LM (default the embedded SmolLM2-135M-Instruct, loaded through
  `CausalLMHost`, so an activation host on the same weights shares them), the tokenizer's chat template,
  batches left-padded, greedy at temperature 0. It also reads answers without generating:
  `yes_probability(prompts)` is the next-token probability of "Yes" against "No" after the opened
  assistant turn, P(Yes) = softmax(logit_Yes, logit_No)[0] (the log-probability scorers of EleutherAI's
  delphi for local models; Paulo et al. 2024, arXiv:2410.13928);
- `OpenAIChatLM`: POST `{base_url}/chat/completions` with plain `urllib` (vLLM, llama.cpp's server,
  OpenAI itself), requests of a batch sent concurrently, retried with exponential backoff;
- `CachedChatLM`: answers keyed by sha256(model id, messages, max_tokens, temperature), and P(Yes) keyed by
  sha256(model id, messages, "logprob:Yes/No"), appended to a JSONL file one line per answer under a file
  lock, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from filelock import FileLock
from torch import Tensor

Chat = list[dict[str, str]]


@runtime_checkable
class ChatLM(Protocol):
    """A chat model that answers a batch of chats."""

    model_id: str

    def complete(
        self, prompts: Sequence[Chat], max_tokens: int = 64, temperature: float = 0.0
    ) -> list[str]: ...


def supports_logprob(client: Any) -> bool:
    """Whether `client` (or the client a `CachedChatLM` wraps) reads P(Yes) with `yes_probability`."""
    inner = client.inner if isinstance(client, CachedChatLM) else client
    return callable(getattr(inner, "yes_probability", None))


# ---------------------------------------------------------------------- a local HF model
class HFChatLM:
    """A local HF causal LM answering chats through its tokenizer's chat template.

    Args:
        model: "smollm2" (the embedded SmolLM2-135M-Instruct) or any HF model id / local folder.
        device: where the weights live; None = where the activation host runs when an evaluator sets
            `device` before first use (`AutoInterp` does), else "cpu".
        dtype: the precision of the weights.
        batch_size: chats per `generate` call or forward pass (left-padded, so every row continues from its
            last column).
        seed: the torch seed of sampled answers (temperature > 0); greedy answers need none.
    """

    def __init__(
        self,
        model: str = "smollm2",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        from saelab.hosts.causal_lm import EMBEDDED

        self.model, self.device, self.dtype = str(model), device, dtype
        self.batch_size, self.seed = max(1, int(batch_size)), int(seed)
        self.model_id = f"hf:{EMBEDDED[model][2] if model in EMBEDDED else model}:{dtype}"
        self._host: Any = None

    @property
    def host(self) -> Any:
        """The `CausalLMHost` that loads (lazily, once per process) and shares the weights and tokenizer."""
        if self._host is None:
            from saelab.hosts.causal_lm import CausalLMHost

            # hook 0 is never used: the host is only the shared, cached loader of the weights and tokenizer
            self._host = CausalLMHost(self.model, hook=0, dtype=self.dtype, device=self.device or "cpu")
        return self._host

    def render(self, chat: Chat) -> str:
        """The chat as the model's prompt text (its chat template, or a plain transcript without one)."""
        tok = self.host.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in chat]
        return "\n\n".join([*lines, "Assistant:"])

    def _batches(self, prompts: Sequence[Chat]) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(start, ids, attention mask) per batch of rendered chats, left-padded to the batch's longest."""
        tok, pad = self.host.tokenizer, self.host.pad_id
        texts = [self.render(c) for c in prompts]
        for i in range(0, len(texts), self.batch_size):
            # the template already holds the special tokens (BOS, <|im_start|>): add none
            rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left-padded
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                att[b, width - len(r) :] = 1
            yield i, ids, att

    @torch.no_grad()
    def complete(self, prompts: Sequence[Chat], max_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        tok, pad = self.host.tokenizer, self.host.pad_id
        lm = cast(Any, self.host.model)  # transformers types `generate` through a decorator mypy misreads
        dev = next(lm.parameters()).device
        out: list[str] = []
        for i, ids, att in self._batches(prompts):
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(self.seed + i)
                gen = lm.generate(
                    input_ids=ids.to(dev),
                    attention_mask=att.to(dev),
                    max_new_tokens=int(max_tokens),
                    pad_token_id=pad,
                    **sampling,
                )
            out += tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        return [o.strip() for o in out]

    def answer_ids(self, yes: str = "Yes", no: str = "No") -> tuple[int, int]:
        """The first token of each answer word (as the assistant turn would start with it)."""
        tok = self.host.tokenizer
        y, n = (tok(w, add_special_tokens=False)["input_ids"] for w in (yes, no))
        if not y or not n or y[0] == n[0]:
            raise ValueError(f"{yes!r} and {no!r} must start with two different tokens, got {y} and {n}.")
        return int(y[0]), int(n[0])

    @torch.no_grad()
    def yes_probability(self, prompts: Sequence[Chat], yes: str = "Yes", no: str = "No") -> list[float]:
        """P(`yes`) against P(`no`) as the next token of each chat's opened assistant turn, no generation.

            P(Yes) = exp(l_Yes) / (exp(l_Yes) + exp(l_No)) = σ(l_Yes − l_No),

        l the last position's logits; the rest of the vocabulary is left out (delphi's log-probability
        scoring, Paulo et al. 2024, arXiv:2410.13928). Batches are left-padded, positions count from each
        row's first real token, so a batched answer equals the one-at-a-time answer.
        """
        lm = cast(Any, self.host.model)
        dev = next(lm.parameters()).device
        y, n = self.answer_ids(yes, no)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
        out: list[float] = []
        for _, ids, att in self._batches(prompts):
            pos = (att.cumsum(1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
            logits = lm(
                input_ids=ids.to(dev), attention_mask=att.to(dev), position_ids=pos.to(dev), **keep
            ).logits[:, -1]  # (B, vocab): the next token after the last column, the same for every row
            pair = logits[:, [y, n]].float()  # (B, 2)
            out += pair.softmax(-1)[:, 0].cpu().tolist()
        return out


# ---------------------------------------------------------------------- an OpenAI-compatible server
class ChatServerError(RuntimeError):
    """The chat server refused a request, or could not be reached after every retry."""


class OpenAIChatLM:
    """A model behind an OpenAI-compatible `/v1/chat/completions` endpoint, spoken to with `urllib`.

    Args:
        model: the model name the server knows.
        base_url: the API root ("https://api.openai.com/v1", "http://127.0.0.1:8000/v1"); a URL that already
            ends in /chat/completions is used as is.
        api_key_env: environment variable holding the key, sent as a bearer token when set (a local
            server usually needs none).
        timeout: seconds per request.
        max_retries: further tries after a connection error, a timeout, 429 or a 5xx answer, waiting
            0.5·2^i s before try i + 1.
        concurrency: requests of one batch in flight at once.
    """

    RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
    ) -> None:
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.concurrency = (
            float(timeout),
            int(max_retries),
            max(1, int(concurrency)),
        )
        self.model_id = f"openai:{model}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _one(self, chat: Chat, max_tokens: int, temperature: float) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": list(chat),
                "max_tokens": int(max_tokens),
                "temperature": temperature,
            }
        ).encode()
        why = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.loads(r.read().decode("utf-8"))
                return reply["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                why = f"HTTP {e.code}: {detail}"
                if e.code not in self.RETRY_STATUS:
                    hint = f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else ""
                    raise ChatServerError(f"{self.url} refused the request, {why}{hint}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise ChatServerError(
                    f"{self.url} answered something that is not a chat completion: {e!r}"
                ) from e
        raise ChatServerError(f"{self.url} failed {self.max_retries + 1} times; last: {why}")

    def complete(self, prompts: Sequence[Chat], max_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._one(c, max_tokens, temperature) for c in prompts]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens, temperature), prompts))


# ---------------------------------------------------------------------- the answer cache
def cache_key(
    model_id: str, chat: Chat, max_tokens: int = 0, temperature: float = 0.0, mode: str = "generate"
) -> str:
    """sha256 of the canonical JSON of (model id, messages, sampling settings), or of (model id, messages,
    mode) for an answer read without generating (mode "logprob:Yes/No")."""
    fields: dict[str, Any] = {"model": model_id, "messages": list(chat)}
    if mode == "generate":
        fields |= {"max_tokens": int(max_tokens), "temperature": float(temperature)}
    else:
        fields["mode"] = mode
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CachedChatLM:
    """`inner` with its answers kept in a JSONL file: a prompt answered once is never sent again.

    Each line is {"key", "model", "answer"} (a generated answer) or {"key", "model", "p_yes"} (a
    `yes_probability`); lines are appended (under `<path>.lock`) and fsynced after every chunk of `chunk`
    prompts, so a killed run keeps every finished chunk and a rerun sends only the rest. A line cut short by
    a kill is skipped on reading. `sent` counts the prompts passed to `inner`.
    """

    def __init__(self, inner: ChatLM, path: str | Path, chunk: int = 8) -> None:
        self.inner, self.path, self.chunk = inner, Path(path), max(1, int(chunk))
        self.model_id = inner.model_id
        self.sent = 0
        self.answers = read_cache(self.path)
        self.probs = read_probabilities(self.path)

    def complete(self, prompts: Sequence[Chat], max_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        keys = [cache_key(self.model_id, c, max_tokens, temperature) for c in prompts]
        todo = {k: c for k, c in zip(keys, prompts, strict=True) if k not in self.answers}  # unique, in order
        items = list(todo.items())
        for i in range(0, len(items), self.chunk):
            part = items[i : i + self.chunk]
            got = self.inner.complete([c for _, c in part], max_tokens, temperature)
            self._keep(part, got, self.answers, "answer")
        return [self.answers[k] for k in keys]

    def yes_probability(self, prompts: Sequence[Chat], yes: str = "Yes", no: str = "No") -> list[float]:
        """`inner.yes_probability`, cached like the generated answers (keyed by chat and answer words)."""
        read = getattr(self.inner, "yes_probability", None)
        if not callable(read):
            raise TypeError(f"{self.model_id} ({type(self.inner).__name__}) has no yes_probability.")
        keys = [cache_key(self.model_id, c, mode=f"logprob:{yes}/{no}") for c in prompts]
        todo = {k: c for k, c in zip(keys, prompts, strict=True) if k not in self.probs}
        items = list(todo.items())
        for i in range(0, len(items), self.chunk):
            part = items[i : i + self.chunk]
            got = [float(p) for p in read([c for _, c in part], yes, no)]
            self._keep(part, got, self.probs, "p_yes")
        return [self.probs[k] for k in keys]

    def _keep(
        self, part: list[tuple[str, Chat]], got: Sequence[Any], into: dict[str, Any], field: str
    ) -> None:
        self.sent += len(part)
        if len(got) != len(part):
            raise RuntimeError(f"{self.model_id} answered {len(got)} of {len(part)} prompts.")
        new = dict(zip((k for k, _ in part), got, strict=True))
        self._append(new, field)
        into.update(new)

    def _append(self, new: Mapping[str, Any], field: str = "answer") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps({"key": k, "model": self.model_id, field: a}, ensure_ascii=False) + "\n"
            for k, a in new.items()
        )
        with FileLock(str(self.path) + ".lock"), open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a run killed mid-line left no newline: start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    lines = "\n" + lines
            f.write(lines.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _read_lines(path: str | Path, field: str) -> dict[str, Any]:
    """{key: value of `field`} over the cache lines that hold it; a damaged line is skipped."""
    found: dict[str, Any] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return found
    for line in text.splitlines():
        try:
            row = json.loads(line)
            found[str(row["key"])] = row[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return found


def read_cache(path: str | Path) -> dict[str, str]:
    """{key: answer} of a cache file's generated answers; a missing file is empty, a damaged line skipped."""
    return {k: str(v) for k, v in _read_lines(path, "answer").items()}


def read_probabilities(path: str | Path) -> dict[str, float]:
    """{key: P(Yes)} of a cache file's `yes_probability` lines (a line without a number is skipped)."""
    return {
        k: float(v)
        for k, v in _read_lines(path, "p_yes").items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------------- from config
def make_client(spec: ChatLM | Mapping[str, Any]) -> ChatLM:
    """A client from an evaluator argument: a ChatLM as is, or a `_target_` mapping (its class called with the other keys).

    Hydra instantiates the evaluator's nested `_target_` nodes itself, so from a config the evaluator gets
    built clients; a mapping arrives only from Python (`AutoInterp(explainer={"_target_": ...})`).
    """
    if isinstance(spec, Mapping):  # a config mapping is checked first: it is no client
        if "_target_" not in spec:
            raise ValueError(
                f"a chat client config needs `_target_` (e.g. saelab.interp.clients.HFChatLM or "
                f"saelab.interp.clients.OpenAIChatLM), got keys {sorted(spec)}."
            )
        import importlib

        module, _, name = str(spec["_target_"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        spec = cls(**{k: v for k, v in spec.items() if k != "_target_"})
    if isinstance(spec, ChatLM):
        return spec
    raise TypeError(f"a chat client must be a ChatLM or a `_target_` mapping, got {type(spec).__name__}.")
