"""Generation on a causal language model: the loss on response tokens only, evaluation by greedy generation.

:class:`GenerationTask` implements the same protocol as :class:`fedlora.tasks.ClassificationTask` (``batch``,
``loss``, ``evaluate``), so local training and both runtimes need nothing new.

Batches are *left*-padded: every sequence ends at the last column, so the response tokens of all rows sit in
the last few columns and the language-model head (576 × 49,152 for SmolLM2, the most expensive layer at these
sequence lengths) is applied only there (``logits_to_keep``). Position ids are passed explicitly so that
padding does not shift positions.

``evaluate`` reports, over the examples it is given:

* ``acc``: exact match of the greedy generation with the reference after :func:`normalize_answer` (lower case,
  punctuation and surrounding whitespace dropped): ``"Sports."`` matches ``"sports"``; a task may pass another
  check (``match``): math-word compares final numbers (:func:`fedlora.data.mathword.answers_match`);
* ``f1``: token-level F1 between the normalised generation and reference (SQuAD-style partial credit);
* ``loss`` and ``ppl``: mean negative log-likelihood of the reference response tokens (teacher forcing) and
  its exponential, the response perplexity;
* ``samples``: :data:`SAMPLES_PER_EVAL` examples, evenly spaced over those given, with their generations
  (written to the run directory, not to metrics.jsonl).

Generations are at most ``max_new_tokens`` long (``train.max_new_tokens``; 0: the dataset plugin's default for the
maths and code tasks, else the longest reference + :data:`MAX_NEW_SLACK`). :func:`build_task` picks the task of
a config; python-functions adds HumanEval ``pass_at_1`` (:class:`fedlora.humaneval.CodeTask`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from fedlora.data.instructions import normalize_answer
from fedlora.data.prompts import EncodedInstructions

if TYPE_CHECKING:
    from fedlora.config import Config
    from fedlora.data.instructions import InstructionDataset

IGNORE = -100  # label of positions without a loss (prompt, padding): PyTorch's and transformers' convention
SAMPLES_PER_EVAL = 3  # sample generations kept per evaluated model per evaluation round
MAX_NEW_SLACK = 4  # tokens generated beyond the longest reference (room for trailing punctuation)
SAMPLE_PROMPT_CHARS = 300  # the end of the prompt shown with a sample


__all__ = ["GenerationTask", "build_task", "normalize_answer", "token_f1"]


def exact_match(generation: str, reference: str) -> bool:
    """The default answer check: equal after :func:`normalize_answer`."""
    return normalize_answer(generation) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalised words of ``prediction`` against ``reference`` (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of sequences right-aligned in one int64 matrix."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s):] = s
        mask[r, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


class GenerationTask:
    """Instruction following with teacher-forced cross-entropy on the response; greedy-generation evaluation."""

    kind = "generation"

    def __init__(self, encoded: EncodedInstructions, tokenizer: Any, logits_to_keep: bool = True,
                 samples: int = SAMPLES_PER_EVAL, max_new_tokens: int = 0,
                 match: Callable[[str, str], bool] = exact_match) -> None:
        self.encoded = encoded
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.logits_to_keep = logits_to_keep  # False for a model whose forward() lacks logits_to_keep
        self.samples = samples
        self.match = match  # (generation, reference) -> correct? ; math-word compares final numbers
        self.max_new_tokens = max_new_tokens or max((len(r) for r in encoded.response_ids), default=1) + MAX_NEW_SLACK
        self._lengths = np.array([len(p) + len(r) for p, r in zip(encoded.prompt_ids, encoded.response_ids)])

    # ---- training ----------------------------------------------------------------------------------------
    def batch(self, idx: Sequence[int] | np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Left-padded prompt + response: ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``
        (the response token ids; :data:`IGNORE` on prompt and padding)."""
        rows = [int(i) for i in np.asarray(idx).reshape(-1)]
        prompts = [self.encoded.prompt_ids[i] for i in rows]
        responses = [self.encoded.response_ids[i] for i in rows]
        input_ids, mask, positions = _left_pad([torch.cat([p, r]) for p, r in zip(prompts, responses)], self.pad_id)
        labels = torch.full_like(input_ids, IGNORE)
        for row, r in enumerate(responses):
            if len(r):
                labels[row, -len(r):] = r
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
        return {k: v.to(device) for k, v in batch.items()}

    def _response_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits that predict each response position and the matching labels, both for the last K columns."""
        labels = batch["labels"]
        has_label = (labels != IGNORE).any(0)
        # Every row starts with at least one prompt token, so K < width and the K+1 kept logits exist.
        width = labels.shape[1]
        k = width - int(torch.argmax(has_label.to(torch.int8))) if bool(has_label.any()) else 1
        # The logit at column j predicts the token at column j + 1: the K columns width-K-1 .. width-2 predict the
        # last K. They are named by a 1-D tensor of positions, not the integer K + 1: transformers then gathers
        # those hidden states into a contiguous tensor, where an integer takes a strided slice, and a strided
        # 3-D input that requires grad makes torch.matmul multiply by the LM head through bmm with the head's
        # weight expanded to the batch, i.e. copied batch-size times (SmolLM2: 8 copies of its 49,152 × 576
        # head each step; 2.5 s of a 5 s bf16 step on 1 CPU thread, benchmarks/step_profile.py).
        if self.logits_to_keep:
            keep = torch.arange(width - k - 1, width - 1, device=labels.device)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
            return out.logits, labels[:, -k:]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)
        return out.logits[:, -(k + 1):-1], labels[:, -k:]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over response tokens only (prompt and padding are :data:`IGNORE`)."""
        logits, targets = self._response_logits(model, batch)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over response tokens: one term per label that is not :data:`IGNORE`."""
        return int((batch["labels"] != IGNORE).sum())

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def response_nll(self, model: nn.Module, idx: np.ndarray, batch_size: int,
                     device: torch.device) -> tuple[float, int]:
        """Summed negative log-likelihood of the reference responses of ``idx`` and their number of tokens."""
        idx = np.asarray(idx)
        order = np.argsort(self._lengths[idx], kind="stable")  # similar lengths together: little padding
        total, tokens = 0.0, 0
        model.eval()
        for start in range(0, len(idx), batch_size):
            logits, targets = self._response_logits(model, self.batch(idx[order[start:start + batch_size]], device))
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum"))
            tokens += int((targets != IGNORE).sum())
        return total, tokens

    @torch.no_grad()
    def generate(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> list[str]:
        """Greedy generations (decoded, special tokens dropped) for the prompts of ``idx``, in that order."""
        return self.generate_prompts(model, [self.encoded.prompt_ids[int(i)] for i in np.asarray(idx)], batch_size,
                                     device)

    @torch.no_grad()
    def generate_prompts(self, model: nn.Module, prompts: Sequence[torch.Tensor], batch_size: int,
                         device: torch.device) -> list[str]:
        """Greedy generations for token-id ``prompts``: batched (similar lengths together, left-padded), with the
        KV cache (``generate``'s default), at most ``max_new_tokens`` each, stopping at the end token."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        texts: list[str] = [""] * len(prompts)
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        model.eval()
        for start in range(0, len(prompts), batch_size):
            pos = order[start:start + batch_size]
            input_ids, mask, _ = _left_pad([prompts[i] for i in pos], self.pad_id)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
            for p, row in zip(pos, out[:, input_ids.shape[1]:].cpu()):
                stop = (row == self.eos_id).nonzero()
                row = row[: int(stop[0])] if len(stop) else row
                texts[p] = self.tokenizer.decode(row, skip_special_tokens=True)
        return texts

    def evaluate(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> dict[str, Any]:
        """Exact match (``acc``), token F1 (``f1``), response ``loss`` and ``ppl``, ``n`` and ``samples``."""
        idx = np.asarray(idx)
        if len(idx) == 0:
            return {"acc": float("nan"), "f1": float("nan"), "loss": float("nan"), "ppl": float("nan"), "n": 0,
                    "samples": []}
        nll, tokens = self.response_nll(model, idx, batch_size, device)
        generations = self.generate(model, idx, batch_size, device)
        refs = [self.encoded.references[i] for i in idx]
        exact = [self.match(g, r) for g, r in zip(generations, refs)]
        loss = nll / max(tokens, 1)
        samples = []
        # Spread over the examples (evenly spaced positions): datasets are often sorted by class.
        picks = np.unique(np.linspace(0, len(idx) - 1, min(self.samples, len(idx))).round().astype(int))
        for p in picks:
            i, gen, ref, ok = idx[p], generations[p], refs[p], exact[p]
            prompt = self.tokenizer.decode(self.encoded.prompt_ids[int(i)], skip_special_tokens=True)
            if len(prompt) > SAMPLE_PROMPT_CHARS:
                prompt = "…" + prompt[-SAMPLE_PROMPT_CHARS:]
            samples.append({"example": int(i), "prompt": prompt, "reference": ref, "generation": gen,
                            "exact_match": bool(ok)})
        return {"acc": float(np.mean(exact)), "f1": float(np.mean([token_f1(g, r) for g, r in zip(generations, refs)])),
                "loss": loss, "ppl": math.exp(min(loss, 700.0)), "n": int(len(idx)), "samples": samples}


def build_task(dataset: InstructionDataset, tokenizer: Any, config: Config, logits_to_keep: bool) -> GenerationTask:
    """The generation task of a resolved config, tokenized once, scored by ``data.metric``: "final-number"
    (GSM8K's convention, :func:`fedlora.data.mathword.answers_match`), "exact-match", or a metric the dataset plugin
    builds itself (python-functions' "humaneval": HumanEval pass@1); its generation budget is
    ``train.max_new_tokens``, else the dataset's default."""
    from fedlora.data.prompts import encode_instructions
    from fedlora.registry import DATASETS

    source = DATASETS.lookup(config.data.dataset)
    encoded = encode_instructions(dataset, tokenizer, config.train.max_length)
    max_new = config.train.max_new_tokens or source.max_new_tokens
    metric = config.data.metric
    if source.task_builder is not None and metric == source.metric:
        task: GenerationTask | None = source.build_task(encoded, tokenizer, logits_to_keep, max_new, config)
        if task is not None:
            return task
    if metric == "final-number":
        from fedlora.data.mathword import answers_match

        return GenerationTask(encoded, tokenizer, logits_to_keep, max_new_tokens=max_new, match=answers_match)
    return GenerationTask(encoded, tokenizer, logits_to_keep, max_new_tokens=max_new)
