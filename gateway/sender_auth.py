"""Sender authentication: SPF, DKIM and DMARC for one inbound mail, so a forged From cannot pass `partners`.

Why: Odoo checks an alias's contact policy (`partners`, `followers`, `employees`) against the From address
alone, and a From costs nothing to forge (spec §5.9). DMARC (RFC 7489) is the domain owner saying "mail that
claims to be from us and is neither SPF- nor DKIM-authenticated *in alignment* with the From domain is not
ours". The router uses the result to keep such mail away from restricted aliases (routing.router).

This module is the I/O adapter: it asks DNS through the `dns.resolver.Resolver` it is given (tests point it at
a local server), runs pyspf and dkimpy, and evaluates DMARC with the small pure functions below
(`parse_dmarc_record`, `organizational_domain`, `aligned`, `evaluate_dmarc`). It never raises: a DNS failure
is `temperror`, and the router fails open on it (a slow DNS must not quarantine a customer's mail).

pyspf looks names up through its module-level `DNSLookup`; we install a lookup that uses the resolver of the
current call (a context variable) and falls back to pyspf's own when none is set, so the gateway's
nameservers and timeouts apply and pyspf's use of the deprecated `dns.resolver.query` is bypassed.

Behind another MTA the gateway does not see the client IP, so SPF cannot be checked here: set
`[auth] trust_authentication_results_from` to that MTA's authserv-id, and its Authentication-Results header
(RFC 8601) gives SPF/DKIM; the DMARC policy is still looked up here.
"""

from __future__ import annotations

import contextvars
import email.utils
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dkim
import dns.exception
import dns.rdatatype
import dns.resolver
import spf

log = logging.getLogger(__name__)

DmarcResult = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["reject", "quarantine", "none"]

#: Second-level public suffixes under which registrations happen one label deeper (a small public-suffix rule:
#: the organisational domain is the last two labels, or three under one of these).
SECOND_LEVEL_SUFFIXES: frozenset[str] = frozenset({
    "co.uk", "org.uk", "ac.uk", "gov.uk", "ltd.uk", "plc.uk", "me.uk", "net.uk",
    "com.au", "net.au", "org.au", "edu.au", "gov.au",
    "co.nz", "org.nz", "net.nz", "co.jp", "ne.jp", "or.jp", "ac.jp", "co.za", "org.za",
    "com.br", "net.br", "org.br", "com.cn", "net.cn", "org.cn", "com.mx", "com.ar", "com.tr", "co.in",
    "co.kr", "co.il", "com.sg", "com.hk", "com.tw", "co.id", "com.my", "com.pl", "co.at", "or.at",
})


# --- pure parts ---------------------------------------------------------------------------------------------

def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2 with a small public-suffix rule: last two labels, or three under a known 2nd-level suffix."""
    labels = [x for x in domain.lower().rstrip(".").split(".") if x]
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in SECOND_LEVEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(identifier: str | None, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): strict = same domain, relaxed = same organisational domain."""
    if not identifier:
        return False
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


class DmarcRecordError(ValueError):
    """A `v=DMARC1` TXT record that cannot be used; the message says which tag is wrong."""


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of one DMARC record that matter to a receiver that enforces but does not report."""

    p: Policy
    sp: Policy | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: str | None = None


_POLICIES = ("none", "quarantine", "reject")


def is_dmarc_record(text: str) -> bool:
    """RFC 7489 §6.6.3: only TXT records whose first tag is v=DMARC1 are DMARC records."""
    first = text.strip().split(";", 1)[0].strip()
    name, _, value = first.partition("=")
    return name.strip().lower() == "v" and value.strip() == "DMARC1"


def parse_dmarc_record(text: str) -> DmarcRecord:
    """Parse a DMARC record; unknown tags are ignored (the RFC wants them ignored), bad values raise.

    An invalid or missing p= with a reporting address is read as p=none (RFC 7489 §6.6.3).
    """
    if not is_dmarc_record(text):
        raise DmarcRecordError("does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if not eq:
            raise DmarcRecordError(f"tag {name!r} has no value")
        tags.setdefault(name, value.strip())
    rua = tags.get("rua") or None
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if rua and "mailto:" in rua.lower():
            return DmarcRecord(p="none", rua=rua)
        raise DmarcRecordError(f"p={tags.get('p', '(missing)')!r} is not none, quarantine or reject")
    sp = tags.get("sp", "").lower() or None
    if sp is not None and sp not in _POLICIES:
        raise DmarcRecordError(f"sp={tags['sp']!r} is not none, quarantine or reject")
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    for name, value in (("adkim", adkim), ("aspf", aspf)):
        if value not in ("r", "s"):
            raise DmarcRecordError(f"{name}={value!r} is not r or s")
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        raise DmarcRecordError(f"pct={tags['pct']!r} is not a number") from None
    if not 0 <= pct <= 100:
        raise DmarcRecordError(f"pct={pct} is not within 0-100")
    return DmarcRecord(p=p, sp=sp, adkim=adkim, aspf=aspf, pct=pct, rua=rua)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature: the signing domain (d=), selector (s=) and its result (RFC 8601 vocabulary)."""

    domain: str | None
    selector: str | None
    result: str  # pass | fail | temperror | permerror
    reason: str = field(default="", compare=False)  # dkimpy's words when it did not pass

    def describe(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"dkim={self.result} (d={self.domain or '?'}, s={self.selector or '?'}{why})"


def evaluate_dmarc(from_domain: str, record: DmarcRecord, record_domain: str, *, spf_result: str,
                   spf_domain: str | None, dkim_results: Sequence[DkimResult]) -> tuple[DmarcResult, Policy, list[str]]:
    """DMARC verdict for a From domain given its record and the SPF/DKIM results (RFC 7489 §3.1, §6.6.2).

    Pass needs one *aligned* pass. A fail where an aligned check could not be completed (DNS temperror) is
    `temperror`: we cannot tell a forgery from a DNS hiccup, and the caller fails open on it.
    Returns (result, the policy that applies — sp= for a subdomain covered by its organisation's record —,
    explanation lines).
    """
    lines: list[str] = []
    policy: Policy = record.p
    if record_domain != from_domain and record.sp is not None:
        policy = record.sp
    spf_aligned = aligned(spf_domain, from_domain, record.aspf)
    lines.append(f"SPF {spf_result} for {spf_domain or '(no domain)'}, "
                 f"{'aligned' if spf_aligned else 'not aligned'} with {from_domain} (aspf={record.aspf})")
    dkim_aligned = [r for r in dkim_results if aligned(r.domain, from_domain, record.adkim)]
    for r in dkim_results:
        lines.append(f"{r.describe()}, {'aligned' if r in dkim_aligned else 'not aligned'} with {from_domain} "
                     f"(adkim={record.adkim})")
    if not dkim_results:
        lines.append("no DKIM signature")
    if (spf_result == "pass" and spf_aligned) or any(r.result == "pass" for r in dkim_aligned):
        return "pass", policy, lines
    if (spf_aligned and spf_result == "temperror") or any(r.result == "temperror" for r in dkim_aligned):
        lines.append("an aligned check hit a DNS error: temperror, not fail")
        return "temperror", policy, lines
    if record.pct < 100:
        lines.append(f"pct={record.pct}: applied to every message (quarantine is releasable)")
    return "fail", policy, lines


# --- results ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthResults:
    """SPF, DKIM and DMARC for one mail. `verdict` is what the router reads (RoutingEnvelope.dmarc)."""

    spf: str
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    policy: Policy | None
    from_domain: str | None
    explanation: tuple[str, ...] = field(default=())

    @property
    def verdict(self) -> str:
        """"pass", "fail:<policy>", "none", "temperror" or "permerror" (RoutingEnvelope.dmarc)."""
        if self.dmarc == "fail":
            return f"fail:{self.policy or 'none'}"
        return self.dmarc

    def to_json(self) -> dict[str, Any]:
        return {"spf": self.spf, "dkim": [{"domain": r.domain, "selector": r.selector, "result": r.result}
                                          for r in self.dkim],
                "dmarc": self.dmarc, "policy": self.policy, "from_domain": self.from_domain,
                "explanation": list(self.explanation)}


# --- DNS ----------------------------------------------------------------------------------------------------

def make_resolver(nameservers: Sequence[str] = (), *, port: int = 53, timeout: float = 2.0) -> dns.resolver.Resolver:
    """A resolver for `[auth]`: the given nameservers (or the system's), short timeouts, a small cache.

    Raises `dns.resolver.NoResolverConfiguration` when no nameserver is given and the system has none.
    """
    res = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        res.nameservers = list(nameservers)
    res.port = port
    res.timeout = timeout
    res.lifetime = timeout
    res.cache = dns.resolver.LRUCache(4096)
    return res


class _TempDNSError(Exception):
    pass


def _txt(resolver: dns.resolver.Resolver, name: str, timeout: float) -> list[str] | None:
    """TXT strings at `name` (each record's strings joined); None when the name or type does not exist."""
    try:
        answer = resolver.resolve(name, "TXT", lifetime=timeout, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.DNSException as exc:
        raise _TempDNSError(f"{name} TXT: {exc.__class__.__name__}: {exc}") from exc
    if answer.rrset is None:
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


_current_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "mailgate_spf_resolver", default=None)
_pyspf_lookup = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup contract, through the resolver of the current check (see module docstring)."""
    resolver = _current_resolver.get()
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    try:
        # pyspf hands each lookup its whole remaining budget; one lookup gets no more than the resolver's own.
        answer = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime), search=False,
                                  raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {name} {qtype}: {exc.__class__.__name__}") from exc
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer.rrset or ():
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _spf_lookup


# --- the three checks ---------------------------------------------------------------------------------------

def _domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip().strip(">").lower().rstrip(".") or None


def header_block(raw: bytes) -> bytes:
    """The header section of a raw message (DMARC and Authentication-Results only need headers)."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    return raw[:min(ends)] if ends else raw


def _headers(raw: bytes, name: str) -> list[str]:
    """Unfolded values of every `name:` header, top first."""
    out: list[str] = []
    current: list[str] | None = None
    prefix = name.lower().encode() + b":"
    for line in header_block(raw).replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and current is not None:
            current.append(line.decode("utf-8", "replace").strip())
            continue
        if current is not None:
            out.append(" ".join(current))
            current = None
        if line.lower().startswith(prefix):
            current = [line[len(prefix):].decode("utf-8", "replace").strip()]
    if current is not None:
        out.append(" ".join(current))
    return out


def from_domains(raw: bytes) -> list[str]:
    """Domains of the RFC5322.From addresses (DMARC's subject); more than one domain is a permerror."""
    values = _headers(raw, "From")
    domains: list[str] = []
    for _, addr in email.utils.getaddresses(values):
        d = _domain_of(addr)
        if d and d not in domains:
            domains.append(d)
    return domains


def check_spf(*, client_ip: str | None, mail_from: str, helo: str | None, resolver: dns.resolver.Resolver,
              timeout: float) -> tuple[str, str | None, str]:
    """SPF (RFC 7208) of MAIL FROM, or of postmaster@HELO for the null sender. → (result, domain, note)."""
    domain = _domain_of(mail_from) or (helo.lower().rstrip(".") if helo else None)
    if not client_ip:
        return "none", domain, "SPF not checked: no client IP (IMAP source or unknown peer)"
    if not domain:
        return "none", None, "SPF not checked: no MAIL FROM domain and no HELO"
    sender = mail_from if _domain_of(mail_from) else f"postmaster@{domain}"
    token = _current_resolver.set(resolver)
    try:
        result, _code, text = spf.query(i=client_ip, s=sender, h=helo or domain, timeout=timeout,
                                        querytime=timeout * 5).check()
    except Exception as exc:  # noqa: BLE001 - pyspf raising on odd input must not stop routing
        return "temperror", domain, f"SPF check failed: {exc.__class__.__name__}: {exc}"
    finally:
        _current_resolver.reset(token)
    return str(result), domain, f"SPF {result} for {sender} from {client_ip}: {text}"


#: dkimpy logs every unverifiable signature at ERROR; its reasons are kept in DkimResult.reason instead, so its
#: logger is detached from the hierarchy (mail from the internet must not fill the operator's error log).
_DKIMPY_LOG = logging.Logger("mailgate.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())


def check_dkim(raw: bytes, *, resolver: dns.resolver.Resolver, timeout: float) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature (RFC 6376); a key that DNS could not fetch is temperror, not fail."""
    try:
        signer = dkim.DKIM(raw, logger=_DKIMPY_LOG, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - unparsable for dkimpy: nothing verifiable
        log.debug("dkimpy cannot parse the message: %s", exc)
        return ()
    count = sum(1 for name, _ in signer.headers if name.lower() == b"dkim-signature")
    results: list[DkimResult] = []
    for idx in range(count):
        state = {"temp": False, "missing": False}

        def lookup(name: bytes | str, timeout: float = timeout) -> bytes | None:
            qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            try:
                strings = _txt(resolver, qname, timeout)
            except _TempDNSError as exc:
                state["temp"] = True
                raise dkim.DnsTimeoutError(str(exc)) from exc
            if not strings:
                state["missing"] = True
                return None
            return strings[0].encode()

        signer.domain = None
        signer.selector = None
        reason = ""
        try:
            ok = signer.verify(idx=idx, dnsfunc=lookup)
            result = "pass" if ok else "temperror" if state["temp"] else "permerror" if state["missing"] else "fail"
            reason = ("" if ok else "key lookup failed" if state["temp"] else "no key in DNS" if state["missing"]
                      else "signature does not verify")
        except dkim.ValidationError as exc:
            # A body altered in transit (or by a forger) is a failed signature; a malformed one is permerror.
            result = "fail" if "body hash mismatch" in str(exc) else "permerror"
            reason = str(exc)[:120]
        except Exception as exc:  # noqa: BLE001 - dkimpy on hostile input: the signature is unusable
            result = "permerror"
            reason = f"{exc.__class__.__name__}: {exc}"[:120]
        d = signer.domain.decode("ascii", "replace").lower() if isinstance(signer.domain, bytes) else None
        s = signer.selector.decode("ascii", "replace") if isinstance(signer.selector, bytes) else None
        results.append(DkimResult(domain=d, selector=s, result=result, reason=reason))
    return tuple(results)


def fetch_dmarc(from_domain: str, *, resolver: dns.resolver.Resolver,
                timeout: float) -> tuple[DmarcRecord | None, str, str | None, str]:
    """Find the DMARC record for a From domain: `_dmarc.<domain>`, then the organisational domain's.

    → (record or None, the domain it was found at, error "temperror"/"permerror" or None, note).
    """
    org = organizational_domain(from_domain)
    for domain in dict.fromkeys((from_domain, org)):
        try:
            texts = _txt(resolver, f"_dmarc.{domain}", timeout)
        except _TempDNSError as exc:
            return None, domain, "temperror", f"DMARC record lookup failed: {exc}"
        records = [t for t in texts or () if is_dmarc_record(t)]
        if len(records) > 1:
            return None, domain, None, f"_dmarc.{domain} has {len(records)} DMARC records: none applies"
        if records:
            try:
                return parse_dmarc_record(records[0]), domain, None, f"_dmarc.{domain}: {records[0]}"
            except DmarcRecordError as exc:
                return None, domain, "permerror", f"_dmarc.{domain} is not a valid DMARC record: {exc}"
    return None, org, None, f"no DMARC record at _dmarc.{from_domain}" + (
        f" or _dmarc.{org}" if org != from_domain else "")


# --- Authentication-Results from a trusted upstream MTA -----------------------------------------------------

_COMMENT = re.compile(r"\([^()]*\)")


def trusted_results(raw: bytes, authserv_id: str) -> dict[str, Any] | None:
    """SPF/DKIM/DMARC results from the topmost Authentication-Results header (RFC 8601) of `authserv_id`.

    Only the topmost one: the trusted MTA prepends its own and removes forged copies that claim its id;
    anything below may come from the sender. → {"spf": (result, domain), "dkim": [DkimResult],
    "dmarc": result or None, "policy_hint": p= from a comment or None}, or None when there is no such header.
    """
    for value in _headers(raw, "Authentication-Results"):
        head, _, rest = value.partition(";")
        if not head.split() or head.split()[0].lower() != authserv_id.lower():
            continue
        hint = re.search(r"\bp=(reject|quarantine|none)\b", value, re.I)
        out: dict[str, Any] = {"spf": ("none", None), "dkim": [], "dmarc": None,
                               "policy_hint": hint.group(1).lower() if hint else None}
        for part in _COMMENT.sub(" ", rest).split(";"):
            m = re.match(r"\s*([\w-]+)\s*=\s*([\w-]+)(.*)", part)
            if not m:
                continue
            method, result, props = m.group(1).lower(), m.group(2).lower(), m.group(3)
            prop = dict((k.lower(), v) for k, v in re.findall(r"([\w-]+\.[\w-]+)\s*=\s*(\S+)", props))
            if method == "spf":
                domain = _domain_of(prop.get("smtp.mailfrom")) or prop.get("smtp.mailfrom") \
                    or prop.get("smtp.helo")
                out["spf"] = (result, domain.lower() if domain else None)
            elif method == "dkim":
                d = prop.get("header.d") or _domain_of(prop.get("header.i"))
                out["dkim"].append(DkimResult(domain=d.lower() if d else None, selector=prop.get("header.s"),
                                              result=result))
            elif method == "dmarc":
                out["dmarc"] = result
        return out
    return None


# --- the one call -------------------------------------------------------------------------------------------

def check_sender(raw: bytes, *, mail_from: str, client_ip: str | None, helo: str | None,
                 resolver: dns.resolver.Resolver, timeout: float = 2.0,
                 trusted_authserv_id: str | None = None) -> AuthResults:
    """SPF + DKIM + DMARC for one mail. Never raises: anything unexpected is a logged temperror."""
    try:
        return _check(raw, mail_from=mail_from, client_ip=client_ip, helo=helo, resolver=resolver,
                      timeout=timeout, trusted_authserv_id=trusted_authserv_id)
    except Exception as exc:  # noqa: BLE001 - authentication is advisory; routing must go on
        log.warning("sender authentication failed: %s: %s (treated as temperror)", exc.__class__.__name__, exc)
        return AuthResults(spf="temperror", dkim=(), dmarc="temperror", policy=None, from_domain=None,
                           explanation=(f"sender authentication failed: {exc.__class__.__name__}: {exc}",))


def _check(raw: bytes, *, mail_from: str, client_ip: str | None, helo: str | None,
           resolver: dns.resolver.Resolver, timeout: float, trusted_authserv_id: str | None) -> AuthResults:
    why: list[str] = []
    domains = from_domains(raw)
    from_domain = domains[0] if len(domains) == 1 else None

    upstream = trusted_results(raw, trusted_authserv_id) if trusted_authserv_id else None
    spf_unchecked = upstream is None and (bool(trusted_authserv_id) or not client_ip)
    if upstream is not None:
        spf_result, spf_domain = upstream["spf"]
        dkim_results: tuple[DkimResult, ...] = tuple(upstream["dkim"])
        why.append(f"Authentication-Results of {trusted_authserv_id} (trusted): spf={spf_result}, "
                   + (", ".join(r.describe() for r in dkim_results) or "no dkim")
                   + (f", dmarc={upstream['dmarc']}" if upstream["dmarc"] else ""))
    else:
        if trusted_authserv_id:
            why.append(f"no Authentication-Results of {trusted_authserv_id}: SPF not checked (the client IP is "
                       "the upstream MTA's); DKIM checked here")
            spf_result, spf_domain = "none", _domain_of(mail_from) or helo
        else:
            spf_result, spf_domain, note = check_spf(client_ip=client_ip, mail_from=mail_from, helo=helo,
                                                     resolver=resolver, timeout=timeout)
            why.append(note)
        dkim_results = check_dkim(raw, resolver=resolver, timeout=timeout)

    def done(dmarc: DmarcResult, policy: Policy | None) -> AuthResults:
        return AuthResults(spf=spf_result, dkim=dkim_results, dmarc=dmarc, policy=policy, from_domain=from_domain,
                           explanation=tuple(why))

    if len(domains) > 1:
        why.append(f"From names {len(domains)} domains ({', '.join(domains)}): DMARC permerror")
        return done("permerror", None)
    if from_domain is None:
        why.append("no From domain: DMARC not applicable")
        return done("none", None)

    record, record_domain, error, note = fetch_dmarc(from_domain, resolver=resolver, timeout=timeout)
    why.append(note)
    if upstream is not None and upstream["dmarc"] in ("pass", "fail", "none", "temperror", "permerror"):
        result: DmarcResult = upstream["dmarc"]
        policy: Policy | None = None
        if record is not None:
            policy = record.sp if record_domain != from_domain and record.sp else record.p
        elif upstream["policy_hint"]:
            policy = upstream["policy_hint"]
            why.append(f"policy p={policy} taken from the trusted header's comment")
        why.append(f"DMARC {result} for {from_domain} (from {trusted_authserv_id})"
                   + (f", policy {policy}" if policy else ""))
        return done(result, policy)
    if error is not None:
        return done(error, None)  # type: ignore[arg-type]
    if record is None:
        return done("none", None)
    result, policy, lines = evaluate_dmarc(from_domain, record, record_domain, spf_result=spf_result,
                                           spf_domain=spf_domain, dkim_results=dkim_results)
    why.extend(lines)
    if result == "fail" and spf_unchecked:
        # Without the client IP a sender that relies on SPF alone looks exactly like a forger: not enforced.
        why.append(f"DMARC would fail for {from_domain} (policy {policy}), but SPF could not be checked here: "
                   "temperror, not enforced (behind another MTA or for IMAP, set [auth] "
                   "trust_authentication_results_from)")
        return done("temperror", policy)
    why.append(f"DMARC {result} for {from_domain}, policy {policy}")
    return done(result, policy)


def describe(results: AuthResults) -> tuple[str, ...]:
    """The lines the router echoes into a decision's explanation (prefixed so they read as one block)."""
    return tuple(f"sender authentication: {line}" for line in results.explanation)


def check_from_config(raw: bytes, auth: Any, resolver: dns.resolver.Resolver, *, mail_from: str,
                      client_ip: str | None, helo: str | None) -> AuthResults:
    """`check_sender` with the `[auth]` section's timeout and trusted authserv-id."""
    return check_sender(raw, mail_from=mail_from, client_ip=client_ip, helo=helo, resolver=resolver,
                        timeout=auth.timeout, trusted_authserv_id=auth.trust_authentication_results_from)


__all__ = [
    "AuthResults", "DkimResult", "DmarcRecord", "DmarcRecordError", "aligned", "check_dkim", "check_sender",
    "check_spf", "evaluate_dmarc", "fetch_dmarc", "make_resolver", "organizational_domain", "parse_dmarc_record",
    "trusted_results",
]
