"""The RAVEL benchmark's raw data (Huang et al., ACL 2024), shipped in ``hyperdas/data/ravel`` (MIT licence).

Each domain has five JSON files:

- ``ravel_{d}_entity_attributes.json``: {entity: {attribute: value}}
- ``ravel_{d}_attribute_to_prompts.json``: {attribute: [template with one ``%s`` for the entity]}
- ``ravel_{d}_entity_to_split.json``: {entity: train | val | test}
- ``ravel_{d}_prompt_to_split.json``: {template: train | val | test}
- ``wikipedia_{d}_entity_prompts.json``: {context with one ``%s``: {"split": ..., "entity": name or null}}

The project splits by template, as the paper did: RAVEL's ``train`` templates make the ``train`` split and its
``val`` and ``test`` templates make the ``test`` split (``SPLITS``). The same holds for the Wikipedia contexts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

DOMAINS: tuple[str, ...] = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")

#: The project's splits; RAVEL's "val" and "test" templates both go to "test".
SPLITS: tuple[str, ...] = ("train", "test")
_RAVEL_TO_SPLIT = {"train": "train", "val": "test", "test": "test"}


@dataclass(frozen=True)
class WikipediaContext:
    """A free-text source context; ``entity`` is None where any entity of the domain may fill it."""

    template: str
    entity: str | None


@dataclass(frozen=True)
class RavelDomain:
    """One RAVEL domain: entities with their attribute values, templates per attribute, and splits.

    Attributes:
        name: the domain, one of ``DOMAINS``.
        entity_attributes: {entity: {attribute: value}}; empty values are dropped.
        attribute_prompts: {attribute: [template]} for every attribute RAVEL has templates for.
        template_split: {template: "train" | "test"} (RAVEL's val and test are "test").
        wikipedia: {"train" | "test": [WikipediaContext]}.
    """

    name: str
    entity_attributes: dict[str, dict[str, str]]
    attribute_prompts: dict[str, list[str]]
    template_split: dict[str, str]
    wikipedia: dict[str, list[WikipediaContext]]

    @property
    def attributes(self) -> tuple[str, ...]:
        """Every attribute with templates, including ones without values (occupation's Gender Bias)."""
        return tuple(self.attribute_prompts)

    @property
    def attributes_with_values(self) -> tuple[str, ...]:
        """Attributes that can label examples: at least two distinct values over the entities."""
        values = self.entity_attributes.values()
        return tuple(a for a in self.attributes if len({v[a] for v in values if a in v}) > 1)

    def check_attribute(self, attribute: str) -> str:
        """``attribute`` if it can label examples, else a ValueError naming it and the allowed ones."""
        allowed = ", ".join(self.attributes_with_values)
        if attribute not in self.attribute_prompts:
            raise ValueError(f"unknown attribute {attribute!r} for RAVEL domain {self.name!r}; allowed: {allowed}")
        if attribute not in self.attributes_with_values:
            raise ValueError(
                f"attribute {attribute!r} of RAVEL domain {self.name!r} has no values in the entity file, so it "
                f"cannot label examples; allowed: {allowed}"
            )
        return attribute

    def entities_with(self, attribute: str) -> list[str]:
        """Entities that have a value for ``attribute``, in file order."""
        return [e for e, values in self.entity_attributes.items() if attribute in values]

    def value(self, entity: str, attribute: str) -> str:
        return self.entity_attributes[entity][attribute]

    def templates(self, attribute: str, split: str) -> list[str]:
        """The templates querying ``attribute`` that belong to ``split`` ("train" or "test")."""
        return [t for t in self.attribute_prompts[attribute] if self.template_split[t] == check_split(split)]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown RAVEL domain {domain!r}; allowed: {', '.join(DOMAINS)}")
    return domain


def _read(filename: str):
    return json.loads(resources.files("hyperdas.data").joinpath("ravel", filename).read_text(encoding="utf-8"))


@cache
def load_domain(domain: str) -> RavelDomain:
    """Load one domain's five files from the installed package (read once per process).

    Raises:
        ValueError: ``domain`` is not one of ``DOMAINS``.
    """
    check_domain(domain)
    raw_entities = _read(f"ravel_{domain}_entity_attributes.json")
    prompt_split = _read(f"ravel_{domain}_prompt_to_split.json")
    wikipedia: dict[str, list[WikipediaContext]] = {split: [] for split in SPLITS}
    for template, info in _read(f"wikipedia_{domain}_entity_prompts.json").items():
        wikipedia[_RAVEL_TO_SPLIT[info["split"]]].append(WikipediaContext(template, info["entity"]))
    return RavelDomain(
        name=domain,
        entity_attributes={e: {a: v for a, v in values.items() if v} for e, values in raw_entities.items()},
        attribute_prompts=_read(f"ravel_{domain}_attribute_to_prompts.json"),
        template_split={t: _RAVEL_TO_SPLIT[s] for t, s in prompt_split.items()},
        wikipedia=wikipedia,
    )


def attributes(domain: str) -> tuple[str, ...]:
    """The attributes of ``domain`` that can label examples (have values)."""
    return load_domain(domain).attributes_with_values
