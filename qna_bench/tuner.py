"""Choosing the fastest of a layer's forms, as a measurement: the one tuner that QnA's plans and every
peer's forms (`qna_bench.forms`) go through.

In the manner of `triton.testing.do_bench`, and stricter where a tuner has been wrong here:
1. **Proof before time.** Each candidate's first call (untimed: it pays for compilation, oneDNN
   primitives, FFT plans) returns the tensors its form must reproduce (the output and, in train, the
   gradients); they are compared with the first candidate's, the form as built. A form that differs
   beyond its dtype's tolerance, or raises, is refused and never timed; the refusal is logged with the
   difference.
2. **Then prune.** One timed call each, the second call of each (the first paid its one-off costs), in
   turn: the first of the interleaved rounds. Candidates slower than `PRUNE_FACTOR` × the fastest of
   those calls leave the race.
3. **Interleaved rounds.** The rest are timed in `ROUNDS` - 1 more rounds, one block each per round
   (calls enough to last `BLOCK_S`), the order rotated every round; the lowest median over rounds wins.
4. **A quiet machine.** The canary (`qna_bench.measure.canary`, the fastest of 15 products) is timed before
   and after. A tuning whose canary ran more than `SLOW_CANARY_SHARE` slower than the canary this machine
   usually shows around its tunings (`usual_canary`) is done once more, after the canary has come back
   to its usual (up to `QUIET_WAIT_S`); if its canary runs slow again, its choice is used but not kept on
   disk (`Tuning.keep` is False).

The choices are kept on disk per key (`read_choice`, `write_choice`: one JSON file per key, written
atomically) in ``$QNA_BENCH_CACHE_DIR``; the key names everything the speed of the candidates depends on,
the candidate set included, so a new candidate tunes afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from qna_bench import disk_cache

Tune = Literal["cached", "always", "off"]
TUNES: tuple[str, ...] = get_args(Tune)
# Where a layer's form came from: timed now, read from the disk cache, as built (`tune=off`, or nothing
# to choose), or named by the caller.
FormSource = Literal["tuned", "cache", "default", "forced"]
FORM_SOURCES: tuple[str, ...] = get_args(FormSource)

# A candidate's second call over this factor of the fastest second call leaves: a 2-core CPU's slow spells
# moved one call by up to ~30%, and at large windows the slow plans cost seconds a call.
PRUNE_FACTOR = 1.5
ROUNDS = 3
# A block's calls last at least this long: sub-millisecond candidates are timed over several calls.
BLOCK_S = 0.02
SLOW_CANARY_SHARE = 0.3
# Before a tuning is done again, the canary is timed every `QUIET_POLL_S` until it is back within
# `SLOW_CANARY_SHARE` of its usual, for at most this long: this VM's slow spells last seconds.
QUIET_WAIT_S = 10.0
QUIET_POLL_S = 0.25
# How far a form's tensors may stray from the as-built form's: the largest difference over the largest
# magnitude of the reference, per tensor. fp32: FFT against direct sums differ by ~1e-6 of the maximum.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}

log = logging.getLogger(__name__)

# One call of a candidate in seconds: ``timer(candidate, call)``. Tests stub it.
Timer = Callable[["Candidate", Callable[[], Any]], float]
# The canary's seconds (a fixed small product on the tuning's device); tests stub it.
Canary = Callable[[], float]


@dataclass(frozen=True)
class Candidate:
    """One form to time: its name, what it chooses (``form``, by axis) and one call of the layer in that
    form, returning the tensors that must equal the as-built form's."""

    name: str
    run: Callable[[], Sequence[torch.Tensor]]
    form: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Tuning:
    """The outcome: the winner's name, each timed candidate's median seconds (pruned ones: their one
    timed call), the refused forms with why, the seconds the tuning took, and whether to keep it."""

    winner: str
    medians_s: tuple[tuple[str, float], ...]
    refused: tuple[tuple[str, str], ...]
    seconds: float
    canary_s: tuple[float, float] | None
    keep: bool
    skipped: tuple[tuple[str, str], ...] = ()


def time_call(candidate: Candidate, call: Callable[[], Any]) -> float:
    """Seconds of one ``call`` (synchronised on CUDA)."""
    start = time.perf_counter()
    call()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def difference(tensors: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float | str:
    """The largest relative difference of ``tensors`` from ``reference`` (per tensor: the largest absolute
    difference over the reference's largest magnitude), or why they cannot be compared."""
    if len(tensors) != len(reference):
        return f"{len(tensors)} tensors where the form as built gives {len(reference)}"
    worst = 0.0
    for index, (got, want) in enumerate(zip(tensors, reference)):
        if got is None or want is None:
            if got is not want:
                return f"tensor {index} is None on one side only"
            continue
        if got.shape != want.shape:
            return f"tensor {index} has shape {tuple(got.shape)}, the form as built {tuple(want.shape)}"
        got, want = got.detach().double(), want.detach().double()
        if not torch.isfinite(got).all() and not torch.equal(torch.isfinite(got), torch.isfinite(want)):
            return f"tensor {index} has non-finite values the form as built has not"
        finite = torch.isfinite(want)
        scale = want[finite].abs().max().item() if finite.any() else 0.0
        gap = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        worst = max(worst, gap / scale if scale > 0 else gap)
    return worst


def _outputs(value: Any) -> list[torch.Tensor]:
    tensors = [value] if isinstance(value, torch.Tensor) or value is None else list(value)
    return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in tensors]


def _block(candidate: Candidate, timer: Timer, calls: int) -> float:
    """Mean seconds of ``calls`` timed calls of ``candidate``."""
    return sum(timer(candidate, candidate.run) for _ in range(calls)) / calls


def tune(
    candidates: Sequence[Candidate],
    dtype: torch.dtype,
    *,
    timer: Timer = time_call,
    canary: Canary | None = None,
    usual_canary_s: float | None = None,
    rounds: int = ROUNDS,
    skip: Mapping[str, str] | None = None,
) -> Tuning:
    """Prove, warm, prune and time ``candidates`` (the first is the form as built, the reference) and
    return the fastest; see the module's docstring. ``usual_canary_s``: the canary this machine usually
    shows (None: this tuning's own faster canary). A tuning whose canary ran slow is done once more, as
    the sweep measures a slow round again; the second's outcome stands. ``skip``: candidates known to
    lose, by name, with why; they are neither run nor timed (the reference always runs)."""
    if not candidates:
        raise ValueError("tune: no candidates")
    skip = skip or {}
    skipped = tuple((c.name, skip[c.name]) for c in candidates[1:] if c.name in skip)
    for name, why in skipped:
        log.info("form %s not timed: %s", name, why)
    candidates = [candidates[0], *(c for c in candidates[1:] if c.name not in skip)]
    return dataclasses.replace(_tune_quietly(candidates, dtype, timer, canary, usual_canary_s, rounds),
                               skipped=skipped)


def _tune_quietly(
    candidates: Sequence[Candidate], dtype: torch.dtype, timer: Timer, canary: Canary | None,
    usual_canary_s: float | None, rounds: int,
) -> Tuning:
    outcome = _tune_once(candidates, dtype, timer, canary, usual_canary_s, rounds)
    if outcome.keep or canary is None or outcome.canary_s is None:
        return outcome
    started = time.perf_counter()
    waited = _await_quiet(canary, usual_canary_s if usual_canary_s is not None else min(outcome.canary_s))
    log.warning("tuning once more%s", f" (the canary came back after {waited:.1f} s)" if waited is not None else
                f" (the canary stayed slow for {QUIET_WAIT_S:.0f} s)")
    again = _tune_once(candidates, dtype, timer, canary, usual_canary_s, rounds)
    waited_s = time.perf_counter() - started - again.seconds
    return dataclasses.replace(again, seconds=outcome.seconds + waited_s + again.seconds)


def _quiet(canary_s: float, usual_s: float) -> bool:
    """Whether a canary of ``canary_s`` is within `SLOW_CANARY_SHARE` of the usual one."""
    return canary_s <= (1.0 + SLOW_CANARY_SHARE) * usual_s


def _await_quiet(canary: Canary, usual_s: float) -> float | None:
    """Time the canary until it is within `SLOW_CANARY_SHARE` of ``usual_s``; the seconds that took, or
    None when it stayed slow for `QUIET_WAIT_S`."""
    started = time.perf_counter()
    while True:
        if _quiet(canary(), usual_s):
            return time.perf_counter() - started
        if time.perf_counter() - started >= QUIET_WAIT_S:
            return None
        time.sleep(QUIET_POLL_S)


def _tune_once(
    candidates: Sequence[Candidate], dtype: torch.dtype, timer: Timer, canary: Canary | None,
    usual_canary_s: float | None, rounds: int,
) -> Tuning:
    started = time.perf_counter()
    before = canary() if canary is not None else None
    reference: list[torch.Tensor] | None = None
    racing: list[Candidate] = []
    refused: list[tuple[str, str]] = []
    for candidate in candidates:
        try:
            outputs = _outputs(candidate.run())
        except Exception as exc:  # noqa: BLE001 - a form that cannot run is refused, not fatal
            if reference is None:
                raise
            refused.append((candidate.name, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            log.warning("form %s refused: %s", candidate.name, refused[-1][1])
            continue
        if reference is None:
            reference = outputs
        else:
            gap = difference(outputs, reference)
            if isinstance(gap, str) or gap > tolerance(dtype):
                why = gap if isinstance(gap, str) else f"differs from the form as built by {gap:.3g} (tolerance {tolerance(dtype):.0e})"
                refused.append((candidate.name, why))
                log.warning("form %s refused: %s", candidate.name, why)
                continue
        racing.append(candidate)
    del reference
    medians: dict[str, float] = {}
    if len(racing) > 1:
        first = {c.name: timer(c, c.run) for c in racing}
        fastest = min(first.values())
        pruned = [c for c in racing if first[c.name] > PRUNE_FACTOR * fastest]
        medians.update({c.name: first[c.name] for c in pruned})
        racing = [c for c in racing if c not in pruned]
        calls = {c.name: max(1, min(50, round(BLOCK_S / max(first[c.name], 1e-9)))) for c in racing}
        times: dict[str, list[float]] = {c.name: [first[c.name]] for c in racing}
        for index in range(1, rounds):
            shift = index % len(racing)
            for candidate in racing[shift:] + racing[:shift]:
                times[candidate.name].append(_block(candidate, timer, calls[candidate.name]))
        medians.update({name: statistics.median(values) for name, values in times.items()})
    winner = min(racing, key=lambda c: medians.get(c.name, 0.0)).name
    after = canary() if canary is not None else None
    keep = True
    canaries = None
    if before is not None and after is not None:
        canaries = (before, after)
        usual = usual_canary_s if usual_canary_s is not None else min(before, after)
        keep = _quiet(max(before, after), usual)
        if not keep:
            log.warning("the canary ran %.2fx its usual during this tuning (%.3f and %.3f ms around it, usually "
                        "%.3f ms, %d threads)",
                        max(before, after) / usual, before * 1e3, after * 1e3, usual * 1e3, torch.get_num_threads())
    ordered = tuple((c.name, medians[c.name]) for c in candidates if c.name in medians)
    return Tuning(winner, ordered, tuple(refused), time.perf_counter() - started, canaries, keep)


# --------------------------------------------------------------------------------------------------
# The disk cache of choices, and of the machine's usual canary


def key_file(key: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20] + ".json"


def _stores() -> list[Path]:
    run = disk_cache.run_cache_dir()
    return [*([run] if run is not None else []), disk_cache.cache_dir()]


def read_choice(subdir: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The entry kept for ``key`` under ``subdir``, from the running sweep's own store first, then the
    disk cache; None where neither has a sound one (missing, corrupt, foreign)."""
    wanted = json.loads(json.dumps(key, default=str))
    for store in _stores():
        try:
            entry = json.loads((store / subdir / key_file(key)).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and entry.get("key") == wanted:
            return entry
    return None


def write_choice(subdir: str, key: Mapping[str, Any], entry: Mapping[str, Any], keep: bool = True) -> None:
    """Keep ``entry`` for ``key`` in the running sweep's store (its later rounds run the same form), and
    with ``keep`` in the disk cache too (each written to a temporary file and renamed over the old one)."""
    record = {"key": json.loads(json.dumps(key, default=str)), **entry}
    for store in _stores()[: None if keep else -1]:
        disk_cache.write_json_atomic(store / subdir / key_file(key), record)


def tuned_in(store: Path) -> tuple[int, float]:
    """The choices a store holds and the seconds their tunings took (a sweep's own store: every key the
    sweep tuned, in whichever process, its workers' warm-up included)."""
    seconds = []
    for path in store.glob("*/*.json"):
        try:
            seconds.append(float(json.loads(path.read_text()).get("tune_s", 0.0)))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return len(seconds), sum(seconds)


_CANARY_STORE = "tuning-canaries"
# The canaries of this many recent tunings are kept per machine and thread count; their median is the
# machine's usual canary once there are `USUAL_AFTER` of them (before that, the fastest seen).
KEPT_CANARIES = 25
USUAL_AFTER = 5


def _noted_canaries(device_key: str, threads: int) -> list[float]:
    value = disk_cache.JsonStore(_CANARY_STORE).get(f"{device_key} | {threads}")
    values = value if isinstance(value, list) else []
    return [float(v) for v in values if isinstance(v, (int, float)) and v > 0]


def usual_canary(device_key: str, threads: int) -> float | None:
    """The canary this machine usually shows around a tuning at these threads, or None before any. A
    shared VM drifts: one idle process measured the fastest of 15 canary products at 0.57-0.76 ms over two
    seconds (1.07 once), so a tuning is judged against the usual canary, not the quietest moment."""
    noted = _noted_canaries(device_key, threads)
    if not noted:
        return None
    return statistics.median(noted) if len(noted) >= USUAL_AFTER else min(noted)


def note_canary(device_key: str, threads: int, tuning: Tuning) -> None:
    """Add this tuning's canary to the machine's record: a kept tuning's, or any while the record is short."""
    if tuning.canary_s is None:
        return
    noted = _noted_canaries(device_key, threads)
    if tuning.keep or len(noted) < USUAL_AFTER:
        noted = [*noted, min(tuning.canary_s)][-KEPT_CANARIES:]
        disk_cache.JsonStore(_CANARY_STORE).put(f"{device_key} | {threads}", noted)
