"""Everything that does I/O: listeners, spool, workers, Odoo adapter, relay, tracking, events, CLI."""
