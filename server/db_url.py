"""Database URLs: which ones select PostgreSQL, and how to show one without its password (plain strings, no I/O)."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


_USERINFO_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def scrub(text: str, url: str) -> str:
    """`text` (e.g. a driver's error quoting `url`) without `url`'s password, even where `url` does not parse."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return _USERINFO_PASSWORD.sub(r"\1***@", text)


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, for logs, errors and the admin config view."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. a broken [IPv6] host: show no part that might hold the password
        return url.split("://", 1)[0] + "://(unparsable URL)"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


__all__ = ["POSTGRES_SCHEMES", "is_postgres_url", "redact_url", "scrub"]
