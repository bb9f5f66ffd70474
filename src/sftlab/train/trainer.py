"""transformers.Trainer, changed only where it must be.

- ``compute_loss``: the model returns final hidden states instead of logits (the output head is
  swapped for a pass-through during the forward) and ``sft_loss`` projects only trained positions,
  chunk by chunk (or by the fused cross entropy ``fused_ce``). The loss is normalised by the trained tokens of the whole optimizer step, counted
  across accumulation steps and processes (Trainer's ``num_items_in_batch``).
- ``_get_num_items_in_batch``: also counts sequences, for the length-normalised loss.
- ``evaluate``: the evaluation function passed in (``evaluate_fn``, the eval layer's ``training_eval``:
  token-weighted eval loss, not a mean of batch means, and perplexity).
- ``_save_checkpoint``: writes into a staging folder and renames, so a crash never leaves half a
  checkpoint; the best checkpoint (``load_best_model_at_end``) is the saved one with the lowest eval
  loss (``_best_checkpoint``).
- ``compute_loss`` also picks the attention kernel per micro-batch under ``attn_implementation: auto``
  (``attention.py``).
- ``compute_loss``/``training_step``/``log``: EWC's penalty joins the loss that is backpropagated, once per
  step (a share per micro-batch), but the logged ``loss`` is the task loss; the penalty is logged as
  ``ewc_penalty`` (with it in ``loss``, ``diagnose`` read the penalty's growth as divergence).
- ``training_step``: a NaN/inf loss stops the run with a diagnosis instead of training on garbage;
  Trainer's ``model.train()`` on every micro-step is skipped when every module is in training mode
  already (it walks ~2,500 modules: 16 ms a micro-step on the default model, 2 CPU cores).
- ``floating_point_ops``: Trainer's estimate (6 x tokens x non-embedding parameters) with the parameter
  count taken once, not walked over every parameter on each micro-step (another 15 ms).
- ``_get_train_sampler``: a mixture's per-epoch draw (``train_sampler``, ``train/epochs.py``), else
  length-grouped batches; ``num_examples`` counts the drawn epoch.
- ``_load_callback_state``: a resumed run continues early stopping's count of evaluations without
  improvement from the checkpoint (transformers starts it at 0 again, so the resumed run stopped later
  than the uninterrupted one).
- ``_load_optimizer_and_scheduler``: a resumed run continues at its (rebuilt) schedule's rate for the
  step, not the rate the checkpoint's schedule ended at.
- ``create_accelerator_and_postprocess``: FSDP2 on CPU processes (gloo), which accelerate leaves out
  (``fsdp_on_cpu``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from typing import Callable

import torch
from transformers import EarlyStoppingCallback, Trainer
from transformers.trainer_utils import rotate_checkpoints

from sftlab.core.errors import SftlabError
from sftlab.core.io import publish_tree
from sftlab.core.loss import (
    IGNORE,
    count_sequences,
    hidden_states_instead_of_logits,
    sft_loss,
)


class Divergence(RuntimeError):
    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at step {step}")

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")

# (model, tokenizer, examples, *, batch_size, general_examples, template, conversations, max_generate)
# -> one metrics row {"eval_loss", "eval_perplexity", "general_...", "gen_..."}.
EvaluateFn = Callable[..., dict]


def forward_loss(model, inputs: dict, *, switch=None, autocast=None, **loss_kwargs):
    """The training forward: the model up to its final hidden states, then ``sft_loss`` on the trained
    positions (under ``autocast``, a context manager factory: accelerate autocasts only inside the
    model's forward, and the head runs outside it). ``switch``: the per-batch attention kernel choice.
    Returns (loss, model output). Used by the trainer and by the merge trial (``train/merge.py``)."""
    if switch is not None:
        switch.before(inputs["input_ids"])
    fwd = {k: inputs[k] for k in _MODEL_KEYS if k in inputs}
    with hidden_states_instead_of_logits(model) as head:
        out = model(**fwd, use_cache=False)
        hidden = out.logits if hasattr(out, "logits") else out[0]
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss = sft_loss(hidden, head, inputs["labels"], **loss_kwargs)
    return loss, out


def fsdp_on_cpu(accelerator, plugin_args: dict) -> None:
    """Turn FSDP2 on for CPU processes (gloo), as accelerate does for GPUs.

    accelerate 1.15 chooses FSDP only for accelerator devices: a CPU run under torchrun is MULTI_CPU and
    the FSDP plugin is dropped (state.py), so the run would quietly be DDP. torch's FSDP2 (``fully_shard``)
    itself works on CPU with gloo, and accelerate's FSDP2 code paths (prepare, full state dict) are
    device-neutral, so this sets what ``AcceleratorState`` sets on a GPU: the FSDP type (in PartialState
    too: every ``AcceleratorState()`` re-reads it from there), the plugin and its mixed precision.
    ``plugin_args`` empty: the plugin reads ``accelerate launch``'s FSDP_* variables (a config file)."""
    import accelerate  # deferred: heavy library, imported on first use
    from accelerate.state import PartialState  # deferred: heavy library
    from accelerate.utils import (  # deferred: heavy library
        DistributedType,
        FullyShardedDataParallelPlugin,
    )
    from torch.distributed.fsdp import CPUOffloadPolicy  # deferred: heavy library

    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if plugin.fsdp_version != 2:
        raise SftlabError(f"fsdp version {plugin.fsdp_version} on CPU: only FSDP2 runs on CPU processes",
                          hint="fsdp_version: 2 in the accelerate config")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # fully_shard pins the offloaded shards: a GPU call
        raise SftlabError("fsdp offload needs a GPU (FSDP2 pins the offloaded shards; on CPU they are in CPU "
                          "memory already)", hint="fsdp_offload_params: false in the accelerate config")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:  # another accelerate keeps its state elsewhere: fail, never run as DDP
        raise SftlabError(f"fsdp on CPU: accelerate {accelerate.__version__} did not take FSDP2 for CPU processes "
                          "(sftlab does this for accelerate 1.15)", hint="unset fsdp to train with DDP")


def follow_schedule(optimizer, scheduler) -> None:
    """Set each parameter group's rate (and the scheduler's last rate, which is logged) to what the
    scheduler's own rule gives at its current step. Every schedule sftlab offers is a LambdaLR; any other
    is left as it is."""
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, if any
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return
    lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


class SftlabTrainer(Trainer):
    """``transformers.Trainer`` with sftlab's loss, counting, evaluation and checkpoints (module docstring)."""

    def __init__(self, *args, evaluate_fn: EvaluateFn | None = None, loss_mode: str = "token",
                 label_smoothing: float = 0.0, ewc=None, group_lengths: list[int] | None = None,
                 general_examples=None, gen_template=None, gen_conversations=None, gen_limit: int = 0,
                 attention_switch=None, train_sampler=None, fused_ce=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_ce = fused_ce  # a fused linear cross entropy (fused_loss), else the chunked loss
        self.train_sampler = train_sampler  # a mixture drawn afresh each epoch (train/epochs.py)
        self.evaluate_fn = evaluate_fn  # passed in: training sits above evaluation, not beside it
        self.attention_switch = attention_switch  # per-batch kernel choice (attn_implementation: auto)
        self.general_examples = general_examples  # loss on general data at each eval: forgetting
        self.gen_template = gen_template if gen_limit else None
        self.gen_conversations = gen_conversations if gen_limit else None
        self.gen_limit = gen_limit
        self.group_lengths = group_lengths
        self.loss_mode = loss_mode
        self.label_smoothing = label_smoothing
        self.ewc = ewc
        self._ewc_part = None  # this micro-batch's share of the step's EWC penalty (training_step takes it out)
        self._ewc_sum, self._ewc_logged_step = 0.0, None  # penalty summed over the steps since the last train row
        # Our compute_loss normalises by the step's token count itself: never divide by GA again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._num_sequences = None
        self.tokens_seen = 0  # real (non-padding) tokens
        self.trained_tokens_seen = 0
        self._t0 = None
        self._flop_params: int | None = None
        self._all_modules: list | None = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        cpu_processes = self.accelerator.state.distributed_type == "MULTI_CPU"  # torchrun on CPUs (gloo)
        # `fsdp` in the config, or `accelerate launch` with an FSDP config file (it sets ACCELERATE_USE_FSDP)
        asked = self.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked and cpu_processes and not self.is_fsdp_enabled:
            fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args or {})
            self.is_fsdp_enabled = True
            if self.args.activation_checkpointing and self.accelerator.state.fsdp_plugin.activation_checkpointing:
                raise SftlabError("FSDP's activation checkpointing and gradient_checkpointing are both on",
                                  hint="fsdp_activation_checkpointing: false in the accelerate config")

    def _get_train_sampler(self, train_dataset=None):
        """The mixture's per-epoch draw when given; else length-grouped batches (little padding waste)
        when not packing; Trainer's default otherwise."""
        if self.train_sampler is not None:
            return self.train_sampler
        if self.group_lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import (
            LengthGroupedSampler,  # deferred: heavy library, imported on first use
        )

        g = torch.Generator()
        g.manual_seed(self.args.seed)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.group_lengths, generator=g)

    def num_examples(self, dataloader) -> int:
        """Examples per epoch: a drawn mixture's epoch, not its whole pool."""
        if self.train_sampler is not None and dataloader.dataset is self.train_dataset:
            return len(self.train_sampler)
        return super().num_examples(dataloader)

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
        loss, out = forward_loss(model, inputs, switch=self.attention_switch, autocast=self.accelerator.autocast,
                                 num_items=num_items_in_batch, mode=self.loss_mode,
                                 label_smoothing=self.label_smoothing, loss_weights=inputs.get("loss_weights"),
                                 position_ids=inputs.get("position_ids"),
                                 num_sequences=self._num_sequences if num_items_in_batch is not None else None,
                                 fused=self.fused_ce)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP averages gradients over processes; the loss was divided by the global count.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self.tokens_seen += int(inputs["n_real"]) if "n_real" in inputs else labels.numel()
            self.trained_tokens_seen += int((labels[:, 1:] != IGNORE).sum())
            if self.ewc is not None:  # once per step: a share for each of this step's micro-batches
                micro = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
                self._ewc_part = self.ewc.penalty(model) / micro
                loss = loss + self._ewc_part
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self._all_modules is None or self._all_modules[0] is not model:
            self._all_modules = list(model.modules())
        # Trainer calls model.train() here each micro-step; when every module is training already it
        # changes nothing (a module set to eval on purpose still gets the real call).
        skip = all(m.training for m in self._all_modules)
        if skip:
            real = type(model).train
            model.train = lambda mode=True: model if mode else real(model, mode)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if skip:
                del model.train
        if not torch.isfinite(loss).all():
            raise Divergence(self.state.global_step + 1, float(loss))
        if self._ewc_logged_step is None:  # the step this run (or its resumed part) starts after
            self._ewc_logged_step = self.state.global_step
        if self._ewc_part is not None:  # the logged loss is the task's; the penalty is logged beside it
            part, self._ewc_part = self._ewc_part.detach(), None
            self._ewc_sum = self._ewc_sum + part
            loss = loss - part
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """A train row gets ``ewc_penalty``: the EWC penalty per step since the last row (its ``loss`` is the
        task loss without it, as eval_loss is)."""
        if self.ewc is not None and "loss" in logs and "eval_loss" not in logs:
            steps = max(self.state.global_step - (self._ewc_logged_step or 0), 1)
            logs["ewc_penalty"] = float(self._ewc_sum) / steps
            self._ewc_sum, self._ewc_logged_step = 0.0, self.state.global_step
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_params is None:  # the parameters do not change during training
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_params

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """One eval row: token-weighted loss and perplexity (no label smoothing), the loss on general
        data when given (forgetting), and generation metrics when asked; feeds early stopping."""

        if self.evaluate_fn is None:
            raise RuntimeError("SftlabTrainer was built without evaluate_fn: it cannot evaluate")
        row = self.evaluate_fn(self.model, self.processing_class,
                               eval_dataset if eval_dataset is not None else self.eval_dataset,
                               batch_size=self.args.per_device_eval_batch_size,
                               general_examples=self.general_examples, template=self.gen_template,
                               conversations=self.gen_conversations, max_generate=self.gen_limit)
        metrics = {k if k.startswith(("gen_", "general_")) or k.startswith(metric_key_prefix) else
                   f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in row.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------
    def _load_callback_state(self) -> None:
        """Resuming: early stopping's counter as the checkpoint saved it, with this run's patience and
        min_delta. (transformers restores callback states only under
        ``restore_callback_states_from_checkpoint``, which would also bring back the checkpoint's patience
        and its TrainerControl flags.)"""
        saved = self.state.stateful_callbacks.get("EarlyStoppingCallback")
        saved = saved[0] if isinstance(saved, list) and saved else saved
        if not isinstance(saved, dict):
            return
        count = int(saved.get("attributes", {}).get("early_stopping_patience_counter", 0))
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, EarlyStoppingCallback):
                cb.early_stopping_patience_counter = count

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resuming: the optimizer's rate for the next step is the one the checkpoint's schedule left it at;
        take the rebuilt schedule's rate for that step instead (the same value unless the step count
        changed; else the first resumed step trained at the old schedule's rate, 0 at its end)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            follow_schedule(self.optimizer, self.lr_scheduler)

    def _save(self, output_dir=None, state_dict=None):
        """A state dict gathered from FSDP shards holds each tied weight twice (its own copy, so
        save_pretrained cannot see the sharing): keep the one a 1-process save keeps."""
        if state_dict is not None and self.is_fsdp_enabled:
            tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
            state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
        super()._save(output_dir, state_dict)

    def _best_checkpoint(self, run_dir: str) -> str | None:
        """The checkpoint with the lowest eval loss among the evaluations that have one (this step's being
        saved included; the first of equals). transformers takes the best evaluation's step, and where that
        step saved no checkpoint (eval_steps below save_steps) it kept the earlier best checkpoint, even
        where a later checkpoint had a lower eval loss."""
        metric = self.args.metric_for_best_model
        if not metric:
            return None
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        best = None
        for row in self.state.log_history:  # saved with every checkpoint, so a resumed run has it too
            step, value = row.get("step"), row.get(key)
            path = os.path.join(run_dir, f"checkpoint-{step}")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    step != self.state.global_step and not os.path.isdir(path)):  # a NaN is never the best
                continue
            if best is None or value < best[0]:
                best = (value, path)
        return best[1] if best else None

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, f".staging-{name}")
        if self.args.should_save:  # one process empties it, and nobody writes into it before that
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        original = self.args.output_dir
        try:
            # Save under the staging folder (Trainer derives the checkpoint path from output_dir).
            self.args.output_dir = staging
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
        self.accelerator.wait_for_everyone()  # every process's part (its RNG state) is in before the rename
        if (best := self._best_checkpoint(run_dir)) is not None:
            self.state.best_model_checkpoint = best
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
        if self.args.should_save:
            publish_tree(os.path.join(staging, name))  # safetensors writes its weights 0600
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
