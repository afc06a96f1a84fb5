"""Locating the shared, labelled real-world corpus (read-only; never copied into the project).

Tests that use it call `corpus_dir(folder)`, which skips the test cleanly when `../shared/corpus` is absent
(a user's fresh clone). `MAILGATE_CORPUS` points elsewhere if needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def corpus_root() -> Path | None:
    env = os.environ.get("MAILGATE_CORPUS")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "corpus"]:
        if cand.is_dir():
            return cand
    return None


def corpus_dir(folder: str) -> Path:
    root = corpus_root()
    if root is None or not (root / folder).is_dir():
        pytest.skip(f"shared corpus folder {folder!r} not present (../shared/corpus)")
    return root / folder


def labels(folder: str) -> list[dict[str, Any]]:
    path = corpus_dir(folder) / "labels.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def message_files(root: Path) -> list[Path]:
    """Every message file under a corpus root (mbox files included as whole files), labels and licences left out."""
    out: list[Path] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix not in {".json", ".jsonl", ".md", ".sha256"} \
                    and not path.name.startswith(("LICENSE", "COPYING", "MIT-LICENSE", "README")) \
                    and "LICENSES" not in path.parts and not path.name.endswith("imaptest-script"):
                out.append(path)
    return out


def all_corpus_files() -> list[Path]:
    """Every message file in every corpus folder; empty when the corpus is absent."""
    root = corpus_root()
    return message_files(root) if root is not None else []
