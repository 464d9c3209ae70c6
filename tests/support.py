"""Builders shared by the tests: the CLI runner, tiny random hosts and tiny raw inputs.

They make real model classes with real tokenizers (randomly initialised, a few hundred parameters
wide), so host, data and recipe code paths run offline in seconds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from saelab.hosts.causal_lm import embedded_model_dir


def synthetic_small(batch_size: int = 64, d_sae: int = 64) -> list[str]:
    """Overrides for a small synthetic SAE run (d_in 32, 128 planted features, k 4): fits in seconds."""
    return [
        "data.d_in=32",
        "data.n_features=128",
        f"data.batch_size={batch_size}",
        f"sae.d_sae={d_sae}",
        "sae.activation.k=4",
        "data.mean_active=4",
    ]


# five unrelated English sentences (physics and everyday topics) for tiny text corpora
SENTENCES = [
    "The electron is a subatomic particle with a negative electric charge.",
    "Stars fuse hydrogen into helium in their cores, releasing energy as light.",
    "The committee met on Tuesday to discuss the new budget for the city parks.",
    "A photon carries momentum even though it has no rest mass.",
    "She planted tomatoes and basil in the garden behind the old farmhouse.",
]

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, run_dir: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "saelab", *args, f"+run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# the ESM-2 vocabulary (facebook/esm2_t6_8M_UR50D vocab.txt), in id order
ESM_VOCAB = (
    "<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>".split()
)


def make_tiny_esm(path: Path, hidden: int = 16, layers: int = 3, seed: int = 0) -> Path:
    """Save a randomly initialised EsmForMaskedLM with the real ESM tokenizer to `path`."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    tok = EsmTokenizer(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = EsmConfig(
        vocab_size=len(ESM_VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=130,
        pad_token_id=1,
        mask_token_id=32,
        position_embedding_type="rotary",
        token_dropout=True,
    )
    EsmForMaskedLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


# three entries × 8 = 24 sequences with transmembrane and zinc-finger regions (current feature-table format)
ENTRY = """\
ID   T{i}_TEST                Reviewed;          {n} AA.
AC   P{i:05d};
DE   RecName: Full=Test {i};
OS   Homo sapiens (Human).
OC   Eukaryota.
OX   NCBI_TaxID=9606;
FT   TRANSMEM        {a}..{b}
FT                   /note="Helical"
FT   ZN_FING         {c}..{d}
FT                   /note="C2H2-type"
SQ   SEQUENCE   {n} AA;  5000 MW;  0000000000000000 CRC64;
     {seq}
//
"""


def swissprot_flatfile(path: Path) -> Path:
    """24 Swiss-Prot entries (current feature-table format), each with a TM helix and a C2H2 zinc finger."""
    rnd = random.Random(0)
    text = []
    for i in range(24):
        tm = "".join(rnd.choice("LIVAFG") for _ in range(19))
        zf = "CPEC" + "".join(rnd.choice("GKSFSQRN") for _ in range(12)) + "HQRTH"
        seq = (
            "".join(rnd.choice("DEKRSTNQ") for _ in range(5))
            + tm
            + "KRDE"
            + zf
            + "".join(rnd.choice("DEKRSTNQAG") for _ in range(6))
        )
        a, c = 6, 6 + 19 + 4  # 1-based starts of the TM helix and the zinc finger
        text.append(ENTRY.format(i=i, n=len(seq), a=a, b=a + 18, c=c, d=c + len(zf) - 1, seq=seq))
    path.write_text("".join(text))
    return path


def write_movielens(folder: Path, n_users: int = 40, n_items: int = 30, seed: int = 0) -> None:
    """Users who each mostly watch one of three genres (so latents have concepts to find)."""
    rng = random.Random(seed)
    genres = ["Horror", "Comedy", "Western"]
    by_genre = {g: [i for i in range(1, n_items + 1) if genres[i % 3] == g] for g in genres}
    with open(folder / "tiny.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(1, n_users + 1):
            fav = by_genre[genres[u % 3]]
            for t in range(rng.randint(8, 16)):
                item = rng.choice(fav) if rng.random() < 0.8 else rng.randint(1, n_items)
                f.write(f"{u}\t{item}\t4\t{1000 * u + t}\n")
    with open(folder / "tiny.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, n_items + 1):
            f.write(f"{i}\tFilm {i}\t{1960 + i}\t{genres[i % 3]}\n")


def save_tiny_causal_lm(
    path: str | Path, arch: str = "llama", n_layers: int = 3, hidden: int = 32, seed: int = 0
) -> Path:
    """Save a tiny randomly initialised causal LM of a real HF class (with the SmolLM2 tokenizer) to `path`.

    For offline plumbing tests of the `from_pretrained` path: `arch` is "llama" (LlamaForCausalLM),
    "gpt_neox" (GPTNeoXForCausalLM, Pythia), "gpt2" (GPT2LMHeadModel) or "gemma2" (Gemma2ForCausalLM).
    """
    import transformers as tf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2"))
    v, heads = len(tok), 4
    common = {"vocab_size": v, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(seed)  # the weights below are drawn from the global RNG
    model: tf.PreTrainedModel
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common,
        ))  # fmt: skip
    elif arch == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            max_position_embeddings=512, **common,
        ))  # fmt: skip
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=heads, n_positions=512, **common)
        )
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=2, head_dim=hidden // heads, max_position_embeddings=512, **common,
        ))  # fmt: skip
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: llama, gpt_neox, gpt2 or gemma2.")
    model.eval()
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
