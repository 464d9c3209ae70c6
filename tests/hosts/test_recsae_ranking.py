"""MovieLens loading / leave-one-out splits and full-ranking HR@K, NDCG@K against brute force."""

from __future__ import annotations

import math
import random

import pytest
import torch

from saelab.corpora.movielens import exclusion_mask, load_interactions, next_item_chunks, pad_left
from saelab.hosts.ranking import full_ranking, hr_ndcg, target_ranks
from saelab.hosts.sasrec import SASRec


def write_tiny_dataset(folder, n_users: int = 12, n_items: int = 20, seed: int = 0, name: str = "tiny"):
    """A RecBole-format dataset whose timestamps are shuffled in the file (so sorting matters)."""
    rng = random.Random(seed)
    genres = ["Action", "Comedy", "Horror", "Drama"]
    rows = []
    truth = {}
    for u in range(1, n_users + 1):
        n = rng.randint(5, 12)
        items = [rng.randint(1, n_items) for _ in range(n)]
        times = sorted(rng.sample(range(10_000), n))
        truth[str(u)] = items
        rows += [(str(u), str(i), str(rng.randint(1, 5)), str(t)) for i, t in zip(items, times, strict=True)]
    rng.shuffle(rows)
    with open(folder / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines("\t".join(r) + "\n" for r in rows)
    with open(folder / f"{name}.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, n_items + 1):
            f.write(f"{i}\tMovie {i} Night\t{1950 + 3 * i}\t{genres[i % 4]} {genres[(i + 1) % 4]}\n")
    return truth


def brute_force(scores, targets, exclude, k):
    """HR@k and NDCG@k by sorting each row's candidate list in Python."""
    hr = ndcg = 0.0
    for s, t, ex in zip(scores.tolist(), targets.tolist(), exclude.tolist(), strict=True):
        cands = [(v, i) for i, v in enumerate(s) if not ex[i] or i == t]
        ranked = sorted(cands, key=lambda p: (-p[0], p[1] != t))  # ties in the target's favour
        r = [i for _, i in ranked].index(t)
        if r < k:
            hr += 1
            ndcg += 1 / math.log2(r + 2)
    return hr / len(targets), ndcg / len(targets)


def test_ranking_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 15, generator=g).round(decimals=1)  # rounding makes ties
    targets = torch.randint(1, 15, (30,), generator=g)
    exclude = torch.rand(30, 15, generator=g) < 0.3
    exclude[:, 0] = True
    for k in (1, 3, 5):
        got = hr_ndcg(target_ranks(scores, targets, exclude), (k,))
        hr, ndcg = brute_force(scores, targets, exclude, k)
        assert got[f"hr@{k}"] == pytest.approx(hr)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_loading_sorts_by_time_and_splits_leave_one_out(tmp_path):
    truth = write_tiny_dataset(tmp_path)
    c = load_interactions(str(tmp_path), "tiny", min_seq_len=3)
    assert c.n_users == 12
    for u, raw_user in enumerate(c.user_ids):
        raw = [c.item_ids[i] for i in c.sequences[u]]
        assert raw == [str(i) for i in truth[raw_user]]
    hist, tgt = c.eval_examples("test")
    assert all(h == s[:-1] for h, s in zip(hist, c.sequences, strict=True))
    assert tgt.tolist() == [s[-1] for s in c.sequences]
    vh, vt = c.eval_examples("valid")
    assert vt.tolist() == [s[-2] for s in c.sequences] and vh[0] == c.train_sequence(0)
    # attributes: genres and decades from the .item file, "night" is a title word of every item
    a = c.attr_index("genre:Horror")
    horror = [i for i in range(1, c.n_items + 1) if "Horror" in c.genres[i]]
    assert c.item_attrs[:, a].nonzero().flatten().tolist() == horror
    assert c.item_attrs[1:, c.attr_index("title:night")].all()
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_interactions(str(tmp_path), "missing")


def test_chunks_padding_and_exclusion():
    x, y = next_item_chunks([[1, 2, 3, 4, 5, 6]], max_len=3)
    # from the end: [3,4,5,6] → in [3,4,5] out [4,5,6]; then [1,2,3] → in [1,2] out [2,3]
    assert x.tolist() == [[3, 4, 5], [0, 1, 2]] and y.tolist() == [[4, 5, 6], [0, 2, 3]]
    assert pad_left([[1, 2, 3, 4], []], 3).tolist() == [[2, 3, 4], [0, 0, 0]]
    m = exclusion_mask([[2, 3], [1]], torch.tensor([3, 4]), 4)
    assert m.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]


def test_sasrec_full_ranking_matches_brute_force(tmp_path):
    write_tiny_dataset(tmp_path)
    c = load_interactions(str(tmp_path), "tiny", min_seq_len=3)
    torch.manual_seed(0)
    model = SASRec(c.n_items, d_model=16, n_layers=1, max_len=6, dropout=0.0, ks=(3,)).eval()
    hist, tgt = c.eval_examples("test")
    win, ex = pad_left(hist, 6), exclusion_mask(hist, tgt, c.n_items)
    metrics, ranks = full_ranking(model, win, tgt, ex, ks=(3, 5), batch_size=5)
    with torch.no_grad():
        scores = torch.stack([model.score(model.user_repr(win[r : r + 1]))[0] for r in range(len(tgt))])
    for k in (3, 5):
        hr, ndcg = brute_force(scores, tgt, ex, k)
        assert metrics[f"hr@{k}"] == pytest.approx(hr) and metrics[f"ndcg@{k}"] == pytest.approx(ndcg)
    # padding never changes the representation of a history (causal attention + key mask)
    with torch.no_grad():
        short = model.user_repr(torch.tensor([hist[0][-4:]]))
        padded = model.user_repr(pad_left([hist[0][-4:]], 6))
    assert torch.allclose(short, padded, atol=1e-5)
    # spliced(fn) scores with fn(u): the identity changes nothing, a constant gives equal ranks for all
    with torch.no_grad(), model.spliced(lambda u: u):
        assert torch.allclose(model(win)[:, 1:], scores[:, 1:], atol=1e-5)
    with torch.no_grad(), model.spliced(lambda u: torch.zeros_like(u)):
        assert torch.isfinite(model(win)[:, 1:]).all() and (model(win)[:, 1:] == 0).all()
