"""The TLS engine: pyOpenSSL contexts built from config, the TLS stream over a socket, handshake failure reasons."""
