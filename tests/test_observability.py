"""wandb mirror (disabled, missing, and a fake module), run plots, and the token routing report."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from model.config import ConfigError
from model.transformer import Decoder
from parallel.config import ParallelConfig
from parallel.mesh import init_parallel
from train.checkpoint import Checkpointer
from train.config import WandbConfig
from train.config_load import load_config
from train.metrics import MetricsLogger, flatten_for_wandb
from train.optim import build_optimizer


def record(step: int, n_layers: int = 2, n_experts: int = 6) -> dict:
    """A metrics.jsonl record shaped like train/trainer.py's."""
    share_ffn = 0.9 - 0.02 * step / 10
    layers = [
        {
            "ffn_per_token": 2 * share_ffn,
            "share_ffn": share_ffn,
            "share_constant": (1 - share_ffn) / 2,
            "share_copy": (1 - share_ffn) / 4,
            "share_zero": (1 - share_ffn) / 4,
            "dropped": 0.0,
            "expert_load": [share_ffn / 4] * 4 + [(1 - share_ffn) / 2] * (n_experts - 4),
            "a2a_bytes_sent": 0,
            "a2a_bytes_received": 0,
            "a2a_bytes_dispatch_sent": 0,
            "a2a_bytes_dispatch_sent_remote": 0,
        }
        for _ in range(n_layers)
    ]
    r = {
        "step": step,
        "loss": 5.0 / step,
        "aux_loss": 0.008,
        "lr": 1e-3,
        "grad_norm": None,  # a non-finite norm is logged as null
        "tokens_per_s": 1000.0 + step,
        "consumed_samples": step * 16,
        "skipped_steps": 0,
        "ffn_per_token": 2 * share_ffn,
        "share_zero_computation": 1 - share_ffn,
        "eta_s": 1.0,
        "routing": layers,
    }
    if step % 20 == 0:
        r.update(val_loss=4.0 / step, ffn_per_token_easy=1.2, ffn_per_token_hard=1.8)
    return r


# ---------------------------------------------------------------------------------------------------------------
# wandb


def test_flatten_for_wandb():
    flat = flatten_for_wandb(record(10))
    with_bias = record(10)
    with_bias["routing"][0]["expert_bias"] = [0.001, -0.002]
    assert flatten_for_wandb(with_bias)["routing/layer0/bias/e1"] == -0.002
    assert flat["loss"] == 0.5 and "step" not in flat and "grad_norm" not in flat
    assert flat["routing/layer1/ffn_per_token"] == pytest.approx(2 * 0.88)
    assert flat["routing/layer0/share_zero"] == pytest.approx(0.03)
    assert flat["routing/layer0/a2a_bytes_sent"] == 0.0
    assert flat["routing/layer0/load/e5"] == pytest.approx(0.06)
    assert not any(isinstance(v, list | dict) for v in flat.values())


def test_wandb_disabled_writes_jsonl_only(tmp_path, monkeypatch, capsys):
    def boom(name, *a, **k):
        raise AssertionError("wandb must not be imported when disabled")

    monkeypatch.setattr("train.metrics.importlib.import_module", boom)
    logger = MetricsLogger(tmp_path, 10, wandb=WandbConfig(mode="disabled"))
    logger.log(record(10))
    logger.close()
    assert logger.wandb_run is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 10
    assert "wandb" not in capsys.readouterr().out


def test_wandb_missing_is_one_line_and_jsonl_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    logger = MetricsLogger(tmp_path, 10, wandb=WandbConfig())  # default mode: offline
    logger.log(record(10))
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wandb: not installed") and "metrics.jsonl" in out[0]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_wandb_fake_module_gets_config_and_flat_records(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class FakeRun:
        dir = str(tmp_path / "wandb" / "offline-run-x" / "files")

        def log(self, data, step=None):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = MetricsLogger(tmp_path, 10, wandb=WandbConfig(project="p"), run_config={"moe": {"tau": 0.75}}, name="tiny")
    logger.log(record(10))
    logger.log(record(20))
    logger.close()
    init_kwargs = calls["init"]
    assert init_kwargs["project"] == "p" and init_kwargs["mode"] == "offline" and init_kwargs["name"] == "tiny"
    assert init_kwargs["dir"] == str(tmp_path) and init_kwargs["config"] == {"moe": {"tau": 0.75}}
    assert [s for s, _ in calls["log"]] == [10, 20]
    assert calls["log"][1][1]["val_loss"] == pytest.approx(0.2)
    assert "routing/layer0/ffn_per_token" in calls["log"][0][1]
    assert calls["finished"]
    first_id = init_kwargs["id"]
    assert init_kwargs["resume"] == "allow"
    # A run resumed from a checkpoint (start_step > 0) continues the same wandb run; a fresh start gets a new one.
    MetricsLogger(tmp_path, 30, start_step=20, wandb=WandbConfig(project="p")).close()
    assert calls["init"]["id"] == first_id
    MetricsLogger(tmp_path, 30, start_step=0, wandb=WandbConfig(project="p")).close()
    assert calls["init"]["id"] != first_id


def test_wandb_not_started_on_non_logging_ranks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **k: pytest.fail("started")))
    assert MetricsLogger(tmp_path, 10, enabled=False, wandb=WandbConfig()).wandb_run is None


# The defaults' synthetic corpus needs more token ids than the default vocabulary; shrink it.
SMALL_CORPUS = ["data.synthetic.num_words=32"]


def test_wandb_config_section():
    cfg = load_config(None, [*SMALL_CORPUS, "logging.wandb.mode=disabled", "logging.wandb.project=mine"])
    assert cfg.logging.wandb == WandbConfig(project="mine", mode="disabled")
    assert load_config(None, SMALL_CORPUS).logging.wandb.mode == "offline"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config(None, [*SMALL_CORPUS, "logging.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="logging.wandb.project"):
        load_config(None, [*SMALL_CORPUS, "logging.wandb.project="])


# ---------------------------------------------------------------------------------------------------------------
# tools/plot_run.py


def test_plot_run_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from tools.plot_run import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(record(s)) + "\n" for s in range(10, 101, 10)))
    (run / "config.yaml").write_text(
        "moe: {num_experts: 4, num_constant_experts: 1, num_copy_experts: 0, num_zero_experts: 1}\n"
    )
    assert main([str(run)]) == 0
    names = ["training", "routing_ffn_per_token", "routing_shares", "routing_load"]
    for name in names:
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_run_errors_and_labels(tmp_path, capsys):
    from tools.plot_run import balance_ffn_per_token, expert_labels, main

    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    assert expert_labels(tmp_path, 3) == ["e0", "e1", "e2"]  # no config.yaml
    # At balance top_k * tau N / (tau N + N_zc): 2 * 0.75*4 / (0.75*4 + 2) = 1.2 (spec §4); none for vanilla MoE.
    moe = {"num_experts": 4, "num_constant_experts": 1, "num_zero_experts": 1, "tau": 0.75, "top_k": 2}
    assert balance_ffn_per_token(moe) == pytest.approx(1.2)
    assert balance_ffn_per_token({"num_experts": 4, "num_zero_experts": 0}) is None


# ---------------------------------------------------------------------------------------------------------------
# tools/routing_report.py


def tiny_checkpoint(tmp_path: Path, data_overrides: list[str]) -> Path:
    cfg = load_config(
        None,
        [
            "model.vocab_size=257",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.ffn_hidden_size=32",
            "model.max_seq_len=32",
            "moe.num_experts=4",
            "data.seq_len=32",
            *SMALL_CORPUS,
            *data_overrides,
        ],
    )
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.moe)
    ctx = init_parallel(ParallelConfig(), "cpu")
    ckpt = Checkpointer(tmp_path / "ckpt", ctx, keep_last=1)
    return ckpt.save(1, model, build_optimizer(model, cfg.optim), {"consumed_samples": 0, "config": cfg.to_dict()})


def test_routing_report_on_a_byte_level_checkpoint(tmp_path, capsys):
    from tools.routing_report import main

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. the dog ate the cat's food.\n" * 6)
    tiny_checkpoint(tmp_path, [f"data.path={text}"])
    plot = tmp_path / "report.png"
    # The checkpoints directory (its `latest`) is accepted as well as a step directory.
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--text", str(text), "--top", "5", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "byte-level" in out and "most FFN experts:" in out and "fewest FFN experts:" in out
    assert "mean FFN experts per token:" in out
    table = out.split("most FFN experts:")[1].split("fewest FFN experts:")[0].strip().splitlines()
    assert len(table) == 1 + 5  # header + rows
    values = [float(line.split()[-1]) for line in table[1:]]
    assert values == sorted(values, reverse=True) and all(0 <= v <= 2 for v in values)
    if _has_matplotlib():
        assert plot.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_routing_report_synthetic_checkpoint_says_why(tmp_path, capsys):
    from tools.routing_report import main

    step_dir = tiny_checkpoint(tmp_path, [])
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["--checkpoint", str(step_dir), "--text", str(text), "--plot", ""]) == 2
    assert "synthetic corpus" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--text", str(text)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
