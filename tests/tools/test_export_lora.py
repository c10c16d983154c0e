"""rcm-export-lora: LoRA of (student - teacher) in the ComfyUI / diffusers Wan layout.

The reference for the reconstruction is independent of the tool: the LoRA file is merged back the way
ComfyUI applies it (``W + alpha / rank * up @ down``, ``+ diff``, ``+ diff_b``) in float64 and compared with
the student; the optimal error of each rank comes from float64 singular values computed here.
"""

import math

import pytest
import torch
from safetensors import safe_open

from rcm_nets.wan import WanDiT
from rcm_pipelines.tools import ckpt_io, export_lora

PREFIX = "diffusion_model."


@pytest.fixture(scope="module")
def pair():
    """Teacher (tiny DiT) and a student = teacher + (rank-3 + small full-rank) deltas on the matrices, small
    deltas on the other tensors; ``head.modulation`` left unchanged."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = WanDiT.from_config("tiny")
    net.init_weights(generator=g)
    teacher = {k: v.clone() for k, v in net.state_dict().items()}
    student = {}
    for k, v in teacher.items():
        if k == "head.modulation":
            student[k] = v.clone()
        elif v.dim() == 2 and k.endswith(".weight"):
            a, b = torch.randn(v.shape[0], 3, generator=g), torch.randn(3, v.shape[1], generator=g)
            student[k] = v + 0.1 * a @ b + 0.01 * torch.randn(v.shape, generator=g)
        else:
            student[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    return student, teacher


def _merge(teacher, lora):
    """ComfyUI's merge, in float64 (scale ``alpha / rank``, 1 without an ``.alpha`` key)."""
    merged = {k: v.double() for k, v in teacher.items()}
    for key, value in lora.items():
        assert key.startswith(PREFIX)
        key = key[len(PREFIX):]
        if key.endswith(".lora_up.weight"):
            base = key[: -len(".lora_up.weight")]
            down = lora[PREFIX + base + ".lora_down.weight"].double()
            alpha_key = PREFIX + base + ".alpha"
            scale = lora[alpha_key].item() / down.shape[0] if alpha_key in lora else 1.0
            merged[base + ".weight"] += scale * value.double() @ down
        elif key.endswith(".diff_b"):
            merged[key[: -len(".diff_b")] + ".bias"] += value.double()
        elif key.endswith(".diff"):
            base = key[: -len(".diff")]
            merged[base + ".weight" if base + ".weight" in merged else base] += value.double()
    return merged


def _rel(merged: dict, student: dict, teacher: dict, keys) -> float:
    """||merged - student|| / ||student - teacher|| over ``keys`` (Frobenius, float64)."""
    num = sum(float((merged[k] - student[k].double()).square().sum()) for k in keys)
    den = sum(float((student[k].double() - teacher[k].double()).square().sum()) for k in keys)
    return math.sqrt(num / den)


def test_error_decreases_with_rank_and_is_exact_at_full_rank(pair):
    student, teacher = pair
    mats = [k for k, v in teacher.items() if v.dim() == 2 and k.endswith(".weight")]
    ranks = [1, 2, 3, 4, 16, 64]  # 64 = the smallest side of every tiny matrix
    sv = [torch.linalg.svdvals((student[k] - teacher[k]).double()) for k in mats]
    errors = []
    for r in ranks:
        res = export_lora.lora_from_delta(student, teacher, r, dtype=torch.float32)
        merged = _merge(teacher, res.state_dict)
        err = _rel(merged, student, teacher, mats)  # independent: merged LoRA vs the student, low-rank layers only
        assert res.lowrank_error == pytest.approx(err, rel=1e-4, abs=1e-7)
        # optimal truncation error from float64 singular values (Eckart-Young)
        opt = math.sqrt(sum(float(s[r:].square().sum()) for s in sv) / sum(float(s.square().sum()) for s in sv))
        assert err == pytest.approx(opt, rel=1e-3, abs=1e-6)
        assert res.errors_by_rank[r] == pytest.approx(opt, rel=1e-3, abs=1e-6)
        errors.append(err)
        if r == 64:  # full rank: exact up to float32 SVD / storage rounding
            others = [k for k in teacher if k not in mats]
            assert all(float((merged[k] - student[k].double()).abs().max()) < 1e-6 for k in others)
            assert err < 1e-6
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[2] < 0.3 * errors[1]  # the delta is rank 3 plus small noise: rank 3 captures most of it


def test_layout(pair):
    student, teacher = pair
    sd = export_lora.lora_from_delta(student, teacher, 4).state_dict
    assert all(k.startswith(PREFIX) for k in sd)
    assert sd[PREFIX + "blocks.0.self_attn.q.lora_up.weight"].shape == (64, 4)
    assert sd[PREFIX + "blocks.0.ffn.0.lora_down.weight"].shape == (4, 64)
    assert not any(k.endswith(".alpha") for k in sd)  # scale 1 without alpha (diffusers refuses alpha on head.head)
    with_alpha = export_lora.lora_from_delta(student, teacher, 4, alpha=True, dtype=torch.float32).state_dict
    assert with_alpha[PREFIX + "blocks.1.cross_attn.o.alpha"].item() == 4.0
    assert sd[PREFIX + "blocks.0.ffn.0.lora_up.weight"].dtype == torch.bfloat16  # default storage dtype
    assert PREFIX + "blocks.0.self_attn.q.diff_b" in sd  # Linear biases
    assert PREFIX + "blocks.0.norm3.diff" in sd and PREFIX + "blocks.0.modulation.diff" in sd
    assert PREFIX + "patch_embedding.diff" in sd  # the Conv3d weight goes as an exact diff
    assert not any("head.modulation" in k for k in sd)  # unchanged tensors produce no key
    bases = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}
    for b in bases:
        assert {b + ".lora_up.weight", b + ".lora_down.weight", b + ".alpha"} <= set(with_alpha)
    # the alpha file merges to the same network (ComfyUI's rule: alpha / rank = 1)
    merged, merged_alpha = _merge(teacher, export_lora.lora_from_delta(student, teacher, 4, dtype=torch.float32)
                                  .state_dict), _merge(teacher, with_alpha)
    assert all(torch.equal(merged[k], merged_alpha[k]) for k in merged)
    no_diff = export_lora.lora_from_delta(student, teacher, 4, diffs=False)
    assert not any(k.endswith((".diff", ".diff_b")) for k in no_diff.state_dict)
    assert no_diff.total_error > no_diff.lowrank_error  # the missing diffs count as error


def test_cli_writes_file_with_metadata(tmp_path, pair, capsys):
    student, teacher = pair
    s = ckpt_io.write({f"net_ema.{k}": v for k, v in student.items()}, tmp_path / "student.pth")  # wrapper prefix
    t = ckpt_io.write(teacher, tmp_path / "teacher.safetensors")
    out = tmp_path / "lora.safetensors"
    assert export_lora.main(["--student", str(s), "--teacher", str(t), "--out", str(out), "--rank", "8",
                             "--report_ranks", "2,64", "--dtype", "float32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "relative reconstruction error" in text and "rank    64" in text
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["rank"] == "8" and float(meta["lowrank_relative_error"]) > 0
        assert f.get_tensor(PREFIX + "blocks.0.self_attn.k.lora_up.weight").shape == (64, 8)


def test_errors(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="identical"):
        export_lora.lora_from_delta(teacher, teacher, 4)
    with pytest.raises(ValueError, match="identical"):  # a bf16 copy: the teacher's rounding is not a delta
        export_lora.lora_from_delta({k: v.bfloat16() for k, v in teacher.items()}, teacher, 4)
    with pytest.raises(KeyError, match="only in teacher"):
        export_lora.lora_from_delta({k: v for k, v in student.items() if k != "head.head.bias"}, teacher, 4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        export_lora.lora_from_delta(student, teacher, 0)


def test_diffs_modes(pair):
    """--diffs all / diffusers / none: which exact deltas are written and the errors each reports."""
    student, teacher = pair
    full = export_lora.lora_from_delta(student, teacher, 64, dtype=torch.float32)
    only = export_lora.lora_from_delta(student, teacher, 64, dtype=torch.float32, diffs="diffusers")
    none = export_lora.lora_from_delta(student, teacher, 64, dtype=torch.float32, diffs="none")
    linear_bias = {k for k, v in teacher.items() if k.endswith(".bias") and teacher[k[:-5] + ".weight"].dim() == 2}
    skipped = {k for k in teacher if k not in linear_bias and teacher[k].dim() != 2 and k != "head.modulation"}
    assert {PREFIX + export_lora._diff_key(k) for k in skipped} == set(full.diffusers_skipped)
    assert any("modulation" in k for k in full.diffusers_skipped) and PREFIX + "patch_embedding.diff" in full.state_dict
    diff_keys = {k for k in only.state_dict if k.endswith((".diff", ".diff_b"))}
    assert diff_keys == {PREFIX + k[:-5] + ".diff_b" for k in linear_bias} and not only.diffusers_skipped
    assert not any(k.endswith((".diff", ".diff_b")) for k in none.state_dict)
    # independent: the fraction of the delta (float64) in the tensors diffusers skips
    sq = lambda keys: sum(float((student[k].double() - teacher[k].double()).square().sum()) for k in keys)
    frac = math.sqrt(sq(skipped) / sq(teacher))
    assert full.total_error < 1e-6 and full.diffusers_error == pytest.approx(frac, rel=1e-4)
    assert only.total_error == pytest.approx(frac, rel=1e-4) == only.diffusers_error
    assert none.total_error == pytest.approx(math.sqrt(sq(skipped | linear_bias) / sq(teacher)), rel=1e-4)
    with pytest.raises(ValueError, match="diffs must be one of"):
        export_lora.lora_from_delta(student, teacher, 4, diffs="some")


def test_bias_only_linear_gets_zero_pair(pair):
    """A Linear whose bias changed but whose weight did not: its .diff_b comes with a zero rank-1 pair."""
    student, teacher = pair
    student = {**student, "text_embedding.0.weight": teacher["text_embedding.0.weight"]}
    sd = export_lora.lora_from_delta(student, teacher, 4, dtype=torch.float32).state_dict
    up, down = sd[PREFIX + "text_embedding.0.lora_up.weight"], sd[PREFIX + "text_embedding.0.lora_down.weight"]
    assert up.shape == (64, 1) and down.shape == (1, 32) and not up.any() and not down.any()
    assert PREFIX + "text_embedding.0.diff_b" in sd
