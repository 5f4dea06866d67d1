"""Zero-shot benchmarks (HellaSwag, ARC-Easy, ARC-Challenge, PIQA, Winogrande, LAMBADA) and the one likelihood
engine that scores them.

Functions the rest of Jojo calls:

- `run_tasks(model, tokenizer, tasks=None, *, data_dir=None, limit=0, batch_size=32, device=None, chat=False,
  return_items=False) -> {task: {metric: value, ...}}`: every metric below, with `n` (items), `truncated`
  (requests whose context was cut) and `<metric>_stderr`. `tasks=None` runs every task whose data is present.
  The model's train/eval mode is restored afterwards, so the training loop can call it between steps.
- `flat_metrics(results) -> {"hellaswag/acc_norm": 0.31, ...}`: the same as one flat dict, for metric loggers.
- `score_requests(model, [(context_ids, continuation_ids), ...], batch_size=32) -> [Score]`: the engine.
- `encode_pair(tokenizer, context, continuation) -> (context_ids, continuation_ids)`: the boundary rule.

Data: one JSON Lines file per task in a folder (`--data-dir`, else `$JOJO_EVAL_DIR`, else ~/.cache/jojo/eval),
in llm-foundry's "local_data" formats (what `jojo eval download` writes; ../shared/data/eval holds copies):

    multiple choice   {"query": str, "choices": [str, ...], "gold": int}      hellaswag, arc-*, piqa
    schema            {"context_options": [str, ...], "continuation": str, "gold": int}   winogrande
    language model    {"context": str, "continuation": str}                   lambada

Scoring rules (lm-evaluation-harness's, so figures compare with the field's):

- A request is (context, continuation); the continuation follows the context after one space (" " + choice).
  Trailing whitespace of the context moves to the front of the continuation; context + continuation is
  tokenized as one string and the continuation's tokens are those after the context's own tokens. An empty
  context becomes <|endoftext|>. Only the continuation's tokens are scored: ll = sum_j ln p(cont_j | ...).
- A request longer than the model's context (len(ctx) + len(cont) > block_size + 1) keeps its continuation and
  loses its oldest context tokens; such requests are counted in `truncated`. (A continuation longer than the
  whole context, possible only with very short contexts, keeps its last block_size tokens, conditioned on the
  token before them; also counted in `truncated`.)
- Multiple choice: `acc` = [argmax_i ll_i == gold]; `acc_norm` = [argmax_i ll_i / len(choice_i in characters)
  == gold] (lm-evaluation-harness; the length of the choice text without the joining space);
  `acc_norm_token` = [argmax_i ll_i / n_tokens_i == gold] (mean log-probability per token: build-nanogpt's and
  llm.c's HellaSwag rule). Ties go to the first choice, as numpy's argmax does.
- Schema (Winogrande): the same continuation is scored after each context option; `acc` as above.
- LAMBADA: `acc` = every continuation token is the argmax (greedy exact match of the last word);
  `perplexity` = exp(-mean over items of ll) (lm-evaluation-harness's aggregate).
- stderr = sample standard deviation (n - 1) / sqrt(n) of the per-item 0/1 scores.
- `chat=True` (`jojo eval --chat`): multiple-choice and schema items become one user turn in the chat template
  (the question, then the options lettered A., B., ...), and the score of an option is the log-probability
  of its letter as the assistant's first token; `acc` only. LAMBADA has no chat form.

The engine (`score_requests`): requests that share a context (the choices of one item) run that context once.
Contexts are sorted by length and taken in batches (up to 16 x `batch_size` continuation rows, 8192 context
tokens, and lengths within 1/8 of the longest). One forward over the first m - 1 tokens of every context of the
batch (m = its shortest context) fills a KV cache; then the continuation rows, sorted by length, go in chunks of
at most `batch_size` rows (a chunk also ends at a row less than half as long as its first), each row with a copy
of its context's cached keys and values, feeding the rest of its context and its continuation (right-padded:
causal attention never lets padding reach an earlier position). A multiple-choice item's shared context thus
runs once instead of once per choice, and only the positions that predict a continuation token reach the
output layer and its softmax (at most LOGITS_BUDGET values per forward). On the shared HellaSwag slice this
feeds the model about 55% of the tokens lm-evaluation-harness's `hf` model does (the floor, each context once
and each continuation once, is 49%).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from jojo.device import autocast
from jojo.errors import JojoError
from jojo.tokenizer import Tokenizer, encode_chat

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODEL = "multiple_choice", "schema", "language_model"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOGITS_BUDGET = 1 << 25  # output-layer values per forward (128 MiB in float32): bounds memory for large vocabularies
PREFILL_CHUNKS = 16  # one prefill serves up to this many second-forward chunks of batch_size rows...
PREFILL_TOKENS = 8192  # ...and holds at most this many context tokens (its KV cache: 8192 x layers x 2 x width)
SPREAD = 8  # a batch's contexts are within 1/SPREAD of its longest (the tails recomputed per row stay short)
CUT = 0.5  # a chunk ends at a row shorter than CUT x its first (bounds padding; a lower CUT means fewer forwards)
ENV_DIR = "JOJO_EVAL_DIR"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    files: tuple[str, ...]  # file names looked for in the data folder, in order (the first is what download writes)
    chance: float | None  # accuracy of random guessing
    title: str


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("hellaswag", MULTIPLE_CHOICE, ("hellaswag.jsonl", "hellaswag_val_head.jsonl"), 0.25, "HellaSwag"),
        TaskSpec("arc-easy", MULTIPLE_CHOICE, ("arc_easy.jsonl",), 0.25, "ARC-Easy"),
        TaskSpec("arc-challenge", MULTIPLE_CHOICE, ("arc_challenge.jsonl",), 0.25, "ARC-Challenge"),
        TaskSpec("piqa", MULTIPLE_CHOICE, ("piqa.jsonl",), 0.5, "PIQA"),
        TaskSpec("winogrande", SCHEMA, ("winogrande.jsonl",), 0.5, "Winogrande"),
        TaskSpec("lambada", LANGUAGE_MODEL, ("lambada_openai.jsonl",), None, "LAMBADA (OpenAI)"),
    )
}
ALIASES = {"lambada-openai": "lambada", "arc-e": "arc-easy", "arc-c": "arc-challenge"}


# ---- names and data ----------------------------------------------------------------------------------
def task_spec(name: str, known: dict | None = None) -> TaskSpec:
    """The task called `name` (underscores or hyphens, any case); an unknown name suggests the closest."""
    known = TASKS if known is None else known
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key in known:
        return known[key]
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise JojoError(f"unknown task '{name}'; {hint}(tasks: {', '.join(known)})")


def split_names(names) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (empty parts dropped)."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    return [part.strip() for n in names for part in str(n).split(",") if part.strip()]


def default_data_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jojo" / "eval"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir`, else $JOJO_EVAL_DIR, else ~/.cache/jojo/eval (where `jojo eval download` writes by default)."""
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def task_file(spec: TaskSpec, data_dir: Path) -> Path | None:
    for name in spec.files:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Tasks whose data file is in the folder (none when the folder does not exist)."""
    folder = resolve_data_dir(data_dir)
    return [name for name, spec in TASKS.items() if folder.is_dir() and task_file(spec, folder) is not None]


def _fetch_hint(name: str, folder: Path) -> str:
    return f"fetch it with `jojo eval download --tasks {name} --out {folder}` (or point --data-dir / ${ENV_DIR} at it)"


def parse_item(kind: str, obj, where: str) -> dict:
    """Check one record of a task file against its kind's format; JojoError naming `where` (file:line)."""
    if not isinstance(obj, dict):
        raise JojoError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def need_str(key: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str):
            raise JojoError(f"{where}: '{key}' must be a string (fields: {', '.join(sorted(map(str, obj)))})")
        return value

    def need_options(key: str) -> list[str]:
        value = obj.get(key)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
            raise JojoError(f"{where}: '{key}' must be a list of at least two strings")
        return value

    def need_gold(n: int) -> int:
        gold = obj.get("gold")
        if isinstance(gold, str) and gold.strip().isdigit():
            gold = int(gold)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n:
            raise JojoError(f"{where}: 'gold' must be an integer index below {n}, got {obj.get('gold')!r}")
        return gold

    if kind == MULTIPLE_CHOICE:
        choices = need_options("choices")
        return {"query": need_str("query"), "choices": choices, "gold": need_gold(len(choices))}
    if kind == SCHEMA:
        options = need_options("context_options")
        return {"context_options": options, "continuation": need_str("continuation"), "gold": need_gold(len(options))}
    if kind == LANGUAGE_MODEL:
        item = {"context": need_str("context"), "continuation": need_str("continuation")}
        if not item["continuation"].strip():
            raise JojoError(f"{where}: 'continuation' is empty")
        return item
    raise ValueError(f"unknown task kind {kind}")


def read_items(path: str | Path, kind: str, limit: int = 0) -> list[dict]:
    """The first `limit` (0 = all) records of a JSON Lines task file, each checked by `parse_item`."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JojoError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one object") from None
            items.append(parse_item(kind, obj, f"{path}:{lineno}"))
            if limit and len(items) >= limit:
                break
    if not items:
        raise JojoError(f"{path} holds no items")
    return items


def load_items(name: str, data_dir: str | Path | None = None, limit: int = 0) -> tuple[TaskSpec, list[dict], Path]:
    """(spec, items, file) of a task from the data folder; one-line errors name the download command."""
    spec = task_spec(name)
    folder = resolve_data_dir(data_dir)
    if not folder.is_dir():
        raise JojoError(f"eval data folder {folder} not found; {_fetch_hint(spec.name, folder)}")
    path = task_file(spec, folder)
    if path is None:
        raise JojoError(
            f"no data for task '{spec.name}' in {folder} (looked for {', '.join(spec.files)}); "
            f"{_fetch_hint(spec.name, folder)}"
        )
    return spec, read_items(path, spec.kind, limit), path


# ---- tokenization ------------------------------------------------------------------------------------
def _split_boundary(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the front of the continuation (lm-evaluation-harness)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_pairs(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` for many pairs, tokenized in two batched calls."""
    split = [_split_boundary(c, k) for c, k in pairs]
    contexts = tok.encode_batch([c for c, _ in split])
    wholes = tok.encode_batch([c + k for c, k in split])
    out = []
    for (ctx_text, _), ctx, whole in zip(split, contexts, wholes):
        if not ctx_text:  # empty context: condition on <|endoftext|>, the token every document starts with
            cont = whole
            if cont and cont[0] == tok.eot_id:
                out.append((cont[:1], cont[1:]))
            else:
                out.append(([tok.eot_id], cont))
        else:
            out.append((ctx, whole[len(ctx) :]))
    return out


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-evaluation-harness's boundary: trailing whitespace of the context
    moves into the continuation; the pair is tokenized as one string, the continuation being the tokens after
    the context's own."""
    return encode_pairs(tok, [(context, continuation)])[0]


# ---- the engine --------------------------------------------------------------------------------------
@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    greedy: bool  # every continuation token is the most likely next token
    tokens: int  # continuation tokens
    truncated: int  # tokens dropped from the left to fit the model's context


@torch.inference_mode()
def score_requests(
    model,
    requests,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[Score]:
    """Score (context ids, continuation ids) pairs; see the module docstring. Contexts must be non-empty."""
    T = model.config.block_size
    device = device or next(model.parameters()).device
    batch_size = max(int(batch_size), 1)
    prepared: list[tuple[tuple[int, ...], list[int], int]] = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError(f"request {i}: the context and the continuation must both hold tokens")
        over = max(len(ctx) + len(cont) - (T + 1), 0)
        if len(cont) > T:  # the continuation alone overflows: score its last T tokens after the one before them
            ctx, cont = cont[-T - 1 : -T], cont[-T:]
            prepared.append((tuple(ctx), cont, over))
            continue
        prepared.append((tuple(ctx[over:]), cont, over))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _, _) in enumerate(prepared):
        groups.setdefault(ctx, []).append(i)
    # Longest first (a memory problem shows at once); neighbours in this order have similar lengths, so the
    # context tails that the second forward recomputes per continuation (see `_score_batch`) stay short.
    order = sorted(groups, key=lambda c: (-len(c), -max(len(prepared[i][1]) for i in groups[c]), c))
    results: list[Score | None] = [None] * len(prepared)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prepared), desc="scoring", unit="req", dynamic_ncols=True, leave=False)
    was_training = model.training
    model.eval()
    try:
        batch: list[tuple[int, ...]] = []
        rows = 0
        for ctx in order + [None]:
            n = len(groups[ctx]) if ctx is not None else 0
            if batch and (
                ctx is None
                or rows + n > batch_size * PREFILL_CHUNKS
                or (len(batch) + 1) * len(batch[0]) > PREFILL_TOKENS  # longest first: this bounds the prefill
                or len(batch[0]) - len(ctx) > max(2, len(batch[0]) // SPREAD)
            ):
                _score_batch(model, batch, groups, prepared, results, device, dtype, batch_size)
                if bar:
                    bar.update(rows)
                batch, rows = [], 0
            if ctx is not None:
                batch.append(ctx)
                rows += n
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _output_rows(model, rows: torch.Tensor):
    """While active, the model's output layer sees only the final-norm rows `rows` (flat indices into
    batch x time), so the logits come out as [1, len(rows), V] and nothing is spent on positions nobody scores.
    Applied from outside with a forward hook on `norm_f`; a model without one yields False and is left alone."""
    norm = getattr(model, "norm_f", None)
    if not isinstance(norm, torch.nn.Module) or not isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        yield False
        return
    handle = norm.register_forward_hook(lambda _m, _a, out: out.reshape(-1, out.shape[-1]).index_select(0, rows)[None])
    try:
        yield True
    finally:
        handle.remove()


def _score_batch(model, contexts, groups, prepared, results, device, dtype, chunk_rows: int) -> None:
    """A batch of contexts (lengths c_g, shortest m) and their continuations, in 1 + ceil(rows / chunk_rows)
    forwards:

    1. prefill: the first m - 1 tokens of every context, one row per context, into a KV cache (skipped when
       m == 1);
    2. the continuation rows, sorted by length and cut into chunks of at most `chunk_rows` rows: each row gets a
       copy of its context's cached prefix, then one forward over every row's own rest, context tokens
       m - 1 .. c_g - 1 and the continuation but its last token, right-padded. Positions run on from m - 1 in
       every row, so each row sees exactly its context and continuation; continuation token j is predicted at
       index c_g - m + j. Only those positions reach the output layer (`_output_rows`)."""
    m = min(len(c) for c in contexts)
    cache_dtype = None if dtype == torch.float32 else dtype
    first = None
    if m > 1:
        prefix = torch.tensor([c[: m - 1] for c in contexts], dtype=torch.long, device=device)
        first = model.new_cache(len(contexts), m - 1, dtype=cache_dtype)
        with autocast(device, dtype):
            model(prefix, cache=first, last_only=True)
    # (request, its context's row in the prefill, the tokens the second forward feeds)
    rows = [(i, g, list(ctx[m - 1 :]) + prepared[i][1][:-1]) for g, ctx in enumerate(contexts) for i in groups[ctx]]
    rows.sort(key=lambda r: -len(r[2]))
    vocab = model.config.vocab_size
    start = 0
    while start < len(rows):
        # rows come longest first: a chunk ends at chunk_rows rows, at a row much shorter than its first (padding),
        # or when its scored tokens x vocab would pass LOGITS_BUDGET
        width, end, scored = len(rows[start][2]), start, 0
        while end < len(rows) and end - start < chunk_rows:
            scored += len(prepared[rows[end][0]][1])
            if end > start and (len(rows[end][2]) < CUT * width or scored * vocab > LOGITS_BUDGET):
                break
            end += 1
        _score_chunk(model, rows[start:end], contexts, m, first, prepared, results, device, dtype, cache_dtype)
        start = end


def _score_chunk(model, rows, contexts, m, first, prepared, results, device, dtype, cache_dtype) -> None:
    width = max(len(feed) for _, _, feed in rows)
    cache = None
    if first is not None:
        sel = torch.tensor([g for _, g, _ in rows], dtype=torch.long, device=device)
        cache = model.new_cache(len(rows), m - 1 + width, dtype=cache_dtype)
        cache.k[:, :, :, : m - 1] = first.k[:, sel, :, : m - 1]
        cache.v[:, :, :, : m - 1] = first.v[:, sel, :, : m - 1]
        cache.pos = m - 1
    inputs = torch.tensor([feed + [0] * (width - len(feed)) for _, _, feed in rows], dtype=torch.long, device=device)
    # The positions that predict a continuation token (flat indices into rows x width), their targets and rows.
    where, targets, owner = [], [], []
    for r, (i, g, _) in enumerate(rows):
        cont = prepared[i][1]
        at = r * width + len(contexts[g]) - m
        where.extend(range(at, at + len(cont)))
        targets.extend(cont)
        owner.extend([r] * len(cont))
    where_t = torch.tensor(where, dtype=torch.long, device=device)
    with _output_rows(model, where_t) as selected, autocast(device, dtype):
        logits, _ = model(inputs, cache=cache)
    logits = logits.reshape(-1, logits.shape[-1])
    picked = (logits if selected else logits.index_select(0, where_t)).float()  # [scored tokens, V]
    target_t = torch.tensor(targets, dtype=torch.long, device=device)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    # one fused cross-entropy gives -log p of each target; the row sums are the log-likelihoods
    token_logp = -F.cross_entropy(picked, target_t, reduction="none")
    misses = (picked.argmax(-1) != target_t).float()
    logp = torch.zeros(len(rows), device=device).index_add_(0, owner_t, token_logp)
    greedy = torch.zeros(len(rows), device=device).index_add_(0, owner_t, misses) == 0
    for (i, _, _), lp, gr in zip(rows, logp.tolist(), greedy.tolist()):
        results[i] = Score(lp, gr, len(prepared[i][1]), prepared[i][2])


# ---- tasks -------------------------------------------------------------------------------------------
def chat_question(spec: TaskSpec, item: dict) -> tuple[str, int]:
    """(user message, number of options) of a multiple-choice or schema item in chat form."""
    if spec.kind == MULTIPLE_CHOICE:
        head, options = item["query"].strip(), item["choices"]
        ask = "Which option is correct?" if head.endswith("?") else "Which option continues the text best?"
        head = f"{head}\n\n{ask}"
    elif spec.kind == SCHEMA:
        head = "Which sentence is more plausible?"
        options = [f"{opt} {item['continuation']}" for opt in item["context_options"]]
    else:
        raise JojoError(f"task '{spec.name}' has no chat form (--chat scores multiple-choice tasks)")
    if len(options) > len(LETTERS):
        raise JojoError(f"an item of '{spec.name}' has more than {len(LETTERS)} options")
    lines = "\n".join(f"{LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options))
    return f"{head}\n\n{lines}\n\nAnswer with the letter of the correct option.", len(options)


def _requests(spec: TaskSpec, items: list[dict], tok: Tokenizer, chat: bool) -> tuple[list, list[int]]:
    """Token requests of every item, flattened, and how many belong to each item."""
    if chat:
        requests, counts = [], []
        letters = {}
        for item in items:
            question, n = chat_question(spec, item)
            prompt, _ = encode_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
            for i in range(n):
                letters.setdefault(i, tok.encode(LETTERS[i]))
                requests.append((prompt, letters[i]))
            counts.append(n)
        return requests, counts
    if spec.kind == MULTIPLE_CHOICE:
        pairs = [(item["query"], " " + choice) for item in items for choice in item["choices"]]
        counts = [len(item["choices"]) for item in items]
    elif spec.kind == SCHEMA:
        pairs = [(opt, " " + item["continuation"]) for item in items for opt in item["context_options"]]
        counts = [len(item["context_options"]) for item in items]
    else:
        pairs = [(item["context"], " " + item["continuation"]) for item in items]
        counts = [1] * len(items)
    return encode_pairs(tok, pairs), counts


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error, sample standard deviation (n - 1) / sqrt(n)."""
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_items(spec: TaskSpec, items: list[dict], scores: list[Score], counts: list[int], chat: bool) -> tuple:
    """(metrics, per-item rows) from the scores of every request, `counts[i]` requests per item."""
    rows, at = [], 0
    for item, n in zip(items, counts):
        s = scores[at : at + n]
        at += n
        lls = [x.logprob for x in s]
        row = {"logprobs": lls, "tokens": [x.tokens for x in s], "truncated": sum(x.truncated > 0 for x in s)}
        if spec.kind == LANGUAGE_MODEL and not chat:
            row.update(greedy=s[0].greedy, acc=float(s[0].greedy))
        else:
            gold = item["gold"]
            row.update(gold=gold, pred=_argmax(lls))
            row["acc"] = float(row["pred"] == gold)
            if spec.kind == MULTIPLE_CHOICE and not chat:
                row["pred_norm"] = _argmax([ll / len(c) if c else ll for ll, c in zip(lls, item["choices"])])
                row["pred_norm_token"] = _argmax([x.logprob / x.tokens for x in s])
                row["acc_norm"] = float(row["pred_norm"] == gold)
                row["acc_norm_token"] = float(row["pred_norm_token"] == gold)
        rows.append(row)
    metrics: dict = {}
    names = ["acc"]
    if spec.kind == MULTIPLE_CHOICE and not chat:
        names += ["acc_norm", "acc_norm_token"]
    for name in names:
        metrics[name], metrics[f"{name}_stderr"] = mean_stderr([r[name] for r in rows])
    if spec.kind == LANGUAGE_MODEL and not chat:
        mean_ll = sum(r["logprobs"][0] for r in rows) / len(rows)
        metrics["perplexity"] = math.exp(-mean_ll) if -mean_ll < 700 else float("inf")
    metrics["n"] = len(rows)
    metrics["truncated"] = sum(r["truncated"] for r in rows)
    if spec.chance is not None:
        metrics["chance"] = spec.chance
    return metrics, rows


def run_task(
    model,
    tokenizer: Tokenizer,
    name: str,
    *,
    data_dir: str | Path | None = None,
    items: list[dict] | None = None,
    limit: int = 0,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chat: bool = False,
    return_items: bool = False,
    progress: bool = False,
) -> dict:
    """One task's metrics (see `run_tasks`); `items` replaces the task's data file (already parsed records)."""
    spec = task_spec(name)
    path = None
    if items is None:
        spec, items, path = load_items(spec.name, data_dir, limit)
    elif limit:
        items = items[:limit]
    if chat and spec.kind == LANGUAGE_MODEL:
        raise JojoError(f"task '{spec.name}' has no chat form; --chat scores multiple-choice tasks")
    requests, counts = _requests(spec, items, tokenizer, chat)
    scores = score_requests(model, requests, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    metrics, rows = score_items(spec, items, scores, counts, chat)
    metrics["mode"] = "chat" if chat else "completion"
    if path is not None:
        metrics["file"] = str(path)
    if return_items:
        metrics["items"] = rows
    return metrics


def run_tasks(
    model,
    tokenizer: Tokenizer,
    tasks=None,
    *,
    data_dir: str | Path | None = None,
    limit: int = 0,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chat: bool = False,
    return_items: bool = False,
    progress: bool = False,
) -> dict:
    """{task: metrics} for `tasks` (names or 'a,b'; None = every task with data in the folder; in chat mode
    the tasks with a chat form). `limit` = the first N items of each task (0 = all)."""
    names = [task_spec(n).name for n in split_names(tasks)] if tasks is not None else available_tasks(data_dir)
    if tasks is None and chat:
        names = [n for n in names if TASKS[n].kind != LANGUAGE_MODEL]
    out = {}
    for name in dict.fromkeys(names):
        out[name] = run_task(
            model, tokenizer, name, data_dir=data_dir, limit=limit, batch_size=batch_size, device=device,
            dtype=dtype, chat=chat, return_items=return_items, progress=progress,
        )  # fmt: skip
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """{"hellaswag/acc": ..., "hellaswag/acc_norm": ...} from `run_tasks`' result (numbers only, no stderr)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in ("acc", "acc_norm", "acc_norm_token", "perplexity") and value is not None:
                flat[f"{task}/{key}"] = value
    return flat
