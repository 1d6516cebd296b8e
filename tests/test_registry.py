"""The registries: one type for every kind of part; method presets per benchmark; clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from bench.api import MetaLearner, Preset
from bench.errors import MetabenchError, UnknownNameError
from bench.registry import Registry, import_target
from baselines import registry
from baselines.maml import FOMAML, MAML


def test_every_method_constructs_with_each_preset():
    for name in registry.METHODS:
        cls = registry.method_class(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert cls.PRESETS, f"{name} has no presets"
        for key, p in cls.PRESETS.items():
            assert isinstance(p, Preset) and p.paper and p.steps >= 0
            assert set(p.values) <= fields, (name, key, set(p.values) - fields)
            assert registry.make(name, key, seed=4).seed == 4


def test_maml_paper_presets():
    assert registry.preset("maml", "omniglot-5w").values["inner_lr"] == 0.4
    assert registry.preset("maml", "omniglot-20w").values["inner_steps"] == 5
    assert registry.preset("maml", "miniimagenet").values["hidden"] == 32
    assert registry.preset("fomaml", "omniglot-5w").values["first_order"] is True
    assert registry.preset("maml", "omniglot-5w").steps == 40000
    assert registry.preset("maml", "omniglot-5w").repository == "cbfinn/maml"


def test_fomaml_is_a_flag_not_a_copy():
    assert issubclass(FOMAML, MAML) and FOMAML().first_order and not MAML().first_order
    assert {f.name for f in dataclasses.fields(FOMAML)} == {f.name for f in dataclasses.fields(MAML)}
    assert FOMAML().params() == MAML(first_order=True).params()


def test_star_preset_applies_to_every_other_key():
    assert registry.preset("finetune", "omniglot-5w") is registry.method_class("finetune").PRESETS["*"]
    assert registry.preset("maml", "some-new-key") is None


def test_run_without_steps_and_without_a_preset_says_pass_steps():
    with pytest.raises(MetabenchError, match="pass --steps") as e:
        registry.outer_steps("anil", "my-own-key", "my-benchmark")
    assert "omniglot-5w" in str(e.value) and "my-benchmark" in str(e.value)


def test_every_method_has_meta_dataset_settings_and_says_where_they_come_from():
    published = {"maml", "fomaml", "protomaml"}  # google-research/meta-dataset best gin configs
    for name in registry.METHODS:
        presets = registry.method_class(name).PRESETS
        found = registry.preset(name, "meta-dataset")
        assert found is not None, name
        if "meta-dataset" not in presets:
            assert "*" in presets  # one preset for every benchmark (finetune, protonet, baseline++, ...)
            continue
        assert found.steps == 75000
        if name in published:
            assert "google-research/meta-dataset" in found.repository
        else:
            assert found.note.startswith("no published Meta-Dataset value: the method's miniImageNet")
            assert dict(found.values) == dict(presets["miniimagenet"].values)
        registry.make(name, "meta-dataset")  # the values are valid hyperparameters


def test_unknown_method_suggests_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'maml'"):
        registry.method_class("mamll")


def test_import_targets():
    assert registry.method_class("baselines.maml:MAML") is MAML
    with pytest.raises(MetabenchError, match="cannot import"):
        registry.method_class("nowhere.module:Thing")
    with pytest.raises(MetabenchError, match="not a subclass"):
        registry.method_class("pathlib:Path")
    with pytest.raises(MetabenchError, match="must look like"):
        registry.method_class(":X")


def test_bad_hyperparameter_is_a_clear_error():
    with pytest.raises(MetabenchError, match="no hyperparameter 'inner_lrr' \\(did you mean 'inner_lr'\\?\\)"):
        registry.make("maml", "omniglot-5w", inner_lrr=0.1)


def test_a_module_that_fails_on_import_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MetabenchError, match="SyntaxError"):
        import_target("broken_mod:X", "method")
    with pytest.raises(MetabenchError, match="RuntimeError: boom"):
        import_target("raising_mod:X", "method")


def test_registry_type():
    r: Registry[int] = Registry("widget")
    r.add("one", 1, "the first")
    r.add("lazy", "math:pi")
    with pytest.raises(MetabenchError, match="twice"):
        r.add("one", 2)
    assert r.get("one") == 1 and abs(r.get("lazy") - 3.14159) < 1e-5
    assert r.names() == ["one", "lazy"] and "one" in r and "two" not in r and len(r) == 2
    with pytest.raises(UnknownNameError, match="Did you mean 'one'"):
        r.get("onee")
    with pytest.raises(UnknownNameError):
        r.get("math:e")  # unregistered targets only where targets=True
    assert Registry("widget", targets=True).get("math:e") > 2.7


def test_in_tree_methods_are_declared_by_their_modules():
    assert registry.METHODS.entry("fomaml").target == "baselines.maml:FOMAML"
    assert registry.METHODS.entry("scale-shift").target == "baselines.scaleshift:ScaleShift"
    assert all(issubclass(registry.method_class(n), MetaLearner) for n in registry.METHODS)


def test_missing_abstract_method_fails_at_construction():
    @dataclasses.dataclass
    class NoAdapt(MetaLearner):
        def setup(self, info):
            return self

        def fit(self, episodes, steps):
            return self

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            return self

    with pytest.raises(TypeError, match="adapt"):
        NoAdapt()
