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

Only prompts the target knows are used (``hyperdas.data.known``): a causal example's base prompt is known for
the BASE entity (so the unpatched target answers the base's value, which differs from the label) and its base
template is known for the SOURCE entity (so the label is reachable); an isolate example's base prompt is known
for the base entity's queried attribute. Doing nothing then scores cause 0 and isolate 100 by construction
(causal pairs whose two values share their first label tokens, which the metric cannot tell apart, are left
out and counted).

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
from collections.abc import Callable, Mapping, Sequence

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
#: Draws in a row that may fail (a used-up base prompt, a Wikipedia context about an unusable entity) before a
#: sampler declares its pool exhausted.
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


#: (attribute, template) -> the entities whose prompt under that template the target knows, in a fixed order.
KnownEntities = Mapping[tuple[str, str], Sequence[str]]
#: tie(template, base entity, source entity) -> True when the metric cannot tell the source's value from the
#: base's under that base prompt (their first label tokens agree), so a causal pair would score without effect.
TieCheck = Callable[[str, str, str], bool]


def every_entity_known(domain: RavelDomain) -> KnownEntities:
    """The unfiltered view: every entity with a value counts as known under every template of the attribute."""
    return {(a, t): domain.entities_with(a) for a in domain.attributes_with_values for t in domain.attribute_prompts[a]}


class PairSampler:
    """A seeded stream of distinct examples of one kind (split, attribute, attribute type), from known prompts.

    - **causal** for A: a base prompt (A-template t, base entity) the target knows, and a source entity whose
      prompt under the SAME template t it knows too, with another value of A (and no first-label-token tie with
      the base's value). So the unpatched target answers the base's value and the label is one it can produce.
    - **isolate** for A, querying B: a base prompt (B-template, base entity) the target knows; the source is any
      entity with another value of B; the label is the base's own B.
    Two examples of one sampler never share (queried attribute, base template, base entity, source entity). The
    pool is exhausted once every base prompt has no unused source left (or draws keep failing).

    Args:
        domain: the RAVEL domain.
        split: "train" or "test".
        attribute: A, the attribute the instruction names.
        attribute_type: "causal" or "isolate".
        known: the known prompts (``hyperdas.data.known.known_entities``, or ``every_entity_known``).
        isolate_attributes: the B that isolate examples query (ignored for causal ones).
        sources: which source contexts to draw from, a non-empty subset of ``SOURCE_KINDS``.
        seed: the stream's seed; the same arguments give the same stream.
        tie: causal pairs this returns True for are skipped and counted in ``ties``.
    """

    def __init__(
        self,
        domain: RavelDomain,
        split: str,
        attribute: str,
        attribute_type: str,
        known: KnownEntities,
        isolate_attributes: Sequence[str] = (),
        sources: Sequence[str] = SOURCE_KINDS,
        seed: int = 0,
        tie: TieCheck | None = None,
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
        self._known, self._tie = known, tie
        #: queried attribute -> live base prompts (template, base entity)
        self._bases = {q: [(t, e) for t in domain.templates(q, split) for e in known.get((q, t), ())] for q in queried}
        self.base_prompts = sum(len(b) for b in self._bases.values())
        self._sources: dict[tuple[str, str, str], list[str]] = {}
        self._source_templates = [t for a in domain.attributes for t in domain.templates(a, split)]
        wikipedia = domain.wikipedia[split] if "wikipedia" in sources else []
        self._wiki_all = wikipedia
        self._wiki_open = [c for c in wikipedia if c.entity is None]
        self._wiki_of: dict[str, list[WikipediaContext]] = {}
        for context in wikipedia:
            if context.entity is not None:
                self._wiki_of.setdefault(context.entity, []).append(context)
        use_templates = "template" in sources and bool(self._source_templates)
        n_options = len(domain.attributes) + 1 if use_templates and wikipedia else 1
        self._wikipedia_chance = 0.0 if not wikipedia else 1.0 / n_options
        self._rng = random.Random(f"{seed}/{domain.name}/{split}/{attribute}/{attribute_type}")
        self.ties = 0
        self.exhausted = self.base_prompts == 0 or not (use_templates or wikipedia)

    def take(self, n: int) -> list[dict[str, str]]:
        """Up to ``n`` new examples (fewer once the pool is exhausted)."""
        out: list[dict[str, str]] = []
        failed = 0
        while len(out) < n and not self.exhausted:
            example = self._draw()
            if example is None:
                failed += 1
                self.exhausted = failed >= _MAX_FAILED_DRAWS or not any(self._bases.values())
                continue
            failed = 0
            out.append(example)
        return out

    def _unused_sources(self, queried: str, template: str, base: str) -> list[str]:
        """Source entities not drawn yet for this base prompt: another value of ``queried`` (and, causal, known)."""
        key = (queried, template, base)
        if key not in self._sources:
            value = self.domain.value(base, queried)
            if self.attribute_type == "causal":
                pool = [e for e in self._known[(queried, template)] if self.domain.value(e, queried) != value]
                kept = [e for e in pool if self._tie is None or not self._tie(template, base, e)]
                self.ties += len(pool) - len(kept)
            else:
                kept = [e for e in self.domain.entities_with(queried) if self.domain.value(e, queried) != value]
            self._rng.shuffle(kept)
            self._sources[key] = kept
        return self._sources[key]

    def _draw(self) -> dict[str, str] | None:
        rng, domain = self._rng, self.domain
        live = [q for q, bases in self._bases.items() if bases]
        queried = live[0] if len(live) == 1 else rng.choice(live)
        bases = self._bases[queried]
        slot = rng.randrange(len(bases))
        base_template, base = bases[slot]
        unused = self._unused_sources(queried, base_template, base)
        if not unused:
            bases[slot] = bases[-1]
            bases.pop()
            return None
        context = None
        if self._wikipedia_chance and rng.random() < self._wikipedia_chance:
            if self.attribute_type == "causal":  # contexts about a usable source, or about any entity
                eligible = self._wiki_open + [c for e in unused for c in self._wiki_of.get(e, ())]
            else:
                eligible = self._wiki_all
            context = rng.choice(eligible) if eligible else None
        if context is not None and context.entity is not None:
            source = context.entity
            if source not in unused:  # isolate: a context about an entity with the same value (or none)
                return None
            unused.remove(source)
        else:
            source = unused.pop()
        if context is not None:
            source_template, source_kind = context.template, "wikipedia"
        else:
            source_template, source_kind = rng.choice(self._source_templates), "template"
        prefix, suffix = fill(base_template, base)
        source_prefix, source_suffix = fill(source_template, source)
        verify_entity = source if self.attribute_type == "causal" else base
        verify_prefix, _ = fill(base_template, verify_entity)
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


def pair_samplers(
    domain: str,
    attributes: Sequence[str],
    split: str,
    known: KnownEntities | None = None,
    seed: int = 0,
    isolate_attributes: Sequence[str] | None = None,
    sources: Sequence[str] = SOURCE_KINDS,
    tie: TieCheck | None = None,
) -> dict[tuple[str, str], PairSampler]:
    """One sampler per (attribute, attribute type) of a split, keyed by that pair (``known`` None: unfiltered)."""
    ravel = load_domain(domain)
    isolate = isolate_attributes_for(ravel, attributes, isolate_attributes)
    known = every_entity_known(ravel) if known is None else known
    return {
        (a, kind): PairSampler(ravel, split, a, kind, known, isolate[a], sources, seed, tie)
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
    known: KnownEntities | None = None,
) -> list[dict[str, str]]:
    """``n_per_kind`` examples for each (split, attribute, attribute type), in that order.

    ``known`` None treats every prompt as known (unfiltered examples, for tests and stand-in targets).
    """
    return [
        example
        for split in splits
        for sampler in pair_samplers(domain, attributes, split, known, seed, isolate_attributes, sources).values()
        for example in sampler.take(n_per_kind)
    ]
