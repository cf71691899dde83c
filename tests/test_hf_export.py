"""Export to Hugging Face: layout choice, logits of the loaded export against our model, generate() with a KV cache,
shards, dtype, tokenizer, command line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_hf_common import ATOL, RTOL, greedy, load_hf, routed_experts, save_run, tiny, tokens
from tools.hf.checkpoint_io import ConversionError
from tools.hf.export import export
from tools.hf.layouts import OWN, RELEASE

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # the 7B's router options: release gates, logits std-norm
    "release": (tiny(logits_std_norm=True), RELEASE),
    # the other two release options
    "release-2layer-scaled": (tiny(two_layer=True, scale_input_by_topk=True), RELEASE),
    # paper gates and dense layers between MoE layers: inexpressible by the release
    "paper-every2": (tiny(convention="paper", every_n_layers=2), OWN),
    # other expert counts, top-3, no gating residual
    "counts-top3-noresidual": (tiny(zc=(2, 1, 3), residual=False, top_k=3), OWN),
}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_with_transformers_and_gives_our_logits(tmp_path, case):
    (model_cfg, moe_cfg), layout = CASES[case]
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    x = tokens()
    # The check only means something if tokens reach FFN and zero-computation experts alike.
    assert routed_experts(ours, x) >= {0, moe_cfg.num_experts, moe_cfg.num_total_experts - 1}

    result = export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    assert result.layout == layout
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == ("MoeForCausalLM" if layout == RELEASE else "MoEPPForCausalLM")
    assert hf.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits_BSV, atol=ATOL, rtol=RTOL)


def test_release_layout_config_and_keys(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["model_type"] == "MoE++" and cfg["architectures"] == ["MoeForCausalLM"]
    assert cfg["num_experts"] == [8] and cfg["num_experts_per_tok"] == 2 and cfg["intermediate_size"] == 24
    flags = {k: cfg[k] for k in cfg if k.startswith("moe_")}
    assert flags == {
        "moe_expert_interval": 1,
        "moe_use_mixtral_gating": False,
        "moe_2layer_gate": False,
        "moe_use_logits_norm": True,
        "moe_gate_norm_std": 1.0,
        "moe_feature_no_mul_topk": True,
    }
    assert "top_k" not in cfg
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_moepp.MoeForCausalLM"
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    p = "model.layers.1.mlp.moe."
    # Spec §7: FFN experts 0..3, constant experts 4 and 5 (v and W_c), copy 6 and zero 7 have no tensors.
    assert {f"{p}gate.wg.weight", f"{p}gate.gate_map.weight", f"{p}experts.experts.0.up_proj.weight"} <= keys
    assert {f"{p}experts.experts.4.constant", f"{p}experts.experts.5.wg.weight"} <= keys
    assert not any(".experts.6." in k or ".experts.7." in k for k in keys)
    # The first MoE layer has no residual in our model; the release layout still has its (zero) gate_map.
    from safetensors import safe_open

    shard = tmp_path / "hf" / index["weight_map"]["model.layers.0.mlp.moe.gate.gate_map.weight"]
    with safe_open(str(shard), framework="pt") as f:
        first_map = f.get_tensor("model.layers.0.mlp.moe.gate.gate_map.weight")
        up = f.get_tensor(f"{p}experts.experts.0.up_proj.weight")
    assert first_map.shape == (8, 8) and not first_map.any()
    assert up.shape == (48, 32)  # [2F, D], gate half first


def test_inexpressible_model_says_why_and_uses_our_fields(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["paper-every2"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    lines: list[str] = []
    export(tmp_path / "run", tmp_path / "hf", log=lines.append)
    said = "\n".join(lines)
    assert "release layout cannot express" in said
    assert "gate_convention=paper" in said and "every_n_layers=2" in said
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["model_type"] == "moepp" and cfg["architectures"] == ["MoEPPForCausalLM"]
    assert "num_experts" not in cfg  # nothing a release loader could mistake for its own layout
    assert cfg["moe_gate_convention"] == "paper" and cfg["moe_every_n_layers"] == 2
    assert cfg["intermediate_size"] == 48 and cfg["moe_intermediate_size"] == 24
    keys = set(json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.mlp.gate_proj.weight" in keys  # the dense layer
    assert not any("layers.0.mlp.moe.gate.gate_map" in k for k in keys)


@pytest.mark.parametrize("case", ["release", "paper-every2"])
def test_generate_with_kv_cache_equals_our_greedy_decoding(tmp_path, case):
    (model_cfg, moe_cfg), _ = CASES[case]
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    hf = load_hf(tmp_path / "hf")
    prompt = tokens(batch=1, length=6, seed=3)
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, greedy(ours, prompt, 12))

    # The cache is really used: one step on top of the cached prefix gives the full forward's last logits.
    seq = out[:, :10]
    with torch.no_grad():
        prefix = hf(seq[:, :-1], use_cache=True)
        from transformers import DynamicCache

        assert isinstance(prefix.past_key_values, DynamicCache)
        assert prefix.past_key_values.get_seq_length() == 9
        step = hf(seq[:, -1:], past_key_values=prefix.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], ours(seq).logits_BSV[:, -1], atol=ATOL, rtol=RTOL)


def test_batched_generate_with_left_padding(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["release"]
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    hf = load_hf(tmp_path / "hf")
    short, long = tokens(1, 4, seed=5), tokens(1, 7, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1), torch.ones(1, 7)]).long()
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 3:], greedy(ours, short, 8)[0])
    assert torch.equal(out[1], greedy(ours, long, 8)[0])


def test_bf16_export_and_shards(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["release"]
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    result = export(tmp_path / "run", tmp_path / "hf", dtype="bf16", max_shard_bytes=20_000, log=lambda s: None)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((tmp_path / "hf" / s).stat().st_size <= 20_000 + 4096 for s in shards[:-1])  # + header
    assert set(shards) <= set(result.files)
    hf = load_hf(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    x = tokens()
    with torch.no_grad():
        got, want = hf(x).logits.float(), ours(x).logits_BSV
    # bf16 weights and activations: a loose check that it is the same model, not a precision claim.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_checkpoint_argument_forms_and_refusals(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    step = tmp_path / "run/checkpoints/step_00000007"
    for i, arg in enumerate((tmp_path / "run", tmp_path / "run/checkpoints", step)):
        assert export(arg, tmp_path / f"hf{i}", log=lambda s: None).step_dir == step
    with pytest.raises(ConversionError, match="not empty"):
        export(step, tmp_path / "hf0", log=lambda s: None)
    with pytest.raises(ConversionError, match="Mixtral cannot express"):
        export(step, tmp_path / "hfm", fmt="mixtral", log=lambda s: None)
    with pytest.raises(ConversionError, match="no checkpoints/latest"):
        export(tmp_path, tmp_path / "hfx", log=lambda s: None)


def test_command_line(tmp_path, capsys):
    (model_cfg, moe_cfg), _ = CASES["paper-every2"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    cmd = [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"), "--out"]
    proc = subprocess.run([*cmd, str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot express" in proc.stdout and "moepp layout" in proc.stdout
    from tools.convert_to_hf import main

    assert main([*cmd[2:], str(tmp_path / "hf")]) == 2  # the second time: refused in one line
    assert "not empty" in capsys.readouterr().err


def test_tokenizer_is_exported_with_its_ids(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=VOCAB_TOK,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    (model_cfg, moe_cfg), _ = CASES["release"]
    model_cfg.vocab_size = VOCAB_TOK
    save_run(tmp_path / "run", model_cfg, moe_cfg, tokenizer=tmp_path / "tok.model")
    lines: list[str] = []
    export(tmp_path / "run", tmp_path / "hf", log=lines.append)
    assert (tmp_path / "hf/tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    tok_cfg = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer" and tok_cfg["add_bos_token"] is False
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)

    pytest.importorskip("google.protobuf")  # transformers converts tokenizer.model with it
    from transformers import AutoTokenizer

    assert any("ids equal our sentencepiece tokenizer's" in line for line in lines), lines
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    for s in ("the quick brown fox", "line 12: over the lazy dog\nline 13", "unseen wörds ÿ"):
        assert tok(s)["input_ids"] == sp.encode(s)


VOCAB_TOK = 320


def test_no_tokenizer_is_said(tmp_path):
    (model_cfg, moe_cfg), _ = CASES["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    lines: list[str] = []
    result = export(tmp_path / "run", tmp_path / "hf", log=lines.append)
    assert any("no tokenizer exported" in line for line in lines)
    assert "tokenizer.model" not in result.files
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None


def test_capacity_is_training_only_and_said(tmp_path):
    import dataclasses

    from model.transformer import Decoder

    model_cfg, moe_cfg = tiny(logits_std_norm=True, capacity_factor=0.5)
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    lines: list[str] = []
    assert export(tmp_path / "run", tmp_path / "hf", log=lines.append).layout == RELEASE
    assert any("capacity_factor=0.5" in s and "dropless" in s for s in lines), lines
    dropless = Decoder(model_cfg, dataclasses.replace(moe_cfg, capacity_factor=None))
    dropless.load_state_dict(ours.state_dict())
    x = tokens()
    with torch.no_grad():
        got = load_hf(tmp_path / "hf")(x).logits
        torch.testing.assert_close(got, dropless.eval()(x).logits_BSV, atol=ATOL, rtol=RTOL)
        # Capacity 0.5 really drops tokens in training mode; evaluation (like the export) is dropless.
        assert not torch.allclose(got, ours.train()(x).logits_BSV, atol=1e-3)
        torch.testing.assert_close(ours.eval()(x).logits_BSV, got, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["huggingface", "huggingface-folder", "tiktoken"])
def test_tokenizer_json_kinds_are_exported_with_their_ids(kind, tmp_path):
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer
    from tests.tokenizer_files import ROUND_TRIP_TEXTS, tokenizer_of_kind

    path = tokenizer_of_kind(kind, tmp_path)
    ours = load_tokenizer(path)
    (model_cfg, moe_cfg), _ = CASES["release"]
    model_cfg.vocab_size = ours.vocab_size
    save_run(tmp_path / "run", model_cfg, moe_cfg, tokenizer=path)
    lines: list[str] = []
    result = export(tmp_path / "run", tmp_path / "hf", log=lines.append)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files) and "tokenizer.model" not in result.files
    if kind != "tiktoken":  # shipped as it is; tiktoken's ranks are converted
        source = path / "tokenizer.json" if path.is_dir() else path
        assert (tmp_path / "hf/tokenizer.json").read_bytes() == source.read_bytes()
    tok_cfg = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())
    assert (
        tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["eos_token"] == ours.special_tokens["eos"]
    )
    assert ("chat_template" in tok_cfg) == (kind == "huggingface-folder")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (ours.bos_id, ours.eod_id, ours.pad_id)

    assert any(f"ids equal our {ours.kind} tokenizer's" in line for line in lines), lines
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token_id == ours.eod_id and tok.bos_token_id == ours.bos_id
    for text in ROUND_TRIP_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode([text])[0]
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_files_get_the_modes_of_new_files(tmp_path, umask):
    (model_cfg, moe_cfg), _ = CASES["paper-every2"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    previous = os.umask(umask)
    try:
        export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)  # the files safetensors itself writes 0600
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)  # 0644 under 022: the group and others can read
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
