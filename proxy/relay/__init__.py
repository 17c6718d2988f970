"""One connection from handshake to close: the phases, and the forwarders that move its bytes (TCP, HTTP/1.1)."""
