"""YAML (or dict) configuration of a :class:`~ckptstore.CheckpointManager`, validated up front.

ONE list of options: the fields of :class:`ManagerConfig` (with :class:`~ckptstore.options.IOOptions` nested
under ``io:``) define the YAML keys (:data:`CONFIG_KEYS`), the keyword arguments of the constructor
(:meth:`ManagerConfig.to_kwargs`, used by :meth:`CheckpointManager.from_config`) and the option tables of
``configs/README.md``, which are generated from them (``python -m ckptstore.config --markdown
configs/README.md`` rewrites them; a test fails when they are stale). A new ``IOOptions`` field needs no edit
here. ``configs/*.yaml`` are commented examples. Unknown keys and wrong types raise
:class:`~ckptstore.errors.ConfigError` naming the field (and the file), with a did-you-mean hint for misspelt
keys.

Resolution order, lowest to highest precedence:

1. the YAML file (or dict), with ``${VAR}`` / ``${VAR:-default}`` replaced in every string value;
2. ``CKPTSTORE_ROOT`` (replaces ``root``), ``CKPTSTORE_MIRROR`` (replaces the mirror URL) and
   ``CKPTSTORE_STORAGE_OPTIONS`` (a JSON object deep-merged over ``storage_options``).

Example::

    cfg = load_config("configs/local.yaml")
    cfg.root, cfg.retention, cfg.io.threads
    cfg = load_config({"root": "/ckpt/run-7", "retention": {"keep_last": 3}})
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .options import IOOptions
from .retention import RetentionPolicy, _reject_unknown_keys, _type_name, coerce_retention

__all__ = [
    "CONFIG_KEYS",
    "ENV_MIRROR",
    "ENV_ROOT",
    "ENV_STORAGE_OPTIONS",
    "RUNTIME_KWARGS",
    "ManagerConfig",
    "load_config",
    "markdown_tables",
]

ENV_ROOT = "CKPTSTORE_ROOT"
ENV_MIRROR = "CKPTSTORE_MIRROR"
ENV_STORAGE_OPTIONS = "CKPTSTORE_STORAGE_OPTIONS"

# Key names whose values are hidden by ManagerConfig's repr: configs carry credentials via ${...}.
_SECRET_KEY = re.compile(r"key|secret|token|pass|credential|auth", re.IGNORECASE)

RUNTIME_KWARGS = ("comm",)
"""Keyword arguments of ``CheckpointManager`` that are objects, not settings, and so have no config field."""


def _meta(
    *,
    type: str,
    default_doc: str,
    doc: str,
    kwarg: bool = True,
    yaml: str | None = None,
    extra_rows: tuple[tuple[str, str, str, str], ...] = (),
) -> dict[str, Any]:
    """The metadata that makes a :class:`ManagerConfig` field one documented option.

    ``type``, ``default_doc`` and ``doc`` (Markdown) fill its row of the table in ``configs/README.md``;
    ``kwarg`` says whether it is a constructor keyword argument of the same name; ``yaml`` is its YAML key when
    that is not the field name (a dotted key lives in a nested mapping); ``extra_rows`` are further table rows
    ``(key, type, default, meaning)`` of its sub-keys.
    """
    return {"type": type, "default": default_doc, "doc": doc, "kwarg": kwarg, "yaml": yaml, "rows": extra_rows}


def _yaml_key(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("yaml") or f.name


@dataclass(frozen=True, kw_only=True, repr=False)
class ManagerConfig:
    """The options of a :class:`~ckptstore.CheckpointManager`, validated, with environment overrides applied.

    Each field is one option; its metadata (see :func:`markdown_tables`) gives the YAML key, the documented
    type, default and meaning, and whether it is a keyword argument of the constructor. All fields but
    ``root`` (positional) and ``timeout_seconds`` (a shorthand folded into ``io.timeout_seconds``, so that both
    agree) are constructor keywords of the same name; ``comm`` is the only constructor keyword without a field
    (:data:`RUNTIME_KWARGS`). The repr hides credential-like values of the storage options.

    Example::

        cfg = ManagerConfig(root="/ckpt/run-7", retention={"keep_last": 3})
        cfg.retention        # KeepLast(n=3)
        mgr = CheckpointManager(cfg.root, **cfg.to_kwargs())   # what from_config does
    """

    root: str = field(
        metadata=_meta(
            kwarg=False,
            type="string",
            default_doc="**required**",
            doc="Where steps are stored. This is a local path (relative to the working directory, `~` expanded) or "
            "an fsspec URL: `/ckpt/run`, `file:///ckpt/run`, `s3://bucket/prefix`, `memory://name`. Each step goes "
            "under `<root>/step-<number>/`. `$CKPTSTORE_ROOT` replaces it. The constructor's first (positional) "
            "argument.",
        ),
    )
    storage_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_meta(
            type="mapping",
            default_doc="`{}`",
            doc="Keyword arguments passed as is to the fsspec filesystem of `root`, e.g. `client_kwargs: "
            "{endpoint_url: ...}`, `key`, `secret` for s3fs. `$CKPTSTORE_STORAGE_OPTIONS` is deep-merged over it.",
        ),
    )
    retention: RetentionPolicy | None = field(
        default=None,
        metadata=_meta(
            type="mapping or null",
            default_doc="`null` (keep every step)",
            doc="Which steps to keep after each commit (a `retention:` mapping is converted to a policy). See "
            "[Retention](#retention).",
        ),
    )
    mirror: str | None = field(
        default=None,
        metadata=_meta(
            type="string, mapping or null",
            default_doc="`null`",
            doc="A second tier that every committed step is also copied to. Give either a URL string or `{url: URL, "
            "storage_options: {...}}`. `$CKPTSTORE_MIRROR` replaces the URL. The mirror must differ from `root`.",
            extra_rows=(
                (
                    "mirror.url",
                    "string",
                    "required if `mirror` is a mapping",
                    "The mirror's path or fsspec URL (the `mirror` keyword argument).",
                ),
            ),
        ),
    )
    mirror_storage_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_meta(
            yaml="mirror.storage_options",
            type="mapping",
            default_doc="`{}`",
            doc="fsspec options for the mirror. They are **not** inherited from `storage_options`.",
        ),
    )
    io: IOOptions = field(
        default_factory=IOOptions,
        metadata=_meta(
            type="mapping",
            default_doc="all defaults",
            doc="I/O tuning (`ckptstore.options.IOOptions`; a mapping is converted), see [I/O options](#io-options).",
        ),
    )
    async_save: bool = field(
        default=False,
        metadata=_meta(
            type="bool",
            default_doc="`false`",
            doc="If `true`, `save()` returns a `PendingSave` by default and the write runs in the background. "
            "`mgr.wait()` or `close()` waits for it.",
        ),
    )
    overlap_staging: bool = field(
        default=False,
        metadata=_meta(
            type="bool",
            default_doc="`false`",
            doc="Async saves also copy the state to staging memory in the background: `save()` returns in about a "
            "millisecond (it copies only tensors up to 64 KiB, such as BatchNorm statistics), and `optimizer.step()`, "
            "forwards of modules with larger buffers and DDP forwards that broadcast them wait for the copy. Other "
            "in-place changes must call `PendingSave.wait_staged()` first, or the save fails with "
            "`StateChangedError`. See `ckptstore/overlap.py`.",
        ),
    )
    allow_pickle: bool = field(
        default=False,
        metadata=_meta(
            type="bool",
            default_doc="`false`",
            doc="Allow values that are not tensors, Stateful objects or JSON values to be stored with pickle. A step "
            "stored this way loads only with `trusted=True`.",
        ),
    )
    distributed: bool | None = field(
        default=None,
        metadata=_meta(
            type="bool or null",
            default_doc="`null` (auto)",
            doc="`null`: take part in the torch.distributed job when one is initialised with more than one rank. "
            "`false`: never talk to other ranks (a manager on rank 0 alone for evaluation or export; it saves and "
            "restores as a single process). `true`: require an initialised job (error otherwise).",
        ),
    )
    timeout_seconds: float | None = field(
        default=None,
        metadata=_meta(
            kwarg=False,
            type="number or null",
            default_doc="`null` (use `io.timeout_seconds`, 600)",
            doc="Distributed collectives and waits give up after this many seconds, so no rank hangs forever. This "
            "is a shorthand for `io.timeout_seconds`: the loader copies it there (so the constructor gets it inside "
            "`io=`; it has no `timeout_seconds` argument). Setting both to different values is an error.",
        ),
    )

    def __post_init__(self) -> None:
        root = self.root
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if not isinstance(root, str) or not root.strip():
            raise ConfigError(
                f"root must be a non-empty string (a path or URL such as s3://bucket/run), "
                f"got {root!r} ({_type_name(root)}); it can also come from ${ENV_ROOT}"
            )
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "storage_options", _options_dict(self.storage_options, "storage_options"))
        object.__setattr__(
            self,
            "mirror_storage_options",
            _options_dict(self.mirror_storage_options, "mirror.storage_options"),
        )
        if self.mirror is not None:
            if not isinstance(self.mirror, str) or not self.mirror.strip():
                raise ConfigError(
                    f"mirror.url must be a non-empty string (a path or URL), got {self.mirror!r} "
                    f"({_type_name(self.mirror)})"
                )
            if self.mirror.rstrip("/") == root.rstrip("/"):
                raise ConfigError(f"mirror must differ from root (both are {root!r})")
        elif self.mirror_storage_options:
            raise ConfigError("mirror.storage_options is set but mirror (the URL) is not")
        object.__setattr__(self, "retention", coerce_retention(self.retention))
        io = self.io
        if isinstance(io, Mapping):
            io = IOOptions.from_dict(dict(io))
        elif not isinstance(io, IOOptions):
            raise ConfigError(f"io must be a mapping of I/O options, got {io!r} ({_type_name(io)})")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ConfigError(f"{_yaml_key(f)} must be true or false, got {value!r} ({_type_name(value)})")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise ConfigError(
                f"distributed must be true, false or null, got {self.distributed!r} ({_type_name(self.distributed)})"
            )
        t = self.timeout_seconds
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ConfigError(
                    f"timeout_seconds must be a positive number of seconds or null, got {t!r} ({_type_name(t)})"
                )
            default = IOOptions().timeout_seconds
            if io.timeout_seconds not in (default, t):
                # Two different values for the same knob: refuse rather than guess which one wins.
                raise ConfigError(
                    f"timeout_seconds ({t:g}) conflicts with io.timeout_seconds ({io.timeout_seconds:g}); "
                    "set only one of them"
                )
            t = float(t)
            io = dataclasses.replace(io, timeout_seconds=t)
        object.__setattr__(self, "timeout_seconds", t)
        object.__setattr__(self, "io", io)

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the constructor, exactly: every field but ``root`` and ``timeout_seconds``
        (which is inside ``io``). Shallow: the policy and the IOOptions stay objects.

        Example::

            CheckpointManager(cfg.root, **cfg.to_kwargs())
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("kwarg", True)}

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("storage_options"):
                value = _redact(value)
            parts.append(f"{f.name}={value!r}")
        return f"ManagerConfig({', '.join(parts)})"


CONFIG_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys(_yaml_key(f).split(".")[0] for f in dataclasses.fields(ManagerConfig))
)
"""The top-level YAML keys, in documentation order (derived from the fields of :class:`ManagerConfig`)."""
MIRROR_KEYS: tuple[str, ...] = (
    "url",
    *(_yaml_key(f).split(".", 1)[1] for f in dataclasses.fields(ManagerConfig) if _yaml_key(f).startswith("mirror.")),
)
# Fields whose YAML form needs more than "the value of the key": environment overrides, nesting, sizes.
_SHAPED = frozenset({"root", "storage_options", "mirror", "mirror_storage_options", "io"})


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: "***" if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, str) else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _options_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} must be a mapping (passed to fsspec as keyword arguments), got {value!r} ({_type_name(value)})"
        )
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where} keys must be strings, got {bad[0]!r}")
    return dict(value)


# -- ${VAR} interpolation ------------------------------------------------------------------------------------

# `$${` escapes a literal `${`; otherwise `${` opens a reference that must close on the same string.
_REF = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def _interpolate_str(s: str, env: Mapping[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        body = m.group("body")
        if not m.group("close"):
            raise ConfigError(f"{where}: unterminated reference '${{{body}' (expected ${{NAME}})")
        ref = _BODY.fullmatch(body)
        if ref is None:
            raise ConfigError(f"{where}: invalid reference '${{{body}}}' (expected ${{NAME}} or ${{NAME:-default}})")
        name, default = ref.group("name"), ref.group("default")
        value = env.get(name)
        if default is not None:
            # Shell semantics of `:-`: the default also replaces a set-but-empty variable.
            return value if value else default
        if value is None:
            raise ConfigError(
                f"{where}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}} to give a default)"
            )
        return value

    return _REF.sub(sub, s)


def _interpolate(value: Any, env: Mapping[str, str], where: str) -> Any:
    # Returns new containers, so the caller's dict is never mutated.
    if isinstance(value, str):
        return _interpolate_str(value, env, where or "value")
    if isinstance(value, Mapping):
        return {k: _interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value))
    return value


# -- sizes ---------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)


def _parse_size(value: Any, where: str) -> Any:
    """``"64MiB"`` → 67108864 for the ``io.*_bytes`` fields; other values pass through to IOOptions' checks.

    ``K/M/G/T`` (with or without ``B``) are powers of 1000, ``Ki/Mi/Gi/Ti`` (``KiB``…) powers of 1024.
    """
    if not isinstance(value, str):
        return value
    m = _SIZE.fullmatch(value)
    if m is None:
        raise ConfigError(
            f"{where} must be a positive number of bytes or a size such as '64MiB' or '1GB', got {value!r}"
        )
    number, unit = m.group(1), (m.group(2) or "").lower().removesuffix("b")
    if not unit:
        scale = 1
    else:
        power = "kmgt".index(unit[0]) + 1
        scale = 1024**power if unit.endswith("i") else 1000**power
    nbytes = float(number) * scale
    if nbytes != int(nbytes):
        raise ConfigError(f"{where} must be a whole number of bytes, got {value!r}")
    return int(nbytes)


# -- loading -------------------------------------------------------------------------------------------------


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` legitimately repeats keys that the mapping then overrides
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: SafeLoader reports it itself
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _build(data: Mapping[Any, Any], env: Mapping[str, str]) -> ManagerConfig:
    _reject_unknown_keys(data, CONFIG_KEYS, "config")
    data = dict(data)
    # A value replaced by an override is not interpolated: `root: ${SCRATCH}/run` must not fail on an unset
    # SCRATCH when CKPTSTORE_ROOT says where to write anyway.
    if env.get(ENV_ROOT):
        data.pop("root", None)
    if env.get(ENV_MIRROR):
        if isinstance(data.get("mirror"), Mapping):
            data["mirror"] = {k: v for k, v in data["mirror"].items() if k != "url"} | {"url": env[ENV_MIRROR]}
        else:
            data["mirror"] = env[ENV_MIRROR]
    d: dict[str, Any] = _interpolate(data, env, "")

    root = d.get("root")
    if env.get(ENV_ROOT):
        root = env[ENV_ROOT]  # re-applied: override values are never interpolated
    if root is None:
        raise ConfigError(
            f"root is required (the checkpoint directory or URL): set 'root:' in the config or ${ENV_ROOT}"
        )

    storage_options = _options_dict(d.get("storage_options"), "storage_options")
    raw_env_options = env.get(ENV_STORAGE_OPTIONS)
    if raw_env_options:
        try:
            env_options = json.loads(raw_env_options)
        except json.JSONDecodeError as e:
            # The value is not echoed: it typically carries credentials.
            raise ConfigError(f"${ENV_STORAGE_OPTIONS} is not valid JSON: {e.msg} at char {e.pos}") from None
        if not isinstance(env_options, dict):
            raise ConfigError(f"${ENV_STORAGE_OPTIONS} must be a JSON object, got a {type(env_options).__name__}")
        storage_options = _deep_merge(storage_options, env_options)

    mirror, mirror_options = d.get("mirror"), {}
    if isinstance(mirror, Mapping):
        _reject_unknown_keys(mirror, MIRROR_KEYS, "mirror")
        if "url" not in mirror:
            raise ConfigError("mirror.url is required when mirror is a mapping")
        mirror_options = _options_dict(mirror.get("storage_options"), "mirror.storage_options")
        mirror = mirror["url"]
    elif mirror is not None and not isinstance(mirror, str):
        raise ConfigError(
            f"mirror must be a URL string or a mapping {{url: ..., storage_options: {{...}}}}, "
            f"got {mirror!r} ({_type_name(mirror)})"
        )
    if env.get(ENV_MIRROR):
        mirror = env[ENV_MIRROR]  # re-applied: override values are never interpolated

    io = d.get("io")
    if io is None:
        io = {}
    elif isinstance(io, Mapping):
        io = {k: _parse_size(v, f"io.{k}") if str(k).endswith("_bytes") else v for k, v in io.items()}
    # A non-mapping io is reported by ManagerConfig with the field name.

    kwargs: dict[str, Any] = {
        f.name: d[_yaml_key(f)]
        for f in dataclasses.fields(ManagerConfig)
        if f.name not in _SHAPED and _yaml_key(f) in d
    }
    return ManagerConfig(
        root=root,
        storage_options=storage_options,
        mirror=mirror,
        mirror_storage_options=mirror_options,
        io=io,
        **kwargs,
    )


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
) -> ManagerConfig:
    """Load and validate a manager configuration from a YAML file path or a dict.

    The keys are :data:`CONFIG_KEYS` (``root`` is required), documented in ``configs/README.md``; ``io:`` takes
    the fields of :class:`~ckptstore.options.IOOptions`. String values may use ``${VAR}`` /
    ``${VAR:-default}`` (``$${`` is a literal ``${``); interpolation always yields strings. ``env`` (default
    ``os.environ``) is read for interpolation and the ``CKPTSTORE_*`` overrides.

    Raises :class:`~ckptstore.errors.ConfigError` (a ``ValueError``) for a missing or unreadable file, invalid
    YAML, unknown keys (with a did-you-mean), wrong types or unset variables; messages from a file start with
    its path.

    Example::

        cfg = load_config("configs/s3.yaml")                        # reads $AWS_ACCESS_KEY_ID etc.
        cfg = load_config({"root": "memory://t", "retention": {"keep_last": 2}}, env={})
    """
    env = os.environ if env is None else env
    if isinstance(source, Mapping):
        return _build(source, env)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config source must be a YAML file path or a dict, got {source!r} ({_type_name(source)})")
    path = os.path.expanduser(os.fspath(source))
    data = _read_yaml(path)
    if data is None:
        data = {}  # an empty file: report the missing root below, with the path
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got a {_type_name(data)}")
    try:
        return _build(data, env)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# -- documentation -------------------------------------------------------------------------------------------


def _attribute_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (e.g. a frozen app): no docs, the test reports it
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _cell(text: str) -> str:
    # One table cell: RST ``literal`` -> Markdown `literal`, one line, pipes escaped.
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def _io_type(f: dataclasses.Field[Any]) -> str:
    annotation = str(f.type).replace(" ", "")
    nullable = "None" in annotation.split("|")
    base = annotation.split("|")[0]
    if f.name.endswith("_bytes"):
        kind = "size"
    else:
        kind = {"bool": "bool", "int": "int", "float": "number", "str": "string"}.get(base, base)
    return f"{kind} or null" if nullable else kind


def _io_default(f: dataclasses.Field[Any]) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if f.name.endswith("_bytes") and isinstance(value, int) and value:
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % scale == 0:
                return f"`{value // scale}{unit}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _rows(rows: Sequence[tuple[str, str, str, str]], head: str) -> str:
    lines = [f"| {head} | Type | Default | Meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {_cell(typ)} | {_cell(default)} | {_cell(doc)} |" for key, typ, default, doc in rows]
    return "\n".join(lines)


def markdown_tables() -> dict[str, str]:
    """The option tables of ``configs/README.md``, generated from the fields: ``{"fields": ..., "io": ...}``.

    ``"fields"`` has a row per :class:`ManagerConfig` field (its metadata); ``"io"`` a row per
    :class:`~ckptstore.options.IOOptions` field, with the type and default read from the field and the meaning
    from its docstring (or a ``doc`` metadata entry). ``python -m ckptstore.config --markdown configs/README.md``
    writes them between the ``<!-- BEGIN GENERATED: name -->`` / ``<!-- END GENERATED: name -->`` markers.

    Example::

        print(markdown_tables()["io"])
    """
    top = []
    for f in dataclasses.fields(ManagerConfig):
        m = f.metadata
        # A field declared without metadata=_meta(...) gets empty cells, which the README test reports.
        top.append((_yaml_key(f), m.get("type", ""), m.get("default", ""), m.get("doc", "")))
        top.extend(m.get("rows", ()))
    io_docs = _attribute_docs(IOOptions)
    io_rows = [
        (f"io.{f.name}", _io_type(f), _io_default(f), f.metadata.get("doc") or io_docs.get(f.name, ""))
        for f in dataclasses.fields(IOOptions)
    ]
    return {"fields": _rows(top, "Field"), "io": _rows(io_rows, "Key")}


def _marker(name: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN GENERATED: {name} (python -m ckptstore.config --markdown configs/README.md; edit the fields) -->",
        f"<!-- END GENERATED: {name} -->",
    )


def update_markdown(text: str) -> str:
    """``text`` with every generated table (between its markers) replaced by the current one.

    Raises :class:`~ckptstore.errors.ConfigError` when a table's markers are missing.
    """
    for name, table in markdown_tables().items():
        begin, end = _marker(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ConfigError(
                f"the markers of the generated {name!r} table are missing: put {begin} and {end} around it"
            )
        text = text[: start + len(begin)] + "\n" + table + "\n" + text[stop:]
    return text


def _main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ckptstore.config", description="Print or update the option tables of configs/README.md."
    )
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        metavar="README",
        required=True,
        help="print the tables, or rewrite them in README between their markers",
    )
    args = parser.parse_args(argv)
    if args.markdown == "-":
        for name, table in markdown_tables().items():
            print(f"{_marker(name)[0]}\n{table}\n{_marker(name)[1]}\n")
        return 0
    try:
        with open(args.markdown, encoding="utf-8") as fh:
            old = fh.read()
        new = update_markdown(old)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new != old:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(new)
    print(f"{args.markdown}: {'updated' if new != old else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
