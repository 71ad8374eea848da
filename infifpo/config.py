"""One config convention for every stage: a dataclass of the stage's options, read from ``--config FILE`` and flags.

Owns: turning a stage's options dataclass into its command line (``--help`` lists every field with its help), the
``--config`` YAML (keys are field names; flags override it), and the named errors for an unknown key or flag (with a
did-you-mean), a missing or non-mapping file and a bad value. `infifpo train` follows the same convention through
TRL's own ``TrlParser``; ``check_yaml_keys`` and ``unknown_flags_error`` are shared with it.

Flags are spelt as the field names (``--max_tokens``, TRL's spelling); the dashed form (``--max-tokens``) is
accepted too. A ``bool`` field is a switch (``--pivot``) that ``--pivot false`` / ``--no_pivot`` turn off; a
``list`` field takes several values (``--samples A B``, or the flag repeated); a ``Literal`` field lists its
choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from infifpo.schema import ConfigError

T = TypeVar("T")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def suggest(name: str, known: Sequence[str], *, sentence: bool = True) -> str:
    """`` Did you mean 'x'?`` (``sentence=False``: `` (did you mean 'x'?)``) for the closest of ``known`` to
    ``name``, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if not close:
        return ""
    return f" Did you mean {close[0]!r}?" if sentence else f" (did you mean {close[0]!r}?)"


def config_path(argv: Sequence[str], what: str = "a YAML file of this stage's options") -> Path | None:
    """The ``--config FILE`` of ``argv`` (None without one); a ConfigError when the value or the file is missing."""
    args = list(argv)
    value = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if value is None and "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ConfigError(f"--config needs a value: {what}.")
        value = args[i + 1]
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise ConfigError(f"--config {value}: {'is a directory' if path.is_dir() else 'does not exist'}; give {what}.")
    return path


def yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file as a mapping; a ConfigError when it is not valid YAML or not a mapping."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of option names, got {type(config).__name__}.")
    return config


def check_keys(config: dict[str, Any], known: Sequence[str], where: str, fix: str) -> None:
    """ConfigError naming every key of ``config`` not in ``known``, each with a did-you-mean; ``fix`` says what the
    keys must be."""
    unknown = sorted(set(config) - set(known))
    if unknown:
        hints = ", ".join(f"{k!r}{suggest(k, known, sentence=False)}" for k in unknown)
        raise ConfigError(f"unknown key(s) in {where}: {hints}. {fix}")


def check_yaml_keys(argv: Sequence[str], dataclass_types: Sequence[type], extra: Sequence[str] = ()) -> None:
    """ConfigError for every ``--config`` YAML key that is not a field of ``dataclass_types`` (or in ``extra``), and
    for a ``--config`` file that is missing or not a YAML mapping."""
    path = config_path(argv)
    if path is None:
        return
    known = [f.name for t in dataclass_types for f in dataclasses.fields(t)] + list(extra)
    check_keys(yaml_mapping(path), known, str(path),
               f"Keys must be fields of {', '.join(t.__name__ for t in dataclass_types)}.")


def unknown_flags_error(parser: argparse.ArgumentParser, remaining: Sequence[str], help_cmd: str) -> ConfigError:
    """A ConfigError naming the command-line arguments the parser does not take, each with a did-you-mean."""
    known = sorted(s[2:] for s in parser._option_string_actions if s.startswith("--"))
    flags = [a.partition("=")[0] for a in remaining if a.startswith("-")]
    if not flags:
        return ConfigError(f"unexpected argument(s) {list(remaining)}: every value follows its --flag; "
                           f"`{help_cmd}` lists them.")
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), known, n=1)
        hints.append(flag + (f" (did you mean --{close[0]}?)" if close else ""))
    return ConfigError(f"unknown flag(s) {', '.join(hints)}; `{help_cmd}` lists them all.")


def raise_config_error(message: str) -> typing.NoReturn:
    """``ArgumentParser.error`` replacement: a bad or missing value is one ConfigError line, not usage text."""
    raise ConfigError(" ".join(message.split()))


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> X (other unions are left as they are)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, hints: dict[str, Any]) -> None:
    tp = _strip_optional(hints[field.name])
    names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
    help_text = field.metadata.get("help", "")
    kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "default": argparse.SUPPRESS}
    origin = typing.get_origin(tp)
    if field.metadata.get("yaml_only"):
        kwargs["help"] = argparse.SUPPRESS
    if tp is bool:
        kwargs.update(nargs="?", const=True, type=_bool, metavar="true|false")
        parser.add_argument(f"--no_{field.name}", dest=field.name, action="store_false", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    elif origin is typing.Literal:
        choices = typing.get_args(tp)
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin in (list, tuple, Sequence):
        item = (typing.get_args(tp) or (str,))[0]
        kwargs.update(nargs="+", action="extend", type=item if item in (int, float, str) else str)
    elif tp in (int, float, str):
        kwargs["type"] = tp
    parser.add_argument(*names, **kwargs)


def _check_type(name: str, value: Any, tp: Any, path: Path) -> Any:
    """A YAML value checked against its field's type (an int is taken where a float is asked); ConfigError else."""
    if value is None:
        return value
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        ok = value in typing.get_args(tp)
        want = f"one of {list(typing.get_args(tp))}"
    elif origin in (list, tuple, Sequence):
        ok, want = isinstance(value, list), "a list"
    elif tp is float:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif tp is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif tp in (bool, str):
        ok, want = isinstance(value, tp), "true or false" if tp is bool else "a string"
    else:
        return value
    if not ok:
        raise ConfigError(f"{path}: {name}: expected {want}, got {value!r}.")
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def build_parser(config_class: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """The command line of one options dataclass: a flag per field (help from ``field.metadata['help']``, default
    shown) plus ``--config``. Fields with ``metadata['yaml_only']`` are set only in the YAML."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML of these options (keys are the option names, without --); flags override it")
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        default = _default(field)
        _add_field(parser, field, hints)
        action = parser._option_string_actions[f"--{field.name}"]
        if action.help is not argparse.SUPPRESS:
            shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
            action.help = f"{action.help} ({shown})" if action.help else f"({shown})"
    parser.error = raise_config_error  # type: ignore[method-assign]
    return parser


def parse_config(config_class: type[T], argv: Sequence[str] | None, *, prog: str, description: str = "") -> T:
    """An instance of ``config_class`` from ``--config FILE`` (YAML keys = field names) and flags (which win).

    Raises ConfigError for an unknown key or flag (with a did-you-mean), a missing required option, a bad value, and
    whatever the dataclass's ``__post_init__`` refuses. ``--help`` prints every option and exits 0."""
    argv = list(argv or [])
    parser = build_parser(config_class, prog, description)
    values: dict[str, Any] = {}
    path = config_path(argv)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    if path is not None:
        values = yaml_mapping(path)
        check_keys(values, list(fields), str(path), f"Keys are the options `{prog} --help` lists.")
        hints = typing.get_type_hints(config_class)
        values = {k: _check_type(k, v, hints[k], path) for k, v in values.items()}
    args, remaining = parser.parse_known_args(argv)
    if remaining:
        raise unknown_flags_error(parser, remaining, f"{prog} --help")
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    missing = [name for name, f in fields.items() if name not in values and _default(f) is dataclasses.MISSING]
    if missing:
        flags = " ".join(f"--{m} ..." for m in missing)
        raise ConfigError(f"{prog}: missing required option(s) {', '.join(missing)}: give {flags} or set them in "
                          "--config.")
    try:
        return config_class(**values)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prog}: {' '.join(str(e).split())}") from None


def to_yaml(config: Any) -> str:
    """A stage options dataclass as the YAML ``--config`` reads back (fields equal to their defaults left out)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.init and value != _default(f):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(out, sort_keys=False)
