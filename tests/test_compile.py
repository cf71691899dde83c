"""train.compile: each block under torch.compile (inductor) matches the eager model in fp32 and keeps its
parameter names."""

import copy

import pytest
import torch
import torch.nn.functional as F

from data.packing import DocumentPacking
from model.config import ConfigError
from model.transformer import Decoder
from parallel.compile import apply_compile
from train.config_load import load_config

# fp32 tolerance of compiled vs eager: inductor fuses and reorders reductions (RMSNorm, softmax, SwiGLU), so
# results differ by rounding only: measured ~1e-8 absolute on the gradients of this model.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # relative to each parameter's largest gradient entry


def tiny_config():
    # Two MoE++ layers (the second with the gating residual), small widths: inductor's compile time on two CPU
    # cores is the cost of this test.
    return load_config(
        "configs/tiny-cpu.yaml",
        [
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.ffn_hidden_size=128",
            "moe.expert_ffn_hidden_size=64",
            "model.vocab_size=512",
            "model.max_seq_len=32",
            "data.seq_len=32",
        ],
    )


def loss_and_grads(
    model: Decoder, tokens: torch.Tensor, packing: DocumentPacking | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    inputs = tokens[:, :-1]
    out = model(inputs, **(packing.model_inputs(inputs) if packing else {}))
    loss = F.cross_entropy(out.logits_BSV.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_blocks_match_eager_in_fp32():
    torch._dynamo.reset()
    cfg = tiny_config()
    torch.manual_seed(0)
    eager = Decoder(cfg.model, cfg.moe)
    eager.init_weights()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    graphs = []
    for seed in (1, 2):  # a second batch routes differently: the eager MoE section must not force a recompile
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
        loss_e, grads_e = loss_and_grads(eager, tokens)
        loss_c, grads_c = loss_and_grads(compiled, tokens)
        torch.testing.assert_close(loss_c, loss_e, rtol=LOSS_RTOL, atol=0)
        assert grads_c.keys() == grads_e.keys()
        for name, g in grads_e.items():
            scale = g.abs().max().item()
            torch.testing.assert_close(grads_c[name], g, rtol=0, atol=GRAD_RTOL * scale + 1e-12, msg=name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the blocks did run compiled
    assert graphs[1] == graphs[0]  # and another routing reused the same graphs


def test_train_compile_is_a_validated_flag():
    assert load_config("configs/tiny-cpu.yaml", ["train.compile=true"]).train.compile is True
    assert load_config("configs/tiny-cpu.yaml").train.compile is False
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("configs/tiny-cpu.yaml", ["train.compile=maybe"])
    # Every layout composes with it (tests/distributed/ compare each compiled layout with the eager model).
    cfg = load_config(
        "configs/tiny-cpu.yaml", ["train.compile=true", "parallel.tp=2", "parallel.sequence_parallel=true"]
    )
    assert cfg.train.compile and cfg.parallel.tp == 2


@pytest.mark.slow
def test_graphs_do_not_grow_with_depth():
    # Blocks of one kind share their graphs, so a model deeper than dynamo's recompile limit (past which it would
    # silently run the remaining blocks eagerly) compiles no more graphs than a shallow one. aot_eager: dynamo
    # captures the same graphs whatever the backend, and this one compiles in seconds.
    counts = []
    for layers in (3, torch._dynamo.config.recompile_limit + 4):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(
            "configs/tiny-cpu.yaml", [f"model.num_layers={layers}", "model.max_seq_len=32", "data.seq_len=32"]
        )
        torch.manual_seed(0)
        model = Decoder(cfg.model, cfg.moe)
        apply_compile(model, backend="aot_eager")
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        loss_and_grads(model, tokens)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[0] > 0
    assert counts[1] == counts[0]


@pytest.mark.slow
def test_document_packings_reuse_the_compiled_graphs():
    # The per-document attention calls (the CPU kernel) are sized by the host-read document lengths: they run
    # eagerly, so every new packing reuses the graphs of the first, and the result still equals the eager model.
    eod = 5
    cfg = load_config("configs/tiny-cpu.yaml", ["model.num_layers=2", "model.max_seq_len=640", "data.seq_len=640"])
    torch.manual_seed(0)
    eager = Decoder(cfg.model, cfg.moe)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    apply_compile(compiled, backend="aot_eager")
    packing = DocumentPacking(eod, mask_attention=True, reset_positions=True)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for ends in ([300], [100, 400, 500], [350, 620]):  # documents longer than one grouped call, and shorter
        tokens = torch.randint(eod + 1, cfg.model.vocab_size, (1, 641), generator=g)
        tokens[0, ends] = eod
        loss_e, grads_e = loss_and_grads(eager, tokens, packing)
        loss_c, grads_c = loss_and_grads(compiled, tokens, packing)
        torch.testing.assert_close(loss_c, loss_e, rtol=LOSS_RTOL, atol=0)
        for name, grad in grads_e.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(grads_c[name], grad, rtol=0, atol=GRAD_RTOL * scale + 1e-12, msg=name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0
    assert graphs[2] == graphs[1] == graphs[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["moe", "attention"])
def test_compiled_blocks_compose_with_activation_checkpointing(mode):
    # Checkpointed regions inside compiled blocks (the order train.compile and train.activation_checkpointing
    # give): the recomputed forward under the compiled graph gives the eager, uncheckpointed loss and gradients.
    # aot_eager, as in tests/distributed/: dynamo's graphs and breaks are the backend's input either way.
    from parallel.activation_checkpoint import apply_activation_checkpointing

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = tiny_config()
    torch.manual_seed(0)
    eager = Decoder(cfg.model, cfg.moe)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")
    assert apply_activation_checkpointing(compiled, mode)
    for seed in (1, 2):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
        loss_e, grads_e = loss_and_grads(eager, tokens)
        loss_c, grads_c = loss_and_grads(compiled, tokens)
        torch.testing.assert_close(loss_c, loss_e, rtol=LOSS_RTOL, atol=0)
        for name, g in grads_e.items():
            scale = g.abs().max().item()
            torch.testing.assert_close(grads_c[name], g, rtol=0, atol=GRAD_RTOL * scale + 1e-12, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_full_activation_checkpointing_with_compile_is_refused_in_one_line():
    # A whole checkpointed block would run uncompiled (dynamo does not trace the recompute bookkeeping), so
    # train.compile would silently do nothing: refused before anything is built.
    with pytest.raises(ConfigError, match=r"^train.activation_checkpointing: full .*train.compile") as e:
        load_config("configs/tiny-cpu.yaml", ["train.compile=true", "train.activation_checkpointing=full"])
    assert "\n" not in str(e.value)
    assert load_config("configs/tiny-cpu.yaml", ["train.compile=true", "train.activation_checkpointing=moe"])
