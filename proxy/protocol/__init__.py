"""Wire protocols as sans-IO state: HTTP/1.1 requests and responses, identity headers, the PROXY header. Never imports trio."""
