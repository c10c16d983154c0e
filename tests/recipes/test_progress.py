"""The recipes' progress logger."""

from rcm_recipes.progress import ProgressLogger


def test_progress_logger_records_curves():
    log = ProgressLogger("x", 3, disable=True)
    log.start(0, 3)
    for it in (1, 2, 3):
        log.log(it, {"scm/loss": float(it), "grad_norm/student": 1.0, "dmd/loss": float("nan")})
    log.close()
    assert log.curves == {"scm/loss": ([1, 2, 3], [1.0, 2.0, 3.0])}
