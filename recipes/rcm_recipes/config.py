"""Recipe configuration: pydantic models resolved from defaults <- preset <- file <- command line.

A recipe declares one `RecipeConfig` subclass (nested `RecipeConfig` models for its components, one
attribute docstring per field) and calls `parse_config(Cls, presets=...)` in its `main()`:

    defaults (the class, or the model named by ``--preset NAME``)
      <- ``--config file.yaml|json`` (nested mappings merge; other values replace)
      <- ``--a.b=value`` / ``--a.b value`` overrides (same merge rule)

A flag given twice keeps its later value (``--mid_t=[1.5] --mid_t=[1.4,1.0]`` gives ``[1.4, 1.0]``).
A boolean field is also a bare flag: ``--ode`` sets it, ``--no-ode`` clears it (``--ode=false`` works too).
``--print-config`` prints the resolved config as YAML (what ``--config`` reads back) and exits 0 before the
recipe runs or writes anything. `--help` lists every field once with its type, docstring and default;
sibling blocks of one model are listed once, numbered ones (``stage1``, ``stage2``, ...) as ``--stage{1,2}.name``,
others as ``--parallel.{student,teacher}.sac``, with their defaults side by side. Unknown names and wrong types raise `ConfigError` naming the dotted
field and, for unknown names, the closest valid one (difflib).

Why a thin layer over pydantic-settings rather than `CliApp.run`: the library turns an unknown flag into
argparse's bare "unrecognized arguments" and a bad value into a raw `ValidationError`, and it has no notion
of presets or of merging a file given on the same command line. So we let it build the parser and turn
the flags into a nested dict, write the help text ourselves (one line per field, repeated blocks once), and do the merge, the suggestions and the error
wording here; all type checking is pydantic's `model_validate`.

`run_main(main)` is the one error handler of the entry points: known errors (configuration, missing files,
non-finite training values, checkpoint and data errors, OS errors naming a file) print one line and exit
non-zero without a traceback (``--debug`` or ``RCM_DEBUG=1`` shows it); Ctrl-C prints one line (exit 130).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import CliSettingsSource

__all__ = [
    "ConfigError",
    "bool_flags",
    "RecipeConfig",
    "field_paths",
    "format_help",
    "load_config_file",
    "parse_config",
    "resolve_config",
    "run_main",
    "write_config",
    "load_presets",
    "preset_diff",
]

C = TypeVar("C", bound=BaseModel)


class RecipeConfig(BaseModel):
    """Base of every recipe config and its nested parts: unknown fields are errors, docstrings document."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class ConfigError(ValueError):
    """A configuration that cannot be resolved; the message names the field (dotted path) at fault."""


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`Model`, `Model | None`, `Optional[Model]`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _model_class(a)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def field_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of `cls` as a dotted path, nested models included (both `train` and `train.lr`)."""
    paths = []
    for name, info in cls.model_fields.items():
        paths.append(prefix + name)
        sub = _model_class(info.annotation)
        if sub is not None:
            paths += field_paths(sub, f"{prefix}{name}.")
    return paths


def _field_at(cls: type[BaseModel], path: str) -> FieldInfo | None:
    """The field of ``cls`` at dotted ``path`` (``stage1.objective.ode``), or None."""
    owner: type[BaseModel] | None = cls
    info = None
    for part in path.split("."):
        info = owner.model_fields.get(part) if owner is not None else None
        if info is None:
            return None
        owner = _model_class(info.annotation)
    return info


def _is_bool(annotation: Any) -> bool:
    """``bool`` or ``bool | None``."""
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [bool]
    return False


_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n", "none", "null"}


def bool_flags(cls: type[BaseModel], argv: Sequence[str]) -> list[str]:
    """``argv`` with bare boolean flags spelled out: ``--ode`` -> ``--ode=true``, ``--no-ode`` -> ``--ode=false``.

    ``--ode=false`` and ``--ode false`` pass unchanged (pydantic parses the word). A ``--no-x`` whose ``x`` is not
    a boolean field is left alone (and reported as an unknown field).
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or "=" in arg:
            out.append(arg)
            continue
        name = arg[2:]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        info = _field_at(cls, name)
        if info is not None and _is_bool(info.annotation):
            bare = nxt is None or nxt.startswith("--") or nxt.lower() not in _BOOL_WORDS
            out.append(f"{arg}=true" if bare else arg)
            continue
        if name.startswith("no-"):
            info = _field_at(cls, name[3:])
            if info is not None and _is_bool(info.annotation):
                out.append(f"--{name[3:]}=false")
                continue
        out.append(arg)
    return out


def _type_name(annotation: Any) -> str:
    """A short type for the help: ``int``, ``{scm,dcm}``, ``str|None``, ``list[float]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and origin is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _show(value: Any) -> str:
    return value if isinstance(value, str) else "None" if value is None else json.dumps(value, ensure_ascii=False)


def _field_groups(cls: type[BaseModel]) -> list[list[str]]:
    """The field names of ``cls`` in order; sibling blocks of one model class gathered into one group (placed
    where the first of them is): numbered ones (``stage1``, ``stage2``, ...) by stem, the others
    (``student``, ``fake_score``, ``teacher``) by class alone."""
    groups: list[list[str]] = []
    where: dict[tuple[str | None, type], list[str]] = {}
    for name, info in cls.model_fields.items():
        sub = _model_class(info.annotation)
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if sub is not None:
            key = (m.group(1) if m else None, sub)
            if key in where:
                where[key].append(name)
                continue
            where[key] = [name]
            groups.append(where[key])
        else:
            groups.append([name])
    return groups


def _class_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    try:
        return cls().model_dump(mode="json")
    except ValidationError:
        return {}


def _label(names: Sequence[str]) -> str:
    """``['stage1', 'stage2']`` -> ``'stage{1,2}'``, ``['student', 'teacher']`` -> ``'{student,teacher}'``; one
    name stays as it is."""
    if len(names) == 1:
        return names[0]
    m = re.fullmatch(r"(.*?)(\d+)", names[0])
    stem = m.group(1) if m and all(re.fullmatch(re.escape(m.group(1)) + r"\d+", n) for n in names) else ""
    return stem + "{" + ",".join(n[len(stem):] for n in names) + "}"


def _help_lines(cls: type[BaseModel], prefix: str, values: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    """Help rows of ``cls``'s leaf fields, then one section per nested model (recursively). ``values``: the
    defaults of each instance this block stands for (several for a numbered group)."""
    rows: list[str] = []
    sections: list[str] = []
    col = 30
    for names in _field_groups(cls):
        info = cls.model_fields[names[0]]
        sub = _model_class(info.annotation)
        label = prefix + _label(names)
        if sub is not None:
            docs = list(dict.fromkeys((cls.model_fields[n].description or "").strip() for n in names))
            head = f"{' / '.join(names) if len(names) > 1 else label}: {' / '.join(d for d in docs if d)}"
            if any(v.get(n, {}) is None for v in values for n in names):  # an optional block, off by default
                head += " (default: None; when set, its fields default as listed)"
            sub_values = [v[n] if isinstance(v.get(n), Mapping) else _class_defaults(sub) for v in values
                          for n in names]
            sections += ["", *textwrap.wrap(head, width, subsequent_indent="  "),
                         *_help_lines(sub, label + ".", sub_values, width)]
            continue
        name = names[0]
        shown = [_show(v[name]) if name in v else "?" for v in values]
        default = shown[0] if len(set(shown)) == 1 else " | ".join(shown)
        flag = f"  --{label} {_type_name(info.annotation)}"
        doc = f"{(info.description or '').strip()} (default: {default})"
        if len(flag) < col:
            rows += textwrap.wrap(doc, width, initial_indent=flag.ljust(col), subsequent_indent=" " * col)
        else:
            rows += [flag, *textwrap.wrap(doc, width, initial_indent=" " * col, subsequent_indent=" " * col)]
    return rows + sections


def format_help(cls: type[BaseModel], presets: Mapping[str, Any] | None = None, prog: str | None = None,
                width: int | None = None) -> str:
    """The ``--help`` text: usage, the recipe's docstring, the fixed options, every field once (type, docstring,
    default), nested models as sections, numbered sibling blocks (``stage1..3``) listed once."""
    width = width or min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    prog = prog or Path(sys.argv[0]).name
    try:
        defaults = cls.model_validate(_nested_defaults(cls)).model_dump(mode="json")
    except ValidationError:
        defaults = _nested_defaults(cls)
    fixed = [("-h, --help", "show this help and exit"),
             ("--config FILE", "a .yaml/.json file of (partial) values"),
             *([("--preset NAME", f"start from a named config: {', '.join(presets)}")] if presets else []),
             ("--print-config", "print the resolved config as YAML (a --config file) and exit; nothing runs"),
             ("--debug", "show the traceback of an error (also RCM_DEBUG=1)")]
    lines = [f"usage: {prog} [-h] [--config FILE]{' [--preset NAME]' if presets else ''} [--print-config] "
             "[--FIELD=VALUE ...]", ""]
    if cls.__doc__:
        lines += [*textwrap.wrap(" ".join(cls.__doc__.split()), width), ""]
    lines.append("options:")
    for flag, text in fixed:
        lines += textwrap.wrap(text, width, initial_indent=f"  {flag}".ljust(30), subsequent_indent=" " * 30)
    lines += ["", "fields (--a.b=VALUE or --a.b VALUE; a boolean also as --a.b / --no-a.b):"]
    lines += _help_lines(cls, "", [defaults], width)
    lines += ["", "values resolve as: defaults <- --preset <- --config file <- --a.b=value overrides"]
    return "\n".join(lines) + "\n"


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_field_message(cls: type[BaseModel], loc: Sequence[str | int], source: str) -> str:
    """'unknown field a.b' plus the closest valid name at the same nesting level."""
    owner: type[BaseModel] | None = cls
    for part in loc[:-1]:
        info = owner.model_fields.get(str(part)) if owner is not None else None
        owner = _model_class(info.annotation) if info is not None else None
    dotted = ".".join(map(str, loc))
    siblings = [".".join([*map(str, loc[:-1]), n]) for n in owner.model_fields] if owner is not None else []
    return f"unknown field '{dotted}' in {source}{_suggest(dotted, siblings)}"


def _format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"]]
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_field_message(cls, loc, source))
        else:
            msg = e["msg"].removeprefix("Value error, ")  # a validator's own message names its field(s)
            # a cross-field check sees the whole (sub)config as input: its message already says what is wrong
            got = "" if e["type"] == "missing" or isinstance(e["input"], Mapping) else f" (got {e['input']!r})"
            lines.append(f"field '{'.'.join(map(str, loc))}': {msg}{got}" if loc else f"{msg}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _merge(cls: type[BaseModel], base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` over `base`: mappings for nested-model fields merge recursively, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        info = cls.model_fields.get(key)
        sub = _model_class(info.annotation) if info is not None else None
        if sub is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(sub, out[key], value)
        else:
            out[key] = value
    return out


def _nested_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Dumps of the fields whose default is a model instance, e.g. ``data: Shapes = Shapes(size=32)``.

    Overrides merge onto these: without them ``--data.frames=5`` would rebuild ``data`` from the class
    ``Shapes`` defaults and silently drop the ``size=32`` the recipe chose.
    """
    out = {}
    for name, info in cls.model_fields.items():
        default = info.get_default(call_default_factory=True, validated_data={})
        if isinstance(default, BaseModel):
            out[name] = default.model_dump()
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a `.yaml`/`.yml`/`.json` config file into a (possibly partial) nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file '{path}'")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config: '{path}' must end in .yaml, .yml or .json")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config: '{path}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config: '{path}' is not valid JSON at line {e.lineno}, column {e.colno}: "
                          f"{e.msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of field names, got {type(data).__name__}")
    return data


def write_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (`.yaml`/`.yml`) or JSON (`.json`); `--config` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json")
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    elif path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        raise ValueError(f"config path '{path}' must end in .yaml, .yml or .json")
    return path


def _build_parser(cls: type[C], presets: Mapping[str, C], prog: str | None) -> tuple[argparse.ArgumentParser, Any]:
    epilog = "values resolve as: defaults <- --preset <- --config file <- --a.b=value overrides"
    if presets:
        epilog = f"presets: {', '.join(presets)}\n{epilog}"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a prefix of a field name must not silently select that field
        add_help=False,  # format_help writes --help
        exit_on_error=False,  # argparse errors become ConfigError
    )
    parser.add_argument("--config", metavar="FILE", help="a .yaml/.json file of (partial) values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if presets:
        parser.add_argument("--preset", metavar="NAME", help=f"start from a named config: {', '.join(presets)}")
    # The source adds one option per field (help = the field docstring) and turns them into a nested dict.
    source = CliSettingsSource(
        cls, root_parser=parser, cli_exit_on_error=False, cli_implicit_flags=False, cli_avoid_json=True
    )
    return parser, source


def last_flag_wins(argv: Sequence[str]) -> list[str]:
    """``argv`` with only the last occurrence of each ``--name`` (``--name=value`` or ``--name value``), so a
    repeated flag replaces instead of appending (argparse appends list fields)."""
    groups: list[tuple[str | None, list[str]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0]
            group = [arg]
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--") and name != "help":
                group.append(argv[i + 1])
                i += 1
            groups.append((name, group))
        else:
            groups.append((None, [arg]))
        i += 1
    last = {name: k for k, (name, _) in enumerate(groups) if name is not None}
    return [a for k, (name, group) in enumerate(groups) if name is None or last[name] == k for a in group]


def resolve_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, C] | None = None,
    prog: str | None = None,
) -> C:
    """Resolve `cls` from `argv` (default `sys.argv[1:]`); raises `ConfigError` on any problem.

    `--help` prints `format_help` and raises `SystemExit(0)`; so does `--print-config` after printing the resolved
    config as YAML.
    """
    presets = dict(presets or {})
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(format_help(cls, presets, prog), end="")
        raise SystemExit(0)
    parser, source = _build_parser(cls, presets, prog)
    try:
        parsed, unknown = parser.parse_known_args(last_flag_wins(bool_flags(cls, args)))
    except argparse.ArgumentError as err:  # e.g. a non-boolean flag without a value
        name = (err.argument_name or "").split("/")[0].lstrip("-")
        raise ConfigError(f"field '{name}' on the command line: {err.message} (--{name}=VALUE)") from None
    if unknown:
        flag = unknown[0]
        if flag.startswith("--"):
            name = flag[2:].split("=", 1)[0]
            valid = ["config", "print-config", *(["preset"] if presets else []), *field_paths(cls)]
            raise ConfigError(f"unknown field '{name}' on the command line{_suggest(name, valid)}")
        raise ConfigError(f"unexpected command-line argument '{flag}' (fields are set as --name=value)")

    preset_name = getattr(parsed, "preset", None)
    if preset_name is not None:
        if preset_name not in presets:
            raise ConfigError(f"unknown preset '{preset_name}'{_suggest(preset_name, list(presets))}; "
                              f"choose from {', '.join(presets)}")
        values = presets[preset_name].model_dump()
    else:
        values = _nested_defaults(cls)
    if parsed.config is not None:
        file_values = load_config_file(parsed.config)
        try:  # validate the file alone first, so its errors name the file
            cls.model_validate(_merge(cls, values, file_values))
        except ValidationError as err:
            raise ConfigError(_format_validation_error(cls, err, f"--config {parsed.config}")) from None
        values = _merge(cls, values, file_values)
    fixed = ("config", "preset", "print_config")
    cli_values = source(parsed_args={k: v for k, v in vars(parsed).items() if k not in fixed})()
    try:
        config = cls.model_validate(_merge(cls, values, cli_values))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(cls, err, "the command line")) from None
    if parsed.print_config:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        raise SystemExit(0)
    return config


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, C] | None = None,
    prog: str | None = None,
) -> C:
    """`resolve_config` for a script's `main()`: on error print the message and exit with status 2."""
    try:
        return resolve_config(cls, argv, presets=presets, prog=prog)
    except ConfigError as err:
        print(f"{prog or Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the file / field (no traceback needed)."""
    known: list[type[BaseException]] = [ConfigError, FileNotFoundError, FileExistsError, PermissionError,
                                        IsADirectoryError, NotADirectoryError]
    from rcm_recipes.rundir import RunConfigMismatch  # a run directory made with another config

    known.append(RunConfigMismatch)
    try:
        from rcm_train.data import CorruptDataError
        from rcm_train.safety import CheckpointError, NonFiniteError

        known += [CorruptDataError, CheckpointError, NonFiniteError]
    except ImportError:  # recipes without the training package
        pass
    try:
        from rcm_nets.checkpoint import CheckpointError as WeightsError
        from rcm_pipelines.components import MissingFileError

        known += [MissingFileError, WeightsError]
    except ImportError:  # recipes without the inference packages
        pass
    return tuple(known)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text.replace("\n", " | ") if not isinstance(err, ConfigError) else text


def run_main(main: Callable[[], Any], *, prog: str | None = None, argv: list[str] | None = None) -> Any:
    """Run an entry point's ``main()`` under the shared error handler (see the module docstring).

    ``--debug`` is removed from ``sys.argv`` (or ``argv``) before ``main`` runs; with it, or with
    ``RCM_DEBUG=1``, errors propagate with their traceback. Exit status: 2 for configuration errors, 1 for
    other known errors, 130 for Ctrl-C.
    """
    args = sys.argv if argv is None else argv
    debug = "--debug" in args[1:] or os.environ.get("RCM_DEBUG", "") not in ("", "0")
    args[1:] = [a for a in args[1:] if a != "--debug"]
    name = prog or (Path(args[0]).name if args else "rcm")
    try:
        return main()
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"{name}: {str(err).strip() or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except _known_errors() as err:
        if debug:
            raise
        print(f"{name}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    except OSError as err:
        if debug or err.filename is None:
            raise
        print(f"{name}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The repository's preset folder: ``configs/<recipe>/<preset>.yaml``."""


def preset_diff(base: Mapping[str, Any], full: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``full`` that differ from ``base`` (nested mappings compared key by key; anything else
    whole): what a preset file holds, so that it reads as the recipe's defaults plus this."""
    out: dict[str, Any] = {}
    for key, value in full.items():
        ref = base.get(key)
        if isinstance(value, Mapping) and isinstance(ref, Mapping):
            sub = preset_diff(ref, value)
            if sub:
                out[key] = sub
        elif value != ref:
            out[key] = value
    return out


def load_presets(cls: type[C], recipe: str, folder: str | Path | None = None) -> dict[str, C]:
    """Every ``<folder>/<recipe>/*.yaml`` as a preset named after the file: the file's entries merged onto the
    recipe's defaults (same rule as ``--config``), validated. Errors name the file."""
    base = cls().model_dump(mode="json")
    presets: dict[str, C] = {}
    for path in sorted((Path(folder) if folder else CONFIGS).joinpath(recipe).glob("*.yaml")):
        try:
            presets[path.stem] = cls.model_validate(_merge(cls, base, load_config_file(path)))
        except ValidationError as err:
            raise ConfigError(_format_validation_error(cls, err, str(path))) from None
    return presets
