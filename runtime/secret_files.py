"""Secrets kept out of sight: files others may read, and URLs written to logs.

Used by ``serve`` (the API key file) and ``watch --config`` (the config, ``password_file``,
``headers_file``, ``url_file``): a secret file that the group or other users can read gets a
warning, not an error, since containers often mount secrets group-readable.
"""

from __future__ import annotations

import stat
import sys
import urllib.parse
from pathlib import Path

# Header names and URL query keys that carry credentials: words found anywhere in the name, and
# short ones that must be a whole dash- or underscore-separated part of it.
SECRET_WORDS = ("auth", "token", "secret", "passw", "cookie", "session", "signature",
                "credential", "apikey")
SECRET_PARTS = frozenset({"key", "sig", "pass", "pwd", "jwt", "bearer"})


def readable_by_others(path: Path) -> bool:
    """True when the group or other users may read ``path`` (False if it cannot be stat'ed)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def warn_if_readable(path: Path, what: str) -> bool:
    """Print a warning on stderr when ``path`` is group- or world-readable; True if it was."""
    if not readable_by_others(path):
        return False
    print(f"edgecap: warning: {what} {path} is readable by other users (chmod 600 {path})",
          file=sys.stderr)
    return True


def looks_secret(name: str) -> bool:
    """True for a header name or query key that usually holds a credential."""
    lowered = name.lower().replace("_", "-")
    return any(word in lowered for word in SECRET_WORDS) or bool(
        SECRET_PARTS & set(lowered.split("-")))


def redact_url(url: str) -> str:
    """``url`` without its user info, query and fragment, for logs and error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port or bracket: say nothing of it
        return "<malformed URL>"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


def secret_in_url(url: str) -> str | None:
    """What in ``url`` looks like a credential (user info, a token-like query key), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None:
        return "user info (user:password@)"
    for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if looks_secret(key):
            return f"the query parameter {key!r}"
    return None
