"""Building the filtered dataset: shares per kind, seeded order, caching, atomic writes and clear errors."""

from __future__ import annotations

import json
import math

import pytest
from test_data_filter import OracleTarget

from hyperdas.data import build as build_module
from hyperdas.data.build import DataRequest, build_dataset, dataset_folder, load_report
from hyperdas.data.collate import label_token_ids
from hyperdas.data.examples import FIELDS, candidate_samplers, label_value
from hyperdas.data.filtering import filter_examples


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERDAS_CACHE", str(tmp_path))
    return tmp_path / "data"


@pytest.fixture
def filter_calls(monkeypatch):
    calls = []

    def counting(target, examples, **kwargs):
        calls.append(len(examples))
        return filter_examples(target, examples, **kwargs)

    monkeypatch.setattr(build_module, "filter_examples", counting)
    return calls


def _oracle_request(**overrides):
    values = dict(target="oracle", max_examples=40, test_share=0.25, seed=1)
    values.update(overrides)
    return DataRequest(**values)


def test_shares_splits_and_saved_files(smollm2, data_cache):
    request = _oracle_request()
    data = build_dataset(request, OracleTarget(smollm2.tokenizer), progress=False)
    assert set(data) == {"train", "test"}
    assert (len(data["train"]), len(data["test"])) == (30, 10)
    assert list(data["train"].features) == list(FIELDS)
    for split in ("train", "test"):
        rows = data[split].to_list()
        assert {r["split"] for r in rows} == {split}
        for attribute in ("Country", "Continent"):
            for kind in ("causal", "isolate"):
                n = sum(r["attribute"] == attribute and r["attribute_type"] == kind for r in rows)
                assert n == request.shares()[(split, attribute, kind)]
    assert not {r["template"] for r in data["train"]} & {r["template"] for r in data["test"]}

    folder = dataset_folder(request)
    assert folder.parent == data_cache and folder.name == request.key()
    assert json.loads((folder / "request.json").read_text())["attributes"] == ["Country", "Continent"]
    report = load_report(folder)
    assert report["target"] == "oracle" and report["key"] == request.key()
    assert sum(r["kept"] for r in report["rows"]) == 40
    assert not [p for p in data_cache.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_the_same_request_twice_does_not_recompute(smollm2, data_cache, filter_calls):
    request = _oracle_request(max_examples=12)
    oracle = OracleTarget(smollm2.tokenizer)
    first = build_dataset(request, oracle, progress=False)
    calls = len(filter_calls)
    assert calls > 0
    second = build_dataset(request, oracle, progress=False)
    assert len(filter_calls) == calls  # loaded from disk
    assert second["train"].to_list() == first["train"].to_list()
    build_dataset(request, progress=False)  # no target needed once built
    assert len(filter_calls) == calls
    build_dataset(_oracle_request(max_examples=12, seed=2), oracle, progress=False)
    assert len(filter_calls) > calls


def test_the_key_hashes_request_target_and_format(monkeypatch):
    request = DataRequest()
    assert request.key() == DataRequest().key()
    assert request.key() != DataRequest(target="other").key()
    assert request.key() != DataRequest(max_examples=999).key()
    before = request.key()
    monkeypatch.setattr(build_module, "DATA_FORMAT_VERSION", build_module.DATA_FORMAT_VERSION + 1)
    assert request.key() != before


def test_kept_examples_are_the_first_passing_in_seeded_order(smollm2, data_cache):
    """Rounds of any size keep the same examples: each kind's first passing candidates."""
    tok = smollm2.tokenizer
    request = _oracle_request(max_examples=24, test_share=0.5)
    probe = candidate_samplers("city", request.attributes, "train", seed=request.seed)
    sample = [e for s in probe.values() for e in s.take(40)]
    labels = label_token_ids(tok, [e["verify_text"] for e in sample], [label_value(e) for e in sample])
    blind = {ids[0] for ids, e in zip(labels, sample, strict=True) if e["counterfactual_target"] in ("Europe", "Asia")}
    oracle = OracleTarget(tok, blind)
    data = build_dataset(request, oracle, progress=False)
    report = load_report(dataset_folder(request))
    tried = {(r["split"], r["attribute"], r["attribute_type"]): r["total"] for r in report["rows"]}
    for split in ("train", "test"):
        samplers = candidate_samplers("city", request.attributes, split, seed=request.seed)
        for (attribute, kind), sampler in samplers.items():
            stream = sampler.take(tried[(split, attribute, kind)])
            keep = filter_examples(oracle, stream, progress=False)
            share = request.shares()[(split, attribute, kind)]
            expected = [e for e, ok in zip(stream, keep, strict=True) if ok][:share]
            got = [r for r in data[split] if r["attribute"] == attribute and r["attribute_type"] == kind]
            assert got == expected


def test_a_kind_the_model_never_gets_right_stops_at_its_budget(smollm2, data_cache, monkeypatch):
    def knows_no_country(target, examples, **kwargs):
        return [e["queried_attribute"] != "Country" for e in examples]

    monkeypatch.setattr(build_module, "filter_examples", knows_no_country)
    request = _oracle_request(max_examples=16, test_share=0.5, max_candidates_per_example=3)
    data = build_dataset(request, OracleTarget(smollm2.tokenizer), progress=False)
    rows = {(r["split"], r["attribute"], r["attribute_type"]): r for r in load_report(dataset_folder(request))["rows"]}
    for split in ("train", "test"):
        # the kinds that query a country: causal Country, and isolate Continent (the base's country must stay)
        for kind in (("Country", "causal"), ("Continent", "isolate")):
            row = rows[(split, *kind)]
            assert row["kept"] == row["passed"] == 0 and row["total"] == math.ceil(row["share"] * 3)
        for kind in (("Continent", "causal"), ("Country", "isolate")):
            row = rows[(split, *kind)]
            assert row["kept"] == row["share"] == 2 and row["total"] == 6  # the first round is the whole budget
    assert len(data["train"]) == len(data["test"]) == 4


def test_zero_examples_after_filtering_is_a_clear_error(tiny_target, data_cache):
    request = DataRequest(target=tiny_target.name, max_examples=8, max_candidates_per_example=2)
    with pytest.raises(
        ValueError,
        match=r"(?s)no train example of DataRequest\(domain='city'.*survives filtering.*"
        r"train  Country    causal      0       0",
    ):
        build_dataset(request, tiny_target, progress=False)
    assert not data_cache.exists() or not any(data_cache.iterdir())  # nothing half-written


def test_an_interrupted_build_leaves_no_dataset(smollm2, data_cache, monkeypatch):
    from datasets import DatasetDict

    def crash(self, path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    request = _oracle_request(max_examples=8)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(request, OracleTarget(smollm2.tokenizer), progress=False)
    assert not dataset_folder(request).exists()


def test_bad_requests_name_the_value(smollm2, data_cache):
    with pytest.raises(ValueError, match="unknown RAVEL domain 'town'"):
        build_dataset(DataRequest(domain="town"))
    with pytest.raises(ValueError, match="unknown attribute 'Mayor'.*allowed: Country, Continent"):
        DataRequest(attributes=("Mayor",)).validate()
    with pytest.raises(ValueError, match="'Gender Bias' of RAVEL domain 'occupation' has no values"):
        DataRequest(domain="occupation", attributes=("Duty", "Gender Bias")).validate()
    with pytest.raises(ValueError, match="test_share must be in"):
        DataRequest(test_share=1.0).validate()
    with pytest.raises(ValueError, match="max_examples must be at least 1"):
        DataRequest(max_examples=0).validate()
    with pytest.raises(ValueError, match="unknown source kinds"):
        DataRequest(sources=("news",)).validate()
    with pytest.raises(ValueError, match="the target is 'oracle' but the request names 'smollm2-135m'"):
        build_dataset(DataRequest(max_examples=4), OracleTarget(smollm2.tokenizer), progress=False)


def test_the_embedded_default_builds_examples_it_knows(smollm2, data_cache):
    request = DataRequest(max_examples=8, test_share=0.5, max_candidates_per_example=4)
    data = build_dataset(request, smollm2, progress=False)
    assert len(data["train"]) > 0 and len(data["test"]) > 0
    report = load_report(dataset_folder(request))
    assert all(r["kept"] <= r["passed"] <= r["total"] for r in report["rows"])
    rows = data["train"].to_list() + data["test"].to_list()
    assert filter_examples(smollm2, rows, progress=False) == [True] * len(rows)


def test_the_target_dtype_is_part_of_the_request(smollm2, tmp_path):
    fp32 = DataRequest(max_examples=8)
    bf16 = DataRequest(max_examples=8, target_dtype="bfloat16")
    assert fp32.key() != bf16.key()  # a bf16 run never reuses what an fp32 target filtered
    oracle = OracleTarget(smollm2.tokenizer, name=fp32.target)
    with pytest.raises(ValueError, match=r"runs in torch.float32 but the request names 'bfloat16'"):
        build_dataset(bf16, oracle, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"target_dtype 'int8'; allowed"):
        DataRequest(target_dtype="int8").validate()
