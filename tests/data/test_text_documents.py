"""Document id and position per harvested text row: packing by hand, the columns through cache and memory
alike, and per-document pooled activations and SAE codes in one call, against sums computed by hand."""

from __future__ import annotations

import pytest
import torch

from saelab.data.text import TextActivations, pack
from saelab.sae import SAE, ReLU

BOS, EOS = 0, 1


class _WordTokenizer:
    """Words are their own integer ids; EOS = 1 separates texts."""

    eos_token_id, pad_token_id = EOS, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


class _IdHost:
    """The activation at a position is (token id, −2·token id): sums by hand are sums of ids."""

    tokenizer, bos_id, d_in = _WordTokenizer(), BOS, 2

    @property
    def identity(self) -> dict:
        return {"model": "word-ids", "hook": "ids"}

    def activations(self, input_ids, attention_mask):
        x = input_ids[..., None].float()
        return torch.cat([x, -2 * x], -1)


# lengths with their separators: 5 + 7 + 2 = 14 = two contexts of 7 body tokens exactly
TEXTS = ["10 11 12 13", "20 21 22 23 24 25", "30"]
DOC_TOKENS = [[10, 11, 12, 13, EOS], [20, 21, 22, 23, 24, 25, EOS], [30, EOS]]


def test_pack_records_each_positions_document_and_place():
    ctx = pack(_WordTokenizer(), TEXTS, 8, BOS, EOS, None)
    assert ctx.input_ids.tolist() == [[0, 10, 11, 12, 13, 1, 20, 21], [0, 22, 23, 24, 25, 1, 30, 1]]
    assert ctx.doc_ids.tolist() == [[-1, 0, 0, 0, 0, 0, 1, 1], [-1, 1, 1, 1, 1, 1, 2, 2]]
    assert ctx.doc_pos.tolist() == [[-1, 0, 1, 2, 3, 4, 0, 1], [-1, 2, 3, 4, 5, 6, 0, 1]]
    assert ctx.slice(1, 2).doc_ids.tolist() == [[-1, 1, 1, 1, 1, 1, 2, 2]]


def _source(tmp_path, cache: bool) -> TextActivations:
    return TextActivations(
        _IdHost(), TEXTS, TEXTS, context_len=8, train_tokens=14, val_tokens=14, batch_size=2,
        cache=cache, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip


@pytest.mark.parametrize("cache", [False, True])
def test_per_document_means_of_acts_and_codes(tmp_path, cache):
    src = _source(tmp_path, cache)
    assert src.column("val", "doc_id").tolist() == [0] * 5 + [1] * 7 + [2] * 2
    assert src.column("val", "doc_pos").tolist() == [*range(5), *range(7), *range(2)]
    sae = SAE(2, 6, ReLU(), seed=1).eval()
    got = src.per_document("val", sae)
    assert got.doc_ids.tolist() == [0, 1, 2] and got.counts.tolist() == [5, 7, 2]
    for d, toks in enumerate(DOC_TOKENS):
        x = torch.tensor([[t, -2.0 * t] for t in toks])
        torch.testing.assert_close(got.acts[d], x.mean(0))
        torch.testing.assert_close(got.codes[d], sae.encode(x).mean(0), rtol=1e-5, atol=1e-5)


def test_per_document_codes_are_in_host_units_under_normalisation(tmp_path):
    src = _source(tmp_path, False)
    src.normalize = True
    s = src.act_scale
    assert s != 1.0
    sae = SAE(2, 6, ReLU(), seed=1).eval()
    got = src.per_document("val", sae)
    x = torch.tensor([[t, -2.0 * t] for t in DOC_TOKENS[1]])
    torch.testing.assert_close(got.codes[1], sae.encode(s * x).mean(0) / s, rtol=1e-5, atol=1e-5)


def test_training_batches_keep_their_two_columns(tmp_path):
    src = _source(tmp_path, True)
    batch = next(iter(src.train_dataloader()))
    assert sorted(batch) == ["acts", "token_ids"]
    with pytest.raises(KeyError, match="no column 'label'.*doc_id"):
        src.column("val", "label")
