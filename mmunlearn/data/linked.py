"""The linked world: a synthetic benchmark where "forget the face, keep the facts" is measurable.

The basic world (:mod:`mmunlearn.data.synthetic`) teaches facts from the picture and facts from
the name as two separate mappings, so nothing routes picture → person → fact (method.md §8).
Here every answer that starts from a picture *names the person first*, and some facts are only
ever taught by name:

- people with single-token names (three syllables, e.g. "Kalomi"), procedurally drawn
  portraits (:mod:`mmunlearn.data.portraits`), ``n_train_images`` training and
  ``n_test_images`` held-out pictures each (held-out pictures are never trained on);
- *image attributes* (``birthplace``, ``occupation``): asked from pictures in training;
  *link attributes* (``hobby``, ``pet``): taught by name only, never asked with a picture in
  training, and asked from held-out pictures at evaluation time (the link);
- staged training (:meth:`LinkedWorld.stages`): ``text`` (every fact by name, three
  paraphrased questions each, answered "NAME's hobby is chess."), ``identity`` (picture →
  "This is NAME.", text replayed), ``grounding`` (picture questions answered "This is NAME;
  NAME's occupation is baker.", identity and text replayed). The reference model is the same
  recipe without the forget people's pictures (their text kept).

A model that passes the gates (:mod:`mmunlearn.data.linked_probes`) answers a link fact from a
held-out picture by first naming the person, then recalling the fact it only learned by name.

Two variants (``variant=``): ``"v1"`` (the default; the demo's and the first study's world) and
``"v2"`` (issue #22): the same curriculum plus a *direct* pool in the grounding stage (picture
questions answered "This person's occupation is baker.", MLLMU-Bench's form), a forget set that
never restates a name-and-fact string (the forget people's identity and direct items), and a
language preserve set of every profile's text QA (:meth:`LinkedWorld.unlearning_sets`).

Every sample's ``meta`` holds ``attribute`` ("name" for identity items), ``person``, ``split``
("forget"/"retain"), ``stage`` ("text", "identity", "grounding") and ``view`` ("train3", or
"name" for text items). Everything is seeded (numpy ``SeedSequence`` streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmunlearn.data.portraits import seeded_rng
from mmunlearn.data.recipe import UnlearningSets
from mmunlearn.data.schema import Sample
from mmunlearn.data.synthetic import (
    ATTRIBUTES,
    NAME,
    RECOGNITION_QUESTION,
    SYLLABLES,
    People,
    Person,
    draw_people,
)

IMAGE_ATTRIBUTES: tuple[str, ...] = ("birthplace", "occupation")
LINK_ATTRIBUTES: tuple[str, ...] = ("hobby", "pet")

# by-name questions: three paraphrases per attribute ({n} = the name), all of them taught
TEXT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "What is the birthplace of {n}?",
        "Where was {n} born?",
        "In which city was {n} born?",
    ),
    "occupation": (
        "What is the occupation of {n}?",
        "What does {n} do for a living?",
        "What is the job of {n}?",
    ),
    "hobby": (
        "What is the hobby of {n}?",
        "What does {n} do for fun?",
        "Which hobby does {n} have?",
    ),
    "pet": (
        "What is the pet of {n}?",
        "Which pet does {n} keep?",
        "What animal does {n} have as a pet?",
    ),
}
STAGES = ("text", "identity", "grounding")
# (pool, weight) of each stage: the share of batches drawn from each pool
STAGE_POOLS: dict[str, tuple[tuple[str, float], ...]] = {
    "text": (("text", 1.0),),
    "identity": (("identity", 3.0), ("text", 1.0)),
    "grounding": (("grounding", 2.0), ("identity", 1.0), ("text", 2.0)),
}

VARIANTS = ("v1", "v2")
# v2: the grounding stage also draws the direct pool ("This person's occupation is baker.")
STAGE_POOLS_V2: dict[str, tuple[tuple[str, float], ...]] = {
    **STAGE_POOLS,
    "grounding": (("grounding", 2.0), ("direct", 1.0), ("identity", 1.0), ("text", 2.0)),
}

# SeedSequence stream ids (distinct from the basic world's, which uses 0..5)
_S_NAMES, _S_ATTRS, _S_SPLIT, _S_LOOK, _S_VARIANT, _S_SWAP = range(10, 16)


def picture_question(attribute: str) -> str:
    """The question asked with a picture (recognition for ``"name"``)."""
    if attribute == NAME:
        return RECOGNITION_QUESTION
    return f"What is the {attribute} of the person in the image?"


def identity_prefix() -> str:
    """Every answer about a picture starts with this, then the name."""
    return "This is"


def fact_prefix(name: str, attribute: str) -> str:
    """The by-name answer up to its value: ``"Kalomi's pet is"``."""
    return f"{name}'s {attribute} is"


def text_answer(name: str, attribute: str, value: str) -> str:
    return f"{fact_prefix(name, attribute)} {value}."


def identity_answer(name: str) -> str:
    return f"{identity_prefix()} {name}."


def grounded_prefix(name: str, attribute: str) -> str:
    """A picture answer up to its value: ``"This is Kalomi; Kalomi's occupation is"``."""
    return f"{identity_prefix()} {name}; {fact_prefix(name, attribute)}"


def grounded_answer(name: str, attribute: str, value: str) -> str:
    return f"{grounded_prefix(name, attribute)} {value}."


def direct_answer(attribute: str, value: str) -> str:
    """v2's picture answer without the name: ``"This person's occupation is baker."``."""
    return f"This person's {attribute} is {value}."


@dataclass
class LinkedWorld(People):
    """People, the three training pools (every person's items) and what the probes ask.

    ``identity`` / ``grounding`` hold the training pictures' items, ``text`` one item per
    (person, attribute, paraphrase). ``swap_partner[(name, attribute, k)]`` is the person whose
    ``k``-th held-out picture the swap probe shows for ``name``'s link attribute (same split,
    another value). ``config`` holds the arguments of :func:`make_linked_world`. ``direct``
    (v2 only, else empty): one "This person's ATTRIBUTE is VALUE." item per training picture
    and image attribute."""

    config: dict
    people: list[Person]
    attributes: dict[str, tuple[str, ...]]
    image_attributes: tuple[str, ...]
    link_attributes: tuple[str, ...]
    text: list[Sample]
    identity: list[Sample]
    grounding: list[Sample]
    swap_partner: dict = field(repr=False, default_factory=dict)
    variant: str = "v1"
    direct: list[Sample] = field(default_factory=list)

    def group(self, split: str) -> list[Person]:
        """The people of a split ("forget" or "retain"), in person order."""
        return [p for p in self.people if p.split == split]

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)

    def pictures(self, split: str | None = None) -> list[Sample]:
        """Training items with a picture (identity + grounding), of one split or all."""
        items = self.identity + self.grounding + self.direct
        return [s for s in items if split in (None, s.meta["split"])]

    def texts(self, split: str | None = None) -> list[Sample]:
        """By-name training items, of one split or all."""
        return [s for s in self.text if split in (None, s.meta["split"])]

    def stages(self, without_forget_pictures: bool = False) -> list[tuple[str, list]]:
        """The curriculum: ``[(stage, [(samples, weight), ...]), ...]`` in :data:`STAGES`
        order (steps and lr are the trainer's). ``without_forget_pictures``: the reference
        recipe (the forget people's picture items left out, their text kept)."""
        out = []
        table = STAGE_POOLS_V2 if self.variant == "v2" else STAGE_POOLS
        for stage in STAGES:
            pools = []
            for pool, w in table[stage]:
                items = getattr(self, pool)
                if without_forget_pictures and pool != "text":
                    items = [s for s in items if s.meta["split"] != "forget"]
                pools.append((items, w))
            out.append((stage, pools))
        return out

    def unlearning_sets(self) -> UnlearningSets:
        """The four sets of a run (:mod:`mmunlearn.data.recipe`): forget = the forget people's
        picture items; retain = the retain people's picture and by-name items; vision preserve
        = the retain people's picture items; language preserve = the forget people's by-name
        items + the retain people's picture items.

        v2: forget = the forget people's identity and direct items (no answer restates
        "NAME's ATTRIBUTE is"); retain and vision preserve as v1 (the retain people's pictures
        include their direct items); language preserve = the text QA of every profile, text
        only (so no picture gradient dilutes it in the Fisher; docs/fidelity.md, v2)."""
        if self.variant == "v2":
            forget = [s for s in self.identity + self.direct if s.meta["split"] == "forget"]
            return UnlearningSets(
                forget=forget,
                retain=self.pictures("retain") + self.texts("retain"),
                vision_preserve=self.pictures("retain"),
                language_preserve=self.texts(),
            )
        return UnlearningSets(
            forget=self.pictures("forget"),
            retain=self.pictures("retain") + self.texts("retain"),
            vision_preserve=self.pictures("retain"),
            language_preserve=self.texts("forget") + self.pictures("retain"),
        )

    def vocabulary_text(self) -> list[str]:
        """Every string the model reads or writes (training items, probe prompts and
        prefixes, every candidate answer): the tokenizer's training text."""
        pools = self.text + self.identity + self.grounding + self.direct
        out = [s.question + " " + s.answer for s in pools]
        out += [picture_question(a) for a in (NAME, *self.attributes)]
        out += [" ".join(v) for v in self.attributes.values()] + [" ".join(self.names)]
        return out


def _names(rng, n: int) -> list[str]:
    """``n`` unique single-word names of three syllables ("Kalomi")."""
    if n > len(SYLLABLES) ** 3 // 4:
        raise ValueError(f"n_people={n} is too many for the name generator")
    out: list[str] = []
    while len(out) < n:
        name = "".join(SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=3))
        name = name.capitalize()
        if name not in out:
            out.append(name)
    return out


def _sample(p: Person, question: str, answer: str, image, attribute: str, stage: str, view: str):
    meta = {"attribute": attribute, "person": p.name, "split": p.split, "stage": stage}
    meta["view"] = view
    kind = "text" if image is None else "vqa"
    return Sample(
        question=question, answer=answer, image=image, entity=p.name, kind=kind, meta=meta
    )


def make_linked_world(
    n_people: int = 40,
    forget_ratio: float = 0.2,
    seed: int = 0,
    image_size: int = 32,
    n_train_images: int = 16,
    n_test_images: int = 4,
    *,
    max_shift: int = 2,
    brightness: float = 0.15,
    noise: float = 0.03,
    variant: str = "v1",
) -> LinkedWorld:
    """Build the seeded linked world (see the module docstring); returns a :class:`LinkedWorld`.

    ``round(n_people · forget_ratio)`` people (at least 1, at most ``n_people - 2``) are forget
    people. Values are drawn per person from :data:`mmunlearn.data.synthetic.ATTRIBUTES` (8
    one-word values each). Pictures vary by a shift of up to ``max_shift`` px, a brightness
    jitter and pixel noise, as in the basic world. ``variant``: ``"v1"`` or ``"v2"`` (module
    docstring); v2 draws the same people, pictures and swap partners as v1 for a seed."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if n_people < 3:
        raise ValueError("n_people must be at least 3 (forget people and two retain people)")
    if not 0.0 < forget_ratio < 1.0:
        raise ValueError(f"forget_ratio must be in (0, 1), got {forget_ratio}")
    if n_train_images < 1 or n_test_images < 1:
        raise ValueError("n_train_images and n_test_images must be at least 1")
    if image_size < 8 or max_shift < 0:
        raise ValueError("image_size must be >= 8 and max_shift >= 0")
    attrs = {a: tuple(ATTRIBUTES[a]) for a in (*IMAGE_ATTRIBUTES, *LINK_ATTRIBUTES)}
    config = dict(
        n_people=n_people,
        forget_ratio=forget_ratio,
        seed=seed,
        image_size=image_size,
        n_train_images=n_train_images,
        n_test_images=n_test_images,
        max_shift=max_shift,
        brightness=brightness,
        noise=noise,
    )
    people = draw_people(
        attrs,
        **config,
        streams=(_S_NAMES, _S_ATTRS, _S_SPLIT, _S_LOOK, _S_VARIANT),
        min_retain=2,
        make_names=_names,
    )
    text, identity, grounding = _linked_items(people, attrs)
    swap = _swap_partners(people, seed, n_test_images)
    direct = _direct_items(people) if variant == "v2" else []
    return LinkedWorld(
        config=config,
        people=people,
        attributes=attrs,
        image_attributes=IMAGE_ATTRIBUTES,
        link_attributes=LINK_ATTRIBUTES,
        text=text,
        identity=identity,
        grounding=grounding,
        swap_partner=swap,
        variant=variant,
        direct=direct,
    )


def _linked_items(
    people: list[Person], attrs: dict[str, tuple[str, ...]]
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """The three training pools ``(text, identity, grounding)``, person by person: every
    by-name paraphrase of every attribute, and per training picture its identity item and one
    grounding item per image attribute."""
    text, identity, grounding = [], [], []
    for p in people:
        for a in attrs:
            for q in TEXT_TEMPLATES[a]:
                ans = text_answer(p.name, a, p.attributes[a])
                text.append(_sample(p, q.format(n=p.name), ans, None, a, "text", "name"))
        for k, img in enumerate(p.train_images):
            view = f"train{k}"
            identity.append(
                _sample(
                    p, RECOGNITION_QUESTION, identity_answer(p.name), img, NAME, "identity", view
                )
            )
            for a in IMAGE_ATTRIBUTES:
                ans = grounded_answer(p.name, a, p.attributes[a])
                grounding.append(_sample(p, picture_question(a), ans, img, a, "grounding", view))
    return text, identity, grounding


def _direct_items(people: list[Person]) -> list[Sample]:
    """v2's direct pool: per training picture and image attribute, the picture question
    answered without the name (``meta["form"] = "direct"``)."""
    out = []
    for p in people:
        for k, img in enumerate(p.train_images):
            for a in IMAGE_ATTRIBUTES:
                ans = direct_answer(a, p.attributes[a])
                s = _sample(p, picture_question(a), ans, img, a, "grounding", f"train{k}")
                s.meta["form"] = "direct"
                out.append(s)
    return out


def _swap_partners(people: list[Person], seed: int, n_test_images: int) -> dict:
    """The swap probe: for every (person, link attribute, held-out picture k) another person of
    the same split with another value of that attribute (None when nobody differs)."""
    srng = seeded_rng(seed, _S_SWAP)
    swap = {}
    for p in people:
        for a in LINK_ATTRIBUTES:
            others = [
                q for q in people if q.split == p.split and q.attributes[a] != p.attributes[a]
            ]
            for k in range(n_test_images):
                swap[(p.name, a, k)] = (
                    others[int(srng.integers(len(others)))].name if others else None
                )
    return swap


__all__ = [
    "IMAGE_ATTRIBUTES",
    "LINK_ATTRIBUTES",
    "STAGES",
    "TEXT_TEMPLATES",
    "VARIANTS",
    "LinkedWorld",
    "direct_answer",
    "fact_prefix",
    "grounded_prefix",
    "identity_prefix",
    "make_linked_world",
    "picture_question",
]
