"""ticod.data.plan: the array arithmetic of a seek equals stepping the shuffle buffer one sample at a time."""

from __future__ import annotations

import numpy as np
import pytest

from ticod.data.plan import StreamPlan, position_after, shuffle_state


def stepped(picks: np.ndarray, buffer: int) -> tuple[list[int], list[int]]:
    """The buffer shuffle made step by step: (source emitted at each step, source held by each slot)."""
    held, emitted = list(range(buffer)), []
    for e, pick in enumerate(picks.tolist()):
        new = buffer + e
        if pick == buffer:
            emitted.append(new)
        else:
            emitted.append(held[pick])
            held[pick] = new
    return emitted, held


@pytest.mark.parametrize("buffer", [1, 3, 200, 70_000])  # 70,000 slots: past the 16-bit sort keys
def test_shuffle_state_equals_stepping(buffer: int) -> None:
    rng = np.random.default_rng(buffer)
    for n in (0, 1, 5, 3000, 6 * buffer):  # 6 per slot: most slots are picked again and again
        picks = rng.integers(0, buffer + 1, size=n)
        emitted, held = shuffle_state(picks, buffer)
        want_emitted, want_held = stepped(picks, buffer)
        assert emitted.tolist() == want_emitted and held.tolist() == want_held


def test_position_after_groups_by_bucket_as_the_stream_does() -> None:
    """Groups per bucket handed out when full; the position after them holds the unfinished groups."""
    sizes, group = [7, 5, 9], 3
    plan = StreamPlan("test", sizes, 4)
    table = np.random.default_rng(0).integers(0, 3, size=sum(sizes))
    starts = np.cumsum([0, *sizes[:-1]])

    def bucket(shard: np.ndarray, sample: np.ndarray) -> np.ndarray:
        return table[starts[shard] + sample]

    emitted, _ = shuffle_state(plan.picks(400), plan.buffer)
    _, shard, sample = plan.locate(emitted)
    kinds = bucket(shard, sample)
    waiting: dict[int, list[int]] = {}
    done = 0
    for step, kind in enumerate(kinds.tolist()):  # group_by_aspect, step by step
        waiting.setdefault(kind, []).append(step)
        if len(waiting[kind]) == group:
            waiting[kind] = []
            done += 1
            at = position_after(plan, done, group, bucket)
            assert at.step == step + 1 and at.next_source == plan.buffer + step + 1
            pending = sorted(s for steps in waiting.values() for s in steps)
            assert at.pending.tolist() == emitted[pending].tolist()
            assert at.buffer.tolist() == stepped(plan.picks(step + 1), plan.buffer)[1]
