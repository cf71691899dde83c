"""Pipeline parallelism (1F1B, gating residual carried between stages) against the single-process model."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

CASES = {
    # name: (world, pp, tp, ep, num_layers, every_n_layers, pp_layers, vanilla)
    "pp2": (2, 2, 1, 1, 4, 1, None, False),
    "pp2xep2": (4, 2, 1, 2, 4, 1, None, False),
    # MoE at layers 0, 2, 4; boundaries MoE|dense, MoE|dense, dense|MoE; uneven 1/2/1/2 split.
    "pp4-uneven-dense-moe-boundaries": (4, 4, 1, 1, 6, 2, [1, 2, 1, 2], False),
    "pp2xtp2": (4, 2, 2, 1, 4, 2, [2, 2], False),
    "pp2-vanilla-no-residual": (2, 2, 1, 1, 4, 1, [3, 1], True),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_single_process(case):
    world, *args = CASES[case]
    run_world(workers.pipeline_equivalence, world, *args)


def test_compiled_blocks_under_pp2_match_the_eager_single_process_model():
    # train.compile composes with pipeline parallelism: each stage compiles the blocks it keeps. aot_eager as in
    # tests/distributed/test_equivalence.py.
    run_world(workers.pipeline_equivalence, 2, 2, 1, 1, 4, 1, None, False, "aot_eager")


def test_document_masking_across_pipeline_stages_matches_single_process():
    """Every stage builds the document mask and positions from its own copy of the micro-batch's tokens."""
    run_world(workers.document_equivalence, 2, 1, 1, 2, False)
