"""proxy.config.schema: parsing, defaults, validation messages and path resolution.

Pure: no sockets, no files but tmp_path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.config import schema as config
from proxy.config.schema import ConfigError, TCPAddress, UnixAddress

FINGERPRINT = "3f" * 32


def minimal() -> dict[str, Any]:
    """The smallest valid document: one listener with every required field and nothing else."""
    return {
        "listeners": [
            {
                "name": "api",
                "listen": "0.0.0.0:8443",
                "tls": {"cert": "/pki/server.crt", "key": "/pki/server.key"},
                "client_auth": {"trusted_ca": "/pki/client-ca.crt"},
                "backend": {"address": "127.0.0.1:8080"},
            }
        ]
    }


def with_listener(**changes: Any) -> dict[str, Any]:
    """minimal() with listener fields replaced; a dotted key ("tls.min_version") sets a nested field."""
    data = minimal()
    listener = data["listeners"][0]
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = listener
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return data


def problems_of(data: object, **kwargs: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config.parse(data, **kwargs)
    return info.value.problems


def only_problem(data: object) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------------------------------------------
# Valid documents and defaults


def test_minimal_config_parses() -> None:
    cfg = config.parse(minimal())
    (listener,) = cfg.listeners
    assert listener.name == "api"
    assert listener.listen == TCPAddress("0.0.0.0", 8443)
    assert listener.tls.cert == Path("/pki/server.crt")
    assert listener.client_auth.trusted_ca == Path("/pki/client-ca.crt")
    assert listener.backend.address == TCPAddress("127.0.0.1", 8080)


def test_defaults_match_the_documented_contract() -> None:
    cfg = config.parse(minimal())
    listener = cfg.listeners[0]
    assert cfg.admin.listen == TCPAddress("127.0.0.1", 9090)
    assert (cfg.log.level, cfg.log.format) == ("info", "json")
    assert (listener.tls.min_version, listener.tls.max_version) == ("1.2", "1.3")
    assert listener.tls.ciphers is None
    assert listener.tls.alpn == ()
    client_auth = listener.client_auth
    assert client_auth.mode == "require"
    assert (client_auth.advertised_ca, client_auth.crl, client_auth.allow) == (None, None, None)
    assert client_auth.verify_depth == 4
    assert listener.backend.protocol == "tcp"
    assert listener.backend.connect_timeout == 5
    assert (listener.timeouts.handshake, listener.timeouts.idle) == (10, 300)
    assert listener.max_connections == 10000


DESIGN_EXAMPLE = """\
admin:
  listen: 127.0.0.1:9090
log: {level: info, format: json}
listeners:
  - name: api
    listen: 0.0.0.0:8443
    tls:
      cert: server.crt
      key: server.key
      min_version: "1.2"
      max_version: "1.3"
      ciphers: null
      alpn: []
    client_auth:
      mode: require
      trusted_ca: client-ca.crt
      advertised_ca: null
      crl: null
      verify_depth: 4
      allow:
        subjects: ["CN=alice, OU=payments, O=Acme"]
        issuers: []
        common_names: []
        organizational_units: []
        dns_sans: ["*.prod.svc"]
        uri_sans: ["spiffe://acme/ns/prod/*"]
        sha256_fingerprints: []
    backend:
      address: 127.0.0.1:8080
      protocol: tcp
      connect_timeout: 5
    timeouts:
      handshake: 10
      idle: 300
    max_connections: 10000
"""


def test_design_example_loads(tmp_path: Path) -> None:
    # The first design's example config, with one rule filled in (an allow block listing no rule is rejected).
    path = tmp_path / "mtls-proxy.yaml"
    path.write_text(DESIGN_EXAMPLE)
    cfg = config.load(path)
    allow = cfg.listeners[0].client_auth.allow
    assert allow is not None
    assert allow.subjects == ("CN=alice,OU=payments,O=Acme",)
    assert allow.dns_sans == ("*.prod.svc",)
    assert allow.uri_sans == ("spiffe://acme/ns/prod/*",)


def test_models_are_frozen() -> None:
    cfg = config.parse(minimal())
    with pytest.raises(pydantic.ValidationError):
        cfg.listeners[0].max_connections = 1  # type: ignore[misc]


def test_mode_none_needs_no_trusted_ca() -> None:
    cfg = config.parse(with_listener(client_auth={"mode": "none"}))
    assert cfg.listeners[0].client_auth.mode == "none"
    assert cfg.listeners[0].client_auth.trusted_ca is None


def test_addresses_serialise_back_to_strings() -> None:
    cfg = config.parse(with_listener(**{"listen": "[::1]:8443", "backend.address": "unix:/run/app.sock"}))
    dumped = cfg.model_dump(mode="json")["listeners"][0]
    assert dumped["listen"] == "[::1]:8443"
    assert dumped["backend"]["address"] == "unix:/run/app.sock"


# --------------------------------------------------------------------------------------------------------------
# Field errors name the exact place


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"client_auth.mode": "requir"}, "listeners[0].client_auth.mode: Input should be 'require', 'optional' or"),
        ({"client_auth.verify_depth": -1}, "listeners[0].client_auth.verify_depth: Input should be greater than or"),
        ({"client_auth.verify_depth": 33}, "listeners[0].client_auth.verify_depth: Input should be less than or"),
        ({"tls.min_version": "1.1"}, "listeners[0].tls.min_version: Input should be '1.2' or '1.3', got '1.1'"),
        ({"tls.max_version": 1.3}, "listeners[0].tls.max_version: Input should be '1.2' or '1.3'"),
        ({"tls.alpn": ["h2", ""]}, "listeners[0].tls.alpn[1]: ALPN protocol names are 1 to 255 ASCII"),
        ({"tls.alpn": ["h" * 256]}, "listeners[0].tls.alpn[0]: ALPN protocol names are 1 to 255 ASCII"),
        ({"tls.alpn": ["hé"]}, "listeners[0].tls.alpn[0]: ALPN protocol names are 1 to 255 ASCII"),
        ({"tls.ciphers": " "}, "listeners[0].tls.ciphers: must be an OpenSSL cipher string"),
        ({"tls.cert": ""}, "listeners[0].tls.cert: must be a file path, got an empty string"),
        ({"backend.protocol": "udp"}, "listeners[0].backend.protocol: Input should be 'tcp' or 'http', got 'udp'"),
        ({"backend.connect_timeout": 0}, "listeners[0].backend.connect_timeout: Input should be greater than 0"),
        ({"backend.address": "unix:"}, "listeners[0].backend.address: expected unix:/path/to.sock, got 'unix:'"),
        ({"backend.address": "nowhere"}, "listeners[0].backend.address: expected HOST:PORT or unix:/path/to.sock"),
        ({"timeouts.handshake": -1}, "listeners[0].timeouts.handshake: Input should be greater than 0"),
        ({"timeouts.idle": "soon"}, "listeners[0].timeouts.idle: Input should be a valid number"),
        ({"max_connections": 0}, "listeners[0].max_connections: Input should be greater than or equal to 1"),
        ({"name": "api server"}, "listeners[0].name: must be 1 to 64 characters among A-Z a-z 0-9 _ . -"),
        ({"name": "x" * 65}, "listeners[0].name: must be 1 to 64 characters"),
        ({"listen": "8443"}, "listeners[0].listen: expected HOST:PORT, e.g. 127.0.0.1:8443, got '8443'"),
    ],
)
def test_field_error_names_its_location(changes: dict[str, Any], expected: str) -> None:
    assert only_problem(with_listener(**changes)).startswith(expected)


def test_top_level_field_errors_have_plain_locations() -> None:
    data = minimal() | {"log": {"level": "verbose"}, "admin": {"listen": "nowhere"}}
    problems = problems_of(data)
    assert "log.level: Input should be 'debug', 'info', 'warning' or 'error', got 'verbose'" in problems
    assert any(p.startswith("admin.listen: expected HOST:PORT") for p in problems)


def test_unknown_field_lists_allowed_fields_and_suggests_one() -> None:
    problem = only_problem(with_listener(**{"client_auth.trusted_cas": "/pki/ca.crt"}))
    assert problem == (
        "listeners[0].client_auth.trusted_cas: unknown field "
        "(allowed: mode, trusted_ca, advertised_ca, crl, verify_depth, allow, strict); did you mean 'trusted_ca'?"
    )


def test_unknown_top_level_field() -> None:
    assert only_problem(minimal() | {"listener": []}) == (
        "listener: unknown field (allowed: admin, log, reload, drain_timeout, workers, listeners); "
        "did you mean 'listeners'?"
    )


def test_unknown_field_inside_allow() -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {"cn": ["alice"]}}))
    assert problem.startswith("listeners[0].client_auth.allow.cn: unknown field (allowed: subjects, issuers,")


def test_missing_field() -> None:
    data = minimal()
    del data["listeners"][0]["tls"]["key"]
    assert only_problem(data) == "listeners[0].tls.key: required field missing"


def test_client_auth_must_be_written_down() -> None:
    # No silent default for the setting that is the point of the proxy.
    data = minimal()
    del data["listeners"][0]["client_auth"]
    assert only_problem(data) == "listeners[0].client_auth: required field missing"


def test_listeners_are_required_and_not_empty() -> None:
    assert only_problem({}) == "listeners: required field missing"
    assert only_problem({"listeners": []}) == "listeners: at least one listener is required"


def test_all_problems_are_reported_at_once() -> None:
    data = with_listener(**{"client_auth.mode": "sometimes", "backend.protocol": "udp", "max_connections": -5})
    problems = problems_of(data)
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == [
        "listeners[0].client_auth.mode",
        "listeners[0].backend.protocol",
        "listeners[0].max_connections",
    ]


def test_value_error_prefix_is_stripped() -> None:
    problem = only_problem(with_listener(**{"tls.min_version": "1.3", "tls.max_version": "1.2"}))
    assert "Value error" not in problem
    assert problem == (
        "listeners[0].tls: min_version '1.3' is higher than max_version '1.2'; no TLS version could be negotiated"
    )


# --------------------------------------------------------------------------------------------------------------
# ConfigError


def test_config_error_with_one_problem_is_one_line() -> None:
    err = ConfigError("proxy.yaml", ["log.level: bad"])
    assert str(err) == "proxy.yaml: log.level: bad"
    assert err.source == "proxy.yaml"
    assert err.problems == ("log.level: bad",)


def test_config_error_with_several_problems_lists_them() -> None:
    err = ConfigError("proxy.yaml", ["a: one", "b: two"])
    assert str(err) == "proxy.yaml: 2 problems:\n  - a: one\n  - b: two"


def test_parse_names_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"listeners": []}, source="/etc/mtls-proxy.yaml")
    assert str(info.value) == "/etc/mtls-proxy.yaml: listeners: at least one listener is required"


# --------------------------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:8443", "0.0.0.0", 8443),
        ("localhost:80", "localhost", 80),
        ("backend.prod.svc.cluster.local:8080", "backend.prod.svc.cluster.local", 8080),
        ("my_service:80", "my_service", 80),
        ("[::1]:8443", "::1", 8443),
        ("[::]:443", "::", 443),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
    ],
)
def test_tcp_address_parses(text: str, host: str, port: int) -> None:
    address = config.parse_tcp_address(text)
    assert address == TCPAddress(host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("8443", None),
        ("localhost", None),
        (":8443", None),
        ("localhost:", None),
        ("localhost:http", "the port must be a number from 0 to 65535"),
        ("localhost:65536", "the port must be a number from 0 to 65535"),
        ("localhost:-1", "the port must be a number from 0 to 65535"),
        ("::1:8443", "write IPv6 addresses in brackets, e.g. [::1]:8443"),
        ("[::1]", None),
        ("[not-ipv6]:80", "[not-ipv6] is not an IPv6 address"),
        ("999.0.0.1:80", "999.0.0.1 is not an IPv4 address"),
        ("my host:80", "'my host' is not a host name or IP address"),
        ("-bad.example:80", "'-bad.example' is not a host name or IP address"),
    ],
)
def test_bad_tcp_address_is_explained(text: str, hint: str | None) -> None:
    with pytest.raises(ValueError) as info:
        config.parse_tcp_address(text)
    message = str(info.value)
    assert message.startswith(f"expected HOST:PORT, e.g. 127.0.0.1:8443, got {text!r}")
    if hint is not None:
        assert message.endswith(f"({hint})")


@pytest.mark.parametrize("value", [8443, None, ["127.0.0.1", 80]])
def test_tcp_address_rejects_non_strings(value: object) -> None:
    problem = only_problem(with_listener(listen=value))
    assert problem == f"listeners[0].listen: expected HOST:PORT, e.g. 127.0.0.1:8443, got {value!r}"


def test_tcp_address_accepts_an_instance() -> None:
    address = TCPAddress("127.0.0.1", 1)
    assert config.parse_tcp_address(address) is address
    cfg = config.parse(with_listener(listen=address))
    assert cfg.listeners[0].listen is address


def test_unix_backend_address() -> None:
    cfg = config.parse(with_listener(**{"backend.address": "unix:/run/app.sock"}))
    address = cfg.listeners[0].backend.address
    assert address == UnixAddress(Path("/run/app.sock"))
    assert str(address) == "unix:/run/app.sock"


def test_tcp_backend_address_with_ipv6() -> None:
    cfg = config.parse(with_listener(**{"backend.address": "[::1]:8080"}))
    assert cfg.listeners[0].backend.address == TCPAddress("::1", 8080)


# --------------------------------------------------------------------------------------------------------------
# Relative paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "proxy.yaml"
    path.write_text(
        """
listeners:
  - name: api
    listen: 127.0.0.1:0
    tls: {cert: certs/server.crt, key: /abs/server.key}
    client_auth: {trusted_ca: ca.crt, advertised_ca: ../other/names.crt, crl: crl.pem}
    backend: {address: "unix:run/app.sock"}
"""
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: must not matter
    listener = config.load(path).listeners[0]
    assert listener.tls.cert == folder / "certs/server.crt"
    assert listener.tls.key == Path("/abs/server.key")
    assert listener.client_auth.trusted_ca == folder / "ca.crt"
    assert listener.client_auth.advertised_ca == folder / "../other/names.crt"
    assert listener.client_auth.crl == folder / "crl.pem"
    assert listener.backend.address == UnixAddress(folder / "run/app.sock")


def test_relative_config_path_still_gives_absolute_file_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/proxy.json").write_text(
        '{"listeners": [{"name": "a", "listen": "127.0.0.1:0", "tls": {"cert": "s.crt", "key": "s.key"},'
        ' "client_auth": {"mode": "none"}, "backend": {"address": "127.0.0.1:1"}}]}'
    )
    monkeypatch.chdir(tmp_path)
    cert = config.load("conf/proxy.json").listeners[0].tls.cert
    assert cert.is_absolute()
    assert cert == tmp_path / "conf/s.crt"


def test_parse_uses_base_dir_or_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = with_listener(**{"tls.cert": "server.crt", "backend.address": "unix:app.sock"})
    with_base = config.parse(data, base_dir=Path("/etc/mtls-proxy")).listeners[0]
    assert with_base.tls.cert == Path("/etc/mtls-proxy/server.crt")
    assert with_base.backend.address == UnixAddress(Path("/etc/mtls-proxy/app.sock"))
    monkeypatch.chdir(tmp_path)
    without = config.parse(data).listeners[0]
    assert without.tls.cert == tmp_path / "server.crt"
    assert without.backend.address == UnixAddress(tmp_path / "app.sock")


# --------------------------------------------------------------------------------------------------------------
# Reading the file


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listeners:\n  - name: api\n    listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    (problem,) = info.value.problems
    assert problem.startswith("line 4, column 1: invalid YAML: ")
    assert str(info.value).startswith(f"{path}: line 4")


def test_yaml_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("log:\n  level: info\n   format: json\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems[0].startswith("line 3, column 10: invalid YAML: mapping values are not allowed")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    # safe_load would keep the second block silently.
    path = tmp_path / "dup.yaml"
    path.write_text("log: {level: info}\nlog: {level: debug}\nlisteners: []\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == ("line 2, column 1: invalid YAML: duplicate key 'log'",)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert info.value.problems == ("cannot read config file: Is a directory",)


def test_load_reports_validation_errors_with_the_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("listeners: []\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: listeners: at least one listener is required"


NOT_A_MAPPING = "the top-level document must be a mapping (admin, log, reload, drain_timeout, workers, listeners)"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("- a\n- b\n", f"{NOT_A_MAPPING}, got a list"),
        ("just words\n", f"{NOT_A_MAPPING}, got a string"),
        ("42\n", f"{NOT_A_MAPPING}, got int 42"),
        ("", "the document is empty; expected a mapping with at least `listeners`"),
        ("# only a comment\n", "the document is empty; expected a mapping with at least `listeners`"),
    ],
)
def test_document_that_is_not_a_mapping(tmp_path: Path, document: str, expected: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(document)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (problem,) = info.value.problems
    assert problem.startswith(expected)


# --------------------------------------------------------------------------------------------------------------
# Listener set rules


def test_duplicate_listener_names() -> None:
    data = minimal()
    second = copy.deepcopy(data["listeners"][0]) | {"listen": "0.0.0.0:9443"}
    data["listeners"].append(second)
    assert only_problem(data) == "listeners: duplicate listener name 'api' (listeners[0] and listeners[1])"


def test_duplicate_listen_addresses() -> None:
    data = minimal()
    data["listeners"].append(copy.deepcopy(data["listeners"][0]) | {"name": "other"})
    assert only_problem(data) == (
        "listeners: duplicate listener listen address '0.0.0.0:8443' (listeners[0] and listeners[1])"
    )


def test_port_zero_may_be_shared() -> None:
    # Port 0 asks the OS for any free port, so it never collides.
    data = with_listener(listen="127.0.0.1:0")
    data["listeners"].append(copy.deepcopy(data["listeners"][0]) | {"name": "other"})
    assert [str(listener.listen) for listener in config.parse(data).listeners] == ["127.0.0.1:0", "127.0.0.1:0"]


def test_listener_on_the_admin_address() -> None:
    problem = only_problem(with_listener(listen="127.0.0.1:9090"))
    assert problem == (
        "listeners[0].listen and admin.listen are both 127.0.0.1:9090; use a different port for one of them"
    )


# --------------------------------------------------------------------------------------------------------------
# client_auth rules


@pytest.mark.parametrize("mode", ["require", "optional"])
def test_verifying_modes_need_trusted_ca(mode: str) -> None:
    assert only_problem(with_listener(client_auth={"mode": mode})) == (
        f"listeners[0].client_auth: trusted_ca is required when mode is {mode!r}"
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"allow": {"common_names": ["alice"]}}, "allow would do nothing"),
        ({"advertised_ca": "/pki/names.crt"}, "advertised_ca would do nothing"),
        ({"crl": "/pki/crl.pem"}, "crl would do nothing"),
        ({"allow": {"common_names": ["alice"]}, "crl": "/pki/crl.pem"}, "allow and crl would do nothing"),
    ],
)
def test_mode_none_rejects_settings_that_would_do_nothing(extra: dict[str, Any], named: str) -> None:
    problem = only_problem(with_listener(client_auth={"mode": "none"} | extra))
    assert problem.startswith(f"listeners[0].client_auth: {named} when mode is 'none'")
    assert problem.endswith("or set mode to 'require' or 'optional'")


def test_allow_without_any_rule() -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {"subjects": [], "dns_sans": []}}))
    assert problem == "listeners[0].client_auth.allow: lists no rule; omit `allow` to admit any verified client"


def test_empty_allow_mapping_is_also_no_rule() -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {}}))
    assert problem.endswith("lists no rule; omit `allow` to admit any verified client")


@pytest.mark.parametrize(
    "written",
    [
        FINGERPRINT,
        FINGERPRINT.upper(),
        ":".join(FINGERPRINT[i : i + 2] for i in range(0, 64, 2)).upper(),  # as `openssl x509 -fingerprint` prints
    ],
)
def test_fingerprints_are_normalised(written: str) -> None:
    cfg = config.parse(with_listener(**{"client_auth.allow": {"sha256_fingerprints": [written]}}))
    assert cfg.listeners[0].client_auth.allow.sha256_fingerprints == (FINGERPRINT,)


@pytest.mark.parametrize("written", ["3f" * 31, "3f" * 33, "zz" * 32, "sha256:" + FINGERPRINT, ""])
def test_bad_fingerprint(written: str) -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {"sha256_fingerprints": [FINGERPRINT, written]}}))
    assert problem == (
        "listeners[0].client_auth.allow.sha256_fingerprints[1]: "
        f"must be 64 hex digits (SHA-256 of the certificate's DER), got {written!r}"
    )


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("CN=alice,OU=payments,O=Acme", "CN=alice,OU=payments,O=Acme"),
        ("CN=alice, OU=payments, O=Acme", "CN=alice,OU=payments,O=Acme"),
        ("  CN=alice ,  OU=payments  ", "CN=alice,OU=payments"),
        ("CN=Smith\\, John,O=Acme", "CN=Smith\\, John,O=Acme"),  # an escaped comma is part of the value
        ("CN=a + UID=7, O=Acme", "CN=a+UID=7,O=Acme"),  # a multi-valued RDN
    ],
)
def test_distinguished_names_are_normalised(written: str, canonical: str) -> None:
    cfg = config.parse(with_listener(**{"client_auth.allow": {"subjects": [written], "issuers": [written]}}))
    allow = cfg.listeners[0].client_auth.allow
    assert allow.subjects == (canonical,)
    assert allow.issuers == (canonical,)


def test_normalised_dn_equals_what_a_certificate_subject_prints() -> None:
    # The allow rules are compared with x509.Name.rfc4514_string() of the client's subject.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "payments"),
            x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
        ]
    )
    cfg = config.parse(with_listener(**{"client_auth.allow": {"subjects": ["CN=alice, OU=payments, O=Acme"]}}))
    assert cfg.listeners[0].client_auth.allow.subjects == (subject.rfc4514_string(),)


@pytest.mark.parametrize("written", ["alice", "CN alice", "XX=alice", "CN=alice,,O=Acme", ""])
def test_bad_distinguished_name_is_named(written: str) -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {"issuers": [written]}}))
    assert problem.startswith("listeners[0].client_auth.allow.issuers[0]: ")
    if written:
        assert f"{written!r} is not an RFC 4514 distinguished name" in problem
    else:
        assert "got an empty string" in problem


@pytest.mark.parametrize("field", ["dns_sans", "uri_sans"])
@pytest.mark.parametrize("pattern", ["", "a b.example", " *.svc"])
def test_bad_san_patterns(field: str, pattern: str) -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {field: [pattern]}}))
    assert problem.startswith(f"listeners[0].client_auth.allow.{field}[0]: must be a non-empty pattern")


def test_san_wildcards_are_accepted_as_written() -> None:
    allow = {"dns_sans": ["*.prod.svc", "**.acme.internal"], "uri_sans": ["spiffe://acme/**"]}
    parsed = config.parse(with_listener(**{"client_auth.allow": allow})).listeners[0].client_auth.allow
    assert parsed.dns_sans == ("*.prod.svc", "**.acme.internal")
    assert parsed.uri_sans == ("spiffe://acme/**",)


def test_empty_common_name_rule() -> None:
    problem = only_problem(with_listener(**{"client_auth.allow": {"common_names": [""]}}))
    assert problem == "listeners[0].client_auth.allow.common_names[0]: must not be empty"


def test_config_error_survives_pickling() -> None:
    # Errors may cross process boundaries (worker processes report to the parent).
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("proxy.yaml", ["a: one", "b: two"])))
    assert (err.source, err.problems) == ("proxy.yaml", ("a: one", "b: two"))


@pytest.mark.parametrize(
    ("field", "pattern", "message"),
    [
        ("dns_sans", "web-*.prod.svc", "a wildcard must be a whole label ('*' or '**'), not 'web-*'"),
        ("dns_sans", "**.a.**", "'**' may appear only once"),
        ("uri_sans", "spiffe://acme/**/sa", "'**' may only be the last segment"),
        ("uri_sans", "spiffe://acme/ns-*", "a wildcard must be a whole segment ('*' or '**'), not 'ns-*'"),
    ],
)
def test_wildcard_syntax_is_checked_when_the_config_loads(field: str, pattern: str, message: str) -> None:
    # Before, only Policy.from_rules compiled the patterns: `check` printed a traceback naming no field.
    allow = {field: ["ok.example" if field == "dns_sans" else "spiffe://ok", pattern]}
    problem = only_problem(with_listener(**{"client_auth.allow": allow}))
    assert problem.startswith(f"listeners[0].client_auth.allow.{field}[1]: "), problem
    assert message in problem


# --------------------------------------------------------------------------------------------------------------
# backend.upgrades


def test_upgrades_are_lowercased_tokens_and_default_to_websocket() -> None:
    assert config.parse(minimal()).listeners[0].backend.upgrades == ("websocket",)
    parsed = config.parse(with_listener(**{"backend.protocol": "http", "backend.upgrades": ["WebSocket", "echo"]}))
    assert parsed.listeners[0].backend.upgrades == ("websocket", "echo")


@pytest.mark.parametrize("protocol", ["h2c", "H2C"])
def test_h2c_can_never_be_allowed(protocol: str) -> None:
    problem = only_problem(with_listener(**{"backend.protocol": "http", "backend.upgrades": ["websocket", protocol]}))
    assert problem.startswith("listeners[0].backend.upgrades") and "h2c cannot be allowed" in problem


def test_an_upgrade_name_must_be_a_token() -> None:
    problem = only_problem(with_listener(**{"backend.protocol": "http", "backend.upgrades": ["web socket"]}))
    assert "is not an Upgrade protocol name" in problem


def test_upgrades_other_than_the_default_need_http_mode() -> None:
    assert config.parse(with_listener(**{"backend.upgrades": ["websocket"]}))  # the default, written out
    problem = only_problem(with_listener(**{"backend.upgrades": ["echo"]}))
    assert "upgrades needs protocol: http" in problem


# --------------------------------------------------------------------------------------------------------------
# Listen addresses without a host, and HTTP/2


@pytest.mark.parametrize(("text", "host", "bind_host"), [
    (":8443", "", None),  # every interface, as Go tools write it
    ("[::]:8443", "::", "::"),
    ("0.0.0.0:8443", "0.0.0.0", "0.0.0.0"),
])
def test_a_listen_address_may_leave_the_host_out(text: str, host: str, bind_host: str | None) -> None:
    listener = config.parse(with_listener(listen=text)).listeners[0]
    assert (listener.listen.host, listener.listen.port, listener.listen.bind_host) == (host, 8443, bind_host)
    assert str(listener.listen) == text
    admin = config.parse({**minimal(), "admin": {"listen": ":9090"}}).admin
    assert (admin.listen.host, admin.listen.port) == ("", 9090)


def test_a_backend_address_needs_its_host() -> None:
    assert "expected HOST:PORT" in only_problem(with_listener(**{"backend.address": ":8080"}))


def test_http2_settings_have_defaults_and_bounds() -> None:
    listener = config.parse(with_listener(**{"backend.protocol": "http", "tls.alpn": ["h2", "http/1.1"]})).listeners[0]
    assert listener.http2.max_concurrent_streams == 100
    assert listener.backend.http_version == "1.1"
    problem = only_problem(with_listener(**{"backend.protocol": "http", "http2.initial_window_size": 1024 * 1024}))
    assert "connection_window_size must be at least twice initial_window_size" in problem


@pytest.mark.parametrize(("changes", "expected"), [
    ({"backend.http_version": "2"}, 'http_version: "2" needs protocol: http'),
    ({"backend.protocol": "http", "backend.http_version": "2"}, 'http_version: "2" needs h2 in tls.alpn'),
    ({"backend.protocol": "http", "tls.alpn": ["h2", "h3"]}, "tls.alpn: h3 cannot work with backend.protocol: http"),
    ({"http2.max_concurrent_streams": 10}, "http2 needs backend.protocol: http"),
])
def test_http_versions_that_cannot_work_are_refused_with_the_reason(changes: dict[str, Any], expected: str) -> None:
    assert expected in only_problem(with_listener(**changes))


def test_h2_in_alpn_is_fine_for_a_tcp_backend_that_speaks_it() -> None:
    # TCP mode passes the client's bytes through: an h2c backend (gRPC) can answer an h2 client itself.
    assert config.parse(with_listener(**{"tls.alpn": ["h2"]})).listeners[0].tls.alpn == ("h2",)
