"""The etcd store's TLS and authentication: URL options checked before connecting, refusals
that say what is wrong (CA, client certificate, password), tokens renewed when etcd lets them
expire (writes, watches, leases), certificate-name auth, and the plaintext path a developer's
local etcd still uses.

The session cluster (`etcd_cluster`) is secure like every cluster `running_cluster` starts:
TLS, `--client-cert-auth`, etcd auth on, the store as user `hivenet` with a password file.
Token expiry gets a one-member cluster of its own with `--auth-token-ttl 1`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivenet.lab.etcd import EtcdCluster
from hivenet.lab.pki import new_ca
from hivenet.store import (
    EventType,
    InvalidRequestError,
    StoreUnavailableError,
    open_store,
    redact_store_url,
)
from hivenet.store.etcd import EtcdStore
from hivenet.store.etcd_url import parse_etcd_url
from tests.store.etcd_cluster import running_cluster, wipe

_TEST_TIMEOUT = 30.0
_TOKEN_TTL = 1  # seconds; etcd drops an unused simple token within about ttl + 1 s


def _run(body: object) -> None:
    asyncio.run(asyncio.wait_for(body, _TEST_TIMEOUT))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- URL options


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    ca = new_ca("hn test CA")
    ca.write_cert(tmp_path / "ca.pem")
    ca.issue_client(tmp_path, "client", "hivenet")
    ca.issue_client(tmp_path, "other", "hivenet")
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return tmp_path


def test_a_full_url_gives_endpoints_tls_and_credentials(tls_dir: Path) -> None:
    parsed = parse_etcd_url(
        f"etcd://h1:2379,h2:2379?cacert={tls_dir}/ca.pem&cert={tls_dir}/client.pem"
        f"&key={tls_dir}/client-key.pem&user=hivenet&password_file={tls_dir}/pw"
    )
    assert parsed.endpoints == ("h1:2379", "h2:2379")
    assert parsed.tls is not None and parsed.tls.ca_pem == (tls_dir / "ca.pem").read_bytes()
    assert parsed.tls.cert_pem == (tls_dir / "client.pem").read_bytes()
    assert parsed.auth is not None and parsed.auth.user == "hivenet"
    assert parsed.auth.password == "s3cret"  # the file's trailing newline is not part of it
    assert "s3cret" not in repr(parsed)


def test_tls_comes_from_the_scheme_or_any_tls_option(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_etcd_url("etcd://h:1").tls is None
    system = parse_etcd_url("etcds://h:1")
    assert system.tls is not None and system.tls.cert_pem is None
    assert parse_etcd_url(f"etcd://h:1?cacert={tls_dir}/ca.pem").tls is not None
    monkeypatch.setenv("HN_TEST_ETCD_PW", "from-env")
    env = parse_etcd_url("etcds://h:1?user=u&password_env=HN_TEST_ETCD_PW")
    assert env.auth is not None and env.auth.password == "from-env"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("colour=blue", "unknown option 'colour'"),
        ("cacert={d}/missing.pem", "option cacert: cannot read '{d}/missing.pem'"),
        ("cacert={d}/junk.pem", "option cacert: '{d}/junk.pem' holds no PEM CA certificate"),
        ("cert={d}/client.pem", "option cert='{d}/client.pem' needs option key"),
        ("key={d}/client-key.pem", "option key='{d}/client-key.pem' needs option cert"),
        (
            "cert={d}/client.pem&key={d}/other-key.pem",
            "options cert='{d}/client.pem' and key='{d}/other-key.pem' are not",
        ),
        ("user=hivenet", "option user='hivenet' needs password_file=PATH or password_env"),
        ("password_file={d}/pw", "option password_file needs option user"),
        ("user=u&password_file={d}/nope", "option password_file: cannot read '{d}/nope'"),
        ("user=u&password_file={d}/empty", "gives an empty password"),
        ("user=u&password_env=HN_TEST_UNSET_VARIABLE", "'HN_TEST_UNSET_VARIABLE' is not set"),
        ("user=u&password_file={d}/pw&password_env=X", "not both"),
        ("cacert={d}/ca.pem&cacert={d}/ca.pem", "option cacert given twice"),
        ("cacert=", "option cacert has no value"),
    ],
)
def test_bad_url_options_fail_before_connecting_naming_option_and_value(
    tls_dir: Path, query: str, expected: str
) -> None:
    url = "etcd://127.0.0.1:2379?" + query.format(d=tls_dir)
    with pytest.raises(InvalidRequestError) as caught:
        open_store(url)
    assert expected.format(d=tls_dir) in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "etcd://127.0.0.1:2379?user=u&password=hunter2",
        "etcds://u:hunter2@127.0.0.1:2379",
    ],
)
def test_a_password_in_the_url_is_refused_and_never_echoed(url: str) -> None:
    with pytest.raises(InvalidRequestError, match="password") as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value)
    assert "password_file" in str(caught.value)
    assert "hunter2" not in redact_store_url(url) and "***" in redact_store_url(url)


def test_redaction_leaves_a_url_without_a_password_alone() -> None:
    url = "etcds://h:1?cacert=/p/ca.pem&user=u&password_file=/p/pw"
    assert redact_store_url(url) == url


# --------------------------------------------------------------------------- refusals


def _refusal(store: EtcdStore) -> str:
    async def main() -> str:
        try:
            with pytest.raises(StoreUnavailableError) as caught:
                await store.get("/hn/refused")
            return str(caught.value)
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_member_not_signed_by_the_given_ca_is_refused_saying_so(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    other_ca = new_ca("not the etcd CA").write_cert(tmp_path / "other-ca.pem")
    url = etcd_cluster.url.replace(str(etcd_cluster.ca_file), str(other_ca))
    message = _refusal(open_store(url, call_timeout=1.0))
    assert "TLS handshake failed" in message
    assert str(other_ca) in message
    assert "CERTIFICATE_VERIFY_FAILED" in message


def test_a_client_without_certificate_is_refused_saying_so(etcd_cluster: EtcdCluster) -> None:
    parsed = parse_etcd_url(etcd_cluster.url)
    assert parsed.tls is not None
    url = (
        "etcds://"
        + ",".join(parsed.endpoints)
        + f"?cacert={etcd_cluster.ca_file}&user=hivenet&password_file={etcd_cluster.password_file}"
    )
    message = _refusal(open_store(url, call_timeout=1.0))
    assert "refused the client certificate" in message
    assert "gives no client certificate" in message


def test_a_plaintext_client_of_a_tls_member_is_refused(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore(etcd_cluster.endpoints, call_timeout=1.0)
    message = _refusal(store)
    assert "not applied" in message  # nothing reached etcd


def test_a_wrong_password_is_refused_at_once_naming_user_and_file(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    url = etcd_cluster.url.replace(str(etcd_cluster.password_file), str(wrong))
    started = time.monotonic()
    message = _refusal(open_store(url, call_timeout=5.0))
    assert time.monotonic() - started < 2.0  # no retrying until the deadline: it will not pass
    assert "refused user 'hivenet'" in message
    assert str(wrong) in message
    assert "authentication failed" in message


def test_without_user_etcd_takes_the_certificate_name(etcd_cluster: EtcdCluster) -> None:
    """`admin_url` has root's certificate and no user: etcd runs its requests as root (which
    may list the users); the `hivenet` user may not."""
    wipe(etcd_cluster)

    async def main() -> None:
        admin = open_store(etcd_cluster.admin_url)
        store = open_store(etcd_cluster.url)
        assert isinstance(admin, EtcdStore) and isinstance(store, EtcdStore)
        try:
            await admin.put("/hn/by-cert", b"1")
            assert (await store.get("/hn/by-cert")) is not None
            assert admin.authentications == 0 and store.authentications == 1
        finally:
            await admin.close()
            await store.close()

    _run(main())


# --------------------------------------------------------------------------- token expiry


@pytest.fixture(scope="module")
def short_token_cluster() -> Iterator[EtcdCluster]:
    with running_cluster(size=1, auth_token_ttl=_TOKEN_TTL) as cluster:
        yield cluster


async def _wait_for_token_expiry() -> None:
    # etcd's simple-token keeper checks once a second: ttl + 2 s is surely past it.
    await asyncio.sleep(_TOKEN_TTL + 2.0)


def test_expired_tokens_are_renewed_for_writes_watches_and_leases(
    short_token_cluster: EtcdCluster,
) -> None:
    wipe(short_token_cluster)

    async def main() -> None:
        store = open_store(short_token_cluster.url)
        assert isinstance(store, EtcdStore)
        try:
            first = await store.put("/hn/t/a", b"1")
            lease = await store.lease_grant(30)
            watch = store.watch("/hn/t/", start_revision=first)
            assert (await anext(watch)).kv.key == "/hn/t/a"

            await _wait_for_token_expiry()
            await store.put("/hn/t/b", b"2", lease=lease.id)  # a write renews the token
            event = await asyncio.wait_for(anext(watch), 5.0)  # the old watch goes on
            assert (event.type, event.kv.key) == (EventType.PUT, "/hn/t/b")
            assert store.authentications == 2

            await _wait_for_token_expiry()
            later = store.watch("/hn/t/", start_revision=first)  # created with a dead token
            keys = [(await asyncio.wait_for(anext(later), 5.0)).kv.key for _ in range(2)]
            assert keys == ["/hn/t/a", "/hn/t/b"]
            assert store.authentications == 3

            await _wait_for_token_expiry()
            assert await store.lease_keepalive(lease.id) > 0
            await store.lease_revoke(lease.id)
            assert await store.get("/hn/t/b") is None
            await watch.aclose()  # type: ignore[attr-defined]
            await later.aclose()  # type: ignore[attr-defined]
        finally:
            await store.close()

    _run(main())


def test_a_store_idle_past_the_token_ttl_reads_again(short_token_cluster: EtcdCluster) -> None:
    wipe(short_token_cluster)

    async def main() -> None:
        store = open_store(short_token_cluster.url)
        assert isinstance(store, EtcdStore)
        try:
            await store.put("/hn/idle", b"1")
            await _wait_for_token_expiry()
            kv = await store.get("/hn/idle")
            assert kv is not None and kv.value == b"1"
            assert store.authentications == 2
        finally:
            await store.close()

    _run(main())


# --------------------------------------------------------------------------- plaintext


def test_a_plaintext_cluster_without_auth_still_works() -> None:
    """A developer's local etcd may be plaintext: `etcd://` with no options."""
    with running_cluster(size=1, secure=False) as cluster:
        assert cluster.url.startswith("etcd://") and "?" not in cluster.url

        async def main() -> None:
            store = open_store(cluster.url)
            try:
                revision = await store.put("/hn/plain", b"1")
                kv = await store.get("/hn/plain")
                assert kv is not None and kv.mod_revision == revision
            finally:
                await store.close()

        _run(main())
