"""Declaring an entry point's parameters once: a dataclass field with its help, its text form and parsing.

``training.cli`` builds every sub-command's flags from these dataclasses, MLproject declares the same names
(a test keeps them equal), and runs log :func:`as_params`, so a parameter looks the same in the MLflow compare
view whichever way the run was started.
"""

from __future__ import annotations

import dataclasses
import shlex
import typing
from typing import Any

import yaml

AUTO = "auto"
NONE = "none"


class OptionError(ValueError):
    """A parameter value that cannot be parsed or is not allowed; the message names both."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field that is also a command-line flag and an MLproject parameter."""
    if isinstance(default, (dict, list)):
        kwargs["default_factory"] = lambda value=default: type(value)(value)
        default = dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_key_values(text: str) -> dict:
    """``"filters=32,64 kernel_size=5 pool=avg"`` -> ``{"filters": "32,64", "kernel_size": 5, "pool": "avg"}``."""
    if text.strip().lower() in ("", NONE):
        return {}
    options = {}
    for item in shlex.split(text.replace(";", " ")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f'{item!r} is not key=value (example: "filters=32,64 kernel_size=5").')
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise OptionError(f"{text!r} is not true or false.")


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _optional(kind):
    def parse(text: str):
        return None if str(text).strip().lower() in (AUTO, "", NONE) else kind(text)

    return parse


def field_kind(cls, name: str):
    """The field's type with ``Optional`` unwrapped, and whether None (written ``auto``) is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) == 1 and type(None) in typing.get_args(hint)
    return (args[0] if optional else typing.get_origin(hint) or hint), optional


def parser_for(cls, name: str):
    """str -> value for field ``name`` of ``cls``."""
    kind, optional = field_kind(cls, name)
    base = {bool: parse_bool, dict: parse_key_values, list: parse_list}.get(kind, kind)
    return _optional(base) if optional else base


def to_text(value) -> str:
    """The form a value has on the command line and in MLflow params."""
    if value is None:
        return AUTO
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return " ".join(f"{k}={to_text(v)}" for k, v in value.items()) or NONE
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def mlproject_type(cls, name: str) -> str:
    kind, _ = field_kind(cls, name)
    return {int: "int", float: "float"}.get(kind, "string")


def as_params(instance) -> dict[str, str]:
    """Every field in its text form, for ``mlflow.log_params``."""
    return {f.name: to_text(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


# Where a run happened, not what it learnt: a reproducing command leaves them to the machine it runs on.
MACHINE_FIELDS = ("data_dir", "device", "checkpoint_every")


def mlflow_command(entry: str, params: dict[str, str], defaults: dict[str, str], keep: tuple[str, ...] = ()) -> str:
    """The ``mlflow run`` line of MLproject entry ``entry`` with every parameter that differs from ``defaults``
    (and those in ``keep``), machine-specific ones left out."""
    args = [
        f"-P {shlex.quote(f'{name}={value}')}"
        for name, value in params.items()
        if name not in MACHINE_FIELDS and (name in keep or value != defaults.get(name))
    ]
    return " ".join([f"mlflow run . -e {entry} --env-manager local", *args])


def reproduce_command(entry: str, instance, keep: tuple[str, ...] = ()) -> str:
    """The command that runs ``instance`` (an options dataclass) again: the values it does not share with the
    dataclass's defaults."""
    defaults = {
        f.name: to_text(f.default) for f in dataclasses.fields(instance) if f.default is not dataclasses.MISSING
    }
    return mlflow_command(entry, as_params(instance), defaults, keep)


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)
