"""Sockets on trio: the lean socket stream, accepting with back-off, connecting to a backend."""
