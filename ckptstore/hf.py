"""Hugging Face layout, both ways: export a step as a ``from_pretrained`` directory, load such a directory into a
(possibly FSDP2/DTensor-sharded) model.

- :func:`export_hf` writes the model of a committed step as ``model.safetensors`` (one shard) or
  ``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``, exactly as ``save_pretrained`` lays
  them out, optionally with ``config.json`` and tokenizer files copied in. It streams: tensors are read from the
  step's pieces (chunked tensors and FSDP2/DTensor shards reassembled, every piece's crc32c checked) a bounded
  batch at a time, cast, written and dropped, so memory stays at about one read batch or one tensor, never the
  model. The directory appears complete or not at all (written under a temporary name, renamed last).
- :func:`load_hf_into` restores an HF safetensors directory into a model in place, each rank reading only the
  byte ranges of its own shards (ranged reads after validating every header as hostile input). Tied weights
  that ``save_pretrained`` drops (``lm_head.weight``) are recognised from the model itself, so ``strict`` stays on.

Key names: the model subtree of the step (``model`` by default, or the whole step when it is a plain
``state_dict``) gives dotted names; wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``,
``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``) are stripped; then the user's ``key_map`` applies: a
callable ``name -> new name | None`` (None drops the tensor) or a list of ``(regex, replacement)`` applied in
order with ``re.sub`` (an empty result drops the tensor).

Example::

    from ckptstore.hf import export_hf, load_hf_into

    export_hf("./checkpoints", "latest", "hf-out", dtype="bf16", copy_from="base-model/")
    model = AutoModelForCausalLM.from_pretrained("hf-out")

    model = LlamaForCausalLM(config)          # fresh, possibly fully_shard()-ed
    load_hf_into(model, "hf-out")             # each rank reads only its shards' bytes
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    ManifestError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .format.manifest import Manifest, TensorEntry, step_dir
from .format.safetensors import MAX_HEADER_BYTES, TORCH_TO_ST, HeaderEntry, build_header, parse_header
from .io import plan_fill, read_pieces, tensor_bytes
from .options import IOOptions

log = logging.getLogger("ckptstore")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: ``save_pretrained``'s default shard size (``max_shard_size="5GB"``: decimal gigabytes).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
#: Tensors are read from the checkpoint in batches of about this many bytes (a bigger tensor alone).
DEFAULT_READ_BATCH_BYTES = 64 << 20
#: What ``copy_from`` copies when ``copy_files`` is not given (the files present; others are skipped).
DEFAULT_COPY_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
#: Largest file ``copy_from`` copies, and largest index ``load_hf_into`` parses.
MAX_COPY_BYTES = 1 << 30
MAX_INDEX_BYTES = 64 << 20

#: dtype names accepted by ``dtype=`` / ``--dtype``.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip
_CASTABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ST_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_ST.items()}

#: Module names torch wrappers insert into parameter names (``torch.distributed.checkpoint.state_dict`` removes
#: the same ones); a leading ``module.`` (DDP) is stripped only at the start.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

KeyMap = Callable[[str], "str | None"] | Sequence[tuple[str, str]] | None


# -- key names (pure) -------------------------------------------------------------------------------------------
def strip_wrappers(name: str) -> str:
    """``name`` without the parts torch wrappers add: a leading ``module.`` (DDP, repeatedly) and
    ``_orig_mod.`` (torch.compile), ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` anywhere.

    Example::

        strip_wrappers("module._orig_mod.transformer.h.0.attn.c_attn.weight")  # "transformer.h.0.attn.c_attn.weight"
    """
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in ("module", *_WRAPPER_PARTS):
        parts.pop(0)
    kept = [p for i, p in enumerate(parts) if p not in _WRAPPER_PARTS or i == len(parts) - 1]
    return ".".join(kept)


def compile_key_map(key_map: KeyMap) -> Callable[[str], str | None]:
    """A callable from ``key_map``: None (identity), a callable, or ``(regex, replacement)`` pairs applied in
    order with ``re.sub`` (``ConfigError`` for an invalid pattern). An empty name means: drop the tensor."""
    if key_map is None:
        return lambda k: k
    if callable(key_map):
        fn = key_map

        def call(k: str) -> str | None:
            out = fn(k)
            if out is not None and not isinstance(out, str):
                raise ConfigError(f"key_map returned {out!r} for {k!r}: return a str, or None to drop the tensor")
            return out or None

        return call
    if isinstance(key_map, (str, bytes)) or not isinstance(key_map, Iterable):
        raise ConfigError("key_map must be a callable or a list of (regex, replacement) pairs")
    rules = []
    for rule in key_map:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not all(isinstance(x, str) for x in rule):
            raise ConfigError(f"key_map rule {rule!r} is not a (regex, replacement) pair of strings")
        try:
            rules.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ConfigError(f"key_map regex {rule[0]!r} is invalid: {e}") from None

    def apply(k: str) -> str | None:
        for rx, repl in rules:
            try:
                k = rx.sub(repl, k)
            except (re.error, IndexError) as e:  # a bad group reference in the replacement
                raise ConfigError(f"key_map replacement {repl!r} for {rx.pattern!r} is invalid: {e}") from None
        return k or None

    return apply


def parse_rename(text: str) -> tuple[str, str]:
    """A CLI ``--rename REGEX=REPL`` value as a ``(regex, replacement)`` pair (split at the last ``=``, so the
    regex may contain ``=``; ``ConfigError`` when there is none or the regex does not compile)."""
    if "=" not in text:
        raise ConfigError(f"--rename {text!r}: expected REGEX=REPLACEMENT, e.g. '^transformer\\.=model.'")
    rx, repl = text.rsplit("=", 1)
    if not rx:
        raise ConfigError(f"--rename {text!r}: the regex is empty")
    try:
        re.compile(rx)
    except re.error as e:
        raise ConfigError(f"--rename {text!r}: invalid regex: {e}") from None
    return rx, repl


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _CASTABLE:
            raise ConfigError(f"dtype {dtype} is not a floating dtype to cast to (bf16, fp16, fp32)")
        return dtype
    dt = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if dt is None:
        raise ConfigError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    return dt


def parse_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``64MiB``, ``1000000`` -> bytes (decimal units as ``save_pretrained``, binary with
    ``i``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
        if m is None:
            raise ConfigError(f"invalid size {text!r}: write e.g. 5GB, 500MB or 64MiB")
        mult = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
        n = int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** mult))
    if n <= 0:
        raise ConfigError(f"max shard size must be positive, got {text!r}")
    return n


# -- which tensors of a step are the model (pure) -------------------------------------------------------------
@dataclass(frozen=True)
class ExportTensor:
    """One tensor of the export: its HF name, the step's key, the stored entry and the dtype written."""

    name: str
    key: str
    entry: TensorEntry
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.entry.shape) * self.dtype.itemsize


def _unwrap(node: Any) -> Any:
    while isinstance(node, dict) and node.get("t") == "stateful":
        node = node.get("v")
    return node


def _child(node: Any, part: str) -> Any:
    node = _unwrap(node)
    if isinstance(node, dict) and node.get("t") == "dict":
        for k, v in zip(node.get("k", []), node.get("v", [])):
            if str(k) == part:
                return v
    elif isinstance(node, dict) and node.get("t") in ("list", "tuple") and part.isdigit():
        vals = node.get("v", [])
        if int(part) < len(vals):
            return vals[int(part)]
    return None


def _top_keys(node: Any) -> list[str]:
    node = _unwrap(node)
    if isinstance(node, dict) and node.get("t") == "dict":
        return [str(k) for k in node.get("k", [])]
    return []


def _is_flat_state_dict(node: Any) -> bool:
    node = _unwrap(node)
    if not (isinstance(node, dict) and node.get("t") == "dict" and node.get("v")):
        return False
    vals = node["v"]
    return any(isinstance(v, dict) and v.get("t") == "tensor" for v in vals) and all(
        (isinstance(v, dict) and v.get("t") == "tensor") or not isinstance(v, dict) for v in vals
    )


def select_model(m: Manifest, select: str | None = "model") -> tuple[list[tuple[str, str]], list[str]]:
    """The ``(dotted name, tensor key)`` pairs of the model in step ``m`` and the names of non-tensor leaves
    skipped. ``select``: a ``/``-separated path to the model's subtree; ``"model"`` (the default) falls back to the
    whole step when the step is itself a plain ``state_dict`` (tensors under top-level keys); None/"" is the
    whole step. ``CheckpointNotFoundError`` when the path does not exist, ``UnsupportedValueError`` for pickled
    entries in the subtree (safetensors holds tensors only)."""
    node: Any = m.tree
    path = (select or "").strip("/")
    if path:
        cur = node
        done: list[str] = []
        for part in path.split("/"):
            nxt = _child(cur, part)
            if nxt is None:
                if path == "model" and _is_flat_state_dict(node):
                    cur = node
                    break
                keys = ", ".join(_top_keys(cur)[:20])
                raise CheckpointNotFoundError(
                    f"step {m.step} has no {part!r} under {'/'.join(done) or 'the root'} (keys: {keys}); pass the "
                    "model's path with select=... / --select",
                    step=m.step,
                )
            cur = nxt
            done.append(part)
        node = cur
    out: list[tuple[str, str]] = []
    skipped: list[str] = []
    pickled: list[str] = []

    def walk(n: Any, name: str, depth: int) -> None:
        n = _unwrap(n)
        if depth > 200:
            raise ManifestError(f"step {m.step}: the model subtree is nested too deeply")
        if isinstance(n, dict):
            t = n.get("t")
            if t == "tensor":
                out.append((name, n["key"]))
                return
            if t == "pickle":
                pickled.append(name or n.get("key", "?"))
                return
            if t == "dict":
                for k, v in zip(n.get("k", []), n.get("v", [])):
                    walk(v, f"{name}.{k}" if name else str(k), depth + 1)
                return
            if t in ("list", "tuple"):
                for i, v in enumerate(n.get("v", [])):
                    walk(v, f"{name}.{i}" if name else str(i), depth + 1)
                return
        if name:
            skipped.append(name)

    walk(node, "", 0)
    if pickled:
        raise UnsupportedValueError(
            f"step {m.step}: the model holds pickled objects ({', '.join(pickled[:5])}) that safetensors cannot "
            "store; select a subtree of tensors only"
        )
    if not out:
        raise CheckpointNotFoundError(f"step {m.step} holds no tensors under {path or 'the root'!r}", step=m.step)
    return out, skipped


@dataclass
class ExportPlan:
    """What :func:`plan_export` decided: the tensors per output file, and the tied names left out."""

    shards: list[list[ExportTensor]]
    tied: dict[str, str] = field(default_factory=dict)
    """Name left out -> the name written that holds the same stored bytes."""
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return [SAFE_WEIGHTS_NAME]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s)


def plan_export(
    m: Manifest,
    *,
    select: str | None = "model",
    key_map: KeyMap = None,
    strip: bool = True,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportPlan:
    """Decide names, dtypes and output files of an HF export of step ``m`` (no I/O).

    Tensors that reference the very same stored bytes (tied weights saved once) are written once, under the first
    name in the model's order (``transformer.wte.weight`` before ``lm_head.weight``, as ``save_pretrained``).
    Files are filled greedily in model order, a new one started when the next tensor would exceed
    ``max_shard_bytes`` (a larger tensor gets a file of its own), like ``huggingface_hub``'s splitter.
    """
    cast = parse_dtype(dtype)
    mapper = compile_key_map(key_map)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    pairs, skipped = select_model(m, select)
    plan = ExportPlan([], skipped=skipped)
    seen: dict[str, str] = {}  # HF name -> source name
    by_bytes: dict[tuple[Any, ...], str] = {}  # identity of the stored bytes -> HF name written
    tensors: list[ExportTensor] = []
    for src, key in pairs:
        e = m.tensors[key]
        name = strip_wrappers(src) if strip else src
        new = mapper(name)
        if new is None:
            plan.dropped.append(src)
            continue
        if new != src:
            plan.renamed[src] = new
        if new == "__metadata__":
            raise ConfigError(f"{src!r} maps to '__metadata__', a name safetensors reserves; rename it")
        if new in seen:
            raise ConfigError(
                f"{seen[new]!r} and {src!r} both map to {new!r}: adjust key_map / --rename (or strip=False)"
            )
        seen[new] = src
        if e.encoding != "raw":
            raise UnsupportedValueError(f"{src!r} is a pickled object; safetensors stores tensors only")
        st_dt = e.torch_dtype
        out_dt = cast if cast is not None and st_dt in _CASTABLE else st_dt
        if out_dt not in TORCH_TO_ST:
            raise UnsupportedValueError(
                f"{src!r} has dtype {st_dt}, which the safetensors format has no tag for; drop it with key_map or "
                "convert it before saving"
            )
        ident = (e.dtype, e.shape, e.pieces)
        if e.pieces and ident in by_bytes:
            plan.tied[new] = by_bytes[ident]
            continue
        by_bytes[ident] = new
        tensors.append(ExportTensor(new, key, e, out_dt))
    if not tensors:
        raise ConfigError(f"step {m.step}: key_map dropped every tensor; nothing to export")
    cur: list[ExportTensor] = []
    size = 0
    for t in tensors:
        if cur and size + t.nbytes > max_shard_bytes:
            plan.shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    plan.shards.append(cur)
    return plan


def index_json(plan: ExportPlan) -> bytes:
    """The ``model.safetensors.index.json`` of a multi-file export, as ``save_pretrained`` writes it."""
    weight_map = {}
    for fname, shard in zip(plan.files, plan.shards):
        for t in shard:
            weight_map[t.name] = fname
    params = sum(math.prod(t.entry.shape) for s in plan.shards for t in s)
    doc = {
        "metadata": {"total_parameters": params, "total_size": plan.nbytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


# -- export ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFExportResult:
    """What :func:`export_hf` wrote."""

    path: str
    step: int
    files: list[str]
    tensors: int
    nbytes: int
    tied: dict[str, str]
    copied: list[str]
    dropped: list[str]
    skipped: list[str]
    format: str = "hf"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "step": self.step, "files": self.files,
                "tensors": self.tensors, "nbytes": self.nbytes, "tied": self.tied, "copied": self.copied,
                "dropped": self.dropped, "skipped": self.skipped}  # fmt: skip


def _manager_of(source: Any, storage_options: dict[str, Any] | None) -> tuple[Any, bool]:
    if isinstance(source, (str, os.PathLike)):
        from .manager import CheckpointManager

        return CheckpointManager(os.fspath(source), storage_options=storage_options, distributed=False), True
    if not hasattr(source, "manifest") or not hasattr(source, "storage"):
        raise ConfigError(f"source must be a CheckpointManager or a checkpoint root URL, got {type(source).__name__}")
    return source, False


def _resolve(mgr: Any, step: int | str) -> int:
    if step in ("latest", "best"):
        info = mgr.latest() if step == "latest" else mgr.best()
        if info is None:
            what = "committed step" if step == "latest" else "committed step with a finite numeric 'loss' metric"
            raise CheckpointNotFoundError(f"no {what} under {mgr.url}")
        return int(info.step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ConfigError(f"step must be an int, 'latest' or 'best', got {step!r}")
    return step


def _with_cli_message(err: Exception, text: str) -> Exception:
    err.cli_message = text  # type: ignore[attr-defined]
    return err


def _check_out_dir(out: str, overwrite: bool) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCheckpointError(f"{out} is a symbolic link; give the real output directory")
    if not stat.S_ISDIR(st.st_mode):
        raise _with_cli_message(
            CheckpointExistsError(f"{out} exists and is not a directory; remove it or choose another output"),
            f"{out} exists and is not a directory; remove it or choose another OUT",
        )
    entries = os.listdir(out)
    if not entries:
        return
    if not overwrite:
        raise _with_cli_message(
            CheckpointExistsError(f"{out} already exists and is not empty: pass overwrite=True to replace it"),
            f"{out} already exists and is not empty: pass --force to replace it",
        )
    subdirs = [e for e in entries if stat.S_ISDIR(os.lstat(os.path.join(out, e)).st_mode)]
    if subdirs:  # a model directory holds files only: do not replace a tree the user may need
        raise CheckpointExistsError(
            f"{out} holds subdirectories ({', '.join(sorted(subdirs)[:5])}), so it is not a model directory; "
            "remove it yourself or choose another output"
        )


def _copy_files(src_dir: str, names: Sequence[str], dst_dir: str, explicit: bool) -> list[str]:
    """Copy regular files ``names`` of ``src_dir`` into ``dst_dir``, never following a symlink; missing files
    are skipped unless listed explicitly."""
    try:
        dfd = os.open(src_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"copy_from directory {src_dir} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"copy_from {src_dir} is not a directory") from None
    copied = []
    reserved = {SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME}
    try:
        for name in names:
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ConfigError(f"copy_files entry {name!r} is not a plain file name")
            if name in reserved or re.fullmatch(r"model-[0-9]+-of-[0-9]+\.safetensors", name):
                raise ConfigError(f"copy_files entry {name!r} would replace a weights file of the export")
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except FileNotFoundError:
                if explicit:
                    raise CheckpointNotFoundError(f"{os.path.join(src_dir, name)} does not exist") from None
                continue
            except OSError as e:
                if os.path.islink(os.path.join(src_dir, name)):
                    raise UnsafeCheckpointError(
                        f"{os.path.join(src_dir, name)} is a symbolic link; copy_from copies regular files only and "
                        "never follows links: point copy_from at a directory of real files"
                    ) from None
                raise ConfigError(f"cannot open {os.path.join(src_dir, name)}: {e.strerror or e}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeCheckpointError(f"{os.path.join(src_dir, name)} is not a regular file; not copied")
                if st.st_size > MAX_COPY_BYTES:
                    raise ConfigError(
                        f"{os.path.join(src_dir, name)} is {st.st_size} bytes, more than the {MAX_COPY_BYTES} "
                        "copy_from copies; copy it yourself"
                    )
                os.set_blocking(fd, True)
                with open(os.path.join(dst_dir, name), "xb") as out:
                    left = MAX_COPY_BYTES + 1
                    while left > 0:
                        chunk = os.read(fd, min(1 << 20, left))
                        if not chunk:
                            break
                        out.write(chunk)
                        left -= len(chunk)
                    if left <= 0:
                        raise ConfigError(f"{os.path.join(src_dir, name)} grew past {MAX_COPY_BYTES} bytes")
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                os.close(fd)
            copied.append(name)
    finally:
        os.close(dfd)
    return copied


_STAGE_BYTES = 4 << 20


class _Arena:
    """One reusable buffer the read batches are carved from: the export's memory stays one allocation of about
    ``read_batch_bytes`` instead of depending on how the allocator reuses freed tensors."""

    ALIGN = 64

    def __init__(self, nbytes: int) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.pos = 0
        self._stage: torch.Tensor | None = None

    def fits(self, nbytes: int) -> bool:
        return self._aligned() + nbytes <= self.buf.numel()

    def _aligned(self) -> int:
        return -(-self.pos // self.ALIGN) * self.ALIGN

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        start = self._aligned()
        self.pos = start + n
        return self.buf[start : start + n].view(dtype).view(shape)

    def reset(self) -> None:
        self.pos = 0

    def stage(self, dtype: torch.dtype) -> torch.Tensor:
        """A reusable buffer of about :data:`_STAGE_BYTES` for casts (one per output dtype; casts go to one)."""
        if self._stage is None or self._stage.dtype != dtype:
            self._stage = torch.empty(max(1, _STAGE_BYTES // dtype.itemsize), dtype=dtype)
        return self._stage


def _write_shard(mgr: Any, m: Manifest, shard: list[ExportTensor], path: str, opts: IOOptions,
                 arena: _Arena) -> None:  # fmt: skip
    entries = [HeaderEntry(t.name, TORCH_TO_ST[t.dtype], tuple(t.entry.shape), t.nbytes) for t in shard]
    head, _ = build_header(entries, {"format": "pt"})
    prefix = step_dir(m.step)
    with open(path, "xb") as f:
        f.write(head)
        i = 0
        while i < len(shard):
            # A batch of tensors read together (coalesced, parallel requests) into the arena, then cast and
            # written; a tensor larger than the arena is read on its own.
            batch: list[tuple[ExportTensor, torch.Tensor]] = []
            tasks = []
            arena.reset()
            while i < len(shard):
                t = shard[i]
                shape, dt = tuple(t.entry.shape), t.entry.torch_dtype
                if arena.fits(t.entry.nbytes):
                    buf = arena.take(shape, dt)
                elif batch:
                    break
                elif _row_pieces(t.entry):
                    _stream_tensor(mgr.storage, prefix, m.step, t, f, arena)
                    i += 1
                    continue
                else:
                    buf = torch.empty(shape, dtype=dt)
                tasks.extend(plan_fill(t.key, t.entry, buf))
                batch.append((t, buf))
                i += 1
            read_pieces(mgr.storage, prefix, tasks, opts, step=m.step)
            del tasks
            while batch:
                t, buf = batch.pop(0)
                if buf.numel() == 0:
                    continue
                if buf.dtype == t.dtype:
                    f.write(tensor_bytes(buf))
                    continue
                _write_cast(f, buf, t.dtype, arena)
                del buf
        f.flush()
        os.fsync(f.fileno())


def _write_cast(f: Any, buf: torch.Tensor, dtype: torch.dtype, arena: _Arena) -> None:
    """Write ``buf`` cast to ``dtype``, slice by slice through the arena's small staging buffer (no tensor-sized
    copy)."""
    flat = buf.reshape(-1)
    stage = arena.stage(dtype)
    for a in range(0, flat.numel(), stage.numel()):
        part = stage[: min(stage.numel(), flat.numel() - a)]
        part.copy_(flat[a : a + part.numel()])
        f.write(tensor_bytes(part))


def _row_pieces(e: TensorEntry) -> bool:
    """Whether every piece of ``e`` is a range of whole rows (the whole tensor, a dim-0 chunk, an FSDP2
    ``Shard(0)`` box): then the tensor's bytes are the pieces' bytes in row order."""
    if e.encoding != "raw" or not e.shape:
        return False
    for p in e.pieces:
        if p.offsets is None:
            continue
        if any(p.offsets[1:]) or tuple(p.shape or ())[1:] != tuple(e.shape[1:]):
            return False
    return True


def _stream_tensor(storage: Any, prefix: str, step: int, t: ExportTensor, f: Any, arena: _Arena) -> None:
    """Copy a tensor larger than the arena into ``f`` piece by piece, each piece in arena-sized ranges, cast on
    the way; each piece's crc32c is combined over its ranges and checked when the piece ends (a mismatch fails
    the export, whose directory is then never renamed into place)."""
    from .io import crc32c

    e = t.entry
    src = e.torch_dtype
    cap = max(src.itemsize, arena.buf.numel() // src.itemsize * src.itemsize)
    if arena.buf.numel() < cap:  # an arena smaller than one element (a tiny read batch)
        arena.buf = torch.empty(cap, dtype=torch.uint8)

    def read(p: Any, offset: int, view: memoryview) -> None:
        try:
            storage.read_into(f"{prefix}/{p.file}", offset, [view])
        except EOFError as err:
            raise IntegrityError(
                f"step {step}: file {p.file} is shorter than the manifest says ({err}); key {t.key!r}",
                step=step, file=p.file, key=t.key,
            ) from None  # fmt: skip
        except FileNotFoundError:
            raise IntegrityError(f"step {step}: data file {p.file} is missing", step=step, file=p.file) from None

    def crc_of(p: Any, a: int, b: int, crc: int) -> int:
        """Continue ``crc`` over bytes [a, b) of the piece's file (the rest of its checksum group)."""
        while a < b:
            n = min(cap, b - a)
            view = tensor_bytes(arena.buf[:n])
            read(p, a, view)
            crc = crc32c(view, crc)
            a += n
        return crc

    for p in sorted(e.pieces, key=lambda p: p.offsets[0] if p.offsets else 0):
        s0, s1 = p.checked  # a part of a group: the group's bytes around it are read and checked too
        crc = crc_of(p, s0, p.start, 0)
        pos = 0
        while pos < p.nbytes:
            n = min(cap, p.nbytes - pos)
            chunk = arena.buf[:n]
            view = tensor_bytes(chunk)
            read(p, p.start + pos, view)
            crc = crc32c(view, crc)
            if src == t.dtype:
                f.write(view)
            else:
                _write_cast(f, chunk.view(src), t.dtype, arena)
            pos += n
        crc = crc_of(p, p.end, s1, crc)
        if crc != p.crc32c:
            raise IntegrityError(
                f"checksum mismatch in step {step}, file {p.file}, key {t.key!r} "
                f"(bytes {p.start}-{p.end}{'' if p.span is None else f', checked as the group of parts {s0}-{s1}'}: "
                f"crc32c {crc:08x}, manifest {p.crc32c:08x})",
                step=step, file=p.file, key=t.key,
            )  # fmt: skip


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def export_hf(
    source: Any,
    step: int | str,
    out_dir: str | os.PathLike[str],
    *,
    select: str | None = "model",
    key_map: KeyMap = None,
    strip: bool = True,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    copy_from: str | os.PathLike[str] | None = None,
    copy_files: Sequence[str] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    read_batch_bytes: int = DEFAULT_READ_BATCH_BYTES,
) -> HFExportResult:
    """Write the model of committed ``step`` of ``source`` (a CheckpointManager or a root URL) as a Hugging Face
    ``from_pretrained`` directory ``out_dir``.

    ``select`` is the model's subtree (``"model"``; a step that is a plain ``state_dict`` is taken whole);
    ``strip`` removes wrapper prefixes (``module.``, ``_orig_mod.``, ...); ``key_map`` renames (see the module
    docstring); ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``) casts floating tensors; ``max_shard_bytes``
    (an int or ``"5GB"``) splits the weights into ``model-0000i-of-0000N.safetensors`` + index, one file being
    ``model.safetensors``. ``copy_from``: a directory whose ``config.json``, ``generation_config.json`` and
    tokenizer files (``copy_files`` to choose others) are copied in — regular files only, never through a symlink.

    Every piece read is checked against its crc32c (``IntegrityError``). Memory: one read batch
    (``read_batch_bytes``, at most the largest output file) plus a 4 MiB buffer for casts; a tensor larger than the
    batch is streamed piece by piece in batch-sized ranges (one stored as column boxes is read whole).

    An existing non-empty ``out_dir`` raises ``CheckpointExistsError`` unless ``overwrite``; the directory is
    written under a temporary name next to it and renamed into place when complete, so an interrupted export never
    looks like a finished one.

    Example::

        res = export_hf(mgr, "latest", "hf-model", dtype="bf16", max_shard_bytes="2GB", copy_from="base/")
        AutoModelForCausalLM.from_pretrained(res.path)
    """
    out = os.path.abspath(os.fspath(out_dir))
    shard_bytes = parse_size(max_shard_bytes)
    if isinstance(read_batch_bytes, bool) or not isinstance(read_batch_bytes, int) or read_batch_bytes <= 0:
        raise ConfigError(f"read_batch_bytes must be a positive int, got {read_batch_bytes!r}")
    _check_out_dir(out, overwrite)
    copy_src = os.fspath(copy_from) if copy_from is not None else None
    if copy_files is not None and copy_src is None:
        raise ConfigError("copy_files needs copy_from (the directory to copy them from)")
    mgr, owned = _manager_of(source, storage_options)
    try:
        m: Manifest = mgr.manifest(_resolve(mgr, step))
        plan = plan_export(m, select=select, key_map=key_map, strip=strip, dtype=dtype, max_shard_bytes=shard_bytes)
        io_opts = getattr(mgr, "io", None) or IOOptions()
        opts = IOOptions.from_dict({**_io_dict(io_opts), "verify": True})
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(out)
        tmp = os.path.join(parent, f".{base}.hf-tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)
        try:
            copied = _copy_files(copy_src, copy_files or DEFAULT_COPY_FILES, tmp, copy_files is not None) if (
                copy_src is not None) else []  # fmt: skip
            if copy_src is not None and "config.json" not in copied:
                log.warning("%s has no config.json: from_pretrained needs one in %s", copy_src, out)
            largest = max(sum(-(-t.entry.nbytes // _Arena.ALIGN) * _Arena.ALIGN for t in s) for s in plan.shards)
            arena = _Arena(min(read_batch_bytes, largest))
            for fname, shard in zip(plan.files, plan.shards):
                _write_shard(mgr, m, shard, os.path.join(tmp, fname), opts, arena)
            del arena
            if len(plan.shards) > 1:  # the index last: it is what makes the shards a model
                with open(os.path.join(tmp, SAFE_WEIGHTS_INDEX_NAME), "xb") as f:
                    f.write(index_json(plan))
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            _commit_dir(tmp, out, overwrite)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(parent)
    finally:
        if owned:
            mgr.close()
    files = plan.files + ([SAFE_WEIGHTS_INDEX_NAME] if len(plan.shards) > 1 else [])
    return HFExportResult(
        out, m.step, files, sum(len(s) for s in plan.shards), plan.nbytes, dict(plan.tied), copied,
        list(plan.dropped), list(plan.skipped),
    )  # fmt: skip


def _io_dict(o: IOOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(o)


def _commit_dir(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and os.path.isdir(out) and os.listdir(out):
        _check_out_dir(out, overwrite)  # again: it may have been filled meanwhile
        old = f"{tmp}-old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # onto nothing or an empty directory: atomic
    except OSError as e:
        if os.path.isdir(out) and os.listdir(out):
            raise CheckpointExistsError(f"{out} was filled by someone else during the export; nothing replaced") from e
        raise


# -- reading an HF directory ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class STTensor:
    """One tensor of an HF directory: its file, absolute byte range, dtype and shape (from a validated header)."""

    file: str
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class HFCheckpoint:
    """The tensors of an HF safetensors directory (or file, or index), from their validated headers only."""

    path: str
    files: list[str]
    tensors: dict[str, STTensor]
    bytes_read: int = 0
    """Bytes read so far through :meth:`read_box` (headers included)."""

    def read_box(self, name: str, offsets: Sequence[int], shape: Sequence[int], out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous CPU, the file's dtype, ``shape``) with the box ``[offsets, offsets+shape)`` of
        tensor ``name``, reading only its bytes (one read per contiguous run)."""
        t = self.tensors[name]
        if tuple(out.shape) != tuple(shape) or out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError("read_box: out does not match the box")
        if out.numel() == 0:
            return
        dest = tensor_bytes(out)
        pos = 0
        fd = os.open(t.file, os.O_RDONLY)
        try:
            for off, n in box_runs(t.shape, tuple(offsets), tuple(shape), t.dtype.itemsize):
                if off + n > t.end - t.start:
                    raise ManifestError(f"{t.file}: the box of {name!r} lies outside the tensor")
                _pread_full(fd, dest[pos : pos + n], t.start + off, t.file)
                pos += n
        finally:
            os.close(fd)
        self.bytes_read += pos


def box_runs(
    gshape: Sequence[int], off: Sequence[int], shape: Sequence[int], itemsize: int
) -> Iterable[tuple[int, int]]:
    """The contiguous byte runs ``(offset in the tensor's bytes, length)`` of a box of a row-major tensor, in the
    box's own row-major order (so they fill a contiguous buffer of the box back to back)."""
    nd = len(gshape)
    if nd == 0:
        yield 0, itemsize
        return
    if any(s == 0 for s in shape):
        return
    k = nd - 1
    while k > 0 and off[k] == 0 and shape[k] == gshape[k]:
        k -= 1
    strides = [math.prod(gshape[i + 1 :]) for i in range(nd)]
    run = shape[k] * strides[k] * itemsize
    base = off[k] * strides[k]
    import itertools

    for idx in itertools.product(*(range(off[i], off[i] + shape[i]) for i in range(k))):
        start = base + sum(i * s for i, s in zip(idx, strides))
        yield start * itemsize, run


def _pread_full(fd: int, buf: memoryview, offset: int, where: str) -> None:
    got = 0
    while got < buf.nbytes:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise ManifestError(f"{where} is shorter than its header says (truncated while being read?)")
        got += n


def _open_regular(path: str) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} does not exist") from None
    except OSError as e:
        raise ManifestError(f"cannot open {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ManifestError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd, st.st_size


def _read_header(path: str) -> tuple[dict[str, tuple[HeaderEntry, int, int]], int, int]:
    fd, size = _open_regular(path)
    try:
        if size < 8:
            raise ManifestError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        first = bytearray(8)
        _pread_full(fd, memoryview(first), 0, path)
        hlen = int.from_bytes(first, "little")
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise ManifestError(f"{path}: header length {hlen} is larger than allowed or than the file ({size} B)")
        prefix = bytearray(8 + hlen)
        prefix[:8] = first
        _pread_full(fd, memoryview(prefix)[8:], 8, path)
    finally:
        os.close(fd)
    try:
        entries, _meta, data_start = parse_header(bytes(prefix), size)
    except ManifestError as e:
        raise ManifestError(f"{path} is not a valid safetensors file: {e}") from None
    # parse_header checked every entry (dtype, shape x dtype == its byte range, inside the file, dense); it keeps
    # sizes only, so take the validated data_offsets from the same JSON.
    doc = json.loads(bytes(prefix[8:]).decode("utf-8"))
    out = {}
    for name, e in entries.items():
        a, b = doc[name]["data_offsets"]
        out[name] = (e, data_start + int(a), data_start + int(b))
    return out, data_start, 8 + hlen


def open_hf(path: str | os.PathLike[str]) -> HFCheckpoint:
    """Validate and index an HF weights location: a directory (``model.safetensors.index.json`` or
    ``model.safetensors``), a ``.safetensors`` file or an ``*.index.json``. Everything is hostile input: the index
    is size-capped and may only name plain files next to it; every header is checked (offsets inside the file,
    dtype in the safetensors allow-list, ``shape x dtype`` equal to its byte range, no overlaps) before a byte of
    data is read (``ManifestError``; ``UnsafeCheckpointError`` for names escaping the directory)."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        idx = os.path.join(p, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(p, SAFE_WEIGHTS_NAME)
        if os.path.exists(single):  # transformers' order: the single file first
            p = single
        elif os.path.exists(idx):
            p = idx
        else:
            raise CheckpointNotFoundError(f"{p} has neither {SAFE_WEIGHTS_INDEX_NAME} nor {SAFE_WEIGHTS_NAME}")
    weight_map: dict[str, str] | None = None
    if p.endswith(".json"):
        fd, size = _open_regular(p)
        try:
            if size > MAX_INDEX_BYTES:
                raise ManifestError(f"{p} is {size} bytes, larger than the {MAX_INDEX_BYTES} an index may have")
            raw = bytearray(size)
            _pread_full(fd, memoryview(raw), 0, p)
            index_bytes = size
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw.decode("utf-8"))
            wm = doc["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
                raise ValueError("weight_map must map tensor names to file names")
            weight_map = wm
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
            raise ManifestError(f"{p} is not a safetensors index (weight_map): {e}") from None
        base = os.path.dirname(p)
        names = sorted(set(weight_map.values()))
        for n in names:
            if not n or "/" in n or "\\" in n or n in (".", "..") or "\x00" in n:
                raise UnsafeCheckpointError(f"{p} refers to {n!r}, not a file next to the index")
        files = [os.path.join(base, n) for n in names]
    else:
        files = [p]
        index_bytes = 0
    tensors: dict[str, STTensor] = {}
    header_bytes = index_bytes
    for f in files:
        entries, _data_start, hb = _read_header(f)
        header_bytes += hb
        for name, (e, start, end) in entries.items():
            if name in tensors:
                raise ManifestError(f"tensor {name!r} appears in two files of {p}")
            if weight_map is not None and weight_map.get(name) != os.path.basename(f):
                raise ManifestError(
                    f"{f} holds {name!r}, which the index places in {weight_map.get(name)!r}; the directory is "
                    "inconsistent"
                )
            dt = ST_TO_TORCH.get(e.dtype)
            if dt is None:
                raise ManifestError(f"{f}: {name!r} has dtype {e.dtype}, which ckptstore does not load")
            tensors[name] = STTensor(f, start, end, dt, e.shape)
    if weight_map is not None:
        lost = [k for k in weight_map if k not in tensors]
        if lost:
            raise ManifestError(f"{p} lists {len(lost)} tensors no file holds, e.g. {lost[0]!r}")
    return HFCheckpoint(p, files, tensors, header_bytes)


# -- loading into a model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFLoadResult:
    """What :func:`load_hf_into` did."""

    path: str
    loaded: list[str]
    """Model keys filled from the directory."""
    tied: dict[str, str]
    """Model keys the directory lacks that share their tensor with a loaded key (key -> that key)."""
    missing: list[str]
    unexpected: list[str]
    bytes_read: int
    """Bytes this process read (headers included)."""


def _dtensor_type() -> type | None:
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global shape, offsets of the local box, local shape) for plain tensors and DTensors."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(t, DTensor):
        return t, tuple(t.shape), (0,) * t.dim(), tuple(t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_partial() for p in t.placements):
        raise UnsupportedValueError(f"cannot load into a DTensor with a Partial placement {t.placements}")
    local = t.to_local()
    shape, offs = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return local, tuple(t.shape), tuple(int(o) for o in offs), tuple(int(s) for s in shape)


def _storage_id(t: torch.Tensor) -> tuple[Any, ...]:
    local = _local_box(t)[0]
    if local.device.type == "meta":
        return ("id", id(t))
    try:
        ptr = local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return ("id", id(t))
    return ("st", local.device.type, ptr, local.storage_offset(), tuple(local.shape), tuple(local.stride()))


def _declared_ties(model: Any) -> dict[str, str]:
    """The ties a transformers model declares for its config, as {tied key: source key}: v5's
    ``get_expanded_tied_weights_keys()`` (empty when ``tie_word_embeddings`` is off). The class-level
    ``_tied_weights_keys`` is not used: it lists possible ties whatever the config says."""
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    if not callable(getter):
        return {}
    try:
        ties = getter()
    except Exception as e:  # a model whose config lacks what transformers expects: ties come from storage only
        log.debug("get_expanded_tied_weights_keys failed: %s", e)
        return {}
    if not isinstance(ties, Mapping):
        return {}
    return {k: v for k, v in ties.items() if isinstance(k, str) and isinstance(v, str)}


def load_hf_into(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap = None,
    strict: bool = True,
    strip: bool = True,
) -> HFLoadResult:
    """Restore an HF safetensors directory (``save_pretrained`` output, one file or an index) into ``model`` in
    place, e.g. to start training from a pretrained checkpoint.

    ``model`` may be plain, wrapped (DDP, ``torch.compile``: its wrapper prefixes are ignored when matching) or
    FSDP2/DTensor-sharded: then each rank reads only the byte ranges of its own shards. ``key_map`` renames the
    file's names to the model's (see the module docstring). Values are cast to each parameter's dtype, as
    ``load_state_dict`` does. Tied weights: a key the directory lacks (``lm_head.weight``, dropped by
    ``save_pretrained``) is satisfied when the model shares its tensor with a key that is loaded, or when the model
    declares the tie (``_tied_weights_keys``) — then it is filled from its source. With ``strict`` (default) keys
    still missing, or unused in the directory, raise ``StateMismatchError`` before any parameter is changed; a
    shape mismatch always does.

    Example::

        model = LlamaForCausalLM(config)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        res = load_hf_into(model, "Llama-mini/")
    """
    ck = open_hf(path)
    mapper = compile_key_map(key_map)
    file_names: dict[str, str] = {}  # model-side name -> file key
    for k in ck.tensors:
        new = mapper(k)
        if new is None:
            continue
        if new in file_names:
            raise ConfigError(f"{file_names[new]!r} and {k!r} both map to {new!r}: adjust key_map")
        file_names[new] = k
    sd = model.state_dict(keep_vars=True)
    targets: dict[str, torch.Tensor] = {}
    norm_of: dict[str, str] = {}
    key_of: dict[str, str] = {}  # normalised name -> model key
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        n = strip_wrappers(k) if strip else k
        if n in key_of:
            raise ConfigError(f"model keys {key_of[n]!r} and {k!r} both become {n!r} without wrapper prefixes; "
                              "pass strip=False")  # fmt: skip
        norm_of[k] = n
        key_of[n] = k
        targets[k] = v
    _adapt_base_prefix(model, norm_of, file_names)
    # Ties: model keys sharing one tensor form a group; one loaded key fills the group.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, v in targets.items():
        groups.setdefault(_storage_id(v), []).append(k)
    declared = _declared_ties(model)
    plan: list[tuple[str, str]] = []  # (model key, file key)
    tied: dict[str, str] = {}
    missing: list[str] = []
    used: set[str] = set()
    for keys in groups.values():
        present = [k for k in keys if norm_of[k] in file_names]
        for k in present:
            used.add(file_names[norm_of[k]])
        if present:
            plan.append((present[0], file_names[norm_of[present[0]]]))
            for k in keys:
                if k not in present:
                    tied[k] = present[0]
            continue
        missing.extend(keys)
    still: list[str] = []
    for k in missing:
        src = declared.get(norm_of[k])
        src_key = key_of.get(src) if src else None
        if src_key is not None and norm_of[src_key] in file_names:
            plan.append((k, file_names[norm_of[src_key]]))
            tied[k] = src_key
        else:
            still.append(k)
    used.update(fk for _, fk in plan)
    mapped = set(file_names.values())
    unexpected = sorted(k for k in mapped if k not in used)
    # transformers' own allowances (e.g. GPT-2's old "attn.masked_bias" buffers in hub checkpoints).
    unexpected = [k for k in unexpected if not _ignored(model, "_keys_to_ignore_on_load_unexpected", k)]
    still = [k for k in still if not _ignored(model, "_keys_to_ignore_on_load_missing", norm_of[k])]
    if strict and (still or unexpected):
        raise StateMismatchError(
            f"{ck.path} does not match the model: "
            + (f"missing {len(still)} keys (e.g. {', '.join(still[:5])})" if still else "")
            + ("; " if still and unexpected else "")
            + (f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})" if unexpected else "")
            + ". Map names with key_map, or pass strict=False to load what matches",
            missing=still,
            unexpected=unexpected,
        )
    if still or unexpected:
        log.warning("load_hf_into: %d missing, %d unexpected keys (strict=False)", len(still), len(unexpected))
    # Check every shape before changing anything.
    boxes = []
    for mk, fk in plan:
        t = targets[mk]
        local, gshape, offs, lshape = _local_box(t)
        st = ck.tensors[fk]
        if tuple(st.shape) != gshape:
            raise StateMismatchError(
                f"{fk!r} has shape {list(st.shape)} in {ck.path}, the model's {mk!r} has {list(gshape)}"
            )
        if local.device.type == "meta":
            raise UnsupportedValueError(
                f"{mk!r} is on the meta device: materialise the model first (model.to_empty(device=...)), then load"
            )
        boxes.append((mk, fk, local, offs, lshape, st))
    with torch.no_grad():
        for _mk, fk, local, offs, lshape, st in boxes:
            if local.device.type == "cpu" and local.is_contiguous() and local.dtype == st.dtype:
                ck.read_box(fk, offs, lshape, local)
            else:
                buf = torch.empty(lshape, dtype=st.dtype)
                ck.read_box(fk, offs, lshape, buf)
                local.copy_(buf.view(local.shape) if tuple(local.shape) != lshape else buf)
    return HFLoadResult(ck.path, [mk for mk, _ in plan], tied, still, unexpected, ck.bytes_read)


def _ignored(model: Any, attr: str, key: str) -> bool:
    patterns = getattr(model, attr, None)  # a set of regexes in transformers 5, a list before
    if not isinstance(patterns, (list, tuple, set, frozenset)):
        return False
    for pat in patterns:
        try:
            if isinstance(pat, str) and re.search(pat, key):
                return True
        except re.error:
            continue
    return False


def _adapt_base_prefix(model: Any, norm_of: dict[str, str], file_names: dict[str, str]) -> None:
    """transformers' base-model prefix: a ``GPT2Model`` directory loads into ``GPT2LMHeadModel`` (its keys lack
    ``transformer.``) and the other way round, when that makes more keys match (``file_names`` adjusted)."""
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix:
        return
    p = prefix + "."
    model_names = set(norm_of.values())
    direct = sum(1 for n in file_names if n in model_names)
    added = {p + n: k for n, k in file_names.items()}
    removed = {n[len(p) :]: k for n, k in file_names.items() if n.startswith(p)}
    best = max(((sum(1 for n in c if n in model_names), i, c) for i, c in enumerate((added, removed))),
               key=lambda x: (x[0], -x[1]))  # fmt: skip
    if best[0] > direct:
        file_names.clear()
        file_names.update(best[2])


__all__ = [
    "DEFAULT_COPY_FILES",
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportPlan",
    "HFCheckpoint",
    "HFExportResult",
    "HFLoadResult",
    "box_runs",
    "compile_key_map",
    "export_hf",
    "index_json",
    "load_hf_into",
    "open_hf",
    "parse_dtype",
    "parse_rename",
    "parse_size",
    "plan_export",
    "select_model",
    "strip_wrappers",
]
