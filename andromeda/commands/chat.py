"""Chat with a checkpoint: each line you type is a user turn; answers stream back.

The conversation is rendered with the chat template used in instruction tuning and the
answer stops at the template's end-of-turn marker. Commands:
  /reset                 forget the conversation (keeps the system prompt)
  /set NAME VALUE        change a sampling setting, e.g. /set temperature 0.7
                         (temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed)
  /show                  print the current settings
  /exit                  leave (Ctrl-D too)
Ctrl-C stops the answer being written, not the program. Works with input piped in.
"""

from __future__ import annotations

import sys

from andromeda.commands.engine_options import add_sampling_arguments, build_engine, sampling_params
from andromeda.errors import UserError

SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
            "repetition_penalty": float, "max_new_tokens": int, "seed": int}


def add_arguments(p) -> None:
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")


def _template():
    """(render(messages) -> prompt text, end-of-turn stop string)."""
    try:
        from andromeda.data.chat_template import END_OF_TURN, render_chat
    except ImportError:  # minimal stand-in with the same turn format
        END_OF_TURN = "<|end|>"

        def render_chat(messages, add_generation_prompt=False):
            class _R:
                text = "".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}\n" for m in messages) + (
                    "<|assistant|>\n" if add_generation_prompt else "")
            return _R()
    return (lambda messages: render_chat(messages, add_generation_prompt=True).text), END_OF_TURN


class Chat:
    def __init__(self, engine, params, system=None, out=sys.stdout, err=sys.stderr):
        self.engine, self.params, self.system = engine, params, system
        self.out, self.err = out, err
        self.render, self.end_of_turn = _template()
        self.history: list[dict] = []

    def _messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def _fit(self, user: str) -> str:
        """The rendered prompt; the oldest turns are dropped when it would not leave room to answer."""
        room = self.engine.max_seq_len - min(self.params.max_new_tokens, self.engine.max_seq_len // 2)
        while True:
            text = self.render(self._messages(user))
            if len(self.engine.tokenizer.encode_prompt(text)) <= room or not self.history:
                return text
            self.history = self.history[2:]

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        parts = line.split()
        name = parts[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            print("[conversation reset]", file=self.err)
        elif name == "/show":
            print(", ".join(f"{k}={getattr(self.params, k)}" for k in SETTABLE), file=self.err)
        elif name == "/set" and len(parts) == 3 and parts[1] in SETTABLE:
            key, raw = parts[1], parts[2]
            try:
                value = None if raw.lower() == "none" and key in ("top_k", "seed") else SETTABLE[key](raw)
                self.params = self.params.replace(**{key: value})
                print(f"[{key} = {value}]", file=self.err)
            except (ValueError, UserError) as e:
                print(f"[cannot set {key}: {e}]", file=self.err)
        else:
            print("[commands: /reset, /set NAME VALUE (" + ", ".join(SETTABLE) + "), /show, /exit]", file=self.err)
        return True

    def answer(self, user: str) -> str:
        prompt = self._fit(user)
        params = self.params.replace(stop=tuple(self.params.stop) + (self.end_of_turn,))
        pieces = []
        events = self.engine.stream([prompt], params)
        try:
            for event in events:
                pieces.append(event.text)
                self.out.write(event.text)
                self.out.flush()
        except KeyboardInterrupt:
            events.close()
            print("\n[stopped]", file=self.err)
        self.out.write("\n")
        self.out.flush()
        reply = "".join(pieces).strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return reply

    def loop(self, lines=None) -> None:
        interactive = lines is None and sys.stdin.isatty()
        source = iter(lines) if lines is not None else None
        while True:
            try:
                if source is not None:
                    line = next(source)
                elif interactive:
                    line = input("> ")
                else:
                    line = sys.stdin.readline()
                    if not line:
                        return
            except (EOFError, StopIteration):
                return
            except KeyboardInterrupt:
                print("\n[use /exit or Ctrl-D to leave]", file=self.err)
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.answer(line)
            except UserError as e:  # e.g. a single message longer than the context
                print(f"[error: {e}]", file=self.err)


def run(args) -> int:
    params = sampling_params(args)
    engine = build_engine(args)
    if sys.stdin.isatty():
        print("chat: type a message, /reset, /set NAME VALUE, /exit", file=sys.stderr)
    Chat(engine, params, args.system).loop()
    return 0
