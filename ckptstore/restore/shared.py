"""Read once, broadcast: replicated state is read from storage by one rank and sent to the others.

Under DDP every rank restores the same tensors; reading them on every rank costs N times the checkpoint in storage
requests and bytes (1024 ranks: 1024 GETs of every object). Here the pieces that *every* rank reads whole are
assigned to owner ranks (runs of neighbouring pieces of about equal bytes); each owner reads and checks (crc32c)
its pieces, and the bytes travel to the other ranks over the checkpoint process group (gloo). Pieces only some
ranks need (FSDP2 shards, ``PerRank`` values) are read directly by those ranks, as before. The job's storage
traffic is then the checkpoint's, whatever the world size. A piece checked by the checksum of its group of parts
(format 2 layout lines with a group size) is read with its whole group (``read_pieces``): two owners whose runs
meet inside a group both read it, at most ``GROUP_BYTES`` more per owner.

The call sequence, the same on every rank (all collectives are reached by every rank whatever happens locally):

1. ``all_gather`` of a digest of the keys this rank reads whole: ranks that agree share those keys' pieces (if
   they do not all agree, every rank reads everything itself: a mixed layout is not worth a negotiation).
2. Every rank reads its own pieces: the shared ones it owns and the ones only it needs. Errors are caught.
3. ``all_gather`` of each rank's outcome. A damaged piece (``IntegrityError``) is raised on every rank, so the
   restore falls back alike everywhere; any other owner failure makes every rank read the shared pieces itself,
   with a warning.
4. One ``broadcast`` per batch of an owner's pieces (small pieces packed into a staging buffer of at most
   ``read_chunk_bytes``, large ones sent from their destination memory), in an order every rank derives alike.

Example::

    read_shared(storage, prefix, rc.tasks, io, comm, step=7)     # instead of read_pieces(...) on every rank
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dist import Comm
from ..errors import IntegrityError
from ..io import ReadTask, read_pieces
from ..options import IOOptions
from ..storage import Storage

log = logging.getLogger("ckptstore")

PieceId = tuple[str, int, int]
"""(file, start, end) of a stored piece."""


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    integrity: bool = False
    message: str = ""
    file: str | None = None
    key: str | None = None


def _whole_keys(tasks: Sequence[ReadTask], npieces: dict[str, int]) -> list[str]:
    """Keys whose every stored piece this rank reads (a replica), sorted."""
    seen: dict[str, set[PieceId]] = {}
    for t in tasks:
        seen.setdefault(t.key, set()).add(_pid(t))
    return sorted(k for k, ids in seen.items() if len(ids) == npieces.get(k, -1))


def _pid(t: ReadTask) -> PieceId:
    return (t.piece.file, t.piece.start, t.piece.end)


def _owners(pieces: Sequence[tuple[PieceId, int]], world: int) -> dict[PieceId, int]:
    """Each piece's owner: the pieces in file order cut into ``world`` runs of about equal bytes, so that an
    owner's pieces are neighbours in their files and its reads coalesce into few large requests. Deterministic."""
    ordered = sorted(pieces)
    total = sum(n for _, n in ordered)
    out: dict[PieceId, int] = {}
    done = 0
    for pid, n in ordered:
        # The run a piece belongs to is decided by the middle of its bytes.
        out[pid] = min(world - 1, int((done + n / 2) * world // total)) if total else 0
        done += n
    return out


def _digest(keys: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in keys:
        h.update(k.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def read_shared(
    storage: Storage,
    prefix: str,
    tasks: Sequence[ReadTask],
    options: IOOptions,
    comm: Comm,
    *,
    npieces: dict[str, int],
    step: int | None = None,
) -> int:
    """Read and verify ``tasks`` like :func:`ckptstore.io.read_pieces`, reading replicated pieces once per job.

    ``npieces``: the number of stored pieces of each key (from the manifest). Must be called on every rank of
    ``comm``. Returns the bytes this rank read from storage."""
    whole = _whole_keys(tasks, npieces)
    digests = comm.all_gather(_digest(whole), what=f"read-once agreement for step {step}")
    if len(set(digests)) != 1 or not whole:
        read_pieces(storage, prefix, tasks, options, step=step)
        return sum(t.piece.nbytes for t in tasks)
    shared_keys = set(whole)
    by_piece: dict[PieceId, list[ReadTask]] = {}
    direct: list[ReadTask] = []
    for t in tasks:
        if t.key in shared_keys:
            by_piece.setdefault(_pid(t), []).append(t)
        else:
            direct.append(t)
    owners = _owners([(pid, ts[0].piece.nbytes) for pid, ts in by_piece.items()], comm.world_size)
    mine = [ts[0] for pid, ts in by_piece.items() if owners[pid] == comm.rank]
    outcome = _read_own(storage, prefix, mine + direct, options, step)
    outcomes: list[_Outcome] = comm.all_gather(outcome, what=f"read-once outcomes for step {step}")
    bad = [(r, o) for r, o in enumerate(outcomes) if not o.ok]
    damaged = [(r, o) for r, o in bad if o.integrity]
    if damaged:
        r, o = damaged[0]
        raise IntegrityError(f"{o.message} (read by rank {r} for every rank)", step=step, file=o.file, key=o.key)
    if bad:
        r, o = bad[0]
        log.warning(
            "step %s: rank %d could not read its share of the replicated pieces (%s); every rank reads them itself",
            step,
            r,
            o.message,
        )
        rest = [ts[0] for pid, ts in by_piece.items() if owners[pid] != comm.rank]
        read_pieces(storage, prefix, rest if outcome.ok else rest + mine + direct, options, step=step)
        _fan_out(by_piece, received=set())  # read here: their hooks ran
        return sum(t.piece.nbytes for t in tasks)
    received = _broadcast_all(by_piece, owners, comm, options, step)
    _fan_out(by_piece, received)
    return sum(t.piece.nbytes for t in mine + direct)


def _read_own(storage: Storage, prefix: str, tasks: list[ReadTask], options: IOOptions, step: int | None) -> _Outcome:
    try:
        read_pieces(storage, prefix, tasks, options, step=step)
    except IntegrityError as e:
        return _Outcome(False, True, str(e), getattr(e, "file", None), getattr(e, "key", None))
    except Exception as e:  # storage errors: the other ranks can still read these pieces themselves
        return _Outcome(False, False, f"{type(e).__name__}: {e}")
    return _Outcome(True)


def _broadcast_all(
    by_piece: dict[PieceId, list[ReadTask]],
    owners: dict[PieceId, int],
    comm: Comm,
    options: IOOptions,
    step: int | None,
) -> set[PieceId]:
    """Send every shared piece from its owner to every rank; returns the pieces this rank received."""
    batch_cap = max(1 << 20, options.read_chunk_bytes)
    staging: torch.Tensor | None = None
    received: set[PieceId] = set()
    for owner in range(comm.world_size):
        ids = sorted(pid for pid in by_piece if owners[pid] == owner)
        batch: list[PieceId] = []
        size = 0
        for pid in [*ids, None]:
            n = 0 if pid is None else by_piece[pid][0].piece.nbytes
            if batch and (pid is None or size + n > batch_cap):
                if staging is None:
                    staging = torch.empty(batch_cap, dtype=torch.uint8)
                _send_batch(by_piece, batch, size, owner, staging, comm, step)
                batch, size = [], 0
            if pid is None:
                break
            if n >= batch_cap:  # big: straight from (into) its destination memory
                dest = torch.frombuffer(by_piece[pid][0].dest, dtype=torch.uint8)
                comm.broadcast_tensor(dest, src=owner, what=f"read-once piece of step {step}")
                continue
            batch.append(pid)
            size += n
        if owner != comm.rank:
            received.update(ids)
    return received


def _send_batch(
    by_piece: dict[PieceId, list[ReadTask]],
    batch: list[PieceId],
    size: int,
    owner: int,
    staging: torch.Tensor,
    comm: Comm,
    step: int | None,
) -> None:
    buf = staging[:size]
    if comm.rank == owner:
        pos = 0
        for pid in batch:
            src = by_piece[pid][0].dest
            buf[pos : pos + src.nbytes].copy_(torch.frombuffer(src, dtype=torch.uint8))
            pos += src.nbytes
    comm.broadcast_tensor(buf, src=owner, what=f"read-once batch of step {step}")
    if comm.rank != owner:
        pos = 0
        for pid in batch:
            dest = by_piece[pid][0].dest
            torch.frombuffer(dest, dtype=torch.uint8).copy_(buf[pos : pos + dest.nbytes])
            pos += dest.nbytes


def _fan_out(by_piece: dict[PieceId, list[ReadTask]], received: set[PieceId]) -> None:
    """Copy each piece to this rank's other destinations of it, then run the ``after`` hooks the reads did not."""
    for pid, ts in by_piece.items():
        first = ts[0]
        for t in ts[1:]:
            torch.frombuffer(t.dest, dtype=torch.uint8).copy_(torch.frombuffer(first.dest, dtype=torch.uint8))
        for i, t in enumerate(ts):
            if (i > 0 or pid in received) and t.after is not None:
                t.after()
