"""``--protocol mllmu``: MLLMU-Bench's own ``eval.py`` reproduced (franciscoliu/MLLMU-Bench
@0e3098e; docs/reference/eval_protocols.md §1, docs/eval_protocols.md for the line map).

What is reproduced, item for item:

- the sets and their rows: Forget (``forget_R``), Test (``Test_Set`` rows of the forget IDs,
  one of a row's ``images`` drawn per row *and task*), Retain (``retain_{100-R}``), Real
  celebrity (``Retain_Set``); rows in file order;
- the prompts, byte for byte (:func:`mcq_prompt`, :func:`cloze_prompt`,
  :func:`generation_prompt`): the LLaVA strings of ``eval.py`` with the few-shot blocks; shots
  are whole profiles of ``Full_Set`` drawn from the evaluated set's IDs (1 for classification,
  2 for cloze), every question of the exemplar profile becomes an exemplar, the exemplar's own
  questions at the same indices are skipped, classification shots only in forget / test /
  retain mode, cloze shots in every mode, generation never;
- greedy decoding, 50 new tokens; the response parse (text after ``ASSISTANT:``, else after
  ``Answer:``, stripped: :func:`response`); the MCQ score = the first character of the response,
  upper-cased, if it is an option key (:func:`mcq_letter`); cloze = case-insensitive substring
  (:func:`cloze_correct`); ROUGE-1/2/L F-measure of ``rouge_score`` with stemming and nltk
  ``sentence_bleu`` with smoothing method1 (:mod:`mmunlearn.eval.unlearning`); plain means per
  question type; the result block of ``eval.py`` (percent accuracies, its key names).

What differs, on purpose (recorded in the protocol): the draws (shot profiles, Test images) are
seeded (``random.Random(f"mllmu:{seed}:{mode}:{task}")``, same call order as the official
module-level ``random``); Test_Set shards are read in sorted order (``os.listdir`` order there);
generation is batched with left padding (``--batch-size 1`` is the official unbatched run);
the response is parsed from the decoded new tokens (the official decodes the whole sequence and
splits on the prompt's ``ASSISTANT:``, which gives the same text); the image token is the model
adapter's, expanded to its count (the official LLaVA processor does the same with ``<image>``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mmunlearn.data.schema import Sample
from mmunlearn.eval import unlearning
from mmunlearn.eval.tasks import EvalConfig, generate

SOURCE = "franciscoliu/MLLMU-Bench eval.py @0e3098e5ea7e4878ce4f19cdf873de1410b4d427"
MAX_NEW_TOKENS = 50  # eval.py:372,428,622,743,754
SHOTS = {"classification": 1, "cloze": 2}  # LLaVA: eval.py:264-265 (classification), :502-503
MCQ_ASK = "Just give ONE letter representing the answer directly."  # eval.py:361,416
CLOZE_ASK = "\nPlease **ONLY** provide the correct answer that should replace the [Blank]."
GEN_ASK_IMAGE = (
    "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
)
GEN_ASK_TEXT = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
# our set names → eval.py's mode strings
MODES = {
    "forget": "forget",
    "forget_test": "test",
    "retain": "retain_shared",
    "retain_celebrity": "retain_celebrity",
}
CLASSIFICATION_SHOT_MODES = ("forget", "retain_shared", "test")  # eval.py:344,398
CLOZE_SHOT_MODES = ("forget", "retain_shared", "test", "retain_celebrity")  # eval.py:596
# eval.py's result-block names (eval.py:1027-1054)
OFFICIAL_SETS = {
    "forget": "Forget Set Results",
    "forget_test": "Test Set Results",
    "retain": "Retain Set (shared dataset) Results",
    "retain_celebrity": "Retain Set (real person) Results",
}


class MultiImageUnsupported(ValueError):
    """A few-shot prompt holds several images and the model's adapter takes one per prompt."""


# ----------------------------------------------------------------------------- prompt strings
def options_block(question: str, options: dict) -> str:
    """``formulate_prompt_with_options`` (eval.py:113-127): the question, then one
    ``"{key}: {value}"`` line per option in stored order."""
    return f"{question}\n" + "\n".join(f"{k}: {v}" for k, v in options.items())


def mcq_prompt(
    question: str,
    options: dict,
    image: bool,
    shots: Sequence[dict] = (),
    image_token: str = "<image>",
) -> str:
    """The classification prompt (eval.py:349-361 image, :403-416 text). ``shots``: the exemplar
    questions ``{"Question", "Options", "Correct Answer"}`` (each with its own image when
    ``image``)."""
    head = f"USER: {image_token}\n" if image else "USER:\n"
    few = "".join(
        f"{head}Question: {s['Question']}\n"
        f"A: {s['Options']['A']}\nB: {s['Options']['B']}\n"
        f"C: {s['Options']['C']}\nD: {s['Options']['D']}\n"
        f"Correct Answer: {s['Correct Answer']}\n"
        for s in shots
    )
    return f"{few}{head}{options_block(question, options)}\n{MCQ_ASK}\nASSISTANT:"


def cloze_question(question: str) -> str:
    """eval.py:534,545,585: ``__`` → ``[Blank]`` and the instruction appended."""
    return question.replace("__", "[Blank]") + CLOZE_ASK


def cloze_prompt(
    question: str, image: bool, shots: Sequence[dict] = (), image_token: str = "<image>"
) -> str:
    """The fill-in-the-blank prompt (eval.py:596-608); ``question`` already rewritten by
    :func:`cloze_question`, ``shots`` = ``{"Question" (rewritten), "Correct Answer"}`` of the
    same type. Exemplar blocks have no space after ``USER:``; the query block has one."""
    if image:
        few = "".join(
            f"USER:{image_token}\n{s['Question']}\nCorrect Answer: {s['Correct Answer']}\n"
            for s in shots
        )
        return f"{few}USER: {image_token}\n{question}\nASSISTANT:"
    few = "".join(f"USER:\n{s['Question']}\nCorrect Answer: {s['Correct Answer']}\n" for s in shots)
    return f"{few}USER:\n{question}\nASSISTANT:"


def generation_prompt(question: str, image: bool, image_token: str = "<image>") -> str:
    """The generation prompt (eval.py:731 image -- note the space after ``ASSISTANT:`` --,
    :751 text)."""
    if image:
        return f"USER: {image_token}\n{question}\n{GEN_ASK_IMAGE}\nASSISTANT: "
    return f"USER: {question}\n{GEN_ASK_TEXT}\nASSISTANT:"


# ----------------------------------------------------------------------------- parsing, scoring
def response(decoded: str) -> str:
    """eval.py:626-631,757-763: the text after the first ``ASSISTANT:`` (up to a second one),
    else after the first ``Answer:``, else the whole text; stripped. (eval.py:375 uses only the
    first rule for MCQs; on a generation that follows a prompt ending in ``ASSISTANT:`` the two
    agree.)"""
    if "ASSISTANT:" in decoded:
        return decoded.split("ASSISTANT:")[1].strip()
    if "Answer:" in decoded:
        return decoded.split("Answer:")[1].strip()
    return decoded.strip()


def mcq_letter(resp: str, options: dict) -> str | None:
    """eval.py:376: the first character upper-cased if it is an option key, else ``None``
    (``"b) x"`` → B, ``"(B)"`` → None, ``"Answer: B"`` → A)."""
    return resp[0].upper() if resp and resp[0].upper() in options else None


def cloze_correct(ground_truth: str, resp: str) -> bool:
    """eval.py:639-646: ``ground_truth.lower() in response.lower()``."""
    return ground_truth.lower() in resp.lower()


# ----------------------------------------------------------------------------- items
def _rng(seed: int, mode: str, task: str) -> random.Random:
    return random.Random(f"mllmu:{seed}:{mode}:{task}")


def _shot_ids(rng: random.Random, id_list: list, k: int) -> list:
    """``random.sample(id_list, k)`` (eval.py:264,502); ``k`` capped at the number of IDs."""
    return rng.sample(id_list, min(k, len(id_list))) if k > 0 else []


def _query_image(row: dict, mode: str, rng: random.Random):
    """The row's ``image``, or in test mode one of ``images`` (eval.py:323-326)."""
    if mode == "test" and row.get("images"):
        return rng.choice(row["images"])
    return row["image"]


def _images(shot_images: list, image):
    imgs = [*shot_images, image]
    return imgs[0] if len(imgs) == 1 else imgs


def classification_items(
    rows, id_list, exemplars, mode: str, k: int, seed: int, image_token: str
) -> tuple[list[Sample], list]:
    """Classification items of one set (eval.py:258-437) and the exemplar IDs drawn.
    ``exemplars(ids)`` returns the ``Full_Set`` rows of those IDs in file order."""
    rng = _rng(seed, mode, "classification")
    ids = _shot_ids(rng, id_list, k)
    img_shots, txt_shots, shot_imgs, skip = [], [], [], {}
    for ex in exemplars(ids) if ids else []:
        task = ex["Classification_Task"]
        it = task.get("Image_Textual_Questions") or []
        pt = task.get("Pure_Text_Questions") or []
        for q in it:
            img_shots.append(
                {
                    "Question": q["Question"],
                    "Options": q["Options"],
                    "Correct Answer": q["Correct_Answer"],
                }
            )
            shot_imgs.append(ex["image"])
        for q in pt:
            txt_shots.append(
                {
                    "Question": q["Question"],
                    "Options": q["Options"],
                    "Correct Answer": q["Correct_Answer"],
                }
            )
        skip[ex["ID"]] = {"vqa": set(range(len(it))), "qa": set(range(len(pt)))}
    use = mode in CLASSIFICATION_SHOT_MODES
    out = []
    for row in rows:
        image = _query_image(row, mode, rng)
        task = row["Classification_Task"] or {}
        for kind, key in (("vqa", "Image_Textual_Questions"), ("qa", "Pure_Text_Questions")):
            for i, q in enumerate(task.get(key) or []):
                if i in skip.get(row["ID"], {}).get(kind, ()):
                    continue
                shots = (img_shots if kind == "vqa" else txt_shots) if use else []
                prompt = mcq_prompt(q["Question"], q["Options"], kind == "vqa", shots, image_token)
                img = _images(shot_imgs if use else [], image) if kind == "vqa" else None
                opts = dict(q["Options"])
                meta = {
                    "raw_prompt": prompt,
                    "task": "classification",
                    "kind": kind,
                    "id": row["ID"],
                    "index": i,
                    "options": opts,
                    "correct": q["Correct_Answer"],
                    "shots": ids,
                }
                answer = str(opts.get(str(q["Correct_Answer"]), q["Correct_Answer"]))
                out.append(Sample(q["Question"], answer, img, str(row["ID"]), kind, meta))
    return out, ids


def cloze_items(
    rows, id_list, exemplars, mode: str, k: int, seed: int, image_token: str
) -> tuple[list[Sample], list]:
    """Fill-in-the-blank items of one set (eval.py:474-650); types other than
    ``Image_Textual`` / ``Pure_Text`` are never counted there and are left out."""
    rng = _rng(seed, mode, "cloze")
    ids = _shot_ids(rng, id_list, k)
    shots = {"vqa": [], "qa": []}
    shot_imgs, skip = [], {}
    for ex in exemplars(ids) if ids else []:
        skip[ex["ID"]] = {"vqa": set(), "qa": set()}
        for i, q in enumerate(ex["Mask_Task"] or []):
            kind = {"Image_Textual": "vqa", "Pure_Text": "qa"}.get(q.get("Type"))
            if kind is None:
                continue
            shots[kind].append(
                {"Question": cloze_question(q["Question"]), "Correct Answer": q["Ground_Truth"]}
            )
            if kind == "vqa":
                shot_imgs.append(ex["image"])
            skip[ex["ID"]][kind].add(i)
    use = mode in CLOZE_SHOT_MODES
    out = []
    for row in rows:
        image = _query_image(row, mode, rng)
        for i, q in enumerate(row["Mask_Task"] or []):
            kind = {"Image_Textual": "vqa", "Pure_Text": "qa"}.get(q.get("Type"))
            if kind is None or i in skip.get(row["ID"], {}).get(kind, ()):
                continue
            question = cloze_question(q["Question"])
            prompt = cloze_prompt(question, kind == "vqa", shots[kind] if use else [], image_token)
            img = _images(shot_imgs if use else [], image) if kind == "vqa" else None
            meta = {
                "raw_prompt": prompt,
                "task": "cloze",
                "kind": kind,
                "id": row["ID"],
                "index": i,
                "ground_truth": q["Ground_Truth"],
                "shots": ids,
            }
            out.append(
                Sample(q["Question"], str(q["Ground_Truth"]), img, str(row["ID"]), kind, meta)
            )
    return out, ids


def generation_items(rows, mode: str, seed: int, image_token: str) -> list[Sample]:
    """Generation items of one set (eval.py:695-797): ``Image_Textual`` with the image, every
    other type as pure text (as eval.py's ``else``)."""
    rng = _rng(seed, mode, "generation")
    out = []
    for row in rows:
        image = _query_image(row, mode, rng)
        for i, q in enumerate(row["Generation_Task"] or []):
            kind = "vqa" if q.get("Type") == "Image_Textual" else "qa"
            prompt = generation_prompt(q["Question"], kind == "vqa", image_token)
            meta = {
                "raw_prompt": prompt,
                "task": "generation",
                "kind": kind,
                "id": row["ID"],
                "index": i,
                "ground_truth": q["Ground_Truth"],
            }
            img = image if kind == "vqa" else None
            out.append(
                Sample(q["Question"], str(q["Ground_Truth"]), img, str(row["ID"]), kind, meta)
            )
    return out


def build_set(
    name: str,
    rows: list[dict],
    id_list: list,
    exemplars,
    seed: int = 0,
    shots: dict | None = None,
    image_token: str = "<image>",
) -> tuple[dict, dict]:
    """The items of one set (``name`` a key of :data:`MODES`): ``({"mcq", "cloze", "gen"},
    {"classification": shot IDs, "cloze": shot IDs})``. ``rows``: the set's rows
    (:func:`mmunlearn.data.eval_sets.mllmu_rows`), ``id_list``: the IDs shots are drawn from
    (the set's; the forget IDs for Test), ``exemplars(ids)``: their ``Full_Set`` rows;
    ``shots``: profiles per task (default :data:`SHOTS`)."""
    mode = MODES[name]
    k = {**SHOTS, **(shots or {})}
    mcq, cls_ids = classification_items(
        rows, id_list, exemplars, mode, k["classification"], seed, image_token
    )
    cloze, cloze_ids = cloze_items(rows, id_list, exemplars, mode, k["cloze"], seed, image_token)
    gen = generation_items(rows, mode, seed, image_token)
    return {"mcq": mcq, "cloze": cloze, "gen": gen}, {
        "classification": cls_ids,
        "cloze": cloze_ids,
    }


# ----------------------------------------------------------------------------- running
def _check_images(adapter, items: Sequence[Sample]) -> None:
    multi = next((s for s in items if isinstance(s.image, list)), None)
    if multi is None:
        return
    try:
        adapter.collate([multi], ans_only=True, with_answer=False)
    except (ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise MultiImageUnsupported(
            f"a few-shot prompt holds {len(multi.image)} images and the model's adapter "
            f"({getattr(adapter, 'family', type(adapter).__name__)}) takes one per prompt "
            f"({type(e).__name__}: {e})"
        ) from e


_GEN_LABELS = (
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("bleu", "BLEU"),
)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_set(model, adapter, tokenizer, items: dict, cfg: EvalConfig) -> dict:
    """Scores of one set's items (:func:`build_set`), with our keys (fractions):
    ``{vqa,qa}_mcq_letter_acc``, ``{vqa,qa}_cloze_acc``, ``{vqa,qa}_rouge1|rouge2|rougeL|bleu``,
    ``n_*``; ``_items`` (per-item scores), ``_outputs`` (every response) and ``_official``
    (eval.py's block for this set: percent accuracies, its key names)."""
    res: dict = {"_items": {}, "_outputs": []}
    off: dict = {"fill_in_the_blank": {}, "classification": {}, "generation": {}}
    every = [s for part in ("mcq", "cloze", "gen") for s in items.get(part, ())]
    _check_images(adapter, every)
    texts = generate(model, adapter.collate, tokenizer, every, cfg, strip=False) if every else []
    resp = {id(s): response("ASSISTANT:" + t) for s, t in zip(every, texts)}
    for s in every:
        res["_outputs"].append(
            {
                "task": s.meta["task"],
                "type": s.kind,
                "id": s.meta["id"],
                "index": s.meta["index"],
                "response": resp[id(s)],
                "ground_truth": s.meta.get("ground_truth", s.meta.get("correct")),
            }
        )
    for kind in ("vqa", "qa"):
        mcq = [s for s in items.get("mcq", ()) if s.kind == kind]
        hits = [float(mcq_letter(resp[id(s)], s.meta["options"]) == s.meta["correct"]) for s in mcq]
        if mcq:
            res[f"{kind}_mcq_letter_acc"] = _mean(hits)
            res["_items"][f"{kind}_mcq_letter_acc"] = hits
            res[f"n_{kind}_mcq"] = len(mcq)
        name = "Image-Textual" if kind == "vqa" else "Pure Text"
        off["classification"][f"{name} Question Accuracy"] = 100 * _mean(hits) if hits else 0
        cloze = [s for s in items.get("cloze", ()) if s.kind == kind]
        hits = [float(cloze_correct(s.meta["ground_truth"], resp[id(s)])) for s in cloze]
        if cloze:
            res[f"{kind}_cloze_acc"] = _mean(hits)
            res["_items"][f"{kind}_cloze_acc"] = hits
            res[f"n_{kind}_cloze"] = len(cloze)
        name = "image_textual" if kind == "vqa" else "pure_text"
        off["fill_in_the_blank"][f"{name}_accuracy"] = 100 * _mean(hits) if hits else 0
    for kind in ("vqa", "qa"):
        gen = [s for s in items.get("gen", ()) if s.kind == kind]
        if not gen:
            continue
        scores = {"rouge1": [], "rouge2": [], "rougeL": [], "bleu": []}
        for s in gen:
            r = unlearning.rouge(resp[id(s)], s.meta["ground_truth"])
            for key in ("rouge1", "rouge2", "rougeL"):
                scores[key].append(r[key]["f1"])
            scores["bleu"].append(unlearning.sentence_bleu(resp[id(s)], s.meta["ground_truth"]))
        typ = "Image_Textual" if kind == "vqa" else "Pure_Text"
        for key, label in _GEN_LABELS:
            res[f"{kind}_{key}"] = _mean(scores[key])
            res["_items"][f"{kind}_{key}"] = scores[key]
            off["generation"][f"Average {label} ({typ})"] = _mean(scores[key])
        res[f"n_{kind}_gen"] = len(gen)
    res["_official"] = off
    return res


def evaluate(model, adapter, tokenizer, sets: dict, cfg: EvalConfig) -> dict:
    """Every set of ``sets`` (``{name: items}`` of :func:`build_set`) → ``{name: metrics}``
    (:func:`evaluate_set`), greedy with ``cfg.max_new_tokens`` (the protocol's 50 unless
    overridden) and ``cfg.batch_size``."""
    model.eval()
    return {
        name: evaluate_set(model, adapter, tokenizer, items, cfg) for name, items in sets.items()
    }


def official_results(per_set: dict) -> dict:
    """eval.py's final JSON (``{"Forget Set Results": {...}, ...}``) from our results."""
    return {
        OFFICIAL_SETS[n]: m["_official"]
        for n, m in per_set.items()
        if n in OFFICIAL_SETS and "_official" in m
    }


def protocol_record(
    cfg: EvalConfig, shots: dict, drawn: dict, image_token: str, family: str | None = None
) -> dict:
    """The ``_protocol`` record of a ``--protocol mllmu`` run."""
    return {
        "name": "mllmu",
        "source": SOURCE,
        "seed": cfg.seed,
        "rng": "random.Random(f'mllmu:{seed}:{mode}:{task}'), eval.py's draw order "
        "(official: unseeded module random)",
        "shots": {**SHOTS, **shots},
        "shot_ids": drawn,
        "prompts": "eval.py's LLaVA strings (image token: the adapter's "
        f"{image_token!r}, expanded to its count)" + (f"; model family {family}" if family else ""),
        "decoding": "greedy",
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "mcq": "generated letter: first character of the response, upper-cased, if an option "
        "key (eval.py:376)",
        "cloze": "ground_truth.lower() in response.lower() (eval.py:639-646)",
        "rouge": "rouge_score RougeScorer(['rouge1','rouge2','rougeL'], use_stemmer=True) "
        "F-measure (eval.py:680,782-797)",
        "bleu": "nltk sentence_bleu, whitespace tokens, SmoothingFunction().method1 "
        "(eval.py:57-78)",
        "test_images": "one of Test_Set's images per row and task, seeded (eval.py:323-326)",
        "accuracy_units": "fractions in our keys; percent in the 'official' block",
    }


__all__ = [
    "MAX_NEW_TOKENS",
    "MODES",
    "SHOTS",
    "SOURCE",
    "MultiImageUnsupported",
    "build_set",
    "classification_items",
    "cloze_correct",
    "cloze_items",
    "cloze_prompt",
    "cloze_question",
    "evaluate",
    "evaluate_set",
    "generation_items",
    "generation_prompt",
    "mcq_letter",
    "mcq_prompt",
    "official_results",
    "options_block",
    "protocol_record",
    "response",
]
