"""A chat session and the `jojo chat` REPL.

A `ChatSession` holds the conversation (an optional system prompt, then user/assistant turns) and builds each
prompt with the same `encode_chat` SFT trains on. The context window is a hard limit, so before each answer the
oldest exchanges are dropped (never the system prompt) until the prompt leaves `reserve` tokens for the reply.
Generation streams and stops at `<|im_end|>` (or `<|endoftext|>`).

REPL commands: /reset (forget the conversation, keep the system prompt), /system TEXT, /save FILE (the
conversation as {"messages": [...]}, the format `jojo sft` reads), /quit. Non-interactive (stdin not a
terminal), the whole input is one user message and only the answer is printed: `echo Hi | jojo chat CKPT`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from jojo.errors import JojoError
from jojo.infer.engine import SamplingConfig, TextGenerator
from jojo.tokenizer import Tokenizer, encode_chat

HELP = "commands: /reset  /system TEXT  /save FILE  /quit   (Ctrl+D quits; Ctrl+C stops an answer)"


class ChatSession:
    def __init__(self, model, tok: Tokenizer, sampling: SamplingConfig, system: str | None = None):
        self.model, self.tok, self.sampling = model, tok, sampling
        self.gen = TextGenerator(model, tok)
        self.system = system or None
        self.turns: list[dict] = []  # user / assistant messages, oldest first (no system message)
        self.dropped = 0  # messages dropped to fit the context, since the last reset
        block = model.config.block_size
        # Room kept for the answer: max_tokens, but never more than half the context (a long --max-tokens
        # must not leave no room for the conversation itself).
        self.reserve = max(1, min(sampling.max_tokens, block // 2))
        self.generator = self.gen.generator(sampling.seed)  # one stream of randomness over the conversation

    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns.clear()
        self.dropped = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one line: a valid .json file and a one-record .jsonl file, which `jojo sft --data FILE` reads as is
        path.write_text(json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n")
        return path

    def prompt_ids(self) -> list[int]:
        """The prompt for the next answer, after dropping the oldest turns that do not fit."""
        block = self.model.config.block_size
        limit = block - self.reserve
        while True:
            ids, _ = encode_chat(self.tok, self.messages, add_generation_prompt=True)
            if len(ids) <= limit:
                return ids
            if len(self.turns) <= 1:  # only the system prompt and the new message are left
                raise JojoError(
                    f"the message is too long: {len(ids)} prompt tokens, and the context of {block} keeps "
                    f"{self.reserve} for the answer; shorten it (or the system prompt, or --max-tokens)"
                )
            # drop the oldest exchange: the first user message and everything up to the next user message
            cut = 1
            while cut < len(self.turns) - 1 and self.turns[cut]["role"] != "user":
                cut += 1
            del self.turns[:cut]
            self.dropped += cut

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer's text; the answer joins the history when done (also
        when the caller stops early: what was shown is what the model said)."""
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self.prompt_ids()
        except JojoError:
            self.turns.pop()
            raise
        pieces: list[str] = []
        try:
            for piece in self.gen.stream(prompt, self.sampling, chat=True, generator=self.generator):
                pieces.append(piece)
                yield piece
        finally:
            self.turns.append({"role": "assistant", "content": "".join(pieces)})


def run_repl(
    session: ChatSession,
    lines: Iterable[str],
    write: Callable[[str], None],
    prompt: Callable[[], None] | None = None,
) -> int:
    """Drive a session from lines of input: each line is a user message or a command. Returns the number of
    answers given. `prompt` is called before reading each line (the interactive '>>> ')."""
    answers = 0
    it = iter(lines)
    while True:
        if prompt:
            prompt()
        try:
            line = next(it)
        except StopIteration:
            return answers
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return answers
            if cmd == "/reset":
                session.reset()
                write("(conversation cleared)\n")
            elif cmd == "/system":
                session.set_system(arg)
                write(f"(system prompt {'set' if arg else 'removed'})\n")
            elif cmd == "/save":
                if not arg:
                    write("usage: /save FILE\n")
                else:
                    write(f"(saved to {session.save(arg)})\n")
            elif cmd == "/help":
                write(HELP + "\n")
            else:
                write(f"unknown command {cmd}; {HELP}\n")
            continue
        dropped = session.dropped
        try:
            for piece in session.reply(text):
                write(piece)
        except JojoError as exc:
            write(f"({exc})\n")
            continue
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        answers += 1
        if session.dropped > dropped:
            write(f"(dropped the oldest {session.dropped - dropped} message(s) to fit the context)\n")


def _interactive_lines() -> Iterator[str]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue


def chat_repl(
    model,
    tok: Tokenizer,
    sampling: SamplingConfig,
    system: str | None = None,
    label: str = "",
    stdin=None,
    stdout=None,
    interactive: bool | None = None,
) -> None:
    """`jojo chat CKPT`: a REPL on a terminal; with piped input, the whole input is one message and only the
    answer is printed. `label` names the model in the greeting (its checkpoint and step)."""
    import sys

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if interactive is None:
        interactive = stdin.isatty()
    session = ChatSession(model, tok, sampling, system)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if not interactive:
        message = stdin.read().strip("\n")
        if not message.strip():
            raise JojoError("no message on stdin; pipe one in (echo Hi | jojo chat CKPT) or run on a terminal")
        for piece in session.reply(message):
            write(piece)
        write("\n")
        return
    block = model.config.block_size
    write(f"jojo chat: {label} (context {block} tokens). {HELP}\n")
    if session.system:
        write(f"(system: {session.system})\n")
    run_repl(session, _interactive_lines(), write)
