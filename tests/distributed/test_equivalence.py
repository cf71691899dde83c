"""Every parallel layout against the single-process model with the same weights (gloo, several processes).

Tolerance: fp32, rtol 1e-4 / atol 1e-5 (tests/distributed/workers.py) for logits, loss, every gradient, the global
gradient norm and every parameter after 3 AdamW steps.
"""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

LAYOUTS = {
    "ep2": (2, 1, 2, False),  # world, tp, ep, sequence parallel: dp=2, experts split over 2 ranks
    "ep4": (4, 1, 4, False),
    "tp2": (2, 2, 1, False),
    "tp2xep2": (4, 2, 2, False),  # dp=2 replicas of tp=2, experts split over the 2 replicas
    "edp2xep2": (4, 1, 2, False),  # dp=4 = 2 expert replicas x 2 expert shards
    "tp2-sp": (2, 2, 1, True),
    "tp2-sp-xep2": (4, 2, 2, True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout):
    world, tp, ep, sp = LAYOUTS[layout]
    run_world(workers.equivalence, world, tp, ep, None, 3, sp)


# train.compile in each layout, against the eager single-process model with the same tolerances (logits, loss,
# gradients, parameters after 2 AdamW steps). Backend aot_eager: dynamo captures the same graphs, with the same
# graph breaks, DTensor collectives and autograd across them, as for inductor, in a fraction of inductor's compile
# time on two cores (tests/test_compile.py covers inductor's numerics).
COMPILED_LAYOUTS = {
    "tp2": (2, 2, 1, False),
    "ep2": (2, 1, 2, False),  # dp=2 as well: data-parallel gradient reduction of the compiled blocks
}


@pytest.mark.parametrize("layout", COMPILED_LAYOUTS)
def test_compiled_blocks_match_the_eager_single_process_model(layout):
    world, tp, ep, sp = COMPILED_LAYOUTS[layout]
    run_world(workers.equivalence, world, tp, ep, None, 2, sp, "aot_eager")


def test_compiled_blocks_with_sequence_parallel_and_document_masking_match_the_eager_model():
    # tp2 with sequence parallelism: the norms' and attention's redistributions inside the compiled graphs.
    run_world(workers.document_equivalence, 2, 2, 1, 1, True, "aot_eager")


def test_compiled_blocks_with_tensor_parallel_shared_experts_match_the_eager_model():
    # The shared experts run in the eager section of the MoE block and their output enters the compiled rest.
    world, tp, ep, sp, variant = ROUTER_FAMILY["moepp-global-shared-tp2-sp"]
    run_world(workers.router_family, world, tp, ep, sp, variant, "aot_eager")


def test_capacity_dropping_matches_single_process_under_ep2():
    run_world(workers.equivalence, 2, 1, 2, 0.6, 2)


def test_all_to_all_volume_is_ffn_share_of_vanilla():
    run_world(workers.a2a_volume, 2)


def test_bf16_all_to_all_payload_forward_and_backward():
    run_world(workers.bf16_payload, 2)


def test_one_host_sync_per_moe_layer_under_ep2():
    run_world(workers.host_syncs, 2)


def test_local_experts_overlap_the_all_to_alls_forward_and_backward():
    run_world(workers.overlap_order, 2)


def test_rank_and_experts_receiving_no_tokens():
    run_world(workers.empty_rank, 2)


ROUTER_FAMILY = {
    "etr-ep2": (2, 1, 2, False, "etr"),
    "etr-dp2": (2, 1, 1, False, "etr"),  # no expert parallelism: the expert choice still spans the dp batch
    "etr-edp2xep2": (4, 1, 2, False, "etr"),
    "moepp-global-shared-tp2xep2": (4, 2, 2, False, "moepp-global"),
    "moepp-global-shared-tp2-sp": (2, 2, 1, True, "moepp-global"),
}


@pytest.mark.parametrize("case", ROUTER_FAMILY)
def test_router_family_matches_single_process_on_the_concatenated_batch(case):
    world, tp, ep, sp, variant = ROUTER_FAMILY[case]
    run_world(workers.router_family, world, tp, ep, sp, variant)


DOCUMENT_LAYOUTS = {
    # world, tp, ep, pp, sequence parallel
    "tp2": (2, 2, 1, 1, False),
    "tp2-sp": (2, 2, 1, 1, True),
    "dp2xep2": (2, 1, 2, 1, False),  # the masked positions differ between the ranks: the loss is the global mean
}


@pytest.mark.parametrize("layout", DOCUMENT_LAYOUTS)
def test_document_masking_matches_single_process(layout):
    world, *args = DOCUMENT_LAYOUTS[layout]
    run_world(workers.document_equivalence, world, *args)
