"""Command-line flags made from the schedules' options classes (:mod:`easier_ext.methods.options`):
one flag per option marked ``cli``, with its help, choices, type and default; and, back from the
parsed flags, the options, whose own checks then run with messages that name the flag."""

from __future__ import annotations

import argparse
import contextlib
import typing
from dataclasses import Field, fields
from typing import Any, Iterator, Sequence

from easier_ext.methods.easier import EASIER
from easier_ext.methods.nepenthe import NEPENTHE
from easier_ext.methods.options import OptionError, ScheduleOptions
from easier_ext.methods.schedule import Schedule

__all__ = ["METHODS", "add_option_flags", "add_schedule_flags", "flag", "flag_errors", "schedule_options"]

#: ``--method`` NAME -> the schedule it runs
METHODS: dict[str, type[Schedule]] = {"easier": EASIER, "nepenthe": NEPENTHE}


def flag(name: str) -> str:
    """The flag of an option: ``layer_cap`` is ``--layer-cap``."""
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Turns an option's error into the same message naming its flag (``--budget must be ...``)."""
    try:
        yield
    except OptionError as e:
        raise ValueError(e.named(flag(e.option), flag=True)) from None


def add_schedule_flags(group: Any) -> None:
    """Adds ``--method`` and a flag for every ``cli`` option of any method.

    An option that only some methods take, or whose default differs between methods, is ``None``
    when not given (the method's own default then applies), so that :func:`schedule_options` can
    refuse it for a method without it.

    Args:
        group: the ``run`` parser or one of its argument groups.
    """
    summaries = "; ".join(f"{name}: {_first_line(schedule.__doc__)}" for name, schedule in METHODS.items())
    group.add_argument("--method", choices=list(METHODS), default=next(iter(METHODS)), help=summaries)
    for name, by_method in _cli_options().items():
        _add(group, name, by_method, METHODS[next(iter(by_method))].Options, everyone=len(by_method) == len(METHODS))


def add_option_flags(group: Any, names: Sequence[str]) -> None:
    """Adds flags for options of every schedule, to a subcommand that uses them without one
    (``measure``'s ``--aggregate``).

    Args:
        group: the subcommand's parser or one of its argument groups.
        names: fields of :class:`~easier_ext.methods.options.ScheduleOptions`.
    """
    own = {f.name: f for f in fields(ScheduleOptions)}
    for name in names:
        _add(group, name, {"": own[name]}, ScheduleOptions, everyone=True)


def schedule_options(args: argparse.Namespace) -> ScheduleOptions:
    """The options of ``--method``'s schedule that the flags give (the others at their defaults).

    Args:
        args: parsed by a parser with :func:`add_schedule_flags`.

    Returns:
        an instance of the method's options class, checked.

    Raises:
        ValueError: a flag of another method, one that does not apply with another flag's value
            (``--layer-cap`` with ``--allocation reference``), or an option's check failed; the
            message names the flag.
    """
    options = METHODS[args.method].Options
    own = {f.name: f for f in fields(options)}
    given = {}
    for name, by_method in _cli_options().items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in by_method:
            raise ValueError(f"{flag(name)} applies to --method {', '.join(by_method)} only")
        given[name] = value
    for name in given:
        for other, needed in own[name].metadata["requires"].items():
            if given.get(other, own[other].default) != needed:
                why = own[name].metadata["why"]
                raise ValueError(f"{flag(name)} applies to {flag(other)} {needed} only" + (f" ({why})" if why else ""))
    with flag_errors():
        return options(**given)


def _cli_options() -> dict[str, dict[str, Field]]:
    """Every ``cli`` option of any method: ``{name: {method: its field}}``."""
    found: dict[str, dict[str, Field]] = {}
    for method, schedule in METHODS.items():
        for f in fields(schedule.Options):
            if f.metadata["cli"]:
                found.setdefault(f.name, {})[method] = f
    return found


def _add(group: Any, name: str, by_method: dict[str, Field], options: type, *, everyone: bool) -> None:
    """One option's flag; ``by_method``: the methods that take it, with their fields (which
    differ in their defaults at most); ``everyone``: every method takes it."""
    f = next(iter(by_method.values()))
    meta = f.metadata
    kind = meta["cli_type"] or _unwrap(typing.get_type_hints(options)[name])
    defaults = {method: g.default for method, g in by_method.items()}
    shared = everyone and len(set(defaults.values())) == 1
    text = meta["help"]
    if not everyone:
        requires = "".join(f" {flag(other)} {value}" for other, value in meta["requires"].items())
        text = f"{', '.join(by_method)}{requires}: {text}"
    # argparse shows a default it holds; one it must not hold (unset, or the method's) is said here
    if not shared and kind is not bool:
        said = [f"{d} with --method {m}" for m, d in defaults.items()] if len(set(defaults.values())) > 1 else [str(f.default)]
        text += f" (default: {', '.join(said)})"
    elif shared and f.default is None and meta["unset"]:
        text += f" (default: {meta['unset']})"
    default = f.default if shared else None
    kwargs: dict[str, Any] = {"choices": meta["choices"] or None, "metavar": meta["metavar"]}
    if kind is bool:
        kwargs = {"action": "store_true"}
    elif typing.get_origin(kind) is tuple:
        kwargs["nargs"] = "*"
        default = list(default) if default is not None else None
    else:
        kwargs["type"] = kind
    group.add_argument(flag(name), default=default, help=text, **kwargs)


def _unwrap(hint: Any) -> Any:
    """``Optional[int]`` is ``int`` on the command line: an unset flag is the ``None``."""
    if typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()  # no docstrings under python -OO
    line = lines[0].rstrip(".") if lines else ""
    return line[:1].lower() + line[1:]
