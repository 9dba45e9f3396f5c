"""YAML (or dict) configuration of a :class:`~ckptstore.CheckpointManager`, validated up front.

Every field is documented in ``configs/README.md``; ``configs/*.yaml`` are commented examples. Unknown keys
and wrong types raise :class:`~ckptstore.errors.ConfigError` naming the field (and the file), with a
did-you-mean hint for misspelt keys.

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

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .options import IOOptions
from .retention import RetentionPolicy, _reject_unknown_keys, _type_name, coerce_retention

__all__ = ["CONFIG_KEYS", "ENV_MIRROR", "ENV_ROOT", "ENV_STORAGE_OPTIONS", "ManagerConfig", "load_config"]

CONFIG_KEYS = (
    "root",
    "storage_options",
    "retention",
    "mirror",
    "io",
    "async_save",
    "overlap_staging",
    "allow_pickle",
    "timeout_seconds",
)
MIRROR_KEYS = ("url", "storage_options")

ENV_ROOT = "CKPTSTORE_ROOT"
ENV_MIRROR = "CKPTSTORE_MIRROR"
ENV_STORAGE_OPTIONS = "CKPTSTORE_STORAGE_OPTIONS"

# Key names whose values are hidden by ManagerConfig's repr: configs carry credentials via ${...}.
_SECRET_KEY = re.compile(r"key|secret|token|pass|credential|auth", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True, repr=False)
class ManagerConfig:
    """What :meth:`CheckpointManager.from_config` needs, validated, with environment overrides applied.

    ``timeout_seconds``, when set, is also folded into ``io.timeout_seconds`` so that both agree. The repr
    hides credential-like values of the storage options.

    Example::

        cfg = ManagerConfig(root="/ckpt/run-7", retention={"keep_last": 3})
        cfg.retention        # KeepLast(n=3)
        mgr = CheckpointManager(cfg.root, **cfg.to_kwargs())   # roughly what from_config does
    """

    root: str
    """Checkpoint root: a local path or fsspec URL (``/ckpt``, ``file:///ckpt``, ``s3://b/p``, ``memory://x``)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec as is for ``root`` (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``)."""
    retention: RetentionPolicy | None = None
    """Which steps to keep (a policy; a ``retention:`` dict is converted). ``None`` keeps everything."""
    mirror: str | None = None
    """Second root every committed step is also copied to (tiered storage), or ``None``."""
    mirror_storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``mirror`` (not inherited from ``storage_options``)."""
    io: IOOptions = field(default_factory=IOOptions)
    """I/O tuning; a dict is converted with :meth:`IOOptions.from_dict`."""
    async_save: bool = False
    """``save()`` returns a pending handle by default instead of blocking until the commit."""
    overlap_staging: bool = False
    """Async saves copy the state to staging memory in the background too; optimizer steps and forwards that
    change large buffers wait for the copy (see ``ckptstore.overlap``)."""
    allow_pickle: bool = False
    """Allow pickling values that are neither tensors, Stateful objects nor JSON values."""
    timeout_seconds: float | None = None
    """Give up on distributed collectives and waits after this long; ``None`` uses ``io.timeout_seconds``."""

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
        for name in ("async_save", "overlap_staging", "allow_pickle"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r} ({_type_name(value)})")
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
        """Every field but ``root`` as a dict (shallow: policies and IOOptions stay objects).

        Example::

            CheckpointManager(cfg.root, **cfg.to_kwargs())
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("storage_options"):
                value = _redact(value)
            parts.append(f"{f.name}={value!r}")
        return f"ManagerConfig({', '.join(parts)})"


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

    return ManagerConfig(
        root=root,
        storage_options=storage_options,
        retention=d.get("retention"),
        mirror=mirror,
        mirror_storage_options=mirror_options,
        io=io,
        async_save=d.get("async_save", False),
        overlap_staging=d.get("overlap_staging", False),
        allow_pickle=d.get("allow_pickle", False),
        timeout_seconds=d.get("timeout_seconds"),
    )


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
) -> ManagerConfig:
    """Load and validate a manager configuration from a YAML file path or a dict.

    Top-level keys: ``root`` (required), ``storage_options``, ``retention``, ``mirror`` (a URL or
    ``{url, storage_options}``), ``io``, ``async_save``, ``overlap_staging``, ``allow_pickle``,
    ``timeout_seconds``. String values may use ``${VAR}`` / ``${VAR:-default}`` (``$${`` is a literal
    ``${``); interpolation always yields strings. ``env`` (default ``os.environ``) is read for interpolation
    and the ``CKPTSTORE_*`` overrides.

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
