"""Polite refusals for senders a contact policy turns away — once per sender and alias per window.

Odoo sends its refusal *inside* the transaction (even on rollback, again on each retry) and without
`Auto-Submitted` (spec §1.12, §5.7). We send ours after the refusal is recorded (committed) in `refusals`, at
most once per (sender, alias) per `routing.refusal_window_hours`, marked `Auto-Submitted: auto-replied` and
with `routing.model.LOOP_HEADER`, never to a null sender, through the configured smarthost. A failed send is
logged, not retried: a refusal is a courtesy, never a reason to hold mail.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import smtplib
from email.message import EmailMessage

from sqlalchemy import Engine, and_, insert, select

from gateway.config import Config
from gateway.schema import refusals
from gateway.store import utcnow
from routing.model import LOOP_HEADER

log = logging.getLogger(__name__)

DEFAULT_TEXT = ("Hello,\n\nThe following email sent to {alias} cannot be accepted because the address is "
                "protected: only addresses linked to registered partners or specific addresses are allowed "
                "to contact it.\n\nSubject: {subject}\n\nThis message was sent automatically; please do not "
                "reply to it.\n")


def build_refusal(*, to: str, alias: str, subject: str, original_message_id: str | None, from_address: str,
                  text: str | None = None) -> EmailMessage:
    """The refusal mail (pure): Auto-Submitted, loop header, threaded on the refused mail."""
    msg = EmailMessage()
    msg["From"] = email.utils.formataddr(("MAILER-DAEMON", from_address))
    msg["To"] = to
    msg["Subject"] = f"Re: {subject}" if subject else "Your message could not be delivered"
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=from_address.rsplit("@", 1)[-1] or None)
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg[LOOP_HEADER] = "refusal"
    msg.set_content((text or DEFAULT_TEXT).format(alias=alias, subject=subject or "(no subject)"))
    return msg


class RefusalSender:
    """Records and sends refusals; `refuse()` returns True when a mail was sent (or would have been)."""

    def __init__(self, config: Config, engine: Engine):
        self.config = config
        self.engine = engine
        self.window = dt.timedelta(hours=config.routing.refusal_window_hours)
        self.sent: list[EmailMessage] = []   # what was handed to the smarthost (tests, explain)

    def _smarthost(self) -> tuple[str, int] | None:
        ob = self.config.outbound
        hostport = ob.refusal_smarthost or ob.smarthost
        if not hostport:
            return None
        host, _, port = hostport.rpartition(":")
        return (host or hostport, int(port)) if port.isdigit() else (hostport, 25)

    def claim(self, sender: str, alias: str) -> bool:
        """Record a refusal for (sender, alias) unless one was recorded within the window. Commits."""
        sender, alias = sender.lower(), alias.lower()
        now = utcnow()
        with self.engine.begin() as conn:
            recent = conn.execute(select(refusals.c.id).where(and_(
                refusals.c.sender == sender, refusals.c.alias == alias,
                refusals.c.sent_at > now - self.window)).limit(1)).first()
            if recent:
                return False
            conn.execute(insert(refusals).values(sender=sender, alias=alias, sent_at=now))
        return True

    def refuse(self, *, sender: str, alias: str, subject: str, original_message_id: str | None,
               text: str | None = None) -> bool:
        if not sender or sender == "<>" or "@" not in sender:
            return False  # never answer a null or malformed return path (RFC 3834 §2)
        if not self.claim(sender, alias):
            return False
        domain = alias.rsplit("@", 1)[-1]
        bounce = next((d.bounce for d in self.config.domains if d.name.lower() == domain), None) or "mailer-daemon"
        msg = build_refusal(to=sender, alias=alias, subject=subject, original_message_id=original_message_id,
                            from_address=f"{bounce}@{domain}", text=text)
        target = self._smarthost()
        if target is None:
            log.warning("refusal to %s for %s not sent: set [outbound] refusal_smarthost or smarthost", sender, alias)
            return False
        try:
            with smtplib.SMTP(target[0], target[1], timeout=30) as smtp:
                smtp.send_message(msg, from_addr="", to_addrs=[sender])
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("refusal to %s for %s could not be sent via %s:%s: %s", sender, alias, *target, exc)
            return False
        self.sent.append(msg)
        return True
