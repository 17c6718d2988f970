"""proxy.config.materials: every file a listener names is loaded and checked, and each problem names the field and file.

Certificates are generated here with `cryptography` (ECDSA P-256) against a fixed NOW, so the tests do not
depend on the clock or on the dev-PKI module.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import materials
from proxy.config import schema as config
from proxy.config.schema import ConfigError

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)


# --------------------------------------------------------------------------------------------------------------
# A tiny PKI


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool | None = False,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + YEAR,
) -> x509.Certificate:
    """A certificate for ``subject``; self-signed unless ``issuer`` (cert, key) is given.

    ``ca=None`` leaves out basicConstraints altogether.
    """
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(signing_key, hashes.SHA256())


def new_ca(subject: str, **kwargs: Any) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    return issue(subject, key, ca=True, **kwargs), key


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def crl_of(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], next_update: datetime = NOW + DAY
) -> x509.CertificateRevocationList:
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[0].subject)
        .last_update(min(NOW, next_update) - DAY)
        .next_update(next_update)
        .sign(ca[1], hashes.SHA256())
    )


class Files:
    """A valid set of files in a folder: server chain (leaf + intermediate) and key, client CA bundle, CRL."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server_root = new_ca("Server Root")
        self.intermediate = new_ca("Server Intermediate", issuer=self.server_root)
        self.server_key = new_key()
        self.server_cert = issue("localhost", self.server_key, issuer=self.intermediate)
        self.client_ca_1 = new_ca("Client CA 1")
        self.client_ca_2 = new_ca("Client CA 2")
        self.write("server.crt", pem(self.server_cert, self.intermediate[0]))
        self.write("server.key", key_pem(self.server_key))
        self.write("client-ca.crt", pem(self.client_ca_1[0], self.client_ca_2[0]))
        self.write("crl.pem", crl_of(self.client_ca_1).public_bytes(serialization.Encoding.PEM))

    def write(self, filename: str, data: bytes) -> Path:
        path = self.folder / filename
        path.write_bytes(data)
        return path

    def path(self, filename: str) -> Path:
        return self.folder / filename

    def listener(self, name: str = "api", **client_auth: Any) -> dict[str, Any]:
        return {
            "name": name,
            "listen": "127.0.0.1:0",
            "tls": {"cert": "server.crt", "key": "server.key"},
            "client_auth": client_auth or {"trusted_ca": "client-ca.crt"},
            "backend": {"address": "127.0.0.1:8080"},
        }

    def config(self, *listeners: dict[str, Any]) -> config.Config:
        return config.parse({"listeners": list(listeners) or [self.listener()]}, base_dir=self.folder)

    def load(self, **client_auth: Any) -> materials.ListenerMaterials:
        cfg = self.config(self.listener(**client_auth))
        return materials.load_listener_materials(cfg.listeners[0], 0, now=NOW)

    def problems(self, **client_auth: Any) -> tuple[str, ...]:
        with pytest.raises(ConfigError) as info:
            self.load(**client_auth)
        return info.value.problems

    def only_problem(self, **client_auth: Any) -> str:
        problems = self.problems(**client_auth)
        assert len(problems) == 1, problems
        return problems[0]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Valid materials


def test_loads_a_valid_listener(files: Files) -> None:
    loaded = files.load(trusted_ca="client-ca.crt", crl="crl.pem")
    server = loaded.server
    assert server.chain == (files.server_cert, files.intermediate[0])
    assert server.leaf == files.server_cert
    assert server.cert_path == files.path("server.crt")
    assert server.key_path == files.path("server.key")
    assert server.key.public_key() == files.server_key.public_key()
    assert loaded.trusted_ca == (files.client_ca_1[0], files.client_ca_2[0])
    assert loaded.advertised_ca == loaded.trusted_ca  # default: advertise the trusted CAs
    assert [crl.issuer for crl in loaded.crls] == [files.client_ca_1[0].subject]
    # The bundle's second CA has no CRL in the file: revocation is checked where a CRL is given, and said so.
    assert loaded.warnings == (
        f"listeners[0].client_auth.crl: {files.path('crl.pem')}: no CRL issued by CN=Client CA 2: "
        "revocation is not checked for the certificates it issues",
    )


def test_advertised_ca_is_loaded_separately(files: Files) -> None:
    other = new_ca("Advertised Only")
    files.write("names.crt", pem(other[0]))
    loaded = files.load(trusted_ca="client-ca.crt", advertised_ca="names.crt")
    assert loaded.advertised_ca == (other[0],)
    assert loaded.trusted_ca == (files.client_ca_1[0], files.client_ca_2[0])


def test_mode_none_has_no_client_cas(files: Files) -> None:
    loaded = files.load(mode="none")
    assert (loaded.trusted_ca, loaded.advertised_ca, loaded.crls) == ((), (), ())
    assert loaded.server.leaf == files.server_cert


def test_server_certificate_alone_without_intermediates(files: Files) -> None:
    files.write("server.crt", pem(files.server_cert))
    assert files.load().server.chain == (files.server_cert,)


def test_pem_with_text_around_blocks_is_accepted(files: Files) -> None:
    # `openssl x509 -text` output and bundle comments put text between blocks.
    files.write("client-ca.crt", b"# Client CA 1\nsubject=...\n" + pem(files.client_ca_1[0]) + b"\ntrailing\n")
    assert files.load().trusted_ca == (files.client_ca_1[0],)


def test_several_crls_in_one_pem_file_and_der(files: Files) -> None:
    both = [crl_of(files.client_ca_1), crl_of(files.client_ca_2)]
    files.write("crls.pem", b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in both))
    assert len(files.load(trusted_ca="client-ca.crt", crl="crls.pem").crls) == 2
    files.write("crl.der", both[0].public_bytes(serialization.Encoding.DER))
    assert files.load(trusted_ca="client-ca.crt", crl="crl.der").crls == (both[0],)


def test_naive_now_is_taken_as_utc(files: Files) -> None:
    cfg = files.config()
    loaded = materials.load_listener_materials(cfg.listeners[0], 0, now=NOW.replace(tzinfo=None))
    assert loaded.warnings == ()


def test_describe_name() -> None:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"), x509.NameAttribute(NameOID.COMMON_NAME, "CA")]
    )
    assert materials.describe_name(subject) == "CN=CA,O=Acme"


# --------------------------------------------------------------------------------------------------------------
# Files that cannot be read


@pytest.mark.parametrize(
    ("filename", "field"),
    [
        ("server.crt", "tls.cert"),
        ("server.key", "tls.key"),
        ("client-ca.crt", "client_auth.trusted_ca"),
    ],
)
def test_missing_file(files: Files, filename: str, field: str) -> None:
    files.path(filename).unlink()
    with pytest.raises(ConfigError) as info:
        files.load()
    path = files.path(filename)
    assert info.value.problems == (f"listeners[0].{field}: {path}: file not found",)
    assert info.value.source == str(path)  # one file in question: it is the source


def test_file_that_is_a_directory(files: Files) -> None:
    files.path("sub").mkdir()
    problem = files.only_problem(trusted_ca="sub")
    assert problem == f"listeners[0].client_auth.trusted_ca: {files.path('sub')}: is a directory, not a file"


def test_unreadable_file(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, who can read a mode-000 file.
    key_path = files.path("server.key")
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == key_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ConfigError) as info:
        files.load()
    assert info.value.problems == (f"listeners[0].tls.key: {key_path}: permission denied",)


# --------------------------------------------------------------------------------------------------------------
# Server certificate file


def test_server_cert_not_pem(files: Files) -> None:
    files.write("server.crt", files.server_cert.public_bytes(serialization.Encoding.DER))
    problem = files.only_problem()
    assert problem.startswith(f"listeners[0].tls.cert: {files.path('server.crt')}: not a PEM file (no '-----BEGIN'")
    assert "openssl x509 -inform der" in problem


def test_server_cert_file_is_empty(files: Files) -> None:
    files.write("server.crt", b"")
    assert "not a PEM file" in files.only_problem()


def test_server_cert_file_holds_a_key(files: Files) -> None:
    files.write("server.crt", key_pem(files.server_key))
    assert files.only_problem() == (
        f"listeners[0].tls.cert: {files.path('server.crt')}: contains no certificate (PEM blocks found: PRIVATE KEY)"
    )


def test_corrupt_certificate_block(files: Files) -> None:
    good = pem(files.server_cert).decode()
    lines = good.splitlines()
    lines[3] = "A" * len(lines[3])  # damage the DER inside an intact PEM frame
    files.write("server.crt", ("\n".join(lines) + "\n").encode() + pem(files.intermediate[0]))
    problem = files.only_problem()
    assert problem.startswith(
        f"listeners[0].tls.cert: {files.path('server.crt')}: certificate 1 in the file is not a valid X.509"
    )


# --------------------------------------------------------------------------------------------------------------
# Private key file


def test_key_not_pem(files: Files) -> None:
    der = files.server_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files.write("server.key", der)
    problem = files.only_problem()
    assert problem.startswith(f"listeners[0].tls.key: {files.path('server.key')}: not a PEM file")
    assert "openssl pkey" in problem


def test_key_file_holds_a_certificate(files: Files) -> None:
    files.write("server.key", pem(files.server_cert))
    assert files.only_problem() == (
        f"listeners[0].tls.key: {files.path('server.key')}: contains no private key (PEM blocks found: CERTIFICATE)"
    )


def test_encrypted_key_is_not_supported(files: Files) -> None:
    files.write("server.key", key_pem(files.server_key, password=b"secret"))
    problem = files.only_problem()
    assert problem.startswith(
        f"listeners[0].tls.key: {files.path('server.key')}: the private key is passphrase-protected, "
        "which is not supported"
    )


def test_corrupt_key(files: Files) -> None:
    files.write("server.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    problem = files.only_problem()
    assert problem.startswith(f"listeners[0].tls.key: {files.path('server.key')}: not a valid PEM private key")


def test_key_does_not_match_certificate(files: Files) -> None:
    files.write("server.key", key_pem(new_key()))
    assert files.only_problem() == (
        f"listeners[0].tls.key: {files.path('server.key')}: does not match the certificate in "
        f"{files.path('server.crt')} (subject CN=localhost): their public keys differ"
    )


# --------------------------------------------------------------------------------------------------------------
# Server chain: validity and order


def write_server(files: Files, **validity: datetime) -> None:
    files.server_cert = issue("localhost", files.server_key, issuer=files.intermediate, **validity)
    files.write("server.crt", pem(files.server_cert, files.intermediate[0]))


def test_expired_server_certificate(files: Files) -> None:
    write_server(files, not_before=NOW - YEAR, not_after=datetime(2030, 5, 1, tzinfo=UTC))
    assert files.only_problem() == (
        f"listeners[0].tls.cert: {files.path('server.crt')}: the server certificate (CN=localhost) "
        "expired on 2030-05-01 00:00:00 UTC"
    )


def test_server_certificate_not_yet_valid(files: Files) -> None:
    write_server(files, not_before=datetime(2030, 7, 1, tzinfo=UTC), not_after=NOW + YEAR)
    assert files.only_problem() == (
        f"listeners[0].tls.cert: {files.path('server.crt')}: the server certificate (CN=localhost) "
        "is not valid before 2030-07-01 00:00:00 UTC"
    )


def test_expired_intermediate(files: Files) -> None:
    files.intermediate = new_ca("Server Intermediate", issuer=files.server_root, not_after=NOW - DAY)
    write_server(files)
    problem = files.only_problem()
    assert problem.startswith(f"listeners[0].tls.cert: {files.path('server.crt')}: chain certificate 2 ")
    assert "(CN=Server Intermediate) expired on 2030-05-31 12:00:00 UTC" in problem


def test_server_certificate_expiring_soon_is_a_warning(files: Files) -> None:
    write_server(files, not_after=NOW + timedelta(days=10, hours=1))
    loaded = files.load()
    assert loaded.warnings == (
        f"listeners[0].tls.cert: {files.path('server.crt')}: the server certificate (CN=localhost) "
        "expires in 10 days, on 2030-06-11 13:00:00 UTC",
    )


def test_server_certificate_expiring_after_30_days_gives_no_warning(files: Files) -> None:
    write_server(files, not_after=NOW + timedelta(days=31))
    assert files.load().warnings == ()


def test_chain_out_of_order(files: Files) -> None:
    # Intermediate first, then the leaf: clients would see the wrong certificate as the server's.
    files.write("server.crt", pem(files.intermediate[0], files.server_cert))
    problems = files.problems()
    prefix = f"listeners[0].tls.cert: {files.path('server.crt')}: "
    assert (
        prefix + "the server certificate (CN=Server Intermediate) is issued by CN=Server Root, not by the next "
        "certificate in the file, chain certificate 2 (CN=localhost); "
        "list the server certificate first, then each issuer in order"
    ) in problems
    # The key belongs to the real leaf, now in second place: reported too.
    assert any(p.startswith(f"listeners[0].tls.key: {files.path('server.key')}: does not match") for p in problems)


def test_chain_with_an_unrelated_intermediate(files: Files) -> None:
    files.write("server.crt", pem(files.server_cert, files.client_ca_1[0]))
    problem = files.only_problem()
    assert "the server certificate (CN=localhost) is issued by CN=Server Intermediate, not by the next" in problem
    assert "chain certificate 2 (CN=Client CA 1)" in problem


def test_chain_with_a_rekeyed_intermediate(files: Files) -> None:
    # Same name, new key: the names line up but the signature does not.
    rekeyed = new_ca("Server Intermediate", issuer=files.server_root)
    files.write("server.crt", pem(files.server_cert, rekeyed[0]))
    problem = files.only_problem()
    assert problem.startswith(
        f"listeners[0].tls.cert: {files.path('server.crt')}: the server certificate (CN=localhost) is not signed "
        "by the key of the next certificate in the file"
    )


# --------------------------------------------------------------------------------------------------------------
# CA bundles


@pytest.mark.parametrize("field", ["trusted_ca", "advertised_ca"])
def test_ca_bundle_without_certificates(files: Files, field: str) -> None:
    files.write("bundle.crt", crl_of(files.client_ca_1).public_bytes(serialization.Encoding.PEM))
    settings = {"trusted_ca": "client-ca.crt", field: "bundle.crt"}
    assert files.only_problem(**settings) == (
        f"listeners[0].client_auth.{field}: {files.path('bundle.crt')}: "
        "contains no certificate (PEM blocks found: X509 CRL)"
    )


def test_ca_bundle_entry_that_is_not_a_ca(files: Files) -> None:
    client = issue("alice", new_key(), issuer=files.client_ca_1)
    files.write("client-ca.crt", pem(files.client_ca_1[0], client))
    problem = files.only_problem()
    assert problem.startswith(
        f"listeners[0].client_auth.trusted_ca: {files.path('client-ca.crt')}: entry 2 (CN=alice) "
        "is not a CA certificate (basicConstraints CA:TRUE is missing)"
    )


def test_ca_bundle_entry_without_basic_constraints(files: Files) -> None:
    files.write("client-ca.crt", pem(issue("Old CA", new_key(), ca=None)))
    assert "entry 1 (CN=Old CA) is not a CA certificate" in files.only_problem()


def test_advertised_bundle_entry_that_is_not_a_ca(files: Files) -> None:
    files.write("names.crt", pem(files.server_cert))
    problem = files.only_problem(trusted_ca="client-ca.crt", advertised_ca="names.crt")
    assert problem.startswith(
        f"listeners[0].client_auth.advertised_ca: {files.path('names.crt')}: entry 1 (CN=localhost) is not a CA"
    )


def test_every_ca_expired_is_an_error(files: Files) -> None:
    old = new_ca("Old CA", not_before=NOW - 2 * YEAR, not_after=datetime(2029, 1, 1, tzinfo=UTC))
    files.write("client-ca.crt", pem(old[0]))
    assert files.only_problem() == (
        f"listeners[0].client_auth.trusted_ca: {files.path('client-ca.crt')}: every CA in the bundle has expired: "
        "CN=Old CA on 2029-01-01 00:00:00 UTC"
    )


def test_some_cas_expired_is_a_warning(files: Files) -> None:
    old = new_ca("Old CA", not_before=NOW - 2 * YEAR, not_after=datetime(2029, 1, 1, tzinfo=UTC))
    files.write("client-ca.crt", pem(files.client_ca_1[0], old[0]))
    loaded = files.load()
    assert loaded.trusted_ca == (files.client_ca_1[0], old[0])
    assert loaded.warnings == (
        f"listeners[0].client_auth.trusted_ca: {files.path('client-ca.crt')}: some CAs in the bundle have "
        "expired: CN=Old CA on 2029-01-01 00:00:00 UTC",
    )


# --------------------------------------------------------------------------------------------------------------
# CRLs


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"garbage", "not a CRL (neither PEM with '-----BEGIN X509 CRL' blocks nor DER)"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "CRL 1 in the file is not a valid CRL"),
        (None, "contains no CRL (PEM blocks found: CERTIFICATE)"),
    ],
)
def test_crl_that_does_not_parse(files: Files, content: bytes | None, expected: str) -> None:
    files.write("crl.pem", content if content is not None else pem(files.client_ca_1[0]))
    problem = files.only_problem(trusted_ca="client-ca.crt", crl="crl.pem")
    assert problem.startswith(f"listeners[0].client_auth.crl: {files.path('crl.pem')}: {expected}")


def test_missing_crl_file(files: Files) -> None:
    problem = files.only_problem(trusted_ca="client-ca.crt", crl="missing.pem")
    assert problem == f"listeners[0].client_auth.crl: {files.path('missing.pem')}: file not found"


def test_out_of_date_crl_is_a_warning(files: Files) -> None:
    stale = crl_of(files.client_ca_1, next_update=datetime(2030, 5, 1, tzinfo=UTC))
    files.write("crl.pem", stale.public_bytes(serialization.Encoding.PEM))
    loaded = files.load(trusted_ca="client-ca.crt", crl="crl.pem")
    assert loaded.warnings[0] == (
        f"listeners[0].client_auth.crl: {files.path('crl.pem')}: the CRL of CN=Client CA 1 is out of date "
        "(next update was due 2030-05-01 00:00:00 UTC)"
    )


# --------------------------------------------------------------------------------------------------------------
# Collecting problems


def test_all_problems_of_a_listener_are_reported_together(files: Files) -> None:
    files.path("server.crt").unlink()
    files.write("server.key", b"not a key")
    files.write("crl.pem", b"garbage")
    with pytest.raises(ConfigError) as info:
        files.load(trusted_ca="missing-ca.crt", crl="crl.pem")
    fields = [problem.split(":")[0] for problem in info.value.problems]
    assert fields == [
        "listeners[0].tls.cert",
        "listeners[0].tls.key",
        "listeners[0].client_auth.trusted_ca",
        "listeners[0].client_auth.crl",
    ]
    assert info.value.source == "listeners[0]"  # several files: the listener is the source
    assert str(info.value).startswith("listeners[0]: 4 problems:\n  - listeners[0].tls.cert: ")


def test_explicit_source(files: Files) -> None:
    files.path("server.crt").unlink()
    cfg = files.config()
    with pytest.raises(ConfigError) as info:
        materials.load_listener_materials(cfg.listeners[0], 0, now=NOW, source="proxy.yaml")
    assert str(info.value) == f"proxy.yaml: listeners[0].tls.cert: {files.path('server.crt')}: file not found"


def test_load_all_returns_every_listener(files: Files) -> None:
    cfg = files.config(files.listener("a"), files.listener("b", mode="none"))
    loaded = materials.load_all(cfg, now=NOW)
    assert len(loaded) == 2
    assert loaded[0].trusted_ca == (files.client_ca_1[0], files.client_ca_2[0])
    assert loaded[1].trusted_ca == ()


def test_load_all_reports_problems_of_every_listener_in_one_error(files: Files) -> None:
    broken = files.listener("b", trusted_ca="nope.crt")
    broken["tls"] = {"cert": "missing.crt", "key": "server.key"}
    cfg = files.config(files.listener("a", trusted_ca="absent.crt"), broken)
    with pytest.raises(ConfigError) as info:
        materials.load_all(cfg, now=NOW)
    assert info.value.problems == (
        f"listeners[0].client_auth.trusted_ca: {files.path('absent.crt')}: file not found",
        f"listeners[1].tls.cert: {files.path('missing.crt')}: file not found",
        f"listeners[1].client_auth.trusted_ca: {files.path('nope.crt')}: file not found",
    )
    assert info.value.source == "listeners"


def test_load_all_with_one_failing_listener_keeps_its_source(files: Files) -> None:
    cfg = files.config(files.listener("a"), files.listener("b", trusted_ca="absent.crt"))
    with pytest.raises(ConfigError) as info:
        materials.load_all(cfg, now=NOW, source=None)
    assert info.value.source == str(files.path("absent.crt"))
    with pytest.raises(ConfigError) as info:
        materials.load_all(cfg, now=NOW, source="proxy.yaml")
    assert info.value.source == "proxy.yaml"
