"""URIs as medtune shows and records them: never with the credentials they may carry.

`MLFLOW_TRACKING_URI=https://user:password@mlflow.example` works with MLflow's client, and everything
medtune writes (errors, MLflow params, run.json, lineage.json) would otherwise copy the password.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

# Query parameters that carry a secret in the URIs people paste (signed URLs, tokens, passwords).
SECRET_PARAMS = ("password", "passwd", "pwd", "token", "secret", "signature", "sig", "key", "credential")


def credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without user:password@, user, password); MLflow takes the last two as $MLFLOW_TRACKING_USERNAME
    and $MLFLOW_TRACKING_PASSWORD."""
    if "://" not in uri:
        return uri, None, None
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    clean = uri.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    return clean, parts.username and unquote(parts.username), parts.password and unquote(parts.password)


def redact(uri: str | None) -> str | None:
    """`uri` without user:password@ and with secret-looking query values masked; anything else unchanged."""
    if not uri:
        return uri
    clean = credentials(uri)[0]
    base, sep, query = clean.partition("?")
    if not sep:
        return clean
    query, hash_, fragment = query.partition("#")
    pairs = (pair.partition("=") for pair in query.split("&"))
    masked = "&".join(k + eq + ("***" if v and any(s in k.lower() for s in SECRET_PARAMS) else v)
                      for k, eq, v in pairs)
    return f"{base}?{masked}{hash_}{fragment}"


def tracking_credentials_to_env() -> None:
    """user:password@ in $MLFLOW_TRACKING_URI moves to $MLFLOW_TRACKING_USERNAME/PASSWORD, which MLflow reads
    (here and in the processes this one starts), so the URI every later message or record copies is bare."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    clean, user, password = credentials(uri)
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")
        os.environ["MLFLOW_TRACKING_URI"] = clean
