"""The idle deadline: never early, at most one granularity late, cheap to touch."""

from __future__ import annotations

import trio

from proxy.relay.tcp_forwarder import IdleDeadline


async def test_touched_deadline_keeps_the_scope_alive_then_fires_after_the_timeout(autojump_clock):
    idle = IdleDeadline(10.0)
    last_touch = None
    with idle.scope:
        for _ in range(30):  # 30 s of activity every 0.5 s
            await trio.sleep(0.5)
            idle.touch()
            last_touch = trio.current_time()
        await trio.sleep_forever()
    assert idle.scope.cancelled_caught
    quiet = trio.current_time() - last_touch
    assert 10.0 <= quiet <= 10.0 + idle.granularity


async def test_untouched_deadline_fires_after_timeout_plus_at_most_the_granularity(autojump_clock):
    start = trio.current_time()
    idle = IdleDeadline(0.3)
    with idle.scope:
        await trio.sleep_forever()
    assert 0.3 <= trio.current_time() - start <= 0.3 + idle.granularity
    assert idle.granularity == 0.03  # scaled down for short timeouts
