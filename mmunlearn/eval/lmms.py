"""Capability tasks through lmms-eval (``mmunlearn eval --lmms-tasks``) on our loaded model.

lmms-eval (PyPI ``lmms_eval``, the ``lmms`` extra) runs its tasks against a model class derived
from its ``lmms_eval.api.model.lmms``. :func:`model_class` builds that class around a model and
adapter as :func:`mmunlearn.models.load_checkpoint` returns them (any checkpoint ``mmunlearn
eval`` reads: real-format LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL with their own processor and chat
template, the built-in tiny models) and :func:`register` enters it in lmms-eval's model registry
as ``mmunlearn`` at run time (nothing is written into lmms-eval's package). Requests become
:class:`~mmunlearn.data.schema.Sample` s: the task's prompt as the user turn, its images in
front, and are batched by the adapter, as in our own protocol:

- ``generate_until``: greedy generation (:func:`mmunlearn.eval.tasks.generate`), the task's
  ``max_new_tokens`` (else ``max_new_tokens``), cut at the first of the task's ``until``
  strings; a sampling temperature in the task is not used (recorded as greedy);
- ``loglikelihood`` (and so ``multiple_choice``): the continuation scored as the assistant's
  answer under the checkpoint's template (white space around it stripped), ``(mean token
  cross-entropy, whether every token is the greedy one)``: a loss, as lmms-eval's own HF
  models (``llava``, ``llava_hf``) return and its ``multiple_choice`` scoring expects (it
  picks the option of least value); the same length-normalised score as our MCQ by option
  likelihood.

Multi-round, agentic and video requests are refused with a message naming the task.

:func:`run_tasks` runs a list of task names (lmms-eval's own or a folder of task YAMLs,
``include``) and returns what ``results.json`` keeps under ``"lmms"``. Without lmms_eval
installed every entry point raises :class:`LmmsUnavailable` (``pip install
mmunlearn[lmms]``); an unknown task name is :class:`UnknownTask`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import random
import warnings
from importlib import metadata

import numpy as np
import torch

from mmunlearn.data.batching import to_device
from mmunlearn.data.schema import Sample
from mmunlearn.losses import token_logprobs

MODEL_NAME = "mmunlearn"
CLASS_PATH = "mmunlearn.eval.lmms.MMUnlearnLMM"
INSTALL = "pip install 'mmunlearn[lmms]'"


class LmmsUnavailable(ImportError):
    """lmms_eval is not installed (or cannot be imported)."""


class UnknownTask(ValueError):
    """A task name lmms-eval does not know."""


@contextlib.contextmanager
def _lmms_globals(truncated_images: bool | None = None):
    """Put back what importing lmms_eval changes for the whole process: PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` (its ``api/task.py`` sets it to True, so a truncated
    picture in *our* data would decode silently instead of being refused) and the warning
    filters (its ``utils.py`` ignores every warning). ``truncated_images``: the PIL setting
    inside the block (lmms-eval's own True while its tasks run)."""
    from PIL import ImageFile

    before, filters = ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)
    if truncated_images is not None:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_images
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
        warnings.filters[:] = filters
        getattr(warnings, "_filters_mutated", lambda: None)()


def _import():
    """``lmms_eval``'s modules used here, or :class:`LmmsUnavailable`."""
    try:
        with _lmms_globals():
            import lmms_eval.api.model as api_model
            from lmms_eval import evaluator, models
            from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise LmmsUnavailable(
            f"lmms-eval cannot be imported ({e}): install mmunlearn[lmms] ({INSTALL})"
        ) from e
    return api_model, evaluator, models, TaskManager


def version() -> str | None:
    """The installed lmms_eval's version, or None."""
    try:
        return metadata.version("lmms_eval")
    except metadata.PackageNotFoundError:
        return None


def _flat(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out += _flat(v)
        elif v is not None:
            out.append(v)
    return out


def _cut(text: str, until) -> str:
    """``text`` up to the first of the ``until`` strings (empty ones ignored)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _through_evaluator(pairs: list) -> list:
    """``pairs`` as lmms-eval's evaluator will keep them: lmms_eval 0.7.3's
    ``unwrap_generation_output`` turns any tuple but ``(str, meta)`` into its ``str()``
    (every loglikelihood / multiple_choice task then fails to unpack it), so there each pair
    travels in its ``GenerationResult``, whose ``text`` it passes through unchanged."""
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    if not pairs or unwrap_generation_output(pairs[0])[0] == pairs[0]:
        return pairs
    return [GenerationResult(text=p) for p in pairs]


class _Wrapper:
    """An lmms-eval model over an mmunlearn ``(model, adapter)`` (its methods; the class
    lmms-eval sees, :func:`model_class`, adds its ``lmms`` base class).

    Built by ``mmunlearn eval`` from the model it evaluates (``model=``, ``adapter=``), or
    by lmms-eval from ``--model mmunlearn --model_args pretrained=DIR[,processor=DIR,
    dtype=bfloat16,device=cpu,batch_size=N]`` once :func:`register` has run (the
    checkpoint is then loaded with :func:`mmunlearn.models.load_checkpoint`)."""

    is_simple = True

    def __init__(
        self,
        model=None,
        adapter=None,
        pretrained: str | None = None,
        processor: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_new_tokens: int | str = 256,
        **_ignored,
    ):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("the mmunlearn lmms model needs pretrained=DIR (or model=)")
            from mmunlearn.models import load_checkpoint

            dt = getattr(torch, dtype) if dtype else None
            model, adapter = load_checkpoint(
                pretrained, processor=processor, dtype=dt, device=device or "cpu"
            )
        self._model = model.eval()
        self.adapter = adapter
        self._batch_size = int(batch_size or 1)
        self.max_new_tokens = int(max_new_tokens)
        self._device = next(model.parameters()).device

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _sample(self, context: str, visuals, task: str, answer: str = "") -> Sample:
        images = _flat(visuals)
        for v in images:
            if isinstance(v, (str, dict)):
                raise ValueError(
                    f"lmms task {task}: video / audio inputs are not supported by the "
                    "mmunlearn model (images and text only)"
                )
        image = None if not images else images[0] if len(images) == 1 else images
        return Sample(question=str(context), answer=answer, image=image, kind="lmms")

    @torch.no_grad()
    def loglikelihood(self, requests):
        samples = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            cont = target if isinstance(target, str) else target(doc)
            if isinstance(cont, (list, tuple)):
                cont = cont[0]
            visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
            samples.append(self._sample(context, visuals, task, str(cont).strip()))
        out = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            batch = self.adapter.collate(chunk, ans_only=True, with_answer=True)
            batch = to_device(batch, self.device)
            logits = self._model(**batch).logits
            lp, valid = token_logprobs(logits.float(), batch["labels"])
            greedy = logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]
            for row, ok, g in zip(lp, valid, greedy):
                loss = -float(row[ok].sum()) / max(1, int(ok.sum()))
                out.append((loss, bool(g[ok].all())))
        return _through_evaluator(out)

    @torch.no_grad()
    def generate_until(self, requests):
        from mmunlearn.eval.tasks import EvalConfig, generate

        groups: dict = {}
        for i, r in enumerate(requests):
            context, kwargs, doc_to_visual, doc_id, task, split = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
            doc = self._doc(task, split, doc_id)
            visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
            key = (n_new, tuple(until))
            groups.setdefault(key, []).append((i, self._sample(context, visuals, task)))
        out = [""] * len(requests)
        tok = self.adapter.tokenizer
        for (n_new, until), items in groups.items():
            cfg = EvalConfig(batch_size=self.batch_size, max_new_tokens=n_new, progress=False)
            texts = generate(self._model, self.adapter.collate, tok, [s for _, s in items],
                             cfg, strip=False)  # fmt: skip
            for (i, _), text in zip(items, texts):
                out[i] = _cut(text, until).strip()
        return out

    def generate_until_multi_round(self, requests):
        task = requests[0].args[-2] if requests else "?"
        raise ValueError(f"lmms task {task}: multi-round generation is not supported by "
                         "the mmunlearn model")  # fmt: skip


_CLASS = None


def model_class():
    """``MMUnlearnLMM``: :class:`_Wrapper` on lmms_eval's ``lmms`` base class (built once)."""
    global _CLASS
    if _CLASS is None:
        api_model, _, _, _ = _import()
        _CLASS = type("MMUnlearnLMM", (_Wrapper, api_model.lmms),
                      {"__module__": __name__, "__doc__": _Wrapper.__doc__})  # fmt: skip
    return _CLASS


def __getattr__(name: str):
    # the class path lmms-eval's registry imports (CLASS_PATH): built on first access
    if name == "MMUnlearnLMM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Enter :func:`model_class` in lmms-eval's model registry as ``mmunlearn`` (in this
    process only; lmms-eval's own CLI then accepts ``--model mmunlearn``)."""
    _, _, models, _ = _import()
    from lmms_eval.models.registry_v2 import ModelManifest

    model_class()
    manifest = ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
    models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = "MMUnlearnLMM"


def task_manager(include: list[str] | None = None, names: list[str] | None = None):
    """lmms-eval's ``TaskManager`` over the folders ``include`` and, unless every one of
    ``names`` is a task of those folders, lmms-eval's own tasks too (indexing its ~2,000 task
    files takes most of a minute on 2 cores)."""
    *_, TaskManager = _import()
    paths = list(include) if include else None
    if paths and names:
        local = TaskManager("ERROR", include_path=paths, include_defaults=False)
        if all(n in set(local.all_tasks) for n in names):
            return local
    return TaskManager("ERROR", include_path=paths)


def check_tasks(names: list[str], include: list[str] | None = None, manager=None):
    """The ``TaskManager`` after checking every name is a task, group or tag it knows
    (:class:`UnknownTask` naming the first that is not, with the nearest known names)."""
    tm = manager or task_manager(include, names)
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, sorted(known), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            where = f" nor of {', '.join(include)}" if include else ""
            raise UnknownTask(f"{n}: not a task of lmms-eval ({len(known)} known){where}{hint}")
    return tm


def _cause(e: BaseException) -> BaseException:
    """The error inside tenacity's ``RetryError`` (lmms-eval retries ``process_results``)."""
    last = getattr(e, "last_attempt", None)
    inner = last.exception() if last is not None else None
    return inner if isinstance(inner, BaseException) else e


def _number(v):
    """A metric value as a float (None: not a finite number, e.g. lmms-eval's "N/A")."""
    if isinstance(v, bool):
        return float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def run_tasks(
    model,
    adapter,
    tasks: list[str],
    *,
    include: list[str] | None = None,
    manager=None,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> dict:
    """Run lmms-eval's ``tasks`` on ``(model, adapter)`` →
    ``{"results": {task: {metric: value}}, "n": {task: items}, "higher_is_better": ...,
    "versions": ...}`` (values are floats; a metric's ``_stderr`` beside it as lmms-eval
    reports it; ``None`` where it has none)."""
    _, evaluator, _, _ = _import()
    register()
    tm = check_tasks(tasks, include, manager)
    lm = model_class()(model=model, adapter=adapter, batch_size=batch_size,
                       max_new_tokens=max_new_tokens)  # fmt: skip
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    training = model.training
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        with _lmms_globals(truncated_images=True):  # lmms-eval's setting while it runs
            out = evaluator.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=tm,
                limit=limit,
                batch_size=batch_size,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
                distributed_executor_backend="torchrun",  # one process: no Accelerator made
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                process_docs_parallel=1,
            )
    except Exception as e:  # lmms-eval's, or a task's own code: one line naming the tasks
        e = _cause(e)
        raise RuntimeError(f"lmms-eval on {', '.join(tasks)}: {type(e).__name__}: {e}") from e
    finally:  # lmms-eval seeds the global generators: put them back, and the model's mode
        model.train(training)
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
    if out is None:
        raise RuntimeError("lmms-eval returned no results (not rank 0?)")
    res = {}
    for task, metrics in (out.get("results") or {}).items():
        vals = {k.replace(",none", ""): _number(v) for k, v in metrics.items() if k != "alias"}
        res[task] = {k: v for k, v in vals.items() if v is not None or "_stderr" not in k}
    n = {t: (c.get("effective") if isinstance(c, dict) else c)
         for t, c in (out.get("n-samples") or {}).items()}  # fmt: skip
    return {
        "results": res,
        "n": n,
        "higher_is_better": out.get("higher_is_better") or {},
        "versions": {k: str(v) for k, v in (out.get("versions") or {}).items()},
    }


def record(tasks, include, limit, seed) -> dict:
    """What ``results.json`` keeps under ``"lmms"`` beside the per-model results."""
    return {
        "tasks": list(tasks),
        "include": [os.path.abspath(d) for d in include or []],
        "lmms_eval": version(),
        "model": f"{MODEL_NAME} ({CLASS_PATH}): the evaluated checkpoint's own adapter",
        "generation": "greedy; the task's max_new_tokens and until",
        "loglikelihood": "mean token cross-entropy of the continuation as the answer (a loss: "
        "lmms-eval's multiple_choice picks the least)",
        "limit": limit,
        "seed": seed,
    }


def lmms_table(results: dict) -> str:
    """Markdown: one row per evaluated model, one column per lmms task metric (``""`` when
    ``results`` has no ``"lmms"`` entry)."""
    lm = results.get("lmms") or {}
    methods = lm.get("methods") or {}
    if not methods:
        return ""
    cols: list[tuple[str, str]] = []
    for per_task in methods.values():
        for task, metrics in per_task.get("results", {}).items():
            for k in metrics:
                if not k.endswith("_stderr") and (task, k) not in cols:
                    cols.append((task, k))
    head = "| model | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for label, per_task in methods.items():
        cells = []
        for t, k in cols:
            v = per_task.get("results", {}).get(t, {}).get(k)
            cells.append(f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = next(iter(methods.values())).get("n") or {}
    if n:
        lines += ["", "Items per task: " + ", ".join(f"{t} n={c}" for t, c in n.items()) + "."]
    return "\n".join(lines)


__all__ = [
    "CLASS_PATH",
    "LmmsUnavailable",
    "MODEL_NAME",
    "UnknownTask",
    "check_tasks",
    "lmms_table",
    "model_class",
    "record",
    "register",
    "run_tasks",
    "task_manager",
    "version",
]
