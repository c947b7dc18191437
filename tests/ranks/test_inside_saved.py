"""One rule for "no LoRA inside a module PEFT saves whole": spectra.ranks.plan.inside_saved, which recommend and
memory call (train: /tmp patch for its owner). The rule as PEFT applies it: a target is the saved module or one of
its submodules (a name under it after a dot), never a module whose name merely starts with the same letters."""

from __future__ import annotations

from spectra.ranks.plan import inside_saved


def test_a_module_and_its_submodules_lie_inside():
    saved = ["classifier", "model.score"]
    names = ["classifier", "classifier.out_proj", "classifier.dense.lora", "model.score",
             "pre_classifier", "classifier_head.dense", "model.scorer", "model.layers.0.self_attn.q_proj"]
    assert inside_saved(names, saved) == {"classifier": "classifier", "classifier.out_proj": "classifier",
                                          "classifier.dense.lora": "classifier", "model.score": "model.score"}


def test_nothing_saved_or_nothing_inside():
    assert inside_saved(["q_proj", "v_proj"], []) == {}
    assert inside_saved([], ["classifier"]) == {}
    assert inside_saved(["q_proj"], ["classifier"]) == {}


def test_saved_may_be_any_iterable_read_once():
    assert inside_saved(["a.b", "a.c", "b"], iter(["a"])) == {"a.b": "a", "a.c": "a"}


def test_recommend_and_memory_call_the_one_rule():
    import inspect

    import spectra.memory.estimate as estimate
    import spectra.ranks.recommend as recommend

    assert estimate.inside_saved is inside_saved and recommend.inside_saved is inside_saved
    for source in (inspect.getsource(estimate._outside_saved), inspect.getsource(recommend._outside_saved)):
        assert "inside_saved(" in source and 'startswith(' not in source
