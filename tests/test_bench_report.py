"""bench/report.py: where a benchmark's results file goes and what every one holds besides the numbers."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import pytest
import torch

from bench import report


def test_results_path_is_the_default_folder_a_given_folder_or_a_given_file(tmp_path):
    assert report.results_path("x") == report.RESULTS_DIR / "x.json"
    assert report.results_path("x", tmp_path) == tmp_path / "x.json"
    assert report.results_path("x", tmp_path / "new-folder") == tmp_path / "new-folder" / "x.json"
    assert report.results_path("x", tmp_path / "mine.json") == tmp_path / "mine.json"
    (tmp_path / "odd.json").mkdir()  # a folder that happens to end in .json is still a folder
    assert report.results_path("x", tmp_path / "odd.json") == tmp_path / "odd.json" / "x.json"


def test_write_results_records_command_machine_torch_and_utc_date(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench/some.py", "--tokens", "64", "--out", str(tmp_path / "a b")])
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    path = report.write_results("some", {"tokens": 64, "cells": [{"ms": 1.5}]}, tmp_path / "a b")
    assert path == tmp_path / "a b" / "some.json"
    assert f"results: {path}" in capsys.readouterr().out
    record = json.loads(path.read_text())
    assert list(record)[:5] == ["benchmark", "command", "machine", "torch", "date"]
    assert record["benchmark"] == "some"
    assert shlex.split(record["command"]) == ["python", *sys.argv]  # quoted so that it can be run again
    assert record["torch"] == torch.__version__
    assert record["machine"]["cpu_count"] == os.cpu_count()
    assert record["machine"]["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    date = datetime.datetime.fromisoformat(record["date"])
    assert date.utcoffset() == datetime.timedelta(0) and date >= before
    assert record["tokens"] == 64 and record["cells"] == [{"ms": 1.5}]
    assert [p.name for p in path.parent.iterdir()] == ["some.json"]  # no partial file left beside it


def test_write_results_replaces_a_previous_file_whole(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    report.write_results("r", {"n": 1}, target)
    assert json.loads(target.read_text())["n"] == 1


def test_numbers_may_not_reuse_the_record_keys(tmp_path):
    with pytest.raises(ValueError, match=r"\['date'\] are reserved"):
        report.write_results("r", {"date": "yesterday"}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_out_option_takes_a_path_and_json_is_the_same_option():
    parser = argparse.ArgumentParser()
    report.add_out_argument(parser)
    assert parser.parse_args([]).out is None
    assert parser.parse_args(["--out", "x"]).out == "x"
    assert parser.parse_args(["--json", "y.json"]).out == "y.json"


def test_print_table_prints_a_titled_markdown_table(capsys):
    report.print_table("T", ["a", "b"], [["1", "2"]])
    assert capsys.readouterr().out == "T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
