"""mtls-proxy: an mTLS-terminating reverse proxy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mtls-proxy")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
