"""transformers.Trainer, changed only where it must be.

- ``compute_loss``: the model returns final hidden states instead of logits (the output head is
  swapped for a pass-through during the forward) and ``sft_loss`` projects only trained positions,
  chunk by chunk. The loss is normalised by the trained tokens of the whole optimizer step, counted
  across accumulation steps and processes (Trainer's ``num_items_in_batch``).
- ``_get_num_items_in_batch``: also counts sequences, for the length-normalised loss.
- ``evaluate``: token-weighted eval loss (not a mean of batch means) and perplexity.
- ``_save_checkpoint``: writes into a staging folder and renames, so a crash never leaves half a
  checkpoint.
- ``training_step``: a NaN/inf loss stops the run with a diagnosis instead of training on garbage.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from sftlab.train.losses import IGNORE, count_sequences, sft_loss


class Divergence(RuntimeError):
    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at step {step}")


class _PassThrough(nn.Module):
    def forward(self, x):
        return x


def _causal_lm(model):
    """The *ForCausalLM module inside DDP/FSDP/PEFT wrappers (the one that owns lm_head)."""
    m = model
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):  # DDP
            m = m.module
        elif hasattr(m, "get_base_model") and m is not getattr(m, "base_model", None):
            m = m.get_base_model()
        else:
            return m


@contextmanager
def hidden_states_instead_of_logits(model):
    """Swap the output head for a pass-through; yield the real head to project trained positions."""
    lm = _causal_lm(model)
    name = "lm_head"
    head = getattr(lm, name, None)
    if head is None:
        raise RuntimeError(f"{type(lm).__name__} has no lm_head; cannot compute the chunked loss")
    setattr(lm, name, _PassThrough())
    try:
        yield head
    finally:
        setattr(lm, name, head)


_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class SFTTrainer(Trainer):
    def __init__(self, *args, loss_mode: str = "token", label_smoothing: float = 0.0, ewc=None,
                 group_lengths: list[int] | None = None, eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator or self.data_collator
        self.group_lengths = group_lengths
        self.loss_mode = loss_mode
        self.label_smoothing = label_smoothing
        self.ewc = ewc
        # Our compute_loss normalises by the step's token count itself: never divide by GA again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._num_sequences = None
        self.tokens_seen = 0  # real (non-padding) tokens
        self.trained_tokens_seen = 0
        self._t0 = None

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches (little padding waste) when not packing; Trainer's default otherwise."""
        if self.group_lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        g = torch.Generator()
        g.manual_seed(self.args.seed)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.group_lengths, generator=g)

    # -- counting ----------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        if self.loss_mode == "sequence":
            n = torch.tensor(sum(count_sequences(b["labels"], b.get("position_ids")) for b in batch_samples),
                             device=device)
            if self.args.world_size > 1:
                n = self.accelerator.gather(n).sum()
            self._num_sequences = n
        return num_items

    # -- loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        weights = inputs.get("loss_weights")
        fwd = {k: inputs[k] for k in _MODEL_KEYS if k in inputs}
        with hidden_states_instead_of_logits(model) as head:
            out = model(**fwd, use_cache=False)
            hidden = out.logits if hasattr(out, "logits") else out[0]
            loss = sft_loss(hidden, head, labels, num_items=num_items_in_batch, mode=self.loss_mode,
                            label_smoothing=self.label_smoothing, loss_weights=weights,
                            position_ids=inputs.get("position_ids"),
                            num_sequences=self._num_sequences if num_items_in_batch is not None else None)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP averages gradients over processes; the loss was divided by the global count.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self.tokens_seen += int(inputs["n_real"]) if "n_real" in inputs else labels.numel()
            self.trained_tokens_seen += int((labels[:, 1:] != IGNORE).sum())
            if self.ewc is not None:
                loss = loss + self.ewc.penalty(model) / self.args.gradient_accumulation_steps
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise Divergence(self.state.global_step + 1, float(loss))
        return loss

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        from torch.utils.data import DataLoader

        dataloader = DataLoader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                                batch_size=self.args.per_device_eval_batch_size, collate_fn=self.eval_collator)
        model = self.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n == 0:
                    continue
                loss = self.compute_loss(model, batch, num_items_in_batch=None)  # mean over this batch
                total += float(loss) * n
                count += n
        if was_training:
            model.train()
        mean = total / max(count, 1)
        metrics = {f"{metric_key_prefix}_loss": mean,
                   f"{metric_key_prefix}_perplexity": math.exp(min(mean, 50.0)),
                   f"{metric_key_prefix}_tokens": count}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, f".staging-{name}")
        shutil.rmtree(staging, ignore_errors=True)
        original = self.args.output_dir
        try:
            # Save under the staging folder (Trainer derives the checkpoint path from output_dir).
            self.args.output_dir = staging
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            if os.path.exists(best) or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = best
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
