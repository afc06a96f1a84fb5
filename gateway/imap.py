"""The IMAP puller: catchall mailboxes into the spool, once each, seconds after delivery.

Odoo's fetchmail polls every 5 minutes for UNSEEN mail and loses a message whenever processing fails
(spec §1.0, §5.2–5.3). Here, per source:

* selection is by UID above a checkpoint, never by `\\Seen`, so a person reading the mailbox hides nothing;
* bodies are fetched with `BODY.PEEK[]` in UID batches (at most `batch_size` messages and `BATCH_BYTES` by
  their RFC822.SIZE, a larger message alone) and spooled together with their `imap_seen` rows and
  the new checkpoint in one transaction (`gateway.imap_checkpoint`); only then does the after-action run
  (flag `\\Seen`, move, or delete), and it is confirmed in the store afterwards, so a crash at any point
  neither loses nor duplicates a message;
* a UIDVALIDITY change restarts the UID checkpoint, and message hashes keep the renumbered mailbox from
  being spooled twice;
* IDLE where the server offers it (re-issued every `idle_renew`, under the 29-minute limit), polling
  otherwise; a lost connection is retried with exponential backoff;
* while the spool's disk is below `[storage] min_free_mb` nothing is fetched (the listeners answer 452 at
  MAIL FROM for the same reason): the mail waits on the server, and the puller backs off and looks again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioimaplib
from prometheus_client import Counter, Enum, Gauge
from sqlalchemy import Engine

from gateway.config import Config, ConfigError, ImapSourceConfig, secret
from gateway.disk_space import FreeSpace, spool_free_space
from gateway.imap_client import PullClient
from gateway.imap_checkpoint import (
    BatchResult, Checkpoint, Pulled, begin_validity, mark_after_done, pending_after, spool_pulled,
)
from gateway.imap_envelope import envelope_from_headers
from gateway.imap_protocol import (
    FetchedMessage, chunks, cut_batches, has_exists, parse_fetch, parse_search, parse_select, parse_sizes,
    quote_mailbox, uid_set,
)
from gateway.metrics import SERVE_ONLY
from gateway.spool import Envelope
from gateway.store import utcnow

log = logging.getLogger(__name__)

PULLED = Counter("mailgate_imap_pulled_total", "Messages spooled from an IMAP source", ["source"])
DUPLICATES = Counter("mailgate_imap_duplicates_total",
                     "Messages recognised as already spooled (same bytes under an older UIDVALIDITY)", ["source"])
# The puller runs in the serve process only: its latest value is the value (no per-process copies to sum).
LAG = Gauge("mailgate_imap_lag_seconds",
            "Age of the oldest message found in the mailbox and not yet spooled (0 when caught up)", ["source"],
            multiprocess_mode="mostrecent")
UNREADABLE = Counter("mailgate_imap_unreadable_total",
                     "Messages skipped because the server would not return them, attempt after attempt; they "
                     "stay on the server, unflagged", ["source"])
CONNECTION = Enum("mailgate_imap_connection", "IMAP source connection state", ["source"],
                  states=["disconnected", "connecting", "syncing", "idle", "polling", "backoff"],
                  registry=SERVE_ONLY)

FETCH_ITEMS = "(UID INTERNALDATE BODY.PEEK[])"
SIZE_ITEMS = "(UID RFC822.SIZE)"
#: bytes of message bodies one FETCH may bring (a larger message is fetched alone): a batch is in memory whole,
#: so `batch_size` alone let 100 attachments of 35 MB make 3.5 GB; fetching ahead is skipped for a batch over
#: half of it, so two batches in memory stay within it too
BATCH_BYTES = 64 * 1024 * 1024
#: UIDs whose sizes one `UID FETCH (UID RFC822.SIZE)` asks for: one round trip per this many messages, and
#: a first pull of a huge mailbox does not hold every size at once
SIZE_WINDOW = 5000
#: fetches of one message that may fail (NO, or no body) before it is skipped: one unreadable message must not
#: hold the checkpoint, and re-fetch everything above it, forever
UNREADABLE_TRIES = 5


@dataclass(frozen=True)
class Fetched:
    """One batch's FETCH: the messages returned, and the UIDs still on the server that were not (ascending)."""

    messages: list[FetchedMessage]
    unread: list[int]


class ImapError(Exception):
    """An IMAP source cannot be pulled right now; the message says what an operator should check."""


class ImapConnectionLost(ImapError):
    """The server closed the connection (restart, idle timeout, network): reconnect with backoff."""


class ImapCommandFailed(ImapError):
    """The server answered NO/BAD to a command we need."""


class StorageLow(ImapError):
    """The spool's disk is below `[storage] min_free_mb`: fetch nothing, the mail waits safely on the server.

    The listeners refuse MAIL FROM with 452 for the same reason (gateway/disk_space.py); a puller that went on
    fetching would fill the last of the disk that the workers still need, and its commits would fail anyway."""


class ImapPuller:
    """One IMAP source: `await puller.run(stop)` pulls until `stop` is set.

    Store work runs on one thread per source, so a late commit from a cancelled pass always finishes before
    the next pass reads the checkpoint.
    """

    def __init__(self, source: ImapSourceConfig, engine: Engine, *, password: str | None = None,
                 on_spooled: Callable[[int], Any] | None = None, free_space: FreeSpace | None = None):
        self.cfg = source
        self.free_space = free_space
        self.engine = engine
        self.name = f"imap:{source.name}"
        self._password = password
        self._on_spooled = on_spooled
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                               thread_name_prefix=f"imap-{source.name}")
        self._checkpoint: Checkpoint | None = None
        self._can_idle = False
        self.backoff_initial = 1.0
        self.fetch_ahead = True
        self.batch_bytes = source.batch_bytes
        self.unreadable_tries = UNREADABLE_TRIES
        self._failed_reads: dict[tuple[int, int], int] = {}  # (uidvalidity, uid) → failed fetches, this process
        self._copied: set[tuple[int, int]] = set()  # (uidvalidity, uid) copied to move_to, not yet expunged
        #: fault injection for tests: called with the batch's fetched UIDs after the spool commit, before the
        #: after-action
        self.after_commit_hook: Callable[[Sequence[int]], Any] | None = None
        self._set_state("disconnected")
        LAG.labels(self.name).set(0)

    # ------------------------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Pull until `stop` is set: connect, catch up, wait for new mail; reconnect with backoff on faults."""
        delay = self.backoff_initial
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self._session(stop)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a source must outlive any one fault, store ones too
                    if time.monotonic() - started > 60:
                        delay = self.backoff_initial  # the connection had been healthy: start over
                    self._set_state("backoff")
                    expected = isinstance(exc, (OSError, asyncio.TimeoutError, aioimaplib.AioImapException,
                                                ImapError))
                    log.log(logging.WARNING if expected else logging.ERROR,
                            "%s: %s: %s; reconnecting in %.1f s", self.name, type(exc).__name__,
                            exc or "connection problem", delay, exc_info=not expected)
                    await _wait(stop, delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, self.cfg.backoff_max)
                else:
                    delay = self.backoff_initial
        finally:
            self._set_state("disconnected")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: login, select, catch up, then idle/poll until stop or a fault."""
        self._set_state("connecting")
        lost = asyncio.Event()
        client = await self._connect(lost)
        work = asyncio.create_task(self._pull_loop(client, stop), name=f"{self.name} pull")
        watch = asyncio.create_task(lost.wait(), name=f"{self.name} watch")
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
                return
            # Commands pending on a dead socket would only end at their timeout: stop them now.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise ImapConnectionLost(f"connection to {self.cfg.host}:{self.cfg.port} lost")
        finally:
            for task in (work, watch):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(work, watch, return_exceptions=True)
            _drop(client)

    async def _connect(self, lost: asyncio.Event) -> PullClient:
        cfg = self.cfg
        password = self._password
        if password is None:
            password = secret(cfg.password_env, required=True, what=f"imap source {cfg.name!r} password")
        on_lost = lambda _exc: lost.set()  # noqa: E731
        client = PullClient(cfg.host, cfg.port, timeout=cfg.timeout, conn_lost_cb=on_lost,
                            ssl_context=self._tls_context() if cfg.security == "ssl" else None)
        try:
            await client.wait_hello_from_server()
            if cfg.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    raise ImapCommandFailed(f"{cfg.host}:{cfg.port} does not offer STARTTLS (no fallback to "
                                            "plaintext): use security = 'ssl' on the implicit-TLS port, or "
                                            "'none' if the password may cross this network in the clear")
                await _ok(await client.starttls(self._tls_context(), cfg.host), "STARTTLS")
            resp = await client.login(cfg.login, password or "")
            if resp.result != "OK":
                raise ImapCommandFailed(f"LOGIN as {cfg.login!r} refused ({_text(resp)}): check the password "
                                        f"in ${cfg.password_env} and the account")
            # Extensions (MOVE, UIDPLUS, IDLE) are often listed only once logged in.
            await asyncio.wait_for(client.protocol.capability(), cfg.timeout)
            resp = await client.select(quote_mailbox(cfg.mailbox))
            if resp.result != "OK":
                raise ImapCommandFailed(f"SELECT {cfg.mailbox!r} refused ({_text(resp)}): check `mailbox`")
        except BaseException:
            _drop(client)
            raise
        status = parse_select(resp.lines)
        self._can_idle = cfg.idle and client.has_capability("IDLE")
        checkpoint, changed = await self._db(begin_validity, self.engine, self.name, status.uidvalidity)
        if changed:
            log.warning("%s: UIDVALIDITY changed to %d: re-reading %s; messages already spooled are "
                        "recognised by their hash and not spooled again", self.name, status.uidvalidity,
                        cfg.mailbox)
        self._checkpoint = checkpoint
        log.info("%s: connected to %s:%d (%s), %s: %s messages, UIDVALIDITY %d, last UID %d, %s", self.name,
                 cfg.host, cfg.port, cfg.security, cfg.mailbox, status.exists, status.uidvalidity,
                 checkpoint.last_uid, "IDLE" if self._can_idle else f"polling every {cfg.poll_interval:g} s")
        return client

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cfg.tls_ca_file)
        if not self.cfg.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # ---------------------------------------------------------------------------------------- pulling
    async def _pull_loop(self, client: PullClient, stop: asyncio.Event) -> None:
        await self._redo_after_actions(client)
        while not stop.is_set():
            self._set_state("syncing")
            await self.sync(client, stop)
            if stop.is_set():
                break
            if self._can_idle:
                self._set_state("idle")
                await self._idle(client, stop)
            else:
                self._set_state("polling")
                await _wait(stop, self.cfg.poll_interval)
                if not stop.is_set():
                    await _ok(await client.noop(), "NOOP")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), 2.0)

    async def sync(self, client: PullClient, stop: asyncio.Event | None = None) -> int:
        """Spool every message above the checkpoint, batch by batch; returns how many were spooled.

        Searches again until a search finds nothing: mail that arrived during a FETCH or STORE was announced
        in that command's response, and IDLE would not announce it again. For the same reason a search that
        finds nothing while `* n EXISTS` arrived with it (the mail landed as the server answered; Dovecot
        answers `* SEARCH` and then `* n EXISTS`) is not the last one: otherwise that mail would wait for the
        next IDLE renewal, up to `idle_renew` (25 min). aioimaplib drops those lines, so the protocol counts
        them (`PullProtocol.exists_announced`).
        """
        total = 0
        while stop is None or not stop.is_set():
            self._check_storage()
            assert self._checkpoint is not None
            cp = self._checkpoint
            announced = client.protocol.exists_announced
            resp = await client.uid_search(f"UID {cp.last_uid + 1}:*", charset=None)
            await _ok(resp, "UID SEARCH")
            # `n:*` always matches the highest UID, even below n.
            uids = [u for u in parse_search(resp.lines) if u > cp.last_uid]
            if not uids:
                if client.protocol.exists_announced != announced:
                    continue
                break
            total += await self._pull_uids(client, cp.uidvalidity, uids, stop)
            if self._checkpoint.last_uid < uids[-1] and client.protocol.exists_announced == announced:
                break  # a message the server did not return holds the checkpoint: retry at the next wake-up
        LAG.labels(self.name).set(0)
        return total

    async def _pull_uids(self, client: PullClient, uidvalidity: int, uids: Sequence[int],
                         stop: asyncio.Event | None) -> int:
        """Fetch batch k+1 while batch k commits: the commit waits on the disk (fsync), the fetch on the network.

        Batches are cut by count (`batch_size`) and by bytes (`batch_bytes`, from the sizes the server gives
        first, `_sizes`), since a batch's bodies are all in memory at once. Fetching ahead is skipped when this
        batch or the next is over half of `batch_bytes`: it would hold both. Fetching ahead is safe: it only
        reads (BODY.PEEK), and nothing is acted on before its own commit. A message still on the server but
        not returned holds the checkpoint below it for this pass and the batches after it, which are spooled
        all the same (the seen-list keeps them from being spooled twice).
        """
        total = 0
        ceiling: int | None = None  # the checkpoint may not pass this UID in this pass
        ahead: asyncio.Task[Fetched] | None = None
        small = self.batch_bytes // 2
        try:
            for window in chunks(uids, SIZE_WINDOW):
                if stop is not None and stop.is_set():
                    break
                batches = cut_batches(window, await self._sizes(client, window), self.cfg.batch_size,
                                      self.batch_bytes)
                for i, (batch, size) in enumerate(batches):
                    if stop is not None and stop.is_set():
                        break
                    fetched = await ahead if ahead is not None else await self._fetch(client, uidvalidity, batch)
                    ahead = None
                    self._check_storage()  # before each commit: one batch can be large, and the disk is shared
                    if self.fetch_ahead and i + 1 < len(batches) and size <= small and batches[i + 1][1] <= small:
                        ahead = asyncio.create_task(self._fetch(client, uidvalidity, batches[i + 1][0]))
                    if fetched.unread:
                        ceiling = min(fetched.unread[0], ceiling if ceiling is not None else fetched.unread[0])
                    through = batch[-1] if ceiling is None else min(batch[-1], ceiling - 1)
                    total += await self._spool_and_act(client, uidvalidity, fetched.messages, through)
                    del fetched  # the bodies: not held while the next batch is fetched
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead
        return total

    async def _sizes(self, client: PullClient, uids: Sequence[int]) -> dict[int, int]:
        """UID → RFC822.SIZE for `uids` (ascending), in one cheap FETCH, to cut batches by bytes.

        Asked as the range first:last (a short command however sparse the UIDs; the server skips the gaps).
        A NO (a server that cannot read some message) still gives the others; a UID left out counts as
        small, and its body FETCH decides what happens to it.
        """
        resp = await client.uid_fetch(f"{uids[0]}:{uids[-1]}" if len(uids) > 1 else str(uids[0]), SIZE_ITEMS)
        if resp.result != "NO":
            await _ok(resp, "UID FETCH RFC822.SIZE")
        wanted = set(uids)
        return {uid: size for uid, size in parse_sizes(resp.lines).items() if uid in wanted}

    async def _fetch(self, client: PullClient, uidvalidity: int, batch: Sequence[int]) -> Fetched:
        """The batch's messages, and the UIDs the server left out although they are still there.

        A server may answer OK and leave a message out (`BODY[] NIL`, or no FETCH line at all: Exchange and
        Gmail do this for a message they cannot render at that moment), or send the others and a tagged NO
        (Gmail's "Some messages could not be FETCHed", Dovecot's NO [SERVERBUG]). After a NO, what is missing
        is fetched one by one, so one unreadable message does not keep the batch from the spool. Passing a
        missing message would lose it for good, so it is looked up: gone (expunged meanwhile) may be passed,
        still there may not, until it has failed `unreadable_tries` times (`_count_unread`).
        """
        resp = await client.uid_fetch(uid_set(batch), FETCH_ITEMS)
        if resp.result != "NO":
            await _ok(resp, "UID FETCH")
        wanted = set(batch)
        messages = [m for m in parse_fetch(resp.lines) if m.uid in wanted]
        missing = sorted(wanted - {m.uid for m in messages})
        if resp.result == "NO" and len(batch) > 1 and missing:
            log.warning("%s: UID FETCH of %d message(s) refused (%s): fetching the %d missing one(s) one by one",
                        self.name, len(batch), _text(resp), len(missing))
            for uid in missing:
                one = await self._fetch_one(client, uid)
                if one is not None:
                    messages.append(one)
            messages.sort(key=lambda m: m.uid)
            missing = sorted(wanted - {m.uid for m in messages})
        for m in messages:
            self._failed_reads.pop((uidvalidity, m.uid), None)
        unread = await self._still_there(client, missing) if missing else []
        return Fetched(messages, self._count_unread(uidvalidity, unread))

    async def _fetch_one(self, client: PullClient, uid: int) -> FetchedMessage | None:
        """One message alone; None when the server answers NO or sends no body (BAD still raises)."""
        resp = await client.uid_fetch(str(uid), FETCH_ITEMS)
        if resp.result != "NO":
            await _ok(resp, "UID FETCH")
        return next((m for m in parse_fetch(resp.lines) if m.uid == uid), None)

    def _count_unread(self, uidvalidity: int, unread: Sequence[int]) -> list[int]:
        """Count a failed read for each UID; those that still hold the checkpoint (the others are skipped).

        The count lives in the puller, so it survives reconnects but not a restart (which starts over at 0).
        """
        holding = []
        for uid in unread:
            key = (uidvalidity, uid)
            tries = self._failed_reads[key] = self._failed_reads.get(key, 0) + 1
            if tries < self.unreadable_tries:
                log.warning("%s: UID %d is on the server but its FETCH returned no body (attempt %d of %d); it is "
                            "fetched again later and the checkpoint stays below it", self.name, uid, tries,
                            self.unreadable_tries)
                holding.append(uid)
                continue
            del self._failed_reads[key]
            UNREADABLE.labels(self.name).inc()
            log.error("%s: UID %d could not be fetched in %d attempts: skipped, so the messages after it are "
                      "not held up; it stays on the server, unflagged, for someone to look at", self.name, uid,
                      tries)
        return holding

    async def _still_there(self, client: PullClient, uids: Sequence[int]) -> list[int]:
        resp = await client.uid_search(f"UID {uid_set(uids)}", charset=None)
        await _ok(resp, "UID SEARCH")
        asked = set(uids)
        return [u for u in parse_search(resp.lines) if u in asked]

    async def _spool_and_act(self, client: PullClient, uidvalidity: int, fetched: list[FetchedMessage],
                             through_uid: int) -> int:
        """Commit a fetched batch (spool + seen-list + checkpoint up to `through_uid`), then run and confirm
        its after-action."""
        self._note_lag(fetched)
        result: BatchResult = await self._db(self._spool_fetched, uidvalidity, fetched, through_uid)
        self._checkpoint = Checkpoint(self.name, uidvalidity, max(through_uid, self._checkpoint.last_uid
                                                                  if self._checkpoint else 0))
        if result.spooled:
            PULLED.labels(self.name).inc(len(result.spooled))
            if self._on_spooled is not None:
                self._on_spooled(len(result.spooled))
        if result.duplicates:
            DUPLICATES.labels(self.name).inc(len(result.duplicates))
            log.info("%s: %d message(s) already spooled under an older UIDVALIDITY", self.name,
                     len(result.duplicates))
        if self.after_commit_hook is not None:
            await _maybe_await(self.after_commit_hook([m.uid for m in fetched]))
        await self._after_action(client, uidvalidity, result.to_act)
        if result.already_seen:
            # Another run recorded these first; make sure their after-action is not left behind.
            await self._redo_after_actions(client)
        return len(result.spooled)

    def _spool_fetched(self, uidvalidity: int, fetched: list[FetchedMessage], through_uid: int) -> BatchResult:
        """On the store thread: envelopes from headers, then the one-transaction spool."""
        pulled = [self._pulled(m) for m in fetched]
        return spool_pulled(self.engine, self.name, uidvalidity, pulled, through_uid)

    def _pulled(self, msg: FetchedMessage) -> Pulled:
        mail_from, rcpts = envelope_from_headers(msg.raw, self.cfg.rcpt_headers)
        env = Envelope(mail_from=mail_from, rcpt_tos=rcpts, listener=self.cfg.mailbox[:64], source=self.name,
                       received_at=utcnow())
        return Pulled(msg.uid, msg.raw, env)

    def _note_lag(self, fetched: Sequence[FetchedMessage]) -> None:
        dates = [m.internaldate for m in fetched if m.internaldate is not None]
        if dates:
            LAG.labels(self.name).set(max(0.0, (utcnow() - min(dates)).total_seconds()))

    # ---------------------------------------------------------------------------------- after-action
    async def _redo_after_actions(self, client: PullClient) -> None:
        """After a crash between spool commit and after-action: act again, never spool again."""
        assert self._checkpoint is not None
        uids = await self._db(pending_after, self.engine, self.name, self._checkpoint.uidvalidity)
        if uids:
            log.info("%s: completing the after-action of %d message(s) spooled before a restart",
                     self.name, len(uids))
            for batch in chunks(uids, 500):
                await self._after_action(client, self._checkpoint.uidvalidity, batch, redo=True)

    async def _after_action(self, client: PullClient, uidvalidity: int, uids: Sequence[int], *,
                            redo: bool = False) -> None:
        """Flag, move or delete spooled messages, then confirm it in the store.

        All three are idempotent for UIDs already gone (UID commands ignore missing UIDs), which is what makes
        redoing them after a crash safe. COPY is not: a move without MOVE (COPY, STORE \\Deleted, EXPUNGE)
        redone after a fault between its steps would leave two copies in `move_to`, so the redo copies only
        what this puller has not copied yet (`_copied`, across reconnects) and what is not flagged \\Deleted
        yet (the STORE after the COPY ran, before a restart).
        """
        if not uids:
            return
        cfg = self.cfg
        uset = uid_set(uids)
        if cfg.after == "seen":
            await self._command(client.uid("store", uset, "+FLAGS.SILENT", r"(\Seen)"), "UID STORE \\Seen")
        elif cfg.after == "move" and client.has_capability("MOVE"):
            await self._command(client.uid("move", uset, quote_mailbox(cfg.move_to or "")),
                                f"UID MOVE {cfg.move_to}")
        else:
            if cfg.after == "move":
                await self._copy(client, uidvalidity, uids, redo=redo)
            await self._command(client.uid("store", uset, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE \\Deleted")
            if client.has_capability("UIDPLUS"):
                await self._command(client.uid("expunge", uset), "UID EXPUNGE")
            else:
                # Without UIDPLUS, EXPUNGE also removes what a person flagged \Deleted: that was their intent.
                await _ok(await client.expunge(), "EXPUNGE")
        await self._db(mark_after_done, self.engine, self.name, uidvalidity, list(uids))
        self._copied.difference_update((uidvalidity, uid) for uid in uids)

    async def _copy(self, client: PullClient, uidvalidity: int, uids: Sequence[int], *, redo: bool) -> None:
        """COPY to `move_to` what has not been copied already (see `_after_action`)."""
        todo = [uid for uid in uids if (uidvalidity, uid) not in self._copied]
        if todo and redo:
            resp = await client.uid_search(f"UID {uid_set(todo)} UNDELETED", charset=None)
            await _ok(resp, "UID SEARCH UNDELETED")
            undeleted = set(parse_search(resp.lines))
            todo = [uid for uid in todo if uid in undeleted]
        if todo:
            await self._command(client.uid("copy", uid_set(todo), quote_mailbox(self.cfg.move_to or "")),
                                f"UID COPY {self.cfg.move_to}")
            self._copied.update((uidvalidity, uid) for uid in todo)

    async def _command(self, command: Awaitable[aioimaplib.Response], what: str) -> aioimaplib.Response:
        """Await a command aioimaplib runs without a timer (UID STORE/COPY/MOVE/EXPUNGE), bounded by `timeout`.

        No answer in time means a half-open connection (a NAT or firewall dropped it silently): nothing more
        will arrive on it, so it is treated as lost and `run` reconnects with backoff; the after-action is
        redone from the store, which is safe because it is idempotent.
        """
        try:
            resp = await asyncio.wait_for(command, self.cfg.timeout)
        except asyncio.TimeoutError:
            raise ImapConnectionLost(f"{what}: no answer from {self.cfg.host}:{self.cfg.port} in "
                                     f"{self.cfg.timeout:g} s") from None
        return await _ok(resp, what)

    # ------------------------------------------------------------------------------------------ idle
    async def _idle(self, client: PullClient, stop: asyncio.Event) -> None:
        """IDLE until new mail (EXISTS), `idle_renew` seconds, or stop; always ends the IDLE with DONE."""
        idle = await client.idle_start(timeout=self.cfg.idle_renew)
        stopper = asyncio.create_task(stop.wait())
        try:
            while True:
                push = asyncio.create_task(client.wait_server_push(timeout=self.cfg.idle_renew + 60))
                done, _ = await asyncio.wait({push, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if push not in done:
                    push.cancel()
                    break
                lines = push.result()
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH or has_exists(lines):
                    break  # renew (the server would drop us at 30 min) or fetch the new mail
        finally:
            stopper.cancel()
            transport = client.protocol.transport
            if transport is not None and not transport.is_closing() and client.has_pending_idle():
                client.idle_done()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(idle), self.cfg.timeout)
            else:
                idle.cancel()  # the connection is gone: no DONE to send, no answer to wait for

    # ----------------------------------------------------------------------------------------- misc
    def _check_storage(self) -> None:
        """Raise StorageLow while the spool's disk is below its headroom; `run` backs off and tries again."""
        if self.free_space is not None and self.free_space.refusal() is not None:
            raise StorageLow(f"{self.free_space.free()} bytes free in {self.free_space.path}, below [storage] "
                             f"min_free_mb; nothing fetched, the mail stays on the server")

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def _set_state(self, state: str) -> None:
        CONNECTION.labels(self.name).state(state)


async def run_imap_sources(config: Config, engine: Engine, writer: Any, stop: asyncio.Event) -> None:
    """Run one puller per configured IMAP source until `stop` is set (what `mailgate serve` awaits).

    The puller writes spool rows itself (spool, seen-list and checkpoint must share a transaction), so
    `writer` is used only to wake the workers through its commit hook, when it has one.
    """
    on_commit = writer.notify_committed if writer is not None else None
    free_space = spool_free_space(config.storage_url(), config.storage.min_free_mb)
    pullers = []
    for src in config.imap:
        try:
            password = secret(src.password_env, required=True, what=f"imap source {src.name!r} password")
        except ConfigError as exc:  # one source's missing secret must not stop the others
            log.error("imap:%s not started: %s", src.name, exc)
            continue
        pullers.append(ImapPuller(src, engine, password=password, on_spooled=on_commit, free_space=free_space))
    if not pullers:
        return
    try:
        await asyncio.gather(*(p.run(stop) for p in pullers))
    finally:
        for p in pullers:
            p.close()


# -------------------------------------------------------------------------------------------- helpers
async def _ok(resp: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if resp.result != "OK":
        raise ImapCommandFailed(f"{what} failed: {resp.result} {_text(resp)}")
    return resp


def _text(resp: aioimaplib.Response) -> str:
    last = resp.lines[-1] if resp.lines else b""
    return bytes(last).decode("utf-8", "replace") if isinstance(last, (bytes, bytearray)) else str(last)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value


def _drop(client: PullClient) -> None:
    """Close the socket without a LOGOUT round trip (used on faults and after logout)."""
    transport = getattr(client.protocol, "transport", None)
    if transport is not None and not transport.is_closing():
        transport.close()
