"""Masked protein language model host: per-residue activations at a layer, and a splice for the SAE.

Any HF masked LM over amino-acid sequences works (ESM-2 `EsmForMaskedLM`, AntiBERTy `BertForMaskedLM`):
a sequence is tokenised one residue per token between the model's start and end tokens
(`<cls> M K T … <eos>` for ESM-2, `[CLS] M K T … [SEP]` for AntiBERTy). Activations are the hook
module's output at residue positions only; start, end and padding positions are excluded, as in
Villegas Garcia & Ansuini (arXiv:2502.09135), who read ESM-2 8M's layer 3 with a +1 offset for CLS.

Online reference: `facebook/esm2_t6_8M_UR50D` (layer 3). Offline default: AntiBERTy from the PyPI
package `antiberty==0.1.3` (an antibody model; its weights load with strict=False into BertForMaskedLM).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from saelab.hosts.base import hub_access, hub_error, replace_output, resolve_hook, run_until

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@dataclass(frozen=True)
class ResidueBatch:
    """Token ids of a batch of sequences, padded on the right; `residues` marks residue positions."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    residues: Bool[Tensor, "batch seq"]

    def to(self, device) -> ResidueBatch:
        return ResidueBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.residues.to(device)
        )


class MaskedLMHost:
    """A frozen masked LM with a hook point.

    Args:
        model: the HF masked LM (`...ForMaskedLM`), put in eval mode and frozen here.
        vocab: token → id of the model's vocabulary (one token per amino acid).
        cls_id, eos_id, pad_id, mask_id, unk_id: ids of the special tokens.
        hook: module path (e.g. "esm.encoder.layer.3") or layer index.
        max_residues: longest sequence the model's positions allow (without start/end tokens).
        name: a label for reports and cache keys.
    """

    def __init__(
        self,
        model: nn.Module,
        vocab: dict[str, int],
        cls_id: int,
        eos_id: int,
        pad_id: int,
        mask_id: int,
        unk_id: int,
        hook: str | int,
        max_residues: int,
        name: str = "masked_lm",
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab = dict(vocab)
        self.cls_id, self.eos_id, self.pad_id, self.mask_id, self.unk_id = (
            cls_id,
            eos_id,
            pad_id,
            mask_id,
            unk_id,
        )
        missing = [a for a in AMINO_ACIDS if a not in self.vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no token for amino acids {missing}; is this a protein model?"
            )
        self.hook, self.module = resolve_hook(self.model, hook)
        self.max_residues = int(max_residues)
        self.name = name
        self.model_id = name  # what exports call the model; `load_masked_lm` sets the id it loaded
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError("the model config has no hidden_size; cannot infer the activation width d_in.")
        self.d_in = int(hidden)
        # ids of the 20 standard residues, in AMINO_ACIDS order (generation samples among these)
        self.aa_ids = torch.tensor([self.vocab[a] for a in AMINO_ACIDS])
        self.id_to_token = {i: t for t, i in self.vocab.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def export_metadata(self) -> dict[str, str | bool]:
        """How SAE exports name this model and hook: TransformerLens has no protein models, so the hook keeps
        its HF module path; every sequence opens with the start token."""
        meta: dict[str, str | bool] = {
            "model_name": self.model_id,
            "hook_name": self.hook,
            "hf_hook_name": self.hook,
            "prepend_bos": True,
        }
        if self.model_id == "antiberty":
            meta["model_weights"] = "AntiBERTy_md_smooth from PyPI antiberty==0.1.3, as a BertForMaskedLM"
        return meta

    # ------------------------------------------------------------------ tokenisation
    def encode(self, sequences: Sequence[str]) -> ResidueBatch:
        """Token ids `start residues end`, right-padded; non-standard residues map to the unknown token."""
        too_long = [len(s) for s in sequences if len(s) > self.max_residues]
        if too_long:
            raise ValueError(
                f"sequence of {max(too_long)} residues exceeds the host's {self.max_residues}; "
                "crop it first (saelab.corpora.swissprot.crop)."
            )
        width = max(len(s) for s in sequences) + 2
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(sequences), width), dtype=torch.long)
        res = torch.zeros((len(sequences), width), dtype=torch.bool)
        for i, s in enumerate(sequences):
            toks = [self.vocab.get(c, self.unk_id) for c in s.upper()]
            ids[i, : len(s) + 2] = torch.tensor([self.cls_id, *toks, self.eos_id])
            att[i, : len(s) + 2] = 1
            res[i, 1 : len(s) + 1] = True
        return ResidueBatch(ids, att, res)

    def decode(self, ids: Int[Tensor, " seq"]) -> str:
        """Residue string of one row of token ids (special tokens dropped, masks shown as 'X')."""
        out = []
        for i in ids.tolist():
            if i in (self.cls_id, self.eos_id, self.pad_id):
                continue
            out.append("X" if i == self.mask_id else self.id_to_token.get(i, "X"))
        return "".join(out)

    # ------------------------------------------------------------------ forward passes
    def activations(self, input_ids: Tensor, attention_mask: Tensor) -> Float[Tensor, "batch seq d_in"]:
        """Hook output for every position (the forward stops after the hook module)."""
        return run_until(self.model, self.module, input_ids=input_ids, attention_mask=attention_mask)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Float[Tensor, "batch seq vocab"]:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def residue_activations(
        self, sequences: Sequence[str], batch_size: int = 8, progress: bool = True
    ) -> tuple[Float[Tensor, "n d_in"], Int[Tensor, " n"]]:
        """Activations at every residue of every sequence, concatenated in order, with their token ids."""
        from tqdm.auto import tqdm

        # sort by length so batches carry little padding; results are put back in input order
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        chunks: dict[int, tuple[Tensor, Tensor]] = {}
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc=f"harvest {self.name} {self.hook}", disable=not progress, leave=False):
            idx = order[s : s + batch_size]
            b = self.encode([sequences[i] for i in idx]).to(self.device)
            h = self.activations(b.input_ids, b.attention_mask)  # [batch, seq, d_in]
            for row, i in enumerate(idx):
                m = b.residues[row]
                chunks[i] = (h[row][m].float().cpu(), b.input_ids[row][m].cpu())
        acts = torch.cat([chunks[i][0] for i in range(len(sequences))])
        ids = torch.cat([chunks[i][1] for i in range(len(sequences))])
        return acts, ids

    @contextlib.contextmanager
    def spliced(self, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Under this context the hook output h is replaced by fn(h) in every forward of the model."""
        with replace_output(self.module, fn):
            yield


# ---------------------------------------------------------------------- constructors (Hydra targets)
def _from_tokenizer(model: nn.Module, tok, hook: str | int, name: str) -> MaskedLMHost:
    max_pos = getattr(model.config, "max_position_embeddings", 1026)
    # ESM-2 uses rotary positions (max_position_embeddings 1026); BERT's learned positions cap at 512
    return MaskedLMHost(
        model,
        tok.get_vocab(),
        cls_id=tok.cls_token_id,
        eos_id=tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id,
        pad_id=tok.pad_token_id,
        mask_id=tok.mask_token_id,
        unk_id=tok.unk_token_id,
        hook=hook,
        max_residues=int(max_pos) - 2,
        name=name,
    )


def load_masked_lm(
    source: str,
    hook: str | int,
    d_in: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> MaskedLMHost:
    """Build a host from `source`: "antiberty" (embedded offline package), a local HF dir or an HF model id.

    `d_in`, when given, is checked against the model's hidden size (the SAE is built from the config's
    `data.d_in`, so a mismatch would fail later with a less clear shape error).
    """
    if source == "antiberty":
        host = load_antiberty(hook)
    else:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        hub, why = hub_access(source)  # no network: fail in seconds, from the local HF cache only
        try:
            tok = AutoTokenizer.from_pretrained(source, **hub)
            model = AutoModelForMaskedLM.from_pretrained(source, **hub)
        except OSError as e:
            raise OSError(hub_error(source, "data.host.source", why, e, "data/host=antiberty")) from e
        host = _from_tokenizer(model, tok, hook, name=os.path.basename(source.rstrip("/")) or source)
        host.model_id = source
    host.model.to(device=device, dtype=getattr(torch, dtype))
    if d_in is not None and int(d_in) != host.d_in:
        raise ValueError(
            f"data.d_in={d_in} but {host.name} has hidden size {host.d_in}; set data.d_in={host.d_in}."
        )
    return host


def load_antiberty(hook: str | int) -> MaskedLMHost:
    """AntiBERTy (Ruffolo et al. 2021) from the pinned `antiberty==0.1.3` package, as a BertForMaskedLM.

    The checkpoint also holds species/chain heads that BertForMaskedLM does not have; they are the
    only unexpected keys, and nothing of the encoder or the MLM head may be missing.
    """
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from saelab.assets import package_file

    root = package_file("antiberty", "trained_models/AntiBERTy_md_smooth")
    weights = package_file("antiberty", "trained_models/AntiBERTy_md_smooth/pytorch_model.bin")
    vocab = package_file("antiberty", "trained_models/vocab.txt")
    model = BertForMaskedLM(BertConfig.from_pretrained(str(root)))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"AntiBERTy weights lack {result.missing_keys[:5]}; reinstall antiberty==0.1.3.")
    tok = BertTokenizer(str(vocab), do_lower_case=False)
    return _from_tokenizer(model, tok, hook, name="antiberty")
