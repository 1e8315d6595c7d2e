"""The stage contract: typed, validated options that give `identity()`, command-line flags and
a build-config section from one declaration (docs/architecture.md, "The stage contract").

A stage's options are a frozen dataclass deriving from `Options`, each field declared with
`option(default, help, ...)`: its type (the annotation) and bounds are checked when the object
is built, so a bad value fails before any work with a message naming the value and what is
valid; `runtime=True` marks a field the outputs do not depend on (workers, batch sizes), which
`identity()` leaves out of the config hash. `ActorRuntime` and `TaskRuntime` hold the settings
of stages whose parts run on Ray actors or Ray tasks, declared once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pipeline.store import AtlasRoot

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, runtime: bool = False,
           input: bool = False, min: float | None = None, gt: float | None = None,
           max: float | str | None = None, lt: float | None = None,
           choices: Sequence[Any] | None = None, expect: str | None = None,
           nonempty: bool = False, parse: Callable[[Any], Any] | None = None,
           flag: str | None = None, cli: bool = True) -> Any:
    """A field of an `Options` dataclass.

    Args:
        default: its value when not given (MISSING: required).
        help: one line for `--help` and the docs.
        runtime: the outputs do not depend on it (left out of `identity()`).
        input: what the stage reads (e.g. shards): tracked per part by the manifest's input
            fingerprints, so also left out of `identity()`.
        min / gt / max / lt: bounds (>=, >, <=, <); `max` may name another field.
        choices: the valid values (of each element, for a tuple field).
        expect: how the error message describes a valid value (default: from type and bounds).
        nonempty: a tuple field needs at least one element.
        parse: maps what a config or the command line gives (text such as "all" or "none",
            "LAYER=ID" pairs) to the field's value, before it is checked.
        flag: the command-line flag (default `--field-name`); cli=False: no flag.
    """
    meta = {"help": help, "runtime": runtime, "input": input, "min": min, "gt": gt, "max": max,
            "lt": lt, "choices": tuple(choices) if choices is not None else None,
            "expect": expect, "nonempty": nonempty, "parse": parse, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple or None)")
    return field(default=default, metadata=meta)


class Options:
    """Base of every stage's options (and of other validated settings, e.g. `SAEConfig`).

    Subclasses are frozen dataclasses; `section` names them in messages and in build configs.
    A subclass adds cross-field checks by overriding `check()`.
    """

    section: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            given = value = getattr(self, f.name)
            if f.metadata.get("parse") is not None:
                value = f.metadata["parse"](value)
            checked = _check_value(self, f, hints[f.name], value)
            if checked is not given:
                object.__setattr__(self, f.name, checked)
        self.check()

    def check(self) -> None:
        """Cross-field checks (a subclass overrides it); raise ValueError naming the values."""

    def identity(self) -> dict[str, Any]:
        """The fields the outputs depend on (what a stage's config hash covers)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("runtime") or f.metadata.get("input"))}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, **given: Any) -> Options:
        """Build from a config mapping (unknown keys are an error naming the known ones);
        `given` are values set by the caller, which the mapping may not contain."""
        section = dict(section or {})
        if not isinstance(section, dict):
            raise ValueError(f"section '{cls.section}' must be a mapping of "
                             f"{list(cls.field_names())}")
        known = [n for n in cls.field_names() if n not in given]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"{cls.section}: unknown keys {unknown}; known keys: {known}")
        return cls(**section, **given)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      skip: Sequence[str] = (), defaults: Mapping[str, Any] | None = None) -> None:
        """One flag per field (its help and default), but those in `skip` or with cli=False;
        `defaults` replace fields' defaults on the command line (a required field gets one)."""
        hints = typing.get_type_hints(cls)
        # what the stage computes first, how it runs after
        ordered = sorted(dataclasses.fields(cls), key=lambda f: bool(f.metadata.get("runtime")))
        for f in ordered:
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            if defaults and f.name in defaults:
                f = _with_default(f, defaults[f.name])
            parser.add_argument(f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                                dest=f.name, **_argument(f, hints[f.name]))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> Options:
        """Build from parsed arguments (fields without a flag take their default or `given`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, f.name) and f.name not in given}
        values = {k: v for k, v in values.items() if v is not MISSING}
        return cls(**values, **given)


@dataclass(frozen=True, kw_only=True)
class ActorRuntime(Options):
    """How a stage whose parts run on stateful Ray actors runs (none of it changes the outputs)."""

    actors: int = option(1, "model actors (one model each)", runtime=True, min=1)
    cpus_per_actor: float = option(1.0, "Ray CPUs per actor (and its torch threads)",
                                   runtime=True, gt=0)
    gpus_per_actor: float | None = option(
        None, "Ray GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
        runtime=True, min=0)
    max_retries: int = option(3, "restarts of a dead actor and retries of its calls",
                              runtime=True, min=0)
    in_process: bool = option(False, "run every part in this process, without Ray (debugging, "
                              "small jobs; the same outputs)", runtime=True)


@dataclass(frozen=True, kw_only=True)
class TaskRuntime(Options):
    """How a stage whose parts run as Ray tasks runs (none of it changes the outputs)."""

    cpus_per_task: float = option(1.0, "Ray CPUs per part (and torch threads)", runtime=True,
                                  gt=0)
    gpus_per_task: float = option(0.0, "Ray GPUs per part (> 0: on CUDA)", runtime=True, min=0)
    max_retries: int = option(3, "Ray retries of a part whose worker died", runtime=True, min=0)
    in_process: bool = option(False, "run every part in this process, without Ray (debugging, "
                              "small jobs; the same outputs)", runtime=True)


# ---- checking a value against its field's type and bounds ---------------------------------


def _check_value(obj: Options, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """`value` (a tuple for a sequence given to a tuple field), or ValueError naming it."""
    meta = f.metadata
    where = f"{obj.section}.{f.name}"
    optional, base = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}=None: expected {_expectation(obj, f, base, False)}")
    origin = typing.get_origin(base)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{where}={value!r}: expected {_expectation(obj, f, base, optional)}")
        value = tuple(value)
        elem = typing.get_args(base)[0]
        bad = [v for v in value if not _is_type(v, elem)
               or (meta["choices"] is not None and v not in meta["choices"])]
        if bad or (meta["nonempty"] and not value):
            raise ValueError(f"{where}={list(value)!r}: expected "
                             f"{_expectation(obj, f, base, optional)}")
        return value
    if origin is dict:
        key_t, val_t = typing.get_args(base)
        if not isinstance(value, Mapping) or not all(
                _is_type(k, key_t) and _is_type(v, val_t) for k, v in value.items()):
            raise ValueError(f"{where}={value!r}: expected {_expectation(obj, f, base, optional)}")
        return dict(value)
    if not _is_type(value, base) or not _in_bounds(obj, meta, value):
        raise ValueError(f"{where}={value!r}: expected {_expectation(obj, f, base, optional)}")
    return value


def _unwrap_optional(tp: Any) -> tuple[bool, Any]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) < len(typing.get_args(tp)), args[0] if len(args) == 1 else tp
    return False, tp


def _is_type(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        # bool is an int subclass: `n: true` in a config is a mistake, not 1
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a nested type checked by the field's own check()


def _bound(obj: Options, bound: float | str | None) -> float | None:
    return getattr(obj, bound) if isinstance(bound, str) else bound


def _in_bounds(obj: Options, meta: Mapping[str, Any], value: Any) -> bool:
    if meta["choices"] is not None and value not in meta["choices"]:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    low, high = meta["min"], _bound(obj, meta["max"])
    return not ((low is not None and value < low) or (meta["gt"] is not None and value <= meta["gt"])
                or (high is not None and value > high)
                or (meta["lt"] is not None and value >= meta["lt"]))


def _expectation(obj: Options, f: dataclasses.Field, tp: Any, optional: bool) -> str:
    meta = f.metadata
    if meta["expect"]:
        return meta["expect"]
    if typing.get_origin(tp) is tuple:
        what = (f"a subset of {list(meta['choices'])}" if meta["choices"] is not None
                else "a list of " + _type_name(typing.get_args(tp)[0]) + "s")
        text = ("a non-empty " + what[2:]) if meta["nonempty"] else what
    elif typing.get_origin(tp) is dict:
        text = "a mapping of " + " to ".join(_type_name(t) for t in typing.get_args(tp))
    elif meta["choices"] is not None:
        text = f"one of {list(meta['choices'])}"
    else:
        text = "an int" if tp is int else "a number" if tp is float else _a(_type_name(tp))
        parts = []
        if meta["min"] is not None:
            parts.append(f">= {meta['min']}")
        if meta["gt"] is not None:
            parts.append(f"> {meta['gt']}")
        if meta["max"] is not None:
            high = meta["max"]
            parts.append(f"<= {high}={_bound(obj, high)}" if isinstance(high, str)
                         else f"<= {high}")
        if meta["lt"] is not None:
            parts.append(f"< {meta['lt']}")
        if parts:
            text += " " + " and ".join(parts)
    return f"None or {text}" if optional else text


def _type_name(tp: Any) -> str:
    return {int: "int", float: "number", bool: "true or false", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _a(name: str) -> str:
    return name if name.startswith("true") else f"a {name}"


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a field value (tuples as lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---- command-line flags from fields -------------------------------------------------------


def _with_default(f: dataclasses.Field, default: Any) -> dataclasses.Field:
    copy = field(default=default, metadata=f.metadata)
    copy.name = f.name
    return copy


def _argument(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """argparse keywords of a field: its type, default and help."""
    meta = f.metadata
    optional, base = _unwrap_optional(tp)
    default = f.default if f.default is not MISSING else None
    required = f.default is MISSING
    shown = "" if required or default is None else f" (default {_plain(default)})"
    kw: dict[str, Any] = {"help": meta.get("help", "") + shown}
    if base is bool:
        kw.update(action=argparse.BooleanOptionalAction, default=default)
        return kw
    kw.update(default=MISSING if required else default, required=required)
    origin = typing.get_origin(base)
    if origin is tuple:
        kw.update(nargs="+", type=_parser(typing.get_args(base)[0]))
    elif origin is dict:
        kw.update(action="append", type=str)  # KEY=VALUE, once per entry; `parse` maps them
    else:
        kw["type"] = meta["parse"] or _parser(base, optional)
    if meta["choices"] is not None:
        kw["choices"] = list(meta["choices"])  # of each element, for a tuple
    return kw


def all_or_int(value: Any) -> Any:
    """`parse` for a count where None means every one: "all" (or "none") is None, a number's
    text is that int; anything else is left for the check."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "none"):
            return None
        if text.lstrip("-").isdigit():
            return int(text)
    return value


def pairs(value: Any) -> Any:
    """`parse` for a mapping field: ["KEY=VALUE", ...] (repeated flags) as a dict."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.split("=", 1) for v in value]
        bad = [v for v, kv in zip(value, items) if len(kv) != 2 or not all(kv)]
        if bad:
            raise ValueError(f"{bad}: expected KEY=VALUE")
        return dict(items)
    return value


def _parser(tp: Any, optional: bool = False) -> Any:
    """A converter from the command line's text; "none" is None for an optional field."""
    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text
    convert.__name__ = _type_name(tp)  # argparse names it in "invalid int value" errors
    return convert


# ---- progress within a part ---------------------------------------------------------------


class PartProgress:
    """A part worker that reports progress while it computes a part: it calls
    `self.report(n)` after each batch (n of the stage's progress units: images, exemplars), and
    the driver moves the stage's bar from the first batch instead of the first finished part
    (docs/architecture.md, "Parts"). Without a driver listening, `report` does nothing."""

    _reporter: Callable[[int], None] | None = None

    def set_reporter(self, reporter: Callable[[int], None] | None) -> None:
        """Send this worker's next reports to `reporter` (None: nowhere)."""
        self._reporter = reporter

    def report(self, n: int) -> None:
        """`n` more units of the current part are done."""
        if self._reporter is not None:
            self._reporter(n)


# ---- a part made from one input shard ----------------------------------------------------


def part_name(index: int) -> str:
    """The name of part `index`: `part-NNNNNN` (the manifest's and the files')."""
    return f"part-{index:06d}"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: shard `shard` (index `index` in the stage's shard list) becomes part
    `part-NNNNNN`, computed under `config_hash`; `fingerprint` identifies the shard's bytes."""

    index: int
    shard: str
    fingerprint: str
    config_hash: str

    @property
    def part(self) -> str:
        return part_name(self.index)

    @property
    def input(self) -> str:
        return self.shard


# ---- what every part-wise stage reports ---------------------------------------------------


def summarize_parts(root: AtlasRoot, stage: str, config_hash: str | None, skipped: Sequence[str],
                    failed: dict[str, str], seconds: float, unit: str) -> dict[str, Any]:
    """What every part-wise stage reports: parts done (committed under `config_hash`; None: any
    config), skipped (done before this run), new and failed; rows and seconds; the rate of the
    new parts over the run's wall time (`{unit}_per_s`) and over the workers' busy time."""
    records = root.manifest.records(stage)
    if config_hash is not None:
        records = {p: r for p, r in records.items() if r.config_hash == config_hash}
    new = [r for r in records.values() if r.part not in set(skipped)]
    rows_new = sum(r.rows for r in new)
    busy = sum(r.finished - r.started for r in new)
    return {
        "parts_done": len(records), "parts_skipped": len(skipped), "parts_new": len(new),
        "parts_failed": failed, "rows": sum(r.rows for r in records.values()),
        "errors": sum(r.errors for r in records.values()), "rows_new": rows_new,
        "seconds": round(seconds, 2),
        f"{unit}_per_s": round(rows_new / seconds, 2) if new and seconds > 0 else None,
        f"worker_{unit}_per_s": round(rows_new / busy, 2) if busy > 0 else None,
    }


def parts_line(stage: str, s: dict[str, Any], what: str) -> str:
    """The first line of a stage's summary: `what` done, parts new / skipped / failed, time."""
    return (f"[{stage}] {what} in {s['parts_done']} parts ({s['parts_new']} new, "
            f"{s['parts_skipped']} skipped, {len(s['parts_failed'])} failed), {s['seconds']:.1f}s")
