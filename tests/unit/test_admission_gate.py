"""The per-model gate (daemon/admission.ModelGate) on a real event loop: a queued caller whose client
leaves as its turn is granted must either have run (it resumed before the cancellation) or leave
without running, its turn passed on to the next in line; the cancellation is never lost."""
from __future__ import annotations

import asyncio

import pytest

from sealbox.daemon.admission import ModelGate


def _scenario(cancel_later: bool):
    """`first` holds the turn, `second` and `third` wait; `first` leaves and `second` is cancelled in the
    same loop step (cancel_later False) or in the next one (True). Returns (ran, whether cancel() took,
    second's outcome)."""
    async def main():
        gate = ModelGate("m", concurrency=1, queue=4, max_bytes=1 << 20)
        release_first = asyncio.Event()
        ran, accepted = [], []

        async def caller(name, hold=None):
            async with gate.turn(5):
                ran.append(name)
                if hold is not None:
                    await hold.wait()

        async def first_caller():
            await caller("first", release_first)
            # The turn went to `second` just now (release); its client goes away before it resumed.
            if cancel_later:
                asyncio.get_running_loop().call_soon(lambda: accepted.append(second.cancel()))
            else:
                accepted.append(second.cancel())

        first = asyncio.ensure_future(first_caller())
        await asyncio.sleep(0)
        second = asyncio.ensure_future(caller("second"))
        third = asyncio.ensure_future(caller("third"))
        await asyncio.sleep(0.01)   # both queued behind `first`
        assert gate.waiting == 2
        release_first.set()
        await first
        outcome = (await asyncio.gather(second, return_exceptions=True))[0]
        await asyncio.wait_for(third, 2)
        assert gate.waiting == 0 and not gate._sem.locked()
        return ran, accepted[0], outcome
    return asyncio.run(main())


def test_a_caller_cancelled_as_its_turn_is_granted_leaves_and_passes_the_turn_on():
    ran, accepted, outcome = _scenario(cancel_later=False)
    assert accepted and isinstance(outcome, asyncio.CancelledError)
    assert ran == ["first", "third"]


@pytest.mark.parametrize("cancel_later", [False, True])
def test_a_cancellation_is_never_lost(cancel_later):
    """Python 3.11's wait_for returned a turn granted to a task cancelled before it resumed, losing
    the cancellation: the departed client's call then ran. A cancel() that took must end the call."""
    ran, accepted, outcome = _scenario(cancel_later)
    if accepted:   # it had not resumed: it must not run
        assert isinstance(outcome, asyncio.CancelledError) and "second" not in ran
    else:          # it had already run to its end
        assert outcome is None and "second" in ran
    assert ran[-1] == "third"
