"""Config plumbing: help, named errors with suggestions, precedence, the resolved config on disk."""

import json
from typing import Literal

import pytest
import yaml

from rcm_recipes.config import ConfigError, RecipeConfig, field_paths, resolve_config, write_config


class Net(RecipeConfig):
    dim: int = 32
    """Hidden width of the network."""
    heads: int = 2
    """Number of attention heads."""


class Optim(RecipeConfig):
    lr: float = 1e-3
    """Learning rate of AdamW."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule."""
    clip: bool = False
    """Clip the gradient norm."""


class Job(RecipeConfig):
    """A toy recipe config."""

    net: Net = Net()
    """The network."""
    optim: Optim = Optim()
    """The optimizer."""
    seed: int = 0
    """Random seed of everything."""
    sizes: list[int] = [1, 2]
    """Some sizes."""


PRESETS = {"small": Job(net=Net(dim=8, heads=1), seed=5)}


def test_help_lists_every_field_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        resolve_config(Job, ["--help"], presets=PRESETS, prog="job")
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for path in field_paths(Job):
        if path in ("net", "optim"):  # nested models: shown as option groups with their docstring
            continue
        assert f"--{path}" in text, path
    for doc in ["Hidden width of the network.", "Number of attention heads.", "Learning rate of AdamW.",
                "Learning-rate schedule.", "Clip the gradient norm.", "Random seed of everything.",
                "Some sizes.", "The network.", "The optimizer.", "small"]:
        assert doc in text, doc


def test_unknown_cli_field_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown field 'net\.dmi'.*did you mean 'net\.dim'"):
        resolve_config(Job, ["--net.dmi=3"])
    with pytest.raises(ConfigError, match=r"unknown field 'sed'.*did you mean 'seed'"):
        resolve_config(Job, ["--sed", "3"])
    with pytest.raises(ConfigError, match=r"unknown field 'net\.di'.*'net\.dim'"):  # no prefix matching
        resolve_config(Job, ["--net.di=3"])
    with pytest.raises(ConfigError, match="unexpected command-line argument 'stray'"):
        resolve_config(Job, ["stray"])


def test_unknown_file_field_names_it_the_file_and_suggests(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown field 'optim\.lrr' in --config .*bad\.yaml.*'optim\.lr'"):
        resolve_config(Job, ["--config", str(f)])


def test_type_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve_config(Job, ["--net.dim=abc", "--optim.schedule=linear"])
    msg = str(exc.value)
    assert "field 'net.dim'" in msg and "'abc'" in msg
    assert "field 'optim.schedule'" in msg and "'constant' or 'cosine'" in msg
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"seed": "x"}))
    with pytest.raises(ConfigError, match=r"field 'seed'.*valid integer"):
        resolve_config(Job, [f"--config={f}"])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"unknown preset 'smal'.*did you mean 'small'"):
        resolve_config(Job, ["--preset", "smal"], presets=PRESETS)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_precedence_defaults_preset_file_cli(tmp_path, suffix):
    f = tmp_path / f"job{suffix}"
    data = {"net": {"heads": 4}, "optim": {"lr": 0.5, "schedule": "cosine"}}
    f.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
    cfg = resolve_config(
        Job, ["--preset=small", "--config", str(f), "--optim.lr", "0.25", "--sizes=[7, 8]"], presets=PRESETS
    )
    assert cfg.net.dim == 8  # preset (file leaves it alone: nested mappings merge)
    assert cfg.net.heads == 4  # file over preset
    assert cfg.seed == 5  # preset over default
    assert cfg.optim.schedule == "cosine"  # file over default
    assert cfg.optim.lr == 0.25  # command line over file
    assert cfg.optim.clip is False  # default
    assert cfg.sizes == [7, 8]  # lists replace
    assert resolve_config(Job, []) == Job()


class Outer(RecipeConfig):
    net: Net = Net(dim=64)
    """A nested default that differs from the nested class's defaults."""


def test_partial_overrides_keep_the_recipes_nested_defaults(tmp_path):
    assert resolve_config(Outer, ["--net.heads=8"]).net == Net(dim=64, heads=8)
    f = tmp_path / "o.yaml"
    f.write_text("net:\n  heads: 3\n")
    assert resolve_config(Outer, ["--config", str(f)]).net == Net(dim=64, heads=3)


@pytest.mark.parametrize("name", ["resolved.yaml", "resolved.json"])
def test_resolved_config_is_written_and_reads_back(tmp_path, name):
    cfg = resolve_config(Job, ["--net.dim=48", "--optim.clip=true", "--seed", "9"])
    path = write_config(cfg, tmp_path / "out" / name)
    assert path.is_file()
    on_disk = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    assert on_disk["net"]["dim"] == 48 and on_disk["optim"]["clip"] is True and on_disk["seed"] == 9
    assert resolve_config(Job, ["--config", str(path)]) == cfg


def test_bad_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(Job, ["--config", str(tmp_path / "missing.yaml")])
    f = tmp_path / "job.toml"
    f.write_text("seed = 1\n")
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml or \.json"):
        resolve_config(Job, ["--config", str(f)])


def test_repeated_flag_later_value_replaces():
    """Before: argparse appended list flags ([1.5, 1.4, 1.0]); the docs promise the later value replaces."""
    assert resolve_config(Job, ["--sizes=[5]", "--sizes=[7,8]"]).sizes == [7, 8]
    assert resolve_config(Job, ["--sizes", "[5]", "--seed=1", "--sizes", "[9]", "--seed", "2"]).seed == 2
    assert resolve_config(Job, ["--sizes", "[5]", "--sizes", "[9]"]).sizes == [9]
    assert resolve_config(Job, ["--net.dim=8", "--net.dim=16"]).net.dim == 16


@pytest.mark.parametrize("name, text, where", [("c.yaml", "net: {dim: 3\nseed: [", "not valid YAML at line"),
                                                ("c.json", '{"seed": 1,}', "not valid JSON at line 1")])
def test_file_syntax_errors_name_the_file(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"'{path}' is {where}"):
        resolve_config(Job, ["--config", str(path)])


def _run(main, argv, monkeypatch, env=None):
    from rcm_recipes.config import run_main

    monkeypatch.setattr("sys.argv", ["prog.py", *argv])
    monkeypatch.delenv("RCM_DEBUG", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return run_main(main)


def test_run_main_prints_one_line_for_known_errors(monkeypatch, capsys, tmp_path):
    import errno
    import sys

    from rcm_train.safety import CheckpointError, NonFiniteError

    cases = [
        (lambda: resolve_config(Job), ["--seed=x"], 2, "prog.py: error: invalid configuration"),
        (lambda: open(tmp_path / "missing.txt"), [], 1, f"No such file or directory: '{tmp_path / 'missing.txt'}'"),
        (lambda: (_ for _ in ()).throw(NonFiniteError("the gradient norm (nan)", network="student", iteration=2)),
         [], 1, "non-finite value in the gradient norm (nan) (iteration 2, network 'student')"),
        (lambda: (_ for _ in ()).throw(CheckpointError("checkpoint /x/iter_1 is unreadable")), [], 1,
         "checkpoint /x/iter_1 is unreadable"),
        (lambda: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", "/ro/out")), [], 1,
         "Read-only file system: '/ro/out'"),
    ]
    for main, argv, code, text in cases:
        with pytest.raises(SystemExit) as exit_:
            _run(main, argv, monkeypatch)
        err = capsys.readouterr().err
        assert exit_.value.code == code and text in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    # Ctrl-C: one line, exit 130
    with pytest.raises(SystemExit) as exit_:
        _run(lambda: (_ for _ in ()).throw(KeyboardInterrupt("interrupted at iteration 3; a resume will use x")),
             [], monkeypatch)
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == \
        "prog.py: interrupted at iteration 3; a resume will use x"
    # --debug (removed from argv before main sees it) and RCM_DEBUG=1 let the exception through
    seen = []
    with pytest.raises(CheckpointError):
        _run(lambda: seen.append(list(sys.argv)) or (_ for _ in ()).throw(CheckpointError("x")), ["--debug"],
             monkeypatch)
    assert seen == [["prog.py"]]
    with pytest.raises(FileNotFoundError):
        _run(lambda: open(tmp_path / "missing.txt"), [], monkeypatch, env={"RCM_DEBUG": "1"})
    # unknown errors keep their traceback
    with pytest.raises(ZeroDivisionError):
        _run(lambda: 1 / 0, [], monkeypatch)


class Stage(RecipeConfig):
    name: str = "stage"
    """Stage name."""
    ode: bool = False
    """Regress onto the teacher's ODE."""
    weight: float | None = None
    """Loss weight."""


class Staged(RecipeConfig):
    """Staged toy recipe."""

    stage1: Stage = Stage(name="first", ode=True)
    """First stage."""
    stage2: Stage = Stage(name="second")
    """Second stage."""
    stage3: Stage = Stage(name="third", weight=2.0)
    """Third stage."""
    optim: Optim = Optim()
    """The optimizer."""


def test_bare_boolean_flags():
    """Before: ``--ode`` alone failed ('expected one argument')."""
    assert resolve_config(Staged, ["--stage2.ode"]).stage2.ode is True
    assert resolve_config(Staged, ["--no-stage1.ode"]).stage1.ode is False
    assert resolve_config(Staged, ["--stage1.ode=false"]).stage1.ode is False
    assert resolve_config(Staged, ["--stage1.ode", "false"]).stage1.ode is False
    cfg = resolve_config(Staged, ["--optim.clip", "--stage2.ode", "--stage3.name=x"])  # bare flag, then flags
    assert cfg.optim.clip is True and cfg.stage2.ode is True and cfg.stage3.name == "x"
    assert resolve_config(Staged, ["--stage2.ode", "--no-stage2.ode"]).stage2.ode is False  # later wins
    with pytest.raises(ConfigError, match=r"unknown field 'no-stage1\.name'"):  # --no- only for booleans
        resolve_config(Staged, ["--no-stage1.name"])
    with pytest.raises(ConfigError, match=r"field 'stage1\.name'"):  # a bare non-boolean still needs a value
        resolve_config(Staged, ["--stage1.name", "--stage2.ode"])


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        resolve_config(Staged, ["--print-config", "--stage2.ode", "--optim.lr=0.5"])
    assert exc.value.code == 0 and list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert data["stage2"]["ode"] is True and data["optim"]["lr"] == 0.5 and data["stage3"]["weight"] == 2.0
    (tmp_path / "printed.yaml").write_text(out)
    assert resolve_config(Staged, ["--config", "printed.yaml"]) == \
        resolve_config(Staged, ["--stage2.ode", "--optim.lr=0.5"])


def test_print_config_of_a_recipe_runs_nothing(tmp_path, capsys):
    import distill

    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        distill.main(["--preset=tiny-rcm", f"--output_dir={out_dir}", "--print-config"])
    assert exc.value.code == 0 and not out_dir.exists()
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == distill.PRESETS["tiny-rcm"].model_copy(update=dict(output_dir=str(out_dir))).model_dump(
        mode="json")


def test_help_lists_numbered_blocks_once(capsys):
    with pytest.raises(SystemExit) as exc:
        resolve_config(Staged, ["--help"], prog="staged")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "stage1 / stage2 / stage3: First stage. / Second stage. / Third stage." in text
    for leaf in ("name", "ode", "weight"):  # each stage field once, in brace form
        assert text.count(f"--stage{{1,2,3}}.{leaf} ") == 1, leaf
        assert f"--stage1.{leaf}" not in text and f"--stage2.{leaf}" not in text
    assert "(default: first | second | third)" in text  # defaults that differ: side by side, stage order
    assert "(default: true | false | false)" in text and "(default: None | None | 2.0)" in text
    assert "--optim.lr float" in text and "(default: 0.001)" in text  # unnumbered blocks as before
    assert "--print-config" in text and "--no-a.b" in text


@pytest.mark.parametrize("recipe, before", [("distill", 995), ("causal_distill", 1272)])
def test_recipe_help_is_concise(recipe, before, capsys):
    """Before (pydantic-settings' argparse help, 100 columns): distill 995 lines, causal_distill 1272."""
    import importlib

    module = importlib.import_module(recipe)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < before // 2, len(lines)
    assert max(map(len, lines)) <= 120
    assert sum("objective.loss_scale " in line for line in lines) == 1  # stage blocks listed once
    # sibling blocks of one class under other names too, in brace form, defaults side by side where they differ
    assert sum(".{student,fake_score,teacher}.sac " in line for line in lines) == 1
    assert not any("--parallel.student.sac " in line for line in lines)


@pytest.mark.parametrize("recipe", ["distill", "causal_distill"])
def test_every_preset_is_a_yaml_that_config_reads(recipe):
    import importlib

    from rcm_recipes.config import CONFIGS

    module = importlib.import_module(recipe)
    files = sorted((CONFIGS / recipe).glob("*.yaml"))
    assert sorted(module.PRESETS) == sorted(f.stem for f in files) and files
    for f in files:
        preset = module.PRESETS[f.stem]
        assert resolve_config(type(preset), ["--config", str(f)]) == preset, f.name
