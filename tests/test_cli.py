"""`python -m train`: --help generated from the config dataclasses, --print-config, closest-key hints, and which
errors are one line (bad input) and which keep their traceback (bugs)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

import train.trainer
from data.errors import DataError
from train.__main__ import main
from train.config import Config
from train.config_help import config_keys, first_sentence
from train.config_load import config_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted YAML key of the config tree, walked independently of train/config_help.py."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name.rstrip("_")
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], name + ".")
        else:
            keys.append(name)
    return keys


@pytest.mark.parametrize("where", ["alone", "after the config", "after overrides"])
def test_help_lists_every_key_with_type_default_and_description(capsys, where):
    argv = {"alone": ["--help"], "after the config": [TINY, "-h"], "after overrides": [TINY, "a.b=1", "--help"]}
    assert main(argv[where]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for key in _leaf_keys(Config):
        assert key in rows, f"{key} missing from --help"
    assert rows["train.max_steps"].split()[1:4] == ["int", "=", "300"]
    assert "auto|fp32|bf16" in rows["train.dtype"]
    assert "checkpoint.async" in rows and "checkpoint.async_" not in rows
    for section in ("model:", "moe.router:", "parallel:", "data:", "train:", "checkpoint:", "cluster.slurm:"):
        assert any(line.startswith(section) for line in out.splitlines()), section


def test_every_config_key_has_a_description():
    # A new key without a comment in its dataclass fails here, so --help cannot fall behind the config.
    sections, keys = config_keys(Config)
    undocumented = [k.key for k in keys if not k.description]
    assert not undocumented, f"add a comment to these config fields: {undocumented}"
    assert all(description for _, description in sections), sections


def test_first_sentence_keeps_abbreviations():
    assert first_sentence("Blocks per stage, e.g. [3, 2]. Null: balanced.") == "Blocks per stage, e.g. [3, 2]."
    assert first_sentence("one line\n  continued") == "one line continued"


def test_print_config_is_yaml_that_loads_back_to_the_same_config(capsys, tmp_path):
    overrides = ["train.max_steps=7", "checkpoint.async=true", "moe.balance=[{kind: switch, coeff: 0.5}]"]
    assert main([TINY, *overrides, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "async: true" in text and "async_" not in text
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(text)
    expected = load_config(TINY, overrides)
    again = load_config(resolved)
    assert again.to_dict() == expected.to_dict()  # the name too: it is part of the resolved YAML
    assert yaml.safe_load(config_yaml(again))["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("train.max_stpes=3", "train.max_stpes", "did you mean train.max_steps?"),
        ("trian.max_steps=3", "trian", "did you mean train?"),
        ("checkpoint.asynk=true", "checkpoint.asynk", "did you mean checkpoint.async?"),
    ],
)
def test_unknown_key_suggests_the_closest_known_key(capsys, override, key, suggestion):
    assert main([TINY, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"config error: {key}: unknown key;")
    assert suggestion in err


def test_unknown_key_without_a_close_one_lists_the_section(capsys):
    assert main([TINY, "optim.zzzz=1"]) == 2
    assert "known keys here: lr, min_lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        ([], "usage: python -m train CONFIG.yaml"),
        (["--print-config"], "usage:"),
        ([TINY, "--verbose"], "usage error: --verbose: unknown option"),
    ],
)
def test_bad_command_lines_are_one_line(capsys, argv, start):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start), err


def test_bad_input_during_the_run_is_one_line(capsys, monkeypatch):
    def bad_data(_cfg):
        raise DataError("corpus.bin: 3 bytes but corpus.idx needs 8; the dataset is incomplete, rebuild it")

    monkeypatch.setattr(train.trainer, "run", bad_data)
    assert main([TINY]) == 2
    assert (
        capsys.readouterr().err == "error: corpus.bin: 3 bytes but corpus.idx needs 8; the dataset is "
        "incomplete, rebuild it\n"
    )


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError("a bug"), RuntimeError("train.x: a bug")])
def test_a_bug_during_the_run_keeps_its_traceback(monkeypatch, bug):
    def buggy(_cfg):
        raise bug

    monkeypatch.setattr(train.trainer, "run", buggy)
    with pytest.raises(type(bug), match="a bug"):
        main([TINY])
