"""Import from Hugging Face: export -> import is the identity on tensors and config, a release-layout folder without
our stashed config imports from its own fields, what our model cannot reproduce is refused, and training continues
from the imported checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_hf_common import load_hf, save_run, tiny, tokens
from tools.hf.checkpoint_io import ConversionError, load_decoder, resolve_step_dir
from tools.hf.export import export
from tools.hf.import_config import HFImportError
from tools.hf.importer import import_hf
from tools.hf.layouts import STASH_KEY
from train.checkpoint_meta import read_meta
from train.config import Config
from train.config_load import build, load_config

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
QUIET = {"log": lambda s: None}

MODELS = {
    "release": tiny(logits_std_norm=True),
    "own": tiny(convention="paper", every_n_layers=2, two_layer=True),
    "mixtral": tiny(zc=(0, 0, 0), residual=False),
}


def _state(step_dir: Path) -> tuple[dict[str, torch.Tensor], object, object]:
    model, _ = load_decoder(step_dir)
    return model.state_dict(), model.cfg, model.moe_cfg


@pytest.mark.parametrize("kind", MODELS)
def test_export_then_import_is_the_identity(tmp_path, kind):
    model_cfg, moe_cfg = MODELS[kind]
    moe_cfg.tau = 0.3  # a training-only field: must survive through the stashed config
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    step = import_hf(tmp_path / "hf", tmp_path / "ckpt", **QUIET)
    before, cfg0, moe0 = _state(resolve_step_dir(tmp_path / "run"))
    after, cfg1, moe1 = _state(step)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert (cfg1, moe1) == (cfg0, moe0)
    meta = read_meta(step)
    assert meta["step"] == 0 and meta["imported_from"]["layout"] == ("moepp" if kind == "own" else kind)
    build(Config, meta["config"])  # the trainer's loader accepts it


def test_bf16_round_trip_is_the_bf16_rounding(tmp_path):
    model_cfg, moe_cfg = MODELS["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", dtype="bf16", **QUIET)
    before, _, _ = _state(resolve_step_dir(tmp_path / "run"))
    after, _, _ = _state(import_hf(tmp_path / "hf", tmp_path / "ckpt", **QUIET))
    assert all(torch.equal(before[k].bfloat16().float(), after[k]) for k in before)


def test_release_folder_without_our_config_imports_from_its_fields(tmp_path):
    """What a folder of the public release looks like to the importer: only the release fields, and a first-layer
    gate_map that is not zero (the release never uses it)."""
    model_cfg, moe_cfg = MODELS["release"]
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    cfg_file = tmp_path / "hf/config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg[STASH_KEY]
    cfg_file.write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    (shard,) = (tmp_path / "hf").glob("model-*.safetensors")
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.moe.gate.gate_map.weight"].normal_()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    x = tokens()
    with torch.no_grad():  # the transformers side ignores it too
        torch.testing.assert_close(load_hf(tmp_path / "hf")(x).logits, ours(x).logits_BSV, atol=1e-5, rtol=1e-5)

    lines: list[str] = []
    step = import_hf(tmp_path / "hf", tmp_path / "ckpt", log=lines.append)
    assert any("training-only fields" in s for s in lines)
    model, _ = load_decoder(step)
    assert model.moe_cfg.router == moe_cfg.router and model.moe_cfg.num_total_experts == 8
    assert model.cfg.ffn_hidden_size == 24  # the release has one width: the experts'
    with torch.no_grad():
        assert torch.equal(model(x).logits_BSV, ours(x).logits_BSV)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("moe_use_mixtral_gating", True, "moe_use_mixtral_gating=true"),
        ("moe_expert_interval", 2, "moe_expert_interval=2"),
        ("num_experts_per_tok", 3, "always top-2"),
        ("tie_word_embeddings", True, "untied"),
        ("model_type", "llama", "model_type 'llama'"),
    ],
)
def test_what_our_model_cannot_reproduce_is_refused(tmp_path, field, value, message):
    model_cfg, moe_cfg = MODELS["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg[field] = value
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "ckpt", **QUIET)


def test_missing_or_surplus_weights_are_refused(tmp_path):
    model_cfg, moe_cfg = MODELS["own"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    from safetensors.torch import load_file, save_file

    (shard,) = (tmp_path / "hf").glob("model-*.safetensors")
    tensors = load_file(str(shard))
    save_file({**tensors, "model.layers.0.extra.weight": torch.zeros(2)}, str(shard))
    with pytest.raises(ConversionError, match="no place in our model"):
        import_hf(tmp_path / "hf", tmp_path / "a", **QUIET)
    gone = "model.layers.2.mlp.moe.experts.experts.1.down_proj.weight"
    del tensors[gone]
    save_file(tensors, str(shard))
    with pytest.raises(FileNotFoundError, match="listed in model.safetensors.index.json but not in"):
        import_hf(tmp_path / "hf", tmp_path / "b", **QUIET)
    index_file = tmp_path / "hf/model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][gone]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="experts.1.down_proj.weight is missing"):
        import_hf(tmp_path / "hf", tmp_path / "c", **QUIET)


def test_pretraining_continues_from_an_imported_checkpoint(tmp_path):
    from train.trainer import run

    model_cfg, moe_cfg = MODELS["release"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    step = import_hf(tmp_path / "hf", tmp_path / "ckpt", **QUIET)
    cfg = load_config(
        tmp_path / "ckpt/config.yaml",
        [
            f"train.resume={step}",
            f"train.run_dir={tmp_path / 'cont'}",
            "train.max_steps=2",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "train.eval_interval=0",
            "logging.progress_bar=false",
            "data.synthetic.num_words=8",
            "data.synthetic.max_tail=2",
        ],
    )
    record = run(cfg)
    assert record["step"] == 2 and record["loss"] == record["loss"]  # finite, resumed from step 0


def test_an_exported_tokenizer_json_comes_back_as_the_runs_tokenizer(tmp_path):
    from data.tokenizer import load_tokenizer
    from tests.tokenizer_files import ROUND_TRIP_TEXTS, llama_like_folder

    source = load_tokenizer(llama_like_folder(tmp_path))
    model_cfg, moe_cfg = tiny(logits_std_norm=True)
    model_cfg.vocab_size = source.vocab_size
    save_run(tmp_path / "run", model_cfg, moe_cfg, tokenizer=source.path)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    import_hf(tmp_path / "hf", tmp_path / "ckpt", **QUIET)
    import yaml

    data = yaml.safe_load((tmp_path / "ckpt/config.yaml").read_text())["data"]
    assert data["tokenizer"] == str((tmp_path / "ckpt" / "tokenizer").resolve())
    back = load_tokenizer(data["tokenizer"])
    assert (back.kind, back.bos_id, back.eod_id, back.vocab_size) == ("huggingface", 300, 301, 302)
    assert [back.encode([t]) for t in ROUND_TRIP_TEXTS] == [source.encode([t]) for t in ROUND_TRIP_TEXTS]


def test_command_line(tmp_path, capsys):
    from tools.convert_from_hf import main

    model_cfg, moe_cfg = MODELS["mixtral"]
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    export(tmp_path / "run", tmp_path / "hf", **QUIET)
    args = ["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]
    assert main(args) == 0
    assert "train.resume=" in capsys.readouterr().out and (tmp_path / "ckpt/latest").is_file()
    assert main(args) == 2  # the second time: refused in one line
    assert "not empty" in capsys.readouterr().err


def _truncate_shard(hf: Path) -> None:
    (shard,) = hf.glob("model-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:-7])


def _edit_config(hf: Path, edit) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    edit(cfg)
    (hf / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda hf: _edit_config(hf, lambda c: c.update(model_type="llama")), "config.json: model_type 'llama' is"),
        (lambda hf: _edit_config(hf, lambda c: c.pop("hidden_size")), "config.json: field 'hidden_size' is missing"),
        (lambda hf: (hf / "config.json").write_text('{"model_type": "MoE++",'), "config.json: not valid JSON ("),
        (lambda hf: (hf / "config.json").write_bytes(b'{"model_type": "\xff"}'), "config.json: not valid JSON ("),
        (lambda hf: (hf / "config.json").write_text("[1, 2]"), "config.json: not a JSON object"),
        (_truncate_shard, ".safetensors: not a readable safetensors file (Error while deserializing header"),
        (lambda hf: (hf / "model.safetensors.index.json").write_text("{"), "index.json: not a safetensors index"),
    ],
    ids=["other-model-type", "missing-field", "bad-json", "not-utf8", "not-an-object", "corrupt-shard", "bad-index"],
)
def test_bad_folders_are_refused_in_one_line_from_the_command_line(tmp_path, capsys, damage, message):
    from tools.convert_from_hf import main

    save_run(tmp_path / "run", *MODELS["release"])
    hf = tmp_path / "hf"
    export(tmp_path / "run", hf, **QUIET)
    damage(hf)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert main(["--hf", str(hf), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("convert_from_hf: ") and message in err
    assert not (tmp_path / "ckpt").exists()  # nothing written
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before  # and the folder left as it was
