"""A model card in every model folder ``mmunlearn unlearn`` and ``mmunlearn finetune`` write:
``README.md`` with the YAML metadata block the Hugging Face Hub reads (``base_model``,
``library_name``, ``pipeline_tag``, ``tags``) and the provenance a shared model needs — what was
forgotten, with which method, mask (its file's hash, rule and coverage per group), recipe (the
whole run config), data fingerprint and steps (a fine-tuned model: vanilla or reference, its
training set and where it came from, the run config, data fingerprint and steps).
``mmunlearn eval`` adds its table to the card of every model folder it evaluates that has one,
replacing its previous table (never appending a second one).
"""

from __future__ import annotations

import hashlib
import json
import os

from mmunlearn.io import atomic_write_text

CARD = "README.md"
EVAL_START, EVAL_END = "<!-- mmunlearn:eval -->", "<!-- /mmunlearn:eval -->"


def file_hash(path: str) -> str:
    """sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _yaml_list(items) -> str:
    return "".join(f"\n- {json.dumps(str(x))}" for x in items)


def write_card(model_dir: str, *, base_model: str, method: str, config: dict, data: dict,
               steps: int, mask_file: str | None = None, mask=None) -> str:  # fmt: skip
    """Write ``model_dir/README.md`` (atomically); returns its path. ``config``: the run's
    ``RunConfig.to_dict()``; ``data``: the data sets' sizes (and fingerprints when known);
    ``mask``: the :class:`~mmunlearn.saliency.SaliencyMask` written to ``mask_file``."""
    tags = ["mmunlearn", "machine-unlearning", method, f"recipe-{config.get('recipe')}"]
    lines = [
        f"# {os.path.basename(os.path.abspath(model_dir))}: unlearned with mmunlearn",
        "",
        f"`{base_model}` after **{method}** unlearning ({steps} optimizer steps, recipe "
        f"`{config.get('recipe')}`) with mmunlearn.",
        "",
        "| data set | items |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in data.items()],
    ]
    if mask is not None:
        groups = mask.coverage()["groups"]
        lines += ["", "## Saliency mask", ""]
        if mask_file:
            lines.append(f"File `{os.path.basename(mask_file)}`, sha256 `{file_hash(mask_file)}`.")
        lines += [f"Rule: `{json.dumps(mask.meta.get('rule', mask.meta), default=str)}`.", ""]
        lines += ["| group | selected | of | fraction |", "|---|---:|---:|---:|"]
        lines += [
            f"| {g} | {c['selected']:,} | {c['total']:,} | {100 * c['fraction']:.2f} % |"
            for g, c in groups.items()
        ]
    return _write(model_dir, base_model, tags, lines, config)


def write_finetune_card(model_dir: str, *, base_model: str, train_set: str, source: str,
                        config: dict, data: dict, steps: int) -> str:  # fmt: skip
    """Write the card of a model ``mmunlearn finetune`` trained (atomically); returns its path.
    ``train_set``: "vanilla" or "reference"; ``source``: where its items came from; ``data``:
    sizes and fingerprint; ``config``: the fine-tuning settings."""
    what = {
        "vanilla": "the vanilla model: it has learnt every person of the benchmark, the "
        "starting point of unlearning",
        "reference": "the reference model: the vanilla recipe without the forget set, what "
        "an unlearned model is compared with (`mmunlearn eval --reference`)",
    }[train_set]
    tags = ["mmunlearn", "machine-unlearning", f"finetuned-{train_set}",
            f"recipe-{config.get('recipe')}"]  # fmt: skip
    lines = [
        f"# {os.path.basename(os.path.abspath(model_dir))}: fine-tuned ({train_set}) with "
        "mmunlearn",
        "",
        f"`{base_model}` fine-tuned on {source} ({steps} optimizer steps, recipe "
        f"`{config.get('recipe')}`) with mmunlearn: {what}.",
        "",
        "| data | value |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in data.items()],
    ]
    return _write(model_dir, base_model, tags, lines, config)


def _write(model_dir: str, base_model: str, tags: list, lines: list, config: dict) -> str:
    """The card: the Hub's metadata, ``lines``, the run settings, the evaluation section."""
    meta = (
        f"---\nbase_model: {json.dumps(str(base_model))}\nlibrary_name: transformers\n"
        f"pipeline_tag: image-text-to-text\ntags:{_yaml_list(tags)}\n---\n"
    )
    lines = list(lines)
    lines += ["", "## Run settings", "", "```json", json.dumps(config, indent=1), "```"]
    lines += [
        "",
        "## Evaluation",
        "",
        EVAL_START,
        "Not evaluated yet (`mmunlearn eval`).",
        EVAL_END,
    ]
    path = os.path.join(model_dir, CARD)
    atomic_write_text(path, meta + "\n" + "\n".join(lines) + "\n")
    return path


def add_eval(model_dir: str, table: str, note: str = "") -> bool:
    """Put ``table`` (markdown) in the evaluation section of ``model_dir``'s card, replacing
    the previous one; False (nothing written) when the folder has no mmunlearn card."""
    path = os.path.join(model_dir, CARD)
    if not os.path.isfile(path):
        return False
    text = open(path, encoding="utf-8").read()
    if EVAL_START not in text or EVAL_END not in text:
        return False
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    body = "\n".join(x for x in (note, table.strip()) if x)
    atomic_write_text(path, f"{head}{EVAL_START}\n{body}\n{EVAL_END}{tail}")
    return True


def add_eval_to_cards(model_dirs, table: str, note: str = "") -> None:
    """:func:`add_eval` on every folder of ``model_dirs`` that has a card (written by
    ``mmunlearn unlearn`` / ``finetune``), replacing the previous table; says which."""
    for path in model_dirs:
        if os.path.isdir(path) and add_eval(path, table, note):
            print(f"updated the model card {os.path.join(path, CARD)}")


__all__ = [
    "CARD",
    "add_eval",
    "add_eval_to_cards",
    "file_hash",
    "write_card",
    "write_finetune_card",
]
