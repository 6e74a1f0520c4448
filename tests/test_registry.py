"""The registry and every registered variant (parametrized over the registry, timm-style)."""
import pytest
import torch

import attnzoo
from attnzoo import registry
from attnzoo.errors import UnknownVariantError
from attnzoo.ops import use_backend

from oracle import REFERENCES

VARIANTS = attnzoo.list_variants()


def test_builtin_names_from_design_are_registered():
    for name in ("mha", "mqa", "gqa"):
        assert name in VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_registry_has_reference(name):
    assert _reference(name) is not None, (f"variant {name!r} has no float64 reference (tests/oracle.py for attnzoo's "
                                          "own, the entry's reference= for plugins)")


def _reference(name):
    return REFERENCES.get(name) or registry.get(name).reference


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_variant_forward_backward_matches_reference(name, causal):
    entry = registry.get(name)
    opts = dict(entry.example)
    if "causal" in entry.config_cls.option_names():
        opts["causal"] = causal
    if causal and getattr(entry.config_cls, "encoder_only", False):  # refuses causal=True, saying why
        with pytest.raises(ValueError, match="causal=True"):
            attnzoo.create(name, **opts)
        return
    m = attnzoo.create(name, **opts).double()
    x = torch.randn(2, 9, opts["dim"], dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    y = m(x, key_padding_mask=kpm)
    ref = _reference(name)(m, x, key_padding_mask=kpm)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *m.parameters()], g)
    want = torch.autograd.grad(ref, [x, *m.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_gradcheck(name):
    entry = registry.get(name)
    opts = {**entry.example, "dim": 8, "heads": 2}
    if "groups" in opts:
        opts["groups"] = 1
    m = attnzoo.create(name, **opts).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    with use_backend("eager"):
        assert torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_round_trips_through_dict(name):
    entry = registry.get(name)
    cfg = entry.make_config(**entry.example)
    again = entry.config_cls.from_options(name, **cfg.to_dict())
    assert again == cfg


def test_unknown_variant_suggests_close_names():
    with pytest.raises(UnknownVariantError, match="Did you mean 'gqa'"):
        attnzoo.create("gqaa", dim=8, heads=2)


def test_duplicate_registration_raises():
    from attnzoo.variants.dense import DenseAttention, GQAConfig

    with pytest.raises(ValueError, match="already registered"):
        attnzoo.register("gqa", GQAConfig)(DenseAttention)


def test_register_checks_its_arguments():
    with pytest.raises(ValueError, match="lower-case"):
        attnzoo.register("Bad Name", object)
    with pytest.raises(TypeError, match="config_cls"):
        attnzoo.register("fine_name", object)


def test_list_variants_pattern():
    assert attnzoo.list_variants("*qa") == ["gqa", "mqa"]
    assert attnzoo.list_variants("nothing*") == []


def test_entry_point_plugins_are_loaded(monkeypatch):
    """A third-party package registers through the 'attnzoo.variants' entry-point group."""
    from dataclasses import dataclass
    import importlib.metadata as md

    from attnzoo.variants import DenseAttention, DenseConfig

    calls = []

    @dataclass(frozen=True)
    class PluginConfig(DenseConfig):
        pass

    def plugin():
        calls.append(1)
        attnzoo.register("plugin_attn", PluginConfig, example={"dim": 8, "heads": 2})(DenseAttention)

    class EP:
        name, value = "plugin_attn", "plugin:register"

        def load(self):
            return plugin

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()] if group == registry.ENTRY_POINT_GROUP else [])
    try:
        m = attnzoo.create("plugin_attn", dim=8, heads=2)
        assert isinstance(m, DenseAttention) and calls == [1]
    finally:
        registry._REGISTRY.pop("plugin_attn", None)


def test_broken_plugin_does_not_break_the_zoo(monkeypatch, caplog):
    import importlib.metadata as md

    class EP:
        name, value = "broken", "nowhere:fn"

        def load(self):
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()])
    assert "gqa" in attnzoo.list_variants()
    assert "could not load variant plugin 'broken'" in caplog.text


def test_every_module_of_the_variants_package_is_imported_with_it():
    """A new family file registers itself: ``attnzoo.variants`` imports each of its modules (CONTRIBUTING's
    checklist needs no line in ``variants/__init__.py``)."""
    import pkgutil
    import sys

    import attnzoo.variants as zoo

    names = [m.name for m in pkgutil.iter_modules(zoo.__path__)]
    assert names and all(f"attnzoo.variants.{n}" in sys.modules for n in names)
