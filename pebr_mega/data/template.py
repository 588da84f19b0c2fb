"""The PeBR response format and the instruction that asks for it.

The assistant answers in markdown sections (PEBR_FACTS, "Response format"):

    ### Image Description: ...
    ### Rationales: ...
    ### Let's think step by step.
    ### Step 1: ...  ### Step k: ...
    ### The final answer is: <answer>

The rewards (`pebr_mega.rewards`) check exactly these headers, case-insensitively.
"""
from __future__ import annotations

from typing import Sequence

IMAGE_TOKEN = "<image>"

HEADER_DESCRIPTION = "### Image Description:"
HEADER_RATIONALES = "### Rationales:"
HEADER_THINK = "### Let's think step by step."
HEADER_ANSWER = "### The final answer is:"

INSTRUCTION = (
    "Answer the question about the image. First describe the image under '### Image Description:', "
    "then give the facts you use under '### Rationales:', then write \"### Let's think step by step.\" "
    "and reason in steps '### Step 1:', '### Step 2:', ..., and end with '### The final answer is:' "
    "followed by the answer.\n"
)


def build_prompt_text(problem: str) -> str:
    """The user turn's text: the PeBR instruction followed by the problem (which contains `<image>`)."""
    return INSTRUCTION + problem


def format_response(description: str, rationales: str, steps: Sequence[str], answer: str) -> str:
    """Render a response in the PeBR format (used for SFT targets and tests)."""
    lines = [f"{HEADER_DESCRIPTION} {description}", f"{HEADER_RATIONALES} {rationales}", HEADER_THINK]
    lines += [f"### Step {i}: {s}" for i, s in enumerate(steps, start=1)]
    lines.append(f"{HEADER_ANSWER} {answer}")
    return "\n".join(lines)
