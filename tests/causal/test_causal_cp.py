"""Ulysses context parallel in causal training: 2 gloo ranks (CP = 2, FSDP over them) vs one process, on the
closures of ``rcm_train.objectives.causal`` with tiny WanDiTs (``_causal_cp_worker.py`` runs both sides in each
rank; the unparallelized copies are the reference).

* the masked teacher-forcing pass: TF-sCM (primal + tangents through ``forward_jvp``; also with the student
  activation-checkpointed), TF-dCM and the causal teacher's flow matching, and the block-causal pass (diffusion
  forcing, ODE regression), float64: loss to 1e-12 and every parameter gradient to 1e-10 relative (the
  exchanges only move numbers; measured ~1e-14);
* the cached self-forcing rollout with head-sharded k/v in the KV cache (``WanDiT.local_heads``): DMD (plain,
  activation-checkpointed, replayed backprop with noisy context) and the critic, float32 (the cache stores at most float32): loss
  and gradients to 1e-5 relative (per-rank partial gradients summed by FSDP in another order; measured ~4e-7);
* the TF-sCM pass through the fused Triton masked JVP attention kernel (``TRITON_INTERPRET=1`` on CPU), float32.

9 tokens per latent frame: every cached block (9 or 18 tokens) is padded on 2 ranks, so the CP size is bound
by the head count only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TF = ["tf_scm", "tf_dcm", "flow_tf", "tf_scm_sac", "flow_df", "ode"]
SF = ["sf_dmd", "sf_dmd_replay", "sf_dmd_sac", "critic"]


def _run_ranks(out: Path, checks: list[str], **env) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    logs = [open(out / f"log{r}.txt", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "_causal_cp_worker.py"), str(r), "2", str(out / "rdv"),
                               str(out), ",".join(checks)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            log.close()
    assert not any(codes), "\n".join((out / f"log{r}.txt").read_text()[-3000:] for r in range(2))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory.mktemp("causal_cp"), TF + SF)


def _check(results: list[dict], name: str, loss_tol: float, grad_tol: float, cache_heads: list[int]):
    for rank, res in enumerate(results):
        r = res[name]
        assert r["loss"] <= loss_tol and r["grad"] <= grad_tol, f"rank {rank} {name}: {r}"
        assert r["cp_seam"] == "UlyssesSequenceShard" and r["cache_heads"] == cache_heads, (rank, name, r)


@pytest.mark.slow
@pytest.mark.parametrize("name", TF)
def test_teacher_forcing_pass_under_cp_matches_one_process(cp_results, name):
    _check(cp_results, name, 1e-12, 1e-10, [])


@pytest.mark.slow
@pytest.mark.parametrize("name", SF)
def test_cached_rollout_under_cp_matches_one_process(cp_results, name):
    _check(cp_results, name, 1e-5, 1e-5, [2])  # tiny: 4 heads, 2 per rank in the cache


@pytest.mark.slow
def test_tf_scm_through_the_fused_jvp_kernel_under_cp(tmp_path):
    """Interpreted Triton on CPU (minutes on a busy machine); float32 tolerances as the rollout."""
    results = _run_ranks(tmp_path, ["tf_scm_triton"], TRITON_INTERPRET="1")
    _check(results, "tf_scm_triton", 1e-5, 1e-5, [])
