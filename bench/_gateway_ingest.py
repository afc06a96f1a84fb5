"""Target (c)/(d): the gateway's listeners and spool only (no workers), as `mailgate serve` runs them.

Usage: python bench/_gateway_ingest.py STORAGE_URL  → prints the SMTP port, runs until killed.
"""

import asyncio
import sys
import tempfile

from gateway.config import parse_config
from gateway.serve import start_gateway


async def main(url: str) -> None:
    config = parse_config({
        "listeners": [{"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": 0,
                       "max_message_size": 64 * 1024 * 1024}],
        "storage": {"url": url}, "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
    }, base_dir=tempfile.gettempdir())
    gw = await start_gateway(config, workers=False)
    print(gw.ports["smtp"], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main(sys.argv[1]))
    except ImportError:
        asyncio.run(main(sys.argv[1]))
