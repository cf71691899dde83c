"""tools/routing_report.py --groups: word-initial vs continuation pieces, stopwords vs other words."""

from __future__ import annotations

import random
import re

import pytest
import torch

from tests.test_observability import tiny_checkpoint
from tools.routing_report import (
    CONTINUATION,
    GLUED,
    INITIAL,
    OTHER,
    group_table,
    main,
    piece_kind,
    position_kinds,
    text_tokenizer,
    word_group_masks,
)

# id -> piece; "" is a special piece (control, unknown, byte fallback), as the tool builds them.
PIECES = ["", "▁the", "▁cat", "▁inter", "national", ",", "▁in", "side", "▁The", "12", "▁", "<", "unk", ">", "Ö", "sel"]
# position: 0     1    2    3   4    5        6     7    8    9   10     11      12   13  14   15  16  17  18   19
#           ▁The ▁cat ▁in side  ,  ▁inter national ▁in ▁the ▁cat  12 <special> ▁the  ▁   <  unk  >   ▁   Ö   sel
IDS = [8, 2, 6, 7, 5, 3, 4, 6, 1, 2, 9, 0, 1, 10, 11, 12, 13, 10, 14, 15]
FFN = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5, 1.0, 0.5, 0.5, 1.0, 1.5, 2.0, 0.0, 2.0, 1.0, 1.0, 2.0, 0.0, 1.0, 1.5, 1.0])


def test_piece_kind():
    assert [piece_kind(p) for p in ("▁the", "▁(a", "ing", "▁", ",", "12", "▁1990", "")] == [
        INITIAL,
        INITIAL,
        CONTINUATION,
        OTHER,
        OTHER,
        OTHER,
        OTHER,
        OTHER,
    ]


def test_position_kinds_follow_the_previous_piece():
    kinds = position_kinds(IDS, PIECES)
    assert kinds[13:] == [OTHER, OTHER, GLUED, OTHER, OTHER, INITIAL, CONTINUATION]  # '<unk>'; '▁' 'Ö' 'sel'
    assert position_kinds([7, 4], PIECES) == [INITIAL, CONTINUATION]  # the text's first piece starts a word
    assert [kinds[i] for i in (2, 3, 5, 6)] == [INITIAL, CONTINUATION, INITIAL, CONTINUATION]


def test_groups_depend_on_the_piece_and_its_neighbours():
    masks = {name.strip(): m.nonzero().flatten().tolist() for name, m in word_group_masks(IDS, PIECES).items()}
    assert masks == {
        "word-initial pieces": [0, 1, 2, 5, 7, 8, 9, 12, 18],
        "stopwords": [0, 7, 8, 12],  # "▁The" (case-folded), "▁in" on its own, "▁the" twice
        "other one-piece words": [1, 9],  # "▁cat"
        # "▁in" of "inside" is no stopword; "▁inter" of "international"; "Ö" after a bare "▁" starts "Ösel"
        "first pieces of longer words": [2, 5, 18],
        "continuation pieces": [3, 6, 19],
        "letters after punctuation": [15],  # "unk" of "<unk>" is no word fragment
        "punctuation/digits/special": [4, 10, 11, 13, 14, 16, 17],
    }


def test_group_means_per_position_and_per_distinct_token():
    rows = {r.name.strip(): r for r in group_table(IDS, FFN, PIECES, min_count=1)}
    stop = rows["stopwords"]
    # positions 0.5 ("▁The"), 0.5 ("▁in"), 1.0 and 2.0 ("▁the"); tokens 0.5, 0.5, 1.5
    assert (stop.positions, stop.distinct) == (4, 3)
    assert stop.ffn_per_position == pytest.approx(1.0) and stop.ffn_per_token == pytest.approx(2.5 / 3)
    assert rows["continuation pieces"].ffn_per_position == pytest.approx(0.5)
    assert rows["other one-piece words"].ffn_per_token == pytest.approx(1.75)
    assert rows["letters after punctuation"].ffn_per_position == pytest.approx(2.0)
    assert rows["punctuation/digits/special"].ffn_per_position == pytest.approx(6.5 / 7)
    assert rows["word-initial pieces"].positions == 9
    # min_count applies within the group: only "▁the" is seen twice as a stopword.
    stop2 = next(r for r in group_table(IDS, FFN, PIECES, min_count=2) if r.name.strip() == "stopwords")
    assert (stop2.distinct, stop2.ffn_per_token, stop2.ffn_per_position) == (1, pytest.approx(1.5), 1.0)
    # An empty group is reported, with no mean.
    empty = group_table([5, 9], torch.tensor([1.0, 2.0]), PIECES)
    assert [r.positions for r in empty] == [0, 0, 0, 0, 0, 0, 2]
    assert all(r.ffn_per_position != r.ffn_per_position for r in empty[:6])  # nan


STOP = ["the", "of", "and", "in", "was", "to"]


def corpus_lines(n: int, seed: int) -> list[str]:
    """Frequent stopwords between rarer made-up words: BPE merges the stopwords into single '▁' pieces and splits
    most made-up words into a word-initial piece and continuation pieces."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tor", "vel", "dus", "pa", "shi", "gon"]
    words = ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(300)]
    return [
        " ".join(rng.choice(STOP) + " " + rng.choice(words) for _ in range(rng.randint(3, 8))) + " , 12 <unk> ."
        for _ in range(n)
    ]


def test_groups_on_a_sentencepiece_checkpoint(tmp_path, capsys):
    from tools.train_tokenizer import train_tokenizer

    lines = corpus_lines(400, seed=0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = train_tokenizer([corpus], tmp_path / "tok", vocab_size=400)
    tiny_checkpoint(tmp_path, [f"data.tokenizer={model}", "model.vocab_size=400"])
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--text", str(text), "--plot", "", "--min-count", "2"]
    assert main([*args, "--groups"]) == 0  # the tokenizer: the run's data.tokenizer
    out = capsys.readouterr().out
    # Pieces are shown with their word-boundary mark.
    assert "'▁" in out.split("most FFN experts:")[1]
    n_tokens = int(re.search(r"; (\d+) tokens of ", out).group(1))
    overall = float(re.search(r"mean FFN experts per token: ([\d.]+)", out).group(1))
    rows = {}
    for line in out.split("FFN experts per group")[1].splitlines()[2:]:
        name, rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        positions, _share, per_position, distinct, per_token = rest.split()
        rows[name] = (int(positions), float(per_position), int(distinct), float(per_token))
    top = ["word-initial pieces", "continuation pieces", "letters after punctuation", "punctuation/digits/special"]
    subgroups = ["stopwords", "other one-piece words", "first pieces of longer words"]
    assert sum(rows[g][0] for g in top) == n_tokens
    assert sum(rows[g][0] for g in subgroups) == rows["word-initial pieces"][0]
    assert all(rows[g][0] > 0 and 0 <= rows[g][1] <= 2 for g in top + subgroups)
    # Words after a newline piece (no '▁') are word starts: only the letter pieces of "<unk>" are glued.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    unk_ids = sp.encode("<unk>")  # "▁" <0x3C> "u" "n" "k" <0x3E> with this tokenizer
    n_letter_pieces = sum(not sp.is_byte(i) and any(c.isalpha() for c in sp.id_to_piece(i)) for i in unk_ids)
    assert rows["letters after punctuation"][0] == 40 * n_letter_pieces and text.read_text().count("<unk>") == 40
    # The groups partition the positions, so their position-weighted means give back the overall mean.
    assert sum(rows[g][0] * rows[g][1] for g in top) / n_tokens == pytest.approx(overall, abs=2e-3)
    # The stopword positions are the corpus' stopwords ("▁of", or "of" after a newline), and all of them are seen.
    tok = text_tokenizer({"tokenizer": str(model)}, None)
    ids = tok.encode(text.read_text())
    stop = word_group_masks(ids, tok.pieces)["  stopwords"]
    assert {tok.pieces[i].removeprefix("▁") for i in torch.tensor(ids)[stop].tolist()} == set(STOP)
    assert rows["stopwords"][0] == int(stop.sum()) and rows["stopwords"][2] >= len(STOP)


def test_groups_need_a_sentencepiece_tokenizer(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat.\n" * 4)
    tiny_checkpoint(tmp_path, [f"data.path={text}"])
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--text", str(text), "--plot", "", "--groups"]) == 0
    assert "no groups: they need a sentencepiece tokenizer" in capsys.readouterr().out
