"""Math datasets and prompt templates."""

from steerlens.data.problems import DATASETS, DataError, Problem, load_problems
from steerlens.data.prompts import SYSTEM_PROMPT, answer_format, format_prompt, resolve_template

__all__ = [
    "DATASETS",
    "DataError",
    "Problem",
    "SYSTEM_PROMPT",
    "answer_format",
    "format_prompt",
    "load_problems",
    "resolve_template",
]
