"""Retention policies: which committed steps to keep. Pure functions of step metadata — no I/O, no clock.

Modelled on Orbax's preservation policies: each policy is a small frozen object answering one question
("which of these steps do *I* want kept?") and policies compose as a **union** — a step survives when any
policy keeps it. :func:`select_deletions` then adds the hard guarantees of the design (§6): the newest
committed step, pinned steps, protected steps (e.g. the one being restored from) and the current best step
of every :class:`KeepBest` are never deleted, whatever the policy says.

Steps are ordered by their integer step number everywhere — never by string, mtime or ``created_at``.

Example::

    from ckptstore.retention import KeepBest, KeepLast, select_deletions

    policy = KeepLast(n=3) | KeepBest(k=2, metric="loss", mode="min")
    doomed = select_deletions(mgr_infos, policy, now=time.time())   # e.g. [1, 2, 4, 5]

The same policy as a dict (the YAML ``retention:`` section)::

    retention_from_dict({"keep_last": 3, "keep_best": {"k": 2, "metric": "loss", "mode": "min"}})
"""

from __future__ import annotations

import datetime as _dt
import difflib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError
from .types import CheckpointInfo

__all__ = [
    "AnyOf",
    "KeepBest",
    "KeepEvery",
    "KeepInterval",
    "KeepLast",
    "KeepPinned",
    "RetentionDecision",
    "RetentionPolicy",
    "coerce_retention",
    "explain",
    "metric_value",
    "rank_by_metric",
    "retention_from_dict",
    "select_deletions",
]


@runtime_checkable
class RetentionPolicy(Protocol):
    """Anything with a ``keep`` method can be a retention policy.

    ``keep`` receives the committed steps (in any order) and returns the step numbers it wants kept; steps it
    does not return are deleted unless another policy of a union keeps them (or a guarantee of
    :func:`select_deletions` protects them). Implementations must be pure: same input, same answer.

    Example::

        class KeepOdd:
            def keep(self, infos, *, now):
                return {i.step for i in infos if i.step % 2}

        select_deletions(infos, KeepOdd() | KeepLast(n=1), now=time.time())
    """

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]: ...


# -- validation helpers (shared with ckptstore.config) -------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _positive_int(value: Any, where: str) -> int:
    # bool is an int subclass: `keep_last: true` must not silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer (>= 1), got {value!r} ({_type_name(value)})")
    return value


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a positive number, got {value!r} ({_type_name(value)})")
    return float(value)


def _step_list(value: Any, where: str) -> tuple[int, ...]:
    # A str is iterable too; "12" must not become steps {1, 2}.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(f"{where} must be a list of step numbers, got {value!r} ({_type_name(value)})")
    steps = []
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where} must contain non-negative integer steps, got {s!r} ({_type_name(s)})")
        steps.append(s)
    return tuple(sorted(set(steps)))


def _reject_unknown_keys(d: Mapping[Any, Any], valid: Iterable[str], where: str) -> None:
    """Raise ConfigError for keys of ``d`` not in ``valid``, with a did-you-mean hint and the valid keys."""
    valid = sorted(valid)
    unknown = [k for k in d if k not in valid]
    if not unknown:
        return
    parts = []
    lowered = {v.lower(): v for v in valid}
    for k in unknown:
        # Case-insensitive: `K` should suggest `k`, `Keep_Last` should suggest `keep_last`.
        key = str(k).lower()
        hint = [lowered[key]] if key in lowered else difflib.get_close_matches(key, list(lowered), n=1)
        hint = [lowered[h] for h in hint]
        parts.append(f"{k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    noun = "key" if len(unknown) == 1 else "keys"
    raise ConfigError(f"unknown {where} {noun} {', '.join(parts)}; valid keys: {', '.join(valid)}")


def _unique(infos: Iterable[CheckpointInfo]) -> dict[int, CheckpointInfo]:
    # A step listed twice (e.g. by a caller merging tiers) must count once: first occurrence wins.
    out: dict[int, CheckpointInfo] = {}
    for info in infos:
        out.setdefault(int(info.step), info)
    return out


def metric_value(info: Any, name: str) -> int | float | None:
    """The value of metric ``name`` of ``info`` if it can rank, else ``None``.

    A value ranks when it is an ``int`` or ``float`` (``bool`` is not a number here) and finite: NaN, +inf and
    -inf do not rank, nor do strings, ``None``, lists or a missing metric. The value is returned as stored,
    never passed through ``float()``: an integer too large for a float (``10**400``, which a JSON manifest
    can hold) is an ordinary finite number and compares exactly with floats, as Python compares them.

    Example::

        metric_value(info, "loss")     # 0.41, or None for a missing / NaN / inf / non-numeric loss
    """
    metrics = getattr(info, "metrics", None)
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rank_by_metric(infos: Iterable[CheckpointInfo], metric: str, mode: str) -> list[CheckpointInfo]:
    """The steps of ``infos`` that have a rankable ``metric``, best first: the ONE ranking of "best".

    :meth:`CheckpointManager.best() <ckptstore.CheckpointManager.best>`, ``restore(step="best")``, the CLI and
    :class:`KeepBest` all rank with this function, so the step they call best is the same one. The rules:

    - ``mode="min"``: lower is better; ``mode="max"``: higher is better.
    - Only values accepted by :func:`metric_value` rank: a step whose metric is missing, non-numeric, NaN or
      ±inf is left out of the result (it is never best, even ``-inf`` under ``"min"``); an empty result means
      no step is best.
    - Values compare exactly with Python's int/float semantics (a huge int never raises ``OverflowError``).
    - Equal values: the newer (higher) step ranks first.
    - A step listed twice counts once (its first occurrence).

    ``infos`` is the list of candidates, e.g. the committed steps of one tier minus quarantined ones; the
    function ranks exactly what it is given and does no I/O. Returns the given info objects.

    Example::

        rank_by_metric(mgr.history(), "loss", "min")[0].step     # the step best() returns
    """
    return [info for info, _ in _ranked(infos, metric, mode)]


def _ranked(infos: Iterable[CheckpointInfo], metric: str, mode: str) -> list[tuple[CheckpointInfo, int | float]]:
    # rank_by_metric with each step's value.
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"metric must be a non-empty string (a key of save(metrics=...)), got {metric!r}")
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    scored: list[tuple[int | float, int, CheckpointInfo, int | float]] = []
    for step, info in _unique(infos).items():
        value = metric_value(info, metric)
        if value is not None:
            scored.append((value if mode == "min" else -value, -step, info, value))
    scored.sort(key=lambda t: (t[0], t[1]))  # never compares the infos themselves
    return [(info, value) for _, _, info, value in scored]


def _fmt_metric(value: int | float) -> str:
    # f"{10**400:g}" raises OverflowError: such ints are shown like %g from their digits (truncated to 6).
    try:
        return f"{value:g}"
    except OverflowError:
        sign = "-" if value < 0 else ""
        try:
            digits = str(abs(value))
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            return f"{sign}~1e+{int((abs(value).bit_length() - 1) * math.log10(2))}"
        fraction = digits[1:6].rstrip("0")
        return f"{sign}{digits[0]}{'.' + fraction if fraction else ''}e+{len(digits) - 1}"


# -- policies ------------------------------------------------------------------------------------------------


class _Policy:
    """Mixin of the built-in policies: ``|`` builds a union, ``describe`` a human label."""

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """A short human label, e.g. ``"last 3"``; used by :func:`explain`."""
        return repr(self)

    def _reasons(self, infos: Sequence[CheckpointInfo], *, now: float) -> dict[int, str]:
        # Per-step reason for each kept step; subclasses add detail (the metric value, the epoch).
        return {s: self.describe() for s in self.keep(infos, now=now)}

    def __or__(self, other: object) -> AnyOf:
        if not _is_policy(other):
            return NotImplemented
        return AnyOf(self, other)  # type: ignore[arg-type]

    def __ror__(self, other: object) -> AnyOf:
        if not _is_policy(other):
            return NotImplemented
        return AnyOf(other, self)  # type: ignore[arg-type]


def _is_policy(x: object) -> bool:
    # A class object has a `keep` attribute too; only instances are policies.
    return not isinstance(x, type) and isinstance(x, RetentionPolicy)


@dataclass(frozen=True, kw_only=True)
class KeepLast(_Policy):
    """Keep the ``n`` newest steps (highest step numbers).

    Example::

        KeepLast(n=3).keep(infos, now=0)   # steps 1..12, 100, 1000 -> {12, 100, 1000}
    """

    n: int

    def __post_init__(self) -> None:
        _positive_int(self.n, "KeepLast: n")

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        return set(sorted(_unique(infos))[-self.n :])

    def describe(self) -> str:
        return f"last {self.n}"


@dataclass(frozen=True, kw_only=True)
class KeepBest(_Policy):
    """Keep the ``k`` steps with the best value of ``metric`` (``mode="min"``: lowest, ``"max"``: highest).

    Steps are ranked by :func:`rank_by_metric`, the same ranking as ``CheckpointManager.best()``: only finite
    numbers count, so a step whose metric is missing, not a number (str, bool, None), NaN or ±inf is never
    "best" and is not kept by this policy (a diverged step must not be protected forever); ints compare
    exactly, however large; ties go to the newer (higher) step.

    Example::

        KeepBest(k=2, metric="loss", mode="min").keep(infos, now=0)
        KeepBest(k=1, metric="accuracy", mode="max")
    """

    k: int = 1
    metric: str = "loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        _positive_int(self.k, "KeepBest: k")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"KeepBest: metric must be a non-empty string, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"KeepBest: mode must be 'min' or 'max', got {self.mode!r}")

    def ranked(self, infos: Sequence[CheckpointInfo]) -> list[tuple[int, int | float]]:
        """``(step, value)`` of every step with a rankable metric, best first (see :func:`rank_by_metric`)."""
        return [(int(info.step), value) for info, value in _ranked(infos, self.metric, self.mode)]

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        return {s for s, _ in self.ranked(infos)[: self.k]}

    def describe(self) -> str:
        return f"best {self.k} by {self.metric} ({self.mode})"

    def _reasons(self, infos: Sequence[CheckpointInfo], *, now: float) -> dict[int, str]:
        # Annotate what keep() returned (a subclass may override keep), not what ranked() would pick.
        values = dict(self.ranked(infos))
        return {
            s: f"{self.describe()} [{self.metric}={_fmt_metric(values[s])}]" if s in values else self.describe()
            for s in self.keep(infos, now=now)
        }


@dataclass(frozen=True, kw_only=True, repr=False)
class KeepEvery(_Policy):
    """Keep regularly spaced steps: give exactly one of ``steps`` or ``epochs``.

    - ``KeepEvery(steps=N)`` keeps every step whose number is a multiple of ``N`` (step 0 included).
    - ``KeepEvery(epochs=N)`` keeps, for every epoch ``e`` with ``e % N == 0`` (0, N, 2N, …), the *first*
      step saved in that epoch, i.e. the lowest step number whose ``epoch`` is ``e``. "First" keeps the choice
      stable: later saves in the same epoch never displace it. Steps saved without an epoch are ignored.

    Example::

        KeepEvery(steps=1000)     # 1000, 2000, ...
        KeepEvery(epochs=5)       # first checkpoint of epochs 0, 5, 10, ...
    """

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"KeepEvery needs exactly one of steps= or epochs=, got steps={self.steps!r}, epochs={self.epochs!r}"
            )
        if self.steps is not None:
            _positive_int(self.steps, "KeepEvery: steps")
        else:
            _positive_int(self.epochs, "KeepEvery: epochs")

    def _first_of_epoch(self, infos: Sequence[CheckpointInfo]) -> dict[int, int]:
        assert self.epochs is not None
        first: dict[int, int] = {}
        for step, info in sorted(_unique(infos).items()):
            e = info.epoch
            if isinstance(e, bool) or not isinstance(e, int) or e % self.epochs:
                continue
            first.setdefault(e, step)
        return {step: e for e, step in first.items()}

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        if self.steps is not None:
            return {s for s in _unique(infos) if s % self.steps == 0}
        return set(self._first_of_epoch(infos))

    def __repr__(self) -> str:
        return f"KeepEvery(steps={self.steps!r})" if self.steps is not None else f"KeepEvery(epochs={self.epochs!r})"

    def describe(self) -> str:
        if self.steps is not None:
            return f"every {self.steps} steps"
        return "first step of every epoch" if self.epochs == 1 else f"first step of every {self.epochs} epochs"

    def _reasons(self, infos: Sequence[CheckpointInfo], *, now: float) -> dict[int, str]:
        if self.steps is not None:
            return super()._reasons(infos, now=now)
        epochs = self._first_of_epoch(infos)
        return {
            s: f"{self.describe()} [epoch {epochs[s]}]" if s in epochs else self.describe()
            for s in self.keep(infos, now=now)
        }


@dataclass(frozen=True, kw_only=True)
class KeepInterval(_Policy):
    """Keep one step per time bucket of ``seconds`` — the newest step (highest number) of each bucket.

    Buckets are aligned to the Unix epoch (UTC): ``bucket = floor(min(created_at, now) / seconds)``, so
    ``seconds=3600`` means calendar hours and ``86400`` UTC days.

    Robust to clock skew across machines and restarts: within a bucket the winner is chosen by step number,
    never by time, so a ``created_at`` that goes backwards cannot make an older step win over a newer one; a
    ``created_at`` in the future (relative to ``now``) is clamped to ``now``, so a skewed step cannot occupy a
    bucket of its own forever. Either way the newest step overall is always kept by this policy. Steps whose
    ``created_at`` is not a finite number are ignored.

    Example::

        KeepInterval(seconds=3600)    # one checkpoint per hour, the last one taken in that hour
    """

    seconds: float

    def __post_init__(self) -> None:
        _positive_number(self.seconds, "KeepInterval: seconds")

    def _winners(self, infos: Sequence[CheckpointInfo], now: float) -> dict[int, int]:
        # step -> bucket index, for the newest step of every bucket
        newest: dict[int, int] = {}
        for step, info in _unique(infos).items():
            t = info.created_at
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                continue
            bucket = math.floor(min(float(t), now) / self.seconds)
            if step > newest.get(bucket, -1):
                newest[bucket] = step
        return {step: bucket for bucket, step in newest.items()}

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        return set(self._winners(infos, now))

    def describe(self) -> str:
        return f"newest step per {self.seconds:g}s interval"

    def _reasons(self, infos: Sequence[CheckpointInfo], *, now: float) -> dict[int, str]:
        winners = self._winners(infos, now)
        out = {}
        for step in self.keep(infos, now=now):
            if step in winners:
                start = _dt.datetime.fromtimestamp(winners[step] * self.seconds, tz=_dt.timezone.utc)
                out[step] = f"{self.describe()} [from {start.strftime('%Y-%m-%dT%H:%M:%SZ')}]"
            else:
                out[step] = self.describe()
        return out


@dataclass(frozen=True, kw_only=True)
class KeepPinned(_Policy):
    """Keep exactly these step numbers (those that exist).

    Example::

        KeepPinned(steps=[5000, 10000]) | KeepLast(n=2)
    """

    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Normalise any iterable to a sorted tuple so the frozen policy stays hashable and comparable.
        object.__setattr__(self, "steps", _step_list(self.steps, "KeepPinned: steps"))

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        return set(_unique(infos)) & set(self.steps)

    def describe(self) -> str:
        return "pinned"


@dataclass(frozen=True, init=False, repr=False)
class AnyOf(_Policy):
    """Union of policies: a step is kept when any member keeps it. ``a | b`` is ``AnyOf(a, b)``.

    Nested unions are flattened, so ``(a | b) | c == AnyOf(a, b, c)``.

    Example::

        policy = AnyOf(KeepLast(n=3), KeepBest(k=1), KeepEvery(steps=10_000))
    """

    policies: tuple[RetentionPolicy, ...] = field(default=())

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for p in policies:
            if not _is_policy(p):
                raise ConfigError(f"AnyOf members must be retention policies (with a keep() method), got {p!r}")
            flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
        if not flat:
            raise ConfigError("AnyOf needs at least one policy")
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, infos: Sequence[CheckpointInfo], *, now: float) -> set[int]:
        kept: set[int] = set()
        for p in self.policies:
            kept |= set(p.keep(infos, now=now))
        return kept

    def describe(self) -> str:
        return " | ".join(_describe(p) for p in self.policies)

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.policies))})"


def _describe(p: RetentionPolicy) -> str:
    d = getattr(p, "describe", None)
    return d() if callable(d) else repr(p)


def _leaves(policy: RetentionPolicy) -> Iterator[RetentionPolicy]:
    if isinstance(policy, AnyOf):
        for p in policy.policies:
            yield from _leaves(p)
    else:
        yield policy


def _policy_reasons(policy: RetentionPolicy, infos: Sequence[CheckpointInfo], now: float) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for p in _leaves(policy):
        if isinstance(p, _Policy):
            per_step = p._reasons(infos, now=now)
        else:
            label = _describe(p)
            per_step = {int(s): label for s in p.keep(infos, now=now)}
        for s, why in per_step.items():
            reasons.setdefault(s, []).append(why)
    return reasons


# -- selection -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionDecision:
    """The verdict for one step: kept or deleted, and why.

    Example::

        for d in explain(infos, policy, now=time.time()):
            print(f"step {d.step}: {d.describe()}")   # "step 12: kept: last 3; newest committed step"
    """

    step: int
    keep: bool
    reasons: tuple[str, ...]

    def describe(self) -> str:
        """``"kept: <reason>; <reason>"`` or ``"deleted: not kept by any policy"``."""
        return f"{'kept' if self.keep else 'deleted'}: {'; '.join(self.reasons)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json`` output)."""
        return {"step": self.step, "action": "keep" if self.keep else "delete", "reasons": list(self.reasons)}

    def __str__(self) -> str:
        return f"step {self.step}: {self.describe()}"


def explain(
    infos: Sequence[CheckpointInfo],
    policy: RetentionPolicy | Mapping[str, Any] | None,
    *,
    now: float,
    pinned: Iterable[int] = (),
    protect: Iterable[int] = (),
) -> list[RetentionDecision]:
    """Decide every step and say why; ascending by step. :func:`select_deletions` is the deleted subset.

    Guarantees, applied on top of ``policy`` (see :func:`select_deletions`): the newest committed step, the
    steps in ``pinned`` and ``protect`` and the current best step of every :class:`KeepBest` inside ``policy``
    are kept. With ``policy=None`` every step is kept. ``policy`` may also be a dict (``retention:`` schema).

    Example::

        for d in explain(infos, KeepLast(n=2), now=time.time(), protect=[restoring_from]):
            print(d)    # step 7: deleted: not kept by any policy
    """
    policy = coerce_retention(policy)
    by_step = _unique(infos)
    if not by_step:
        return []
    pinned_set = set(_step_list(pinned, "pinned"))
    protect_set = set(_step_list(protect, "protect"))
    newest = max(by_step)  # integer max: never a string sort or an mtime

    reasons: dict[int, list[str]] = {} if policy is None else _policy_reasons(policy, list(by_step.values()), now)
    best: dict[int, list[str]] = {}
    if policy is not None:
        for p in _leaves(policy):
            if isinstance(p, KeepBest):
                ranked = p.ranked(list(by_step.values()))
                if ranked:
                    best.setdefault(ranked[0][0], []).append(f"current best by {p.metric} ({p.mode})")

    decisions = []
    for step in sorted(by_step):
        why = [r for r in reasons.get(step, []) if r]
        if policy is None:
            why.append("no retention policy")
        if step == newest:
            why.append("newest committed step")
        if step in pinned_set:
            why.append("pinned")
        if step in protect_set:
            why.append("protected (in use)")
        if not why:
            # Only reached when the policy tree hides its KeepBest verdict (e.g. an overriding subclass).
            why.extend(best.get(step, []))
        why = list(dict.fromkeys(why))  # KeepPinned and pinned= both say "pinned"
        decisions.append(RetentionDecision(step, bool(why), tuple(why) or ("not kept by any policy",)))
    return decisions


def select_deletions(
    infos: Sequence[CheckpointInfo],
    policy: RetentionPolicy | Mapping[str, Any] | None,
    *,
    now: float,
    pinned: Iterable[int] = (),
    protect: Iterable[int] = (),
) -> list[int]:
    """Steps to delete under ``policy``, ascending.

    Never returned, whatever the policy: the newest committed step (highest step number), any step in
    ``pinned``, any step in ``protect`` (e.g. the step being restored from), and the current best step of
    every :class:`KeepBest` inside ``policy``. ``policy=None`` deletes nothing. ``now`` (Unix seconds) is
    passed in rather than read from the clock so that the function stays pure and testable.

    Example::

        select_deletions(infos, KeepLast(n=2), now=time.time())    # steps 1..12, 100, 1000 -> [1, ..., 12]
    """
    if policy is None:
        return []  # fast path: no policy, nothing to decide
    return [d.step for d in explain(infos, policy, now=now, pinned=pinned, protect=protect) if not d.keep]


# -- dict / YAML form ----------------------------------------------------------------------------------------

RETENTION_KEYS = (
    "keep_last",
    "keep_best",
    "keep_every_steps",
    "keep_every_epochs",
    "keep_interval_seconds",
    "pinned",
)
KEEP_BEST_KEYS = ("k", "metric", "mode")


def retention_from_dict(d: Mapping[str, Any] | None, *, where: str = "retention") -> RetentionPolicy | None:
    """Build a policy from the ``retention:`` schema; several keys make a union, ``None``/``{}`` no policy.

    Schema (every key optional)::

        keep_last: 3                                   # positive int
        keep_best: {k: 2, metric: loss, mode: min}     # k >= 1 (default 1), metric (default loss), min|max
        keep_every_steps: 1000                         # positive int
        keep_every_epochs: 5                           # positive int
        keep_interval_seconds: 3600                    # positive number
        pinned: [500, 1200]                            # list of step numbers

    Unknown keys and wrong types raise :class:`~ckptstore.errors.ConfigError` naming the key (``where`` is the
    prefix used in messages).

    Example::

        retention_from_dict({"keep_last": 3, "pinned": [100]})
        # -> AnyOf(KeepLast(n=3), KeepPinned(steps=(100,)))
    """
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"{where} must be a mapping with keys {', '.join(RETENTION_KEYS)}, got {d!r} ({_type_name(d)})"
        )
    _reject_unknown_keys(d, RETENTION_KEYS, where)
    policies: list[RetentionPolicy] = []
    if "keep_last" in d:
        policies.append(KeepLast(n=_positive_int(d["keep_last"], f"{where}.keep_last")))
    if "keep_best" in d:
        kb = d["keep_best"]
        if not isinstance(kb, Mapping):
            raise ConfigError(
                f"{where}.keep_best must be a mapping like {{k: 2, metric: loss, mode: min}}, "
                f"got {kb!r} ({_type_name(kb)})"
            )
        _reject_unknown_keys(kb, KEEP_BEST_KEYS, f"{where}.keep_best")
        k = _positive_int(kb.get("k", 1), f"{where}.keep_best.k")
        metric = kb.get("metric", "loss")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{where}.keep_best.metric must be a non-empty string (a metric name), got {metric!r}")
        mode = kb.get("mode", "min")
        if mode not in ("min", "max"):
            raise ConfigError(f"{where}.keep_best.mode must be 'min' or 'max', got {mode!r}")
        policies.append(KeepBest(k=k, metric=metric, mode=mode))
    if "keep_every_steps" in d:
        policies.append(KeepEvery(steps=_positive_int(d["keep_every_steps"], f"{where}.keep_every_steps")))
    if "keep_every_epochs" in d:
        policies.append(KeepEvery(epochs=_positive_int(d["keep_every_epochs"], f"{where}.keep_every_epochs")))
    if "keep_interval_seconds" in d:
        seconds = _positive_number(d["keep_interval_seconds"], f"{where}.keep_interval_seconds")
        policies.append(KeepInterval(seconds=seconds))
    if "pinned" in d:
        policies.append(KeepPinned(steps=_step_list(d["pinned"], f"{where}.pinned")))
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else AnyOf(*policies)


def coerce_retention(x: RetentionPolicy | Mapping[str, Any] | None) -> RetentionPolicy | None:
    """Accept what users pass as ``retention=``: ``None``, a policy object or a dict (see
    :func:`retention_from_dict`).

    Example::

        coerce_retention({"keep_last": 2})   # KeepLast(n=2)
        coerce_retention(KeepLast(n=2))      # returned as is
    """
    if x is None:
        return None
    if isinstance(x, Mapping):
        return retention_from_dict(x)
    if isinstance(x, type):
        raise ConfigError(f"retention must be a policy instance, not the class {x.__name__} (e.g. KeepLast(n=3))")
    if _is_policy(x):
        return x
    raise ConfigError(
        f"retention must be None, a dict or a policy object with a keep() method, got {x!r} ({_type_name(x)})"
    )
