"""The PeBR response format, and the prompt template that asks for it.

The assistant answers in markdown sections (PEBR_FACTS, "Response format"):

    ### Image Description: ...
    ### Rationales: ...
    ### Let's think step by step.
    ### Step 1: ...  ### Step k: ...
    ### The final answer is: <answer>

The rewards (`pebr_mega.rewards`) check these headers.

The user turn of a GRPO prompt is a Jinja2 template rendered with the record's problem as `content`, the
convention of EasyR1's `data.format_prompt` files (EasyR1 `verl/utils/dataset.py`,
`RLHFDataset._build_messages`): the file's text is stripped of leading and trailing whitespace, compiled with
`jinja2.Template` (default settings: no block trimming, the final newline dropped) and rendered with
`content=problem`. Upstream PeBR-R1's `examples/format_prompt/pebr_format.jinja` passed as `data.format_prompt`
therefore gives the same user text as upstream, byte for byte. Our default, `pebr_mega/templates/pebr_format.jinja`,
asks for the same sections in the same order: the instruction, a blank line, the trimmed problem.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pebr_mega.config_fields import ConfigError

IMAGE_TOKEN = "<image>"

HEADER_DESCRIPTION = "### Image Description:"
HEADER_RATIONALES = "### Rationales:"
HEADER_THINK = "### Let's think step by step."
HEADER_ANSWER = "### The final answer is:"

DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "pebr_format.jinja"
# The name under which an exported HF directory carries the template it was trained with.
TEMPLATE_FILE_NAME = "format_prompt.jinja"

# Rendered in place of the problem to check that a template uses `content` at all.
_PROBE = "\x00pebr-problem\x00"


@dataclass(frozen=True)
class PromptTemplate:
    """A format-prompt template: the file's text as read (`source`) and where it came from."""

    source: str
    origin: str

    def render(self, problem: str) -> str:
        """The user turn's text for `problem` (which keeps its `<image>` placeholders)."""
        return _compile(self.source).render(content=problem)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    return jinja2.Template(source.strip())


def load_prompt_template(path: str | Path | None = None, key: str = "data.format_prompt") -> PromptTemplate:
    """The template at `path`, or the packaged default when `path` is empty.

    Raises `ConfigError` naming `key` when the file is missing, is not valid Jinja2, or never renders
    `content` (every problem would be dropped from its prompt).
    """
    file = Path(path) if path else DEFAULT_TEMPLATE_PATH
    if not file.is_file():
        raise ConfigError(f"config key '{key}' = {str(path)!r}: template file not found")
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key '{key}' = {str(path)!r}: cannot read the template ({e})") from None
    template = PromptTemplate(source, str(file))
    try:
        probe = template.render(_PROBE)
    except Exception as e:  # jinja2 raises TemplateSyntaxError at compile time, others when rendering
        where = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise ConfigError(f"config key '{key}' = {str(file)!r}: invalid Jinja2 template{where}: "
                          f"{getattr(e, 'message', None) or e}") from None
    if _PROBE not in probe:
        raise ConfigError(f"config key '{key}' = {str(file)!r}: the template never renders `content` "
                          "(write {{ content | trim }} where the problem goes)")
    return template


@functools.lru_cache(maxsize=1)
def default_template() -> PromptTemplate:
    """The packaged default template."""
    return load_prompt_template(None)


def model_prompt_template(model_dir: str | Path, override: str | Path | None = None) -> PromptTemplate:
    """The template to prompt an exported model with: `override` when given, else the one its HF directory
    carries (`format_prompt.jinja`, written by the export), else the packaged default."""
    if override:
        return load_prompt_template(override, key="--format-prompt")
    carried = Path(model_dir) / TEMPLATE_FILE_NAME
    return load_prompt_template(carried, key=f"{TEMPLATE_FILE_NAME} of {model_dir}") if carried.is_file() \
        else default_template()


def write_prompt_template(out_dir: str | Path, template: PromptTemplate | None) -> Path:
    """Write `template`'s text unchanged (the default when None) into an HF directory as `format_prompt.jinja`."""
    out = Path(out_dir) / TEMPLATE_FILE_NAME
    out.write_text((template or default_template()).source, encoding="utf-8")
    return out


def build_prompt_text(problem: str, template: PromptTemplate | None = None) -> str:
    """The user turn's text: `template` (default: the packaged one) rendered with `problem`."""
    return (template or default_template()).render(problem)


def format_response(description: str, rationales: str, steps: Sequence[str], answer: str) -> str:
    """Render a response in the PeBR format (used for SFT targets and tests)."""
    lines = [f"{HEADER_DESCRIPTION} {description}", f"{HEADER_RATIONALES} {rationales}", HEADER_THINK]
    lines += [f"### Step {i}: {s}" for i, s in enumerate(steps, start=1)]
    lines.append(f"{HEADER_ANSWER} {answer}")
    return "\n".join(lines)
