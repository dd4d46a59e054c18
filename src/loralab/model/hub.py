"""The Hugging Face hub without waiting: detect offline once, then use only the local cache.

Offline, huggingface_hub retries every request five times with back-off (~50 s and ~20 log
lines for one missing model). Here one TCP connect to the hub host (1.5 s at most, once per
process) decides; when it fails, HF_HUB_OFFLINE is switched on in-process, so transformers and
huggingface_hub read the cache only, and a model that is not cached is one line at once.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import threading
from functools import lru_cache
from urllib.parse import urlparse

from loralab.errors import UserError

CONNECT_TIMEOUT_S = 1.5
DEFAULT_ENDPOINT = "https://huggingface.co"
# huggingface_hub's rule: "name" or "namespace/name", word characters, '-', '.', no '--'/'..'
REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def is_repo_id(text: str) -> bool:
    """Could `text` name a hub repository (not a path: no leading '/', '.', '~', one '/' at most)?"""
    if not REPO_ID.match(text) or "--" in text or ".." in text or len(text) > 96:
        return False
    return not text.startswith((".", "-")) and not text.endswith((".", "-"))


def offline_by_env() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_address() -> tuple[str, int, bool]:
    """(host, port, tls) of HF_ENDPOINT, else huggingface.co."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    tls = url.scheme != "http"
    return url.hostname or "huggingface.co", url.port or (443 if tls else 80), tls


def can_connect(host: str, port: int, tls: bool = True, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """A TCP connect, and a TLS handshake when `tls`, within `timeout` seconds in all (name
    lookup included: run in a thread, so a lookup that hangs does not hold the command). The
    handshake matters where a proxy or firewall accepts any connection and then says nothing."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    context = ssl.create_default_context()
                    context.check_hostname = False  # reachability only; HF verifies later
                    context.verify_mode = ssl.CERT_NONE
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
            result.append(True)
        except (OSError, ssl.SSLError):
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub can be used in this process (decided once; HF_HUB_OFFLINE=1 says no)."""
    if offline_by_env():
        return False
    return can_connect(*_hub_address())


_switched_offline = False  # True once go_offline set HF_HUB_OFFLINE (the user had not)


def go_offline() -> None:
    """Switch huggingface_hub (and transformers through it) to cache-only in this process.

    huggingface_hub reads HF_HUB_OFFLINE into a constant at import, so the environment is set
    for modules not imported yet and the constant for an already imported one."""
    global _switched_offline
    if not offline_by_env():
        _switched_offline = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def prepare_hub() -> bool:
    """Call before any hub access: True when online; offline, HF goes cache-only and False."""
    if hub_reachable():
        return True
    go_offline()
    return False


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """The file's path in the local HF cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None


def require_hub_id(path: str) -> None:
    """A model.path that is neither a folder nor a possible hub id: one line naming it."""
    if not is_repo_id(path):
        raise UserError(f"model.path {path}: no such folder, and not a hub id (org/name)")


def require_reachable_or_cached(repo_id: str, filename: str = "config.json") -> None:
    """Offline and `filename` of `repo_id` not in the HF cache: fail now, in one line."""
    require_hub_id(repo_id)
    if not prepare_hub() and not cached_file(repo_id, filename):
        raise UserError(missing_model_message(repo_id, offline_reason()))


def offline_reason() -> str:
    return "the hub is unreachable" if _switched_offline else "HF_HUB_OFFLINE is set"


def missing_model_message(repo_id: str, why: str) -> str:
    return (
        f"model {repo_id} not found: no local folder by that name, not in the HF cache, and "
        f"{why}; download it elsewhere and set model.path=/path/to/folder, or use "
        "model.source=modelscope"
    )
