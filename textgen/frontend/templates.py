"""Prompt templates: how a user's prompt is turned into the text the model continues.

The default, `auto`, frames the prompt with the model's own chat template when it has one (an instruct
model such as SmolLM2 answers a bare question with an end-of-text token about half the time), and
continues it as is (`none`) when it has none, as GPT-2. The other templates frame the prompt so that a
continuation reads as an answer, and say where that answer ends (their stop strings), so generation stops
there instead of running into an invented next turn.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.user_text is None:
            object.__setattr__(self, "user_text", self.text)


def render(template: str, prompt: str, tokenizer: Any) -> RenderedPrompt:
    """Apply `template` to `prompt`; `tokenizer` supplies the chat template for `chat` and `auto`."""
    if template == "auto":
        template = "chat" if has_chat_template(tokenizer) else "none"
    if template == "none":
        return RenderedPrompt(prompt)
    if template == "assistant":
        text = f"{ASSISTANT_PREFIX}User: {prompt}\nAssistant:"
        return RenderedPrompt(text, stop=("\nUser:",), user_text=prompt, penalize_prompt=False)
    if template == "few_shot":
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in FEW_SHOT_EXAMPLES)
        head = "Answer each question with a short, factual answer.\n\n"
        return RenderedPrompt(
            f"{head}{shots}Q: {prompt}\nA:", stop=("\nQ:",), user_text=prompt, penalize_prompt=False
        )
    if template == "chat":
        rendered = render_chat([{"role": "user", "content": prompt}], tokenizer)
        return RenderedPrompt(
            rendered.text, rendered.stop, rendered.add_special_tokens, user_text=prompt, penalize_prompt=False
        )
    raise ParamError(
        "template",
        f"template must be one of {', '.join(TEMPLATE_NAMES)}; got {template!r}",
    )


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> RenderedPrompt:
    """Render chat `messages` with the model's own chat template."""
    if not has_chat_template(tokenizer):
        raise ParamError(
            "template",
            "this model has no chat template, so template 'chat' is not available; "
            "use 'auto', 'none', 'assistant' or 'few_shot', or serve a chat model (e.g. SmolLM2-135M-Instruct)",
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return RenderedPrompt(text, add_special_tokens=False)
