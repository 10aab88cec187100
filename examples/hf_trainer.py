"""MMUnlearner's step inside a ``transformers.Trainer``: a saliency mask from ``mmunlearn``,
``MaskedAdamW`` as the Trainer's optimizer, and a training step that alternates a masked
gradient-ascent step on a forget batch with the Trainer's own descent step on a retain batch.

The Trainer keeps doing what it does (its data loader over the retain set, gradient clipping,
the lr schedule, logging, saving); :class:`MaskedUnlearningTrainer` adds, before every
``forget_every``-th retain step, one forget step of its own: ``-alpha · CE`` backward and
``optimizer.step(masked=True)``, which moves only the weights the mask selects. Runs offline on
a tiny randomly initialised Llama in a few seconds::

    python examples/hf_trainer.py [--steps 8] [--out runs/hf_trainer]
"""

from __future__ import annotations

import itertools

import torch
from transformers import Trainer, TrainingArguments

from mmunlearn import MaskedAdamW, SaliencyMask, collect_fisher


class RetainFirstAdamW(MaskedAdamW):
    """``MaskedAdamW`` whose plain ``step()`` (the Trainer's) is an unmasked retain step; the
    forget step asks for ``step(masked=True)``."""

    def step(self, closure=None, *, masked: bool = False, **kw):
        return super().step(closure, masked=masked, **kw)


class MaskedUnlearningTrainer(Trainer):
    """A ``Trainer`` over the retain set that interleaves masked forget (ascent) steps.

    ``forget_batches``: model-ready batches (dicts with ``labels``), cycled; ``mask``: a
    :class:`~mmunlearn.SaliencyMask` (or ``{param: bool mask}``); ``alpha``: the ascent weight;
    ``forget_every``: a forget step before every N-th retain step; ``forget_clip``: the forget
    step's gradient-norm clip (None: none)."""

    def __init__(self, *args, forget_batches, mask, alpha=1.0, forget_every=1, forget_clip=1.0,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.forget_batches = itertools.cycle(forget_batches)
        self.mask, self.alpha = mask, alpha
        self.forget_every, self.forget_clip = forget_every, forget_clip
        self.forget_losses: list[float] = []
        self._retain_steps = 0

    def create_optimizer(self, model=None):
        model = model if model is not None else self.model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = RetainFirstAdamW(
            params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        masks = self.mask.for_model(model) if hasattr(self.mask, "for_model") else self.mask
        self.optimizer.set_masks(masks)
        return self.optimizer

    def _forget_step(self, model) -> None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        batch = self._prepare_inputs(next(self.forget_batches))
        loss = model(**batch).loss
        (-self.alpha * loss).backward()
        opt.step(masked=True, max_grad_norm=self.forget_clip)
        opt.zero_grad(set_to_none=True)
        self.forget_losses.append(float(loss.detach()))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._retain_steps % self.forget_every == 0:
            self._forget_step(model)
        self._retain_steps += 1
        return super().training_step(model, inputs, num_items_in_batch)


# ------------------------------------------------------------------------------------------------
# the runnable demo: a tiny Llama, a forget pattern and a retain pattern of token sequences
# ------------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def sequences(n: int, start: int, seed: int, t: int = 12) -> list[dict]:
    """``n`` token sequences counting up from a random offset in ``[start, start + 16)``
    (a pattern the model can learn); labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (start + torch.randint(0, 16, (1,), generator=g) + torch.arange(t)) % 64
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def saliency(model, forget: list[dict], retain: list[dict], gamma: float = 1.0) -> SaliencyMask:
    """MMUnlearner's mask: weights whose forget Fisher is at least ``gamma`` × the retain one."""
    batches = lambda rows: [collate(rows[i : i + 4]) for i in range(0, len(rows), 4)]  # noqa: E731
    f_forget = collect_fisher(model, batches(forget), progress=False)
    f_retain = collect_fisher(model, batches(retain), progress=False)
    return SaliencyMask.from_fisher(f_forget, f_retain, gamma)


def forget_loss(model, forget: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(model(**collate(forget)).loss)
    model.train()
    return loss


def run(steps: int = 8, out: str = "runs/hf_trainer", seed: int = 0, lr: float = 1e-3) -> dict:
    """Fine-tune the tiny model on both patterns (the "vanilla" model), build the mask, then
    unlearn the forget pattern for ``steps`` Trainer steps; returns the numbers it prints."""
    model = tiny_llama(seed)
    forget, retain = sequences(16, 0, seed + 1), sequences(48, 32, seed + 2)
    vanilla = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(60):
        rows = (forget + retain)[(i * 8) % 64 : (i * 8) % 64 + 8]
        model(**collate(rows)).loss.backward()
        vanilla.step()
        vanilla.zero_grad()
    mask = saliency(model, forget, retain)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = forget_loss(model, forget)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant",
                             max_grad_norm=1.0, report_to=[], save_strategy="no", seed=seed,
                             use_cpu=not torch.cuda.is_available(), logging_steps=steps,
                             disable_tqdm=True)  # fmt: skip
    forget_batches = [collate(forget[i : i + 8]) for i in range(0, len(forget), 8)]
    trainer = MaskedUnlearningTrainer(model=model, args=args, train_dataset=retain,
                                      data_collator=collate, forget_batches=forget_batches,
                                      mask=mask)  # fmt: skip
    trainer.train()
    return {
        "forget_loss_before": before,
        "forget_loss_after": forget_loss(model, forget),
        "forget_steps": len(trainer.forget_losses),
        "mask_fraction": mask.coverage()["total"]["fraction"],
        "start": start,
        "mask": mask,
        "model": model,
        "trainer": trainer,
    }


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="runs/hf_trainer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = run(a.steps, a.out, a.seed)
    before, after = r["forget_loss_before"], r["forget_loss_after"]
    print(f"mask: {100 * r['mask_fraction']:.1f} % of the weights; {r['forget_steps']} forget "
          f"steps: forget loss {before:.3f} → {after:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
