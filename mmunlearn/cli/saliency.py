"""``mmunlearn saliency``: the Fisher passes and the masks, preemptible and resumable.

A SIGTERM / SIGUSR1 / SIGINT (:class:`~mmunlearn.runctl.Preemption`) lets the current Fisher
batch finish; the partial sums are then written to ``--out/fisher_partial`` (built in a
temporary sibling and swapped in whole, :func:`mmunlearn.io.replace_dir`) and the run exits
with 75. ``--resume [auto]`` continues from them (a changed setting, data set or model is
refused, naming it) to the masks and Fishers of an uninterrupted run, bit for bit; the folder is
removed once the masks are written. Under torchrun (FSDP2) every rank agrees on the batch it
stops after (the request is all-reduced), writes its own shard's sums, and rank 0 swaps the
folder in after a barrier; a resume needs the same world size (it is part of the identity).

``fisher_partial/``: ``sums.safetensors`` (one process) or ``sums-rank{r}.safetensors`` (one
per rank; the finished sets' Fishers ``finished.<set>.<name>``, the current set's undivided
sums ``sums.<name>``, the RNG states ``rng.*``; local shards under FSDP2) and ``state.json``
(written last, by rank 0: the set, the batches done, the run's identity).
"""

from __future__ import annotations

import hashlib
import os

from mmunlearn.checkpoint import check_identity
from mmunlearn.io import (
    atomic_write_json,
    find_complete_dir,
    read_safetensors,
    replace_dir,
    save_safetensors,
    temp_dir_for,
)

PARTIAL = "fisher_partial"
PARTIAL_FORMAT = "mmunlearn.fisher_partial"


def identity(args, cfg, model, sources: dict) -> dict:
    """What the Fisher sums depend on, flat (so a refusal names the setting): the Fisher
    settings, the model (its argument, dtype and parameter names / shapes), the data (each
    set's fingerprint, batch order included)."""
    from mmunlearn.config import cli_fields
    from mmunlearn.params import canonical_parameters

    out = {f.name: getattr(cfg, f.name) for f in cli_fields("saliency") if f.name != "workers"}
    h = hashlib.sha256()
    for name, p in canonical_parameters(model, trainable_only=True).items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    from mmunlearn.distributed import world_size

    out.update(model=args.model or "tiny", dtype=args.dtype, parameters=h.hexdigest()[:16])
    out.update(world_size=world_size())
    if args.tiny:
        out.update(vanilla_steps=args.vanilla_steps, people=args.people)
    out.update({f"{k} data": s.fingerprint() for k, s in sources.items()})
    return out


class FisherPartial:
    """The partial Fisher sums of a saliency run in ``out/fisher_partial``."""

    def __init__(self, out: str, ident: dict):
        from mmunlearn.distributed import rank, world_size

        self.path = os.path.join(out, PARTIAL)
        self.identity = ident
        self.world, self.rank = world_size(), rank()
        one = self.world == 1
        self.sums_file = "sums.safetensors" if one else f"sums-rank{self.rank}.safetensors"

    def save(self, e) -> str:
        """Write what :class:`~mmunlearn.fisher.FisherInterrupted` ``e`` carries (+ RNG);
        under torchrun every rank calls it together."""
        from mmunlearn.rng import rng_state

        tensors = {f"sums.{k}": v for k, v in e.sums.items()}
        for s, f in e.finished.items():
            tensors.update({f"finished.{s}.{k}": v for k, v in f.items()})
        rng_t, rng_meta = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_t.items()})
        meta = {"rng": rng_meta, "finished": sorted(e.finished)}
        state = {"set": e.set, "batches_done": e.done, "batches": e.total}
        state.update(finished=sorted(e.finished), identity=self.identity)
        if self.world > 1:
            return self._save_ranks(tensors, meta, state)
        tmp = temp_dir_for(self.path)
        try:
            save_safetensors(os.path.join(tmp, self.sums_file), tensors, PARTIAL_FORMAT, meta)
            atomic_write_json(os.path.join(tmp, "state.json"), state)
            return str(replace_dir(tmp, self.path))
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_ranks(self, tensors: dict, meta: dict, state: dict) -> str:
        """Every rank writes its file into ``fisher_partial.tmp``; after a barrier rank 0
        writes ``state.json`` and swaps the folder in (the previous one stays whole until
        then); a last barrier, so no rank goes on before the folder is complete."""
        import shutil

        from mmunlearn.distributed import barrier

        tmp = self.path + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        save_safetensors(os.path.join(tmp, self.sums_file), tensors, PARTIAL_FORMAT, meta)
        barrier()
        if self.rank == 0:
            atomic_write_json(os.path.join(tmp, "state.json"), state)
            replace_dir(tmp, self.path)
        barrier()
        return self.path

    def load(self, device, offload: bool = False) -> dict | None:
        """``build_masks``' ``resume`` from the folder (None when there is none), after the
        identity check; the RNG states are restored. ValueError naming the folder otherwise.
        Tensors go to ``device`` (finished Fishers to the CPU with ``offload``)."""
        import json

        from mmunlearn.rng import set_rng_state

        found = find_complete_dir(self.path, "state.json")
        if found is None:
            return None
        try:
            with open(os.path.join(found, "state.json")) as f:
                state = json.load(f)
            start, name = int(state["batches_done"]), str(state["set"])
            saved = dict(state["identity"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot resume from {found}: state.json: {e}") from e
        check_identity(str(found), saved, self.identity)
        tensors, meta = read_safetensors(os.path.join(found, self.sums_file), PARTIAL_FORMAT)
        resume = {"set": name, "start": start, "finished": {}, "sums": {}}
        for k, v in tensors.items():
            kind, rest = k.split(".", 1)
            if kind == "sums":
                resume["sums"][rest] = v.to(device)
            elif kind == "finished":
                s, n = rest.split(".", 1)
                resume["finished"].setdefault(s, {})[n] = v if offload else v.to(device)
        for s in meta.get("finished", []):
            resume["finished"].setdefault(s, {})
        rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
        set_rng_state(rng, meta["rng"])
        return resume

    def clear(self) -> None:
        import shutil

        from mmunlearn.distributed import barrier

        if self.world > 1:
            barrier()  # every rank has read its file
        if self.rank == 0:
            for d in (self.path, self.path + ".old", self.path + ".tmp"):
                shutil.rmtree(d, ignore_errors=True)


def sources(args, cfg, adapter, data) -> dict:
    """The three Fisher batch sources (forget, vision preserve, language preserve)."""
    from mmunlearn.data.batching import BatchSource

    kw = {"loss_tokens": cfg.fisher_loss_tokens}
    sets = (data.forget, data.vision_preserve, data.language_preserve)
    names = ("forget", "vision_preserve", "language_preserve")
    return {
        n: BatchSource(items, adapter.collate, cfg.fisher_batch_size, seed=cfg.seed + k, **kw)
        for k, (n, items) in enumerate(zip(names, sets))
    }


def run(args, distributed: bool, preemption, prepare, make_masks) -> int:
    """The saliency command after its lock: ``prepare(args, distributed)`` (config, data,
    model, ...), the Fisher passes (stoppable) and masks (``make_masks``), the files."""
    from mmunlearn.cli import oom
    from mmunlearn.fisher import FisherInterrupted
    from mmunlearn.runctl import PreemptedError

    cfg, data, model, adapter, dev, _ = prepare(args, distributed)
    src = sources(args, cfg, adapter, data)
    partial = FisherPartial(args.out, identity(args, cfg, model, src))
    resume = None
    if args.resume:
        resume = partial.load(dev, args.fisher_offload)

    def stop() -> bool:  # under torchrun an all-reduce on the run's device: every rank agrees
        return preemption.requested(dev)

    def estimate():
        seq = oom.first_seq(src["forget"])
        kw = {"grad_checkpointing": cfg.grad_checkpointing, "fisher_offload": args.fisher_offload}
        return oom.estimate_line(model, "saliency", cfg.fisher_batch_size, seq, **kw)

    try:
        with oom.guard("saliency", estimate):
            masks = make_masks(args, cfg, model, adapter, data, src=src, stop=stop, resume=resume)
    except FisherInterrupted as e:
        where = partial.save(e)
        raise PreemptedError(
            f"stopped on {preemption.signal} after {e.set} Fisher batch {e.done} of {e.total}; "
            f"partial sums in {where}; rerun the same command with --resume to continue"
        ) from None
    _write(args, cfg, data, masks)
    partial.clear()
    return 0


def _write(args, cfg, data, masks) -> None:
    from mmunlearn.distributed import is_rank0
    from mmunlearn.io import atomic_write_json

    if not is_rank0():
        return
    os.makedirs(args.out, exist_ok=True)
    for k, m in masks.items():
        m.save(os.path.join(args.out, f"mask_{k}.safetensors"))
        cov = m.coverage()["total"]
        pct = 100 * cov["fraction"]
        print(f"{k}: {cov['selected']:,}/{cov['total']:,} selected ({pct:.1f} %)")
    from mmunlearn.cli.data import own_record

    info = {"config": cfg.to_dict(), "data": {**data.sizes(), **own_record(args)},
            "model": args.model or "tiny"}  # fmt: skip
    atomic_write_json(os.path.join(args.out, "saliency.json"), info)
    print(f"wrote {args.out}/mask_{{vision,language,both}}.safetensors, saliency.json")


__all__ = ["PARTIAL", "FisherPartial", "identity", "run", "sources"]
