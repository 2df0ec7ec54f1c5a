"""The chat template shared by instruction tuning and inference.

Offers `render_chat(messages, add_generation_prompt=False) -> Rendered` (a list of
{"role", "content"} messages), `render_instruction(instruction, context="", response=None)`
(Dolly-style records, rendered as one user turn and one assistant turn), the `Rendered`
result (text plus the character spans that are assistant responses) and the markers
`ROLE_TAGS` and `END_OF_TURN` (a stop string for generation).

Each turn is written as

    <|role|>\\n{content}<|end|>\\n

with role one of system, user, assistant. The template is plain text, so it works with every
tokenizer kind (bytes, characters, BPE) without new special ids. An assistant span covers
the response and its `<|end|>` marker, so a tuned model learns to close its turn; the role
header before it belongs to the prompt. `add_generation_prompt` ends the text with the
assistant header, which is exactly the prefix the model saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ROLES = ("system", "user", "assistant")
ROLE_TAGS = {role: f"<|{role}|>\n" for role in ROLES}
END_OF_TURN = "<|end|>"


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) character ranges of `text` that are assistant output (loss goes here)."""

    def segments(self) -> list[tuple[str, bool]]:
        """The text cut at span borders: (piece, is_assistant) in order, no empty pieces."""
        out, pos = [], 0
        for start, end in self.spans:
            if start > pos:
                out.append((self.text[pos:start], False))
            out.append((self.text[start:end], True))
            pos = end
        if pos < len(self.text):
            out.append((self.text[pos:], False))
        return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """Render messages; raises ValueError naming the first malformed message."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string")
        header = ROLE_TAGS[role]
        body = content + END_OF_TURN
        parts += [header, body, "\n"]
        if role == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        length += len(header) + len(body) + 1
    if add_generation_prompt:
        parts.append(ROLE_TAGS["assistant"])
    return Rendered("".join(parts), spans)


def instruction_messages(instruction: str, context: str = "", response: Optional[str] = None) -> list[dict]:
    """A Dolly-style record as chat messages: the context (if any) follows the instruction."""
    user = instruction if not context else f"{instruction}\n\n{context}"
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_instruction(instruction: str, context: str = "", response: Optional[str] = None) -> Rendered:
    """Render an instruction record; without a response, end with the generation prompt."""
    return render_chat(instruction_messages(instruction, context, response),
                       add_generation_prompt=response is None)
