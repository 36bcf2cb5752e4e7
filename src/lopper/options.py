"""The plumbing of every command's arguments: fields with help, groups that check themselves, recipe files, logging.

An arguments class is a dataclass built from groups (`Options` subclasses, one per way users think: what to remove,
scoring, repair, sparsity, ...). The CLI is generated from it, its flags shown group by group; the CLI hands the
dataclass the raw strings of the flags it was given, and `Options.check` converts and validates them, so the Python
API and the CLI refuse the same values with the same message. Nothing of lopper but its error type is imported here,
so every module can use it without an import circle."""
from __future__ import annotations

import json
import logging
import typing
from dataclasses import MISSING, field, fields
from pathlib import Path

from .errors import LopperError, one_line

log = logging.getLogger("lopper")


def arg_field(default, help: str, **kw):
    """A dataclass field with its CLI help; `choices=` restricts the value, `positional=True` / `required=True` as
    in argparse."""
    return field(default=default, metadata={"help": help, **kw})


def files_field(help: str, **kw):
    """A list of file paths (`--text A B`)."""
    return field(default_factory=list, metadata={"help": help, **kw})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def existing(name: str, value: str, what: str, folder: bool = False) -> None:
    """Refuse a path-valued flag whose file (or folder) is not there, by the flag's name, before any work."""
    if value and not (Path(value).is_dir() if folder else Path(value).is_file()):
        raise LopperError(f"{flag(name)} {value} does not exist: give {what}")


def command_line(command: str, args) -> str:
    """`lopper COMMAND ...` for an arguments dataclass: the positional fields, then every flag whose value is not
    its default (what a report records so that the run can be repeated)."""
    words = ["lopper", command]
    for f in fields(args):
        value = getattr(args, f.name)
        if f.metadata.get("positional"):
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif value != (f.default if f.default is not MISSING else []) and value not in ("", None, False) \
                and f.name != "quiet":
            words += [flag(f.name)] if value is True else \
                [flag(f.name), *(map(str, value) if isinstance(value, list) else [str(value)])]
    return " ".join(words)


def convert(value, kind, name: str):
    """`value` as `kind` (int, float, str, bool or list[str]); strings from the CLI or a recipe are parsed."""
    bad = LopperError(f"{flag(name)} {value!r} is not {_KIND_NAMES.get(kind, kind)}: give e.g. "
                      f"{_KIND_EXAMPLES.get(kind, '')}".rstrip())
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise bad from None
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int if kind is int else (int, float)):
            raise bad
        return kind(value)
    if kind is str:
        if not isinstance(value, (str, Path)):
            raise bad
        return str(value)
    if typing.get_origin(kind) is list:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, Path)) for v in value):
            raise bad
        return [str(v) for v in value]
    return value


_KIND_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false",
               list[str]: "a list of file paths"}
_KIND_EXAMPLES = {int: "8", float: "0.25", bool: "true", list[str]: "a.txt b.txt"}


class Options:
    """Base of the argument groups. `check()` converts every field to its declared type, refuses a value outside its
    `choices`, then runs each group's own `check_group` (the rules between the group's fields) in the order the
    groups are declared, and last those of classes that combine groups (the rules between groups)."""

    def check(self) -> None:
        kinds = typing.get_type_hints(type(self))
        for f in fields(self):
            value = convert(getattr(self, f.name), kinds[f.name], f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise LopperError(f"{flag(f.name)} {value!r} is not one of {', '.join(map(str, choices))}: "
                                  f"choose one of them (default: {f.default})")
            setattr(self, f.name, value)
        mro = [c for c in type(self).__mro__ if "check_group" in vars(c)]
        composite = [c for c in mro if sum(issubclass(b, Options) for b in c.__bases__) > 1]
        for cls in [c for c in mro if c not in composite] + composite[::-1]:
            cls.check_group(self)


def groups(cls) -> list[tuple[str, list]]:
    """(title, fields) for each group of the arguments class `cls`, in the order its groups are declared; the title is
    the first line of the group's docstring."""
    owned: dict[type, list] = {}
    for f in fields(cls):
        owner = next(c for c in reversed(cls.__mro__) if f.name in vars(c).get("__annotations__", {}))
        owned.setdefault(owner, []).append(f)
    order = sorted(owned, key=cls.__mro__.index)
    return [((c.__doc__ or c.__name__).strip().splitlines()[0].rstrip("."), owned[c]) for c in order]


def read_recipe(path: str | Path, cls) -> dict:
    """Options from a recipe file: YAML or JSON of the same names as the flags (dashes or underscores), or a
    `lopper_report.json`, whose recorded arguments replay the run (keys the command does not take are skipped; a class
    with `REPORT_SECTION` reads that section's arguments, so a healed model's report replays its heal)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LopperError(f"--config {path} cannot be read ({e.strerror}): give an existing YAML or JSON file") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError
        raise LopperError(f"--config {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                          f"({one_line(e)}): fix the file") from None
    if not isinstance(data, dict):
        raise LopperError(f"--config {path} holds no mapping of options: write `name: value` lines")
    names = {f.name for f in fields(cls)}
    report = "lopper_version" in data
    if report:  # a report: its "args", or those of the section the command wrote (heal: report["heal"]["args"])
        section = data.get(getattr(cls, "REPORT_SECTION", ""), data)
        if not isinstance(section.get("args"), dict):
            raise LopperError(f"--config {path} is a lopper report without the settings of this command: give the "
                              "report the command wrote, or a recipe file")
        data = section["args"]
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names - {"config"})
    if unknown and not report:
        raise LopperError(f"--config {path}: unknown option(s) {', '.join(unknown)}: the options of this command are "
                          f"{', '.join(sorted(names - {'config'}))}")
    return {k: v for k, v in data.items() if k in names and k != "config"}


def resolve_args(cls, args, kwargs):
    """The arguments dataclass of a call `fn(args)` or `fn(**kwargs)`; a `config` recipe fills what the call does not
    set (keywords override it; with a dataclass, fields still at their default take the recipe's value)."""
    if args is not None and kwargs:
        raise TypeError("pass either an arguments dataclass or keywords, not both")
    if args is None:
        recipe = read_recipe(kwargs["config"], cls) if kwargs.get("config") else {}
        return cls(**{**recipe, **kwargs})
    if getattr(args, "config", ""):
        for k, v in read_recipe(args.config, cls).items():
            f = next(f for f in fields(cls) if f.name == k)
            default = f.default if f.default is not MISSING else f.default_factory()
            if getattr(args, k) == default:
                setattr(args, k, v)
    return args


def set_quiet(quiet: bool) -> None:
    """lopper's log at INFO (WARNING when quiet), and transformers' progress bars and warnings with it."""
    import transformers
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    else:
        transformers.utils.logging.enable_progress_bar()
