"""The method registry: defaults per benchmark family, import targets, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from bench.errors import MetabenchError, UnknownNameError
from baselines import registry


def test_every_entry_constructs_with_its_defaults():
    for name, entry in registry.METHODS.items():
        cls = registry.import_target(entry.target)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, params in entry.defaults.items():
            assert set(params) <= fields, (name, key, set(params) - fields)
        for family, way in (("omniglot", 5), ("omniglot", 20), ("miniimagenet", 5)):
            m = registry.make(name, family, way, seed=4)
            assert m.seed == 4


def test_maml_paper_defaults():
    assert registry.defaults("maml", "omniglot", 5)["inner_lr"] == 0.4
    assert registry.defaults("maml", "omniglot", 20)["inner_steps"] == 5
    assert registry.defaults("maml", "miniimagenet", 5)["hidden"] == 32
    assert registry.defaults("fomaml", "omniglot", 5)["first_order"] is True
    assert registry.paper_steps("maml", "omniglot", 5) == 40000


def test_fomaml_is_a_flag_not_a_copy():
    assert registry.METHODS["fomaml"].target == registry.METHODS["maml"].target


def test_unknown_method_suggests_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'maml'"):
        registry.get_entry("mamll")


def test_import_targets():
    assert registry.get_entry("baselines.maml:MAML").target == "baselines.maml:MAML"
    with pytest.raises(MetabenchError, match="cannot import"):
        registry.get_entry("nowhere.module:Thing")
    with pytest.raises(MetabenchError, match="not a subclass"):
        registry.get_entry("pathlib:Path")


def test_bad_hyperparameter_is_a_clear_error():
    with pytest.raises(MetabenchError, match="bad hyperparameters"):
        registry.make("maml", "omniglot", 5, inner_lrr=0.1)
