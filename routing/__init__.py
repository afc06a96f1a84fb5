"""Pure routing decisions: parse, classify, thread, decide. No network, no database."""
