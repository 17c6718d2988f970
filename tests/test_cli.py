"""The command line as a user runs it: ``check``, ``certs init`` and argument errors, each in a real process.

Every case asserts the exit code of the contract (0 ok, 2 bad config or arguments), that no traceback leaks, and
the part of the message that tells the user what to fix.
"""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.dev import pki

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds; one CLI run takes well under one


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m proxy ARGS`` to completion (bounded) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd or REPO,
        stdin=subprocess.DEVNULL,
    )


def run_cli_many(runs: dict[str, tuple[str, ...]]) -> dict[str, subprocess.CompletedProcess[str]]:
    """``run_cli`` for each entry, several at a time."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {key: pool.submit(run_cli, *argv) for key, argv in runs.items()}
        return {key: future.result() for key, future in futures.items()}


def assert_config_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, a one-line-per-problem message on stderr (no traceback) containing every ``expected`` part."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("mtls-proxy: error: "), result.stderr
    assert "OK" not in result.stdout, result.stdout
    for part in expected:
        assert part in result.stderr, f"{part!r} not in:\n{result.stderr}"
    return result.stderr


# ---- configs -------------------------------------------------------------------


def base_config(test_pki) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:19090"},
        "log": {"level": "info", "format": "json"},
        "listeners": [
            {
                "name": "api",
                "listen": "127.0.0.1:18443",
                "tls": {"cert": str(test_pki.server.cert), "key": str(test_pki.server.key)},
                "client_auth": {"mode": "require", "trusted_ca": str(test_pki.client_ca)},
                "backend": {"address": "127.0.0.1:8080"},
            }
        ],
    }


def write_config(tmp_path: Path, data: dict | str, name: str = "proxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "--config", str(path))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files that are wrong in one way each."""
    d = tmp_path_factory.mktemp("bad-files")
    now = datetime.now(UTC)
    ca = pki.make_ca("Bad Files CA", organization="Acme")
    expired = pki.make_server_cert(ca, not_before=now - timedelta(days=60), not_after=now - timedelta(days=2))
    files = {
        "expired.crt": expired.chain_pem(),
        "expired.key": expired.key_pem(),
        "not-pem.crt": b"this is not a certificate\n",
        "der.crt": expired.cert.public_bytes(serialization.Encoding.DER),
        "key-only.pem": expired.key_pem(),
        "empty.pem": b"",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def _listener(c: dict) -> dict:
    return c["listeners"][0]


def _dup_listener(c: dict, files: Any = None, test_pki: Any = None) -> None:
    second = copy.deepcopy(_listener(c))
    second["listen"] = "127.0.0.1:18444"
    c["listeners"].append(second)


# (id, how to break the config, parts the message must contain). "{cfg}" is the config path, "{x}" a bad file.
Mutation = Callable[[dict, dict[str, Path], Any], None]
BROKEN: list[tuple[str, Mutation, tuple[str, ...]]] = [
    (
        "unknown-field",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("trusted_cas", "x.crt"),
        ("{cfg}: ", "listeners[0].client_auth.trusted_cas: unknown field", "did you mean 'trusted_ca'?"),
    ),
    (
        "unknown-top-level-field",
        lambda c, f, p: c.__setitem__("listener", []),
        ("{cfg}: ", "listener: unknown field", "did you mean 'listeners'?"),
    ),
    (
        "bad-client-auth-mode",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("mode", "required"),
        ("{cfg}: ", "listeners[0].client_auth.mode: ", "'require', 'optional' or 'none'", "got 'required'"),
    ),
    (
        "missing-tls-cert",
        lambda c, f, p: _listener(c)["tls"].pop("cert"),
        ("{cfg}: ", "listeners[0].tls.cert: required field missing"),
    ),
    (
        "listen-without-port",
        lambda c, f, p: _listener(c).__setitem__("listen", "localhost"),
        ("{cfg}: ", "listeners[0].listen: expected HOST:PORT", "got 'localhost'"),
    ),
    (
        "listen-port-out-of-range",
        lambda c, f, p: _listener(c).__setitem__("listen", "127.0.0.1:70000"),
        ("listeners[0].listen: ", "'127.0.0.1:70000'", "0 to 65535"),
    ),
    (
        "admin-listen-bad-ipv4",
        lambda c, f, p: c["admin"].__setitem__("listen", "999.0.0.1:9090"),
        ("admin.listen: ", "999.0.0.1 is not an IPv4 address"),
    ),
    (
        "cert-file-missing",
        lambda c, f, p: _listener(c)["tls"].__setitem__("cert", "no-such-dir/server.crt"),
        # relative paths resolve against the config file's folder, and the message names the full path
        ("listeners[0].tls.cert: {dir}/no-such-dir/server.crt: file not found",),
    ),
    (
        "cert-file-not-pem",
        lambda c, f, p: _listener(c)["tls"].__setitem__("cert", str(f["not-pem.crt"])),
        ("listeners[0].tls.cert: {not-pem.crt}: not a PEM file", "openssl x509 -inform der"),
    ),
    (
        "cert-file-der",
        lambda c, f, p: _listener(c)["tls"].__setitem__("cert", str(f["der.crt"])),
        ("listeners[0].tls.cert: {der.crt}: not a PEM file",),
    ),
    (
        "key-does-not-match-cert",
        lambda c, f, p: _listener(c)["tls"].__setitem__("key", str(p.alice.key)),
        ("listeners[0].tls.key: {alice.key}: does not match the certificate in {server.crt}",
         "their public keys differ"),
    ),
    (
        "key-file-is-a-certificate",
        lambda c, f, p: _listener(c)["tls"].__setitem__("key", str(p.server.cert)),
        ("listeners[0].tls.key: {server.crt}: contains no private key (PEM blocks found: CERTIFICATE)",),
    ),
    (
        "expired-server-cert",
        lambda c, f, p: _listener(c)["tls"].update(cert=str(f["expired.crt"]), key=str(f["expired.key"])),
        ("listeners[0].tls.cert: {expired.crt}: the server certificate (CN=localhost) expired on ",),
    ),
    (
        "ca-bundle-without-certificate",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("trusted_ca", str(f["key-only.pem"])),
        ("listeners[0].client_auth.trusted_ca: {key-only.pem}: contains no certificate",
         "PEM blocks found: PRIVATE KEY"),
    ),
    (
        "ca-bundle-empty-file",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("trusted_ca", str(f["empty.pem"])),
        ("listeners[0].client_auth.trusted_ca: {empty.pem}: not a PEM file",),
    ),
    (
        "ca-bundle-holds-a-client-cert",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("trusted_ca", str(p.alice.cert)),
        ("listeners[0].client_auth.trusted_ca: {alice.crt}: entry 1 (CN=alice,OU=payments,O=Acme) is not a CA",),
    ),
    (
        "advertised-ca-missing",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("advertised_ca", "missing-cas.pem"),
        ("listeners[0].client_auth.advertised_ca: {dir}/missing-cas.pem: file not found",),
    ),
    (
        "trusted-ca-missing-in-require-mode",
        lambda c, f, p: _listener(c)["client_auth"].pop("trusted_ca"),
        ("{cfg}: ", "listeners[0].client_auth: trusted_ca is required when mode is 'require'"),
    ),
    (
        "trusted-ca-missing-in-optional-mode",
        lambda c, f, p: _listener(c).__setitem__("client_auth", {"mode": "optional"}),
        ("listeners[0].client_auth: trusted_ca is required when mode is 'optional'",),
    ),
    (
        "client-auth-missing",
        lambda c, f, p: _listener(c).pop("client_auth"),
        ("listeners[0].client_auth: required field missing",),
    ),
    (
        "duplicate-listener-names",
        _dup_listener,
        ("{cfg}: ", "duplicate listener name 'api' (listeners[0] and listeners[1])"),
    ),
    (
        "listener-on-admin-port",
        lambda c, f, p: c["admin"].__setitem__("listen", "127.0.0.1:18443"),
        ("listeners[0].listen and admin.listen are both 127.0.0.1:18443",),
    ),
    (
        "invalid-cipher-string",
        lambda c, f, p: _listener(c)["tls"].__setitem__("ciphers", "NOPE"),
        # Like every other problem, it must name the config file the user has to edit.
        ("{cfg}: ", "listeners[0].tls.ciphers: OpenSSL accepts no cipher in 'NOPE'"),
    ),
    (
        "min-version-above-max",
        lambda c, f, p: _listener(c)["tls"].update(min_version="1.3", max_version="1.2"),
        ("listeners[0].tls: min_version '1.3' is higher than max_version '1.2'",),
    ),
    (
        "malformed-fingerprint",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("allow", {"sha256_fingerprints": ["ab:cd:ef"]}),
        ("{cfg}: ", "listeners[0].client_auth.allow.sha256_fingerprints[0]: must be 64 hex digits", "'ab:cd:ef'"),
    ),
    (
        "malformed-subject-dn",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("allow", {"subjects": ["alice"]}),
        ("listeners[0].client_auth.allow.subjects[0]: 'alice' is not an RFC 4514 distinguished name",),
    ),
    (
        "empty-allow",
        lambda c, f, p: _listener(c)["client_auth"].__setitem__("allow", {}),
        ("listeners[0].client_auth.allow: lists no rule",),
    ),
    (
        "no-listeners",
        lambda c, f, p: c.__setitem__("listeners", []),
        ("listeners: at least one listener is required",),
    ),
    (
        "negative-timeout",
        lambda c, f, p: _listener(c).__setitem__("timeouts", {"handshake": -1}),
        ("listeners[0].timeouts.handshake: ", "greater than 0"),
    ),
]


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory, test_pki, bad_files) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every BROKEN config written to its own folder and checked, the processes run side by side (each one
    spends most of its time importing, so this saves most of the wall-clock time)."""
    paths = {}
    for case_id, mutate, _ in BROKEN:
        config = base_config(test_pki)
        mutate(config, bad_files, test_pki)
        paths[case_id] = write_config(tmp_path_factory.mktemp(case_id), config)
    results = run_cli_many({case_id: ("check", "--config", str(path)) for case_id, path in paths.items()})
    return {case_id: (paths[case_id], results[case_id]) for case_id in paths}


@pytest.mark.parametrize("case_id, expected", [pytest.param(i, e, id=i) for i, _, e in BROKEN])
def test_check_rejects_broken_config(broken_runs, test_pki, bad_files, case_id, expected):
    path, result = broken_runs[case_id]
    names = {name: str(p) for name, p in bad_files.items()}
    names.update({"cfg": str(path), "dir": str(path.parent), "alice.key": str(test_pki.alice.key),
                  "alice.crt": str(test_pki.alice.cert), "server.crt": str(test_pki.server.cert)})
    parts = [_fill(part, names) for part in expected]
    assert_config_error(result, *parts)


def _fill(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace("{" + name + "}", value)
    assert "{" not in text or "}" not in text, f"unfilled placeholder in {text!r}"
    return text


def test_check_reports_every_problem_of_a_listener(tmp_path, test_pki):
    config = base_config(test_pki)
    _listener(config)["tls"].update(cert="gone.crt", key="gone.key")
    _listener(config)["client_auth"]["trusted_ca"] = "gone-ca.crt"
    path = write_config(tmp_path, config)
    stderr = assert_config_error(check(path), f"{path}: 3 problems:")
    for field, name in (("tls.cert", "gone.crt"), ("tls.key", "gone.key"), ("client_auth.trusted_ca", "gone-ca.crt")):
        assert f"  - listeners[0].{field}: {tmp_path / name}: file not found" in stderr


@pytest.mark.parametrize(
    "text, line",
    [
        # an unclosed flow sequence on line 6
        ("admin:\n  listen: 127.0.0.1:1\nlisteners:\n  - name: a\n    tls: {cert: a.crt\n    listen: x\n", 6),
        # a mapping value where a sequence item is open, on line 3
        ("listeners:\n  - name: a\n    listen: b: c\n", 3),
        # a tab used for indentation on line 2
        ("listeners:\n\t- name: a\n", 2),
    ],
    ids=["unclosed-brace", "colon-in-value", "tab-indent"],
)
def test_check_yaml_syntax_error_names_the_line(tmp_path, text, line):
    path = write_config(tmp_path, text)
    stderr = assert_config_error(check(path), f"{path}: line {line}, column ", "invalid YAML")
    assert stderr.count("\n") == 1, stderr  # one line, no parser dump


def test_check_duplicate_yaml_key_is_an_error(tmp_path, test_pki):
    config = base_config(test_pki)
    text = yaml.safe_dump(config, sort_keys=False)
    text = text.replace("admin:\n", "admin:\n  listen: 127.0.0.1:1\n", 1)
    assert text.startswith("admin:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:19090\n")
    path = write_config(tmp_path, text)
    # the second `listen` (line 3) is the one that would silently win
    assert_config_error(check(path), f"{path}: line 3, column 3: invalid YAML: duplicate key 'listen'")


@pytest.mark.parametrize(
    "text, expected",
    [("", "the document is empty"), ("- a\n- b\n", "the top-level document must be a mapping")],
    ids=["empty", "list"],
)
def test_check_document_of_the_wrong_shape(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    assert_config_error(check(path), f"{path}: {expected}")


def test_check_config_file_does_not_exist(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_config_error(check(missing), f"{missing}: cannot read config file: No such file or directory")


def test_check_config_path_is_a_directory(tmp_path):
    assert_config_error(check(tmp_path), f"{tmp_path}: cannot read config file")


# ---- check on good configs --------------------------------------------------------


def advertised_names(stdout: str) -> list[str]:
    """The DNs listed under "CA names advertised in CertificateRequest:"."""
    lines = stdout.splitlines()
    header = lines.index("  CA names advertised in CertificateRequest:")
    names = []
    for line in lines[header + 1 :]:
        if not line.startswith("    - "):
            break
        names.append(line.removeprefix("    - "))
    return names


def test_check_good_config_prints_summary_and_advertised_cas(tmp_path, test_pki):
    path = write_config(tmp_path, base_config(test_pki))
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{path}: OK\n")
    assert "admin endpoint: http://127.0.0.1:19090/metrics" in result.stdout
    assert "listener api: 127.0.0.1:18443 -> 127.0.0.1:8080 (tcp)" in result.stdout
    assert "  server certificate: CN=localhost (expires " in result.stdout
    assert "  client auth: require" in result.stdout
    assert "  allow: any verified client" in result.stdout
    assert advertised_names(result.stdout) == ["CN=Test Client CA,O=Acme"]
    assert "Test Server CA" not in result.stdout


def test_check_advertised_ca_overrides_the_names(tmp_path, test_pki):
    config = base_config(test_pki)
    _listener(config)["client_auth"]["advertised_ca"] = str(test_pki.both_cas)
    _listener(config)["client_auth"]["allow"] = {"common_names": ["alice"], "organizational_units": ["payments"]}
    result = check(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert advertised_names(result.stdout) == ["CN=Test Client CA,O=Acme", "CN=Other CA,O=Elsewhere"]
    assert "  trusted CAs: 1, verify depth 4" in result.stdout
    assert "  allow: common_names=alice; organizational_units=payments" in result.stdout


def test_check_mode_none_lists_no_ca_names(tmp_path, test_pki):
    config = base_config(test_pki)
    _listener(config)["client_auth"] = {"mode": "none"}
    result = check(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert "  client auth: none" in result.stdout
    assert "CA names advertised" not in result.stdout


def test_check_warns_about_a_server_cert_close_to_expiry(tmp_path, test_pki):
    ca = pki.make_ca("Soon CA")
    soon = pki.make_server_cert(ca, not_after=datetime.now(UTC) + timedelta(days=10, hours=1))
    (tmp_path / "soon.crt").write_bytes(soon.chain_pem())
    (tmp_path / "soon.key").write_bytes(soon.key_pem())
    config = base_config(test_pki)
    _listener(config)["tls"].update(cert="soon.crt", key="soon.key")
    result = check(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert f"  warning: listeners[0].tls.cert: {tmp_path / 'soon.crt'}: the server certificate (CN=localhost) " \
           "expires in 10 days" in result.stdout


def test_check_relative_paths_resolve_against_the_config_folder(tmp_path, test_pki):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    for name in ("server.crt", "server.key", "client-ca.crt"):
        shutil.copy(test_pki.dir / name, conf_dir / name)
    config = base_config(test_pki)
    _listener(config)["tls"].update(cert="server.crt", key="server.key")
    _listener(config)["client_auth"]["trusted_ca"] = "client-ca.crt"
    path = write_config(conf_dir, config)
    # run from elsewhere, with a relative --config
    result = run_cli("check", "--config", "etc/proxy.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("etc/proxy.yaml: OK\n")
    assert path.exists()


# ---- certs init ------------------------------------------------------------------

PKI_FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")


def test_certs_init_writes_a_usable_dev_pki(tmp_path):
    target = tmp_path / "pki"
    result = run_cli("certs", "init", str(target))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(PKI_FILES)
    for name in PKI_FILES:
        assert str(target / name) in result.stdout
        mode = stat.S_IMODE((target / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    # An independent TLS stack agrees that the CA issued both leaves, for their purposes.
    for leaf, purpose in (("server.crt", "sslserver"), ("client.crt", "sslclient")):
        verify = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(target / "ca.crt"), str(target / leaf)],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout.strip() == f"{target / leaf}: OK"


def test_certs_init_refuses_to_overwrite_without_force(tmp_path):
    target = tmp_path / "pki"
    assert run_cli("certs", "init", str(target)).returncode == 0
    before = {name: (target / name).read_bytes() for name in PKI_FILES}

    again = run_cli("certs", "init", str(target))
    assert_config_error(again, f"{target / 'ca.crt'} already exists (use --force to overwrite)")
    assert {name: (target / name).read_bytes() for name in PKI_FILES} == before, "files changed without --force"

    forced = run_cli("certs", "init", "--force", str(target))
    assert forced.returncode == 0, forced.stderr
    after = {name: (target / name).read_bytes() for name in PKI_FILES}
    assert all(after[name] != before[name] for name in PKI_FILES), "--force did not replace the files"


def test_certs_init_then_check_the_example_config(tmp_path):
    """The README's quick start: `certs init pki`, then `check --config config/example.yaml`."""
    (tmp_path / "config").mkdir()
    example = tmp_path / "config" / "example.yaml"
    shutil.copy(REPO / "config" / "example.yaml", example)

    before = check(example)
    assert_config_error(before, f"{tmp_path}/config/../pki/server.crt: file not found")

    init = run_cli("certs", "init", "pki", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    result = run_cli("check", "--config", "config/example.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config/example.yaml: OK\n")
    assert "listener api: 127.0.0.1:8443 -> 127.0.0.1:8080 (tcp)" in result.stdout
    assert advertised_names(result.stdout) == ["CN=mtls-proxy dev CA,O=mtls-proxy dev"]


def test_certs_init_into_an_unwritable_place_is_a_runtime_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("certs", "init", str(blocker / "pki"))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"mtls-proxy: error: cannot write {blocker / 'pki'}" in result.stderr


# ---- argument errors -----------------------------------------------------------


ARGUMENT_ERRORS = [
    ("none", (), "the following arguments are required: COMMAND"),
    ("unknown-command", ("serve",), "argument COMMAND: invalid choice: 'serve'"),
    ("check-no-config", ("check",), "the following arguments are required: --config"),
    ("run-no-config", ("run",), "the following arguments are required: --config"),
    ("certs-no-sub", ("certs",), "the following arguments are required: SUBCOMMAND"),
    ("init-no-dir", ("certs", "init"), "the following arguments are required: DIR"),
    ("certs-unknown-sub", ("certs", "make"), "argument SUBCOMMAND: invalid choice: 'make'"),
    ("bad-drain-timeout", ("run", "--config", "x.yaml", "--drain-timeout", "soon"),
     "argument --drain-timeout: invalid float value: 'soon'"),
    ("bad-port", ("demo", "--port", "eighty"), "argument --port: invalid int value: 'eighty'"),
    ("unknown-option", ("check", "--config", "x.yaml", "--verbose"), "unrecognized arguments: --verbose"),
]


@pytest.fixture(scope="module")
def argument_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    return run_cli_many({case_id: argv for case_id, argv, _ in ARGUMENT_ERRORS})


@pytest.mark.parametrize("case_id, expected", [pytest.param(i, e, id=i) for i, _, e in ARGUMENT_ERRORS])
def test_argument_errors_exit_2_with_usage(argument_runs, case_id, expected):
    result = argument_runs[case_id]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: mtls-proxy"), result.stderr
    assert f"error: {expected}" in result.stderr
    assert result.stdout == ""


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "check", "demo", "certs"):
        assert command in result.stdout


def test_check_names_the_allow_entry_with_a_bad_wildcard(tmp_path, test_pki):
    # This pattern used to reach Policy.from_rules unchecked: `check` printed a traceback.
    config = base_config(test_pki)
    _listener(config)["client_auth"]["allow"] = {"dns_sans": ["web-*.prod.svc"]}
    path = write_config(tmp_path, config)
    assert_config_error(
        check(path),
        f"{path}: ",
        "listeners[0].client_auth.allow.dns_sans[0]: pattern 'web-*.prod.svc': a wildcard must be a whole label",
    )


def test_check_warns_when_max_connections_cannot_fit_the_descriptor_limit(tmp_path, test_pki):
    config = base_config(test_pki)
    _listener(config)["max_connections"] = 1_000_000
    result = check(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert "warning: listeners[*].max_connections add up to 1000000 (api 1000000), but the file descriptor limit " \
           "(RLIMIT_NOFILE" in result.stdout


def test_check_is_quiet_about_capacity_when_max_connections_fits(tmp_path, test_pki):
    config = base_config(test_pki)
    _listener(config)["max_connections"] = 100
    result = check(write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert "max_connections" not in result.stdout


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mtls-proxy {version('mtls-proxy')}\n"
