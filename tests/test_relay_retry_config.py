"""[outbound] retry bounds: the interval doubles from retry_min_seconds up to retry_max_seconds."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, OutboundConfig, parse_config


def test_retry_min_above_retry_max_is_a_config_error() -> None:
    """OutboundConfig(retry_min_seconds=5000, retry_max_seconds=10) was accepted: every interval was the max."""
    with pytest.raises(ConfigError, match=r"outbound: .*retry_min_seconds \(5000\) is above retry_max_seconds \(10\)"):
        parse_config({"outbound": {"retry_min_seconds": 5000, "retry_max_seconds": 10}}, base_dir=".")


def test_the_defaults_and_equal_bounds_are_accepted() -> None:
    assert OutboundConfig().retry_min_seconds <= OutboundConfig().retry_max_seconds
    assert parse_config({"outbound": {"retry_min_seconds": 600, "retry_max_seconds": 600}},
                        base_dir=".").outbound.retry_max_seconds == 600
