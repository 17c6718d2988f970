"""The HTTP relay's cycle states (proxy.protocol.http1) and the trio driver (proxy.relay.http1_forwarder).

- The transition table, alone: every (state, event) pair of the product either leads where the table written out
  here says, or raises RelayStateError; and the sequences of events the relay meets walk the expected states.
- The same sequences through an HttpRelay fed real bytes, with the state read after each call.
- The driver over trio memory streams with the autojump clock: the idle timeout counts from the last byte either
  way, a slow backend that keeps sending is never cut off, a pipelined request waits for the response ahead of it,
  and after a 101 the raw pump carries the bytes.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from proxy.protocol.http1 import TRANSITIONS, Event, HttpRelay, RelayStateError, State, Step, next_state
from proxy.protocol.identity_headers import HeaderPolicy
from proxy.relay.http1_forwarder import HttpCounters, relay_http
from proxy.relay.tcp_forwarder import PumpResult

S, E = State, Event

# The table as the module docstring draws it, written out independently of the code.
EXPECTED = {
    (S.IDLE, E.REQUEST_HEAD): S.REQUEST_BODY,
    (S.IDLE, E.CLIENT_CLOSED): S.CLOSED,
    (S.REQUEST_BODY, E.REQUEST_END): S.AWAIT_RESPONSE,
    (S.REQUEST_BODY, E.INFORMATIONAL): S.REQUEST_BODY,
    (S.REQUEST_BODY, E.RESPONSE_HEAD): S.EARLY_RESPONSE,
    (S.REQUEST_BODY, E.LAST_RESPONSE_HEAD): S.EARLY_RESPONSE,
    (S.AWAIT_RESPONSE, E.INFORMATIONAL): S.AWAIT_RESPONSE,
    (S.AWAIT_RESPONSE, E.RESPONSE_HEAD): S.RESPONSE_BODY,
    (S.AWAIT_RESPONSE, E.LAST_RESPONSE_HEAD): S.LAST_RESPONSE_BODY,
    (S.AWAIT_RESPONSE, E.UPGRADE): S.SWITCHED,
    (S.EARLY_RESPONSE, E.REQUEST_END): S.LAST_RESPONSE_BODY,
    (S.EARLY_RESPONSE, E.RESPONSE_END): S.CLOSED,
    (S.RESPONSE_BODY, E.RESPONSE_END): S.IDLE,
    (S.LAST_RESPONSE_BODY, E.RESPONSE_END): S.CLOSED,
    **{(state, E.ABORT): S.CLOSED for state in S if state is not S.CLOSED},
}

ALL_PAIRS = list(itertools.product(S, E))


# ---- the table -------------------------------------------------------------------------------------------------


def test_the_table_is_the_documented_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("state", "event"), [pair for pair in ALL_PAIRS if pair in EXPECTED])
def test_every_defined_transition_leads_where_the_table_says(state: State, event: Event) -> None:
    assert next_state(state, event) is EXPECTED[state, event]


@pytest.mark.parametrize(("state", "event"), [pair for pair in ALL_PAIRS if pair not in EXPECTED])
def test_every_undefined_transition_raises_an_internal_error_naming_both(state: State, event: Event) -> None:
    with pytest.raises(RelayStateError) as caught:
        next_state(state, event)
    assert (caught.value.state, caught.value.event) == (state, event)
    assert state.name in str(caught.value) and event.name in str(caught.value)
    assert "internal error" in str(caught.value)


def test_closed_is_final_and_abort_reaches_it_from_everywhere_else() -> None:
    assert [event for event in E if (S.CLOSED, event) in TRANSITIONS] == []
    assert all(next_state(state, E.ABORT) is S.CLOSED for state in S if state is not S.CLOSED)


def test_every_state_is_reachable_from_idle() -> None:
    seen, frontier = {S.IDLE}, [S.IDLE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(S)


def test_only_a_complete_request_can_be_switched_and_only_a_kept_alive_response_starts_a_new_cycle() -> None:
    assert [pair for pair, target in TRANSITIONS.items() if target is S.SWITCHED] == [(S.AWAIT_RESPONSE, E.UPGRADE)]
    assert [pair for pair, target in TRANSITIONS.items() if target is S.IDLE] == [(S.RESPONSE_BODY, E.RESPONSE_END)]


def walk(*events: Event, start: State = S.IDLE) -> list[State]:
    states, state = [], start
    for event in events:
        state = next_state(state, event)
        states.append(state)
    return states


KEEP_ALIVE_CYCLE = [E.REQUEST_HEAD, E.REQUEST_END, E.RESPONSE_HEAD, E.RESPONSE_END]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            KEEP_ALIVE_CYCLE * 2,
            [S.REQUEST_BODY, S.AWAIT_RESPONSE, S.RESPONSE_BODY, S.IDLE] * 2,
            id="two-keep-alive-cycles",
        ),
        pytest.param(  # HEAD, 204, 304: the head ends the response at once
            [E.REQUEST_HEAD, E.REQUEST_END, E.RESPONSE_HEAD, E.RESPONSE_END],
            [S.REQUEST_BODY, S.AWAIT_RESPONSE, S.RESPONSE_BODY, S.IDLE],
            id="head-request",
        ),
        pytest.param(
            [E.REQUEST_HEAD, E.INFORMATIONAL, E.REQUEST_END, E.INFORMATIONAL, E.RESPONSE_HEAD, E.RESPONSE_END],
            [S.REQUEST_BODY, S.REQUEST_BODY, S.AWAIT_RESPONSE, S.AWAIT_RESPONSE, S.RESPONSE_BODY, S.IDLE],
            id="1xx-before-and-after-the-body",
        ),
        pytest.param(
            [E.REQUEST_HEAD, E.REQUEST_END, E.UPGRADE, E.ABORT],
            [S.REQUEST_BODY, S.AWAIT_RESPONSE, S.SWITCHED, S.CLOSED],
            id="101-then-a-failed-write",
        ),
        pytest.param(
            [E.REQUEST_HEAD, E.RESPONSE_HEAD, E.REQUEST_END, E.RESPONSE_END],
            [S.REQUEST_BODY, S.EARLY_RESPONSE, S.LAST_RESPONSE_BODY, S.CLOSED],
            id="early-response-the-request-body-ends-first",
        ),
        pytest.param(
            [E.REQUEST_HEAD, E.RESPONSE_HEAD, E.RESPONSE_END],
            [S.REQUEST_BODY, S.EARLY_RESPONSE, S.CLOSED],
            id="early-response-the-response-ends-first",
        ),
        pytest.param(
            [E.REQUEST_HEAD, E.REQUEST_END, E.LAST_RESPONSE_HEAD, E.RESPONSE_END],
            [S.REQUEST_BODY, S.AWAIT_RESPONSE, S.LAST_RESPONSE_BODY, S.CLOSED],
            id="close-delimited-response",
        ),
        pytest.param(
            [*KEEP_ALIVE_CYCLE, E.CLIENT_CLOSED],
            [S.REQUEST_BODY, S.AWAIT_RESPONSE, S.RESPONSE_BODY, S.IDLE, S.CLOSED],
            id="client-half-close-after-a-cycle",
        ),
    ],
)
def test_sequences_walk_the_expected_states(events: list[Event], expected: list[State]) -> None:
    assert walk(*events) == expected


@pytest.mark.parametrize(
    ("events", "stuck_at"),
    [
        pytest.param([E.RESPONSE_HEAD], S.IDLE, id="response-before-request"),
        pytest.param([E.REQUEST_HEAD, E.UPGRADE], S.REQUEST_BODY, id="switch-before-the-request-is-complete"),
        pytest.param([*KEEP_ALIVE_CYCLE[:3], E.REQUEST_HEAD], S.RESPONSE_BODY, id="second-request-mid-response"),
        pytest.param([E.REQUEST_HEAD, E.REQUEST_END, E.LAST_RESPONSE_HEAD, E.RESPONSE_END, E.REQUEST_HEAD],
                     S.CLOSED, id="request-after-the-last-response"),
        pytest.param([E.REQUEST_HEAD, E.CLIENT_CLOSED], S.REQUEST_BODY, id="client-close-mid-request"),
    ],
)
def test_sequences_the_relay_must_never_produce_raise(events: list[Event], stuck_at: State) -> None:
    with pytest.raises(RelayStateError) as caught:
        walk(*events)
    assert caught.value.state is stuck_at


# ---- the same walks through an HttpRelay ------------------------------------------------------------------------


def new_relay() -> HttpRelay:
    return HttpRelay(HeaderPolicy(), client_ip="192.0.2.1", identity=None)


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def test_relay_keep_alive_cycles_return_to_idle_and_the_response_may_arrive_in_pieces() -> None:
    r = new_relay()
    assert r.state is S.IDLE
    for _ in range(2):
        r.from_client(GET)
        assert r.state is S.AWAIT_RESPONSE
        r.from_backend(OK_HEAD[:10])
        assert r.state is S.AWAIT_RESPONSE  # half a head is no head
        r.from_backend(OK_HEAD[10:] + b"he")
        assert r.state is S.RESPONSE_BODY
        step = r.from_backend(b"llo")
        assert r.state is S.IDLE and not step.close


def test_relay_head_request_ends_with_the_response_head() -> None:
    r = new_relay()
    r.from_client(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    step = r.from_backend(OK_HEAD)  # Content-Length says what a GET would get; no body follows
    assert r.state is S.IDLE and step.statuses == (200,)


def test_relay_100_continue_passes_while_the_request_body_waits() -> None:
    r = new_relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert r.state is S.REQUEST_BODY
    step = r.from_backend(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert r.state is S.REQUEST_BODY and step.to_client.startswith(b"HTTP/1.1 100 Continue")
    r.from_client(b"abc")
    assert r.state is S.AWAIT_RESPONSE
    r.from_backend(OK_HEAD + b"hello")
    assert r.state is S.IDLE


def test_relay_101_switches_and_a_failure_after_it_closes() -> None:
    r = new_relay()
    r.from_client(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    step = r.from_backend(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw")
    assert r.state is S.SWITCHED and r.switched and step.switch is not None
    assert r.from_client(b"frames") == Step(to_backend=b"frames")  # passed on untouched
    assert r.fail(502).close and r.state is S.CLOSED and r.closed


def test_relay_early_response_closes_once_both_bodies_are_done() -> None:
    r = new_relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    assert r.state is S.REQUEST_BODY
    step = r.from_backend(b"HTTP/1.1 413 Too Large\r\nContent-Length: 5\r\n\r\nhe")
    assert r.state is S.EARLY_RESPONSE and b"Connection: close" in step.to_client
    assert r.from_client(b"def").to_backend == b"def"  # the rest of the body still goes on
    assert r.state is S.LAST_RESPONSE_BODY
    assert r.from_backend(b"llo").close and r.state is S.CLOSED


def test_relay_early_response_that_ends_first_closes_at_once() -> None:
    r = new_relay()
    r.from_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    step = r.from_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # keep-alive by its head alone
    assert step.close and r.state is S.CLOSED


def test_relay_close_delimited_response_ends_with_the_backends_eof() -> None:
    r = new_relay()
    r.from_client(GET)
    r.from_backend(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert r.state is S.LAST_RESPONSE_BODY
    r.from_backend(b" more")
    assert r.state is S.LAST_RESPONSE_BODY
    step = r.from_backend(b"")
    assert step.close and step.error is None and r.state is S.CLOSED


def test_relay_client_half_close_waits_for_the_response_then_closes() -> None:
    r = new_relay()
    r.from_client(GET)
    assert r.from_client(b"") == Step()  # kept for after the response
    assert r.state is S.AWAIT_RESPONSE
    step = r.from_backend(OK_HEAD + b"hello")
    assert step.close and step.error is None and r.state is S.CLOSED


def test_relay_client_half_close_between_requests_closes_at_once() -> None:
    r = new_relay()
    assert r.from_client(b"").close and r.state is S.CLOSED


def test_relay_pipelined_request_starts_the_next_cycle_inside_from_backend() -> None:
    r = new_relay()
    r.from_client(GET + GET)
    assert r.state is S.AWAIT_RESPONSE and r.client_paused
    step = r.from_backend(OK_HEAD + b"hello")
    assert step.requests == 1 and r.state is S.AWAIT_RESPONSE and not r.client_paused


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="unsolicited"),
        pytest.param(b"not http\r\n\r\n", id="malformed"),
    ],
)
def test_relay_a_bad_response_aborts_from_where_it_stands(response: bytes) -> None:
    r = new_relay()
    step = r.from_backend(response)
    assert step.close and step.error == "bad_response" and r.state is S.CLOSED


# ---- the driver over memory streams ------------------------------------------------------------------------------


class Counted:
    def __init__(self) -> None:
        self.requests = 0
        self.statuses: list[int] = []
        self.counters = HttpCounters(
            requests=self._add_requests, status=self.statuses.append, up=lambda n: None, down=lambda n: None
        )

    def _add_requests(self, n: int) -> None:
        self.requests += n


class Wired:
    """A relay_http run between two memory stream pairs: `client` and `backend` are the peers' ends."""

    def __init__(self, idle_timeout: float) -> None:
        self.client, proxy_client = trio.testing.memory_stream_pair()
        proxy_backend, self.backend = trio.testing.memory_stream_pair()
        self.counted = Counted()
        self.result: PumpResult | None = None
        self.ended_at: float | None = None
        self._args = (proxy_client, proxy_backend)
        self._idle_timeout = idle_timeout

    async def run(self) -> None:
        proxy_client, proxy_backend = self._args
        relay = new_relay()
        self.result = await relay_http(
            proxy_client, proxy_backend, relay, idle_timeout=self._idle_timeout, counters=self.counted.counters
        )
        self.ended_at = trio.current_time()


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await stream.receive_some()
        assert more, f"EOF after {data!r}"
        data += more
    return bytes(data)


async def test_driver_ends_an_idle_connection_after_the_timeout(autojump_clock: trio.testing.MockClock) -> None:
    wired = Wired(idle_timeout=30)
    started = trio.current_time()
    await wired.run()
    assert wired.result is not None and wired.result.ended_by == "idle_timeout"
    assert wired.ended_at is not None and 30 <= wired.ended_at - started <= 31  # granularity: min(1, 30/10)


async def test_driver_idle_timeout_counts_from_the_last_exchange(autojump_clock: trio.testing.MockClock) -> None:
    wired = Wired(idle_timeout=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wired.run)
        await trio.sleep(20)
        await wired.client.send_all(GET)
        assert (await read_exactly(wired.backend, len(GET) + 10)).startswith(b"GET / HTTP/1.1\r\n")
        await trio.sleep(20)
        await wired.backend.send_all(OK_HEAD + b"hello")
        assert await read_exactly(wired.client, len(OK_HEAD) + 5) == OK_HEAD + b"hello"
        last_byte = trio.current_time()
    assert wired.result is not None and wired.result.ended_by == "idle_timeout"
    assert wired.ended_at is not None and 30 <= wired.ended_at - last_byte <= 31
    assert wired.counted.requests == 1 and wired.counted.statuses == [200]


async def test_driver_a_slow_backend_that_keeps_sending_is_not_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wired = Wired(idle_timeout=30)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    body = b"0123456789"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wired.run)
        await wired.client.send_all(GET)
        await wired.backend.receive_some()
        await trio.sleep(25)
        await wired.backend.send_all(head)
        for byte in body:  # one byte every 25 s: 250 s in all, never 30 s quiet
            await trio.sleep(25)
            await wired.backend.send_all(bytes([byte]))
        assert await read_exactly(wired.client, len(head) + len(body)) == head + body
        await wired.client.send_eof()  # done: the relay closes between requests
    assert wired.result is not None and wired.result.ended_by == "eof"


async def test_driver_a_backend_slower_than_the_idle_timeout_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wired = Wired(idle_timeout=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wired.run)
        await wired.client.send_all(GET)
        sent = trio.current_time()
        await wired.backend.receive_some()
        await trio.sleep(60)  # the backend thinks for longer than the idle timeout
    assert wired.result is not None and wired.result.ended_by == "idle_timeout"
    assert wired.ended_at is not None and 30 <= wired.ended_at - sent <= 31
    with trio.move_on_after(1):
        assert await wired.client.receive_some() == b"", "the client got bytes"
        pytest.fail("the client stream was closed by the relay, which leaves closing to its caller")


async def test_driver_holds_a_pipelined_request_until_the_response_ahead_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wired = Wired(idle_timeout=300)
    second = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wired.run)
        await wired.client.send_all(GET + second)
        first = await wired.backend.receive_some()
        assert b"/second" not in first
        with trio.move_on_after(100):  # it does not come, however long the backend waits
            assert b"/second" not in await wired.backend.receive_some()
        await wired.backend.send_all(OK_HEAD + b"hello")
        assert (await wired.backend.receive_some()).startswith(b"GET /second HTTP/1.1\r\n")
        await wired.backend.send_all(OK_HEAD + b"again")
        await wired.client.send_eof()
    assert wired.result is not None and wired.result.ended_by == "eof"
    assert wired.counted.requests == 2 and wired.counted.statuses == [200, 200]


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


async def test_driver_hands_an_upgraded_connection_to_the_raw_pump(autojump_clock: trio.testing.MockClock) -> None:
    wired = Wired(idle_timeout=300)
    upgrade, switching = UPGRADE, SWITCHING
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wired.run)
        await wired.client.send_all(upgrade)
        await wired.backend.receive_some()
        await wired.backend.send_all(switching + b"from-backend")
        assert await read_exactly(wired.client, len(switching) + 12) == switching + b"from-backend"
        await wired.client.send_all(b"from-client\r\n\r\nGET /not-parsed HTTP/1.1\r\n\r\n")
        raw = await read_exactly(wired.backend, 43)
        assert raw == b"from-client\r\n\r\nGET /not-parsed HTTP/1.1\r\n\r\n"  # as sent: no header added
        await wired.client.send_eof()
        assert await wired.backend.receive_some() == b""
        await wired.backend.send_eof()
        assert await wired.client.receive_some() == b""
    assert wired.result is not None and wired.result.ended_by == "upgrade:eof"
    assert wired.counted.statuses == [101]


async def test_driver_passes_on_what_the_client_sends_the_moment_it_sees_the_101(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The client task can have read those bytes, and not yet fed them to the relay, when the backend task ends the
    HTTP part: they go to the backend ahead of the raw pump. The window is a few scheduler turns wide and trio
    shuffles the order of tasks, so the frame is sent after 0 or 1 extra turns, ten times each."""
    for attempt in range(20):
        wired = Wired(idle_timeout=300)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wired.run)
            await wired.client.send_all(UPGRADE)
            await wired.backend.receive_some()
            await wired.backend.send_all(SWITCHING + b"from-backend")
            assert await wired.client.receive_some(len(SWITCHING)) == SWITCHING
            for _ in range(attempt % 2):
                await trio.lowlevel.checkpoint()
            await wired.client.send_all(b"frame")
            with trio.fail_after(60):
                assert await read_exactly(wired.backend, 5) == b"frame", f"attempt {attempt}"
            assert await read_exactly(wired.client, 12) == b"from-backend"
            await wired.client.send_eof()
            assert await wired.backend.receive_some() == b""
            await wired.backend.send_eof()
        assert wired.result is not None and wired.result.ended_by == "upgrade:eof"
        assert wired.result.bytes_up == len(UPGRADE) + 54 + 5  # the request with two headers added, then the frame
