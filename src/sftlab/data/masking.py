"""Conversation -> (input_ids, labels) with exactly the assistant replies trained.

The label rule, one definition for every template and without ``{% generation %}`` tags: each
assistant turn ``i`` is trained exactly as the model produces it at inference under the template's
defaults (and ``chat_template_kwargs``): the text that follows ``render(messages[:i], generation
prompt)`` within ``render(messages[:i+1])``, up to and including the turn's last end-of-turn
token(s) (``<|im_end|>``; Cohere2's ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``; GPT-OSS's channel header
and ``<|return|>``; Qwen3's empty ``<think>\n\n</think>\n\n`` block).

1. Where the template renders history unchanged (each ``render(messages[:i+1])`` is a prefix of the
   full render) the conversation is one example with every turn trained in place. Otherwise (Qwen3
   drops earlier reasoning, GPT-OSS ends history turns with ``<|end|>``) it becomes one example per
   assistant turn, each trained once in exactly its inference context. ``reasoning: keep|last`` and
   ``masking: all`` ask for one example from the full render instead.
2. A turn whose render ends in no special token ends at the next role's token when the full render
   has one there (trained); otherwise the tokenizer's EOS is appended and trained, so the model
   always learns to stop. The reply text must be in the trained span (a clear error otherwise), and
   so must every tool call's function name, once per call (a template that ignores ``tool_calls``, or
   renders only a turn's first call, is refused). Special tokens a template writes after the last turn
   only, glued to its end (Phi-4-mini's EOS), close the document: not trained.
2b. Reasoning the inference prompt frames: where it opens a ``<think>`` block the rendered turn does not
   show (DeepSeek-R1), the turn's reasoning (empty without one) and ``</think>`` are trained before the
   reply; where it closes the block (Qwen3 under ``enable_thinking: false``), a turn with reasoning is an error.
3. The text is cut into alternating untrained/trained segments and each segment is tokenized on
   its own, in one batched call. A token therefore never straddles a reply boundary, the prompt
   part is tokenized exactly as at inference (where it is rendered with the generation prompt),
   and decoding the trained tokens gives back exactly the replies plus their end-of-turn tokens.
   The per-turn examples of one chat repeat its history: their prompts are cut after each special
   token (where tokenizers split anyway) and each distinct chunk is tokenized once; a sample is
   compared with whole-prompt tokenization and any difference turns the sharing off.

Labels are set by position, never by token id, so pad == EOS can not mask the EOS. The first
label is always -100: the loss shifts labels by one, so no position predicts it (plain text would
otherwise count one trained token per example that training never sees).

Step 1 is done once per conversation shape (roles, tool calls, tools), not per conversation, when the
template never inspects message content (``skeleton``): the same labels, checked against the exact
method on a sample.
"""

from __future__ import annotations

import gc
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from sftlab.config import Masking, Reasoning, Truncation, choices
from sftlab.core.errors import SftlabError
from sftlab.core.loss import IGNORE
from sftlab.data.skeleton import Skeletons
from sftlab.data.templates import ChatTemplate, TemplateRefused
from sftlab.data.turns import NOTE_WHOLE, ConvLabels, TurnRule
from sftlab.data.types import Conversation, Message

MASKING = choices(Masking)
TRUNCATION = choices(Truncation)
REASONING = choices(Reasoning)
# Chunked prompt tokenization is compared with the whole prompt's on the first few and 1 in this many.
CHUNK_CHECK_FIRST, CHUNK_CHECK_EVERY = 8, 50


@contextmanager
def paused_gc():
    """Pause the cyclic garbage collector while building many int lists (no cycles among them).

    Its generation-2 passes rescan every list made so far; on 5,000 examples they cost a third of
    the labelling time.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Example:
    """One tokenized training example, in dataset order."""

    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0
    index: int = 0  # position in the input conversations
    where: str = ""  # "file:line"
    turn: int = 0  # one of a split chat's per-turn examples: the assistant turn it trains (1-based); else 0

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class PrepareReport:
    """What happened to each input example; printed by `prepare` and kept with every run."""

    n_input: int = 0
    n_kept: int = 0
    n_turns_cut: int = 0  # examples that lost earlier turns to fit
    n_truncated: int = 0  # examples cut at max_seq_length (truncation=truncate)
    n_dropped_too_long: int = 0
    n_dropped_no_trained: int = 0
    n_tokens: int = 0
    n_trained_tokens: int = 0
    eos_appended: bool = False  # the template writes no end-of-turn token; EOS is appended and trained
    n_reply_ends: int = 0  # end-of-turn/EOS tokens right after trained text (a trained reply's end)
    n_reply_ends_trained: int = 0  # ... of which the token itself is trained
    eos_trained: bool | None = None  # every trained reply's end-of-turn token is trained (None: none known)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    n_single: int = 0  # chats kept as one example (history renders unchanged, or reasoning keep/last)
    n_split: int = 0  # chats split into one example per assistant turn
    rule_notes: dict[str, int] = field(default_factory=dict)  # why split / how turns end -> conversations
    n_reasoning_lost: int = 0  # assistant turns trained without their reasoning (one example, the template drops it)
    sources: list[dict] = field(default_factory=list)  # per source of a mixture (sftlab.data.mixture.Mixture.stats)
    # kept examples' lengths in tokens: {"bin_width": w, "counts": [n of length in [i*w, (i+1)*w)]}
    length_histogram: dict = field(default_factory=dict)

    def rule(self) -> str:
        """Which label rule was applied, and why (one line, for `prepare`)."""
        if not self.n_single and not self.n_split:
            return "labels: plain text, every token trained but the first (nothing predicts it)"
        if NOTE_WHOLE in self.rule_notes:  # not "as the model produces it": as the full render shows it
            return f"labels: {self.n_single} chat{'s' * (self.n_single != 1)} trained as one example" \
                   f"{' each' * (self.n_single != 1)}, the assistant turns as the full render shows them " \
                   "(reasoning: keep|last or masking: all)"
        parts = []
        if self.n_single:
            parts.append(f"{self.n_single} chat{'s' * (self.n_single != 1)} as one example"
                         f"{' each' * (self.n_single != 1)} (history renders as produced)")
        if self.n_split:
            parts.append(f"{self.n_split} chat{'s' * (self.n_split != 1)} split into one example per assistant turn")
        notes = "; ".join(f"{why} ({n})" for why, n in self.rule_notes.items())
        return "labels: each turn trained as the model produces it: " + ", ".join(parts) + (f"; {notes}" if notes else "")

    def summary(self) -> str:
        parts = [f"{self.n_kept}/{self.n_input} examples kept" if self.n_split == 0
                 else f"{self.n_kept} examples kept from {self.n_input} input{'s' * (self.n_input != 1)}", f"{self.n_tokens} tokens",
                 f"{self.n_trained_tokens} trained"]
        if self.n_turns_cut:
            parts.append(f"{self.n_turns_cut} had earlier turns cut to fit")
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated at max_seq_length")
        if self.n_dropped_too_long:
            parts.append(f"{self.n_dropped_too_long} dropped as too long")
        if self.n_dropped_no_trained:
            parts.append(f"{self.n_dropped_no_trained} dropped with no trained token")
        if self.eos_trained is False and self.n_reply_ends > self.n_reply_ends_trained:  # not "0 of 0": nothing kept
            parts.append(f"end-of-turn token untrained after {self.n_reply_ends - self.n_reply_ends_trained}"
                         f" of {self.n_reply_ends} trained replies")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["dropped"] = [{"where": w, "why": y} for w, y in self.dropped]
        return d


def length_histogram(lengths: list[int], bins: int = 32) -> dict:
    """Counts of ``lengths`` in ``bins`` equal bins from 0; the width is a whole number of tokens."""
    if not lengths:
        return {}
    width = max(1, -(-(max(lengths) + 1) // bins))
    counts = [0] * (max(lengths) // width + 1)
    for n in lengths:
        counts[n // width] += 1
    return {"bin_width": width, "counts": counts}


class Labeler(TurnRule):
    """Turns conversations into examples with exact labels for one tokenizer and template."""

    def __init__(self, tokenizer, template: ChatTemplate | None, *, masking: str = "all_assistant",
                 max_seq_length: int | None = None, truncation: str = "cut_turns", skeletons: bool = True,
                 reasoning: str = "per_turn"):
        if reasoning not in REASONING:
            raise SftlabError(f"unknown reasoning '{reasoning}'", hint=f"use one of: {', '.join(REASONING)}")
        if masking not in MASKING:
            raise SftlabError(f"unknown masking '{masking}'", hint=f"use one of: {', '.join(MASKING)}")
        if truncation not in TRUNCATION:
            raise SftlabError(f"unknown truncation '{truncation}'", hint=f"use one of: {', '.join(TRUNCATION)}")
        if max_seq_length is not None and max_seq_length < 8:
            raise SftlabError(f"max_seq_length {max_seq_length} is too small", hint="use at least 8 tokens")
        self.tok = tokenizer
        self.template = template
        self.masking = masking
        self.reasoning = reasoning
        self.max_len = max_seq_length
        self.truncation = truncation
        self.eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        if template is not None and template.eot:
            specials.add(template.eot)
        self._specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._notes: list[str] = []  # how the conversation being labelled was cut (see ConvLabels)
        self._prepends = self._detect_prepend()
        self._anchor = "\n"
        self._anchor_ids = self._encode_plain([self._anchor])[0] if self._prepends else []
        self.eos_appended = False
        self._doc_end = self._document_end() if template is not None else None
        self.end_ids = self._end_of_turn_ids()
        # Per-turn examples share their history: their prompts are tokenized in chunks, each once.
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._share_prefix, self._chunk_checks = True, 0
        # One render per role sequence where the template treats content as opaque (see skeleton).
        self._skeletons = Skeletons(template, self._examples_exact) if skeletons and template else None

    # -- segments ---------------------------------------------------------------------------
    def examples(self, conv: Conversation) -> list[list[tuple[str, bool]]]:
        """The conversation's examples (one, or one per assistant turn), each as (text, trained) pieces."""
        if conv.is_text:
            return [[(conv.text + (self.eos or ""), self.masking != "none")]]
        if self.template is None:
            raise SftlabError("chat data needs a chat template", hint="pass --template")
        conv = self._with_reasoning(conv)
        try:
            if self._skeletons is not None:
                return self._skeletons.segments(conv)
            return self._examples_exact(conv)
        except TemplateRefused as exc:  # name the conversation the template refused, and a fix
            raise exc.at(conv) from None

    def segments(self, conv: Conversation) -> list[tuple[str, bool]]:
        """The pieces of the conversation's last (longest-context) example."""
        return self.examples(conv)[-1]

    @property
    def skeletons_failed(self) -> bool:
        """A sampled exact check differed from a skeleton; segments made before it must be redone."""
        return self._skeletons is not None and self._skeletons.failed

    def examples_many(self, convs: list[Conversation]) -> list[ConvLabels]:
        exs = [self.examples(c) for c in convs]
        if self.skeletons_failed:
            # A sampled conversation differed from its skeleton: label every one exactly.
            exs = [self.examples(c) for c in convs]
        return exs

    def _with_reasoning(self, conv: Conversation) -> Conversation:
        """Apply ``reasoning: drop`` (no reasoning anywhere) or ``last`` (only the last assistant turn's)."""
        if self.reasoning not in ("drop", "last") or all(m.reasoning is None for m in conv.messages):
            return conv
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        msgs = [m if m.reasoning is None or (self.reasoning == "last" and i == last) else replace(m, reasoning=None)
                for i, m in enumerate(conv.messages)]
        return replace(conv, messages=msgs)

    def _eot_at(self, full: str, end: int) -> str | None:
        tpl_eot = self.template.eot if self.template else None
        if tpl_eot and full.startswith(tpl_eot, end):
            return tpl_eot
        for s in self._specials:
            if full.startswith(s, end):
                return s
        return None

    # -- end of turn ------------------------------------------------------------------------
    def _end_of_turn_ids(self) -> list[int]:
        """Ids of the tokens a reply ends with: the template's end-of-turn token and the tokenizer's EOS
        (each only when it is one token)."""
        vocab = self.tok.get_vocab()
        ids: list[int] = []
        for s in (self._reply_end(), self.eos):
            if s and s in vocab and vocab[s] not in ids:
                ids.append(vocab[s])
        return ids

    def _reply_end(self) -> str | None:
        """The template's end-of-turn string: the known one, else the special token that a probe
        render writes right after a reply (as the labels find it)."""
        if self.template is None or self.template.eot:
            return self.template.eot if self.template else None
        probe = "\ue002reply\ue002"
        try:
            text = self.template.render([Message("user", "hi"), Message("assistant", probe)])
        except SftlabError:
            return None
        at = text.find(probe)
        return self._eot_at(text, at + len(probe)) if at >= 0 else None

    # -- tokenization -----------------------------------------------------------------------
    def _detect_prepend(self) -> bool:
        """SentencePiece-style tokenizers prepend '▁' to every encode call; pieces must not get it."""
        ids = self.tok("a", add_special_tokens=False)["input_ids"]
        return bool(ids) and self.tok.convert_ids_to_tokens(ids[0]).startswith("▁")

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer directly: transformers' per-encoding dict conversion cost as much
            # as the tokenization itself (measured on 5,000 demo examples). The "fast" batch call
            # skips character offsets, which labels never need (-18% CPU time).
            encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _encode_pieces(self, texts: list[str], first: list[bool]) -> list[list[int]]:
        if not self._prepends:
            return self._encode_plain(texts)
        # Encode non-first pieces behind an anchor and strip the anchor's ids.
        wrapped = [t if f else self._anchor + t for t, f in zip(texts, first)]
        out = self._encode_plain(wrapped)
        k = len(self._anchor_ids)
        for j, (ids, f) in enumerate(zip(out, first)):
            if not f:
                out[j] = ids[k:] if ids[:k] == self._anchor_ids else self._encode_plain([texts[j]])[0]
        return out

    def encode_segments(self, all_segs: list[list[tuple[str, bool]]],
                        shared: list[bool] | None = None) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of each example's (text, trained) pieces, one batched tokenizer call.

        ``shared[k]``: example ``k`` is one of several per-turn examples of a conversation, whose
        prompts repeat the same history. Their prompt pieces are cut after each special token into
        chunks, and each distinct chunk is tokenized once (see :meth:`_chunked`).
        """
        pieces: list[list[tuple[str, bool]]] = []  # per piece: its chunks as (text, first piece of the example)
        for k, segs in enumerate(all_segs):
            share = bool(shared and shared[k]) and self._share_prefix
            for j, (text, trained) in enumerate(segs):
                chunks = self._chunks(text) if share and not trained else [text]
                pieces.append([(c, j == 0 and n == 0) for n, c in enumerate(chunks)])
        unique = list(dict.fromkeys(c for chunks in pieces for c in chunks))
        ids_of = dict(zip(unique, self._encode_pieces([t for t, _ in unique], [f for _, f in unique])))
        ids_flat = [[i for c in chunks for i in ids_of[c]] for chunks in pieces]
        if self._share_prefix and not self._chunks_agree(pieces, ids_flat):
            self._share_prefix = False  # this tokenizer merges across a special token: tokenize pieces whole
            return self.encode_segments(all_segs)
        out, pos = [], 0
        for segs in all_segs:
            ids: list[int] = []
            labels: list[int] = []
            for _, trained in segs:
                piece = ids_flat[pos]
                pos += 1
                ids.extend(piece)
                labels.extend(piece if trained else [IGNORE] * len(piece))
            if labels:  # nothing predicts the first token (the loss shifts labels by one): never count it trained
                labels[0] = IGNORE
            out.append((ids, labels))
        return out

    def _chunks(self, text: str) -> list[str]:
        """``text`` cut after each special token (tokenizers split special tokens out before anything else)."""
        cuts = [m.end() for m in self._special_re.finditer(text)] if self._special_re else []
        bounds = [0] + [c for c in cuts if 0 < c < len(text)] + [len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [text]

    def _chunks_agree(self, pieces: list[list[tuple[str, bool]]], ids_flat: list[list[int]]) -> bool:
        """Chunked tokenization equals whole-piece tokenization: checked on the first ``CHUNK_CHECK_FIRST``
        chunked pieces and 1 in ``CHUNK_CHECK_EVERY`` after them."""
        chunked = [k for k, chunks in enumerate(pieces) if len(chunks) > 1]
        sample = [k for n, k in enumerate(chunked) if self._chunk_checks + n < CHUNK_CHECK_FIRST or n % CHUNK_CHECK_EVERY == 0]
        self._chunk_checks += len(sample)
        whole = self._encode_pieces(["".join(t for t, _ in pieces[k]) for k in sample], [pieces[k][0][1] for k in sample])
        return all(ids_flat[k] == w for k, w in zip(sample, whole))

    # -- the public entry -------------------------------------------------------------------
    def encode(self, convs: list[Conversation], *, strict_empty: bool = False) -> tuple[list[Example], PrepareReport]:
        """Tokenize and label all conversations; apply the length policy; report what happened."""
        report = PrepareReport(n_input=len(convs))
        with paused_gc():
            labels = self.examples_many(convs)
            owners = []  # (conversation index, messages the example covers, one of its per-turn examples)
            for idx, (conv, ex) in enumerate(zip(convs, labels)):
                if conv.is_text:
                    owners.append((idx, 0, False))
                    continue
                report.n_split += ex.split
                report.n_single += not ex.split
                report.n_reasoning_lost += ex.reasoning_lost
                for why in ex.notes:
                    report.rule_notes[why] = report.rule_notes.get(why, 0) + 1
                ends = [i + 1 for i, m in enumerate(conv.messages) if m.role == "assistant"]
                ends = ends[len(ends) - len(ex):] if ex.split else [len(conv.messages)]
                owners += [(idx, n, ex.split) for n in ends]
            encoded = self.encode_segments([segs for ex in labels for segs in ex],
                                           [bool(getattr(ex, "split", False)) and len(ex) > 1 for ex in labels for _ in ex])
            return self._apply_length_policy(convs, owners, encoded, report, strict_empty)

    def _apply_length_policy(self, convs, owners, encoded, report: PrepareReport, strict_empty: bool):
        examples: list[Example] = []
        for (idx, upto, own_turn), (ids, labels) in zip(owners, encoded):
            conv = convs[idx]
            if self.max_len is not None:
                ids, labels = self._untrained_tail_cut(ids, labels)
            if self.max_len is not None and len(ids) > self.max_len:
                part = conv if conv.is_text or upto == len(conv.messages) else replace(conv, messages=conv.messages[:upto])
                fitted = self._fit(part, ids, labels, report, own_turn)
                if fitted is None:
                    report.n_dropped_too_long += 1
                    report.dropped.append((conv.where(), f"{len(ids)} tokens > max_seq_length {self.max_len}"))
                    continue
                ids, labels = fitted
            turn = sum(m.role == "assistant" for m in conv.messages[:upto]) if own_turn and not conv.is_text else 0
            ex = Example(ids, labels, conv.weight, idx, conv.where(), turn)
            if ex.n_trained == 0:
                report.n_dropped_no_trained += 1
                report.dropped.append((conv.where(), "no trained token left"))
                if strict_empty:
                    raise SftlabError(f"{conv.where()}: the example has no trained token",
                                      hint="check the masking strategy and max_seq_length")
                continue
            examples.append(ex)
            report.n_tokens += len(ids)
            report.n_trained_tokens += ex.n_trained
            ends, ends_trained = reply_ends(ids, labels, self.end_ids)
            report.n_reply_ends += ends
            report.n_reply_ends_trained += ends_trained
        report.n_kept = len(examples)
        report.length_histogram = length_histogram([len(e.input_ids) for e in examples])
        report.eos_appended = self.eos_appended
        if self.end_ids:
            report.eos_trained = 0 < report.n_reply_ends == report.n_reply_ends_trained
        return examples, report

    def _untrained_tail_cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """An example over max_seq_length by untrained tokens only (the template's "\n" after the last
        reply's end-of-turn token) cut at the limit: nothing trained is lost, so no policy drops it."""
        if len(ids) > self.max_len and all(x == IGNORE for x in labels[self.max_len:]):
            return ids[: self.max_len], labels[: self.max_len]
        return ids, labels

    def _fit(self, conv: Conversation, ids: list[int], labels: list[int], report: PrepareReport, own_turn: bool = False):
        """Apply the truncation policy to one over-long example; None means drop it. ``own_turn``: the
        example trains only the last turn of ``conv`` (one of a split chat's per-turn examples), and so does
        its cut version, even where the shorter chat is one example: its other turns have examples of their own."""
        if self.truncation == "drop":
            return None
        if self.truncation == "cut_turns" and not conv.is_text:
            msgs = list(conv.messages)
            sys_n = 1 if msgs[0].role == "system" else 0
            while True:
                # Drop the first exchange: up to the next user message (tool calls and results included).
                nxt = next((j for j in range(sys_n + 1, len(msgs)) if msgs[j].role == "user"), None)
                if nxt is None:
                    break
                msgs = msgs[:sys_n] + msgs[nxt:]
                shorter = replace(conv, messages=msgs)
                segs = self.segments(shorter)
                if own_turn:
                    last = max(k for k, (_, trained) in enumerate(segs) if trained)
                    segs = [(text, trained and k == last) for k, (text, trained) in enumerate(segs)]
                (new_ids, new_labels), = self.encode_segments([segs])
                new_ids, new_labels = self._untrained_tail_cut(new_ids, new_labels)
                if len(new_ids) <= self.max_len:
                    report.n_turns_cut += 1
                    return new_ids, new_labels
            return None
        # truncate (and plain text under cut_turns): keep the first max_seq_length tokens.
        report.n_truncated += 1
        return ids[: self.max_len], labels[: self.max_len]


def reply_ends(ids: list[int], labels: list[int], end_ids: list[int]) -> tuple[int, int]:
    """(end-of-turn tokens right after a trained token, how many of those are trained themselves).

    An end-of-turn token that follows trained text closes a trained reply: the model must learn to
    emit it there, or it never learns to stop. Counted on the labels, so any labelling path agrees. An
    untrained one right after a trained end token closes the document, not the reply (Phi-4-mini's
    ``<|end|><|endoftext|>`` after the last turn): the reply had ended.
    """
    n = n_trained = 0
    for tid in end_ids:
        p = 0
        while True:
            try:
                p = ids.index(tid, p + 1)  # C-speed scan: end tokens are sparse
            except ValueError:
                break
            if labels[p - 1] != IGNORE and not (labels[p] == IGNORE and ids[p - 1] in end_ids):
                n += 1
                n_trained += labels[p] != IGNORE
    return n, n_trained


def trained_text(tokenizer, ex: Example) -> list[str]:
    """The decoded trained spans of an example, one string per contiguous run (for checks and --show)."""
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def reply_messages(conv: Conversation) -> list[Message]:
    return [m for m in conv.messages if m.role == "assistant"]

