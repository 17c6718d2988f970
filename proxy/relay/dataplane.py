"""The data plane: established TCP-mode connections moved by readiness events, not by a task per direction.

Why
---
With two trio tasks per connection every chunk costs a task switch, a trip through trio's run loop and a handful of
Python calls on each side: 61-75 µs of CPU per kept-alive request before any TLS, 3-5x nginx's stream proxy. Here one
task per process owns a nested ``epoll`` instance, waits for its descriptor with ``trio.lowlevel.wait_readable``, and
on each wake serves every ready socket in a tight loop: decrypt what the client sent into one shared buffer and send
it to the backend, read what the backend sent and let OpenSSL encrypt it onto the client's socket
(``proxy.tls.established``). A request costs a few system calls and no task switch (docs/architecture.md,
"Data plane").

What stays as it was
--------------------
The connection's own task (``proxy.relay.connection``) still runs the handshake, the policy, the backend connect and
the access log; while its bytes flow here it waits in ``relay()``, so cancelling it (drain deadline, shutdown) ends
the relay, and it closes both sockets afterwards. The semantics are those of ``proxy.relay.tcp_forwarder.pump``, which
remains the path for transports that are not sockets:

- backpressure: a side whose peer does not take data is not read (its interest in readability is dropped) until the
  peer has taken the bytes already read, so at most one read per direction is held per connection;
- half-close: a client's close_notify or FIN becomes ``shutdown(SHUT_WR)`` toward the backend, the backend's FIN
  becomes close_notify, and the other direction keeps flowing;
- a backend that stops taking data (it answered and closed early) ends only the upload, whose rest is read and
  dropped while the answer is delivered; after any failure on the backend's connection its end is not passed on as a
  clean close_notify (``PumpResult.backend_cut``);
- the idle timeout fires between ``timeout`` and ``timeout + granularity`` after the last byte in either direction.

One read per direction per poll of the epoll (up to four polls per wake): a busy connection cannot starve the others
served by the same poll.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable

import trio

from proxy.net.sockstream import SocketStream
from proxy.protocol.http1 import HttpRelay, Step, SwitchToRaw
from proxy.relay.http1_forwarder import HttpCounters
from proxy.relay.tcp_forwarder import CHUNK_SIZE, PumpResult
from proxy.tls._openssl import EOF, WANT_READ, WANT_WRITE, SharedBuffer, TLSBroken
from proxy.tls.established import EstablishedTLS
from proxy.tls.stream import TLSStream

log = logging.getLogger("proxy.relay.dataplane")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
# The most plaintext one TLS record carries (RFC 8446 5.1).
MAX_RECORD_PLAINTEXT = 16 * 1024
# Events taken from the kernel per poll; more wait for the next one.
MAX_EVENTS_PER_WAKE = 256
# Polls per wake: what became ready while a poll's events were served is served at once, without the trip through
# trio's loop (the wait's re-arming, trio's own epoll_wait, the task's rescheduling); then other tasks have their turn.
POLLS_PER_WAKE = 4
# The finest the idle timers are checked; a listener's own timeout / 10 when that is smaller.
MAX_TICK = 1.0
# Errors of send/recv on the backend's socket that mean it is gone (anything else is a bug and is raised).
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ECONNABORTED})


class DataPlane:
    """The per-process event loop for established connections; ``DataPlane.current()`` gives (and starts) it."""

    _run_var: trio.lowlevel.RunVar[DataPlane] = trio.lowlevel.RunVar("data_plane")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Side] = {}
        self._pairs: set[_Pair] = set()
        self.buffer = SharedBuffer(CHUNK_SIZE)
        self.now = trio.current_time()
        self._tick = MAX_TICK
        self.relayed = 0  # connections handed to this plane so far

    @classmethod
    def current(cls) -> DataPlane:
        try:
            return cls._run_var.get()
        except LookupError:
            plane = cls()
            cls._run_var.set(plane)
            trio.lowlevel.spawn_system_task(plane._serve_events, name="data plane")
            trio.lowlevel.spawn_system_task(plane._check_idle, name="data plane idle timers")
            return plane

    @property
    def connections(self) -> int:
        return len(self._pairs)

    @property
    def registered_fds(self) -> int:
        return len(self._by_fd)

    async def relay(
        self,
        client: EstablishedTLS,
        backend: socket.socket,
        *,
        idle_timeout: float,
        on_up: Callable[[int], None],
        on_down: Callable[[int], None],
        http: tuple[HttpRelay, HttpCounters] | None = None,
    ) -> PumpResult:
        """Relay until both directions have ended, one side breaks, or the idle timeout; then unregister.

        With ``http`` the bytes go through the sans-IO HTTP/1.1 relay (``HttpPair``). The caller closes both sides
        afterwards (``client.aclose``, the backend's stream).
        """
        if http is None:
            pair = _Pair(self, client, backend, idle_timeout, on_up, on_down)
        else:
            pair = HttpPair(self, client, backend, idle_timeout, on_up, on_down, relay=http[0], counters=http[1])
        self._tick = min(self._tick, max(idle_timeout / 10, 0.01))
        self._pairs.add(pair)
        self.relayed += 1
        try:
            pair.start()
            if not pair.finished:
                await pair.done.wait()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            if not pair.finished:
                pair.finish()  # cancelled: the caller's scope ends the relay
        return pair.result

    # ---- the loop ---------------------------------------------------------

    async def _serve_events(self) -> None:
        epoll = self._epoll
        by_fd = self._by_fd
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self.now = trio.current_time()
                for _ in range(POLLS_PER_WAKE):
                    events = epoll.poll(0, MAX_EVENTS_PER_WAKE)
                    if not events:
                        break
                    for fd, mask in events:
                        side = by_fd.get(fd)
                        if side is None:
                            continue
                        try:
                            side.ready(mask)
                        except Exception:
                            # A bug must cost one connection, never the process.
                            log.exception("data plane: unexpected error on a connection")
                            side.pair.fail("internal_error")
        finally:
            epoll.close()

    async def _check_idle(self) -> None:
        while True:
            await trio.sleep(self._tick)
            now = self.now = trio.current_time()
            for pair in [p for p in self._pairs if p.idle_deadline < now]:
                pair.idle()

    # ---- registration -----------------------------------------------------

    def watch(self, side: _Side, mask: int) -> None:
        """Make ``side``'s interest ``mask``; a side with nothing to wait for is taken out of epoll altogether
        (level-triggered HUP would otherwise wake the loop on every pass)."""
        if mask == side.mask:
            return
        fd = side.fd
        if not mask:
            self._epoll.unregister(fd)
            del self._by_fd[fd]
        elif not side.mask:
            self._epoll.register(fd, mask)
            self._by_fd[fd] = side
        else:
            self._epoll.modify(fd, mask)
        side.mask = mask

    def forget(self, pair: _Pair) -> None:
        self.watch(pair.client_side, 0)
        self.watch(pair.backend_side, 0)
        self._pairs.discard(pair)


class _Side:
    __slots__ = ("fd", "mask", "pair", "ready")

    def __init__(self, pair: _Pair, fd: int, on_ready: Callable[[int], None]) -> None:
        self.pair = pair
        self.fd = fd
        self.mask = 0
        self.ready = on_ready


class _Pair:
    """One client and its backend: what is waiting to be written each way, and how far each direction got."""

    def __init__(
        self,
        plane: DataPlane,
        client: EstablishedTLS,
        backend: socket.socket,
        idle_timeout: float,
        on_up: Callable[[int], None],
        on_down: Callable[[int], None],
    ) -> None:
        self.plane = plane
        self.client = client
        self.session = client.session
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.idle_deadline = plane.now + idle_timeout
        self.on_up = on_up
        self.on_down = on_down
        self.result = PumpResult()
        self.done = trio.Event()
        self.finished = False
        self.client_side = _Side(self, client.fileno, self._client_ready)
        self.backend_side = _Side(self, backend.fileno(), self._backend_ready)
        # client -> backend
        self.up_waiting: bytes | None = None  # read from the client, not yet taken by the backend
        self.client_eof = False
        self.up_ended = False  # the backend got our FIN, or takes no more (then `dropping`)
        self.dropping = False
        # backend -> client
        self.down_waiting: bytes | None = None  # read from the backend, not yet taken by SSL_write
        self.backend_eof = False
        self.close_notify_due = False
        self.down_ended = False
        self.read_wants_write = False  # SSL_read must write first (a TLS 1.3 KeyUpdate answer)

    # ---- start and end ----------------------------------------------------

    def start(self) -> None:
        if self.client.early_plaintext:
            self._client_data(memoryview(self.client.early_plaintext))
        if self.client.early_eof:
            self._client_ended()
        self._update()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.plane.forget(self)
        self.done.set()

    def fail(self, outcome: str) -> None:
        self._broken(outcome)

    def idle(self) -> None:
        self.result.ended_by = "idle_timeout"
        self.finish()

    def _touch(self) -> None:
        self.idle_deadline = self.plane.now + self.idle_timeout

    def _stopped(self, outcome: str) -> None:
        """A destination takes no more: the direction that writes to it ends (see tcp_forwarder._Ending)."""
        result = self.result
        if result.ended_by == "eof":
            result.ended_by = outcome
        if outcome in ("backend_closed_early", "backend_error"):
            result.backend_cut = True

    def _broken(self, outcome: str) -> None:
        """A source failed as it was read: nothing more can come from it, the relay ends."""
        self._stopped(outcome)
        self.finish()

    # ---- readiness --------------------------------------------------------

    def _client_ready(self, mask: int) -> None:
        if self.down_waiting is not None or self.close_notify_due or self.read_wants_write:
            self._flush_down()
        if not self.finished and self._reading_client():
            self._read_client()
        self._update()

    def _backend_ready(self, mask: int) -> None:
        if self.up_waiting is not None:
            self._flush_up()
        if not self.finished and self._reading_backend():
            self._read_backend()
        self._update()

    def _reading_client(self) -> bool:
        return not self.client_eof and self.up_waiting is None

    def _reading_backend(self) -> bool:
        return not self.backend_eof and self.down_waiting is None and not self.down_ended

    def _update(self) -> None:
        if self.finished:
            return
        up_done = self.client_eof and self.up_waiting is None and self.up_ended
        down_done = self.down_ended
        if down_done and (up_done or self.dropping):
            self.finish()  # all the backend sent is delivered; an upload being dropped has nowhere to go
            return
        client_mask = (_IN if self._reading_client() else 0) | (
            _OUT if self.down_waiting is not None or self.close_notify_due or self.read_wants_write else 0
        )
        backend_mask = (_IN if self._reading_backend() else 0) | (_OUT if self.up_waiting is not None else 0)
        self.plane.watch(self.client_side, client_mask)
        self.plane.watch(self.backend_side, backend_mask)

    # ---- client -> backend ------------------------------------------------

    def _read_client(self) -> None:
        buffer = self.plane.buffer
        filled = 0
        eof = failed = False
        self.read_wants_write = False
        # Only while a whole record fits: SSL_read into less room would leave the rest of a record decrypted inside
        # OpenSSL, where no readiness event would ever call for it (the socket has nothing more to say).
        while buffer.size - filled >= MAX_RECORD_PLAINTEXT:
            try:
                got = self.session.read_into(buffer, filled)
            except TLSBroken:
                failed = True
                break
            if got > 0:
                filled += got
                continue
            if got == WANT_WRITE:
                self.read_wants_write = True
            elif got == EOF:
                eof = True
            break
        if filled:
            self._touch()
            if not self.dropping:
                self._client_data(buffer.view[:filled])
        # What came before a failure or the end is delivered first (OpenSSL would not report them again without
        # another readiness event, which may never come).
        if self.finished:
            return
        if failed:
            self._client_failed()
        elif eof:
            self._client_ended()

    # What to do with what each side sent: the TCP relay passes it on; HttpPair overrides these.

    def _client_data(self, data: memoryview) -> None:
        self._to_backend(data)

    def _client_failed(self) -> None:
        self._broken("client_error")

    def _to_backend(self, data: memoryview) -> None:
        if self.up_waiting is not None:  # behind what waits already (HTTP: a step's output while one is queued)
            self.up_waiting += bytes(data)
            return
        try:
            sent = self.backend.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._backend_stopped_taking(exc)
            return
        if sent:
            self.result.bytes_up += sent
            self.on_up(sent)
        if sent < len(data):
            self.up_waiting = bytes(data[sent:])  # the shared buffer is for the next read

    def _flush_up(self) -> None:
        waiting = self.up_waiting
        assert waiting is not None
        self.up_waiting = None
        self._to_backend(memoryview(waiting))
        if self.up_waiting is None and self.client_eof and not self.up_ended:
            self._end_up()

    def _client_ended(self) -> None:
        self.client_eof = True
        if self.up_waiting is None and not self.up_ended:
            self._end_up()

    def _end_up(self) -> None:
        self.up_ended = True
        if self.dropping:
            return
        try:
            self.backend.shutdown(socket.SHUT_WR)
        except OSError:
            self._stopped("backend_closed_early")

    def _backend_stopped_taking(self, exc: OSError) -> None:
        if exc.errno not in _GONE:
            raise exc
        self._stopped("backend_closed_early")
        self.up_waiting = None
        self.up_ended = True
        self.dropping = True  # read the rest of the upload and drop it: the client may not read before it is sent

    # ---- backend -> client ------------------------------------------------

    def _read_backend(self) -> None:
        buffer = self.plane.buffer
        try:
            got = self.backend.recv_into(buffer.view)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            # A reset after an answer, while the client is still sending, is the backend closing with the upload
            # unread: it answered and stopped taking, and its kernel resets. Whether the proxy learns that from a
            # write toward it or, as here, from the read after the answer, is a matter of event order. A reset
            # with no answer at all stays an error.
            early = exc.errno == errno.ECONNRESET and not self.client_eof and self.result.bytes_down > 0
            self._backend_failed("backend_closed_early" if early else "backend_error")
            return
        if not got:
            self.backend_eof = True
            self._backend_ended()
            return
        self._touch()
        self._backend_data(got)

    def _backend_failed(self, outcome: str) -> None:
        self._broken(outcome)

    def _backend_ended(self) -> None:
        # After a failure on the backend's connection its end is not the end of its data (see the module doc).
        self.close_notify_due = not self.result.backend_cut
        self.down_ended = not self.close_notify_due
        if self.close_notify_due:
            self._flush_down()

    def _backend_data(self, got: int) -> None:
        """Encrypt the backend's ``got`` bytes, in the shared buffer, onto the client's socket."""
        buffer = self.plane.buffer
        start = 0
        while start < got:
            try:
                wrote = self.session.write_from(buffer, start, got)
            except TLSBroken:
                self._broken("client_error")
                return
            if wrote > 0:
                start += wrote
                self.result.bytes_down += wrote
                self.on_down(wrote)
                continue
            self.down_waiting = bytes(buffer.view[start:got])
            return

    def _to_client(self, data: bytes) -> None:
        """Encrypt ``data`` onto the client's socket, behind anything already waiting."""
        if self.down_waiting is not None:
            self.down_waiting += data
            return
        self.down_waiting = data
        self._flush_down()

    def _flush_down(self) -> None:
        self.read_wants_write = False
        waiting = self.down_waiting
        while waiting:
            try:
                wrote = self.session.write(waiting)
            except TLSBroken:
                self._broken("client_error")
                return
            if wrote <= 0:
                self.down_waiting = waiting
                return
            self.result.bytes_down += wrote
            self.on_down(wrote)
            waiting = waiting[wrote:]
        self.down_waiting = None
        if self.close_notify_due:
            try:
                if self.client.session.shutdown() in (WANT_READ, WANT_WRITE):
                    return
            except TLSBroken:
                self._stopped("client_error")
            self.client.close_notify_sent = True
            self.close_notify_due = False
            self.down_ended = True


async def forward_on_plane(
    stream: TLSStream,
    backend: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
    on_up: Callable[[int], None],
    on_down: Callable[[int], None],
    http: tuple[HttpRelay, HttpCounters] | None = None,
) -> PumpResult | None:
    """Relay a handshaken client and its backend on the data plane (through ``http``'s relay if given), then close
    the client's side.

    None when the session cannot be handed over (a transport that is not a socket, a stream already in use): the
    caller then uses its task driver (``tcp_forwarder.pump`` or ``http1_forwarder.relay_http``), as before.
    """
    if not isinstance(backend, SocketStream):
        return None
    client = await EstablishedTLS.take_over(stream)
    if client is None:
        return None
    result: PumpResult | None = None
    try:
        result = await DataPlane.current().relay(
            client, backend.socket, idle_timeout=idle_timeout, on_up=on_up, on_down=on_down, http=http
        )
        return result
    finally:
        # close_notify only after an orderly relay: not after the client broke (it could not read it), not after the
        # backend's connection failed (the client must not take a cut answer for a whole one), not when cancelled.
        clean = result is not None and not result.backend_cut and result.ended_by != "client_error"
        await client.aclose(close_notify=clean)


class HttpPair(_Pair):
    """A client and its backend through the sans-IO HTTP/1.1 relay (proxy.protocol.http1), which adds the identity
    headers: what each side sends is fed to the relay, and what the relay returns is written, in order.

    As in proxy.relay.http1_forwarder: a side is not read while what its last read produced waits to be written,
    nor the client while a pipelined request waits for the response ahead of it (``client_paused``); a backend that
    fails is answered like one that closed; after a ``101`` the pair goes on as a plain TCP relay.
    """

    def __init__(
        self,
        plane: DataPlane,
        client: EstablishedTLS,
        backend: socket.socket,
        idle_timeout: float,
        on_up: Callable[[int], None],
        on_down: Callable[[int], None],
        *,
        relay: HttpRelay,
        counters: HttpCounters,
    ) -> None:
        super().__init__(plane, client, backend, idle_timeout, on_up, on_down)
        self.relay = relay
        self.counters = counters
        self.raw = False  # after a 101: a plain TCP relay
        self.closing = False  # the relay ended the connection: write what waits, then finish
        # The relay decides how the connection ends; the backend never gets the client's half-close (until a 101).
        self.up_ended = True

    def _reading_client(self) -> bool:
        if self.raw:
            return super()._reading_client()
        return not (self.client_eof or self.closing or self.up_waiting is not None or self.relay.client_paused)

    def _reading_backend(self) -> bool:
        if self.raw:
            return super()._reading_backend()
        return not (self.backend_eof or self.closing or self.down_waiting is not None)

    def _update(self) -> None:
        if not self.raw and self.closing and self.up_waiting is None and self.down_waiting is None:
            self.finish()
            return
        super()._update()

    def _client_data(self, data: memoryview) -> None:
        if self.raw:
            super()._client_data(data)
        else:
            self._apply(self.relay.from_client(bytes(data)))

    def _client_ended(self) -> None:
        if self.raw:
            super()._client_ended()
        else:
            self.client_eof = True
            self._apply(self.relay.from_client(b""))

    def _client_failed(self) -> None:
        if self.result.ended_by == "eof":
            self.result.ended_by = "client_error"
        self.finish()

    def _backend_data(self, got: int) -> None:
        if self.raw:
            super()._backend_data(got)
        else:
            self._apply(self.relay.from_backend(bytes(self.plane.buffer.view[:got])))

    def _backend_ended(self) -> None:
        if self.raw:
            super()._backend_ended()
        else:
            self._apply(self.relay.from_backend(b""))

    def _backend_failed(self, outcome: str) -> None:
        if self.raw:
            super()._backend_failed(outcome)
        else:
            self.backend_eof = True
            self._apply(self.relay.from_backend(b""))  # answered like a backend that closed

    def _backend_stopped_taking(self, exc: OSError) -> None:
        if self.raw:
            super()._backend_stopped_taking(exc)
            return
        if exc.errno not in _GONE:
            raise exc
        # The backend is gone mid-request: the client gets a 502 if it has no response head yet, then the end.
        self.up_waiting = None
        self._apply(self.relay.fail(502))

    def _apply(self, step: Step) -> None:
        """Write one step's output, in order, and act on its flags."""
        self.counters.record(step, self.result)
        if step.to_backend:
            self._to_backend(memoryview(step.to_backend))
        if step.to_client and not self.finished:
            self._to_client(step.to_client)
        if self.finished:
            return
        if step.switch is not None:
            self._switch(step.switch)
        elif step.close:
            self.closing = True

    def _switch(self, switch: SwitchToRaw) -> None:
        """What each side sent past the 101 goes on, then the pair relays raw bytes."""
        self.raw = True
        self.up_ended = False
        self.result.ended_by = "eof"
        if switch.client_leftover:
            self._to_backend(memoryview(switch.client_leftover))
        if switch.backend_leftover and not self.finished:
            self._to_client(switch.backend_leftover)

    def finish(self) -> None:
        if self.raw and not self.finished and not self.result.ended_by.startswith("upgrade:"):
            self.result.ended_by = "upgrade:" + self.result.ended_by
        super().finish()

    def idle(self) -> None:
        self.result.ended_by = "upgrade:idle_timeout" if self.raw else "idle_timeout"
        _Pair.finish(self)
