"""Who the client is and whether it may pass: identity read from a certificate, allow rules. Pure: no I/O, no trio."""
