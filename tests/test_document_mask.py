"""Document-aware training on packed windows: block-causal attention, per-document positions, EOD loss masking.

Tolerance: fp32, atol 1e-5 / rtol 1e-5 for "equal" logits (the packed and the separate runs sum the same numbers in
other orders); "differ" means a maximum absolute difference above 1e-3.
"""

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import model.document_mask as document_mask_module
from data.packing import IGNORE_INDEX, DocumentPacking, document_ids, document_positions
from model.config import ModelConfig, MoEConfig
from model.document_mask import document_attention, document_mask
from model.transformer import Decoder
from parallel.loss import ce_scale, lm_loss
from train.step import local_forward_backward

EOD = 3
ATOL = RTOL = 1e-5
KERNELS = ("segments", "dense", "flex")


def tiny_decoder(dense: bool = False) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=64
    )
    moe = MoEConfig(num_experts=0) if dense else MoEConfig(num_experts=4, expert_ffn_hidden_size=16)
    return Decoder(cfg, moe).eval()


def document(length: int, seed: int) -> torch.Tensor:
    """Random tokens other than EOD."""
    t = torch.randint(4, 48, (length,), generator=torch.Generator().manual_seed(seed))
    return t


def test_document_ids_positions_and_targets_follow_megatron():
    window = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9, 10]])
    inputs = window[:, :-1]
    assert document_ids(inputs, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # EOD closes its own document
    assert document_positions(inputs, EOD).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    targets = DocumentPacking(EOD, mask_loss=True).targets(window)
    # The prediction made AT an EOD input (its target is the next document's first token) is dropped.
    i = IGNORE_INDEX
    assert targets.tolist() == [[6, EOD, i, EOD, i, i, 9, 10]]
    assert torch.equal(DocumentPacking(EOD).targets(window), window[:, 1:])
    assert DocumentPacking(EOD).model_inputs(inputs) == {}


@pytest.mark.parametrize("kernel", KERNELS)
def test_second_document_of_a_packed_window_equals_the_document_alone(kernel, monkeypatch):
    # A small group size makes the segment kernel use both of its paths (a lone document, several per call).
    monkeypatch.setattr(document_mask_module, "GROUP_TOKENS", 8)
    model = tiny_decoder()
    model.document_kernel = kernel
    first, second, third = document(9, 1), document(14, 2), document(3, 3)
    eod = torch.tensor([EOD])
    # Row 0: first | second | third; row 1: second | first (so the rows' boundaries differ).
    rows = [torch.cat([first, eod, second, eod, third]), torch.cat([second, eod, first, eod, document(3, 4)])]
    window = torch.stack(rows)  # [2, 28]
    packing = DocumentPacking(EOD, mask_attention=True, reset_positions=True)
    with torch.no_grad():
        packed = model(window, **packing.model_inputs(window)).logits_BSV
        alone = {name: model(doc[None]).logits_BSV[0] for name, doc in (("1", first), ("2", second), ("3", third))}
        plain = model(window).logits_BSV
    torch.testing.assert_close(packed[0, 10:24], alone["2"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(packed[0, 25:28], alone["3"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(packed[1, 15:24], alone["1"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(packed[0, :9], alone["1"], atol=ATOL, rtol=RTOL)  # the first document: causal anyway
    # Without the document mask the second document attends into the first.
    assert (plain[0, 10:24] - alone["2"]).abs().max() > 1e-3
    assert (plain[1, 15:24] - alone["1"]).abs().max() > 1e-3


def test_reset_positions_change_the_logits_when_attention_crosses_documents():
    # With the document mask RoPE's relative rotations make a position offset invisible (only rounding differs);
    # without it, restarting positions changes what a token sees of the previous document.
    model = tiny_decoder()
    with torch.no_grad():  # sharper attention than at initialisation, so positions matter visibly
        for block in model.layers.values():
            block.attention.wq.weight.mul_(10)
            block.attention.wk.weight.mul_(10)
    window = torch.cat([document(9, 1), torch.tensor([EOD]), document(14, 2)])[None]
    with torch.no_grad():
        plain = model(window).logits_BSV
        reset = model(window, **DocumentPacking(EOD, reset_positions=True).model_inputs(window)).logits_BSV
    torch.testing.assert_close(reset[:, :10], plain[:, :10], atol=ATOL, rtol=RTOL)  # first document: positions 0..9
    assert (reset[:, 10:] - plain[:, 10:]).abs().max() > 1e-3


def test_kernels_give_the_same_attention_and_gradients(monkeypatch):
    monkeypatch.setattr(document_mask_module, "GROUP_TOKENS", 16)
    g = torch.Generator().manual_seed(0)
    B, H, G, S, Dh = 3, 4, 2, 40, 8
    inputs = torch.randint(0, 6, (B, S), generator=g)  # many EODs (id 3), runs of them included
    inputs[2] = 7  # a row that is one document
    doc_ids = document_ids(inputs, EOD)
    q, k, v = (torch.randn(B, h, S, Dh, generator=g) for h in (H, G, G))
    outputs, grads = {}, {}
    for kernel in KERNELS:
        leaves = [t.clone().requires_grad_(kernel != "flex") for t in (q, k, v)]  # flex: no backward on CPU
        out = document_attention(*leaves, document_mask(doc_ids, kernel))
        outputs[kernel] = out.detach()
        if kernel != "flex":
            out.square().sum().backward()
            grads[kernel] = [t.grad for t in leaves]
    for kernel in ("segments", "flex"):
        torch.testing.assert_close(outputs[kernel], outputs["dense"], atol=ATOL, rtol=RTOL)
    for got, want in zip(grads["segments"], grads["dense"], strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # The reference really is block-causal: a position's output ignores every other document's values.
    v2 = v.clone()
    v2[0, :, doc_ids[0] != doc_ids[0, -1]] += 1.0
    changed = document_attention(q, k, v2, document_mask(doc_ids, "dense"))
    last = doc_ids[0] == doc_ids[0, -1]
    torch.testing.assert_close(changed[0][:, last], outputs["dense"][0][:, last])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's compiled kernel and backward need CUDA")
def test_flex_kernel_on_cuda_matches_the_dense_mask_with_gradients():
    g = torch.Generator().manual_seed(0)
    B, H, G, S, Dh = 2, 4, 2, 300, 16  # S not a multiple of flex's 128-token blocks
    inputs = torch.randint(0, 40, (B, S), generator=g).cuda()  # about every 40th token an EOD
    doc_ids = document_ids(inputs, EOD)
    q, k, v = (torch.randn(B, h, S, Dh, generator=g).cuda() for h in (H, G, G))
    results = {}
    for kernel in ("flex", "dense"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = document_attention(*leaves, document_mask(doc_ids, kernel))
        out.square().sum().backward()
        results[kernel] = [out.detach()] + [t.grad for t in leaves]
    for got, want in zip(results["flex"], results["dense"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def packed_windows() -> torch.Tensor:
    """Four windows of 21 tokens with 0..3 EODs each (so micro-batches hold different numbers of masked
    positions)."""
    rows = []
    for r in range(4):
        row = document(21, 10 + r)
        row[torch.randperm(20, generator=torch.Generator().manual_seed(r))[:r]] = EOD
        rows.append(row)
    return torch.stack(rows)


def test_eod_loss_masking_drops_exactly_the_eod_positions():
    model = tiny_decoder()
    window = packed_windows()
    masked = DocumentPacking(EOD, mask_loss=True).targets(window)
    with torch.no_grad():
        out = model(window[:, :-1])
    logits = out.logits_BSV.flatten(0, 1)
    per_position = F.cross_entropy(logits, window[:, 1:].reshape(-1), reduction="none")
    per_position_masked = F.cross_entropy(logits, masked.reshape(-1), reduction="none")
    dropped = (window[:, :-1] == EOD).reshape(-1)
    assert dropped.sum() == 6
    assert torch.equal(masked.reshape(-1) == IGNORE_INDEX, dropped)
    assert torch.equal(per_position_masked[~dropped], per_position[~dropped])  # the others are untouched
    assert (per_position_masked[dropped] == 0).all() and (per_position[dropped] > 0).all()
    torch.testing.assert_close(lm_loss(out, masked), per_position[~dropped].mean())
    assert (lm_loss(out, masked) - lm_loss(out, window[:, 1:])).abs() > 1e-4


@pytest.mark.parametrize("mask_loss", [True, False])
def test_gradient_accumulation_equals_one_batch_with_the_global_token_mean(mask_loss):
    """Four micro-batches of one window with 0, 1, 2 and 3 masked positions: the step's loss and gradients are
    those of one batch of all windows, the mean over every unmasked position."""
    packing = DocumentPacking(EOD, mask_attention=True, reset_positions=True, mask_loss=mask_loss)
    window = packed_windows()
    no_amp = contextlib.nullcontext()
    whole, split = tiny_decoder(dense=True).train(), tiny_decoder(dense=True).train()
    ce_whole, _, _ = local_forward_backward(whole, [window], no_amp, packing)
    micro = list(window.split(1))
    ce_split, _, _ = local_forward_backward(split, micro, no_amp, packing, ce_scale(micro, packing))
    torch.testing.assert_close(ce_split, ce_whole, atol=ATOL, rtol=RTOL)
    for (name, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The mean of per-micro-batch means would weigh the positions of windows with many EODs more.
    with torch.no_grad():
        means = [lm_loss(whole(w[:, :-1], **packing.model_inputs(w[:, :-1])), packing.targets(w)) for w in micro]
    if mask_loss:
        assert (torch.stack(means).mean() - ce_whole).abs() > 1e-4


def test_training_run_with_every_document_option(tmp_path, capsys):
    from pathlib import Path

    from train.config_load import load_config
    from train.trainer import run

    corpus = tmp_path / "docs.txt"
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    docs = [
        " ".join(words[i] for i in torch.randint(0, 5, (int(n),), generator=g)) for n in torch.randint(2, 30, (300,))
    ]
    corpus.write_text("\n\n".join(docs) + "\n")
    overrides = [
        f"data.path={corpus}",
        "data.seq_len=64",
        "model.max_seq_len=64",
        "model.num_layers=2",
        "data.document_mask=true",
        "data.reset_position_ids=true",
        "data.eod_mask_loss=true",
        "train.max_steps=3",
        "train.eval_interval=3",
        "train.eval_batches=1",
        "logging.interval=1",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    record = run(load_config(Path(__file__).resolve().parents[1] / "configs/tiny-cpu.yaml", overrides))
    assert record["step"] == 3 and record["loss"] > 0 and record["val_loss"] > 0
    out = capsys.readouterr().out
    assert "EOD 256: attention within documents, positions reset per document, no loss on EOD -> next document" in out


@pytest.mark.slow
def test_benchmark_runs_every_case_and_variant(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "document_mask.json"
    proc = subprocess.run(
        [sys.executable, "bench/document_mask.py", "--seq-len", "512", "--pairs", "1", "--warmup", "0", "--out", out],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in proc.stdout.splitlines() if line.startswith(("| web", "| one"))]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        (case, variant) for case in ("web-like", "one-document") for variant in ("off", "on", "on, dense mask")
    ]
    assert float(rows[0][1]) > 1.0 and float(rows[3][1]) == 1.0  # documents per window
    record = json.loads(out.read_text())
    assert record["benchmark"] == "document_mask_cpu" and record["seq_len"] == 512
    assert [r["case"] for r in record["results"]] == ["web-like", "one-document"]
