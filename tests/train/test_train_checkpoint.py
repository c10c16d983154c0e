"""Checkpoints: exact resume in a fresh process, crash safety of saves (exception and SIGKILL), export of
weights with the module's own key names, pruning and bad-input errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_resume import PARTS, run, tiny_teacher, write_data

from rcm_train.checkpoint import Checkpointer, ModelState, export_part, load_part, save_weights

HERE = Path(__file__).parent


def subprocess_env() -> dict[str, str]:
    """The environment of worker processes (one thread each; tests/train/conftest.py has the same helper, but
    `conftest` is ambiguous when tests/train runs together with other test directories)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["iteration"]] = {k: v for k, v in rec.items() if k not in ("time", "it_per_s")}
    return out


@pytest.mark.slow
def test_resume_in_fresh_process_is_bitwise_and_killed_save_is_harmless(tmp_path):
    """6 iterations straight vs 3 + checkpoint + a new process that resumes and runs 3 more (student sCM,
    student sCM + DMD and critic phases, EMA, LR warmup, a 1-worker webdataset loader): identical losses and
    identical weights, EMA and optimizer states, bit for bit. The new process then starts one more save
    and is SIGKILLed inside it: `latest` still names iteration 6, which loads."""
    data = tmp_path / "data"
    write_data(data)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, data, 6)
    run(resumed, data, 3)
    assert Checkpointer(resumed / "ckpt").latest_iteration() == 3
    proc = subprocess.run([sys.executable, str(HERE / "_train_resume.py"), str(resumed), str(data), "6",
                           "--kill-next-save"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [1, 2, 3, 4, 5, 6]
    assert {"scm/loss", "dmd/loss"} <= set(a[3]) and "critic/loss" in a[4]  # all phases were exercised
    for it in range(1, 7):
        assert a[it] == b[it], f"iteration {it}: {a[it]} != {b[it]}"

    ck_a, ck_b = Checkpointer(straight / "ckpt"), Checkpointer(resumed / "ckpt")
    assert ck_b.latest() == resumed / "ckpt" / "iter_000000006"  # the killed save of 7 did not move latest
    assert (resumed / "ckpt" / "iter_000000007.partial").is_dir()
    for part in PARTS:
        sa, sb = load_part(ck_a.latest(), part), load_part(ck_b.latest(), part)
        assert sa.keys() == sb.keys() and sa, part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs"
    # the training really moved the weights away from the teacher
    teacher = tiny_teacher().state_dict()
    assert not torch.equal(load_part(ck_b.latest(), "student")["blocks.0.ffn.0.weight"], teacher["blocks.0.ffn.0.weight"])


def _small_state():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return m, {"net": ModelState(m)}


def test_exception_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    m, state = _small_state()
    ck = Checkpointer(tmp_path)
    ck.save(1, state)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m[0].weight.add_(1)

    def boom(self, *a, **k):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(FileSystemWriter, "finish", boom)
        with pytest.raises(BaseException) as err:  # DCP wraps it in a CheckpointException (a BaseException)
            ck.save(2, state)
        assert "disk full (simulated)" in repr(err.value) + str(err.value)
    assert (tmp_path / "latest").read_text() == "iter_000000001" and ck.latest_iteration() == 1
    assert (tmp_path / "iter_000000002.partial").exists() and not (tmp_path / "iter_000000002").exists()
    with pytest.raises(ValueError, match="incomplete save"):
        ck.load(state, tmp_path / "iter_000000002.partial")
    ck.load(state)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())
    ck.save(2, state)  # a later save at the same iteration replaces the partial directory
    assert ck.latest_iteration() == 2 and not (tmp_path / "iter_000000002.partial").exists()


def test_async_save_and_keep_last(tmp_path):
    m, state = _small_state()
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True)
    values = []
    for it in (1, 2, 3):
        ck.save(it, state)
        values.append({k: v.clone() for k, v in m.state_dict().items()})
        with torch.no_grad():
            m[0].weight.add_(1.0)  # after save() returned: must not reach the checkpoint
    ck.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000000002", "iter_000000003", "latest"]
    ck.load(state)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in values[2].items())


def test_export_official_keys(tmp_path):
    net = tiny_teacher()
    ck = Checkpointer(tmp_path / "ckpt")
    ck.save(5, {"student_ema": ModelState(net)})
    names = list(net.state_dict())
    for suffix in (".safetensors", ".pth"):
        out = tmp_path / f"ema{suffix}"
        export_part(ck.latest(), "student_ema", out)
        if suffix == ".pth":
            sd = torch.load(out, weights_only=True)
        else:
            from safetensors.torch import load_file

            sd = load_file(out)
        assert sorted(sd) == sorted(names)
        assert all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], net.state_dict()[k].bfloat16()) for k in names)
        fresh = tiny_teacher(seed=3)
        fresh.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    with pytest.raises(KeyError, match=r"no part 'ema'; parts: \['student_ema'\]"):
        load_part(ck.latest(), "ema")
    with pytest.raises(ValueError, match="unknown weight file type '.bin'"):
        save_weights({}, tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "empty").load({"x": ModelState(net)})


# ------------------------------------------------------------------------------------------ reliability
class _Payload:
    """Unpickling it would run a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """Before: TrainState.load_state_dict called pickle.loads on the RNG state and DCP's default planner
    torch.load-ed byte items with weights_only=False: both executed the payload."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from rcm_train.safety import UnsafeCheckpointError
    from rcm_train.trainer import TrainState

    marker = tmp_path / "pwned"
    good = TrainState(iteration=1).state_dict()
    ck = Checkpointer(tmp_path / "ckpt")
    ck.save(1, {"trainer": TrainState(iteration=1)})
    # 1. a byte item (the iteration) holding a pickled object
    dcp.save({"trainer": {**good, "iteration": _Payload(marker)}}, checkpoint_id=tmp_path / "ckpt" / "iter_000000002",
             no_dist=True)
    (tmp_path / "ckpt" / "latest").write_text("iter_000000002")
    with pytest.raises(UnsafeCheckpointError, match=r"iter_000000002: item 'trainer.iteration' is not a plain value"):
        ck.load({"trainer": TrainState()})
    # 2. the metadata file itself
    meta = tmp_path / "ckpt" / "iter_000000002" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"metadata .*iter_000000002/.metadata holds a pickled object"):
        ck.load({"trainer": TrainState()})
    with pytest.raises(UnsafeCheckpointError):
        load_part(tmp_path / "ckpt" / "iter_000000002", "trainer")
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Payload(marker))) == 0 and marker.exists()  # the payload is live


def test_corrupt_or_missing_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    """Before: a truncated __0_0.distcp gave a bare EOFError naming no file; a latest naming a deleted
    directory had no fallback."""
    import shutil

    from rcm_train.safety import CheckpointError

    m, state = _small_state()
    ck = Checkpointer(tmp_path)
    ck.save(1, state)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m[0].weight.add_(1)
    ck.save(2, state)
    ck.save(3, state)
    data = tmp_path / "iter_000000003" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])  # truncated
    shutil.rmtree(tmp_path / "iter_000000002")
    with pytest.warns(UserWarning, match=r"iter_000000003 is unreadable \(truncated or corrupt\?\).*falling back "
                                         r"to .*iter_000000001"):
        assert ck.load(state) == tmp_path / "iter_000000001"
    assert all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(CheckpointError, match=r"checkpoint .*iter_000000003 is unreadable"):
        ck.load(state, tmp_path / "iter_000000003")
    (tmp_path / "latest").write_text("iter_000000009")  # names a deleted directory
    shutil.rmtree(tmp_path / "iter_000000003")
    with pytest.warns(UserWarning, match=r"latest names iter_000000009, which is not a complete checkpoint: using "
                                         r".*iter_000000001"):
        assert ck.latest_iteration() == 1
    (tmp_path / "latest").unlink()
    with pytest.warns(UserWarning, match="latest is missing"):
        assert ck.latest() == tmp_path / "iter_000000001"
    shutil.rmtree(tmp_path / "iter_000000001")
    assert ck.latest() is None


def test_full_disk_is_named_and_latest_is_kept(tmp_path, monkeypatch):
    """Before: a full disk during a save said 'unexpected pos 704 vs 598'."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    from rcm_train.safety import CheckpointError

    m, state = _small_state()
    ck = Checkpointer(tmp_path)
    ck.save(1, state)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError, match=r"no space left on device \(ENOSPC\) while writing checkpoint "
                                              r".*iter_000000002.partial"):
        ck.save(2, state)
    assert ck.latest_iteration() == 1


def test_non_finite_weights_in_a_loaded_checkpoint_are_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from rcm_train.safety import NonFiniteError

    m, state = _small_state()
    sd = {f"net.{k}": v.clone() for k, v in m.state_dict().items()}
    sd["net.1.bias"][0] = float("nan")
    dcp.save(sd, checkpoint_id=tmp_path / "iter_000000001", no_dist=True)
    (tmp_path / "latest").write_text("iter_000000001")
    with pytest.raises(NonFiniteError, match=r"parameter '1.bias' \(network 'net loaded from .*iter_000000001'\)"):
        Checkpointer(tmp_path).load(state)
    with pytest.raises(NonFiniteError, match=r"weight '1.bias' \(part 'net' of checkpoint"):
        load_part(tmp_path / "iter_000000001", "net")
