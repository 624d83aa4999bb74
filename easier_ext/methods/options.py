"""The options of a schedule, in one place: each one's default, type, check and one-line help.

:class:`ScheduleOptions` holds what every schedule takes (as :class:`~easier_ext.methods.recipe.Recipe`
does for a finetune); :class:`easier_ext.methods.easier.EasierOptions` and
:class:`easier_ext.methods.nepenthe.NepentheOptions` add a method's own. Everything else reads
them: the schedules, the class docstrings (their ``Args`` are written from the help texts) and the
command line (``easier-ext run``'s flags, their choices, defaults, help and checks).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Collection
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from torch import nn

from easier_ext.core.checks import is_real
from easier_ext.core.entropy import AGGREGATES
from easier_ext.methods.recipe import Recipe

__all__ = ["OptionError", "ScheduleOptions", "TrainFn", "documented", "option", "with_default"]

TrainFn = Callable[[nn.Module, Iterable], Any]


class OptionError(ValueError):
    """An option out of range, of the wrong type or not one of its choices.

    Args:
        option: the option's (field's) name.
        value: what it was given.
        expected: what it must be, e.g. ``"an int >= 0"`` or ``"one of ('a', 'b')"``.
        what: for an option with choices, what kind of thing it names (``"allocation"``): the
            message then says the value is unknown.
        flag_expected: ``expected`` as the command line says it, where it differs (a flag is
            omitted, not set to ``None``).
    """

    def __init__(self, option: str, value: Any, expected: str, what: str = "", flag_expected: str = "") -> None:
        self.option, self.value, self.expected, self.what = option, value, expected, what
        self.flag_expected = flag_expected or expected
        super().__init__(self.named(option))

    def named(self, name: str, *, flag: bool = False) -> str:
        """The message, calling the option ``name`` (the command line says ``--layer-cap``).

        Args:
            name: what to call the option.
            flag: say what is expected as the command line says it.

        Returns:
            one sentence: the option, what it must be, and the value it was given.
        """
        expected = self.flag_expected if flag else self.expected
        if self.what:
            return f"unknown {self.what} {self.value!r}; expected {expected}"
        return f"{name} must be {expected}, got {self.value!r}"


def option(
    default: Any = MISSING,
    *,
    help: str,
    check: Optional[Callable[[Any], bool]] = None,
    expected: str = "",
    choices: Sequence[str] = (),
    what: str = "",
    convert: Optional[Callable[[Any], Any]] = None,
    unset: str = "",
    cli: bool = False,
    metavar: Optional[str] = None,
    requires: Optional[dict[str, Any]] = None,
    identity: bool = True,
    recorded_if_set: bool = False,
    cli_type: Optional[Callable[[str], Any]] = None,
    flag_expected: str = "",
    why: str = "",
    default_factory: Any = MISSING,
) -> Any:
    """A field of an options class, with what checks it and documents it.

    Args:
        default, default_factory: as :func:`dataclasses.field`.
        help: one line on what the option does (the docstring's and the ``--help``'s).
        check: whether a value is valid (``choices``, and a bool default, check themselves).
        expected: what a valid value is, for the error message.
        choices: the values it may take.
        what: what a choice names, for the error message (``"entropy aggregate"``).
        convert: applied to a valid value (``float`` keeps ``budget=1`` and ``1.0`` one run).
        unset: what ``None`` means, for the help (``"every batch"``).
        cli: ``easier-ext run`` has a flag for it (a ``store_true`` one for a bool, which must
            then default to False).
        metavar: the flag's argument name in ``--help``.
        requires: ``{option: value}`` the option only applies with (the command line refuses it
            otherwise, since the user named it for nothing).
        identity: recorded in the run directory's ``config.json``: a run resumed with another
            value is refused.
        recorded_if_set: recorded only when not at its default (an option added after runs were
            made without it: those runs, which ran as with the default, still resume).
        cli_type: parses the flag's text (default: the field's type).
        flag_expected: ``expected`` as the command line says it (default: ``expected``).
        why: why the option only applies with ``requires``, for the command line's refusal.

    Returns:
        a :func:`dataclasses.field`.
    """
    if choices:
        check, expected = (lambda value: value in choices), f"one of {tuple(choices)}"
    elif check is None and isinstance(default, bool):
        check, expected = (lambda value: isinstance(value, bool)), "a bool"
    metadata = {
        "help": help, "check": check, "expected": expected, "choices": tuple(choices), "what": what, "convert": convert,
        "unset": unset, "cli": cli, "metavar": metavar, "requires": requires or {}, "identity": identity,
        "recorded_if_set": recorded_if_set, "cli_type": cli_type, "flag_expected": flag_expected, "why": why,
    }
    return field(default=default, default_factory=default_factory, metadata=metadata)


def with_default(base: type, name: str, default: Any) -> Any:
    """The field ``name`` of the options class ``base`` with another default (a method's own).

    Args:
        base: an options class.
        name: one of its fields.
        default: the new default.

    Returns:
        a :func:`dataclasses.field` with the same checks and help.
    """
    inherited = {f.name: f for f in fields(base)}[name]
    return field(default=default, metadata=inherited.metadata)


def documented(cls: type) -> type:
    """Writes into an options class's docstring (before its ``Raises``) the ``Args`` that its
    fields' help texts make: the fields it adds or gives another default (all of them for
    :class:`ScheduleOptions`), so that the options are documented where they are defined, once.

    Args:
        cls: a dataclass of :func:`option` fields.

    Returns:
        ``cls``.
    """
    inherited = {f.name: f.default for base in cls.__mro__[1:] if "__dataclass_fields__" in vars(base) for f in fields(base)}
    own = [f for f in fields(cls) if f.name not in inherited or f.default != inherited[f.name]]
    args = "    Args:\n" + "".join(f"        {f.name}: {f.metadata['help']}; {_default_text(f)}.\n" for f in own)
    text, raises, rest = (cls.__doc__ or "").rstrip().partition("    Raises:")
    cls.__doc__ = f"{text.rstrip()}\n\n{args}" + (f"\n{raises}{rest}\n" if raises else "")
    return cls


def _default_text(f: Field) -> str:
    """How the docs say a field's default: ``"default 0.5"``, ``"default None: every batch"``."""
    if f.default is MISSING:
        return f"default {f.default_factory.__name__}()"
    if f.default is None and f.metadata["unset"]:
        return f"default None: {f.metadata['unset']}"
    return f"default {f.default!r}"


def _is_path(value: Any) -> bool:
    return value is None or isinstance(value, (str, os.PathLike))


def _is_site_list(value: Any) -> bool:
    # a list, tuple, set or dict keys; not a string (whose letters would be names) nor a
    # generator (which the check would use up)
    return isinstance(value, Collection) and not isinstance(value, (str, bytes)) and all(isinstance(name, str) for name in value)


def _is_count(value: Any) -> bool:
    # NumPy's ints too (converted to int, so that config.json can hold them), never a bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_or_none(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> Optional[float]:
    return None if value is None else float(value)


@documented
@dataclass
class ScheduleOptions:
    """What every schedule takes: the budget, what it measures, when it stops, how it finetunes,
    and where it writes.

    Build one with keywords (``EasierOptions(budget=2.0, patience=1)``), or give the keywords to
    :class:`easier_ext.EASIER` or :class:`easier_ext.NEPENTHE` directly. Every field is checked
    when the object is made, so a bad value fails before any work.

    Raises:
        OptionError: a ``ValueError`` naming the field, what it must be and the value.
    """

    budget: float = option(1.0, help="the largest accepted drop in top-1 points below the dense model", cli=True, convert=float,
                           check=lambda v: is_real(v) and 0 <= v <= 100, expected="in [0, 100] (a drop in top-1 points)")
    recipe: Recipe = option(default_factory=Recipe, help="the finetune recipe (None: Recipe(); ignored with train_fn)",
                            check=lambda v: v is None or isinstance(v, Recipe), expected="an easier_ext.Recipe or None",
                            convert=lambda v: Recipe() if v is None else v)
    train_fn: Optional[TrainFn] = option(None, help="your own finetune, train_fn(model, train_loader), called in place of the recipe's",
                                         check=lambda v: v is None or callable(v), expected="None or a callable")
    protect: tuple[str, ...] = option((), help="sites never changed (neither linearized nor pruned)", cli=True, metavar="SITE",
                                      check=_is_site_list, expected="a list of site names", convert=tuple)
    aggregate: str = option("easier", help="the layer entropy aggregate", cli=True, choices=AGGREGATES, what="entropy aggregate")
    measure_batches: Optional[int] = option(None, help="batches per entropy measurement", unset="every batch", cli=True,
                                            check=lambda v: v is None or (_is_count(v) and v >= 1), expected="an int >= 1 or None",
                                            convert=_int_or_none, flag_expected="an int >= 1 (omit it to measure every batch)")
    measure_train_mode: bool = option(True, help="measure in train mode, as the papers do (BatchNorm statistics are restored after)")
    max_iterations: Optional[int] = option(None, help="cap on the iterations", unset="no cap", cli=True,
                                           check=lambda v: v is None or (_is_count(v) and v >= 1), expected="an int >= 1 or None",
                                           convert=_int_or_none, flag_expected="an int >= 1 (omit it for no cap)")
    patience: int = option(0, help="iterations to go on past the budget before stopping (a later finetune may recover)", cli=True,
                           check=lambda v: _is_count(v) and v >= 0, expected="an int >= 0", convert=int)
    early_stop: int = option(
        0, help="check the validation accuracy every N finetune batches and end the finetune as soon as it is within the "
                "budget (0: off, every finetune runs the recipe's epochs); each check is a pass over the validation set, "
                "which then also decides how long models train (NEPENTHE: checked before its zero-entropy sites are "
                "replaced)", cli=True, metavar="N",
        check=lambda v: _is_count(v) and v >= 0, expected="an int >= 0 (batches between checks; 0: off)", convert=int,
        recorded_if_set=True)
    max_finetune_epochs: Optional[float] = option(
        None, help="a budget of finetune epochs for the whole run (every iteration's, undone ones included, a part of an "
                   "epoch counted as such): the finetune that reaches it ends there, and the run stops at the next step that "
                   "needs a finetune (EASIER with probe goes on while probes keep sites without one; patience still applies)",
        unset="no cap", cli=True, metavar="EPOCHS", check=lambda v: v is None or (is_real(v) and v > 0), convert=_float_or_none,
        expected="a finite number > 0 or None", flag_expected="a finite number > 0 (omit it for no cap)", recorded_if_set=True)
    seed: int = option(0, help="seeds torch, Python and NumPy at the start", check=_is_count, expected="an int", convert=int)
    run_dir: Union[str, os.PathLike, None] = option(
        None, help="where logs, checkpoints and the final model go (see easier_ext.methods.rundir.RunDir)", unset="nowhere, no resume",
        check=_is_path, expected="None or a path", identity=False)
    resume: bool = option(False, help="continue the run run_dir holds (a new or empty folder starts one)",
                          identity=False)
    config: Optional[dict] = option(None, help="extra JSON-able settings that identify the run (e.g. the CLI's model and data)",
                                    check=lambda v: v is None or isinstance(v, dict), expected="None or a dict", identity=False)
    latency: bool = option(True, help="time each iteration's folded model, and the returned one against the dense one in paired rounds",
                           identity=False)
    device: Any = option(None, help="where to run", unset="the model's device", identity=False)
    progress: bool = option(True, help="progress bars", identity=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, self.checked(f.name, getattr(self, f.name)))
        if self.early_stop and self.train_fn is not None:
            raise OptionError("early_stop", self.early_stop, "0 with a train_fn (the built-in finetune is the one it stops)")
        if self.max_finetune_epochs is not None and self.train_fn is not None:
            raise OptionError("max_finetune_epochs", self.max_finetune_epochs,
                              "None with a train_fn (the epochs a train_fn runs are not known)")

    @classmethod
    def checked(cls, name: str, value: Any) -> Any:
        """Checks one option's value (as making the object would).

        Args:
            name: a field of this class.
            value: its value.

        Returns:
            the value, converted as the object holds it (``float`` for ``budget``).

        Raises:
            OptionError: the value is not valid.
        """
        meta = {f.name: f for f in fields(cls)}[name].metadata
        if meta["check"] is not None and not meta["check"](value):
            raise OptionError(name, value, meta["expected"], meta["what"], meta["flag_expected"])
        return meta["convert"](value) if meta["convert"] else value

    def identity(self) -> dict[str, Any]:
        """What identifies the run these options make, as JSON values (``config.json``, with the
        model's sites and ``config`` added by the schedule).

        Returns:
            ``{option: value}`` for the options that change the result.
        """
        out = {
            f.name: getattr(self, f.name) for f in fields(self)
            if f.metadata["identity"] and not (f.metadata["recorded_if_set"] and getattr(self, f.name) == f.default)
        }
        out.update(recipe=None if self.train_fn else self.recipe.as_dict(), train_fn=getattr(self.train_fn, "__qualname__", None),
                   protect=list(self.protect))
        return out
