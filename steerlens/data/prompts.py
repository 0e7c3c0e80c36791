"""Prompt templates: the chat template with the paper's system prompt, or the r1 plain template for base models."""

from __future__ import annotations

from typing import Any, Literal

from steerlens.data.problems import DataError

Template = Literal["auto", "chat", "r1"]
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
R1_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks through the reasoning and then gives the User the answer. The reasoning "
    "and the answer are enclosed in <think> </think> and <answer> </answer> tags, as in <think> reasoning "
    "here </think> <answer> answer here </answer>. User: {problem}. Assistant: <think>"
)


def resolve_template(tokenizer: Any, template: Template = "auto") -> Literal["chat", "r1"]:
    """`auto` is `chat` when the tokenizer has a chat template, else `r1`."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "r1"
    if template not in ("chat", "r1"):
        raise DataError(f"template must be auto, chat or r1, got {template!r}")
    return template


def answer_format(template: Literal["chat", "r1"]) -> Literal["boxed", "answer_tag"]:
    """Where a completion's final answer is read: the r1 template's `<answer>` block, else the last `\\boxed{}`."""
    return "answer_tag" if template == "r1" else "boxed"


def format_prompt(tokenizer: Any, problem: str, template: Template = "auto") -> str:
    """The text the model is asked to continue for `problem`."""
    if resolve_template(tokenizer, template) == "r1":
        return R1_TEMPLATE.format(problem=problem)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
