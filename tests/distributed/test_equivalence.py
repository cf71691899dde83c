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


def test_compiled_blocks_under_ep2_match_the_eager_single_process_model():
    # train.compile composes with expert parallelism: the all-to-all dispatcher runs in the eager section of each
    # compiled MoE block. One optimizer step after the forward/backward comparison (inductor's compile is the cost).
    run_world(workers.equivalence, 2, 1, 2, None, 1, False, "inductor")


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
