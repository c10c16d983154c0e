"""Distributed parity (2 gloo ranks vs one process): FSDP2, HSDP, AdamW on DTensors, SAC inside FSDP,
bf16 compute with fp32 master weights, mesh shapes, Ulysses CP (attention, tangents, gradients, padding,
masks, the real WanDiT), CP randomness broadcast, DCP save/load/async/export under FSDP.

The checks and their tolerances (with the reason next to each) live in ``_train_dist_worker.py``; each
returns the worst error it measured and whether it is within tolerance on that rank.
"""

import pytest

CHECKS = ["fsdp_parity", "hsdp_parity", "fsdp_adamw_float64", "fsdp_sac_parity", "fsdp_bf16_master_weights",
          "mesh_shapes", "broadcast_randomness", "ulysses_attention", "ulysses_heads_error", "cp_tiny_dit",
          "cp_wan_dit", "dcp_roundtrip"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_two_ranks_match_one_process(dist_results, name):
    for rank, results in enumerate(dist_results):
        assert name in results, f"check {name} did not run on rank {rank}"
        r = results[name]
        assert r["ok"], f"rank {rank} {name}: worst error {r['err']}\n{r['detail']}"


def test_every_check_is_listed(dist_results):
    assert sorted(dist_results[0]) == sorted(CHECKS)
