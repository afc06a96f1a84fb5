"""The store's tables (SQLAlchemy Core). One metadata for SQLite and PostgreSQL; Alembic migrates it.

Sections belong to the parts of the gateway that write them; every part reads the spool section.
Raw bytes live in `message_bodies`, apart from the metadata, so listing never loads a body and the
retention purge can drop bodies while keeping decisions and events.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
    Table, Text, UniqueConstraint,
)

metadata = MetaData()

# BigInteger ids on PostgreSQL, but INTEGER PRIMARY KEY on SQLite (its rowid alias autoincrements).
Id = BigInteger().with_variant(Integer(), "sqlite")

# --------------------------------------------------------------------------------------------- spool
messages = Table(
    "messages", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),  # received|routed|retrying|delivered|quarantined|dead|dropped
    Column("message_id", String(998)),                          # normalised <id>, or None when the mail has none
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("mail_from", Text, nullable=False, default=""),
    Column("rcpt_tos", Text, nullable=False),                   # JSON list
    Column("client_addr", String(64)),
    Column("helo", Text),
    Column("listener", String(64), nullable=False, default=""),
    Column("source", String(128), nullable=False, default="smtp"),  # smtp|lmtp|imap:<name>
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_until", DateTime(timezone=True)),
    Column("decision", Text),            # JSON Decision
    Column("action", String(16)),        # Decision.action, for listing/filtering
    Column("last_error", Text),
    Column("thread_key", String(998)),   # messages sharing a key are delivered in order
    Column("raw_purged", Boolean, nullable=False, default=False),
    # Last put back by an operator (`dead retry`, `quarantine release`): the retry horizon runs from here, so a
    # released message gets a full horizon of retries. NULL: never released, the horizon runs from received_at.
    Column("retry_since", DateTime(timezone=True)),
)
# Only these three: each index is pages written by every group commit (migration 0002 dropped `state`,
# `sha256` and `next_attempt_at` alone, which these cover).
Index("ix_messages_claim", messages.c.state, messages.c.next_attempt_at)
Index("ix_messages_thread", messages.c.thread_key)
Index("ix_messages_dedupe", messages.c.message_id, messages.c.sha256)

message_bodies = Table(
    "message_bodies", metadata,
    Column("message", Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("raw", LargeBinary, nullable=False),
)

# Bodies of SQLite spools kept in segment files (`gateway.body_log`): a row here instead of one in
# `message_bodies`. Indexed by segment so retention can tell when a segment file holds nothing live.
message_body_refs = Table(
    "message_body_refs", metadata,
    Column("message", Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("segment", String(128), nullable=False, index=True),
    Column("byte_offset", BigInteger, nullable=False),
    Column("byte_length", BigInteger, nullable=False),
)

message_log = Table(
    "message_log", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("note", Text),
)

# ------------------------------------------------------------------------------ delivery (Odoo side)
# Thread index: Message-IDs we relayed or delivered, and where they live in Odoo.
thread_index = Table(
    "thread_index", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", String(998), nullable=False, index=True),
    Column("model", String(128)),
    Column("res_id", Integer),
    Column("outbound", Boolean, nullable=False, default=False),
    Column("is_internal", Boolean, nullable=False, default=False),
    Column("outbound_mail", Id),  # outbound_mails.id when we relayed it
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Every Odoo write is keyed: a retry after a crash finds what the first attempt did.
odoo_writes = Table(
    "odoo_writes", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("step", String(255), nullable=False),  # e.g. "create:crm.lead:sales@example.test", "post:crm.lead:7"
    Column("model", String(128)),
    Column("res_id", Integer),
    Column("result", Text),  # JSON
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("message", "step", name="uq_odoo_writes_step"),
)

# Polite refusals: at most one per (sender, alias) per window.
refusals = Table(
    "refusals", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sender", String(320), nullable=False),
    Column("alias", String(320), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    Index("ix_refusals_sender_alias", "sender", "alias"),
)

# ------------------------------------------------------------------------------------------ outbound
outbound_mails = Table(
    "outbound_mails", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", String(998), nullable=False, index=True),
    Column("model", String(128)),
    Column("res_id", Integer),
    Column("mail_from", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

outbound_recipients = Table(
    "outbound_recipients", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("mail", Id, ForeignKey("outbound_mails.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("recipient", String(320), nullable=False),
    Column("state", String(16), nullable=False, default="queued"),  # queued|deferred|delivered|bounced
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_result", Text),
    Column("delivered_at", DateTime(timezone=True)),
    Column("opens", Integer, nullable=False, default=0),
    Column("clicks", Integer, nullable=False, default=0),
)

# Relayed copies waiting for their smarthost/MX attempt (raw bytes after VERP/tracking rewrite).
outbound_queue = Table(
    "outbound_queue", metadata,
    Column("recipient", Id, ForeignKey("outbound_recipients.id", ondelete="CASCADE"), primary_key=True),
    Column("raw", LargeBinary, nullable=False),
    Column("lease_until", DateTime(timezone=True)),
)

# ---------------------------------------------------------------------------------------------- events
events = Table(
    "events", metadata,
    Column("seq", Id, primary_key=True, autoincrement=True),  # the pull API's cursor
    Column("id", String(64), nullable=False, unique=True),      # stable across retries; consumers dedupe on it
    Column("type", String(32), nullable=False, index=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("message_id", String(998)),
    Column("model", String(128)),
    Column("res_id", Integer),
    Column("recipient", String(320)),
    Column("data", Text, nullable=False, default="{}"),  # JSON
)

webhook_deliveries = Table(
    "webhook_deliveries", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_seq", Id, ForeignKey("events.seq", ondelete="CASCADE"), nullable=False),
    Column("subscriber", String(128), nullable=False),
    Column("state", String(16), nullable=False, default="pending"),  # pending|sent|dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    UniqueConstraint("event_seq", "subscriber", name="uq_webhook_event_subscriber"),
    Index("ix_webhook_pending", "subscriber", "state", "next_attempt_at"),
)

# ---------------------------------------------------------------------------------------------- IMAP
imap_checkpoints = Table(
    "imap_checkpoints", metadata,
    Column("source", String(128), primary_key=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("last_uid", BigInteger, nullable=False, default=0),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

imap_seen = Table(
    "imap_seen", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", String(128), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("message", Id),
    Column("after_done", Boolean, nullable=False, default=False),
    UniqueConstraint("source", "uidvalidity", "uid", name="uq_imap_seen_uid"),
    Index("ix_imap_seen_hash", "source", "sha256"),
    Index("ix_imap_seen_pending", "source", "after_done"),  # after-actions to redo after a crash
)

# --------------------------------------------------------------------------------------------- misc
kv = Table(
    "kv", metadata,
    Column("key", String(255), primary_key=True),
    Column("value", Text),
    Column("updated_at", DateTime(timezone=True)),
)

__all__ = [name for name, obj in dict(globals()).items() if isinstance(obj, Table)] + ["metadata"]
