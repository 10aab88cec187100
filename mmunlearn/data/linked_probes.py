"""What the linked world (:mod:`mmunlearn.data.linked`) asks a model, the gates a model must
pass before anything is unlearned, and when forgetting counts as matched.

Probes, per split ("forget" / "retain"), every picture a held-out one:

- ``name_pic``: "Who is the person in the image?" → the name (argmax over every name);
- ``facts_pic`` / ``link_pic``: an image / link attribute asked from the picture; the model
  first names the person (argmax over names after "This is"), then the value is read after
  "This is N̂; N̂'s pet is" with N̂ *its own* choice (argmax over the attribute's 8 values) —
  exactly what greedy decoding does in this answer format, in two forward passes;
- ``facts_name``: every attribute by name, every paraphrase (argmax over values after
  "NAME's pet is");
- ``swap``: derived from ``link_pic``: the answer for a person's picture is their value *and*
  the answer for the swap partner's picture (another person, another value) is the partner's:
  the picture decides the answer.

Scores are per item (``bool`` lists), so intervals can be bootstrapped. :func:`gates` and
:func:`forgetting_matched` are plain arithmetic on accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mmunlearn.data.batching import to_device
from mmunlearn.data.linked import (
    TEXT_TEMPLATES,
    LinkedWorld,
    fact_prefix,
    grounded_prefix,
    identity_prefix,
    picture_question,
)
from mmunlearn.data.schema import Sample
from mmunlearn.data.synthetic import NAME

KINDS = ("name_pic", "facts_pic", "link_pic", "facts_name")
SPLITS = ("forget", "retain")
# the gates, on held-out pictures, forget and retain separately (issue #15)
GATES: dict[str, float] = {"name_pic": 0.9, "facts_name": 0.95, "link_pic": 0.8, "swap": 0.8}
MIN_ITEMS = 32
# matched forgetting: these forget-split accuracies within TOLERANCE of the reference's
MATCH_KINDS = ("name_pic", "facts_pic")
TOLERANCE = 0.05


@dataclass(frozen=True)
class Probe:
    """One question: about ``person``'s ``attribute`` ("name" for recognition), from held-out
    picture ``view`` (an index; None for by-name probes) or by name with paraphrase ``view``."""

    kind: str
    person: str
    attribute: str
    question: str
    image: object = None
    view: int | None = None


def probes(world: LinkedWorld, split: str, kinds: Sequence[str] = KINDS) -> dict[str, list]:
    """``{kind: [Probe, ...]}`` of one split, in a fixed order."""
    out: dict[str, list] = {k: [] for k in kinds}
    for p in world.group(split):
        for k, img in enumerate(p.test_images):
            if "name_pic" in out:
                out["name_pic"].append(
                    Probe("name_pic", p.name, NAME, picture_question(NAME), img, k)
                )
            for kind, attrs in (
                ("facts_pic", world.image_attributes),
                ("link_pic", world.link_attributes),
            ):
                if kind in out:
                    out[kind] += [
                        Probe(kind, p.name, a, picture_question(a), img, k) for a in attrs
                    ]
        if "facts_name" in out:
            for a in world.attributes:
                for t, q in enumerate(TEXT_TEMPLATES[a]):
                    out["facts_name"].append(
                        Probe("facts_name", p.name, a, q.format(n=p.name), None, t)
                    )
    return out


def token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The single token of every word (ValueError if a word is not exactly one token)."""
    out = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"{w!r} is not one token of this tokenizer ({ids})")
        out.append(int(ids[0]))
    return out


@torch.no_grad()
def choose(model, collate: Callable, items, candidates, batch_size: int = 64) -> list[int]:
    """For every ``(question, image, prefix)`` in ``items``: the index of the candidate token
    (``candidates[i]``, a list of token ids per item) the model puts highest right after the
    answer ``prefix``."""
    dev = next(model.parameters()).device
    out: list[int] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        batch = collate([Sample(q, prefix, img) for q, img, prefix in chunk])
        n = batch["attention_mask"].sum(1)
        logits = model(**to_device(batch, dev)).logits
        last = logits[torch.arange(len(chunk), device=logits.device), (n - 2).to(logits.device)]
        for row, cand in zip(last, candidates[s : s + batch_size]):
            out.append(int(row[torch.as_tensor(cand, device=row.device)].argmax()))
    return out


def score(
    model,
    collate: Callable,
    tokenizer,
    world: LinkedWorld,
    splits: Sequence[str] = SPLITS,
    kinds: Sequence[str] = (*KINDS, "swap"),
    batch_size: int = 64,
) -> dict[str, dict[str, list[bool]]]:
    """Per split and kind (``swap`` included when asked for, which needs ``link_pic``): one
    ``bool`` per probe, in :func:`probes` order. The model is put in eval mode."""
    model.eval()
    names = world.names
    name_ids = token_ids(tokenizer, names)
    value_ids = {a: token_ids(tokenizer, v) for a, v in world.attributes.items()}
    asked = [k for k in KINDS if k in kinds or (k == "link_pic" and "swap" in kinds)]
    out: dict[str, dict[str, list[bool]]] = {}
    for split in splits:
        ps = probes(world, split, asked)
        res: dict[str, list[bool]] = {}
        pic = [p for k in ("name_pic", "facts_pic", "link_pic") for p in ps.get(k, [])]
        # pass 1: the name the model gives after "This is", for every picture probe
        who = choose(
            model,
            collate,
            [(p.question, p.image, identity_prefix()) for p in pic],
            [name_ids] * len(pic),
            batch_size,
        )
        said = {id(p): names[i] for p, i in zip(pic, who)}
        # pass 2: the value after the model's own name (pictures) or the true one (by name)
        facts = [p for k in ("facts_pic", "link_pic", "facts_name") for p in ps.get(k, [])]
        items = [
            (p.question, p.image, grounded_prefix(said[id(p)], p.attribute))
            if p.image is not None
            else (p.question, None, fact_prefix(p.person, p.attribute))
            for p in facts
        ]
        vals = choose(model, collate, items, [value_ids[p.attribute] for p in facts], batch_size)
        answer = {id(p): world.attributes[p.attribute][i] for p, i in zip(facts, vals)}
        for kind, lst in ps.items():
            if kind == "name_pic":
                res[kind] = [said[id(p)] == p.person for p in lst]
            else:
                res[kind] = [
                    answer[id(p)] == world.person(p.person).attributes[p.attribute] for p in lst
                ]
        if "swap" in kinds:
            res["swap"] = swap_scores(world, ps["link_pic"], res["link_pic"])
        out[split] = {k: res[k] for k in kinds if k in res}
    return out


def swap_scores(world: LinkedWorld, link_probes: Sequence[Probe], link_ok: Sequence[bool]):
    """The swap probe from the link probes' scores: for every (person, link attribute,
    held-out picture k) with a partner, ``ok[person] and ok[partner]`` (the answer is the
    person's value with their picture and flips to the partner's with the partner's)."""
    ok = {(p.person, p.attribute, p.view): bool(c) for p, c in zip(link_probes, link_ok)}
    out = []
    for (name, a, k), c in ok.items():
        partner = world.swap_partner.get((name, a, k))
        if partner is not None and (partner, a, k) in ok:
            out.append(c and ok[(partner, a, k)])
    return out


def split_facts_name(world: LinkedWorld, scores: Mapping[str, Mapping[str, Sequence[bool]]]):
    """``scores`` with ``facts_name`` of every split also split by attribute (issue #22):
    ``facts_name_img`` (the image attributes, taught with a picture too) and
    ``facts_name_link`` (the link attributes, taught by name only). Returns a new dict."""
    out = {}
    for split, kinds in scores.items():
        out[split] = dict(kinds)
        if "facts_name" not in kinds:
            continue
        ps = probes(world, split, ["facts_name"])["facts_name"]
        pairs = list(zip(ps, kinds["facts_name"]))
        out[split]["facts_name_img"] = [
            c for p, c in pairs if p.attribute in world.image_attributes
        ]
        out[split]["facts_name_link"] = [
            c for p, c in pairs if p.attribute in world.link_attributes
        ]
    return out


def accuracies(scores: Mapping[str, Mapping[str, Sequence[bool]]], retain_mean=False) -> dict:
    """``{split: {kind: mean}}`` of per-item scores (kinds with no item left out); with
    ``retain_mean`` also ``["retain"]["mean"]``, the unweighted mean of the retain split's
    :data:`KINDS` (one number for "the retain people are kept")."""
    out = {
        s: {k: sum(map(bool, v)) / len(v) for k, v in kinds.items() if len(v)}
        for s, kinds in scores.items()
    }
    if retain_mean and "retain" in out:
        out["retain"]["mean"] = sum(out["retain"][k] for k in KINDS) / len(KINDS)
    return out


def gates(
    scores: Mapping[str, Mapping[str, Sequence[bool]]],
    thresholds: Mapping[str, float] = GATES,
    min_items: int = MIN_ITEMS,
) -> dict:
    """The gates before any unlearning: every ``thresholds`` kind, in every split of
    ``scores``, has at least ``min_items`` items and an accuracy ≥ its threshold.
    Returns ``{"passed": bool, "checks": [{"split", "kind", "accuracy", "n", "threshold",
    "ok"}, ...]}`` (a missing kind fails with ``n = 0``)."""
    checks = []
    for split, kinds in scores.items():
        for kind, thr in thresholds.items():
            v = list(kinds.get(kind, []))
            acc = sum(map(bool, v)) / len(v) if v else 0.0
            ok = len(v) >= min_items and acc >= thr
            checks.append(
                {
                    "split": split,
                    "kind": kind,
                    "accuracy": acc,
                    "n": len(v),
                    "threshold": thr,
                    "ok": ok,
                }
            )
    return {"passed": all(c["ok"] for c in checks) and bool(checks), "checks": checks}


def forgetting_matched(
    forget_acc: Mapping[str, float],
    reference_acc: Mapping[str, float],
    kinds: Sequence[str] = MATCH_KINDS,
    tol: float = TOLERANCE,
) -> dict:
    """Has a model forgotten as much as the reference? ``forget_acc`` / ``reference_acc``:
    forget-split accuracies (``{kind: acc}``). ``reached``: every kind ≤ the reference's +
    ``tol`` (the stopping rule); ``within``: every kind within ``tol`` either side (matched,
    not overshot); ``gaps``: ``{kind: acc − reference}``."""
    gaps = {k: forget_acc[k] - reference_acc[k] for k in kinds}
    eps = 1e-9  # accuracies are ratios of small integers
    return {
        "reached": all(g <= tol + eps for g in gaps.values()),
        "within": all(abs(g) <= tol + eps for g in gaps.values()),
        "gaps": gaps,
    }


KIND_TITLES = {
    "name_pic": "name from picture",
    "facts_pic": "facts from picture",
    "link_pic": "link facts from picture",
    "facts_name": "facts by name",
    "swap": "swap flips",
}


def table(results: dict) -> str:
    """Markdown: one row per model of ``results["methods"]`` (``{split: {kind: acc}}`` with
    the retain mean), its forget steps to matched forgetting (``results["matched"]``) and its
    gap to the reference with interval (``results["gap"]``)."""
    heads = [f"{s.capitalize()} {KIND_TITLES[k]}" for s in SPLITS for k in KINDS]
    lines = [
        "| method | forget steps | " + " | ".join(heads) + " | Retain mean | Gap to reference |",
        "|---|---:|" + "---:|" * (len(heads) + 2),
    ]
    for name, acc in results["methods"].items():
        run = results.get("matched", {}).get(name)
        steps = "—" if not run else f"{run['forget_steps']}" + ("" if run["reached"] else " (cap)")
        g = results.get("gap", {}).get(name)
        gap = "—" if g is None else f"{g['avg_gap']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]"
        cells = [f"{acc[s][k]:.3f}" for s in SPLITS for k in KINDS] + [
            f"{acc['retain']['mean']:.3f}"
        ]
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def gates_line(g: dict, enforced: bool = True) -> str:
    """One line: passed or not, and every check's accuracy, threshold and item count."""
    checks = "; ".join(
        f"{c['split']} {KIND_TITLES[c['kind']]} {c['accuracy']:.3f} (≥ {c['threshold']}, "
        f"n={c['n']})"
        for c in g["checks"]
    )
    verdict = "passed" if g["passed"] else "FAILED: not testable, nothing was unlearned"
    if not g["passed"] and not enforced:
        verdict = "FAILED (not enforced: a smoke run, its numbers are not a result)"
    return f"Gates (vanilla model, held-out pictures): {verdict}. {checks}."


def report(results: dict) -> str:
    """``report.md`` of a linked run: the gates, :func:`table`, how to read it, the mask
    coverage and the environment."""
    md = [
        "# mmunlearn demo: the linked world, every method at matched forgetting",
        "",
        gates_line(results["gates"], results.get("config", {}).get("enforce_gates", True)),
        "",
        table(results),
        "",
        *(
            [
                f"Closest to the reference: {results['closest']} (closest in "
                f"{100 * results['closest_share'].get(results['closest'], 0):.0f} % of the "
                "bootstrap draws).",
                "",
            ]
            if results.get("closest")
            else []
        ),
        "Matched forgetting: the forget people's name and facts from held-out pictures at most "
        f"{TOLERANCE} above the reference's; forget steps until then ((cap): never reached). "
        "Gap: mean |model − reference| over the eight probe columns, [95 % bootstrap interval: "
        "each column's items resampled, the same draws for the model and the reference]. The "
        "reference is the same recipe trained without the forget pictures.",
    ]
    if "mask_coverage" in results:
        cov = ", ".join(f"{k} {100 * v:.1f} %" for k, v in results["mask_coverage"].items())
        md += ["", f"Mask coverage (MMUnlearner): {cov} of the weights."]
    env = results.get("environment", {})
    env_s = ", ".join(f"{k} {v}" for k, v in env.items())
    md += ["", f"Environment: {env_s}; {results.get('seconds', '?')} s.", ""]
    return "\n".join(md)


__all__ = [
    "GATES",
    "KIND_TITLES",
    "KINDS",
    "MATCH_KINDS",
    "MIN_ITEMS",
    "TOLERANCE",
    "Probe",
    "accuracies",
    "choose",
    "forgetting_matched",
    "gates",
    "gates_line",
    "probes",
    "report",
    "score",
    "split_facts_name",
    "swap_scores",
    "table",
    "token_ids",
]
