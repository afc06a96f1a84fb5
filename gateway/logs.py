"""Structured logs: every line about a message carries its spool id and Message-ID.

Use `log.info("...", extra=mail_context(spool_id, message_id))`, or a `MailLogAdapter`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


#: Libraries whose DEBUG output carries the Odoo secret or mail content (requests and answers in full).
#: (aioimaplib logs fetched mail too: setup_logging caps it at WARNING.) http.client, for JSON-2, logs nothing.
SECRET_BEARING_LOGGERS = ("odoorpc",)


class _MailFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        bits = []
        spool_id = getattr(record, "spool_id", None)
        message_id = getattr(record, "message_id", None)
        if spool_id is not None:
            bits.append(f"spool_id={spool_id}")
        if message_id:
            bits.append(f"message_id={message_id}")
        return f"{base} {' '.join(bits)}" if bits else base


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MailFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)   # migrations at every start
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)  # "ignored untagged response" per new mail
    # Whatever --log-level says, never below INFO: odoorpc's DEBUG lines are every JSON-RPC request and
    # answer, and it masks only params['password'], while the password or API key travels in the args of
    # common.login and object.execute_kw, next to whole mail bodies (message_process, message_post).
    for name in SECRET_BEARING_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def mail_context(spool_id: int | None, message_id: str | None) -> dict[str, Any]:
    return {"spool_id": spool_id, "message_id": message_id}


class MailLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger bound to one message."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs
