"""rcm-export-lora files through diffusers' own Wan LoRA loading.

``WanPipeline.lora_state_dict`` (diffusers' conversion of the ``diffusion_model.*`` layout) must accept the file
as it is; its output (``transformer.<module>.lora_A/lora_B[.bias]``) is applied to a diffusers
``WanTransformer3DModel`` holding the teacher the way PEFT applies a LoRA layer of scale 1
(``W += B @ A``, ``b += lora_B.bias``), and the velocity is compared with our ``WanDiT`` holding the reference
weights in float32 (atol 1e-5; the low-rank factors are stored in float32). When peft is installed,
``load_lora_adapter`` (what ``load_lora_weights`` calls) is checked too.
"""

import pytest
import torch

from rcm_nets.wan import WanDiT
from rcm_nets.wan import diffusers_format as dfm
from rcm_pipelines.tools import ckpt_io, export_lora

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
FULL = 1280  # the largest side of any tiny matrix (the i2v image projection is 1280 x 1280): exact LoRA


def _random(name: str, seed: int) -> dict[str, torch.Tensor]:
    net = WanDiT.from_config(name)
    g = torch.Generator().manual_seed(seed)
    return {k: (1.0 if "norm" in k or k.startswith(("img_emb.proj.0", "img_emb.proj.4")) else 0.0)
            + torch.randn(v.shape, generator=g) * (0.1 if v.dim() == 1 else 0.05) for k, v in net.state_dict().items()}


def _pair(name: str):
    """Teacher and a student that differs from it in every tensor."""
    teacher = _random(name, 0)
    g = torch.Generator().manual_seed(1)
    student = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    return student, teacher


def _ours(name: str, sd: dict):
    net = WanDiT.from_config(name)
    net.load_state_dict(sd)
    return net


def _diffusers_with_lora(teacher: dict, lora: dict, cfg):
    """diffusers' model of the teacher with diffusers' conversion of ``lora`` applied at scale 1."""
    model = diffusers.WanTransformer3DModel.from_config(dfm.config_to_diffusers(cfg))
    model.load_state_dict(dfm.state_dict_to_diffusers(teacher), strict=True)
    converted = diffusers.WanPipeline.lora_state_dict(lora)
    assert converted and all(k.startswith("transformer.") for k in converted)
    with torch.no_grad():
        for key in [k for k in converted if k.endswith(".lora_A.weight")]:
            path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            layer = model.get_submodule(path)  # a real Linear of the model (raises when the name is wrong)
            assert isinstance(layer, torch.nn.Linear), path
            a, b = converted[key].float(), converted[key.replace("lora_A", "lora_B")].float()
            layer.weight += b @ a
            bias = converted.get(key.replace("lora_A.weight", "lora_B.bias"))
            if bias is not None:
                layer.bias += bias.float()
        n = sum(k.endswith(".lora_A.weight") for k in converted)
        assert n == sum(k.endswith(".lora_B.weight") for k in converted)
    return model.eval()


@torch.no_grad()
def _compare(net: WanDiT, model, cfg) -> float:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, cfg.out_dim, 2, 4, 4, generator=g)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    ours, theirs = dict(), dict()
    xin = x
    if cfg.model_type == "i2v":
        y, clip = torch.randn(1, cfg.in_dim - cfg.out_dim, 2, 4, 4, generator=g), torch.randn(1, 257, 1280, generator=g)
        ours, theirs, xin = dict(y=y, clip_fea=clip), dict(encoder_hidden_states_image=clip), torch.cat([x, y], 1)
    a = net(x, t, ctx, **ours)
    b = model(xin, t, ctx, return_dict=False, **theirs)[0]
    return float((a - b).abs().max())


def _linear_only(student: dict, teacher: dict) -> dict:
    """The teacher with the student's Linear weights and biases: what diffusers can apply of the student."""
    linear = {k for k, v in teacher.items() if v.dim() == 2}
    linear |= {k.removesuffix(".weight") + ".bias" for k in linear}
    return {k: student[k] if k in linear else v for k, v in teacher.items()}


@pytest.mark.parametrize("name", ["tiny", pytest.param("tiny-i2v", marks=pytest.mark.slow)])  # i2v: SVD of 1280^2
@pytest.mark.parametrize("diffs", ["all", "diffusers"])
def test_full_rank_lora_in_diffusers_equals_student_linear_part(tmp_path, name, diffs):
    student, teacher = _pair(name)
    res = export_lora.lora_from_delta(student, teacher, FULL, dtype=torch.float32, diffs=diffs)
    path = ckpt_io.write(res.state_dict, tmp_path / "lora.safetensors")
    net = _ours(name, _linear_only(student, teacher))
    model = _diffusers_with_lora(teacher, str(path), net.config)  # the file, read by diffusers
    assert _compare(net, model, net.config) < ATOL
    # can fail: the full student (modulation, norms, patch embedding changed too) is not what diffusers gets
    assert _compare(_ours(name, student), model, net.config) > 10 * ATOL
    assert (len(res.diffusers_skipped) > 0) == (diffs == "all")


def test_low_rank_lora_matches_our_merge(tmp_path):
    """Rank 4 (lossy): diffusers' result equals our WanDiT with the same LoRA merged in float64."""
    student, teacher = _pair("tiny")
    sd = export_lora.lora_from_delta(student, teacher, 4, dtype=torch.float32, diffs="diffusers").state_dict
    merged = dict(teacher)
    for key, up in sd.items():
        base = key.removeprefix(export_lora.LORA_PREFIX)
        if base.endswith(".lora_up.weight"):
            m = base.removesuffix(".lora_up.weight")
            down = sd[key.replace("lora_up", "lora_down")]
            merged[m + ".weight"] = (teacher[m + ".weight"].double() + up.double() @ down.double()).float()
        elif base.endswith(".diff_b"):
            m = base.removesuffix(".diff_b")
            merged[m + ".bias"] = teacher[m + ".bias"] + up
    net = _ours("tiny", merged)
    model = _diffusers_with_lora(teacher, sd, net.config)
    assert _compare(net, model, net.config) < ATOL
    assert _compare(_ours("tiny", _linear_only(student, teacher)), model, net.config) > 10 * ATOL  # rank 4 is lossy


def test_alpha_keys_are_refused_by_diffusers():
    """Why ``--alpha`` is off by default: diffusers' Wan converter leaves ``head.head.alpha`` unconsumed. Without
    it every ``--diffs`` choice is accepted (the issue's file failed with and without diffs)."""
    student, teacher = _pair("tiny")
    for diffs in export_lora.DIFFS:
        converted = diffusers.WanPipeline.lora_state_dict(export_lora.lora_from_delta(student, teacher, 4,
                                                                                      diffs=diffs).state_dict)
        assert "transformer.proj_out.lora_A.weight" in converted
        assert ("transformer.proj_out.lora_B.bias" in converted) == (diffs != "none")
    sd = export_lora.lora_from_delta(student, teacher, 4, alpha=True).state_dict
    with pytest.raises(ValueError, match="head.head.alpha"):
        diffusers.WanPipeline.lora_state_dict(sd)


def test_load_lora_adapter_with_peft(tmp_path):
    """diffusers' PEFT path (``load_lora_weights`` calls ``load_lora_adapter``), where peft is installed."""
    pytest.importorskip("peft")
    student, teacher = _pair("tiny")
    res = export_lora.lora_from_delta(student, teacher, 64, dtype=torch.float32, diffs="diffusers")
    model = diffusers.WanTransformer3DModel.from_config(dfm.config_to_diffusers(_ours("tiny", teacher).config))
    model.load_state_dict(dfm.state_dict_to_diffusers(teacher), strict=True)
    model.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(res.state_dict), prefix="transformer")
    net = _ours("tiny", _linear_only(student, teacher))
    assert _compare(net, model.eval(), net.config) < ATOL


def test_diffusers_folder_student(tmp_path):
    """A student stored as a diffusers folder gives the same LoRA as the same student with official keys."""
    student, teacher = _pair("tiny")
    ckpt_io.write(dfm.state_dict_to_diffusers(student), tmp_path / dfm.DIFFUSERS_WEIGHTS)
    t = ckpt_io.write(teacher, tmp_path / "teacher.pth")
    res = export_lora.export_lora(tmp_path, t, tmp_path / "lora.safetensors", 4, dtype=torch.float32)
    ref = export_lora.lora_from_delta(student, teacher, 4, dtype=torch.float32)
    assert res.state_dict.keys() == ref.state_dict.keys()
    assert all(torch.equal(res.state_dict[k], v) for k, v in ref.state_dict.items())
