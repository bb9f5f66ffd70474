"""Forgetting mitigation: replay mixing and EWC (elastic weight consolidation)."""

from __future__ import annotations

import random

import torch

from sftlab.data.collate import PadCollator
from sftlab.data.masking import Example


def replay_count(n_task: int, ratio: float) -> int:
    """Replay examples so that they make up ``ratio`` of the mix: n·r/(1−r)."""
    if ratio <= 0:
        return 0
    return int(round(n_task * ratio / (1.0 - ratio)))


def mix_replay(task: list[Example], general: list[Example], ratio: float, seed: int = 0) -> tuple[list[Example], int]:
    """The task examples plus replay examples drawn from ``general`` (cycled when there are too few)."""
    k = replay_count(len(task), ratio)
    if k == 0 or not general:
        return list(task), 0
    rng = random.Random(seed)
    pool: list[Example] = []
    while len(pool) < k:
        batch = list(general)
        rng.shuffle(batch)
        pool.extend(batch)
    return list(task) + pool[:k], k


class EWC:
    """Penalty λ/2 · Σ F_i (θ_i − θ*_i)² on trainable parameters, F the empirical Fisher diagonal
    (mean squared gradient of the loss) on general data, θ* the parameters before fine-tuning."""

    def __init__(self, model, batches, loss_fn, lam: float):
        self.lam = lam
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        self.fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        n_batches = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    self.fisher[n].addcmul_(p.grad, p.grad)  # in place: no squared copy
            n_batches += 1
        model.zero_grad(set_to_none=True)
        for n in self.fisher:
            self.fisher[n] /= max(n_batches, 1)
        if was_training:
            model.train()

    def penalty(self, model) -> torch.Tensor:
        """The penalty, differentiable in the parameters. Each parameter's term is one autograd node
        that keeps no tensor of its own: autograd's ``F * (θ - θ*) ** 2`` kept θ - θ* of every
        parameter from this forward to its backward, one more copy of the trained parameters for
        the whole step (0.54 GB of a full fine-tune of a 135M model)."""
        total = None
        for n, p in model.named_parameters():
            key = n if n in self.fisher else n.replace("module.", "", 1)
            if key in self.fisher:
                term = _Quadratic.apply(p, self.fisher[key], self.anchor[key])
                total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lam * total


class _Quadratic(torch.autograd.Function):
    """Σ F (θ - θ*)², its gradient 2 F (θ - θ*) recomputed in backward from the tensors that live
    anyway (the parameter, its Fisher and its anchor), one parameter's temporary at a time."""

    @staticmethod
    def forward(ctx, p, fisher, anchor):
        ctx.save_for_backward(p, fisher, anchor)
        d = p - anchor
        return torch.dot(d.reshape(-1), (fisher * d).reshape(-1))

    @staticmethod
    def backward(ctx, grad):
        p, fisher, anchor = ctx.saved_tensors
        d = p - anchor
        return d.mul_(fisher).mul_(2 * grad), None, None


def ewc_from_examples(model, examples: list[Example], loss_fn, lam: float, pad_id: int, batch_size: int = 4) -> EWC:
    """EWC anchored at the model's current weights, its Fisher measured on ``examples`` in padded
    batches of ``batch_size`` on the model's device."""
    collate = PadCollator(pad_id)
    batches = [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    batches = [{k: v.to(model.device) for k, v in b.items()} for b in batches]
    return EWC(model, batches, loss_fn, lam)
