"""Which tokens of a text use the most and the fewest FFN experts, for a trained MoE(++) checkpoint.

    python tools/routing_report.py --checkpoint DIR --text FILE [--top 15] [--min-count 3] [--plot PNG] [--groups]

DIR is a step directory (`.../checkpoints/step_00000300`), a checkpoints directory or a run directory (its
`latest` checkpoint is used). The text is tokenized the way the run's data was: with the run's `data.tokenizer`
(any kind, data/tokenizer.py) when set, else byte-level (data/text.py) for a .txt/.jsonl run; `--tokenizer`
overrides. A run on the embedded synthetic corpus has no text tokenizer; its evaluation already reports FFN
experts per easy and hard position (`ffn_per_token_easy/hard` in metrics.jsonl).

For every token position the number of FFN experts it was routed to (kept assignments to FFN experts, 0..top_k) is
averaged over the MoE layers, then averaged over the occurrences of each distinct token. The MoE++ paper finds
content words near 1.7 FFN experts and word fragments / function tokens below 1.5 (its Figure on token-level
routing); this report is the same measurement for our checkpoints. Sentencepiece tokens are shown as their pieces,
with the word-boundary mark: '▁was' starts a word, 'ount' continues one.

`--groups` (sentencepiece only) adds the mean per group of positions, to test that finding without picking tokens by
hand: word-initial pieces ('▁' + a letter), split into stopwords (a small built-in English list; whole words only),
other one-piece words and first pieces of multi-piece words; continuation pieces (word fragments: letters, no '▁',
after a piece of the same word); letters glued to punctuation (WikiText's '<unk>' is '▁' '<' 'unk' '>'); and
punctuation, digits and special pieces. A piece's group depends on its neighbours ('▁in' followed by 'side' is
the start of "inside", not the stopword "in"). Each group gets the mean over its positions and the mean over its
distinct tokens seen at least --min-count times there (each token counted once, as the tables do).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python tools/routing_report.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.text import is_text_path
from model.config import ModelConfig, MoEConfig
from model.errors import UserError
from model.moe import MoELayer
from model.routers import RouterOutput
from model.transformer import Decoder


class ReportError(UserError):
    """A one-line problem with the inputs (exit code 2)."""


@dataclass
class TextTokenizer:
    name: str
    encode: Callable[[str], list[int]]
    show: Callable[[int], str]  # a token as the table prints it
    # Sentencepiece only, for --groups: each id's piece ("▁the", "ing"); "▁" for every whitespace piece (a newline or
    # tab piece or byte separates words like a space); "" for control, unknown and the other byte-fallback pieces.
    pieces: list[str] | None = None


def find_checkpoint(path: Path) -> Path:
    """A step directory from a step, checkpoints or run directory."""
    from train.checkpoint_meta import META_FILE, latest_checkpoint

    if (path / META_FILE).is_file():
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            return latest
    raise ReportError(f"{path}: no checkpoint here (no meta.json, no latest); pass a step directory of a run")


def _byte_token(i: int) -> str:
    if i == 256:
        return "<eod>"
    c = chr(i)
    return repr(c)[1:-1] if c.isprintable() or c in "\n\t" else f"<0x{i:02X}>"


def text_tokenizer(data: dict[str, Any], override: str | None) -> TextTokenizer:
    """The tokenizer the run's data was made with (see the module docstring)."""
    model_path = override or data.get("tokenizer")
    if model_path:
        from data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(model_path)
        except UserError as e:
            raise ReportError(f"tokenizer: {e}") from None
        if tok.kind != "sentencepiece":  # tokens as their text; no pieces, so no --groups
            return TextTokenizer(
                tok.describe(), lambda s: tok.encode([s])[0], lambda i: repr(tok.decode([i]) or f"<{i}>")
            )
        import sentencepiece  # importable: load_tokenizer just loaded the model with it

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        ids = range(sp.get_piece_size())
        special = [bool(sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) for i in ids]
        # Whitespace pieces other than "▁" (a newline or tab piece, or their byte-fallback bytes) separate words too.
        space = [tok.decode([i]).isspace() or sp.id_to_piece(i).replace(WORD_START, " ").isspace() for i in ids]
        pieces = [WORD_START if space[i] else "" if special[i] else sp.id_to_piece(i) for i in ids]
        return TextTokenizer(
            f"sentencepiece {model_path}",
            lambda s: tok.encode([s])[0],
            lambda i: repr(tok.decode([i]) if special[i] else sp.id_to_piece(i)),
            pieces,
        )
    paths = [data["path"]] if data.get("path") else [d["path"] for d in data.get("datasets") or []]
    if not paths:
        raise ReportError(
            "the checkpoint was trained on the embedded synthetic corpus, whose tokens are not text; see "
            "ffn_per_token_easy/hard in its metrics.jsonl instead, or pass --tokenizer for a text tokenizer"
        )
    if is_text_path(paths[0]):
        return TextTokenizer("byte-level (data/text.py)", lambda s: list(s.encode("utf-8")), _byte_token)
    raise ReportError(
        f"the run read the indexed dataset {paths[0]} but its config names no data.tokenizer; pass --tokenizer with "
        "the sentencepiece .model the dataset was built with"
    )


def load_model(step_dir: Path, config: dict[str, Any]) -> Decoder:
    """The checkpoint's model (its run config: `config`) in one process on CPU."""
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel
    from train.checkpoint import load_training_state
    from train.config_load import build

    model_cfg = build(ModelConfig, config["model"], "model.")
    moe_cfg = build(MoEConfig, config["moe"], "moe.")
    if not moe_cfg.enabled:
        raise ReportError(f"{step_dir}: the model has no MoE layers (moe.num_experts = 0); nothing to report")
    model = Decoder(model_cfg, moe_cfg)
    load_training_state(step_dir, model, None, init_parallel(ParallelConfig(), "cpu"))
    return model.eval()


@torch.no_grad()
def ffn_experts_per_position(model: Decoder, ids: list[int], seq_len: int, batch_size: int = 8) -> torch.Tensor:
    """[len(ids)]: FFN experts each position was routed to, averaged over the MoE layers. The text is cut into
    windows of the training sequence length (each window starts a fresh context, as in training)."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    n_ffn = layers[0].num_ffn
    routes: list[RouterOutput] = []
    # Forward hooks see each router's choices without the model keeping per-token state (as train/evaluate.py).
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: routes.append(out)) for m in layers]
    try:
        tokens = torch.tensor(ids, dtype=torch.long)
        n_full = len(ids) // seq_len
        chunks = list(tokens[: n_full * seq_len].view(n_full, seq_len).split(batch_size))
        if len(ids) % seq_len:
            chunks.append(tokens[n_full * seq_len :].view(1, -1))
        out = []
        for batch in chunks:
            routes.clear()
            model(batch)
            per_layer = [((r.expert_idx_TK < n_ffn) & r.kept_TK).sum(-1).float() for r in routes]
            out.append(torch.stack(per_layer).mean(0))
        return torch.cat(out)
    finally:
        for h in hooks:
            h.remove()


@dataclass
class TokenRow:
    token: str
    count: int
    ffn_experts: float


def per_token_table(ids: list[int], ffn_T: torch.Tensor, show: Callable[[int], str]) -> list[TokenRow]:
    """Mean FFN experts per distinct token, sorted from the most to the fewest."""
    ids_t = torch.tensor(ids)
    uniq, inverse, counts = torch.unique(ids_t, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq)).index_add_(0, inverse, ffn_T)
    rows = [TokenRow(show(int(u)), int(c), float(s / c)) for u, c, s in zip(uniq, counts, sums, strict=True)]
    return sorted(rows, key=lambda r: (-r.ffn_experts, -r.count))


def format_table(title: str, rows: list[TokenRow]) -> str:
    lines = [title, f"{'token':>16} {'count':>7} {'FFN experts':>12}"]
    lines += [f"{r.token:>16} {r.count:>7} {r.ffn_experts:>12.3f}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --groups: word-initial pieces vs continuation pieces, stopwords vs other words

WORD_START = "\u2581"  # sentencepiece's word-boundary mark ("▁")

# Common English function words (articles, pronouns, prepositions, conjunctions, auxiliaries, a few adverbs).
_STOPWORDS = """a an the this that these those some any each every no not all both either neither
    i me my we us our you your he him his she her it its they them their who whom whose which what
    and or but nor so yet if than then because while although though as
    of in on at by for with from to into onto upon about over under after before during between through
    against among within without across along around behind beyond near off out up down
    is are was were be been being am do does did have has had having
    will would shall should can could may might must
    there here when where why how also only just very too more most such own same other"""
STOPWORDS = frozenset(_STOPWORDS.split())

INITIAL, CONTINUATION, GLUED, OTHER = "initial", "continuation", "glued", "other"


def piece_kind(piece: str) -> str:
    """Out of context. INITIAL: '▁' then a letter somewhere ('▁the', '▁(a'); CONTINUATION: letters without '▁'
    ('ing'); OTHER: no letter (punctuation, digits, a bare '▁') or a special piece (given as "")."""
    body = piece.removeprefix(WORD_START)
    if not any(c.isalpha() for c in body):
        return OTHER
    return INITIAL if piece.startswith(WORD_START) else CONTINUATION


def position_kinds(ids: list[int], pieces: list[str]) -> list[str]:
    """In context: a letters piece without '▁' continues a word only after a piece of that word. At the start of
    the text or after a bare '▁' (a space, newline or tab) it starts a word ('▁' 'Ö' ...: INITIAL); after
    punctuation it is GLUED to it, and so are the letter pieces after it ('unk' of '▁' '<' 'unk' '>', or 'u' 'n'
    'k' where 'unk' is no piece)."""
    kinds: list[str] = []
    prev_piece, prev_kind = WORD_START, OTHER
    for i in ids:
        piece, kind = pieces[i], piece_kind(pieces[i])
        if kind == CONTINUATION and prev_kind not in (INITIAL, CONTINUATION):
            kind = INITIAL if prev_piece == WORD_START else GLUED
        kinds.append(kind)
        prev_piece, prev_kind = piece, kind
    return kinds


def word_group_masks(ids: list[int], pieces: list[str]) -> dict[str, torch.Tensor]:
    """Group name -> [len(ids)] bool mask; the unindented groups partition the positions, indented names split the
    group above them."""
    kinds = position_kinds(ids, pieces)
    next_kinds = [*kinds[1:], OTHER]
    is_kind = lambda kind: torch.tensor([k == kind for k in kinds], dtype=torch.bool)
    initial = is_kind(INITIAL)
    # A word-initial piece followed by a continuation piece is the start of a longer word, not a word of its own.
    whole = initial & torch.tensor([k != CONTINUATION for k in next_kinds], dtype=torch.bool)
    stop = whole & torch.tensor([pieces[i].removeprefix(WORD_START).lower() in STOPWORDS for i in ids])
    return {
        "word-initial pieces": initial,
        "  stopwords": stop,
        "  other one-piece words": whole & ~stop,
        "  first pieces of longer words": initial & ~whole,
        "continuation pieces": is_kind(CONTINUATION),
        "letters after punctuation": is_kind(GLUED),
        "punctuation/digits/special": is_kind(OTHER),
    }


@dataclass
class GroupRow:
    name: str
    positions: int
    distinct: int  # distinct tokens seen at least min_count times in the group
    ffn_per_position: float  # mean over the group's positions (nan: none)
    ffn_per_token: float  # mean over those distinct tokens, each token's mean counted once (nan: none)


def group_table(ids: list[int], ffn_T: torch.Tensor, pieces: list[str], min_count: int = 3) -> list[GroupRow]:
    ids_t = torch.tensor(ids)
    rows = []
    for name, mask in word_group_masks(ids, pieces).items():
        ffn = ffn_T[mask]
        table = per_token_table(ids_t[mask].tolist(), ffn, str) if len(ffn) else []
        per_token = [r.ffn_experts for r in table if r.count >= min_count]
        rows.append(
            GroupRow(
                name,
                int(mask.sum()),
                len(per_token),
                float(ffn.mean()) if len(ffn) else float("nan"),
                sum(per_token) / len(per_token) if per_token else float("nan"),
            )
        )
    return rows


def format_groups(rows: list[GroupRow], min_count: int) -> str:
    lines = [
        f"FFN experts per group (tokens: mean over distinct tokens seen at least {min_count} times in the group):",
        f"{'group':<32} {'positions':>9} {'share':>6} {'per position':>12} {'tokens':>6} {'per token':>9}",
    ]
    total = sum(r.positions for r in rows if not r.name.startswith(" ")) or 1
    lines += [
        f"{r.name:<32} {r.positions:>9} {r.positions / total:>6.1%} {r.ffn_per_position:>12.3f} {r.distinct:>6} "
        f"{r.ffn_per_token:>9.3f}"
        for r in rows
    ]
    return "\n".join(lines)


def plot_report(
    most: list[TokenRow], fewest: list[TokenRow], ffn_T: torch.Tensor, top_k: int, n_layers: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 0.32 * max(len(most), 8) + 1.8), constrained_layout=True)
    for ax, rows, title, color in (
        (axes[0], most, "most FFN experts", "tab:blue"),
        (axes[1], fewest, "fewest FFN experts", "tab:orange"),
    ):
        ax.barh(range(len(rows)), [r.ffn_experts for r in rows], color=color)
        ax.set_yticks(range(len(rows)), [f"{r.token} ({r.count})" for r in rows], fontsize="small")
        ax.invert_yaxis()
        ax.set_xlim(0, top_k)
        ax.set_xlabel("mean FFN experts per token")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[2]
    # A position's value is a multiple of 1/n_layers (a mean of 0..top_k over the layers): one bin per value.
    edges = (torch.arange(n_layers * top_k + 2) - 0.5) / n_layers
    ax.hist(ffn_T.numpy(), bins=edges.numpy(), color="tab:gray", rwidth=0.85)
    ax.axvline(float(ffn_T.mean()), color="black", linestyle="--", label=f"mean {float(ffn_T.mean()):.2f}")
    ax.set_xlabel("FFN experts per position (mean over MoE layers)")
    ax.set_ylabel("positions")
    ax.set_title("all positions")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    checkpoint: Path,
    text_file: Path,
    top: int = 15,
    min_count: int = 3,
    plot: Path | None = None,
    tokenizer: str | None = None,
    max_tokens: int = 200_000,
    groups: bool = False,
) -> str:
    """The report as text (and the plot written to `plot`, when given)."""
    from train.checkpoint_meta import read_meta

    step_dir = find_checkpoint(checkpoint)
    config = read_meta(step_dir)["config"]
    tok = text_tokenizer(config.get("data", {}), tokenizer)
    if not text_file.is_file():
        raise ReportError(f"{text_file}: not found; pass a text file with --text")
    model = load_model(step_dir, config)
    ids = tok.encode(text_file.read_text(encoding="utf-8"))[:max_tokens]
    if not ids:
        raise ReportError(f"{text_file}: no tokens; pass a non-empty text file")
    vocab = model.cfg.vocab_size
    if max(ids) >= vocab:
        raise ReportError(f"tokenizer {tok.name} produces id {max(ids)} >= model.vocab_size {vocab}; wrong tokenizer")
    seq_len = min(config.get("data", {}).get("seq_len", model.cfg.max_seq_len), model.cfg.max_seq_len)
    ffn_T = ffn_experts_per_position(model, ids, seq_len)
    table = per_token_table(ids, ffn_T, tok.show)
    frequent = [r for r in table if r.count >= min_count] or table
    n = min(top, len(frequent) // 2) or len(frequent)
    most, fewest = frequent[:n], frequent[::-1][:n]
    top_k = model.moe_cfg.top_k
    text = "\n\n".join(
        [
            f"checkpoint {step_dir} ({model.moe_cfg.num_experts} FFN + {model.moe_cfg.num_zc_experts} "
            f"zero-computation experts, top-{top_k}); tokenizer {tok.name}; {len(ids)} tokens of {text_file}, "
            f"{len(table)} distinct, windows of {seq_len}",
            f"mean FFN experts per token: {float(ffn_T.mean()):.3f} (of at most {top_k}); tokens seen at least "
            f"{min_count} times: {len([r for r in table if r.count >= min_count])}",
            format_table("most FFN experts:", most),
            format_table("fewest FFN experts:", fewest),
        ]
    )
    if groups:
        if tok.pieces is None:
            text += f"\n\nno groups: they need a sentencepiece tokenizer ('▁' marks word starts), not {tok.name}"
        else:
            text += "\n\n" + format_groups(group_table(ids, ffn_T, tok.pieces, min_count), min_count)
    if plot is not None:
        try:
            n_layers = sum(isinstance(m, MoELayer) for m in model.modules())
            plot_report(most, fewest, ffn_T, top_k, n_layers, plot)
            text += f"\n\nplot: {plot}"
        except ImportError:
            text += "\n\nno plot: matplotlib is not installed (pip install -e '.[plots]')"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/routing_report.py", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="step, checkpoints or run directory")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to route")
    p.add_argument("--top", type=int, default=15, help="rows in each table")
    p.add_argument("--min-count", type=int, default=3, help="only tokens seen at least this often are ranked")
    p.add_argument("--plot", default="routing_report.png", help="PNG to write ('' for none)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer (any kind) instead of the run's data.tokenizer")
    p.add_argument("--max-tokens", type=int, default=200_000, help="route at most this many tokens of the text")
    p.add_argument(
        "--groups",
        action="store_true",
        help="also report the mean per group: word-initial pieces (stopwords, other words, word starts) vs "
        "continuation pieces vs punctuation (sentencepiece only)",
    )
    args = p.parse_args(argv)
    from train.checkpoint_safety import CheckpointError

    try:
        print(
            report(
                args.checkpoint,
                args.text,
                args.top,
                args.min_count,
                Path(args.plot) if args.plot else None,
                args.tokenizer,
                args.max_tokens,
                args.groups,
            )
        )
    except (ReportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
