"""Wire protocols as sans-IO state: HTTP/1.1 and HTTP/2, identity headers, the PROXY header. Never imports trio."""
