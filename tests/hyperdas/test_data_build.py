"""Building the dataset from known prompts: the pairing rule, shares, caching, dropped attributes and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from hyperdas.data.build import DataRequest, LabelTies, build_dataset, dataset_folder, load_report
from hyperdas.data.collate import Collator
from hyperdas.data.examples import FIELDS
from hyperdas.data.known import KnownPromptTable, Prompt, prompt_universe
from hyperdas.data.ravel import load_domain
from hyperdas.metrics import label_exact_match
from hyperdas.testing import PlantedTarget

CITY = load_domain("city")


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERDAS_CACHE", str(tmp_path))
    return tmp_path


def _request(**overrides):
    values = dict(
        target="planted",
        target_dtype="float32",
        attributes=("Country", "Continent"),
        max_examples=40,
        test_share=0.25,
        seed=1,
        entities_per_template=6,
    )
    values.update(overrides)
    return DataRequest(**values)


def _planted(smollm2, share: int = 2, **kwargs) -> PlantedTarget:
    """A target that knows every ``share``-th entity of the universe's sample (a known set that is not everything)."""
    entities = sorted({p.entity for p in prompt_universe(CITY, CITY.attributes_with_values, 6)})
    return PlantedTarget(smollm2.tokenizer, set(entities[::share]), **kwargs)


def test_every_example_comes_from_known_prompts_by_the_pairing_rule(smollm2, cache_root):
    target = _planted(smollm2)
    data = build_dataset(_request(), target, progress=False)
    table = KnownPromptTable("planted", target.fingerprint, "float32", "city")
    for row in data["train"].to_list() + data["test"].to_list():
        queried, template = row["queried_attribute"], row["template"]
        assert table.known(Prompt(queried, template, row["entity"]))  # the unpatched target answers the base's value
        assert row["target"] == CITY.value(row["entity"], queried)
        if row["attribute_type"] == "causal":
            assert queried == row["attribute"]
            assert table.known(Prompt(queried, template, row["counterfactual_entity"]))  # the label is reachable
            assert row["counterfactual_target"] != row["target"]
        else:
            assert queried != row["attribute"] and row["counterfactual_target"] != row["target"]


def test_shares_splits_and_saved_files(smollm2, cache_root):
    request = _request()
    data = build_dataset(request, _planted(smollm2), progress=False)
    assert (len(data["train"]), len(data["test"])) == (30, 10)
    assert list(data["train"].features) == list(FIELDS)
    for split in ("train", "test"):
        rows = data[split].to_list()
        assert {r["split"] for r in rows} == {split}
        counts = {
            (a, k): sum(r["attribute"] == a and r["attribute_type"] == k for r in rows)
            for a in ("Country", "Continent")
            for k in ("causal", "isolate")
        }
        assert sorted(counts.values()) == ([2, 2, 3, 3] if split == "test" else [7, 7, 8, 8])
    assert not {r["template"] for r in data["train"]} & {r["template"] for r in data["test"]}
    folder = dataset_folder(request)
    assert folder.parent == cache_root / "data" and folder.name == request.key()
    assert json.loads((folder / "request.json").read_text())["attributes"] == ["Country", "Continent"]
    report = load_report(folder)
    assert report["target"] == "planted" and report["attributes"] == ["Country", "Continent"]
    assert sum(r["kept"] for r in report["rows"]) == 40
    assert {(r["attribute"], r["split"]) for r in report["known_prompts"]} == {
        (a, s) for a in ("Country", "Continent") for s in ("train", "test")
    }
    assert not [p for p in (cache_root / "data").iterdir() if p.name.startswith(".")]  # no partial folder left


def test_a_new_seed_or_attribute_set_costs_no_new_forward_pass(smollm2, cache_root):
    target = _planted(smollm2)
    first = build_dataset(_request(), target, progress=False)
    rows = target.rows_seen
    assert rows > 0
    again = build_dataset(_request(), target, progress=False)  # loaded from disk
    assert again["train"].to_list() == first["train"].to_list() and target.rows_seen == rows
    other_seed = build_dataset(_request(seed=2), target, progress=False)
    assert other_seed["train"].to_list() != first["train"].to_list()
    build_dataset(_request(attributes=("Continent",), isolate_attributes=("Country",)), target, progress=False)
    assert target.rows_seen == rows  # the known-prompt table answered every prompt
    build_dataset(_request(), progress=False)  # no target needed once built


def test_causal_pairs_whose_labels_tie_are_left_out(smollm2):
    ties = LabelTies(smollm2.tokenizer, CITY, "Country")
    template = "%s is a city in the country of"
    us = next(e for e in CITY.entities_with("Country") if CITY.value(e, "Country") == "United States")
    uk = next(e for e in CITY.entities_with("Country") if CITY.value(e, "Country") == "United Kingdom")
    also_us = next(e for e in CITY.entities_with("Country") if CITY.value(e, "Country") == "United States" and e != us)
    assert ties(template, us, also_us)  # the same value ties by definition
    assert not ties(template, us, uk)  # " United" then " States" vs " Kingdom": the metric tells them apart


def test_all_drops_attributes_without_enough_data_with_a_notice(smollm2, cache_root, capsys):
    target = _planted(smollm2)
    real = target.knows
    # it never knows a latitude (every Latitude template but one says "lat"; that one alone is too little)
    target.knows = lambda text: real(text) and "lat" not in text.lower()
    request = _request(attributes=("all",), max_examples=120)
    data = build_dataset(request, target, progress=False)
    report = load_report(dataset_folder(request))
    dropped = {d["attribute"] for d in report["dropped"]}
    assert "Latitude" in dropped and "Latitude" not in report["attributes"]
    assert "hyperdas data: dropped Latitude (too little data" in capsys.readouterr().out
    assert "Latitude" not in set(data["train"]["attribute"])


def test_nothing_known_is_a_clear_error_and_leaves_nothing(smollm2, cache_root):
    nothing = PlantedTarget(smollm2.tokenizer, set())
    with pytest.raises(ValueError, match=r"(?s)no train example of DataRequest\(domain='city'.*known prompts"):
        build_dataset(_request(), nothing, progress=False)
    assert not (cache_root / "data").exists() or not any((cache_root / "data").iterdir())
    with pytest.raises(ValueError, match="no attribute of RAVEL domain 'city' leaves enough known prompts"):
        build_dataset(_request(attributes=("all",)), nothing, progress=False)


def test_an_interrupted_build_leaves_no_dataset(smollm2, cache_root, monkeypatch):
    from datasets import DatasetDict

    def crash(self, path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(_request(), _planted(smollm2), progress=False)
    assert not dataset_folder(_request()).exists()


def test_out_is_exactly_where_the_dataset_is(smollm2, tmp_path):
    from datasets import load_from_disk

    target = _planted(smollm2)
    out = tmp_path / "data" / "city"
    build_dataset(_request(), target, out=out, known_root=tmp_path / "known", progress=False)
    assert len(load_from_disk(str(out))["test"]) == 10
    with pytest.raises(ValueError, match="holds the dataset of another request"):
        build_dataset(_request(seed=5), target, out=out, known_root=tmp_path / "known", progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        build_dataset(_request(), target, out=tmp_path / "a_file", progress=False)


def test_another_target_of_the_same_name_rebuilds(smollm2, cache_root, capsys):
    first = build_dataset(_request(), _planted(smollm2, share=2), progress=False)
    second = build_dataset(_request(), _planted(smollm2, share=3), progress=False)
    assert "built with another target of this name; rebuilding" in capsys.readouterr().out
    assert first["train"].to_list() != second["train"].to_list()


def test_bad_requests_name_the_value(smollm2, cache_root):
    with pytest.raises(ValueError, match="unknown RAVEL domain 'town'"):
        build_dataset(DataRequest(domain="town"))
    with pytest.raises(ValueError, match="unknown attribute 'Mayor'.*allowed: Country, Continent"):
        DataRequest(attributes=("Mayor",)).validate()
    with pytest.raises(ValueError, match="'Gender Bias' of RAVEL domain 'occupation' has no values"):
        DataRequest(domain="occupation", attributes=("Duty", "Gender Bias")).validate()
    with pytest.raises(ValueError, match="attributes is empty"):
        DataRequest(attributes=()).validate()
    with pytest.raises(ValueError, match="'all' stands alone"):
        DataRequest(attributes=("all", "Country")).validate()
    with pytest.raises(ValueError, match="test_share must be in"):
        DataRequest(test_share=1.0).validate()
    with pytest.raises(ValueError, match="max_examples must be at least 1"):
        DataRequest(max_examples=0).validate()
    with pytest.raises(ValueError, match="max_examples must be an integer, got 2.5"):
        DataRequest(max_examples=2.5).validate()
    with pytest.raises(ValueError, match="unknown source kinds"):
        DataRequest(sources=("news",)).validate()
    with pytest.raises(ValueError, match="the target is 'planted' but the request names 'smollm2-135m'"):
        build_dataset(DataRequest(max_examples=4), PlantedTarget(smollm2.tokenizer, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"runs in torch.float32 but the request names 'bfloat16'"):
        build_dataset(_request(target_dtype="bfloat16"), PlantedTarget(smollm2.tokenizer), progress=False)
    with pytest.raises(ValueError, match=r"target_dtype 'int8'; allowed"):
        DataRequest(target_dtype="int8").validate()


def test_the_key_hashes_request_target_dtype_and_format(monkeypatch):
    from hyperdas.data import build as build_module

    request = DataRequest()
    assert request.key() == DataRequest().key()
    for other in (
        DataRequest(target="other"),
        DataRequest(max_examples=999),
        DataRequest(target_dtype="float32"),
        DataRequest(entities_per_template=25),
    ):
        assert other.key() != request.key()
    before = request.key()
    monkeypatch.setattr(build_module, "DATA_FORMAT_VERSION", build_module.DATA_FORMAT_VERSION + 1)
    assert request.key() != before
    from hyperdas.data import known as known_module

    before = request.key()  # data drawn from an older known-prompt table is not reused
    monkeypatch.setattr(known_module, "KNOWN_FORMAT_VERSION", known_module.KNOWN_FORMAT_VERSION + 1)
    assert request.key() != before


def test_on_the_embedded_default_doing_nothing_causes_nothing(smollm2, cache_root):
    """The unpatched target answers the base's value: no causal example is right (cause floor 0), every isolate
    example is (isolate floor 100), except where its argmax is a near-tie that batch padding could flip."""
    request = DataRequest(
        attributes=("Continent",),
        isolate_attributes=("Country",),
        target_dtype="float32",
        max_examples=48,
        test_share=0.5,
        entities_per_template=4,
    )
    data = build_dataset(request, smollm2, progress=False)
    rows = data["train"].to_list() + data["test"].to_list()
    batch = Collator(smollm2.tokenizer)(rows)
    with torch.no_grad():
        logits = smollm2.logits_at(batch.base_input_ids, batch.base_attention_mask, batch.label_positions)
    right = label_exact_match(logits, batch.label_ids)
    top2 = logits.topk(2, dim=-1).values
    real = batch.label_ids != -100
    margin = torch.where(real, top2[..., 0] - top2[..., 1], torch.inf).amin(dim=1)
    clear = margin > 1e-3
    causal = batch.is_causal
    assert causal.any() and (~causal).any() and clear.float().mean() > 0.8
    assert not right[causal & clear].any()
    assert right[~causal & clear].all()
