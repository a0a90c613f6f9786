"""Prompt templates: how a user's prompt is turned into the text the model continues.

The default, `auto`, frames the prompt with the model's own chat template when it has one (an instruct
model such as SmolLM2 answers a bare question with an end-of-text token about half the time), and
continues it as is (`none`) when it has none, as GPT-2. The other templates frame the prompt so that a
continuation reads as an answer, and say where that answer ends (their stop strings), so generation stops
there instead of running into an invented next turn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from textgen.engine.params import ParamError

TemplateName = Literal["auto", "none", "assistant", "few_shot", "chat"]
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)

ASSISTANT_PREFIX = (
    "The following is a conversation with a helpful, knowledgeable assistant. "
    "The assistant answers clearly, correctly and briefly.\n\n"
)

FEW_SHOT_EXAMPLES = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    (
        "What is photosynthesis?",
        "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.",
    ),
    ('Who wrote "Romeo and Juliet"?', 'William Shakespeare wrote "Romeo and Juliet".'),
)


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...] = ()
    # Chat templates already contain the model's special tokens; adding them again would double them.
    add_special_tokens: bool = True
    # What the user wrote (the part the server's checks look at: blank, too long); None: the text itself.
    user_text: str | None = None
    # False for prompts the model answers rather than continues: its penalties then see only its answer.
    penalize_prompt: bool = True
    token_ids: tuple[int, ...] | None = None  # a prompt given as token ids (`text` is then their decoding)
    # Whether special-token strings in `text` are plain text: a user who types "<|endoftext|>" or "<|im_end|>"
    # gets those characters, never the model's control token (role integrity). True for whatever users
    # write (/generate prompts, chat messages); a raw /v1/completions prompt keeps the model's markup, as
    # in vLLM, because its whole text is the client's.
    special_tokens_as_text: bool = False
    # A chat template's own encoding of `text`: its control tokens as tokens, those inside the messages
    # as text (render_chat).
    template_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.user_text is None:
            object.__setattr__(self, "user_text", self.text)


def render(template: str, prompt: str, tokenizer: Any) -> RenderedPrompt:
    """Apply `template` to `prompt`; `tokenizer` supplies the chat template for `chat` and `auto`."""
    if template == "auto":
        template = "chat" if has_chat_template(tokenizer) else "none"
    # These templates' own text has no special tokens, so the whole prompt is tokenized as plain text.
    if template == "none":
        return RenderedPrompt(prompt, special_tokens_as_text=True)
    if template == "assistant":
        text = f"{ASSISTANT_PREFIX}User: {prompt}\nAssistant:"
        return RenderedPrompt(
            text, stop=("\nUser:",), user_text=prompt, penalize_prompt=False, special_tokens_as_text=True
        )
    if template == "few_shot":
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in FEW_SHOT_EXAMPLES)
        head = "Answer each question with a short, factual answer.\n\n"
        return RenderedPrompt(
            f"{head}{shots}Q: {prompt}\nA:",
            stop=("\nQ:",),
            user_text=prompt,
            penalize_prompt=False,
            special_tokens_as_text=True,
        )
    if template == "chat":
        rendered = render_chat([{"role": "user", "content": prompt}], tokenizer, field="prompt")
        return dataclasses.replace(rendered, user_text=prompt, penalize_prompt=False)
    raise ParamError(
        "template",
        f"template must be one of {', '.join(TEMPLATE_NAMES)}; got {template!r}",
    )


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# How a rendered chat ends: with the assistant's turn opened for the answer (add_generation_prompt), with
# the last message, an assistant's, left open for the answer to go on from (continue_final_message: a
# prefill), or closed after the last message (vLLM's add_generation_prompt false).
ChatEnd = Literal["answer", "continue", "closed"]


def render_chat(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    field: str = "messages",
    tools: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    end: ChatEnd = "answer",
) -> RenderedPrompt:
    """Render chat `messages` with the model's own chat template, and encode them with role integrity.

    Only the template may write control tokens. A message holding "<|im_end|>\n<|im_start|>assistant\n..."
    would otherwise close its own turn and open a forged one; transformers' `sanitize_control_tokens` marks
    every control token inside the messages, renders, and encodes the marked ones as plain text (the rest
    of the text is encoded as a whole, so ordinary messages get exactly the ids they always had). `tools`:
    for a template that renders them (frontend/tools.py), marked the same way. `options`: the template's
    own variables (vLLM's chat_template_kwargs, e.g. Qwen3's enable_thinking). `end`: how the rendered chat
    ends (ChatEnd).
    """
    options = options or {}
    taken = {"tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize"} & set(
        options
    )
    if taken:
        raise ParamError(
            "chat_template_kwargs",
            f"chat_template_kwargs cannot set {', '.join(sorted(taken))}: textgen sets it",
        )
    if not has_chat_template(tokenizer):
        raise ParamError(
            "template",
            "this model has no chat template, so template 'chat' is not available; "
            "use 'auto', 'none', 'assistant' or 'few_shot', or serve a chat model (e.g. SmolLM2-135M-Instruct)",
        )
    turn = {"add_generation_prompt": end == "answer", "continue_final_message": end == "continue"}
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **turn, **options)
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            **turn,
            sanitize_control_tokens=True,
            return_dict=False,
            **options,
        )
    except ValueError as exc:  # a control token this tokenizer also produces from plain text
        raise ParamError(
            field, f"{field} cannot be encoded safely for this model ({exc}); remove that text"
        ) from None
    return RenderedPrompt(text, add_special_tokens=False, template_ids=tuple(ids))
