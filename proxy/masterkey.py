"""Where the master key comes from: a key file, a systemd credential or a passphrase.

`resolve_master_key` walks the sources in the order the SPEC gives and returns
the first key found, with a label saying where it came from. Key material must
never appear in a message, a repr or a file readable by anyone but its owner.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import shlex
import stat
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

KEY_BYTES = 32
ENV_KEY_FILE = "CREDPROXY_MASTER_KEY_FILE"
ENV_PASSPHRASE = "CREDPROXY_PASSPHRASE"  # noqa: S105 (a variable name)
ENV_CREDENTIALS_DIR = "CREDENTIALS_DIRECTORY"
CREDENTIAL_NAME = "credproxy.key"

# scrypt floor: anything weaker in a store was not written by us (tampering or a bug).
MIN_SCRYPT_N = 2**14
MIN_SCRYPT_R = 8
MIN_SALT_BYTES = 16
# ceiling: a tampered store must not make us allocate gigabytes or spin for minutes.
MAX_SCRYPT_MEMORY = 2**30  # 128 * r * n bytes
MAX_SCRYPT_P = 16

_MAX_KEY_FILE_BYTES = 4096
_NO_KEY = f"no master key: run `credproxy init`, or set {ENV_KEY_FILE} / {ENV_PASSPHRASE}"


class MasterKeyError(Exception):
    """No usable master key; the one-line message names the cause and the fix."""


@dataclass(frozen=True)
class KdfParams:
    """scrypt salt and cost parameters, stored beside a passphrase-protected store."""

    salt: bytes  # random, not secret
    n: int  # CPU/memory cost, a power of two
    r: int  # block size
    p: int  # parallelism

    def __post_init__(self) -> None:
        fields_ok = (
            isinstance(self.salt, bytes)
            and all(type(v) is int for v in (self.n, self.r, self.p))
            and self.n > 1
            and self.n & (self.n - 1) == 0
        )
        if not fields_ok:
            raise MasterKeyError(
                "malformed scrypt parameters: the store's KDF settings look tampered with; "
                "restore the store from a backup"
            )
        shown = f"n={self.n}, r={self.r}, p={self.p}, salt {len(self.salt)} bytes"
        if (
            self.n < MIN_SCRYPT_N
            or self.r < MIN_SCRYPT_R
            or self.p < 1
            or len(self.salt) < MIN_SALT_BYTES
        ):
            raise MasterKeyError(
                f"scrypt parameters ({shown}) are below the minimum "
                f"(n>=2**14, r>=8, p>=1, salt>=16 bytes): they look weakened or tampered with; "
                "restore the store from a backup"
            )
        if 128 * self.r * self.n > MAX_SCRYPT_MEMORY or self.p > MAX_SCRYPT_P:
            raise MasterKeyError(
                f"scrypt parameters ({shown}) are above the maximum "
                "(128*r*n <= 1 GiB, p <= 16): they look tampered with; "
                "restore the store from a backup"
            )

    def encode(self) -> str:
        """The JSON text the store keeps in its meta table."""
        salt = base64.b64encode(self.salt).decode("ascii")
        return json.dumps({"alg": "scrypt", "salt": salt, "n": self.n, "r": self.r, "p": self.p})

    @classmethod
    def decode(cls, text: str) -> KdfParams:
        """Parse `encode()`'s output; MasterKeyError if it is malformed or weak."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("alg") != "scrypt":
                raise ValueError("not scrypt")
            salt = base64.b64decode(str(raw["salt"]), validate=True)
            return cls(salt=salt, n=raw["n"], r=raw["r"], p=raw["p"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise MasterKeyError(
                "malformed scrypt parameters: the store's KDF settings look tampered with; "
                "restore the store from a backup"
            ) from None


def new_kdf_params() -> KdfParams:
    """Fresh parameters for a new passphrase-protected store (about 0.4 s, 128 MiB)."""
    return KdfParams(salt=secrets.token_bytes(16), n=2**17, r=8, p=1)


@dataclass(frozen=True)
class MasterKey:
    """The 32-byte store key and a label of where it came from (safe to show)."""

    key: bytes = field(repr=False)
    source: str  # e.g. "file /x/master.key", "systemd credential /run/...", "passphrase"
    # set when the key was stretched from a passphrase: the store must keep these
    kdf_params: KdfParams | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"a master key is {KEY_BYTES} bytes")


def default_key_file(env: Mapping[str, str]) -> Path:
    """`$CREDPROXY_MASTER_KEY_FILE` if set, else `~/.config/credproxy/master.key`."""
    named = env.get(ENV_KEY_FILE)
    if named:
        return Path(named).expanduser()
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".config" / "credproxy" / "master.key"


def make_private_dirs(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700; existing ones are left alone."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # the umask may have taken bits away; make it exact


def create_key_file(path: Path) -> None:
    """Write a new random key (urlsafe base64 + newline) to `path`, mode 0600, never overwriting."""
    make_private_dirs(path.parent)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise MasterKeyError(
            f"key file {path} already exists: refusing to overwrite it "
            "(it may be the only key to an existing store); move it away first"
        ) from None
    except OSError as exc:
        raise MasterKeyError(
            f"cannot create key file {path} ({exc.strerror}): check the directory's permissions"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)


def load_key_file(path: Path, *, source: str | None = None, check_mode: bool = True) -> MasterKey:
    """Read a key file; refuse one that others may read or that does not hold a key."""
    label = source or f"file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MasterKeyError(
            f"key file {path} does not exist: run `credproxy init` or fix {ENV_KEY_FILE}"
        ) from None
    except OSError as exc:
        raise MasterKeyError(
            f"cannot read key file {path} ({exc.strerror}): check its owner and permissions"
        ) from None
    try:
        info = os.fstat(fd)  # checked on the open file, so the mode belongs to what we read
        if not stat.S_ISREG(info.st_mode):
            raise MasterKeyError(f"key file {path} is not a regular file: point at the key file")
        if check_mode and info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise MasterKeyError(
                f"key file {path} is open to other users (mode {mode:04o}): "
                f"run `chmod 600 {shlex.quote(str(path))}`"
            )
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return MasterKey(key=_parse_key(data, path), source=label)


def derive_passphrase_key(passphrase: str, params: KdfParams) -> MasterKey:
    """Stretch a passphrase with scrypt under the store's salt and cost parameters."""
    if not passphrase:
        raise MasterKeyError(f"the passphrase is empty: set {ENV_PASSPHRASE} or type one")
    try:
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    except UnicodeEncodeError:
        raise MasterKeyError("the passphrase is not valid text: type it again") from None
    kdf = Scrypt(salt=params.salt, length=KEY_BYTES, n=params.n, r=params.r, p=params.p)
    return MasterKey(key=kdf.derive(secret), source="passphrase", kdf_params=params)


def resolve_master_key(
    env: Mapping[str, str],
    *,
    kdf_params: KdfParams | None,
    prompt: Callable[[str], str] | None = None,
) -> MasterKey:
    """The master key from the first source that has one, in the SPEC's order.

    1. the file named by `CREDPROXY_MASTER_KEY_FILE` (set means it must exist);
    2. `$CREDENTIALS_DIRECTORY/credproxy.key` (systemd `LoadCredential`);
    3. a passphrase from `CREDPROXY_PASSPHRASE`, or from `prompt` when the store is
       passphrase-protected (`kdf_params` given), stretched with scrypt;
    4. the default key file `~/.config/credproxy/master.key`.

    `kdf_params` are the store's (`Store.read_kdf_params`); for a new store the caller
    passes `new_kdf_params()` only when the store is to be passphrase-protected. A key
    stretched from a passphrase carries its `kdf_params`, so the store can keep them.
    An empty variable counts as unset.
    """
    named = env.get(ENV_KEY_FILE)
    if named:
        return load_key_file(Path(named).expanduser())

    cred_dir = env.get(ENV_CREDENTIALS_DIR)
    if cred_dir:
        credential = Path(cred_dir) / CREDENTIAL_NAME
        if credential.exists():
            # systemd owns this file and its directory; its mode may carry ACL mask bits
            return load_key_file(
                credential, source=f"systemd credential {credential}", check_mode=False
            )

    passphrase = env.get(ENV_PASSPHRASE)
    if passphrase:
        if kdf_params is None:
            raise MasterKeyError(
                f"{ENV_PASSPHRASE} is set but the store was not created with a passphrase "
                f"(no scrypt salt in it): unset {ENV_PASSPHRASE} to use its key file"
            )
        return derive_passphrase_key(passphrase, kdf_params)
    if prompt is not None and kdf_params is not None:
        return derive_passphrase_key(prompt("credproxy passphrase: "), kdf_params)

    fallback = default_key_file({k: v for k, v in env.items() if k != ENV_KEY_FILE})
    if fallback.exists():
        return load_key_file(fallback)
    if kdf_params is not None and prompt is None:
        raise MasterKeyError(
            f"{_NO_KEY} (a passphrase-protected store needs {ENV_PASSPHRASE}, "
            "or the command run in a terminal to ask for it)"
        )
    raise MasterKeyError(_NO_KEY)


def _parse_key(data: bytes, path: Path) -> bytes:
    if len(data) == KEY_BYTES:
        return data  # raw bytes
    bad = MasterKeyError(
        f"key file {path} does not hold a master key "
        "(expected 32 bytes as base64, 64 hex characters or 32 raw bytes): "
        f"point {ENV_KEY_FILE} at the right file, or run `credproxy init` for a new store"
    )
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise bad
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise bad from None
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise bad from None
    std = text.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    try:
        key = base64.b64decode(std, validate=True)
    except (ValueError, binascii.Error):
        raise bad from None
    if len(key) != KEY_BYTES:
        raise bad
    return key


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
