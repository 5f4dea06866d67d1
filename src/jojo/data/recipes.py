"""Named data recipes: `jojo prepare --dataset NAME`.

A recipe is a declarative entry: where the data lives on the Hugging Face hub (id, subset, split), how a record
becomes a document (a `TextFormat`) and a one-line description. `--source PATH` reads a local file in the same
format instead of the hub (for `sft`, which has no hub dataset, it is required).

Renderings (see `TextFormat`): plain-text corpora keep their `text` field; conversations become ChatML through
`jojo.tokenizer.render_chat`, so pretraining on them teaches the same format SFT and chat use:

- chat, chitchat, sft:  the message list, as is (`role`/`content`, or ShareGPT `from`/`value`);
- alpaca:               user = instruction (+ blank line + input when present), assistant = output;
- knowledge:            user = the question, assistant = the first answer (SQuAD's `answers.text[0]`); the context
                        paragraph is left out so the model must hold the fact itself; unanswerable rows skipped;
- dailydialog:          the utterances alternate user / assistant, starting with user;
- dictionary:           plain text "word: definition" (a fact to learn, not a conversation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from jojo.data.sources import Block, DatasetMissing, FileSource, HubSource, Source, TextFormat
from jojo.errors import JojoError


@dataclass(frozen=True)
class Recipe:
    name: str
    hub: str | None
    description: str
    subset: str | None = None
    split: str = "train"
    text: TextFormat = TextFormat()
    split_on: str = "auto"  # for local text files
    fallback: str | None = None  # another recipe to use when the hub dataset is unavailable

    @property
    def format_name(self) -> str:
        return self.text.kind if self.text.kind != "field" else f"text ({self.text.field})"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("story", "roneneldan/TinyStories", "short stories a small model can learn (TinyStories)"),
        Recipe(
            "fineweb-edu", "HuggingFaceFW/fineweb-edu", "educational web pages (FineWeb-Edu, 10B-token sample)",
            subset="sample-10BT",
        ),
        Recipe("dolma", "allenai/dolma", "AI2's open pretraining mix (falls back to c4 when unavailable)",
               fallback="c4"),
        Recipe("c4", "allenai/c4", "cleaned Common Crawl, English (C4)", subset="en"),
        Recipe("openwebtext", "Skylion007/openwebtext", "web pages linked from Reddit (OpenWebText)"),
        Recipe("chat", "HuggingFaceH4/ultrachat_200k", "multi-turn assistant conversations (UltraChat 200k), ChatML",
               split="train_sft", text=TextFormat("chatml", "messages")),
        Recipe("chitchat", "HuggingFaceTB/everyday-conversations-llama3.1-2k",
               "short greetings and everyday exchanges, ChatML", split="train_sft",
               text=TextFormat("chatml", "messages")),
        Recipe("knowledge", "rajpurkar/squad", "question -> answer pairs (SQuAD), ChatML user/assistant",
               text=TextFormat("qa")),
        Recipe("dictionary", "marksverdhei/wordnet-definitions-en-2021", "word -> definition (WordNet), plain text",
               text=TextFormat("definition")),
        Recipe("dailydialog", "li2017dailydialog/daily_dialog", "everyday two-person dialogues, ChatML",
               text=TextFormat("dialog")),
        Recipe("alpaca", "tatsu-lab/alpaca", "instruction/input/output (Stanford Alpaca), ChatML user/assistant",
               text=TextFormat("alpaca")),
        Recipe("sft", None, 'your own conversations: JSONL of {"conversations": [{"role", "content"}]}, ChatML',
               text=TextFormat("chatml")),
    ]
}  # fmt: skip


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise JojoError(f"unknown dataset recipe '{name}'; {hint}`jojo prepare --list` shows them")
    return RECIPES[name]


def list_recipes() -> str:
    rows = [("name", "hub dataset", "format", "description")]
    for r in RECIPES.values():
        hub = (r.hub or "(local --source only)") + (f" [{r.subset}]" if r.subset else "")
        rows.append((r.name, hub, r.format_name, r.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}" for row in rows)


def recipe_source(
    name: str,
    local: str | None = None,
    split: str | None = None,
    text: TextFormat | None = None,
) -> Source:
    """The source for a recipe: the local file when given, else the hub dataset (with its fallback)."""
    recipe = get_recipe(name)
    fmt = text or recipe.text
    if local:
        return FileSource(local, split_on=recipe.split_on, text=fmt)
    if recipe.hub is None:
        raise JojoError(
            f"recipe '{name}' has no hub dataset: pass --source PATH ({recipe.description.split(':', 1)[-1].strip()})"
        )
    primary = HubSource(recipe.hub, recipe.subset, split or recipe.split, fmt)
    if recipe.fallback:
        return _FallbackSource(primary, recipe_source(recipe.fallback, split=split), name, recipe.fallback)
    return primary


class _FallbackSource(Source):
    """The primary hub dataset, or the fallback recipe when the primary is missing or cannot stream.
    Offline is not "missing": an unreachable hub fails as it would for the primary alone."""

    def __init__(self, primary: HubSource, fallback: Source, name: str, fallback_name: str):
        self.primary, self.fallback = primary, fallback
        self.name, self.fallback_name = name, fallback_name
        self.description = primary.description

    def fingerprint(self) -> dict:
        return {"primary": self.primary.fingerprint(), "fallback": self.fallback.fingerprint()}

    def blocks(self) -> Iterator[Block]:
        started = False
        try:
            self.primary.check()
            for block in self.primary.blocks():
                started = True
                yield block
            return
        except DatasetMissing as exc:
            reason = str(exc)
        except JojoError as exc:
            if "cannot reach" in str(exc) or "switched off" in str(exc) or started:
                raise
            reason = str(exc)
        print(f"recipe '{self.name}' is unavailable ({reason}); using '{self.fallback_name}' instead")
        self.description = self.fallback.description
        yield from self.fallback.blocks()


def open_source(
    source: str | None = None,
    *,
    dataset: str | None = None,
    hf: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    fmt: str = "auto",
    split_on: str = "auto",
    field: str | None = None,
    template: str | None = None,
    docs: int | None = None,
    seed: int = 0,
) -> Source:
    """What `jojo prepare` reads, from its flags: a recipe (`dataset`, optionally with a local `source`), a hub
    dataset (`hf`), a local file/folder/glob (`source`), or, with none of these, the embedded corpus."""
    from jojo.data.sources import EMBEDDED, embedded_source

    text = None
    if template:
        text = TextFormat("template", template=template)
    elif field:
        text = TextFormat("field", field)
    if sum(x is not None for x in (dataset, hf)) > 1:
        raise JojoError("give either --dataset NAME or --hf ID, not both")
    if dataset:
        return recipe_source(dataset, local=source, split=split, text=text)
    if hf:
        if source:
            raise JojoError("give either --hf ID (stream from the hub) or --source PATH (local files), not both")
        return HubSource(hf, subset, split or "train", text)
    if source is None or source == EMBEDDED:
        return embedded_source(docs or 20000, seed)
    return FileSource(source, fmt, split_on, text)
