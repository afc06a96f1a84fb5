"""The README's configuration reference names every key the config accepts (docs that cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from gateway.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        out.add(name)
        ann = field.annotation
        for inner in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                out |= _keys(inner)
    return out


def test_readme_documents_every_config_key() -> None:
    text = README.read_text()
    reference = text[text.index("## Configuration reference"):]
    documented = set(re.findall(r"`([a-z_0-9]+)`", reference))
    for section in re.findall(r"`\[{1,2}([a-z_.]+)\]{1,2}`", reference):  # `[odoo]`, `[[events.webhooks]]`
        documented |= set(section.split("."))
    missing = sorted(_keys(Config) - documented)
    assert not missing, f"README's configuration reference lacks: {missing}"


def test_example_config_is_valid_and_matches_the_contract() -> None:
    from gateway.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "mailgate.toml")
    kinds = {(lc.kind, lc.host, lc.port) for lc in cfg.listeners}
    assert ("smtp", "127.0.0.1", 2525) in kinds and ("lmtp", "127.0.0.1", 2424) in kinds
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 8025)
    assert cfg.storage_url().startswith("sqlite:///") and "config/var/" in cfg.storage_url()
    table = cfg.alias_table()
    dom = table.domain("example.test")
    assert dom is not None and dom.strict and dom.catchall_address == "catchall@example.test"
    assert dom.bounce_address == "bounce@example.test"
    assert table.alias("sales@example.test").model == "crm.lead"  # type: ignore[union-attr]
    assert table.alias("support@example.test").model == "helpdesk.ticket"  # type: ignore[union-attr]
