"""Detectors for non-standard NDRs: one small module per family, tried in order (flufl.bounce's design).

`DETECTORS` is ordered from the most specific layout to the most general sentence patterns; the first
detector that recognises at least one recipient wins, so a general pattern never overrides a precise one.
Each detector is also usable alone (tests/test_bounce_detectors.py runs each against its own samples).
RFC 3464 DSNs are not here: routing/dsn.py reads them before any detector runs.
"""

from __future__ import annotations

from routing.detectors.aol import AolDetector
from routing.detectors.base import Detector, Hit
from routing.detectors.domino import DominoDetector
from routing.detectors.exchange import ExchangeDetector
from routing.detectors.exim import EximDetector
from routing.detectors.groupwise import GroupwiseDetector
from routing.detectors.phquery import PhqueryDetector
from routing.detectors.postfix import PostfixDetector
from routing.detectors.qmail import QmailDetector
from routing.detectors.recipient_list import RecipientListDetector
from routing.detectors.sendmail import SendmailDetector
from routing.detectors.simple import SimpleDetector
from routing.detectors.smtp32 import Smtp32Detector
from routing.detectors.x_failed_recipients import XFailedRecipientsDetector
from routing.detectors.yahoo import YahooDetector

DETECTORS: tuple[Detector, ...] = (
    PostfixDetector(),
    EximDetector(),
    SendmailDetector(),
    QmailDetector(),
    ExchangeDetector(),
    DominoDetector(),
    GroupwiseDetector(),
    AolDetector(),
    Smtp32Detector(),
    PhqueryDetector(),
    YahooDetector(),
    RecipientListDetector(),
    SimpleDetector(),
    XFailedRecipientsDetector(),
)

__all__ = ["DETECTORS", "Detector", "Hit"]
