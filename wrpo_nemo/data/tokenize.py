"""Token ids of one example through the tokenizer's own chat template, and the length policy.

The prompt ids are the conversation rendered with the generation prompt. The ids of a response are exactly
the tokens the template appends when that response is the next assistant turn: the rendered full
conversation minus the rendered prompt, cut after the template's end-of-turn token (ChatML writes a newline
after ``<|im_end|>`` that separates turns and is never generated). So labels never hold the assistant header
and the end-of-turn token appears once, the two faults of the reference program (WRPO.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from wrpo_nemo.data.layout import ROLE_NAMES
from wrpo_nemo.data.records import DataError, Example

RESPONSE_FIELDS = ROLE_NAMES
"""The three responses of an example, in role order (the one definition is ``layout.ROLE_NAMES``)."""
"""Response names in role order (``layout.SOURCE_CHOSEN``, ``TARGET_CHOSEN``, ``REJECTED``)."""


class TemplateError(ValueError):
    """The chat template cannot give response tokens as a suffix of the prompt tokens."""


@dataclass
class TokenizeConfig:
    """Lengths and the length policy."""

    max_length: int = 2048
    """Most tokens of one segment (prompt + one response)."""
    max_prompt_length: int = 1800
    """Most tokens of a prompt (chat template included)."""
    seq_length: int = 4096
    """Tokens of a packed row; a prompt's three segments must fit in one row (3 * prompt + responses)."""
    length_policy: Literal["drop", "truncate"] = "drop"
    """``drop`` removes an example that is too long; ``truncate`` keeps the prompt's end and cuts each
    response on its own to fit ``max_length``. Both are counted in the data report."""
    eot_token: str | None = None
    """The token that ends an assistant turn; ``None`` takes the tokenizer's ``eos_token``."""

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the offending key, each written as ``prefix + field``."""
        p = prefix
        if self.length_policy not in ("drop", "truncate"):
            raise ValueError(f"{p}length_policy must be 'drop' or 'truncate', got {self.length_policy!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"{p}max_prompt_length ({self.max_prompt_length}) must be positive and below "
                f"{p}max_length ({self.max_length})"
            )
        if self.seq_length < self.max_length:
            raise ValueError(
                f"{p}seq_length ({self.seq_length}) must be at least {p}max_length ({self.max_length})"
            )


EOT_SETTING = (
    "eot_token (data.source.tokenize.eot_token in a recipe config, model.data.eot_token under NeMo-Aligner)"
)
"""Where a user sets the end-of-turn token, as the messages below name it."""


def eot_token_id(tokenizer: Any, cfg: TokenizeConfig) -> int:
    """Id of the end-of-turn token named by ``cfg`` (or the tokenizer's eos)."""
    token = cfg.eot_token or tokenizer.eos_token
    if token is None:
        raise ValueError(
            f"the tokenizer has no eos_token: set {EOT_SETTING} to the template's end-of-turn token"
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{EOT_SETTING}: {token!r} is not a token of the tokenizer")
    return int(token_id)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_turns(tokenizer: Any, example: Example) -> tuple[str, list[str]]:
    """The prompt rendered with the generation prompt, and the conversation rendered with each response."""
    try:
        prompt_text = _render(tokenizer, list(example.prompt), True)
        full_texts = [
            _render(
                tokenizer, [*example.prompt, {"role": "assistant", "content": getattr(example, name)}], False
            )
            for name in RESPONSE_FIELDS
        ]
    except Exception as err:  # the template's own raise_exception, e.g. a role it does not support
        raise DataError(
            example.where, "prompt", f"the chat template refused it: {err}", "template_refused"
        ) from err
    return prompt_text, full_texts


def response_suffix(
    example: Example,
    name: str,
    prompt: tuple[str, list[int]],
    full: tuple[str, list[int]],
    eot_id: int,
) -> list[int]:
    """The ids the template appends for response ``name`` as the next assistant turn, ending with one eot.

    ``prompt`` and ``full`` are ``(text, ids)`` of the prompt with the generation prompt and of the
    conversation with the response.
    """
    (prompt_text, prompt_ids), (full_text, full_ids) = prompt, full
    if not full_text.startswith(prompt_text):
        raise TemplateError(
            f"{example.where}: the chat template is not prefix-stable: the prompt rendered with the generation "
            "prompt is not the start of the conversation rendered with the answer, so response tokens are not a "
            f"suffix; first 80 characters of each: {prompt_text[:80]!r} vs {full_text[:80]!r}"
        )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError(
            f"{example.where}: the tokenizer merges tokens across the end of the prompt, so the prompt ids are not "
            "a prefix of the full conversation's ids; use a template that ends the generation prompt on a special "
            "token or whitespace"
        )
    suffix = full_ids[len(prompt_ids) :]
    if eot_id not in suffix:
        raise TemplateError(
            f"{example.where}: the chat template did not close the assistant turn with the end-of-turn token "
            f"(id {eot_id}); set {EOT_SETTING} to the token it uses"
        )
    last = len(suffix) - 1 - suffix[::-1].index(eot_id)
    if eot_id in suffix[:last]:
        raise DataError(example.where, name, "the response contains the end-of-turn token", "contains_eot")
    if last == 0:
        raise DataError(example.where, name, "the response renders to no tokens", "empty_response")
    return suffix[: last + 1]


def tokenize_example(tokenizer: Any, example: Example, cfg: TokenizeConfig, eot_id: int) -> dict[str, Any]:
    """Ids of the prompt and the three responses, after the length policy.

    Returns a dict with ``prompt_ids``, ``<role>_ids`` for every role, ``status`` (``"ok"`` or the cause of
    a drop), ``prompt_truncated`` (bool) and ``responses_truncated`` (how many responses were cut).
    """
    prompt_text, full_texts = render_turns(tokenizer, example)
    # One call for the four texts; the template writes the special tokens (BOS included) itself, so adding
    # them again would double BOS.
    prompt_ids, *full_ids = (
        list(ids) for ids in tokenizer([prompt_text, *full_texts], add_special_tokens=False)["input_ids"]
    )
    responses = [
        response_suffix(example, name, (prompt_text, prompt_ids), (text, ids), eot_id)
        for name, text, ids in zip(RESPONSE_FIELDS, full_texts, full_ids, strict=True)
    ]
    out = apply_length_policy(prompt_ids, responses, cfg)
    out["prompt_id"] = example.prompt_id
    return out


def apply_length_policy(
    prompt_ids: list[int], responses: list[list[int]], cfg: TokenizeConfig
) -> dict[str, Any]:
    """Drop or truncate per ``cfg.length_policy``; the result always says what happened."""
    prompt_truncated = False
    cut = 0
    status = "ok"
    if cfg.length_policy == "truncate":
        if len(prompt_ids) > cfg.max_prompt_length:
            # Keep the end: it holds the question and the generation prompt the model answers after.
            prompt_ids = prompt_ids[-cfg.max_prompt_length :]
            prompt_truncated = True
        room = cfg.max_length - len(prompt_ids)
        cut = sum(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
    elif len(prompt_ids) > cfg.max_prompt_length:
        status = "prompt_too_long"
    elif max(len(prompt_ids) + len(r) for r in responses) > cfg.max_length:
        status = "response_too_long"
    if status == "ok" and 3 * len(prompt_ids) + sum(len(r) for r in responses) > cfg.seq_length:
        status = "exceeds_seq_length"
    out: dict[str, Any] = {"prompt_ids": prompt_ids}
    for name, ids in zip(RESPONSE_FIELDS, responses, strict=True):
        out[f"{name}_ids"] = ids
    out.update(status=status, prompt_truncated=prompt_truncated, responses_truncated=cut)
    return out
