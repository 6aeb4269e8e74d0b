"""Where runs and studies are stored: the URLs, checked once before any work, with passwords kept out of sight.

A tracking server or database that is down would otherwise surface minutes later (MLflow retries HTTP calls
with back-off for about two minutes) as a traceback, or after a run was half created. Every command checks
its stores first and fails at once with the URL, its password masked.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import mlflow

from training.core.options import AUTO

# Seconds to wait for a server or database to answer the check.
CONNECT_TIMEOUT_S = 5
# The Optuna storage sweeps use when --storage is auto: the shared stack's PostgreSQL (scripts/stack.sh env).
OPTUNA_STORAGE_ENV = "MEDZOO_OPTUNA_STORAGE"
DEFAULT_OPTUNA_STORAGE = "sqlite:///optuna.db"


class BackendError(ValueError):
    """A tracking store, registry or Optuna storage that cannot be reached; the message names it."""


def masked(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def optuna_storage(storage: str) -> str:
    """The storage a sweep uses: as given, or for ``auto`` $MEDZOO_OPTUNA_STORAGE, else the local SQLite file."""
    if storage != AUTO:
        return storage
    return os.environ.get(OPTUNA_STORAGE_ENV) or DEFAULT_OPTUNA_STORAGE


def is_database(url: str) -> bool:
    return "://" in url and not url.startswith(("http://", "https://", "file:", "sqlite:", "databricks"))


def check_tracking() -> None:
    """The tracking store (and the registry, when it is elsewhere) answers, or BackendError names it."""
    uris = {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}
    for uri in sorted(uris):
        if uri.startswith(("http://", "https://")):
            _check_server(uri)
        elif is_database(uri):
            check_database(uri, "the MLflow tracking store")


def _check_server(uri: str) -> None:
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S)
    except requests.Timeout:
        raise BackendError(
            f"the MLflow tracking server {masked(uri)} did not answer within {CONNECT_TIMEOUT_S} s."
        ) from None
    except requests.RequestException as err:
        # urllib3 wraps the socket error twice; its own text ends with what the socket said.
        cause = getattr(err.args[0], "reason", err) if err.args else err
        raise BackendError(
            f"the MLflow tracking server {masked(uri)} cannot be reached ({str(cause).rsplit('): ', 1)[-1]}); start it "
            "(scripts/stack.sh up on one machine) or point MLFLOW_TRACKING_URI at a running one."
        ) from None
    if response.status_code != 200:
        raise BackendError(
            f"the MLflow tracking server {masked(uri)} answered /health with HTTP {response.status_code}."
        )


def check_database(url: str, what: str) -> None:
    """Connect once to the SQLAlchemy URL ``url``; BackendError names ``what`` and the masked URL."""
    import sqlalchemy

    if url.startswith("sqlite"):
        return
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        raise BackendError(f"{what} {masked(url)} cannot be reached: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    """The driver's first line, e.g. 'connection refused', without the SQL or the URL it may repeat."""
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first[:300]
