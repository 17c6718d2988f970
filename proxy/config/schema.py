"""The configuration file: pydantic models, parsing and loading (pure: no trio, no sockets).

Everything a user can write in the YAML file is declared here, with the defaults and field names that
README.md, "Configuration", documents (a public contract: extend it, never rename). Validation happens once, at
load time, and every problem is reported with its path in the document (``listeners[0].client_auth.mode: ...``)
so that ``mtls-proxy check`` and ``run`` fail before serving anything, with a message that names the fix.

Relative file paths resolve against the folder of the config file (passed to pydantic as validation context),
so a config and its certificates can be moved together and the daemon's working directory does not matter.

Only the shape and the cross-field rules of the config are checked here; the files it names are opened and
checked by ``proxy.config.materials``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from cryptography import x509
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.policy.allow import compile_dns_pattern, compile_uri_pattern

__all__ = [
    "AdminConfig",
    "AllowConfig",
    "BackendAddress",
    "BackendConfig",
    "ClientAuthConfig",
    "Config",
    "ConfigError",
    "Http2Config",
    "ListenAddressField",
    "ListenerConfig",
    "LogConfig",
    "ReloadConfig",
    "TCPAddress",
    "TCPAddressField",
    "TLSConfig",
    "TimeoutsConfig",
    "UnixAddress",
    "load",
    "parse",
    "parse_backend_address",
    "parse_tcp_address",
]


# --------------------------------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """The configuration (or a file it names) is unusable.

    ``problems`` holds one human-readable line per problem, each starting with the place it concerns
    (``listeners[0].tls.cert: ...``); ``source`` names the file (or document) they were found in.
    """

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        # args mirror the constructor so the error pickles (e.g. across worker processes).
        super().__init__(source, self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        lines = [f"{self.source}: {len(self.problems)} problems:"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class TCPAddress:
    """A host (name, IPv4 or IPv6 literal without brackets) and a port. Port 0 asks for an ephemeral port.

    A listen address may leave the host out (``":8443"``, as Go tools write it): every interface, IPv4 and IPv6.
    """

    host: str
    port: int

    @property
    def bind_host(self) -> str | None:
        """The host to bind: None for every interface."""
        return self.host or None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A Unix domain socket path (absolute once loaded from a config file)."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


_TCP_EXAMPLE = "expected HOST:PORT, e.g. 127.0.0.1:8443"
# Host names as resolvers accept them; "_" is allowed because container service names often use it.
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def parse_tcp_address(value: object, *, any_host: bool = False) -> TCPAddress:
    """Parse ``"0.0.0.0:8443"``, ``"localhost:80"`` or ``"[::1]:8443"`` (or pass a TCPAddress through).

    With ``any_host`` (listen addresses), ``":8443"`` means every interface.
    """
    if isinstance(value, TCPAddress):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{_TCP_EXAMPLE}, got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if any_host and sep and not host and port_text:
        host = "[]"  # checked as a port below, then stands for every interface
    if not sep or not host or not port_text:
        raise ValueError(f"{_TCP_EXAMPLE}, got {value!r}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{_TCP_EXAMPLE}, got {value!r} (the port must be a number from 0 to 65535)")
    if host == "[]":
        return TCPAddress("", int(port_text))
    hint = _host_problem(host)
    if hint:
        raise ValueError(f"{_TCP_EXAMPLE}, got {value!r} ({hint})")
    return TCPAddress(host.removeprefix("[").removesuffix("]"), int(port_text))


def parse_listen_address(value: object) -> TCPAddress:
    """A listen address: HOST:PORT, or :PORT for every interface."""
    return parse_tcp_address(value, any_host=True)


def _host_problem(host: str) -> str | None:
    """Why ``host`` (as written before ``:PORT``) is not a host name or IP literal, or None if it is one."""
    if host.startswith("[") and host.endswith("]"):
        return None if _is_ip(host[1:-1], ipaddress.IPv6Address) else f"{host} is not an IPv6 address"
    if ":" in host:
        # "::1:8443" is ambiguous: the port could be part of the address.
        return "write IPv6 addresses in brackets, e.g. [::1]:8443"
    if all(label.isdigit() for label in host.split(".")):
        # All-numeric names are IPv4 literals; "999.0.0.1" would otherwise pass as a host name.
        return None if _is_ip(host, ipaddress.IPv4Address) else f"{host} is not an IPv4 address"
    if not _HOSTNAME_RE.match(host):
        return f"{host!r} is not a host name or IP address"
    return None


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def parse_backend_address(value: object, info: ValidationInfo | None = None) -> TCPAddress | UnixAddress:
    """Parse a backend address: ``host:port`` or ``unix:/path/to.sock``.

    A relative socket path resolves like the other file paths (see ``_resolve_path``).
    """
    if isinstance(value, (TCPAddress, UnixAddress)):
        return value
    if isinstance(value, str) and value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise ValueError(f"expected unix:/path/to.sock, got {value!r}")
        return UnixAddress(_resolve_path(Path(path), info))
    try:
        return parse_tcp_address(value)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or unix:/path/to.sock, e.g. 127.0.0.1:8080, got {value!r}") from None


def _validate_backend_address(value: object, info: ValidationInfo) -> TCPAddress | UnixAddress:
    # pydantic passes the validation info (which carries base_dir) only to functions that require it.
    return parse_backend_address(value, info)


# Usable as pydantic field types; they serialise back to their string form.
TCPAddressField = Annotated[TCPAddress, PlainValidator(parse_tcp_address), PlainSerializer(str)]
ListenAddressField = Annotated[TCPAddress, PlainValidator(parse_listen_address), PlainSerializer(str)]
BackendAddress = Annotated[
    TCPAddress | UnixAddress, PlainValidator(_validate_backend_address), PlainSerializer(str)
]


# --------------------------------------------------------------------------------------------------------------
# File paths


def _resolve_path(path: Path, info: ValidationInfo | None) -> Path:
    """Make ``path`` absolute against the config file's folder (validation context ``base_dir``) or the cwd.

    ``absolute()`` rather than ``resolve()``: Kubernetes mounts ConfigMaps and Secrets through symlinks into a
    timestamped folder that is replaced on every update, so following links would pin a folder that vanishes.
    """
    if path.is_absolute():
        return path
    context = info.context if info is not None else None
    base_dir = context.get("base_dir") if isinstance(context, dict) else None
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return base.absolute() / path


def _reject_empty_path(value: object) -> object:
    # Path("") is Path("."), which would silently name the config folder itself.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a file path, got an empty string")
    return value


FilePath = Annotated[Path, BeforeValidator(_reject_empty_path), AfterValidator(_resolve_path)]


# --------------------------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    # Frozen: a loaded config is shared by many connections and swapped whole on reload.
    # extra="forbid": a misspelt key (e.g. "trusted_cas") must be an error, not a silently ignored setting.
    model_config = ConfigDict(frozen=True, extra="forbid")


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AdminConfig(_Model):
    listen: ListenAddressField = TCPAddress("127.0.0.1", 9090)


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


def _check_alpn_protocol(protocol: str) -> str:
    # ALPN protocol ids are length-prefixed with one byte on the wire (RFC 7301).
    if not protocol.isascii() or not 1 <= len(protocol) <= 255:
        raise ValueError(f"ALPN protocol names are 1 to 255 ASCII characters, e.g. h2 or http/1.1, got {protocol!r}")
    return protocol


_TLS_VERSION_ORDER = {"1.2": 0, "1.3": 1}
# The ALPN protocols HTTP mode speaks to clients.
HTTP_ALPN = ("h2", "http/1.1")


class TLSConfig(_Model):
    cert: FilePath
    key: FilePath
    min_version: Literal["1.2", "1.3"] = "1.2"
    max_version: Literal["1.2", "1.3"] = "1.3"
    ciphers: str | None = None
    alpn: tuple[Annotated[str, AfterValidator(_check_alpn_protocol)], ...] = ()

    @field_validator("ciphers")
    @classmethod
    def _ciphers_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be an OpenSSL cipher string, or null for the default (ECDHE + AEAD only)")
        return value

    @model_validator(mode="after")
    def _versions_in_order(self) -> TLSConfig:
        if _TLS_VERSION_ORDER[self.min_version] > _TLS_VERSION_ORDER[self.max_version]:
            raise ValueError(
                f"min_version {self.min_version!r} is higher than max_version {self.max_version!r}; "
                "no TLS version could be negotiated"
            )
        return self


_DN_EXAMPLE = '"CN=alice,OU=payments,O=Acme"'


def _normalise_dn(value: str) -> str:
    """Parse an RFC 4514 DN and return its canonical form, so that equal DNs compare equal as strings.

    The result has the form ``x509.Name.rfc4514_string()`` gives for a certificate's subject or issuer.
    """
    text = _strip_dn_separator_spaces(value)
    if not text:
        raise ValueError(f"must be a distinguished name such as {_DN_EXAMPLE}, got an empty string")
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        # cryptography's parser gives no detail, so say what is accepted.
        raise ValueError(
            f"{value!r} is not an RFC 4514 distinguished name; write it like {_DN_EXAMPLE} "
            "(attribute types such as CN, OU, O, L, ST, C, DC, UID in capitals, or dotted OIDs; "
            "escape , + = \\ with a backslash)"
        ) from None
    return name.rfc4514_string()


def _strip_dn_separator_spaces(value: str) -> str:
    """Drop the spaces people put around ``,`` and ``+`` ("CN=alice, OU=payments"), which RFC 4514 forbids.

    Escaped characters (``\\,`` or ``\\ ``) are kept as they are: they are part of a value.
    """
    tokens: list[str] = []  # single characters, or an escape pair such as "\\ " kept as one token
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            tokens.append(value[i : i + 2])
            i += 2
            continue
        if char in ",+":
            while tokens and tokens[-1] == " ":
                tokens.pop()
            tokens.append(char)
            i += 1
            while i < len(value) and value[i] == " ":
                i += 1
            continue
        tokens.append(char)
        i += 1
    return "".join(tokens).strip(" ")


_HEX_64_RE = re.compile(r"^[0-9a-f]{64}$")


def _normalise_fingerprint(value: str) -> str:
    digits = value.replace(":", "").lower()
    if not _HEX_64_RE.match(digits):
        raise ValueError(f"must be 64 hex digits (SHA-256 of the certificate's DER), got {value!r}")
    return digits


def _check_san_pattern(value: str) -> str:
    # A SAN never contains whitespace, so such a pattern could never match: it is a typo.
    if not value or any(char.isspace() for char in value):
        raise ValueError(f"must be a non-empty pattern without spaces ('*' and '**' are wildcards), got {value!r}")
    return value


def _check_dns_pattern(value: str) -> str:
    # Compiled here, as the policy will compile it, so that `check` names the entry (dns_sans[0]) of a pattern
    # such as "web-*.prod.svc" instead of failing later without saying which.
    compile_dns_pattern(value)
    return value


def _check_uri_pattern(value: str) -> str:
    compile_uri_pattern(value)
    return value


def _check_not_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


DistinguishedName = Annotated[str, AfterValidator(_normalise_dn)]
Fingerprint = Annotated[str, AfterValidator(_normalise_fingerprint)]
DnsPattern = Annotated[str, AfterValidator(_check_san_pattern), AfterValidator(_check_dns_pattern)]
UriPattern = Annotated[str, AfterValidator(_check_san_pattern), AfterValidator(_check_uri_pattern)]
NonEmptyStr = Annotated[str, AfterValidator(_check_not_empty)]


class AllowConfig(_Model):
    """Authorization rules: a verified client is admitted when any one rule matches it."""

    subjects: tuple[DistinguishedName, ...] = ()
    issuers: tuple[DistinguishedName, ...] = ()
    common_names: tuple[NonEmptyStr, ...] = ()
    organizational_units: tuple[NonEmptyStr, ...] = ()
    dns_sans: tuple[DnsPattern, ...] = ()
    uri_sans: tuple[UriPattern, ...] = ()
    sha256_fingerprints: tuple[Fingerprint, ...] = ()

    @model_validator(mode="after")
    def _has_a_rule(self) -> AllowConfig:
        # An empty allow list would deny everyone (fail closed); that is never what the user meant.
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("lists no rule; omit `allow` to admit any verified client")
        return self


class ClientAuthConfig(_Model):
    mode: Literal["require", "optional", "none"] = "require"
    trusted_ca: FilePath | None = None
    advertised_ca: FilePath | None = None
    crl: FilePath | None = None
    # How many intermediate CAs may stand between a client certificate and a
    # trusted CA (OpenSSL's verify depth): 0 = clients must be issued directly
    # by a trusted CA.
    verify_depth: int = Field(default=4, ge=0, le=32)
    allow: AllowConfig | None = None
    # Refuse client leaves that OpenSSL accepts by default but no client
    # certificate should be: one marked CA:TRUE, or one whose keyUsage lacks
    # digitalSignature (it cannot sign the handshake). false restores
    # OpenSSL's behaviour for legacy PKIs.
    strict: bool = True

    @model_validator(mode="after")
    def _consistent_with_mode(self) -> ClientAuthConfig:
        if self.mode != "none" and self.trusted_ca is None:
            raise ValueError(f"trusted_ca is required when mode is {self.mode!r}")
        if self.mode == "none":
            # These only act on a client certificate, which mode none never asks for.
            unused = [name for name in ("allow", "advertised_ca", "crl") if getattr(self, name) is not None]
            if unused:
                fields = " and ".join(unused)
                raise ValueError(
                    f"{fields} would do nothing when mode is 'none' (no client certificate is requested); "
                    f"remove {'it' if len(unused) == 1 else 'them'} or set mode to 'require' or 'optional'"
                )
        return self


class BackendConfig(_Model):
    address: BackendAddress
    protocol: Literal["tcp", "http"] = "tcp"
    connect_timeout: Seconds = 5.0
    # Send a PROXY protocol header before any data: the client's addresses
    # and (v2) the TLS facts, so a TCP backend learns who the client is.
    proxy_protocol: Literal["v1", "v2"] | None = None
    # v2 only: also send the client's certificate (DER, sub-TLV 0x28).
    proxy_protocol_client_cert: bool = False
    # http only: extra request headers built from the client's identity,
    # header name -> variable (subject, issuer, common_name, verify, ...).
    identity_headers: dict[str, str] = Field(default_factory=dict)
    # http only: the Upgrade protocols a client may switch to (compared
    # case-insensitively, without a version). After a 101 the connection is a
    # raw byte stream the proxy no longer reads, so only protocols that carry
    # no HTTP requests of their own may pass; h2c never does (its streams
    # would reach the backend with headers the client wrote).
    upgrades: tuple[str, ...] = ("websocket",)
    # http only: the HTTP version spoken to the backend. "2" is HTTP/2 over cleartext with prior knowledge (h2c),
    # which gRPC backends need; then clients must negotiate h2 with ALPN. "1.1": HTTP/2 clients' streams are
    # translated into HTTP/1.1 requests, each on its own backend connection.
    http_version: Literal["1.1", "2"] = "1.1"

    @field_validator("upgrades")
    @classmethod
    def _valid_upgrades(cls, protocols: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for protocol in protocols:
            name = protocol.strip().lower()
            if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name):
                raise ValueError(f"{protocol!r} is not an Upgrade protocol name (a token such as websocket)")
            if name == "h2c":
                raise ValueError("h2c cannot be allowed: its HTTP/2 streams would bypass the identity headers")
            names.append(name)
        return tuple(names)

    @field_validator("identity_headers")
    @classmethod
    def _valid_identity_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        from proxy.protocol.http1 import HeaderPolicy  # pure, like this module

        HeaderPolicy(headers)  # raises ValueError naming the bad header or variable
        return headers

    @model_validator(mode="after")
    def _consistent(self) -> BackendConfig:
        if self.proxy_protocol_client_cert and self.proxy_protocol != "v2":
            raise ValueError("proxy_protocol_client_cert needs proxy_protocol: v2 (v1 has no room for it)")
        if self.identity_headers and self.protocol != "http":
            raise ValueError("identity_headers needs protocol: http (a tcp backend gets no headers)")
        if self.upgrades != type(self).model_fields["upgrades"].default and self.protocol != "http":
            raise ValueError("upgrades needs protocol: http (a tcp backend relays bytes, not requests)")
        if self.http_version == "2" and self.protocol != "http":
            raise ValueError('http_version: "2" needs protocol: http (a tcp backend gets the client\'s own bytes, '
                             "whatever protocol it negotiated)")
        return self


class Http2Config(_Model):
    """HTTP/2 toward clients (HTTP mode with h2 in tls.alpn): what bounds one connection's streams and memory."""

    max_concurrent_streams: int = Field(default=100, ge=1, le=10_000)
    # Flow-control windows (RFC 9113 6.9): how much a peer may send before we take it. A connection holds at most
    # about twice connection_window_size in buffers.
    initial_window_size: int = Field(default=256 * 1024, ge=65_535, le=2**31 - 1)
    connection_window_size: int = Field(default=1024 * 1024, ge=65_535, le=2**31 - 1)
    max_frame_size: int = Field(default=16_384, ge=16_384, le=16_777_215)
    max_header_list_size: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)

    @model_validator(mode="after")
    def _windows(self) -> Http2Config:
        if self.connection_window_size < 2 * self.initial_window_size:
            raise ValueError("connection_window_size must be at least twice initial_window_size, so that one "
                             "stream cannot take the whole connection's window")
        return self


class TimeoutsConfig(_Model):
    handshake: Seconds = 10.0
    idle: Seconds = 300.0


_LISTENER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_listener_name(name: str) -> str:
    if not _LISTENER_NAME_RE.match(name):
        raise ValueError(
            f"must be 1 to 64 characters among A-Z a-z 0-9 _ . - (it is a metrics label), got {name!r}"
        )
    return name


class ListenerConfig(_Model):
    name: Annotated[str, AfterValidator(_check_listener_name)]
    listen: ListenAddressField
    tls: TLSConfig
    # No default on purpose: the point of this proxy is client authentication, so the mode must be written down.
    client_auth: ClientAuthConfig
    backend: BackendConfig
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    max_connections: int = Field(default=10000, ge=1)
    http2: Http2Config = Field(default_factory=Http2Config)

    @model_validator(mode="after")
    def _protocols_fit(self) -> ListenerConfig:
        alpn, backend = self.tls.alpn, self.backend
        if backend.protocol == "http":
            unknown = [p for p in alpn if p not in HTTP_ALPN]
            if unknown:
                raise ValueError(f"tls.alpn: {', '.join(unknown)} cannot work with backend.protocol: http, which "
                                 f"speaks {' and '.join(HTTP_ALPN)} (a tcp backend may speak anything)")
            if backend.http_version == "2" and "h2" not in alpn:
                raise ValueError('backend.http_version: "2" needs h2 in tls.alpn: the proxy relays HTTP/2 clients '
                                 "to an HTTP/2 backend, and clients speak HTTP/2 only when ALPN says so")
        elif self.http2 != Http2Config():
            raise ValueError("http2 needs backend.protocol: http (in tcp mode the backend speaks for itself)")
        return self


class ReloadConfig(_Model):
    # How often every file the config names is checked for changes (content,
    # inode, mtime), so a rotated certificate or a Kubernetes Secret update
    # (a `..data` symlink swap) is picked up without a signal. 0 = SIGHUP only.
    watch_interval: float = Field(default=5.0, ge=0, allow_inf_nan=False)


class Config(_Model):
    admin: AdminConfig = Field(default_factory=AdminConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)
    # After SIGTERM/SIGINT: how long open connections may finish before they are cut.
    drain_timeout: Seconds = 30.0
    # Worker processes sharing the listening sockets; "auto" = the CPUs this
    # process may use (its affinity and its cgroup CPU quota).
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = 1
    listeners: tuple[ListenerConfig, ...]

    @field_validator("listeners")
    @classmethod
    def _unique_listeners(cls, listeners: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        if not listeners:
            raise ValueError("at least one listener is required")
        problems = _duplicates("name", [listener.name for listener in listeners])
        # Port 0 means "any free port", so several listeners may share it (tests do).
        addresses = [str(listener.listen) if listener.listen.port != 0 else None for listener in listeners]
        problems += _duplicates("listen address", addresses)
        if problems:
            raise ValueError("; ".join(problems))
        return listeners

    @model_validator(mode="after")
    def _admin_port_free(self) -> Config:
        for index, listener in enumerate(self.listeners):
            if listener.listen == self.admin.listen and listener.listen.port != 0:
                raise ValueError(
                    f"listeners[{index}].listen and admin.listen are both {listener.listen}; "
                    "use a different port for one of them"
                )
        return self


def _duplicates(what: str, values: list[str | None]) -> list[str]:
    """One message per value used by more than one listener, naming their indexes."""
    seen: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        if value is not None:
            seen.setdefault(value, []).append(index)
    return [
        f"duplicate listener {what} {value!r} (" + " and ".join(f"listeners[{i}]" for i in indexes) + ")"
        for value, indexes in seen.items()
        if len(indexes) > 1
    ]


# --------------------------------------------------------------------------------------------------------------
# Parsing and loading


def parse(data: object, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a decoded document (the result of ``yaml.safe_load``) into a Config, or raise ConfigError.

    Relative file paths resolve against ``base_dir`` (the config file's folder), else the current directory.
    """
    if data is None:
        raise ConfigError(source, ["the document is empty; expected a mapping with at least `listeners`"])
    if not isinstance(data, dict):
        raise ConfigError(
            source, [f"the top-level document must be a mapping ({', '.join(Config.model_fields)}), got {_kind(data)}"]
        )
    context = {"base_dir": base_dir} if base_dir is not None else None
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, [_describe_error(error) for error in exc.errors()]) from None


def load(path: str | Path) -> Config:
    """Read, parse and validate a YAML (or JSON) config file, or raise ConfigError naming the file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_describe_yaml_error(exc)]) from None
    return parse(data, source=source, base_dir=path.absolute().parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys; here a repeated key is an error.

    A repeated ``client_auth:`` block would otherwise silently replace the first one.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------------------------------------------
# Turning pydantic errors into one friendly line each


def _describe_error(error: Any) -> str:
    """``{loc}: {message}`` for one pydantic error dict."""
    loc = tuple(error["loc"])
    where = _format_loc(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: {_unknown_field_message(loc)}"
    if kind == "missing":
        return f"{where}: required field missing"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    # Say what was written, unless the message already does (our own validators quote the value).
    if kind != "value_error" and isinstance(value, (str, int, float, bool)) and repr(value) not in message:
        message = f"{message}, got {value!r}"
    return f"{where}: {message}" if where else message


def _format_loc(loc: tuple[int | str, ...]) -> str:
    """``("listeners", 0, "client_auth", "mode")`` -> ``listeners[0].client_auth.mode``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _unknown_field_message(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown field"
    allowed = list(model.model_fields)
    message = f"unknown field (allowed: {', '.join(allowed)})"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping found at ``loc`` in the document."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a tuple field: its model was already found from the field
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Find the model inside ``X``, ``X | None`` or ``tuple[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
