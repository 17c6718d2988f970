"""Connect to a listener's backend: ``host:port`` or ``unix:/path``, under a timeout."""

from __future__ import annotations

import trio

from proxy.config import TCPAddress, UnixAddress
from proxy.sockstream import SocketStream


class BackendError(Exception):
    """The backend could not be reached; the message says why, for the log."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


async def connect_backend(address: TCPAddress | UnixAddress, timeout: float) -> SocketStream:
    try:
        with trio.fail_after(timeout):
            if isinstance(address, UnixAddress):
                stream = await trio.open_unix_socket(str(address.path))
            else:
                # open_tcp_stream sets TCP_NODELAY: small writes go out at once.
                stream = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise BackendError(f"connect to {address} timed out after {timeout:g}s", timed_out=True) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BackendError(f"connect to {address} failed: {reason}") from None
    return SocketStream.take_over(stream)  # the lean stream for the hot path (see proxy.sockstream)
