"""The JSON Schemas of every record this suite writes (run, eval, audit, card), and their validator.

Each record carries `schema: "gmr.<kind>/<version>"`; the file `<kind>.schema.json` beside this module
describes it. Tests validate real records against them.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any

KINDS = ("run", "eval", "audit", "card")


@lru_cache(maxsize=None)
def _schema(kind: str) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return json.loads(resources.files(__name__).joinpath(f"{kind}.schema.json").read_text())


def load_schema(kind: str) -> dict:
    """The JSON Schema of one record kind (a copy: callers may change it)."""
    return copy.deepcopy(_schema(kind))


def validate(record: Any, kind: str) -> None:
    """Raise jsonschema.ValidationError when `record` does not follow the schema of `kind`."""
    import jsonschema

    jsonschema.validate(record, _schema(kind))
