"""The shipped RAVEL files: every domain loads from the package, and bad names are clear errors."""

from __future__ import annotations

from importlib import resources

import pytest

from hyperdas.data.ravel import DOMAINS, attributes, load_domain


def test_every_domain_loads_with_its_attributes_and_splits():
    expected = {
        "city": {"Country", "Continent", "Latitude", "Longitude", "Language", "Timezone"},
        "nobel_prize_winner": {"Field", "Award Year", "Birth Year", "Country of Birth", "Gender"},
        "occupation": {"Duty", "Industry", "Work Location"},
        "physical_object": {"Category", "Color", "Size", "Texture"},
        "verb": {"Definition", "Singular", "Past Tense", "Pronunciation"},
    }
    assert set(DOMAINS) == set(expected)
    for name in DOMAINS:
        domain = load_domain(name)
        assert set(attributes(name)) == expected[name]
        assert set(domain.template_split.values()) == {"train", "test"}
        assert set(domain.wikipedia) == {"train", "test"}
        for attribute in domain.attributes:
            for split in ("train", "test"):
                assert domain.templates(attribute, split), (name, attribute, split)
            assert all(t.count("%s") == 1 for t in domain.attribute_prompts[attribute])
    city = load_domain("city")
    assert len(city.entity_attributes) == 3552
    assert len(city.attribute_prompts["Country"]) == 46
    assert city.value("Aalborg", "Country") == "Denmark"
    # RAVEL's val and test templates both go to "test"
    assert sum(s == "train" for s in city.template_split.values()) == 131
    assert sum(s == "test" for s in city.template_split.values()) == 73 + 69


def test_empty_values_are_dropped():
    nobel = load_domain("nobel_prize_winner")
    assert "Michael Houghton" not in nobel.entities_with("Field")
    assert all(v for values in nobel.entity_attributes.values() for v in values.values())


def test_licence_and_citation_ship_with_the_data():
    folder = resources.files("hyperdas.data").joinpath("ravel")
    assert "MIT" in folder.joinpath("LICENSE").read_text()
    assert "huang-etal-2024-ravel" in folder.joinpath("CITATION.bib").read_text()


def test_unknown_domain_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown RAVEL domain 'mars'; allowed: city, nobel_prize_winner"):
        load_domain("mars")


def test_unknown_attribute_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown attribute 'Colour' for RAVEL domain 'city'; allowed: Country"):
        load_domain("city").check_attribute("Colour")


def test_attribute_without_values_is_refused():
    with pytest.raises(ValueError, match=r"'Gender Bias' of RAVEL domain 'occupation' has no values.*allowed: Duty"):
        load_domain("occupation").check_attribute("Gender Bias")


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match=r"unknown split 'val'; allowed: train, test"):
        load_domain("city").templates("Country", "val")
