"""RAVEL counterfactual examples: causal and isolate pairs of a base prompt and a source context.

For an attribute A of a domain (METHOD.md, "Data"):

- **causal**: the base template queries A; base and source entities differ on A; the label is the SOURCE
  entity's value of A (the intervention on A must carry it over).
- **isolate**: the base template queries another attribute B; the entities differ on B; the instruction still
  names A; the label is the BASE entity's value of B (the intervention on A must leave B alone).

Both kinds have ``attribute`` = A (the attribute the instruction names, which per-attribute metrics group
by) and ``queried_attribute`` = the attribute the base template asks for (A or B).

The source context is a template of the domain (any attribute) or a Wikipedia context, chosen as the
reference does: each attribute's template set and the Wikipedia set are equally likely, so a Wikipedia
context is picked with probability 1 / (number of attributes + 1). A Wikipedia context written about a
given entity makes that entity the source; one with a null entity takes a sampled entity.

Splits are by template: the ``train`` split uses RAVEL's train templates and train Wikipedia contexts, the
``test`` split its val and test ones, so no base template (nor source context) is shared between them.

Text rules:

- ``input_prefix`` ends with the entity and ``input_suffix`` is the rest of the template; trailing whitespace
  of a template is dropped, so the value gets its usual leading space (``"... of "`` + ``"57"`` would make the
  tokenizer split the space from the number).
- The label continues the prompt with ``label_text``: the value itself after a prompt ending in a quote or an
  opening bracket (``{"country": "`` + ``Denmark``), else a space and the value (``in the country of`` +
  `` Denmark``), as the reference's ``add_space_before_target`` does.
- ``verify_text`` is the prompt whose continuation must be the label for the target model to "know" the
  fact: causal: the base template filled with the SOURCE entity; isolate: the base prompt itself. It always
  ends with ``input_suffix``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from hyperdas.data.ravel import SPLITS, RavelDomain, WikipediaContext, check_split, load_domain

ATTRIBUTE_TYPES: tuple[str, ...] = ("causal", "isolate")
SOURCE_KINDS: tuple[str, ...] = ("template", "wikipedia")
EDIT_INSTRUCTION = "{base_entity} ; {source_entity} - {attribute}"

#: Example fields, all strings. The first twelve are METHOD.md's; the last five say where an example came from.
FIELDS: tuple[str, ...] = (
    "input_prefix",
    "input_suffix",
    "counterfactual_input_prefix",
    "counterfactual_input_suffix",
    "edit_instruction",
    "entity",
    "counterfactual_entity",
    "target",
    "counterfactual_target",
    "attribute_type",
    "domain",
    "attribute",
    "verify_text",
    "queried_attribute",
    "split",
    "template",
    "source_kind",
    "source_template",
)

_NO_SPACE_AFTER = ('"', "'", "(", "[", "{")
#: Draws in a row that may fail (a duplicate verified fact, no entity that differs) before a sampler
#: declares its pool exhausted.
_MAX_FAILED_DRAWS = 2000


def fill(template: str, entity: str) -> tuple[str, str]:
    """Split a template with one ``%s`` into (prefix ending with ``entity``, suffix without trailing space)."""
    head, tail = template.split("%s")
    return head + entity, tail.rstrip()


def label_text(prompt: str, value: str) -> str:
    """The text that continues ``prompt`` with ``value``: no space after a quote or opening bracket."""
    return value if prompt.endswith(_NO_SPACE_AFTER) else " " + value


def label_value(example: Mapping[str, str]) -> str:
    """The value the model must produce: the source's for causal examples, the base's for isolate ones."""
    return example["counterfactual_target"] if example["attribute_type"] == "causal" else example["target"]


def isolate_attributes_for(
    domain: RavelDomain, attributes: Sequence[str], isolate_attributes: Sequence[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """For each requested attribute A, the attributes B its isolate examples query.

    Args:
        domain: the RAVEL domain.
        attributes: the requested attributes.
        isolate_attributes: the B candidates; None means the other requested attributes, or, when only one
            attribute is requested, every other attribute of the domain that has values.

    Raises:
        ValueError: an attribute is unknown or has no values, or some A is left without any B.
    """
    for attribute in attributes:
        domain.check_attribute(attribute)
    if isolate_attributes is None:
        isolate_attributes = attributes if len(attributes) > 1 else domain.attributes_with_values
    else:
        for attribute in isolate_attributes:
            domain.check_attribute(attribute)
    result = {a: tuple(b for b in isolate_attributes if b != a) for a in attributes}
    for attribute, others in result.items():
        if not others:
            raise ValueError(
                f"attribute {attribute!r} has no isolate attribute to query (isolate attributes: "
                f"{list(isolate_attributes)}); allowed: {', '.join(domain.attributes_with_values)}"
            )
    return result


class CandidateSampler:
    """A seeded stream of distinct candidate examples of one kind: (split, attribute, attribute type).

    Each draw picks the queried attribute, a base template, a source context and the two entities. Two
    candidates of one sampler never share their verified fact (queried attribute, base template, the entity
    in ``verify_text``), so filtering never checks the same fact twice and the kept examples stay diverse.
    The pool is exhausted when every fact was drawn or draws keep failing.

    Args:
        domain: the RAVEL domain.
        split: "train" or "test".
        attribute: A, the attribute the instruction names.
        attribute_type: "causal" or "isolate".
        isolate_attributes: the B that isolate examples query (ignored for causal ones).
        sources: which source contexts to draw from, a non-empty subset of ``SOURCE_KINDS``.
        seed: the stream's seed; the same arguments give the same stream.
    """

    def __init__(
        self,
        domain: RavelDomain,
        split: str,
        attribute: str,
        attribute_type: str,
        isolate_attributes: Sequence[str] = (),
        sources: Sequence[str] = SOURCE_KINDS,
        seed: int = 0,
    ):
        check_split(split)
        domain.check_attribute(attribute)
        if attribute_type not in ATTRIBUTE_TYPES:
            raise ValueError(f"unknown attribute type {attribute_type!r}; allowed: {', '.join(ATTRIBUTE_TYPES)}")
        check_sources(sources)
        self.domain, self.split, self.attribute, self.attribute_type = domain, split, attribute, attribute_type
        queried = (attribute,) if attribute_type == "causal" else tuple(isolate_attributes)
        if not queried:
            raise ValueError(f"isolate examples for {attribute!r} need at least one isolate attribute")
        self._templates = {q: domain.templates(q, split) for q in queried}
        self._queried = [q for q in queried if self._templates[q]]
        self._entities = {q: domain.entities_with(q) for q in self._queried}
        self._source_templates = [t for a in domain.attributes for t in domain.templates(a, split)]
        self._wikipedia: list[WikipediaContext] = domain.wikipedia[split] if "wikipedia" in sources else []
        use_templates = "template" in sources and self._source_templates
        n_options = len(domain.attributes) + 1 if use_templates and self._wikipedia else 1
        self._wikipedia_chance = 0.0 if not self._wikipedia else 1.0 / n_options
        self._rng = random.Random(f"{seed}/{domain.name}/{split}/{attribute}/{attribute_type}")
        self._seen: set[tuple[str, str, str]] = set()
        self._pool_size = sum(len(self._templates[q]) * len(self._entities[q]) for q in self._queried)
        self.exhausted = self._pool_size == 0 or not (use_templates or self._wikipedia)

    def take(self, n: int) -> list[dict[str, str]]:
        """Up to ``n`` new candidates (fewer once the pool is exhausted)."""
        out: list[dict[str, str]] = []
        failed = 0
        while len(out) < n and not self.exhausted:
            example = self._draw()
            if example is None:
                failed += 1
                self.exhausted = failed >= _MAX_FAILED_DRAWS
                continue
            failed = 0
            out.append(example)
            self.exhausted = len(self._seen) >= self._pool_size
        return out

    def _other_entity(self, queried: str, entity: str) -> str | None:
        """An entity whose value of ``queried`` differs from ``entity``'s (None if none is found)."""
        value = self.domain.value(entity, queried)
        for _ in range(100):
            other = self._rng.choice(self._entities[queried])
            if self.domain.value(other, queried) != value:
                return other
        return None

    def _draw(self) -> dict[str, str] | None:
        rng, domain = self._rng, self.domain
        queried = self._queried[0] if len(self._queried) == 1 else rng.choice(self._queried)
        base_template = rng.choice(self._templates[queried])
        if self._wikipedia and rng.random() < self._wikipedia_chance:
            context = rng.choice(self._wikipedia)
            source_template, source_kind, source = context.template, "wikipedia", context.entity
            if source is not None and queried not in domain.entity_attributes[source]:
                return None
        else:
            source_template, source_kind, source = rng.choice(self._source_templates), "template", None
        if source is None:
            source = rng.choice(self._entities[queried])
        base = self._other_entity(queried, source)
        if base is None:
            return None
        fact = (queried, base_template, source if self.attribute_type == "causal" else base)
        if fact in self._seen:
            return None
        self._seen.add(fact)
        prefix, suffix = fill(base_template, base)
        source_prefix, source_suffix = fill(source_template, source)
        verify_prefix, _ = fill(base_template, fact[2])
        return {
            "input_prefix": prefix,
            "input_suffix": suffix,
            "counterfactual_input_prefix": source_prefix,
            "counterfactual_input_suffix": source_suffix,
            "edit_instruction": EDIT_INSTRUCTION.format(
                base_entity=base, source_entity=source, attribute=self.attribute
            ),
            "entity": base,
            "counterfactual_entity": source,
            "target": domain.value(base, queried),
            "counterfactual_target": domain.value(source, queried),
            "attribute_type": self.attribute_type,
            "domain": domain.name,
            "attribute": self.attribute,
            "verify_text": verify_prefix + suffix,
            "queried_attribute": queried,
            "split": self.split,
            "template": base_template,
            "source_kind": source_kind,
            "source_template": source_template,
        }


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in sources if s not in SOURCE_KINDS]
    if unknown or not sources:
        raise ValueError(f"unknown source kinds {unknown or list(sources)}; allowed: {', '.join(SOURCE_KINDS)}")
    return tuple(sources)


def candidate_samplers(
    domain: str,
    attributes: Sequence[str],
    split: str,
    seed: int = 0,
    isolate_attributes: Sequence[str] | None = None,
    sources: Sequence[str] = SOURCE_KINDS,
) -> dict[tuple[str, str], CandidateSampler]:
    """One sampler per (attribute, attribute type) of a split, keyed by that pair."""
    ravel = load_domain(domain)
    isolate = isolate_attributes_for(ravel, attributes, isolate_attributes)
    return {
        (a, kind): CandidateSampler(ravel, split, a, kind, isolate[a], sources, seed)
        for a in attributes
        for kind in ATTRIBUTE_TYPES
    }


def make_examples(
    domain: str,
    attributes: Sequence[str],
    n_per_kind: int,
    splits: Sequence[str] = SPLITS,
    seed: int = 0,
    isolate_attributes: Sequence[str] | None = None,
    sources: Sequence[str] = SOURCE_KINDS,
) -> list[dict[str, str]]:
    """Unfiltered examples: ``n_per_kind`` for each (split, attribute, attribute type), in that order."""
    return [
        example
        for split in splits
        for sampler in candidate_samplers(domain, attributes, split, seed, isolate_attributes, sources).values()
        for example in sampler.take(n_per_kind)
    ]
