"""load_config / ManagerConfig: schema, error messages, ${VAR} interpolation and CKPTSTORE_* overrides."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

import ckptstore.config as config
from ckptstore import CheckpointManager
from ckptstore.config import CONFIG_KEYS, ManagerConfig, load_config
from ckptstore.dist import LocalComm
from ckptstore.errors import ConfigError
from ckptstore.options import IOOptions, MiB
from ckptstore.retention import RETENTION_KEYS, AnyOf, KeepBest, KeepLast, KeepPinned

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
    "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
}


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def config_error(source: object, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(source, env={} if env is None else env)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    return str(e.value)


# -- the shipped example files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path, env=S3_ENV)
    assert isinstance(cfg, ManagerConfig)
    assert cfg.root and "${" not in cfg.root
    assert cfg.retention is not None
    assert "${" not in repr(cfg.storage_options) + repr(cfg.mirror_storage_options)


def test_shipped_configs_exist_and_match_their_purpose() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"local.yaml", "s3.yaml", "tiered.yaml"} <= names

    local = load_config(CONFIGS / "local.yaml", env={})
    assert "://" not in local.root
    assert local.retention == AnyOf(KeepLast(n=3), KeepBest(k=2, metric="loss", mode="min"))

    s3 = load_config(CONFIGS / "s3.yaml", env=S3_ENV)
    assert s3.root.startswith("s3://")
    assert s3.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert s3.storage_options["key"] == "AKIDEXAMPLE"
    assert s3.storage_options["secret"] == "wJalrXUtnFEMI"
    assert s3.io.part_bytes == 64 * MiB

    tiered = load_config(CONFIGS / "tiered.yaml", env=S3_ENV)
    assert "://" not in tiered.root
    assert tiered.mirror is not None and tiered.mirror.startswith("s3://")
    assert tiered.mirror_storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"


def test_s3_config_names_missing_credentials() -> None:
    msg = config_error(CONFIGS / "s3.yaml", env={"S3_ENDPOINT_URL": "http://x"})
    assert "s3.yaml" in msg
    assert "storage_options.key: environment variable AWS_ACCESS_KEY_ID is not set" in msg


def test_readme_documents_every_field() -> None:
    readme = (CONFIGS / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)`", readme, flags=re.M))
    expected = set(CONFIG_KEYS) | set(RETENTION_KEYS) | {f"io.{name}" for name in IOOptions.__dataclass_fields__}
    expected |= {"mirror.url", "mirror.storage_options", "keep_best.k", "keep_best.metric", "keep_best.mode"}
    assert expected <= documented, sorted(expected - documented)
    for var in ("CKPTSTORE_ROOT", "CKPTSTORE_MIRROR", "CKPTSTORE_STORAGE_OPTIONS"):
        assert f"`{var}`" in readme


# -- one list of options: config fields = YAML keys = constructor keywords = README tables -------------------------

REPO = CONFIGS.parent


def _documented_keys() -> list[str]:
    readme = (CONFIGS / "README.md").read_text()
    keys = []
    for name in ("fields", "io"):
        block = readme.split(f"<!-- BEGIN GENERATED: {name} ")[1].split(f"<!-- END GENERATED: {name} -->")[0]
        keys += re.findall(r"^\| `([a-z0-9_.]+)`", block, flags=re.M)
    return keys


def test_readme_tables_are_the_ones_generated_from_the_fields() -> None:
    readme = (CONFIGS / "README.md").read_text()
    assert config.update_markdown(readme) == readme, (
        "stale: run python -m ckptstore.config --markdown configs/README.md"
    )
    tables = config.markdown_tables()
    for table in tables.values():
        assert table in readme
    # every field has its row with every cell filled, whatever fields ManagerConfig and IOOptions grow
    rows = [(f"io.{f.name}", tables["io"]) for f in dataclasses.fields(IOOptions)]
    rows += [(f.metadata.get("yaml") or f.name, tables["fields"]) for f in dataclasses.fields(ManagerConfig)]
    for key, table in rows:
        row = re.search(rf"^\| `{re.escape(key)}` \|(.*)\|(.*)\|(.*)\|$", table, flags=re.M)
        assert row is not None, key
        assert all(cell.strip() for cell in row.groups()), f"{key} has an empty cell: document the field"
    keys = _documented_keys()
    assert len(keys) == len(set(keys))
    assert set(CONFIG_KEYS) <= set(keys)


def test_update_markdown_rewrites_a_stale_table_and_needs_its_markers() -> None:
    readme = (CONFIGS / "README.md").read_text()
    stale = readme.replace("| `io.threads` | int | `4` |", "| `io.threads` | int | `8` |")
    assert stale != readme
    assert config.update_markdown(stale) == readme
    with pytest.raises(ConfigError, match="markers of the generated 'io' table are missing"):
        config.update_markdown(readme.replace("<!-- END GENERATED: io -->", ""))


@pytest.mark.timeout(120)
def test_markdown_command_prints_and_rewrites(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "ckptstore.config", "--markdown"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    for table in config.markdown_tables().values():
        assert table in out.stdout
    copy = tmp_path / "README.md"
    copy.write_text((CONFIGS / "README.md").read_text().replace("`512MiB`", "`1MiB`"))
    cmd = [sys.executable, "-m", "ckptstore.config", "--markdown", str(copy)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0 and first.stdout.strip().endswith("updated"), first.stderr
    assert copy.read_text() == (CONFIGS / "README.md").read_text()
    (tmp_path / "bare.md").write_text("# no markers\n")
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "bare.md")], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "markers of the generated" in bad.stderr


def test_config_keywords_are_exactly_the_constructor_keywords() -> None:
    sig = inspect.signature(CheckpointManager.__init__)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:2]] == ["self", "root"]
    keyword = {p.name: p for p in params[2:]}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in keyword.values())
    cfg = ManagerConfig(root="memory://x")
    kwargs = cfg.to_kwargs()
    assert set(keyword) == set(kwargs) | set(config.RUNTIME_KWARGS)
    assert not set(kwargs) & set(config.RUNTIME_KWARGS)
    # Same defaults: the constructor's None for a mapping or IOOptions means the config's empty default.
    for name, value in kwargs.items():
        default = keyword[name].default
        assert default == value or (default is None and value in ({}, IOOptions())), name


def test_constructor_accepts_the_config_kwargs_and_agrees_on_defaults() -> None:
    # CheckpointManager(cfg.root, **cfg.to_kwargs()), as config.py documents it, raised TypeError on timeout_seconds.
    cfg = load_config({"root": f"memory://cfg-{uuid.uuid4().hex}", "timeout_seconds": 33}, env={})
    with CheckpointManager(cfg.root, **cfg.to_kwargs()) as mgr, CheckpointManager(cfg.root) as plain:
        assert mgr.io == dataclasses.replace(plain.io, timeout_seconds=33.0)
        for attr in ("retention", "allow_pickle", "async_save", "overlap_staging", "mirror_storage"):
            assert getattr(mgr, attr) == getattr(plain, attr), attr


def _sample_io_value(f: dataclasses.Field[Any]) -> Any:
    # A valid value different from the default for any IOOptions field, also fields added later.
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, bool):
        candidates: list[Any] = [not default]
    elif default is None:
        candidates = [24 * MiB, 3, 1.5, True]
    elif isinstance(default, str):  # an enumeration (verify_replicas): another of its values
        candidates = ["full", "off"]
    elif isinstance(default, (int, float)):
        candidates = [default + MiB if f.name.endswith("_bytes") else default + 1, default * 2, default - 1]
    else:
        raise AssertionError(f"no sample value for io.{f.name} = {default!r}: extend _sample_io_value")
    for value in candidates:
        try:
            IOOptions(**{f.name: value})
        except (ConfigError, TypeError):
            continue
        return value
    raise AssertionError(f"no valid non-default sample value for io.{f.name}: extend _sample_io_value")


def test_every_documented_key_round_trips_to_the_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CKPTSTORE_ROOT", "CKPTSTORE_MIRROR", "CKPTSTORE_STORAGE_OPTIONS"):
        monkeypatch.delenv(var, raising=False)
    run = uuid.uuid4().hex
    io_values = {f.name: _sample_io_value(f) for f in dataclasses.fields(IOOptions)}
    io_values["timeout_seconds"] = 123.0  # the same value as the top-level shorthand: both keys round-trip
    # sizes written as strings where they can be, so the YAML parsing of sizes is part of the trip
    io_yaml = {
        k: f"{v // MiB}MiB" if k.endswith("_bytes") and isinstance(v, int) and v % MiB == 0 else v
        for k, v in io_values.items()
    }
    doc = {
        "root": f"memory://rt-{run}",
        "storage_options": {"rt_option": run},
        "retention": {"keep_last": 2, "keep_best": {"k": 1, "metric": "acc", "mode": "max"}},
        "mirror": {"url": f"memory://rt-mirror-{run}", "storage_options": {"mirror_option": run}},
        "io": io_yaml,
        "async_save": True,
        "overlap_staging": True,
        "allow_pickle": True,
        "distributed": False,
        "timeout_seconds": 123,
    }
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(doc))

    def opts(storage: Any) -> dict[str, Any]:
        return dict(storage.fs.storage_options)

    expected_retention = KeepLast(n=2) | KeepBest(k=1, metric="acc", mode="max")
    checks = {
        "root": lambda m: m.url == doc["root"],
        "storage_options": lambda m: opts(m.storage) == {"rt_option": run},
        "retention": lambda m: m.retention == expected_retention,
        "mirror": lambda m: m.mirror_storage is not None and m.mirror_storage.url == doc["mirror"]["url"],
        "mirror.url": lambda m: m.mirror_storage.url == doc["mirror"]["url"],
        "mirror.storage_options": lambda m: opts(m.mirror_storage) == {"mirror_option": run},
        "io": lambda m: m.io == IOOptions(**io_values),
        "async_save": lambda m: m.async_save is True,
        "overlap_staging": lambda m: m.overlap_staging is True,
        "allow_pickle": lambda m: m.allow_pickle is True,
        "distributed": lambda m: type(m.comm) is LocalComm,
        "timeout_seconds": lambda m: m.io.timeout_seconds == 123.0,
    }
    for name, value in io_values.items():
        checks[f"io.{name}"] = lambda m, name=name, value=value: getattr(m.io, name) == value
    # A documented key without a check here fails: extend `checks` (and `doc`) for a new top-level field.
    assert set(_documented_keys()) == set(checks)
    # and every documented key is set (to a non-default value) in the YAML above
    flat = {k for k in doc} | {f"io.{k}" for k in doc["io"]} | {f"mirror.{k}" for k in doc["mirror"]}
    assert set(_documented_keys()) == flat

    cfg = load_config(path)
    with CheckpointManager(cfg.root, **cfg.to_kwargs()) as direct, CheckpointManager.from_config(path) as built:
        for key, check in checks.items():
            assert check(direct), f"{key} did not reach CheckpointManager(cfg.root, **cfg.to_kwargs())"
            assert check(built), f"{key} did not reach CheckpointManager.from_config()"


def test_defaults_round_trip_too() -> None:
    with CheckpointManager.from_config({"root": f"memory://d-{uuid.uuid4().hex}"}) as mgr:
        assert mgr.io == IOOptions()
        assert (mgr.retention, mgr.mirror_storage, mgr.async_save, mgr.allow_pickle) == (None, None, False, False)


def test_from_config_overrides_are_constructor_keywords() -> None:
    from ckptstore.dist import LocalComm

    comm = LocalComm()
    src = {"root": f"memory://o-{uuid.uuid4().hex}", "retention": {"keep_last": 5}}
    with CheckpointManager.from_config(src, comm=comm, retention={"keep_last": 1}) as mgr:
        assert mgr.comm is comm
        assert mgr.retention == KeepLast(n=1)
    with pytest.raises(TypeError, match="timeout_secs"):
        CheckpointManager.from_config(src, timeout_secs=3)


def test_shipped_local_config_sets_every_top_level_key() -> None:
    data = yaml.safe_load((CONFIGS / "local.yaml").read_text())
    assert set(data) == set(CONFIG_KEYS)


# -- schema --------------------------------------------------------------------------------------------------------


def test_minimal_dict_gets_defaults() -> None:
    cfg = load_config({"root": "memory://run"}, env={})
    assert cfg == ManagerConfig(root="memory://run")
    assert cfg.storage_options == {} and cfg.mirror_storage_options == {}
    assert cfg.retention is None and cfg.mirror is None
    assert cfg.io == IOOptions()
    assert (cfg.async_save, cfg.allow_pickle, cfg.timeout_seconds) == (False, False, None)


def test_full_yaml(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        root: /ckpt/run-7
        storage_options: {auto_mkdir: true}
        retention:
          keep_last: 2
          pinned: [1200, 300]
        mirror: s3://bucket/run-7
        io: {threads: 8, part_bytes: 64MiB, file_bytes: 1GB, verify: false}
        async_save: true
        allow_pickle: true
        timeout_seconds: 120
        """,
    )
    cfg = load_config(str(p), env={})
    assert cfg.root == "/ckpt/run-7"
    assert cfg.storage_options == {"auto_mkdir": True}
    assert cfg.retention == AnyOf(KeepLast(n=2), KeepPinned(steps=(300, 1200)))
    assert cfg.mirror == "s3://bucket/run-7" and cfg.mirror_storage_options == {}
    assert cfg.io == IOOptions(threads=8, part_bytes=64 * MiB, file_bytes=10**9, verify=False, timeout_seconds=120)
    assert cfg.async_save is True and cfg.allow_pickle is True
    assert cfg.timeout_seconds == 120.0
    assert set(cfg.to_kwargs()) == set(CONFIG_KEYS) - {"root", "timeout_seconds"} | {"mirror_storage_options"}


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, "root: /r\nstorage_options:\nretention:\nmirror:\nio:\n")
    assert load_config(p, env={}) == ManagerConfig(root="/r")


def test_mirror_mapping(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        root: /fast
        mirror:
          url: s3://b/p
          storage_options: {anon: false}
        """,
    )
    cfg = load_config(p, env={})
    assert cfg.mirror == "s3://b/p"
    assert cfg.mirror_storage_options == {"anon": False}


def test_dict_source_is_not_mutated() -> None:
    src = {"root": "${R}", "storage_options": {"client_kwargs": {"endpoint_url": "${E:-http://e}"}}}
    before = repr(src)
    cfg = load_config(src, env={"R": "/r"})
    assert repr(src) == before
    assert cfg.storage_options == {"client_kwargs": {"endpoint_url": "http://e"}}


def test_manager_config_direct_construction_validates_and_converts() -> None:
    cfg = ManagerConfig(root=Path("/x"), retention={"keep_last": 1}, io={"threads": 2})  # type: ignore[arg-type]
    assert cfg.root == "/x"
    assert cfg.retention == KeepLast(n=1)
    assert cfg.io.threads == 2
    with pytest.raises(TypeError):
        ManagerConfig("/x")  # type: ignore[misc]  # keyword-only
    with pytest.raises(AttributeError):
        cfg.root = "/y"  # type: ignore[misc]


# -- error messages ------------------------------------------------------------------------------------------------

BAD = [
    # (config, fragments expected in the message)
    ({"root": "/r", "retension": {}}, ["unknown config key 'retension'", "did you mean 'retention'?", "valid keys:"]),
    ({"root": "/r", "storage_option": {}}, ["'storage_option' (did you mean 'storage_options'?)"]),
    ({"root": "/r", "asyncsave": True}, ["'asyncsave' (did you mean 'async_save'?)"]),
    ({"root": "/r", "Root": "/x"}, ["'Root' (did you mean 'root'?)"]),
    ({"root": "/r", "zebra": 1}, ["unknown config key 'zebra'; valid keys: allow_pickle, async_save, distributed, io"]),
    ({}, ["root is required", "CKPTSTORE_ROOT"]),
    ({"root": ""}, ["root must be a non-empty string"]),
    ({"root": 42}, ["root must be a non-empty string", "got 42 (int)"]),
    ({"root": "/r", "storage_options": "anon"}, ["storage_options must be a mapping", "got 'anon' (str)"]),
    ({"root": "/r", "storage_options": {1: 2}}, ["storage_options keys must be strings, got 1"]),
    ({"root": "/r", "retention": {"keep_lst": 3}}, ["unknown retention key 'keep_lst' (did you mean 'keep_last'?)"]),
    ({"root": "/r", "retention": {"keep_last": "3"}}, ["retention.keep_last must be a positive integer", "'3'"]),
    ({"root": "/r", "retention": {"keep_best": {"mode": "avg"}}}, ["retention.keep_best.mode must be 'min' or 'max'"]),
    ({"root": "/r", "retention": 3}, ["retention must be None, a dict or a policy object"]),
    ({"root": "/r", "mirror": 5}, ["mirror must be a URL string or a mapping {url: ..., storage_options: {...}}"]),
    ({"root": "/r", "mirror": {"uri": "s3://b"}}, ["unknown mirror key 'uri' (did you mean 'url'?)"]),
    ({"root": "/r", "mirror": {"storage_options": {}}}, ["mirror.url is required"]),
    ({"root": "/r", "mirror": ""}, ["mirror.url must be a non-empty string"]),
    ({"root": "/r/", "mirror": "/r"}, ["mirror must differ from root"]),
    ({"root": "/r", "mirror": {"url": "/m", "storage_options": []}}, ["mirror.storage_options must be a mapping"]),
    ({"root": "/r", "io": {"thread": 2}}, ["unknown io option(s) 'thread' (did you mean 'threads'?)"]),
    ({"root": "/r", "io": {"threads": 0}}, ["io.threads must be a positive number"]),
    ({"root": "/r", "io": {"part_bytes": "64 Mo"}}, ["io.part_bytes must be a positive number of bytes or a size"]),
    ({"root": "/r", "io": {"part_bytes": "1MiB"}}, ["io.part_bytes must be at least 5 MiB"]),
    ({"root": "/r", "io": {"file_bytes": "0.5B"}}, ["io.file_bytes must be a whole number of bytes"]),
    ({"root": "/r", "io": [1]}, ["io must be a mapping of I/O options"]),
    ({"root": "/r", "async_save": "yes"}, ["async_save must be true or false, got 'yes' (str)"]),
    ({"root": "/r", "allow_pickle": 1}, ["allow_pickle must be true or false, got 1 (int)"]),
    ({"root": "/r", "timeout_seconds": 0}, ["timeout_seconds must be a positive number of seconds or null"]),
    ({"root": "/r", "timeout_seconds": "10"}, ["timeout_seconds must be a positive number", "'10' (str)"]),
    (
        {"root": "/r", "timeout_seconds": 30, "io": {"timeout_seconds": 60}},
        ["timeout_seconds (30) conflicts with io.timeout_seconds (60)"],
    ),
]


@pytest.mark.parametrize(("cfg", "fragments"), BAD)
def test_config_errors(cfg: dict, fragments: list[str]) -> None:
    msg = config_error(cfg)
    for fragment in fragments:
        assert fragment in msg


def test_errors_from_a_file_start_with_its_path(tmp_path: Path) -> None:
    p = write(tmp_path, "root: /r\nretention:\n  keep_lastt: 3\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: ")
    assert "unknown retention key 'keep_lastt' (did you mean 'keep_last'?)" in msg

    p = write(tmp_path, "root: /r\nio:\n  threads: many\n", name="io.yaml")
    msg = config_error(p)
    assert msg.startswith(f"{p}: io.threads must be a positive number, got 'many'")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["root is required"]),
        ("- root: /r\n", ["the top level must be a mapping of config keys, got a list"]),
        ("root: [unclosed\n", ["invalid YAML"]),
        ("root: /a\nroot: /b\n", ["found duplicate key 'root'"]),
        ("root: /a\nretention:\n  keep_last: 1\n  keep_last: 2\n", ["found duplicate key 'keep_last'"]),
        ("root: !!python/object:os.system ls\n", ["invalid YAML"]),
    ],
    ids=["empty", "list", "syntax", "duplicate-top", "duplicate-nested", "python-tag"],
)
def test_bad_yaml_files(tmp_path: Path, text: str, fragments: list[str]) -> None:
    p = write(tmp_path, text)
    msg = config_error(p)
    assert str(p) in msg
    for fragment in fragments:
        assert fragment in msg


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        root: /r
        storage_options: &base {anon: true, use_ssl: true}
        mirror:
          url: /m
          storage_options:
            <<: *base
            anon: false
        """,
    )
    assert load_config(p, env={}).mirror_storage_options == {"anon": False, "use_ssl": True}


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"config file not found: {missing}"
    assert "is a directory" in config_error(tmp_path)
    assert "config source must be a YAML file path or a dict, got 3 (int)" in config_error(3)


# -- ${VAR} interpolation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${R}", {"R": "/data"}, "/data"),
        ("${R}/run-${N}", {"R": "/data", "N": "7"}, "/data/run-7"),
        ("${R:-/tmp/x}", {}, "/tmp/x"),
        ("${R:-/tmp/x}", {"R": ""}, "/tmp/x"),  # shell semantics: empty counts as unset for :-
        ("${R:-/tmp/x}", {"R": "/set"}, "/set"),
        ("${R:-}/a", {}, "/a"),
        ("${R}x", {"R": ""}, "x"),
        ("/a/$${R}", {"R": "no"}, "/a/${R}"),
        ("/a/$R", {"R": "no"}, "/a/$R"),  # only ${...} is interpolated
        ("${R:-${}", {}, "${"),
    ],
)
def test_interpolation(value: str, env: dict[str, str], expected: str) -> None:
    assert load_config({"root": value}, env=env).root == expected


def test_interpolation_reaches_nested_values_only() -> None:
    cfg = load_config(
        {
            "root": "/r",
            "storage_options": {
                "key": "${K}",
                "client_kwargs": {"endpoint_url": "http://${HOST:-localhost}:9000"},
                "list": ["${K}", 3, {"deep": "${K}"}],
                "${K}": "keys are not interpolated",
            },
        },
        env={"K": "v"},
    )
    assert cfg.storage_options == {
        "key": "v",
        "client_kwargs": {"endpoint_url": "http://localhost:9000"},
        "list": ["v", 3, {"deep": "v"}],
        "${K}": "keys are not interpolated",
    }


@pytest.mark.parametrize(
    ("cfg", "fragments"),
    [
        ({"root": "${NOPE}"}, ["root: environment variable NOPE is not set", "${NOPE:-default}"]),
        (
            {"root": "/r", "storage_options": {"client_kwargs": {"endpoint_url": "${EP}"}}},
            ["storage_options.client_kwargs.endpoint_url: environment variable EP is not set"],
        ),
        ({"root": "/r", "storage_options": {"l": ["ok", "${X}"]}}, ["storage_options.l[1]: environment variable X"]),
        ({"root": "${R"}, ["root: unterminated reference '${R'"]),
        ({"root": "${1BAD}"}, ["root: invalid reference '${1BAD}'", "expected ${NAME} or ${NAME:-default}"]),
        ({"root": "${}"}, ["invalid reference '${}'"]),
        ({"root": "/r", "retention": {"keep_last": "${N}"}}, ["retention.keep_last must be a positive integer"]),
    ],
)
def test_interpolation_errors(cfg: dict, fragments: list[str]) -> None:
    msg = config_error(cfg, env={"N": "3"})
    for fragment in fragments:
        assert fragment in msg


def test_interpolation_error_in_file_names_file_field_and_variable(tmp_path: Path) -> None:
    p = write(tmp_path, "root: /r\nstorage_options:\n  secret: ${AWS_SECRET_ACCESS_KEY}\n")
    msg = config_error(p)
    assert msg.startswith(f"{p}: storage_options.secret: environment variable AWS_SECRET_ACCESS_KEY is not set")


def test_defaults_to_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_TEST_DIR", str(tmp_path))
    monkeypatch.delenv("CKPTSTORE_ROOT", raising=False)
    monkeypatch.delenv("CKPTSTORE_MIRROR", raising=False)
    monkeypatch.delenv("CKPTSTORE_STORAGE_OPTIONS", raising=False)
    assert load_config({"root": "${CKPT_TEST_DIR}/run"}).root == f"{tmp_path}/run"


# -- CKPTSTORE_* overrides -----------------------------------------------------------------------------------------


def test_env_root_overrides_and_can_replace_a_missing_root() -> None:
    assert load_config({"root": "/file"}, env={"CKPTSTORE_ROOT": "s3://b/env"}).root == "s3://b/env"
    assert load_config({}, env={"CKPTSTORE_ROOT": "/env"}).root == "/env"
    assert load_config({"root": "/file"}, env={"CKPTSTORE_ROOT": ""}).root == "/file"  # empty: ignored


def test_overridden_values_are_not_interpolated() -> None:
    # The file's root and mirror URL reference unset variables; the overrides replace them, so no error,
    # and the override values themselves are taken literally.
    cfg = load_config(
        {"root": "${UNSET}/run", "mirror": {"url": "${UNSET_TOO}", "storage_options": {"anon": "${A:-1}"}}},
        env={"CKPTSTORE_ROOT": "/env/${X}", "CKPTSTORE_MIRROR": "s3://b/m"},
    )
    assert cfg.root == "/env/${X}"
    assert cfg.mirror == "s3://b/m"
    assert cfg.mirror_storage_options == {"anon": "1"}
    assert "UNSET" in config_error({"root": "/r", "mirror": "${UNSET}"}, env={"CKPTSTORE_ROOT": "/env"})


def test_env_mirror_overrides_url_and_keeps_options() -> None:
    cfg = load_config(
        {"root": "/r", "mirror": {"url": "s3://a/x", "storage_options": {"anon": True}}},
        env={"CKPTSTORE_MIRROR": "s3://b/y"},
    )
    assert cfg.mirror == "s3://b/y"
    assert cfg.mirror_storage_options == {"anon": True}
    assert load_config({"root": "/r"}, env={"CKPTSTORE_MIRROR": "/m"}).mirror == "/m"


def test_env_storage_options_deep_merge() -> None:
    cfg = load_config(
        {"root": "s3://b/r", "storage_options": {"anon": False, "client_kwargs": {"region_name": "eu-west-1"}}},
        env={"CKPTSTORE_STORAGE_OPTIONS": '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": true}'},
    )
    assert cfg.storage_options == {
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"},
    }


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"secret": "hunter2"', "CKPTSTORE_STORAGE_OPTIONS is not valid JSON"),
        ('["a"]', "CKPTSTORE_STORAGE_OPTIONS must be a JSON object, got a list"),
    ],
)
def test_env_storage_options_errors(raw: str, fragment: str) -> None:
    msg = config_error({"root": "/r"}, env={"CKPTSTORE_STORAGE_OPTIONS": raw})
    assert fragment in msg
    assert "hunter2" not in msg  # the value may hold credentials: never echoed


# -- misc ----------------------------------------------------------------------------------------------------------


def test_timeout_is_folded_into_io() -> None:
    cfg = load_config({"root": "/r", "timeout_seconds": 45}, env={})
    assert cfg.timeout_seconds == 45.0 and cfg.io.timeout_seconds == 45.0
    same = load_config({"root": "/r", "timeout_seconds": 45, "io": {"timeout_seconds": 45}}, env={})
    assert same.io.timeout_seconds == 45.0
    only_io = load_config({"root": "/r", "io": {"timeout_seconds": 5}}, env={})
    assert only_io.timeout_seconds is None and only_io.io.timeout_seconds == 5


@pytest.mark.parametrize(
    ("size", "nbytes"),
    [
        (8 * MiB, 8 * MiB),
        ("8MiB", 8 * MiB),
        ("8 mib", 8 * MiB),
        ("8M", 8_000_000),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("10000000", 10_000_000),
        ("10MB", 10_000_000),
        ("6291456B", 6 * MiB),
    ],
)
def test_io_sizes(size: object, nbytes: int) -> None:
    assert load_config({"root": "/r", "io": {"part_bytes": size}}, env={}).io.part_bytes == nbytes


def test_repr_hides_credentials() -> None:
    cfg = load_config(
        {
            "root": "s3://b/r",
            "storage_options": {"key": "AKID", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://e"}},
            "mirror": {"url": "s3://m", "storage_options": {"token": "tok", "password": "pw"}},
        },
        env={},
    )
    text = repr(cfg)
    for secret in ("AKID", "s3cr3t", "tok", "pw"):
        assert f"'{secret}'" not in text
    assert "http://e" in text and "'***'" in text
    assert cfg.storage_options["secret"] == "s3cr3t"  # only the repr is redacted


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True, "10"])
def test_background_nice_must_be_a_nice_value(bad: object) -> None:
    msg = config_error({"root": "/tmp/x", "io": {"background_nice": bad}})
    assert "background_nice" in msg and "0 to 19" in msg
