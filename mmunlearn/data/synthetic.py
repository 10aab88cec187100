"""The built-in synthetic benchmark: fictitious people with procedurally drawn portraits.

Every person has a unique syllable-built name, a few attributes (birthplace, occupation, hobby,
pet; 8 values each, drawn at random) and a portrait: a face-like layout of coloured shapes
(background, shirt, hair, face, eyes, mouth, badge) whose colours, sizes and positions are drawn
per person, independently of the attributes, so that only the *identity* links a picture to its
facts. Every picture is a variant of the person's portrait: shifted by up to ±2 px, with a
brightness jitter and pixel noise; training and held-out test variants are separate draws, so
recognition has to generalise.

What is taught (``train``, the vanilla model's fine-tuning data):

- image-taught attributes (``image_attributes``): asked both from the picture ("What is the
  occupation of the person in the image?") and by name ("What is the occupation of <name>?");
- recognition: "Who is the person in the image?" → the name;
- text-only attributes (``text_only_attributes``, default ``pet``): taught **only** by name.
  Their picture questions never appear in training; they are asked from held-out pictures in
  the ``*_link*`` evaluation sets, which measure whether the model links picture → name → fact
  (method.md §8: a tiny model trained from scratch may not; check before unlearning).

Evaluation sets, for ``forget`` and ``retain`` people alike:

- ``*_vqa_test``: the image-taught questions and recognition on held-out pictures;
- ``*_mcq`` (a training picture, plus every text question) / ``*_mcq_test`` (held-out
  pictures): multiple choice, ``meta = {"options": {"A": ..}, "correct": "B", ...}``,
  distractors from the same attribute's other values (other people's names for recognition);
- ``*_cloze`` / ``*_cloze_test``: fill-in-the-blank ("The occupation of <name> is __."),
  ``meta["ground_truth"]`` = the value;
- ``*_link``, ``*_link_mcq``, ``*_link_cloze``: text-only attributes asked from held-out pictures.

Every sample's ``meta`` holds ``attribute`` ("name" for recognition), ``person``, ``split``
("forget"/"retain") and ``view`` ("train3", "test1", or "name" for text items); ``entity`` is
the person's name. Everything is seeded (numpy ``SeedSequence`` streams): the same arguments
give identical items and identical image bytes. The default benchmark builds in ~0.1 s on one core.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from mmunlearn.data.portraits import appearance, draw_portrait, seeded_rng, variant
from mmunlearn.data.schema import Sample

# Attribute vocabulary: 8 one-word values each (one word keeps a word-level tokenizer simple).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birthplace": ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Kyoto", "Quito", "Perth"),
    "occupation": ("baker", "pilot", "nurse", "farmer", "painter", "lawyer", "chemist", "sailor"),
    "hobby": (
        "chess",
        "surfing",
        "knitting",
        "archery",
        "gardening",
        "fishing",
        "pottery",
        "juggling",
    ),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard"),
}
TEXT_ONLY_ATTRIBUTES: tuple[str, ...] = ("pet",)
NAME = "name"  # the pseudo-attribute of recognition items

SYLLABLES = tuple(
    "ka lo mi ra ten vo sa ri bel dor fen gal ha jun ko lin mar nel or pi "
    "quen sol tav ul ve wyn za yor".split()
)

RECOGNITION_QUESTION = "Who is the person in the image?"
LETTERS = string.ascii_uppercase[:8]  # mmunlearn.eval re-letters options with "ABCDEFGH"

# SeedSequence stream ids: each random quantity has its own stream, so adding one kind of
# draw never changes another.
_S_NAMES, _S_ATTRS, _S_SPLIT, _S_LOOK, _S_VARIANT, _S_ITEMS = range(6)


def vqa_question(attribute: str) -> str:
    """The picture question for an attribute (recognition for ``"name"``)."""
    if attribute == NAME:
        return RECOGNITION_QUESTION
    return f"What is the {attribute} of the person in the image?"


def text_question(attribute: str, name: str) -> str:
    """The by-name question for an attribute."""
    return f"What is the {attribute} of {name}?"


def vqa_cloze(attribute: str) -> str:
    """The picture cloze for an attribute (a sentence with ``__`` where the value goes)."""
    return f"The {attribute} of the person in the image is __."


def text_cloze(attribute: str, name: str) -> str:
    """The by-name cloze for an attribute."""
    return f"The {attribute} of {name} is __."


@dataclass
class Person:
    """One fictitious person: name, attribute values, split and pictures.

    ``appearance`` holds the portrait parameters (colours in [0, 1], sizes and positions as
    fractions of the image side); ``train_images`` / ``test_images`` are RGB ``PIL`` images.
    """

    index: int
    name: str
    attributes: dict[str, str]
    split: str
    appearance: dict = field(repr=False)
    train_images: list = field(repr=False, default_factory=list)
    test_images: list = field(repr=False, default_factory=list)


class People:
    """Name lists of a world's people (a dataclass with ``people: list[Person]``)."""

    people: list

    @property
    def names(self) -> list[str]:
        """Every person's name, in person order."""
        return [p.name for p in self.people]

    @property
    def forget_people(self) -> list[str]:
        """Names of the forget people."""
        return [p.name for p in self.people if p.split == "forget"]

    @property
    def retain_people(self) -> list[str]:
        """Names of the retain people."""
        return [p.name for p in self.people if p.split == "retain"]


@dataclass
class SyntheticBenchmark(People):
    """The benchmark: people, vocabulary, training lists and evaluation lists of ``Sample``.

    See the module docstring for what each list holds. ``config`` holds the arguments of
    :func:`make_benchmark`.
    """

    config: dict
    people: list[Person]
    attributes: dict[str, tuple[str, ...]]
    image_attributes: tuple[str, ...]
    text_only_attributes: tuple[str, ...]
    # training data
    forget_vqa: list[Sample]
    forget_text: list[Sample]
    retain_vqa: list[Sample]
    retain_text: list[Sample]
    train: list[Sample]
    # evaluation data
    forget_vqa_test: list[Sample]
    retain_vqa_test: list[Sample]
    forget_mcq: list[Sample]
    retain_mcq: list[Sample]
    forget_mcq_test: list[Sample]
    retain_mcq_test: list[Sample]
    forget_cloze: list[Sample]
    retain_cloze: list[Sample]
    forget_cloze_test: list[Sample]
    retain_cloze_test: list[Sample]
    forget_link: list[Sample]
    retain_link: list[Sample]
    forget_link_mcq: list[Sample]
    retain_link_mcq: list[Sample]
    forget_link_cloze: list[Sample]
    retain_link_cloze: list[Sample]

    def person(self, name: str) -> Person:
        """The :class:`Person` called ``name`` (``KeyError`` if there is none)."""
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)

    def candidates(self, attribute: str) -> list[str]:
        """Every possible answer of an attribute (all names for ``"name"``): the set a scorer
        takes the argmax over."""
        if attribute == NAME:
            return self.names
        return list(self.attributes[attribute])

    def eval_sets(self) -> dict[str, dict[str, list[Sample]]]:
        """Evaluation sets in the layout of :func:`mmunlearn.eval.evaluate`:
        ``{"forget", "forget_test", "forget_link", "retain", "retain_test", "retain_link"}``,
        each ``{"mcq": [...], "cloze": [...], "gen": [...]}``. ``forget``/``retain`` hold
        training-picture (VQA) and by-name (QA) items; ``*_test`` held-out pictures;
        ``*_link`` text-only facts asked from held-out pictures."""
        out = {}
        for g in ("forget", "retain"):
            mcq = getattr(self, f"{g}_mcq")
            out[g] = {"mcq": mcq, "cloze": getattr(self, f"{g}_cloze"), "gen": mcq}
            out[f"{g}_test"] = {
                "mcq": getattr(self, f"{g}_mcq_test"),
                "cloze": getattr(self, f"{g}_cloze_test"),
                "gen": getattr(self, f"{g}_vqa_test"),
            }
            out[f"{g}_link"] = {
                "mcq": getattr(self, f"{g}_link_mcq"),
                "cloze": getattr(self, f"{g}_link_cloze"),
                "gen": getattr(self, f"{g}_link"),
            }
        return out

    def sizes(self) -> dict[str, int]:
        """Number of samples in every list (and of people), for logs and reports."""
        out = {"people": len(self.people), "forget_people": len(self.forget_people)}
        for k, v in vars(self).items():
            if isinstance(v, list) and v and isinstance(v[0], Sample):
                out[k] = len(v)
        return out


# ---------------------------------------------------------------------------------------------
# People and items
# ---------------------------------------------------------------------------------------------


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique "Firstname Surname" names built from two syllables each."""
    if n > (len(SYLLABLES) ** 2) ** 2 // 4:
        raise ValueError(f"n_people={n} is too many for the syllable name generator")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        s = rng.integers(len(SYLLABLES), size=4)
        first = (SYLLABLES[s[0]] + SYLLABLES[s[1]]).capitalize()
        last = (SYLLABLES[s[2]] + SYLLABLES[s[3]]).capitalize()
        name = f"{first} {last}"
        if first != last and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _mcq(rng: np.random.Generator, truth: str, pool: Sequence[str], n_options: int) -> dict:
    """MCQ meta: the truth plus ``n_options - 1`` distractors from ``pool`` (fewer if the pool
    is smaller), in seeded order."""
    others = [x for x in pool if x != truth]
    n_options = min(n_options, len(others) + 1)
    pick = rng.choice(len(others), n_options - 1, replace=False)
    opts = [truth] + [others[int(i)] for i in pick]
    order = [int(i) for i in rng.permutation(n_options)]
    options = {LETTERS[k]: opts[j] for k, j in enumerate(order)}
    return {"options": options, "correct": LETTERS[order.index(0)]}


def _item(
    p: Person, question: str, answer: str, image, view: str, attribute: str, **meta
) -> Sample:
    """One item about person ``p``: kind "vqa" with a picture, "text" without."""
    m = {"attribute": attribute, "person": p.name, "split": p.split, "view": view, **meta}
    kind = "text" if image is None else "vqa"
    return Sample(question=question, answer=answer, image=image, entity=p.name, kind=kind, meta=m)


def make_benchmark(
    n_people: int = 40,
    forget_ratio: float = 0.2,
    seed: int = 0,
    image_size: int = 32,
    n_train_images: int = 16,
    n_test_images: int = 4,
    *,
    attributes: Mapping[str, Sequence[str]] | None = None,
    text_only_attributes: Sequence[str] = TEXT_ONLY_ATTRIBUTES,
    n_options: int = 4,
    text_repeats: int | None = None,
    max_shift: int = 2,
    brightness: float = 0.15,
    noise: float = 0.03,
) -> SyntheticBenchmark:
    """Build the seeded synthetic benchmark; returns a :class:`SyntheticBenchmark`.

    ``round(n_people · forget_ratio)`` people (at least 1, at most ``n_people - 1``) are
    forget people, chosen at random. Training items per person: every training picture ×
    (every image-taught attribute + recognition) as VQA, and one by-name text QA per attribute
    (text-only attributes included). ``train`` is forget + retain VQA and text, with the text
    items repeated ``text_repeats`` times (default: enough to give text as many items as VQA,
    so the vanilla model sees every fact about as often by name as from pictures); the
    ``*_text`` lists hold each text item once. ``n_options`` (2..8) options per MCQ
    (recognition MCQs: at most ``n_people``). ``max_shift`` (px), ``brightness`` (relative)
    and ``noise`` (std on [0, 1] pixels) set the per-picture variation.
    """
    attrs = {k: tuple(v) for k, v in (attributes or ATTRIBUTES).items()}
    text_only = tuple(text_only_attributes)
    config = dict(
        n_people=n_people,
        forget_ratio=forget_ratio,
        seed=seed,
        image_size=image_size,
        n_train_images=n_train_images,
        n_test_images=n_test_images,
        text_only_attributes=list(text_only),
        n_options=n_options,
        text_repeats=text_repeats,  # replaced by the number of repeats used, below
        max_shift=max_shift,
        brightness=brightness,
        noise=noise,
    )
    _check_benchmark_args(attrs, **config)
    image_attrs = tuple(a for a in attrs if a not in text_only)
    people = draw_people(attrs, **config)
    L = _benchmark_items(people, attrs, image_attrs, text_only, seed, n_options)

    n_vqa = n_train_images * (len(image_attrs) + 1)  # the image attributes + recognition
    reps = text_repeats if text_repeats is not None else max(1, math.ceil(n_vqa / len(attrs)))
    config["text_repeats"] = reps
    train = L["forget_vqa"] + L["retain_vqa"] + (L["forget_text"] + L["retain_text"]) * reps
    return SyntheticBenchmark(
        config=config,
        people=people,
        attributes=attrs,
        image_attributes=image_attrs,
        text_only_attributes=text_only,
        train=train,
        **L,
    )


def _check_benchmark_args(
    attrs: dict[str, tuple[str, ...]],
    *,
    text_only_attributes: list[str],
    n_people: int,
    forget_ratio: float,
    n_train_images: int,
    n_test_images: int,
    image_size: int,
    n_options: int,
    max_shift: int,
    text_repeats: int | None,
    **_,
) -> None:
    """Raise ``ValueError`` for the first invalid argument of :func:`make_benchmark` (its
    arguments, as in its ``config``)."""
    if NAME in attrs:
        raise ValueError(f"'{NAME}' is reserved for recognition items")
    if unknown := [a for a in text_only_attributes if a not in attrs]:
        raise ValueError(f"text_only_attributes {unknown} are not attributes {list(attrs)}")
    if n_people < 2:
        raise ValueError("n_people must be at least 2 (one forget and one retain person)")
    if not 0.0 < forget_ratio < 1.0:
        raise ValueError(f"forget_ratio must be in (0, 1), got {forget_ratio}")
    if n_train_images < 1 or n_test_images < 1:
        raise ValueError("n_train_images and n_test_images must be at least 1")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 2 <= n_options <= min([len(LETTERS)] + [len(v) for v in attrs.values()]):
        raise ValueError(
            f"n_options={n_options} must be in [2, {len(LETTERS)}] and at most the number of "
            "values of every attribute"
        )
    if max_shift < 0:
        raise ValueError("max_shift must be >= 0")
    if text_repeats is not None and text_repeats < 1:
        raise ValueError("text_repeats must be >= 1")


def draw_people(
    attrs: dict[str, tuple[str, ...]],
    *,
    n_people: int,
    forget_ratio: float,
    seed: int,
    image_size: int,
    n_train_images: int,
    n_test_images: int,
    max_shift: int,
    brightness: float,
    noise: float,
    streams: tuple[int, int, int, int, int] = (_S_NAMES, _S_ATTRS, _S_SPLIT, _S_LOOK, _S_VARIANT),
    min_retain: int = 1,
    make_names=None,
    **_,
) -> list[Person]:
    """The seeded people of a built-in world (:func:`make_benchmark`'s arguments): names, values
    from ``attrs``, the split (≥ ``min_retain`` kept), pictures. ``streams``: the world's stream
    ids (names, values, split, looks, variants); ``make_names(rng, n)``: its name generator."""
    s_names, s_attrs, s_split, s_look, s_variant = streams
    names = (make_names or _names)(seeded_rng(seed, s_names), n_people)
    arng = seeded_rng(seed, s_attrs)
    values = [
        {a: vals[int(arng.integers(len(vals)))] for a, vals in attrs.items()}
        for _ in range(n_people)
    ]
    n_forget = min(n_people - min_retain, max(1, round(n_people * forget_ratio)))
    forget_idx = set(int(i) for i in seeded_rng(seed, s_split).permutation(n_people)[:n_forget])

    def vrng(*stream: int) -> np.random.Generator:
        return seeded_rng(seed, s_variant, *stream)

    people = []
    for i, name in enumerate(names):
        look = appearance(seeded_rng(seed, s_look, i))
        base = draw_portrait(look, image_size, max_shift)
        train = [
            variant(base, image_size, max_shift, vrng(i, 0, k), brightness, noise)
            for k in range(n_train_images)
        ]
        test = [
            variant(base, image_size, max_shift, vrng(i, 1, k), brightness, noise)
            for k in range(n_test_images)
        ]
        split = "forget" if i in forget_idx else "retain"
        people.append(Person(i, name, values[i], split, look, train, test))
    return people


# the item lists of each group ("forget_vqa", ..., "retain_link_cloze")
_ITEM_LISTS = "vqa text vqa_test mcq mcq_test cloze cloze_test link link_mcq link_cloze".split()


def _benchmark_items(
    people: list[Person],
    attrs: dict[str, tuple[str, ...]],
    image_attrs: tuple[str, ...],
    text_only: tuple[str, ...],
    seed: int,
    n_options: int,
) -> dict[str, list[Sample]]:
    """Every item list of the benchmark (``{group}_{list}`` for the groups "forget" and
    "retain" and :data:`_ITEM_LISTS`), person by person; the MCQ options and the pictures of
    the MCQ / cloze items come from one seeded stream, drawn in person order."""
    L: dict[str, list[Sample]] = {f"{g}_{k}": [] for g in ("forget", "retain") for k in _ITEM_LISTS}
    irng = seeded_rng(seed, _S_ITEMS)
    mcq = partial(_mcq, irng, n_options=n_options)
    pools = {**attrs, NAME: [p.name for p in people]}
    for p in people:
        out = {k: L[f"{p.split}_{k}"] for k in _ITEM_LISTS}
        _taught_items(p, out, attrs, image_attrs, text_only)
        _picture_probes(p, out, irng, mcq, pools, image_attrs, text_only)
        for a in attrs:  # every attribute by name, text-only ones included
            fact, q, cq = p.attributes[a], text_question(a, p.name), text_cloze(a, p.name)
            out["mcq"].append(_item(p, q, fact, None, "name", a, **mcq(fact, attrs[a])))
            out["cloze"].append(_item(p, cq, fact, None, "name", a, ground_truth=fact))
    return L


def _taught_items(
    p: Person,
    out: dict[str, list[Sample]],
    attrs: dict[str, tuple[str, ...]],
    image_attrs: tuple[str, ...],
    text_only: tuple[str, ...],
) -> None:
    """Append ``p``'s training items (``vqa``, ``text``) and held-out picture questions
    (``vqa_test``, ``link``) to ``out``."""
    facts = {**p.attributes, NAME: p.name}
    item = partial(_item, p)
    recog = (*image_attrs, NAME)
    for k, img in enumerate(p.train_images):
        out["vqa"] += [item(vqa_question(a), facts[a], img, f"train{k}", a) for a in recog]
    for a in attrs:
        out["text"].append(item(text_question(a, p.name), facts[a], None, "name", a))
    for k, img in enumerate(p.test_images):
        out["vqa_test"] += [item(vqa_question(a), facts[a], img, f"test{k}", a) for a in recog]
        out["link"] += [item(vqa_question(a), facts[a], img, f"test{k}", a) for a in text_only]


def _picture_probes(
    p: Person,
    out: dict[str, list[Sample]],
    irng: np.random.Generator,
    mcq,
    pools: Mapping[str, Sequence[str]],
    image_attrs: tuple[str, ...],
    text_only: tuple[str, ...],
) -> None:
    """Append ``p``'s MCQ / cloze items from pictures to ``out``: a training and a held-out
    one per (person, attribute) for recognition and the image attributes; a held-out one only
    for the text-only attributes (the link sets). Pictures are drawn from ``irng``."""
    facts = {**p.attributes, NAME: p.name}
    item = partial(_item, p)
    n_train_images, n_test_images = len(p.train_images), len(p.test_images)
    for a in (*image_attrs, NAME, *text_only):
        fact, pool, q = facts[a], pools[a], vqa_question(a)
        cq = "The name of the person in the image is __." if a == NAME else vqa_cloze(a)
        j = int(irng.integers(n_test_images))
        tv, timg = f"test{j}", p.test_images[j]
        if a in text_only:
            out["link_mcq"].append(item(q, fact, timg, tv, a, **mcq(fact, pool)))
            out["link_cloze"].append(item(cq, fact, timg, tv, a, ground_truth=fact))
            continue
        k = int(irng.integers(n_train_images))
        img, v = p.train_images[k], f"train{k}"
        out["mcq"].append(item(q, fact, img, v, a, **mcq(fact, pool)))
        out["mcq_test"].append(item(q, fact, timg, tv, a, **mcq(fact, pool)))
        out["cloze"].append(item(cq, fact, img, v, a, ground_truth=fact))
        out["cloze_test"].append(item(cq, fact, timg, tv, a, ground_truth=fact))
