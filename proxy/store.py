"""The encrypted store: secrets and app-token hashes in one SQLite file, 0600 in a 0700 dir.

Every secret is sealed with AES-256-GCM under a key derived from the master key, a fresh
nonce per write, and associated data binding it to its name and kind. The store must never
hold or print a plaintext secret, and a half-done change must never take effect: every
change is one SQLite transaction, and a damaged file is reported, not half-read.

    StoreError          one line naming the file and the fix
    ├── StoreMissing    no store at the path
    ├── StoreCorrupt    not SQLite, not ours, truncated, or a row that fails to decrypt
    └── WrongMasterKey  the key does not open this store (or it was re-keyed meanwhile)
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.masterkey import (
    CREDENTIAL_NAME,
    ENV_KEY_FILE,
    ENV_PASSPHRASE,
    KdfParams,
    MasterKey,
    MasterKeyError,
    make_private_dirs,
)
from proxy.secret import Secret

KINDS = ("api_key", "client_secret", "oauth_refresh_token", "oauth_access_token")
SCHEMA_VERSION = 1
NONCE_BYTES = 12
MAX_VALUE_CHARS = 65536  # far above any real token; keeps a pasted file out of the store
BUSY_TIMEOUT_MS = 5000

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_APP = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_FORBIDDEN_IN_VALUE = ("\r", "\n", "\0")

_AD_PREFIX = b"credproxy/v1\0"
_CHECK_AD = b"credproxy/v1\0check"
_CHECK_LABEL = b"credproxy master key check"
_TABLES = ("meta", "secrets", "app_tokens")
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)",
    "CREATE TABLE secrets ("
    " name TEXT PRIMARY KEY, kind TEXT NOT NULL,"
    " nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,"
    " created_at REAL NOT NULL, updated_at REAL NOT NULL, last_used_at REAL)",
    # hashes are not secret, but a row must not be forgeable without the key: mac column
    "CREATE TABLE app_tokens ("
    " token_sha256 TEXT PRIMARY KEY, app TEXT NOT NULL,"
    " created_at REAL NOT NULL, mac BLOB NOT NULL)",
    "CREATE INDEX app_tokens_by_app ON app_tokens (app)",
)


class StoreError(Exception):
    """A store problem the user can fix; `str()` is one line naming the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class StoreMissing(StoreError):
    """There is no store file at the configured path."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no store at {path}: run `credproxy init`")
        self.path = path


class StoreCorrupt(StoreError):
    """The file is not a credproxy store, or part of it fails its integrity check."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"store {path} is corrupted or not a credproxy store ({detail}): "
            "restore it from a backup or move it away and run `credproxy init`"
        )
        self.path = path


class WrongMasterKey(StoreError):
    """The master key does not open this store."""

    def __init__(self, path: Path, source: str, *, rekeyed: bool = False) -> None:
        if rekeyed:
            message = (
                f"the master key ({source}) no longer opens store {path}: "
                "it was re-keyed by another process; restart with the new master key"
            )
        else:
            message = (
                f"the master key ({source}) does not open store {path}: use the key it was "
                f"created with ({ENV_KEY_FILE}, $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}, "
                f"{ENV_PASSPHRASE} or ~/.config/credproxy/master.key)"
            )
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class SecretInfo:
    """What `credproxy keys list` shows about a secret: never its value."""

    name: str
    kind: str
    fingerprint: str  # Secret.fingerprint(): short, not a prefix of the value
    created_at: float  # epoch seconds
    updated_at: float
    last_used_at: float | None  # None until the daemon first injects it


@dataclass(frozen=True)
class _Keys:
    """Subkeys derived from one master key, so AES-GCM and HMAC never share a key."""

    aead: AESGCM = field(repr=False)
    mac_key: bytes = field(repr=False)
    source: str

    @classmethod
    def derive(cls, master: MasterKey) -> _Keys:
        return cls(
            aead=AESGCM(_hkdf(master.key, b"credproxy/v1 secrets")),
            mac_key=_hkdf(master.key, b"credproxy/v1 app-tokens"),
            source=master.source,
        )


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _encrypt(aead: AESGCM, plaintext: bytes, ad: bytes) -> tuple[bytes, bytes]:
    """Seal under a fresh random nonce; returns (nonce, ciphertext+tag)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, aead.encrypt(nonce, plaintext, ad)


def _secret_ad(kind: str, name: str) -> bytes:
    # a ciphertext copied to another row, or a row whose kind was edited, fails to decrypt
    return _AD_PREFIX + kind.encode() + b"\0" + name.encode()


def _token_mac(mac_key: bytes, app: str, token_sha256: str) -> bytes:
    message = _AD_PREFIX + b"app-token\0" + app.encode() + b"\0" + token_sha256.encode()
    return hmac.new(mac_key, message, hashlib.sha256).digest()


def _make_check(keys: _Keys) -> bytes:
    nonce, sealed = _encrypt(keys.aead, _CHECK_LABEL, _CHECK_AD)
    return nonce + sealed


def _check_opens(keys: _Keys, blob: object) -> bool:
    if not isinstance(blob, bytes) or len(blob) <= NONCE_BYTES:
        return False
    try:
        label = keys.aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _CHECK_AD)
    except InvalidTag:
        return False
    return hmac.compare_digest(label, _CHECK_LABEL)


class Store:
    """An open store. Writes are single transactions; `generation()` sees other processes."""

    path: Path

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        master: MasterKey,
        keys: _Keys,
        check_blob: bytes,
    ) -> None:
        """Use `Store.create` or `Store.open`."""
        self.path = path
        self._conn = conn
        self._master = master
        self._keys = keys
        self._check_blob = check_blob
        self._lock = threading.RLock()
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def master(self) -> MasterKey:
        """The master key this store is open with (its `source` says where it came from)."""
        return self._master

    # -- opening --------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, master: MasterKey, *, kdf_params: KdfParams | None = None) -> Store:
        """Create a new store (file 0600, new dirs 0700); refuse if anything is at `path`.

        The scrypt parameters kept in the store are `kdf_params`, else the master key's own
        (set when it was stretched from a passphrase), else none.
        """
        if kdf_params is not None and master.kdf_params not in (None, kdf_params):
            raise ValueError("kdf_params differ from the ones the master key was derived with")
        params = kdf_params or master.kdf_params
        exists = StoreError(
            f"a store already exists at {path}: use it, or move it away before `credproxy init`"
        )
        if os.path.lexists(path):
            raise exists
        try:
            make_private_dirs(path.parent)
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)  # final mode from the start; sqlite comes after
        except FileExistsError:
            raise exists from None
        except OSError as exc:
            raise StoreError(
                f"cannot create store {path} ({exc.strerror}): check the directory's permissions"
            ) from None
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

        keys = _Keys.derive(master)
        check = _make_check(keys)
        try:
            conn = _connect(path, "rw")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        try:
            with _sqlite_errors(path):
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                meta: list[tuple[str, object]] = [
                    ("schema_version", SCHEMA_VERSION),
                    ("generation", 1),
                    ("created_at", time.time()),
                    ("check", check),
                ]
                if params is not None:
                    meta.append(("kdf", params.encode()))
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta)
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            path.unlink(missing_ok=True)
            raise
        return cls(path, conn, master, keys, check)

    @classmethod
    def open(cls, path: Path, master: MasterKey) -> Store:
        """Open an existing store; StoreMissing, StoreCorrupt or WrongMasterKey if it can't."""
        _require_file(path)
        conn = _connect(path, "rw")
        try:
            with _sqlite_errors(path):
                _validate(conn, path)
                check = _meta(conn, "check")
            keys = _Keys.derive(master)
            if not isinstance(check, bytes) or not _check_opens(keys, check):
                raise WrongMasterKey(path, master.source)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, master, keys, check)

    @staticmethod
    def read_kdf_params(path: Path) -> KdfParams | None:
        """The store's scrypt parameters, read without a key; None if it uses a key file."""
        _require_file(path)
        conn = _connect(path, "ro")
        try:
            with _sqlite_errors(path):
                _validate(conn, path)
                raw = _meta(conn, "kdf")
        finally:
            conn.close()
        if raw is None:
            return None
        if not isinstance(raw, str):
            raise StoreCorrupt(path, "its scrypt parameters are malformed")
        try:
            return KdfParams.decode(raw)
        except MasterKeyError:
            raise StoreCorrupt(path, "its scrypt parameters are weak or malformed") from None

    def close(self) -> None:
        """Close the database and release the daemon lock; safe to call twice."""
        with self._lock:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def lock_for_daemon(self) -> None:
        """Hold `<store>.lock` (flock) while this Store lives, so two daemons never share it."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        with self._lock:
            if self._lock_fd is not None:
                return
            try:
                fd = os.open(
                    lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StoreError(
                    f"cannot create lock {lock_path} for store {self.path} ({exc.strerror}): "
                    "check the directory's permissions"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(
                    f"another credproxy daemon is using store {self.path} (lock {lock_path})"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise StoreError(
                    f"cannot lock store {self.path} ({lock_path}: {exc.strerror})"
                ) from None
            self._lock_fd = fd

    # -- secrets --------------------------------------------------------------

    def put(self, name: str, kind: str, value: Secret) -> None:
        """Insert or replace a secret; ValueError for a bad name, kind or value."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError("a secret name is 1-128 characters from A-Z a-z 0-9 . _ -")
        if kind not in KINDS:
            raise ValueError(f"unknown secret kind {kind!r}: one of {', '.join(KINDS)}")
        plaintext = _value_bytes(value)
        with self._write() as conn:
            nonce, sealed = _encrypt(self._keys.aead, plaintext, _secret_ad(kind, name))
            now = time.time()
            conn.execute(
                "INSERT INTO secrets (name, kind, nonce, ciphertext, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET kind = excluded.kind,"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
                " updated_at = excluded.updated_at",
                (name, kind, nonce, sealed, now, now),
            )

    def get(self, name: str) -> Secret | None:
        """The secret's value, or None if there is no such secret."""
        entry = self.get_entry(name)
        return None if entry is None else entry[1]

    def get_entry(self, name: str) -> tuple[str, Secret] | None:
        """(kind, value) of a secret, or None if there is no such secret."""
        with self._lock, _sqlite_errors(self.path):
            row = self._conn.execute(
                "SELECT name, kind, nonce, ciphertext FROM secrets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return None
        kind = _text(row[1], self.path)
        return kind, Secret(self._unseal(row))

    def info(self) -> list[SecretInfo]:
        """Every secret's name, kind, fingerprint and dates, sorted by name."""
        with self._lock, _sqlite_errors(self.path):
            rows = self._conn.execute(
                "SELECT name, kind, nonce, ciphertext, created_at, updated_at, last_used_at"
                " FROM secrets ORDER BY name"
            ).fetchall()
        result = []
        for row in rows:
            value = Secret(self._unseal(row))  # decrypting also proves the row is intact
            result.append(
                SecretInfo(
                    name=_text(row[0], self.path),
                    kind=_text(row[1], self.path),
                    fingerprint=value.fingerprint(),
                    created_at=_number(row[4], self.path),
                    updated_at=_number(row[5], self.path),
                    last_used_at=None if row[6] is None else _number(row[6], self.path),
                )
            )
        return sorted(result, key=lambda info: info.name)

    def remove(self, name: str) -> bool:
        """Delete a secret; False if there was none."""
        with self._write() as conn:
            return conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount > 0

    def touch(self, names: Iterable[str]) -> None:
        """Stamp `last_used_at` now; usage stamps do not advance `generation()`."""
        now = time.time()
        params = [(now, name) for name in set(names)]
        if not params:
            return
        with self._write(bump=False) as conn:
            conn.executemany("UPDATE secrets SET last_used_at = ? WHERE name = ?", params)

    # -- app tokens -----------------------------------------------------------

    def add_app_token(self, app: str, token_sha256: str) -> None:
        """Register the SHA-256 (lowercase hex) of a new app token for `app`."""
        if not isinstance(app, str) or not _APP.fullmatch(app):
            raise ValueError("an app name is 1-128 printable characters")
        digest = token_sha256.lower() if isinstance(token_sha256, str) else ""
        if not _SHA256_HEX.fullmatch(digest):
            raise ValueError("token_sha256 must be 64 hex characters")
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO app_tokens (token_sha256, app, created_at, mac)"
                " VALUES (?, ?, ?, ?)",
                (digest, app, time.time(), _token_mac(self._keys.mac_key, app, digest)),
            )

    def app_tokens(self) -> dict[str, str]:
        """sha256 hex -> app name, for every stored token (each checked against its MAC)."""
        with self._lock, _sqlite_errors(self.path):
            rows = self._conn.execute("SELECT token_sha256, app, mac FROM app_tokens").fetchall()
        tokens: dict[str, str] = {}
        for row in rows:
            digest, app = _text(row[0], self.path), _text(row[1], self.path)
            if not self._token_row_ok(self._keys, digest, app, row[2]):
                raise self._integrity_failure(f"the token entry of app {app!r} was altered")
            tokens[digest] = app
        return tokens

    def revoke_app_tokens(self, app: str) -> int:
        """Delete every stored token of `app`; returns how many there were."""
        with self._write() as conn:
            return conn.execute("DELETE FROM app_tokens WHERE app = ?", (app,)).rowcount

    def app_token_counts(self) -> dict[str, int]:
        """App name -> number of stored tokens."""
        return dict(Counter(self.app_tokens().values()))

    # -- change tracking and re-keying ----------------------------------------

    def generation(self) -> int:
        """A counter every committed change advances, whichever process made it."""
        with self._lock, _sqlite_errors(self.path):
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        if row is None or type(row[0]) is not int:
            raise StoreCorrupt(self.path, "its generation counter is missing")
        return row[0]

    def rekey(self, new: MasterKey, *, kdf_params: KdfParams | None = None) -> None:
        """Re-encrypt everything under `new` in one transaction; on failure nothing changes.

        The store keeps `kdf_params` (or the new key's own) and drops any old ones, so a
        store moved from a passphrase to a key file stops asking for the passphrase.
        """
        if kdf_params is not None and new.kdf_params not in (None, kdf_params):
            raise ValueError("kdf_params differ from the ones the new key was derived with")
        params = kdf_params or new.kdf_params
        new_keys = _Keys.derive(new)
        new_check = _make_check(new_keys)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT name, kind, nonce, ciphertext FROM secrets ORDER BY name"
            ).fetchall()
            for row in rows:
                name, kind = _text(row[0], self.path), _text(row[1], self.path)
                plaintext = self._unseal(row).encode()
                nonce, sealed = _encrypt(new_keys.aead, plaintext, _secret_ad(kind, name))
                conn.execute(
                    "UPDATE secrets SET nonce = ?, ciphertext = ? WHERE name = ?",
                    (nonce, sealed, name),
                )
            tokens = conn.execute("SELECT token_sha256, app, mac FROM app_tokens").fetchall()
            for row in tokens:
                digest, app = _text(row[0], self.path), _text(row[1], self.path)
                if not self._token_row_ok(self._keys, digest, app, row[2]):
                    raise self._integrity_failure(f"the token entry of app {app!r} was altered")
                conn.execute(
                    "UPDATE app_tokens SET mac = ? WHERE token_sha256 = ?",
                    (_token_mac(new_keys.mac_key, app, digest), digest),
                )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'check'", (new_check,))
            conn.execute("DELETE FROM meta WHERE key = 'kdf'")
            if params is not None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('kdf', ?)", (params.encode(),))
        self._master = new
        self._keys = new_keys
        self._check_blob = new_check

    # -- internals ------------------------------------------------------------

    @contextmanager
    def _write(self, *, bump: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the body's changes and the generation bump, or nothing."""
        with self._lock, _sqlite_errors(self.path):
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._ensure_key_current(conn)
                yield conn
                if bump:
                    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _ensure_key_current(self, conn: sqlite3.Connection) -> None:
        # another process may have re-keyed the store since we opened it: never write a row
        # under a key the rest of the store no longer uses
        blob = _meta(conn, "check")
        if blob == self._check_blob:
            return
        if not _check_opens(self._keys, blob):
            raise WrongMasterKey(self.path, self._keys.source, rekeyed=True)
        assert isinstance(blob, bytes)  # _check_opens accepted it
        self._check_blob = blob

    def _unseal(self, row: Any) -> str:
        name, kind = _text(row[0], self.path), _text(row[1], self.path)
        nonce, sealed = row[2], row[3]
        what = f"secret {name!r} does not decrypt: its row was altered or moved"
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise StoreCorrupt(self.path, what)
        if not isinstance(sealed, bytes):
            raise StoreCorrupt(self.path, what)
        try:
            plaintext = self._keys.aead.decrypt(nonce, sealed, _secret_ad(kind, name))
            return plaintext.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise self._integrity_failure(what) from None

    @staticmethod
    def _token_row_ok(keys: _Keys, digest: str, app: str, mac: object) -> bool:
        if not isinstance(mac, bytes):
            return False
        return hmac.compare_digest(mac, _token_mac(keys.mac_key, app, digest))

    def _integrity_failure(self, detail: str) -> StoreError:
        """WrongMasterKey if another process re-keyed the store under us, else StoreCorrupt."""
        with self._lock, _sqlite_errors(self.path):
            blob = _meta(self._conn, "check")
        if blob != self._check_blob and not _check_opens(self._keys, blob):
            return WrongMasterKey(self.path, self._keys.source, rekeyed=True)
        return StoreCorrupt(self.path, detail)


# -- module helpers -----------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _value_bytes(value: Secret) -> bytes:
    if not isinstance(value, Secret):
        raise TypeError("a secret value must be a Secret")
    raw = value.reveal()
    if not raw:
        raise ValueError("a secret value cannot be empty")
    if any(ch in raw for ch in _FORBIDDEN_IN_VALUE):
        raise ValueError("a secret value cannot contain CR, LF or NUL")
    if len(raw) > MAX_VALUE_CHARS:
        raise ValueError(f"a secret value is at most {MAX_VALUE_CHARS} characters")
    try:
        return raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a secret value must be valid text") from None


def _require_file(path: Path) -> None:
    if not os.path.lexists(path):
        raise StoreMissing(path)
    if path.is_dir():
        raise StoreError(f"store {path} is a directory: point `store:` at a file inside it")


def _connect(path: Path, mode: Literal["rw", "ro"]) -> sqlite3.Connection:
    """A connection that never creates a file, with the durability settings the store needs."""
    uri = "file:" + urllib.parse.quote(str(path.absolute())) + f"?mode={mode}"
    with _sqlite_errors(path):
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,
        )
    try:
        with _sqlite_errors(path):
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA trusted_schema = OFF")
            if mode == "rw":
                # DELETE journal: one file besides the store, created by sqlite with its mode
                conn.execute("PRAGMA journal_mode = DELETE").fetchall()
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA secure_delete = ON")  # old ciphertexts are zeroed
    except BaseException:
        conn.close()
        raise
    return conn


def _validate(conn: sqlite3.Connection, path: Path) -> None:
    """StoreCorrupt unless the file is an intact SQLite database with our schema."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [table for table in _TABLES if table not in tables]
    if missing:
        if len(missing) == len(_TABLES):
            raise StoreCorrupt(path, "it has no credproxy tables")
        raise StoreCorrupt(path, f"table {missing[0]} is missing")
    version = _meta(conn, "schema_version")
    if type(version) is not int or version < 1:
        raise StoreCorrupt(path, "its schema version is missing")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} was written by a newer credproxy (schema {version}): upgrade credproxy"
        )
    problems = conn.execute("PRAGMA quick_check").fetchall()
    if problems != [("ok",)]:
        raise StoreCorrupt(path, f"integrity check: {_one_line(str(problems[0][0]))}")
    if type(_meta(conn, "generation")) is not int:
        raise StoreCorrupt(path, "its generation counter is missing")
    if _meta(conn, "check") is None:
        raise StoreCorrupt(path, "its key check value is missing")


def _meta(conn: sqlite3.Connection, key: str) -> object:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _text(value: object, path: Path) -> str:
    if not isinstance(value, str):
        raise StoreCorrupt(path, "a row holds a value of the wrong type")
    return value


def _number(value: object, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StoreCorrupt(path, "a row holds a value of the wrong type")
    return float(value)


@contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """Turn sqlite3 errors into StoreError subclasses; programming errors pass through."""
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise _map_sqlite_error(path, exc) from None


def _map_sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    name = getattr(exc, "sqlite_errorname", None) or ""
    detail = _one_line(str(exc)) or name or "unreadable"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreError(
            f"store {path} is locked by another process (waited {BUSY_TIMEOUT_MS // 1000} s): "
            "try again"
        )
    if name.startswith("SQLITE_READONLY"):
        return StoreError(
            f"cannot write store {path} ({detail}): check the permissions of it and its directory"
        )
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return StoreError(
            f"cannot open store {path} ({detail}): check that it and its directory are yours"
        )
    if name.startswith("SQLITE_FULL"):
        return StoreError(f"cannot write store {path}: the disk is full; free some space")
    if name == "SQLITE_IOERR_SHORT_READ":
        return StoreCorrupt(path, "the file is truncated")
    if name.startswith(("SQLITE_IOERR", "SQLITE_NOMEM")):
        return StoreError(f"cannot use store {path} ({detail}): check the disk and try again")
    return StoreCorrupt(path, detail)
