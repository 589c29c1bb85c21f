"""The encrypted store and master-key resolution: what must hold on disk and in errors."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import store as store_module
from proxy.masterkey import (
    KdfParams,
    MasterKey,
    MasterKeyError,
    create_key_file,
    default_key_file,
    derive_passphrase_key,
    load_key_file,
    new_kdf_params,
    resolve_master_key,
)
from proxy.secret import Secret
from proxy.store import (
    KINDS,
    Store,
    StoreCorrupt,
    StoreError,
    StoreMissing,
    WrongMasterKey,
)

VALUE = "sk-live-PLAINTEXT-0123456789abcdef"
FAST_KDF = KdfParams(salt=b"s" * 16, n=2**14, r=8, p=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_master(source: str = "test key") -> MasterKey:
    return MasterKey(key=os.urandom(32), source=source)


def raw_db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def assert_clean_message(error: BaseException, path: Path) -> None:
    text = str(error)
    assert str(path) in text
    assert "\n" not in text
    for leak in ("Traceback", "sqlite3", "DatabaseError", "OperationalError", "InvalidTag"):
        assert leak not in text


@pytest.fixture
def master() -> MasterKey:
    return new_master()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "store.db"


@pytest.fixture
def store(store_path: Path, master: MasterKey) -> Iterator[Store]:
    with Store.create(store_path, master) as opened:
        yield opened


# -- round trip and layout ------------------------------------------------------


def test_round_trip(store: Store, store_path: Path, master: MasterKey) -> None:
    """A value put in comes back out, in this process and after reopening."""
    store.put("aimychats-rw", "api_key", Secret(VALUE))
    store.put("client", "client_secret", Secret("cs-1"))
    assert store.get("aimychats-rw") == Secret(VALUE)
    assert store.get_entry("client") == ("client_secret", Secret("cs-1"))
    assert store.get("absent") is None
    store.close()
    with Store.open(store_path, master) as again:
        got = again.get("aimychats-rw")
        assert got is not None and got.reveal() == VALUE


def test_put_replaces_and_keeps_created_at(store: Store) -> None:
    """Putting an existing name replaces its value and kind but keeps its creation date."""
    store.put("tok", "oauth_access_token", Secret("one"))
    first = store.info()[0]
    store.put("tok", "oauth_refresh_token", Secret("two"))
    second = store.info()[0]
    assert store.get_entry("tok") == ("oauth_refresh_token", Secret("two"))
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    assert second.fingerprint != first.fingerprint


def test_info_lists_metadata_sorted_never_values(store: Store) -> None:
    """info() gives names, kinds, fingerprints and dates sorted by name, and no value."""
    store.put("b", "api_key", Secret(VALUE))
    store.put("a", "client_secret", Secret("other"))
    infos = store.info()
    assert [i.name for i in infos] == ["a", "b"]
    assert infos[1].kind == "api_key"
    assert infos[1].fingerprint == Secret(VALUE).fingerprint()
    assert infos[1].last_used_at is None
    assert VALUE not in repr(infos)


def test_remove(store: Store) -> None:
    """remove() deletes a secret and says whether there was one."""
    store.put("k", "api_key", Secret(VALUE))
    assert store.remove("k") is True
    assert store.remove("k") is False
    assert store.get("k") is None


def test_file_mode_0600_and_new_dirs_0700_whatever_the_umask(tmp_path: Path) -> None:
    """A new store is 0600 in 0700 directories even under umask 0, and leaves no other files."""
    path = tmp_path / "a" / "b" / "store.db"
    old = os.umask(0)
    try:
        with Store.create(path, new_master()) as created:
            created.put("k", "api_key", Secret(VALUE))
            created.lock_for_daemon()
            assert mode(path) == 0o600
            assert mode(path.parent) == 0o700
            assert mode(path.parent.parent) == 0o700
            lock = path.with_name("store.db.lock")
            assert mode(lock) == 0o600
            assert sorted(p.name for p in path.parent.iterdir()) == ["store.db", "store.db.lock"]
    finally:
        os.umask(old)


def test_existing_directory_is_left_but_file_is_0600(tmp_path: Path) -> None:
    """An existing data directory keeps its mode; the store file inside is still 0600."""
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # noqa: S103 (the point of the test)
    with Store.create(directory / "store.db", new_master()):
        pass
    assert mode(directory) == 0o755
    assert mode(directory / "store.db") == 0o600


def test_create_refuses_an_existing_file(store_path: Path, master: MasterKey) -> None:
    """create() never overwrites anything already at the path."""
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(b"precious")
    with pytest.raises(StoreError, match="already exists"):
        Store.create(store_path, master)
    assert store_path.read_bytes() == b"precious"


def test_open_missing_store(tmp_path: Path, master: MasterKey) -> None:
    """Opening a path with no file says so and points at `credproxy init`, creating nothing."""
    path = tmp_path / "nowhere" / "store.db"
    with pytest.raises(StoreMissing) as info:
        Store.open(path, master)
    assert str(info.value) == f"no store at {path}: run `credproxy init`"
    with pytest.raises(StoreMissing):
        Store.read_kdf_params(path)
    assert not path.exists()


# -- cryptography ---------------------------------------------------------------


def test_wrong_master_key_is_refused_at_open(store: Store, store_path: Path) -> None:
    """A different key gives WrongMasterKey at open, naming its source but no key material."""
    store.put("k", "api_key", Secret(VALUE))
    other = new_master("file /elsewhere/master.key")
    with pytest.raises(WrongMasterKey) as info:
        Store.open(store_path, other)
    text = str(info.value)
    assert "file /elsewhere/master.key" in text and str(store_path) in text
    assert other.key.hex() not in text
    assert base64.urlsafe_b64encode(other.key).decode() not in text


def test_swapped_ciphertexts_fail_naming_the_secret(store: Store, store_path: Path) -> None:
    """A ciphertext moved to another row does not decrypt; the error names the secret."""
    store.put("alpha", "api_key", Secret("value-alpha"))
    store.put("beta", "api_key", Secret("value-beta"))
    with raw_db(store_path) as db:
        rows = dict(
            (name, (nonce, ct))
            for name, nonce, ct in db.execute("SELECT name, nonce, ciphertext FROM secrets")
        )
        for name, other in (("alpha", "beta"), ("beta", "alpha")):
            db.execute(
                "UPDATE secrets SET nonce = ?, ciphertext = ? WHERE name = ?", (*rows[other], name)
            )
    db.close()
    with pytest.raises(StoreCorrupt) as info:
        store.get("alpha")
    assert "'alpha'" in str(info.value)
    assert_clean_message(info.value, store_path)
    assert "value-" not in str(info.value)
    with pytest.raises(StoreCorrupt, match="'beta'"):
        store.get("beta")


def test_changed_kind_fails_to_decrypt(store: Store, store_path: Path) -> None:
    """Editing a row's kind in the raw file makes it fail to decrypt."""
    store.put("tok", "oauth_access_token", Secret(VALUE))
    db = raw_db(store_path)
    db.execute("UPDATE secrets SET kind = 'oauth_refresh_token' WHERE name = 'tok'")
    db.close()
    with pytest.raises(StoreCorrupt, match="'tok'"):
        store.get("tok")
    with pytest.raises(StoreCorrupt):
        store.info()


def test_nonces_differ_between_writes_of_the_same_value(store: Store, store_path: Path) -> None:
    """Two writes of the same value use different nonces and give different ciphertexts."""
    seen = set()
    for _ in range(2):
        store.put("k", "api_key", Secret(VALUE))
        db = raw_db(store_path)
        seen.add(db.execute("SELECT nonce, ciphertext FROM secrets").fetchone())
        db.close()
    assert len({nonce for nonce, _ in seen}) == 2
    assert len({ct for _, ct in seen}) == 2


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_plaintext_never_reaches_the_disk(
    store: Store, store_path: Path, master: MasterKey
) -> None:
    """Neither a value nor a master key is in any file of the data dir, even after rekey."""
    store.put("k", "api_key", Secret(VALUE))
    store.put("k2", "client_secret", Secret(VALUE + "-2"))
    store.touch(["k"])
    store.rekey(new_master())
    store.put("k", "api_key", Secret(VALUE + "-3"))
    raw = all_bytes(store_path.parent)
    assert VALUE.encode() not in raw
    assert b"PLAINTEXT" not in raw
    assert master.key not in raw and store.master.key not in raw


def test_master_key_and_value_not_in_reprs(store: Store, master: MasterKey) -> None:
    """Neither a MasterKey's nor a Store's repr shows key material."""
    assert master.key.hex() not in repr(master)
    assert repr(master.key) not in repr(master)
    assert master.key.hex() not in repr(store)


# -- damaged files --------------------------------------------------------------


def make_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database at all\n" * 200)


def make_truncated(path: Path) -> None:
    with Store.create(path, new_master()) as created:
        for i in range(50):
            created.put(f"k{i}", "api_key", Secret("x" * 400))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_empty_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()


def make_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "damage", [make_garbage, make_truncated, make_empty_sqlite, make_zero_bytes]
)
def test_damaged_file_is_store_corrupt(tmp_path: Path, damage: object) -> None:
    """A non-SQLite, truncated, foreign or empty file gives a one-line StoreCorrupt naming it."""
    path = tmp_path / "store.db"
    damage(path)  # type: ignore[operator]
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt) as info:
        Store.open(path, new_master())
    assert_clean_message(info.value, path)
    assert "credproxy init" in str(info.value)
    with pytest.raises(StoreCorrupt):
        Store.read_kdf_params(path)
    assert path.read_bytes() == before  # a failed open writes nothing


def test_missing_meta_rows_are_corrupt(store: Store, store_path: Path, master: MasterKey) -> None:
    """A store whose key check value was deleted is reported corrupt, not opened."""
    store.close()
    db = raw_db(store_path)
    db.execute("DELETE FROM meta WHERE key = 'check'")
    db.close()
    with pytest.raises(StoreCorrupt):
        Store.open(store_path, master)


# -- change tracking ------------------------------------------------------------


def test_generation_seen_across_instances(
    store: Store, store_path: Path, master: MasterKey
) -> None:
    """A change made through one Store (the CLI) advances generation() in another (the daemon)."""
    with Store.open(store_path, master) as cli:
        seen = store.generation()
        cli.put("k", "api_key", Secret(VALUE))
        after_put = store.generation()
        assert after_put > seen
        assert store.get("k") == Secret(VALUE)
        cli.add_app_token("dash", hashlib.sha256(b"cpx_x").hexdigest())
        after_token = store.generation()
        assert after_token > after_put
        cli.revoke_app_tokens("dash")
        cli.remove("k")
        assert store.generation() > after_token
        assert store.get("k") is None


def test_touch_stamps_last_used_without_bumping_generation(store: Store) -> None:
    """touch() records last use of existing names and does not look like a config change."""
    store.put("k", "api_key", Secret(VALUE))
    before = store.generation()
    store.touch(["k", "unknown"])
    store.touch([])
    assert store.generation() == before
    (info,) = store.info()
    assert info.last_used_at is not None and info.last_used_at >= info.created_at


# -- rekey ----------------------------------------------------------------------


def test_rekey_round_trip_and_old_key_refused(
    store: Store, store_path: Path, master: MasterKey
) -> None:
    """After rekey every value opens under the new key and the old key is refused."""
    store.put("a", "api_key", Secret("value-a"))
    store.put("b", "oauth_refresh_token", Secret("value-b"))
    token = hashlib.sha256(b"cpx_token").hexdigest()
    store.add_app_token("dash", token)
    new = new_master("new key")
    assert store.master is master
    store.rekey(new)
    assert store.master is new
    assert store.get("a") == Secret("value-a")
    store.close()
    with pytest.raises(WrongMasterKey):
        Store.open(store_path, master)
    with Store.open(store_path, new) as reopened:
        assert reopened.get("b") == Secret("value-b")
        assert reopened.app_tokens() == {token: "dash"}


def test_rekey_is_atomic(
    store: Store, store_path: Path, master: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rekey that fails on the second row changes nothing: the old key still opens all."""
    for name in ("a", "b", "c"):
        store.put(name, "api_key", Secret(f"value-{name}"))
    generation = store.generation()
    real = store_module._encrypt

    def failing(aead: object, plaintext: bytes, ad: bytes) -> tuple[bytes, bytes]:
        if plaintext == b"value-b":
            raise RuntimeError("disk on fire")
        return real(aead, plaintext, ad)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_encrypt", failing)
    new = new_master("new key")
    with pytest.raises(RuntimeError):
        store.rekey(new)
    monkeypatch.undo()
    assert store.get("a") == Secret("value-a")  # the same instance keeps the old key
    assert store.master is master
    assert store.generation() == generation
    store.close()
    with pytest.raises(WrongMasterKey):
        Store.open(store_path, new)
    with Store.open(store_path, master) as reopened:
        for name in ("a", "b", "c"):
            assert reopened.get(name) == Secret(f"value-{name}")


def test_rekey_by_another_process_is_wrong_key_not_corruption(
    store: Store, store_path: Path, master: MasterKey
) -> None:
    """A Store whose file was re-keyed elsewhere reports WrongMasterKey and never writes."""
    store.put("k", "api_key", Secret(VALUE))
    with Store.open(store_path, master) as cli:
        cli.rekey(new_master("new key"))
    with pytest.raises(WrongMasterKey, match="re-keyed"):
        store.get("k")
    with pytest.raises(WrongMasterKey, match="re-keyed"):
        store.put("k2", "api_key", Secret(VALUE))


def test_rekey_moves_kdf_params(tmp_path: Path) -> None:
    """Re-keying from a passphrase to a key file drops the scrypt parameters, and back."""
    path = tmp_path / "store.db"
    phrase_key = derive_passphrase_key("correct horse", FAST_KDF)
    with Store.create(path, phrase_key) as created:
        assert Store.read_kdf_params(path) == FAST_KDF
        created.rekey(new_master())
        assert Store.read_kdf_params(path) is None
        created.rekey(derive_passphrase_key("battery staple", FAST_KDF))
        assert Store.read_kdf_params(path) == FAST_KDF


# -- input validation -----------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a\nb", "a\rb", "a\0b", "trailing\n"])
def test_bad_values_refused(store: Store, value: str) -> None:
    """Empty values and values with CR, LF or NUL are refused without echoing them."""
    with pytest.raises(ValueError) as info:
        store.put("k", "api_key", Secret(value))
    if value:
        assert value not in str(info.value)
    assert store.get("k") is None


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 129, "é", "a\n"])
def test_bad_names_refused(store: Store, name: str) -> None:
    """Secret names are 1-128 characters from [A-Za-z0-9._-]."""
    with pytest.raises(ValueError):
        store.put(name, "api_key", Secret(VALUE))


def test_bad_kind_refused(store: Store) -> None:
    """Only the four known kinds are stored."""
    with pytest.raises(ValueError, match="kind"):
        store.put("k", "password", Secret(VALUE))
    for kind in KINDS:
        store.put(f"k-{kind}", kind, Secret(VALUE))


# -- app tokens -----------------------------------------------------------------


def test_app_tokens_add_count_revoke(store: Store) -> None:
    """Token hashes are stored per app, counted, listed by hash, and revoked per app."""
    hashes = [hashlib.sha256(f"cpx_{i}".encode()).hexdigest() for i in range(3)]
    store.add_app_token("dashboard", hashes[0])
    store.add_app_token("dashboard", hashes[1].upper())  # normalised to lowercase
    store.add_app_token("summarizer", hashes[2])
    assert store.app_token_counts() == {"dashboard": 2, "summarizer": 1}
    assert store.app_tokens() == {
        hashes[0]: "dashboard",
        hashes[1]: "dashboard",
        hashes[2]: "summarizer",
    }
    assert store.revoke_app_tokens("dashboard") == 2
    assert store.revoke_app_tokens("dashboard") == 0
    assert store.app_token_counts() == {"summarizer": 1}
    with pytest.raises(ValueError):
        store.add_app_token("dashboard", "not-a-hash")


def test_app_token_rows_cannot_be_forged(store: Store, store_path: Path) -> None:
    """A token row moved to another app in the raw file is reported, not trusted."""
    digest = hashlib.sha256(b"cpx_dash").hexdigest()
    store.add_app_token("dashboard", digest)
    db = raw_db(store_path)
    db.execute("UPDATE app_tokens SET app = 'admin'")
    db.close()
    with pytest.raises(StoreCorrupt, match="'admin'"):
        store.app_tokens()


# -- daemon lock ----------------------------------------------------------------


def test_daemon_lock_held_twice(store: Store, store_path: Path, master: MasterKey) -> None:
    """A second daemon lock on the same store fails with a StoreError naming the lock."""
    store.lock_for_daemon()
    store.lock_for_daemon()  # the holder may ask again
    with Store.open(store_path, master) as second:
        with pytest.raises(StoreError) as info:
            second.lock_for_daemon()
        assert str(info.value) == (
            f"another credproxy daemon is using store {store_path} (lock {store_path}.lock)"
        )
        store.close()
        second.lock_for_daemon()  # released by close()


# -- master key: files ----------------------------------------------------------


def test_create_key_file_mode_and_no_overwrite(tmp_path: Path) -> None:
    """A new key file is 0600 in 0700 dirs even under umask 0, and is never overwritten."""
    path = tmp_path / "cfg" / "credproxy" / "master.key"
    old = os.umask(0)
    try:
        create_key_file(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    content = path.read_bytes()
    assert content.endswith(b"\n") and len(base64.urlsafe_b64decode(content.strip())) == 32
    with pytest.raises(MasterKeyError, match="already exists"):
        create_key_file(path)
    assert path.read_bytes() == content
    assert load_key_file(path).key == base64.urlsafe_b64decode(content.strip())


def write_key(path: Path, data: bytes, file_mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, file_mode)
    return path


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: base64.urlsafe_b64encode(k) + b"\n",
        lambda k: base64.b64encode(k),
        lambda k: base64.urlsafe_b64encode(k).rstrip(b"="),
        lambda k: k.hex().encode() + b"\n",
        lambda k: k,
    ],
    ids=["urlsafe", "std", "unpadded", "hex", "raw"],
)
def test_key_file_formats(tmp_path: Path, encode: object) -> None:
    """A key file may hold base64 (urlsafe or standard), 64 hex characters or 32 raw bytes."""
    key = bytes(range(250, 256)) + os.urandom(26)  # exercise the + / - _ alphabets
    path = write_key(tmp_path / "k", encode(key))  # type: ignore[operator]
    assert load_key_file(path).key == key


@pytest.mark.parametrize(
    "data",
    [b"", b"short", b"x" * 44, b"\xff" * 40, b"ab" * 5000],
    ids=["empty", "short", "44-chars", "binary", "huge"],
)
def test_bad_key_file_refused(tmp_path: Path, data: bytes) -> None:
    """A key file without a 32-byte key is refused naming the file, not its content."""
    path = write_key(tmp_path / "bad.key", data)
    with pytest.raises(MasterKeyError) as info:
        load_key_file(path)
    assert str(path) in str(info.value)
    shown = data.decode(errors="ignore")
    if len(shown) >= 4:
        assert shown[:4] not in str(info.value).replace(str(path), "")


def test_group_readable_key_file_refused(tmp_path: Path) -> None:
    """A key file other users may read is refused with the chmod 600 fix."""
    path = write_key(tmp_path / "master.key", os.urandom(32).hex().encode(), 0o640)
    with pytest.raises(MasterKeyError) as info:
        load_key_file(path)
    assert f"chmod 600 {path}" in str(info.value)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        resolve_master_key({"CREDPROXY_MASTER_KEY_FILE": str(path)}, kdf_params=None)


# -- master key: resolution order -----------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """One key of each kind on disk: explicit file, systemd credential, default file."""
    home = tmp_path / "home"
    explicit = tmp_path / "explicit.key"
    cred_dir = tmp_path / "creds"
    cred_dir.mkdir()
    default = home / ".config" / "credproxy" / "master.key"
    create_key_file(explicit)
    create_key_file(cred_dir / "credproxy.key")
    os.chmod(cred_dir / "credproxy.key", 0o440)  # systemd may show group bits; allowed
    create_key_file(default)
    return {"home": home, "explicit": explicit, "creds": cred_dir, "default": default}


def test_resolution_order(sources: dict[str, Path]) -> None:
    """Explicit key file, then systemd credential, then passphrase, then the default file."""
    env = {
        "HOME": str(sources["home"]),
        "CREDPROXY_MASTER_KEY_FILE": str(sources["explicit"]),
        "CREDENTIALS_DIRECTORY": str(sources["creds"]),
        "CREDPROXY_PASSPHRASE": "hunter2 hunter2",
    }
    got = resolve_master_key(env, kdf_params=FAST_KDF)
    assert got.source == f"file {sources['explicit']}"
    assert got.key == load_key_file(sources["explicit"]).key

    del env["CREDPROXY_MASTER_KEY_FILE"]
    got = resolve_master_key(env, kdf_params=FAST_KDF)
    assert got.source == f"systemd credential {sources['creds'] / 'credproxy.key'}"

    del env["CREDENTIALS_DIRECTORY"]
    got = resolve_master_key(env, kdf_params=FAST_KDF)
    assert got.source == "passphrase" and got.kdf_params == FAST_KDF

    del env["CREDPROXY_PASSPHRASE"]
    got = resolve_master_key(env, kdf_params=None)
    assert got.source == f"file {sources['default']}"
    assert default_key_file(env) == sources["default"]


def test_explicit_key_file_must_exist(tmp_path: Path, sources: dict[str, Path]) -> None:
    """A CREDPROXY_MASTER_KEY_FILE that does not exist is an error naming it, not a fallback."""
    missing = tmp_path / "missing.key"
    env = {"HOME": str(sources["home"]), "CREDPROXY_MASTER_KEY_FILE": str(missing)}
    with pytest.raises(MasterKeyError) as info:
        resolve_master_key(env, kdf_params=None)
    assert str(missing) in str(info.value)
    assert default_key_file(env) == missing


def test_credentials_directory_without_our_key_falls_through(sources: dict[str, Path]) -> None:
    """A systemd credentials directory that lacks credproxy.key is skipped."""
    (sources["creds"] / "credproxy.key").unlink()
    env = {"HOME": str(sources["home"]), "CREDENTIALS_DIRECTORY": str(sources["creds"])}
    assert resolve_master_key(env, kdf_params=None).source == f"file {sources['default']}"


def test_nothing_found(tmp_path: Path) -> None:
    """With no source at all the error tells the user to init or set a variable."""
    with pytest.raises(MasterKeyError) as info:
        resolve_master_key({"HOME": str(tmp_path)}, kdf_params=None)
    assert str(info.value) == (
        "no master key: run `credproxy init`, "
        "or set CREDPROXY_MASTER_KEY_FILE / CREDPROXY_PASSPHRASE"
    )


def test_passphrase_store_end_to_end(tmp_path: Path) -> None:
    """A passphrase-protected store keeps its scrypt params and opens from the passphrase only."""
    path = tmp_path / "store.db"
    env = {"HOME": str(tmp_path), "CREDPROXY_PASSPHRASE": "correct horse battery"}
    key = resolve_master_key(env, kdf_params=FAST_KDF)
    with Store.create(path, key) as created:
        created.put("k", "api_key", Secret(VALUE))
    params = Store.read_kdf_params(path)
    assert params == FAST_KDF
    again = resolve_master_key(env, kdf_params=params)
    assert again.key == key.key
    with Store.open(path, again) as opened:
        assert opened.get("k") == Secret(VALUE)
    wrong = resolve_master_key({**env, "CREDPROXY_PASSPHRASE": "wrong"}, kdf_params=params)
    with pytest.raises(WrongMasterKey, match="passphrase"):
        Store.open(path, wrong)


def test_passphrase_prompt(tmp_path: Path) -> None:
    """The prompt is asked only for a passphrase-protected store, and an empty answer is refused."""
    asked: list[str] = []

    def prompt(message: str) -> str:
        asked.append(message)
        return "typed passphrase"

    env = {"HOME": str(tmp_path)}
    key = resolve_master_key(env, kdf_params=FAST_KDF, prompt=prompt)
    assert key.source == "passphrase" and len(asked) == 1
    assert key.key == derive_passphrase_key("typed passphrase", FAST_KDF).key
    with pytest.raises(MasterKeyError, match="no master key"):
        resolve_master_key(env, kdf_params=None, prompt=prompt)
    assert len(asked) == 1
    with pytest.raises(MasterKeyError, match="empty"):
        resolve_master_key(env, kdf_params=FAST_KDF, prompt=lambda _: "")
    with pytest.raises(MasterKeyError, match="CREDPROXY_PASSPHRASE"):
        resolve_master_key(env, kdf_params=FAST_KDF)


def test_passphrase_without_stored_params_refused(tmp_path: Path) -> None:
    """CREDPROXY_PASSPHRASE for a store made with a key file is an error, not a new key."""
    env = {"HOME": str(tmp_path), "CREDPROXY_PASSPHRASE": "pw"}
    with pytest.raises(MasterKeyError, match="not created with a passphrase"):
        resolve_master_key(env, kdf_params=None)


def test_new_kdf_params() -> None:
    """New scrypt parameters are n=2**17, r=8, p=1 with a fresh 16-byte salt."""
    a, b = new_kdf_params(), new_kdf_params()
    assert (a.n, a.r, a.p, len(a.salt)) == (2**17, 8, 1, 16)
    assert a.salt != b.salt
    assert KdfParams.decode(a.encode()) == a


@pytest.mark.parametrize(
    ("n", "r", "p", "salt"),
    [
        (2**10, 8, 1, 16),
        (2**14, 1, 1, 16),
        (2**14, 8, 0, 16),
        (2**14, 8, 1, 4),
        (3 * 2**14, 8, 1, 16),
        (2**24, 8, 1, 16),
        (2**14, 8, 64, 16),
    ],
)
def test_weak_or_absurd_kdf_params_refused(n: int, r: int, p: int, salt: int) -> None:
    """scrypt parameters below the floor (or absurdly high) are refused as tampered."""
    with pytest.raises(MasterKeyError, match="tampered"):
        KdfParams(salt=b"s" * salt, n=n, r=r, p=p)


def test_tampered_kdf_params_in_store_refused(tmp_path: Path) -> None:
    """A store whose scrypt parameters were weakened on disk is reported, not used."""
    path = tmp_path / "store.db"
    with Store.create(path, derive_passphrase_key("pw", FAST_KDF)):
        pass
    weak = FAST_KDF.encode().replace('"n": 16384', '"n": 1024')
    db = raw_db(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'kdf'", (weak,))
    db.close()
    with pytest.raises(StoreCorrupt, match="scrypt"):
        Store.read_kdf_params(path)
