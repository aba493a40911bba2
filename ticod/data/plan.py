"""The random decisions of a training stream, and where a stream stands after N batches, without reading it.

A training stream (one rank's dataloader worker) is: shards drawn with replacement (see :class:`StreamPlan`),
read one after the other (the *source*, positions 0, 1, 2, ...); a shuffle buffer of ``B``
slots filled with the first ``B`` source samples, after which step ``e`` takes source sample ``B + e`` in
and hands one out (*emission* ``e``): the slot its pick names, whose place the new sample takes, or the
new sample itself when the pick is ``B``. This is webdataset's buffer shuffle (``filters.shuffle``),
with its draws made seekable: the shard draws and the picks come from numpy generators seeded by
``(stream, kind, block)`` for blocks of :data:`BLOCK` draws, so the draws of any position are made
without making those before it, and the position of every sample up to step ``e`` (which emission
handed out which source sample, what the buffer holds) follows from the picks by array arithmetic.

That is what lets a resumed stream seek (ticod.data.train_stream): it reads only the samples the buffer
and the batch grouping hold at its position, instead of re-reading everything drawn before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK = 4096  # draws per seeded block
_SHARDS, _PICKS = 0, 1


class StreamPlan:
    """Shard draws and shuffle picks of one stream (``key``), over shards of ``sizes`` samples.

    Shards are drawn in proportion to ``weights`` (a mix of sources, ``ticod.data.sources.shard_weights``),
    else every non-empty shard equally often: a drawn shard is read whole, so each sample then comes
    equally often (drawing by size would favour full shards over a split's short last one).
    """

    def __init__(
        self, key: str, sizes: Sequence[int], buffer: int, weights: Sequence[float] | None = None
    ) -> None:
        self.seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if len(self.sizes) == 0 or self.sizes.sum() <= 0 or (self.sizes < 0).any():
            raise ValueError("a training split needs shards with samples")
        if weights is None:
            self.p = (self.sizes > 0) / (self.sizes > 0).sum()
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != self.sizes.shape or (w < 0).any() or w.sum() <= 0:
                raise ValueError("one non-negative weight per shard, not all zero")
            self.p = w / w.sum()
        self.buffer = int(buffer)
        self._cached: dict[int, tuple[int, np.ndarray]] = {}

    def _block(self, kind: int, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, kind, block])
        if kind == _SHARDS:
            return rng.choice(len(self.sizes), size=BLOCK, p=self.p)
        return rng.integers(0, self.buffer + 1, size=BLOCK)

    def _draw(self, kind: int, index: int) -> int:
        block, at = divmod(index, BLOCK)
        cached = self._cached.get(kind)
        if cached is None or cached[0] != block:
            cached = self._cached[kind] = (block, self._block(kind, block))
        return int(cached[1][at])

    def _draws(self, kind: int, n: int) -> np.ndarray:
        blocks = [self._block(kind, b) for b in range(-(-n // BLOCK))]
        return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)

    def picks(self, n: int) -> np.ndarray:
        """The picks of steps 0..n-1."""
        return self._draws(_PICKS, n)

    def shard(self, draw: int) -> int:
        """Index of the shard that draw ``draw`` reads."""
        return self._draw(_SHARDS, draw)

    def pick(self, step: int) -> int:
        """The slot emitted at shuffle step ``step`` (``buffer``: the sample taken in at that step)."""
        return self._draw(_PICKS, step)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(draw, shard, sample within the shard) of each source position."""
        positions = np.asarray(positions, dtype=np.int64)
        need = int(positions.max(initial=0))
        draws = np.zeros(0, dtype=np.int64)
        n = BLOCK
        while True:  # enough draws to cover the largest position
            draws = self._draws(_SHARDS, n)
            ends = np.cumsum(self.sizes[draws])
            if ends[-1] > need:
                break
            n *= 2
        draw = np.searchsorted(ends, positions, side="right")
        return draw, draws[draw], positions - (ends[draw] - self.sizes[draws[draw]])


@dataclass
class Position:
    """Where a stream stands after some batches: what it holds and where it reads on.

    Attributes:
        step: Shuffle steps made (samples emitted).
        buffer: Source position of the sample in each buffer slot.
        pending: Source positions of the emitted samples still waiting in the batch grouping, in the
            order they were emitted.
        next_source: The next source position to read.
    """

    step: int
    buffer: np.ndarray
    pending: np.ndarray
    next_source: int


def shuffle_state(picks: np.ndarray, buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """(source position emitted at each step, source position held by each slot after the last step).

    Step ``e`` takes in source ``buffer + e``; a pick ``k < buffer`` emits what slot ``k`` held (its
    initial sample ``k``, or the one taken in at the slot's previous pick) and stores the new one there.
    """
    steps = np.arange(len(picks), dtype=np.int64)
    emitted = buffer + steps  # pick == buffer: the new sample goes straight out
    into_slot = picks < buffer
    s, slot = steps[into_slot], picks[into_slot].astype(np.int64)
    # By slot, then step: s is increasing, so a stable sort by slot keeps each slot's steps in order
    # (numpy radix-sorts 16-bit keys: ~5x lexsort at 10^6 steps, which a resume deep into a run makes).
    order = np.argsort(slot.astype(np.uint16) if buffer <= np.iinfo(np.uint16).max else slot, kind="stable")
    s, slot = s[order], slot[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = slot[1:] != slot[:-1]
    before = np.empty_like(s)
    before[first] = slot[first]
    later = np.flatnonzero(~first)
    before[later] = buffer + s[later - 1]
    emitted[s] = before
    held = np.arange(buffer, dtype=np.int64)
    last = np.ones(len(s), dtype=bool)
    last[:-1] = slot[:-1] != slot[1:]
    held[slot[last]] = buffer + s[last]
    return emitted, held


def position_after(
    plan: StreamPlan,
    groups: int,
    group_size: int,
    bucket: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
) -> Position:
    """Where the stream stands once it has handed out ``groups`` groups of ``group_size`` samples.

    Args:
        plan: The stream's draws.
        groups: Groups handed out.
        group_size: Samples per group.
        bucket: None: groups are consecutive emissions. Else groups form per bucket (a group is handed
            out when its bucket has ``group_size`` samples, as ``train_stream.group_by_aspect`` does), and
            ``bucket(shard, sample)`` gives the bucket of each (shard index, sample index) pair.
    """
    b = plan.buffer
    if bucket is None:
        steps = groups * group_size
        _, held = shuffle_state(plan.picks(steps), b)
        return Position(steps, held, np.zeros(0, dtype=np.int64), b + steps)
    # Buckets fill unevenly: each holds up to group_size - 1 waiting samples, so start with some more
    # steps than the groups take (a second, doubled round is then rare).
    steps = max(1, groups * group_size + 64 * group_size)
    while True:  # simulate enough steps for `groups` groups to complete
        picks = plan.picks(steps)
        emitted, _ = shuffle_state(picks, b)
        _, shard, sample = plan.locate(emitted)
        kinds = bucket(shard, sample)
        done, members = [], {}
        for k in np.unique(kinds):
            idx = np.flatnonzero(kinds == k)
            members[int(k)] = idx
            done.append(idx[group_size - 1 :: group_size])
        completions = np.sort(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)
        if groups == 0 or len(completions) >= groups:
            break
        steps *= 2
    last = int(completions[groups - 1]) if groups else -1  # the step whose sample completed the last group
    pending = []
    for idx in members.values():
        upto = idx[idx <= last]
        pending.append(upto[len(upto) // group_size * group_size :])
    waiting = np.sort(np.concatenate(pending)) if pending else np.zeros(0, dtype=np.int64)
    steps = last + 1
    _, held = shuffle_state(picks[:steps], b)  # the simulated picks, not drawn again
    return Position(steps, held, emitted[waiting], b + steps)
