"""The Odoo adapter: one `OdooClient` interface, two transports (odoorpc `/jsonrpc`, Odoo 19 JSON-2).

`connect(config.odoo)` picks the transport (config, or the server's version when `protocol = "auto"`).
The adapter translates; it does not decide: delivery decides what to call.
"""

from gateway.odoo.client import OdooClient, connect, one_id

__all__ = ["OdooClient", "connect", "one_id"]
