"""Vanilla MoE as native Mixtral (no remote code): chosen only when Mixtral's gates are ours."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_hf_common import ATOL, RTOL, greedy, save_run, tiny, tokens
from tools.hf.checkpoint_io import ConversionError
from tools.hf.export import export
from tools.hf.layouts import MIXTRAL, OWN

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VANILLA = {"zc": (0, 0, 0), "residual": False}


def test_vanilla_moe_with_renormalised_gates_exports_as_mixtral(tmp_path):
    model_cfg, moe_cfg = tiny(**VANILLA, convention="release")
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    result = export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    assert result.layout == MIXTRAL
    assert not any(f.endswith(".py") for f in result.files)  # native: no remote code
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, 24)

    hf, info = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # no trust_remote_code needed
    assert type(auto).__name__ == "MixtralForCausalLM"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits_BSV, atol=ATOL, rtol=RTOL)
    prompt = tokens(1, 5, seed=4)
    assert torch.equal(hf.generate(prompt, max_new_tokens=10, do_sample=False), greedy(ours, prompt, 10))


def test_vanilla_moe_with_paper_gates_is_not_mixtral(tmp_path):
    # Paper gates are the raw top-2 probabilities; Mixtral renormalises them: a different model.
    model_cfg, moe_cfg = tiny(**VANILLA, convention="paper")
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    lines: list[str] = []
    result = export(tmp_path / "run", tmp_path / "hf", log=lines.append)
    assert result.layout == OWN
    assert any("not exported as native Mixtral" in s and "renormalises" in s for s in lines), lines
    with pytest.raises(ConversionError, match="gate_convention=paper"):
        export(tmp_path / "run", tmp_path / "hf2", fmt="mixtral", log=lambda s: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits_BSV, atol=ATOL, rtol=RTOL)


def test_format_moepp_keeps_a_vanilla_model_in_remote_code(tmp_path):
    model_cfg, moe_cfg = tiny(**VANILLA, convention="release")
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    assert export(tmp_path / "run", tmp_path / "hf", fmt="moepp", log=lambda s: None).layout == OWN


def test_topk_router_with_mixtral_gating_exports_as_mixtral(tmp_path):
    model_cfg, moe_cfg = tiny(**VANILLA, convention="paper")
    moe_cfg.router.kind, moe_cfg.router.mixtral_gating = "topk", True
    ours = save_run(tmp_path / "run", model_cfg, moe_cfg)
    assert export(tmp_path / "run", tmp_path / "hf", log=lambda s: None).layout == MIXTRAL
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits_BSV, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"shared_experts": 1}, "moe.shared_experts=1"),
        ({"router": "etr"}, "moe.router.kind=etr"),
    ],
)
def test_router_family_features_no_layout_expresses_are_refused(tmp_path, fields, named):
    model_cfg, moe_cfg = tiny(**VANILLA, convention="paper")
    if fields.pop("router", None):
        moe_cfg.router.kind = "etr"
    for k, v in fields.items():
        setattr(moe_cfg, k, v)
    save_run(tmp_path / "run", model_cfg, moe_cfg)
    with pytest.raises(ConversionError, match=named):
        export(tmp_path / "run", tmp_path / "hf", log=lambda s: None)
    assert not (tmp_path / "hf").exists()  # nothing half-written
