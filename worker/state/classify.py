"""Redis errors, classified once: unavailable (retry), misconfigured (fail clearly), or one symbol's
data (quarantine that symbol, serve the others).

Every Redis call of the window store passes what it got through :func:`state_error` (for the call
as a whole) or :func:`reply_error` (for one symbol's reply inside a pipeline), so a new kind of
error is added here and nowhere else.
"""

from __future__ import annotations

import ssl

from redis import exceptions as rexc

from worker.errors import StateError, StateMisconfigured, StateUnavailable, SymbolStateCorrupt

__all__ = ["CORRUPT_CODE", "decode_error", "reply_error", "state_error"]

# Error code of the scripts' own per-symbol data errors: ``SWCORRUPT <reason> <detail>``.
CORRUPT_CODE = "SWCORRUPT"

# Server replies meaning "cannot serve this right now" rather than "the request is wrong". redis-py
# maps some codes to classes and strips the code from the message, others stay a ResponseError
# with the code in front (and a script's error keeps the code of the call that failed in it).
_UNAVAILABLE_CODES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "OOM", "NOREPLICAS")
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError and MaxConnectionsError; not AuthenticationError
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.TryAgainError,
    rexc.ClusterDownError,  # includes MasterDownError
    rexc.OutOfMemoryError,
    TimeoutError,
    OSError,
)
_CLUSTER_TYPES: tuple[type[BaseException], ...] = (rexc.MovedError, rexc.AskError, rexc.ClusterCrossSlotError)
_CLUSTER_CODES = ("MOVED", "ASK", "CROSSSLOT")

_URL = "SIGNAL_WORKER_REDIS__URL"
_USER = "the ACL user (SIGNAL_WORKER_REDIS__USERNAME, or the user in SIGNAL_WORKER_REDIS__URL)"


def _reply_text(exc: BaseException) -> str:
    """The server's error reply; redis-py prefixes errors inside a MULTI/EXEC with where they were."""
    text = str(exc)
    marker = "of pipeline caused error: "
    if text.startswith("Command # ") and marker in text:
        text = text.split(marker, 1)[1].lstrip("('\"")
    return text


def _code(exc: BaseException) -> str:
    return _reply_text(exc).split(" ", 1)[0]


def _certificate_refused(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind ``exc`` (itself, or its cause/context chain)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def state_error(exc: BaseException, what: str) -> StateError:
    """The :class:`StateError` a failed call (``what``: e.g. ``"apply"``) stands for.

    Never per-symbol: a call-level failure is either the server being away or the worker being
    set up wrong.
    """
    if isinstance(exc, StateError):
        return exc
    if isinstance(exc, rexc.AuthenticationError):
        return StateMisconfigured(
            f"redis {what}: authentication refused ({exc}); check SIGNAL_WORKER_REDIS__USERNAME / "
            f"SIGNAL_WORKER_REDIS__PASSWORD or the credentials in {_URL}"
        )
    if isinstance(exc, rexc.NoPermissionError) or _code(exc) == "NOPERM":
        return StateMisconfigured(
            f"redis {what}: {_USER} lacks a permission ({exc}); it needs the key pattern of "
            "SIGNAL_WORKER_REDIS__KEY_PREFIX and +@read +@write +@scripting +ping"
        )
    if isinstance(exc, _CLUSTER_TYPES) or _code(exc) in _CLUSTER_CODES:
        return StateMisconfigured(
            f"redis {what}: {_URL} points at one node of a Redis Cluster ({_code(exc)} {exc}); "
            "point it at a standalone/replicated Redis or a cluster-aware proxy"
        )
    tls = _certificate_refused(exc)
    if tls is not None:
        # redis-py raises these as a ConnectionError (an outage, retried for ever) with the TLS
        # error as its context: a server certificate this CA bundle does not trust, or one for
        # another host name, fails the same way on every attempt.
        return StateMisconfigured(
            f"redis {what}: TLS refused the server's certificate ({tls}); check SIGNAL_WORKER_REDIS__SSL_CA_CERTS "
            f"(the CA that signed it) and the host name in {_URL} (it must be on the certificate)"
        )
    if isinstance(exc, _UNAVAILABLE_TYPES) or _code(exc) in _UNAVAILABLE_CODES:
        return StateUnavailable(f"redis {what}: unavailable: {type(exc).__name__}: {exc}")
    return StateMisconfigured(
        f"redis {what}: the server rejected the worker's command ({type(exc).__name__}: {exc}); check that "
        f"{_URL} is a Redis >= 6.2 or valkey server with Lua scripting and that {_USER} may run it"
    )


def reply_error(exc: BaseException, symbol: str, what: str) -> StateError:
    """Classify one symbol's error reply in a pipeline: that symbol's data, or :func:`state_error`."""
    message = _reply_text(exc)
    code = _code(exc)
    if code == CORRUPT_CODE:
        _, reason, detail = [*message.split(" ", 2), "", ""][:3]
        return SymbolStateCorrupt(symbol, reason or "corrupt", detail)
    if code == "WRONGTYPE":
        return SymbolStateCorrupt(symbol, "wrong_type", message)
    return state_error(exc, what)


def decode_error(symbol: str, reason: str, exc: BaseException) -> SymbolStateCorrupt:
    """A symbol whose stored bytes the worker cannot read (written by something else)."""
    return SymbolStateCorrupt(symbol, reason, f"{type(exc).__name__}: {exc}")
