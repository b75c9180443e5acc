"""Who may call: TLS and mutual TLS, bearer tokens, and VMs that exist only for their owner.

Certificates are made for each run by a throwaway CA (the `cryptography` package, or the
`openssl` command when it is missing).
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import functools
import ipaddress
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vmmu.client import (Backing, BatchBuilder, ClientTls, NotFound, Unauthenticated,
                         Unavailable)
from vmmu.server.rpc.app import start_server
from vmmu.server.rpc.auth import InsecureListener, ServerTls, Tokens, is_loopback

TOKENS = "alice-secret alice\nbob-secret bob\n# a comment\n\nanon-secret\n"


# -- certificates ----------------------------------------------------------------------

def _cryptography_pki(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_name: x509.Name | None, issuer_key, *, ca: bool,
              san: list[x509.GeneralName]):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer_name or subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        # What a strict verifier (Python 3.13's default VERIFY_X509_STRICT) asks of both:
        # key usages, and the key identifiers that chain a leaf to its CA.
        signer = issuer_key or key
        builder = (builder
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       signer.public_key()), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        cert = builder.sign(signer, hashes.SHA256())
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return subject, key

    for ca_name, leaves in (("ca", ("server", "client")), ("other-ca", ("stranger",))):
        ca_subject, ca_key = issue(ca_name, None, None, ca=True, san=[])
        for leaf in leaves:
            issue(leaf, ca_subject, ca_key, ca=False,
                  san=[x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def _openssl_pki(directory: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ext = directory / "leaf.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    for ca_name, leaves in (("ca", ("server", "client")), ("other-ca", ("stranger",))):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{ca_name}.key", "-out", f"{ca_name}.crt", "-days", "1",
            "-subj", f"/CN={ca_name}", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for leaf in leaves:
            run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}")
            run("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca_name}.crt", "-CAkey",
                f"{ca_name}.key", "-CAcreateserial", "-out", f"{leaf}.crt", "-days", "1",
                "-extfile", str(ext))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """PEM bytes by name: ca, server and client (signed by ca), stranger (by other-ca)."""
    directory = tmp_path_factory.mktemp("pki")
    try:
        import cryptography  # noqa: F401
        _cryptography_pki(directory)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl to make certificates")
        _openssl_pki(directory)
    return {f"{path.stem}.{path.suffix[1:]}": path.read_bytes()
            for path in directory.iterdir() if path.suffix in (".crt", ".key")}


def _server_tls(pki: dict[str, bytes], mutual: bool = False) -> ServerTls:
    return ServerTls(pki["server.crt"], pki["server.key"], pki["ca.crt"] if mutual else None)


async def _create_and_run(client) -> bytes:
    vm = await client.create_vm(max_vcpus=1)
    region = await vm.mmap(2 << 20, Backing.THP)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=2 << 20,
                                    userspace_addr=region.hva)
    vcpu = await vm.create_vcpu(0)
    result = await vcpu.run(BatchBuilder().write(0x10, data=b"tls-ok!!")
                            .read(0x10, 8, with_data=True).build())
    return result.read_data


@pytest.fixture
def open_clients(serve, connect):
    """Starts a server with `start_server`'s options; returns how to connect to it."""
    def start(**options):
        return functools.partial(connect, serve(**options).address)
    return start


# -- TLS -------------------------------------------------------------------------------

async def test_a_vm_runs_over_tls(pki, open_clients):
    connect = open_clients(tls=_server_tls(pki))
    client = connect(tls=ClientTls(root_certificates=pki["ca.crt"]))
    assert await _create_and_run(client) == b"tls-ok!!"


async def test_a_tls_server_refuses_a_plaintext_client_and_an_untrusting_one(pki,
                                                                            open_clients):
    connect = open_clients(tls=_server_tls(pki))
    with pytest.raises(Unavailable):
        await connect().list_vms()
    with pytest.raises(Unavailable):     # the server's chain leads to a CA it does not trust
        await connect(tls=ClientTls(root_certificates=pki["other-ca.crt"])).list_vms()


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(pki,
                                                                           open_clients):
    connect = open_clients(tls=_server_tls(pki, mutual=True))
    trusted = connect(tls=ClientTls(root_certificates=pki["ca.crt"],
                                    certificate_chain=pki["client.crt"],
                                    private_key=pki["client.key"]))
    assert await _create_and_run(trusted) == b"tls-ok!!"
    anonymous = connect(tls=ClientTls(root_certificates=pki["ca.crt"]))
    stranger = connect(tls=ClientTls(root_certificates=pki["ca.crt"],
                                     certificate_chain=pki["stranger.crt"],
                                     private_key=pki["stranger.key"]))
    for refused in (anonymous, stranger):
        with pytest.raises(Unavailable):
            await refused.list_vms()


def _scrape(url: str, context: ssl.SSLContext | None = None, token: str | None = None
            ) -> int:
    """The HTTP status of a GET of `url` (with `token` as a bearer token)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert b"vmmu_vms " in response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def test_metrics_over_https_with_the_servers_certificate(pki):
    serving = await start_server("127.0.0.1:0", tls=_server_tls(pki), metrics="127.0.0.1:0")
    try:
        url = f"https://localhost:{serving.metrics_port}/metrics"
        trusting = ssl.create_default_context(cadata=pki["ca.crt"].decode())
        assert await asyncio.to_thread(_scrape, url, trusting) == 200
        with pytest.raises(urllib.error.URLError):          # a CA it does not trust
            await asyncio.to_thread(_scrape, url, ssl.create_default_context(
                cadata=pki["other-ca.crt"].decode()))
        with pytest.raises((urllib.error.URLError, ConnectionError)):   # plaintext
            await asyncio.to_thread(_scrape, url.replace("https", "http"))
    finally:
        await serving.stop(grace=0)


async def test_metrics_under_mutual_tls_need_a_client_certificate(pki, tmp_path):
    serving = await start_server("127.0.0.1:0", tls=_server_tls(pki, mutual=True),
                                 metrics="127.0.0.1:0")
    try:
        url = f"https://localhost:{serving.metrics_port}/metrics"
        context = ssl.create_default_context(cadata=pki["ca.crt"].decode())
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(_scrape, url, context)
        (tmp_path / "client.pem").write_bytes(pki["client.crt"] + b"\n" + pki["client.key"])
        context.load_cert_chain(tmp_path / "client.pem")
        assert await asyncio.to_thread(_scrape, url, context) == 200
    finally:
        await serving.stop(grace=0)


async def test_metrics_need_a_known_token_with_tokens():
    serving = await start_server("127.0.0.1:0", tokens=Tokens.parse(TOKENS),
                                 metrics="127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{serving.metrics_port}/metrics"
        assert await asyncio.to_thread(_scrape, url) == 401
        assert await asyncio.to_thread(_scrape, url, None, "not-a-token") == 401
        assert await asyncio.to_thread(_scrape, url, None, "bob-secret") == 200
    finally:
        await serving.stop(grace=0)


# -- tokens and ownership --------------------------------------------------------------

async def test_calls_without_a_known_token_are_unauthenticated(open_clients):
    connect = open_clients(tokens=Tokens.parse(TOKENS))
    for refused in (connect(), connect(token="not-a-token")):
        with pytest.raises(Unauthenticated, match="authorization: Bearer") as excinfo:
            await refused.list_vms()
        assert excinfo.value.errno == errno.EACCES
        assert excinfo.value.metadata["method"] == "/vmmu.v1.VmService/ListVms"
        with pytest.raises(Unauthenticated):
            await refused.create_vm()
    assert await connect(token="anon-secret").list_vms() == []


async def test_tokens_over_tls(pki, open_clients):
    connect = open_clients(tls=_server_tls(pki), tokens=Tokens.parse(TOKENS))
    tls = ClientTls(root_certificates=pki["ca.crt"])
    with pytest.raises(Unauthenticated):
        await connect(tls=tls).list_vms()
    assert await _create_and_run(connect(tls=tls, token="alice-secret")) == b"tls-ok!!"


def test_health_answers_without_a_token(serve):
    running = serve(tokens=Tokens.parse(TOKENS))
    with grpc.insecure_channel(running.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_vm_exists_only_for_the_identity_that_created_it(open_clients):
    connect = open_clients(tokens=Tokens.parse(TOKENS))
    alice, bob = connect(token="alice-secret"), connect(token="bob-secret")
    alice_again = connect(token="alice-secret")            # the same identity, another channel
    vm = await alice.create_vm(max_vcpus=1, name="alice's")
    region = await vm.mmap(2 << 20, Backing.PAGE_4K)
    await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0, memory_size=2 << 20,
                                    userspace_addr=region.hva)
    await vm.create_vcpu(0)
    bobs = await bob.create_vm(max_vcpus=1)

    assert [info.id for info in await alice.list_vms()] == [vm.id]
    assert [info.id for info in await bob.list_vms()] == [bobs.id]
    assert [info.id for info in await alice_again.list_vms()] == [vm.id]

    seen_by_bob = bob.vm(vm.id)
    attempts = {
        "info": lambda: seen_by_bob.info(), "stats": lambda: seen_by_bob.stats(),
        "walk": lambda: seen_by_bob.walk(0),
        "read_hva": lambda: seen_by_bob.read_hva(region.hva, 8),
        "write_hva": lambda: seen_by_bob.write_hva(region.hva, b"intruder"),
        "mmap": lambda: seen_by_bob.mmap(4096, Backing.PAGE_4K),
        "memslots": lambda: seen_by_bob.memslots(),
        "create_vcpu": lambda: seen_by_bob.create_vcpu(1),
        "vcpu.info": lambda: seen_by_bob.vcpu(0).info(),
        "vcpu.run": lambda: seen_by_bob.vcpu(0).run(BatchBuilder().read(0, 8).build()),
        "begin_invalidation": lambda: seen_by_bob.begin_invalidation(
            region.hva, region.hva + 4096, 1.0),
        "invalidations": lambda: seen_by_bob.invalidations(),
        "create_gpc": lambda: seen_by_bob.create_gpc(0, 8),
        "gpcs": lambda: seen_by_bob.gpcs(),
        "get_dirty_log": lambda: seen_by_bob.get_dirty_log(0),
        "madvise_dontneed": lambda: seen_by_bob.madvise_dontneed(region.hva, 4096),
        "destroy": lambda: seen_by_bob.destroy(),
    }
    for name, attempt in attempts.items():
        with pytest.raises(NotFound, match=f"no VM {vm.id}"):
            await attempt()
    with pytest.raises(NotFound):
        await bob.trace(vm_ids=[vm.id])
    with pytest.raises(NotFound):
        hold = await seen_by_bob.hold_invalidation(region.hva, region.hva + 4096)
        hold.cancel()
    assert (await alice_again.vm(vm.id).info()).name == "alice's"
    await alice.vm(vm.id).destroy()


async def test_a_trace_of_every_vm_follows_only_the_callers_vms(open_clients):
    connect = open_clients(tokens=Tokens.parse(TOKENS))
    alice, bob = connect(token="alice-secret"), connect(token="bob-secret")
    trace = await alice.trace(events=["kvm_page_fault"])
    try:
        for owner in (bob, alice):                       # bob's VM faults first
            vm = await owner.create_vm(max_vcpus=1)
            region = await vm.mmap(2 << 20, Backing.PAGE_4K)
            await vm.set_user_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                            memory_size=2 << 20, userspace_addr=region.hva)
            await (await vm.create_vcpu(0)).run(BatchBuilder().read(0, 8).build())
        event = await anext(trace)
        assert (event.event, event.vm_id) == ("kvm_page_fault", vm.id)
    finally:
        trace.cancel()


# -- listeners and the command line ----------------------------------------------------

@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:0", True), ("localhost:50051", True), ("[::1]:0", True),
    ("127.1.2.3:0", True), ("0.0.0.0:0", False), ("[::]:0", False),
    ("10.0.0.1:50051", False), ("example.com:50051", False)])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


async def test_a_plaintext_listener_beyond_the_loopback_needs_insecure(pki):
    with pytest.raises(InsecureListener, match="without TLS"):
        await start_server("0.0.0.0:0")
    with pytest.raises(InsecureListener, match="without TLS"):      # metrics alike
        await start_server("127.0.0.1:0", metrics="0.0.0.0:0")
    for options in ({"insecure": True}, {"tls": _server_tls(pki)}):
        serving = await start_server("0.0.0.0:0", metrics="0.0.0.0:0", **options)
        await serving.stop(grace=0)


def test_serve_refuses_a_plaintext_listener_beyond_the_loopback():
    done = subprocess.run([sys.executable, "-m", "vmmu.cli", "serve", "--listen", "0.0.0.0:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "without TLS" in done.stderr


@pytest.mark.parametrize("text, problem", [
    ("", "no tokens"), ("# only a comment\n", "no tokens"), ("a b c\n", "line 1"),
    ("same one\nsame two\n", "line 2")])
def test_a_bad_token_file_is_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        Tokens.parse(text)
