"""Causal and isolate examples follow METHOD.md's rules, split by template, seeded."""

from __future__ import annotations

import pytest

from hyperdas.data.examples import (
    FIELDS,
    PairSampler,
    every_entity_known,
    fill,
    isolate_attributes_for,
    label_text,
    label_value,
    make_examples,
)
from hyperdas.data.ravel import DOMAINS, RavelDomain, WikipediaContext, attributes, load_domain


@pytest.fixture(scope="module")
def city_examples():
    return make_examples("city", ["Country", "Continent"], 150, seed=3)


def test_fields_and_the_prompt_parts(city_examples):
    for e in city_examples:
        assert set(e) == set(FIELDS) and all(isinstance(v, str) for v in e.values())
        assert e["input_prefix"].endswith(e["entity"])
        assert e["counterfactual_input_prefix"].endswith(e["counterfactual_entity"])
        assert e["input_prefix"] + e["input_suffix"] == "".join(fill(e["template"], e["entity"]))
        source = "".join(fill(e["source_template"], e["counterfactual_entity"]))
        assert e["counterfactual_input_prefix"] + e["counterfactual_input_suffix"] == source
        assert not e["input_suffix"].endswith((" ", "\n"))
        assert e["edit_instruction"] == f"{e['entity']} ; {e['counterfactual_entity']} - {e['attribute']}"
        assert e["domain"] == "city"


def test_causal_examples_swap_the_attribute_of_the_source(city_examples):
    city = load_domain("city")
    causal = [e for e in city_examples if e["attribute_type"] == "causal"]
    assert {e["attribute"] for e in causal} == {"Country", "Continent"}
    for e in causal:
        a = e["attribute"]
        assert e["queried_attribute"] == a and e["template"] in city.attribute_prompts[a]
        assert e["target"] == city.value(e["entity"], a)
        assert e["counterfactual_target"] == city.value(e["counterfactual_entity"], a)
        assert e["target"] != e["counterfactual_target"]
        assert label_value(e) == e["counterfactual_target"]
        # the model must know the SOURCE entity's value under the base template
        assert e["verify_text"] == "".join(fill(e["template"], e["counterfactual_entity"]))


def test_isolate_examples_query_another_attribute_and_keep_the_base_value(city_examples):
    city = load_domain("city")
    isolate = [e for e in city_examples if e["attribute_type"] == "isolate"]
    assert {(e["attribute"], e["queried_attribute"]) for e in isolate} == {
        ("Country", "Continent"),
        ("Continent", "Country"),
    }
    for e in isolate:
        b = e["queried_attribute"]
        assert e["template"] in city.attribute_prompts[b]
        assert e["target"] == city.value(e["entity"], b) != city.value(e["counterfactual_entity"], b)
        assert e["counterfactual_target"] == city.value(e["counterfactual_entity"], b)
        assert label_value(e) == e["target"]
        assert e["verify_text"] == e["input_prefix"] + e["input_suffix"]
        assert e["edit_instruction"].endswith(" - " + e["attribute"])  # still names A


def test_no_template_or_context_is_shared_between_train_and_test(city_examples):
    city = load_domain("city")
    by_split = {split: [e for e in city_examples if e["split"] == split] for split in ("train", "test")}
    assert all(len(v) == 600 for v in by_split.values())
    base = {s: {e["template"] for e in v} for s, v in by_split.items()}
    source = {s: {e["source_template"] for e in v} for s, v in by_split.items()}
    assert not base["train"] & base["test"]
    assert not source["train"] & source["test"]
    assert all(city.template_split[t] == "train" for t in base["train"])
    assert all(city.template_split[t] == "test" for t in base["test"])
    assert {e["source_kind"] for e in city_examples} == {"template", "wikipedia"}


def test_seeded_and_reproducible():
    one = make_examples("city", ["Country"], 20, seed=7)
    assert one == make_examples("city", ["Country"], 20, seed=7)
    assert one != make_examples("city", ["Country"], 20, seed=8)


def test_a_sampler_never_repeats_a_pair():
    city = load_domain("city")
    sampler = PairSampler(city, "train", "Continent", "causal", every_entity_known(city), seed=0)
    drawn = sampler.take(3000)
    pairs = {(e["template"], e["entity"], e["counterfactual_entity"]) for e in drawn}
    assert len(pairs) == len(drawn) == 3000


def test_every_domain_makes_examples():
    for domain in DOMAINS:
        names = attributes(domain)
        examples = make_examples(domain, names[:2], 5, seed=0)
        assert len(examples) == 2 * 2 * 2 * 5, domain
        for e in examples:
            assert e["target"] and e["counterfactual_target"]
            assert e["target"] != e["counterfactual_target"]


def test_isolate_attributes_default_and_explicit():
    city = load_domain("city")
    assert isolate_attributes_for(city, ["Country", "Continent"]) == {
        "Country": ("Continent",),
        "Continent": ("Country",),
    }
    only = isolate_attributes_for(city, ["Country"])["Country"]
    assert set(only) == {"Continent", "Latitude", "Longitude", "Language", "Timezone"}
    occupation = isolate_attributes_for(load_domain("occupation"), ["Duty"])["Duty"]
    assert "Gender Bias" not in occupation  # no values to label with
    explicit = isolate_attributes_for(city, ["Country", "Continent"], ["Language"])
    assert explicit == {"Country": ("Language",), "Continent": ("Language",)}
    examples = make_examples("city", ["Country"], 30, splits=["train"], isolate_attributes=["Timezone"])
    assert {e["queried_attribute"] for e in examples if e["attribute_type"] == "isolate"} == {"Timezone"}
    with pytest.raises(ValueError, match="has no isolate attribute"):
        isolate_attributes_for(city, ["Country"], ["Country"])
    with pytest.raises(ValueError, match="unknown attribute 'Mood'"):
        isolate_attributes_for(city, ["Country"], ["Mood"])
    with pytest.raises(ValueError, match="'Gender Bias' of RAVEL domain 'occupation' has no values"):
        make_examples("occupation", ["Gender Bias"], 1)


def test_wikipedia_sources_keep_their_entity():
    city = load_domain("city")
    contexts = {c.template: c.entity for c in city.wikipedia["train"]}
    examples = make_examples("city", ["Continent"], 40, splits=["train"], sources=["wikipedia"])
    assert {e["source_kind"] for e in examples} == {"wikipedia"}
    for e in examples:
        entity = contexts[e["source_template"]]
        assert entity is None or e["counterfactual_entity"] == entity
    with pytest.raises(ValueError, match="unknown source kinds"):
        make_examples("city", ["Continent"], 1, sources=["books"])


def test_label_text_spacing():
    assert label_text('{"city": "Aalborg", "country": "', "Denmark") == "Denmark"
    assert label_text("Aalborg is a city in the country of", "Denmark") == " Denmark"
    assert label_text("The latitude and longitude of Aalborg is (", "57") == "57"
    # a template's trailing space is dropped, so the value brings its own
    assert fill("SF has a latitude of 37.7749° N. %s has a latitude of ", "Oslo") == (
        "SF has a latitude of 37.7749° N. Oslo",
        " has a latitude of",
    )


def test_a_small_pool_is_exhausted():
    domain = RavelDomain(
        name="toy",
        entity_attributes={"A": {"x": "1"}, "B": {"x": "2"}, "C": {"x": "2"}},
        attribute_prompts={"x": ["%s has x", "%s: x is"]},
        template_split={"%s has x": "train", "%s: x is": "test"},
        wikipedia={"train": [WikipediaContext("about %s", "A")], "test": []},
    )
    sampler = PairSampler(domain, "train", "x", "causal", every_entity_known(domain), seed=0)
    drawn = sampler.take(100)
    # one train template; base A takes source B or C, bases B and C take source A: four pairs
    assert sorted((e["entity"], e["counterfactual_entity"]) for e in drawn) == [
        ("A", "B"),
        ("A", "C"),
        ("B", "A"),
        ("C", "A"),
    ]
    assert sampler.exhausted and sampler.take(5) == []


def test_only_known_prompts_are_paired():
    domain = RavelDomain(
        name="toy",
        entity_attributes={
            e: {"x": v, "y": w} for e, v, w in [("A", "1", "p"), ("B", "2", "q"), ("C", "2", "p"), ("D", "3", "q")]
        },
        attribute_prompts={"x": ["%s has x"], "y": ["%s has y"]},
        template_split={"%s has x": "train", "%s has y": "train"},
        wikipedia={"train": [WikipediaContext("about %s", "D"), WikipediaContext("on %s", None)], "test": []},
    )
    known = {("x", "%s has x"): ["A", "B", "D"], ("y", "%s has y"): ["C"]}  # C's x and A/B/D's y unknown
    causal = PairSampler(domain, "train", "x", "causal", known, seed=1).take(100)
    assert {e["entity"] for e in causal} == {"A", "B", "D"} and {e["counterfactual_entity"] for e in causal} <= {
        "A",
        "B",
        "D",
    }
    assert len(causal) == 6  # every ordered pair of A, B, D has different values of x
    isolate = PairSampler(domain, "train", "x", "isolate", known, isolate_attributes=["y"], seed=1).take(100)
    assert {e["entity"] for e in isolate} == {"C"}  # the only known y prompt
    assert {e["counterfactual_entity"] for e in isolate} == {"B", "D"}  # another value of y than C's
    ties = PairSampler(domain, "train", "x", "causal", known, seed=1, tie=lambda t, b, s: {b, s} == {"A", "D"})
    assert len(ties.take(100)) == 4 and ties.ties == 2
