"""The one registry pattern: unknown names list the valid ones, re-registration warns."""
from __future__ import annotations

import pytest

from gmr.registry import Registry, UnknownNameError


def _registry() -> Registry:
    reg = Registry("widget")
    reg.register("beta", size=2)(lambda: "b")
    reg.register("alpha", size=1)(lambda: "a")
    return reg


def test_lookup_and_listing():
    reg = _registry()
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("alpha")() == "a"
    assert reg.entry("beta").meta == {"size": 2}
    assert "alpha" in reg and "gamma" not in reg
    assert [e.name for e in reg] == ["alpha", "beta"]


def test_unknown_name_lists_valid_names():
    reg = _registry()
    with pytest.raises(UnknownNameError) as info:
        reg.get("alpah")
    message = str(info.value)
    assert "widget" in message and "'alpah'" in message
    assert "alpha" in message.split("valid")[1] and "beta" in message.split("valid")[1]
    assert isinstance(info.value, ValueError)  # the CLI turns ValueErrors into exit code 2
    assert "\n" not in message


def test_overwrite_warns_and_replaces():
    reg = _registry()
    with pytest.warns(UserWarning, match="alpha"):
        reg.register("alpha", size=3)(lambda: "a2")
    assert reg.get("alpha")() == "a2"
    assert reg.entry("alpha").meta == {"size": 3}
    assert reg.names() == ["alpha", "beta"]


def test_first_registration_does_not_warn(recwarn):
    reg = Registry("widget")
    reg.register("x")(object())
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("module, registry, kind", [
    ("gmr.data", "DATASETS", "dataset"), ("gmr.models", "MODELS", "model"),
    ("gmr.attacks", "ATTACKS", "attack"), ("gmr.methods", "METHODS", "method")])
def test_project_registries_name_their_kind(module, registry, kind):
    import importlib

    reg = getattr(importlib.import_module(module), registry)
    assert reg.names()
    with pytest.raises(UnknownNameError, match=f"unknown {kind} 'nope'; valid {kind}s: "):
        reg.entry("nope")
