"""Turn instruction data into token ids once per run: a prompt (what the model reads) and a response (what it
must write), kept apart so that the loss can cover the response alone.

The prompt is the tokenizer's chat template applied to one user turn (``instruction``, a blank line, ``input``)
with the assistant turn opened, when the tokenizer has a template; otherwise the Alpaca layout::

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

The response is the reference text followed by the end-of-sequence token, so that a trained model stops.

Truncation to ``train.max_length`` never cuts the template or the instruction: it cuts the end of the *input*
(or of the instruction when there is no input). The response keeps up to half of the room left by the template
when both are too long. To cut only the input, the template is rendered once with a placeholder in place of the
input and split around it; the pieces are tokenized separately and concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedlora.data.instructions import InstructionDataset
from fedlora.errors import DataError

_PLACEHOLDER = "@@FEDLORA_TEXT@@"
ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class EncodedInstructions:
    """Per example: prompt ids and response ids (1-D int64, unpadded) and the reference response text."""

    prompt_ids: tuple[torch.Tensor, ...]
    response_ids: tuple[torch.Tensor, ...]
    references: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.prompt_ids) == len(self.response_ids) == len(self.references)):
            raise DataError("EncodedInstructions: prompts, responses and references must be as many")

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prompt_frame(tokenizer: Any, instruction: str | None) -> tuple[str, str]:
    """The prompt's text before and after the truncatable text (``instruction`` is None when the truncatable
    text is the instruction itself, i.e. the example has no input)."""
    if getattr(tokenizer, "chat_template", None):
        content = _PLACEHOLDER if instruction is None else f"{instruction}\n\n{_PLACEHOLDER}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    elif instruction is None:
        text = ALPACA_NO_INPUT.format(input=_PLACEHOLDER)
    else:
        text = ALPACA_WITH_INPUT.format(instruction=instruction, input=_PLACEHOLDER)
    if not isinstance(text, str) or text.count(_PLACEHOLDER) != 1:
        raise DataError("the tokenizer's chat template does not reproduce the user message verbatim; "
                        "fedlora cannot tell the prompt from the text to truncate")
    before, after = text.split(_PLACEHOLDER)
    return before, after


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]


def encode_instructions(dataset: InstructionDataset, tokenizer: Any, max_length: int) -> EncodedInstructions:
    """Tokenize every example once (batched), truncated to ``max_length`` tokens in total (module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("generation needs a tokenizer with an end-of-sequence token (eos_token)")
    bos = [] if getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    # The frame depends only on the instruction when there is an input (the bundled tasks: one frame for all).
    keys = [(ins if inp else None) for ins, inp in zip(dataset.instructions, dataset.inputs)]
    frames: dict[str | None, tuple[list[int], list[int]]] = {}
    for key in dict.fromkeys(keys):
        before, after = prompt_frame(tokenizer, key)
        b, a = _ids(tokenizer, [before, after])
        frames[key] = (bos + b, a)
    texts = _ids(tokenizer, [inp if inp else ins for ins, inp in zip(dataset.instructions, dataset.inputs)])
    responses = _ids(tokenizer, list(dataset.responses))
    prompt_ids, response_ids = [], []
    for i, key in enumerate(keys):
        before, after = frames[key]
        text, resp = texts[i], responses[i] + [eos]
        room = max_length - len(before) - len(after)
        if room < 2:
            raise DataError(f"train.max_length = {max_length} leaves no room for the text: the prompt template "
                            f"alone takes {len(before) + len(after)} tokens; use train.max_length >= "
                            f"{len(before) + len(after) + 16}")
        # The response gives way only when text and response do not both fit, and keeps half the room then.
        r = min(len(resp), max(room - len(text), room // 2))
        t = min(len(text), room - r)
        prompt_ids.append(torch.tensor(before + text[:t] + after, dtype=torch.int64))
        response_ids.append(torch.tensor(resp[:r], dtype=torch.int64))
    return EncodedInstructions(tuple(prompt_ids), tuple(response_ids), tuple(dataset.responses))
