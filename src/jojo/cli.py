"""`jojo <command>`: parse arguments, call one function per command. No logic lives here.

Errors the user can fix (`JojoError`) print as one line on stderr with exit status 2, never a traceback. Failures
of the user's environment (a full disk, no permission, a read-only file system, a path through a regular file, too
many open files, out of memory: `jojo.errors.environment_message`) print one line too, with exit status 1. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import sys

from jojo import commands
from jojo.commands import EMBEDDED
from jojo.errors import JojoError, environment_message

# What to make smaller when memory runs out, by command.
REDUCE = {
    "train": "lower --batch-size (raise --grad-accum to keep the batch), model.block_size or the model's size "
    "(model.n_layer, model.n_embd)",
    "sft": "lower --batch-size (raise --grad-accum to keep the batch) or use LoRA (--lora-rank 8)",
    "quickstart": "lower --scale",
    "generate": "lower --max-tokens or --num-samples, or use --device cpu",
    "chat": "lower --max-tokens, or use --device cpu",
    "prepare": "use fewer --workers or a smaller --tokenizer-sample-mb",
    "tokenizer": "lower --max-mb",
}


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")


def _add_export_commands(sub) -> None:
    """`jojo export hf|gguf`, `jojo import hf`, `jojo upload` (jojo.export)."""
    ex = sub.add_parser("export", help="export a checkpoint to a Hugging Face folder or a GGUF file")
    esub = ex.add_subparsers(dest="export_format", required=True)
    eh = esub.add_parser("hf", help="a transformers folder (GPT2LMHeadModel / LlamaForCausalLM) with a model card")
    eh.add_argument("checkpoint", help="checkpoint directory or run directory")
    eh.add_argument("out", help="output folder (must not exist, or be empty)")
    eh.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    eg = esub.add_parser("gguf", help="one .gguf file for llama.cpp and Ollama")
    eg.add_argument("checkpoint", help="checkpoint directory or run directory")
    eg.add_argument("out", help="output .gguf file")
    eg.add_argument("--type", choices=["f32", "f16", "q8_0"], default="f16", help="weight type of the matrices")

    im = sub.add_parser("import", help="import a Hugging Face GPT-2 or Llama folder as a Jojo checkpoint")
    isub = im.add_subparsers(dest="import_format", required=True)
    ih = isub.add_parser("hf", help="a local transformers folder with config.json, weights and tokenizer.json")
    ih.add_argument("folder", help="the Hugging Face folder")
    ih.add_argument("out", help="output run directory (gets one checkpoint, step 0)")
    ih.add_argument("--block-size", type=int, default=None, help="context length (default: the model's own)")

    up = sub.add_parser("upload", help="convert a checkpoint and upload it to the Hugging Face Hub")
    up.add_argument("checkpoint", help="checkpoint directory or run directory")
    up.add_argument("--repo-name", required=True, help="repository name (without the owner)")
    up.add_argument("--organization", help="owner of the repository (default: your user)")
    up.add_argument("--private", action="store_true")
    up.add_argument("--dry-run", action="store_true", help="convert and write the folder, upload nothing")
    up.add_argument("--out", help="folder to write (default: a new temporary folder)")
    up.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    up.add_argument("--gguf", choices=["f32", "f16", "q8_0"], help="also upload a GGUF file of this type")


def _add_eval_commands(sub) -> None:
    """`jojo eval CKPT` and `jojo eval download` (jojo.eval)."""
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: loss/bpb on held-out text, zero-shot tasks, chat exact match, generation",
        description="`jojo eval CKPT [--tasks a,b] [--limit N] [--output results.json]` prints a table and writes "
        "JSON. Tasks: lm (needs --data or --text; default: the run's own dataset), hellaswag, arc-easy, "
        "arc-challenge, piqa, winogrande, lambada, chat (needs --chat-data), generation. Default: lm plus every "
        "task whose data is in --data-dir. `jojo eval download --tasks a,b --out DIR` fetches task data.",
    )
    ev.add_argument("checkpoint", help="checkpoint or run directory; or `download` to fetch task data")
    ev.add_argument("--tasks", help="comma-separated (default: lm + every task whose data is present)")
    ev.add_argument("--limit", type=int, default=0, help="first N items of each task (0 = all)")
    ev.add_argument("--output", help="write the report as JSON to this file")
    ev.add_argument("--data", help="lm metrics on this prepared dataset (a `jojo prepare` folder)")
    ev.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of --data (val)")
    ev.add_argument("--text", help="lm metrics on raw text: a file, folder or glob, read as `jojo prepare` reads it")
    ev.add_argument("--format", dest="text_format", default="auto", help="--text format (as jojo prepare)")
    ev.add_argument("--split-on", default="auto", help="how --text files split into documents (as jojo prepare)")
    ev.add_argument("--field", help="text field of --text JSON/JSONL/Parquet/CSV records")
    ev.add_argument("--stride", type=int, help="sliding windows every N tokens (default: non-overlapping windows)")
    ev.add_argument("--max-batches", type=int, help="lm batches (default: the run's eval_iters; 0 = whole split)")
    ev.add_argument("--batch-size", type=int, help="rows per forward (lm default: the run's; tasks: 32)")
    ev.add_argument("--data-dir", help="task data folder (default $JOJO_EVAL_DIR or ~/.cache/jojo/eval)")
    ev.add_argument("--chat", action="store_true", help="score multiple-choice tasks through the chat template")
    ev.add_argument("--chat-data", help="exact match on a JSONL of conversations ending with the reference answer")
    ev.add_argument("--generate", action="store_true", help="also sample text and measure generation speed")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ev.add_argument("--out", help="`jojo eval download`: the folder to write (default: the --data-dir default)")


def _add_serve_commands(sub) -> None:
    """`jojo serve` (jojo.serve): the OpenAI-compatible API and the chat page."""
    sv = sub.add_parser(
        "serve",
        help="serve a checkpoint: an OpenAI-compatible API (/v1) and a chat page (/), with continuous batching",
        description="POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, /health, "
        "/metrics, and the chat page at /. Listens on 127.0.0.1 unless --host says otherwise.",
    )
    sv.add_argument("checkpoint", help="checkpoint directory or run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $JOJO_API_KEY)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    sv.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled per step, all new requests together (padded): running streams wait at most "
        "that long between two tokens",
    )
    sv.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sv.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the run's name)")
    sv.add_argument(
        "--stream-interval", type=float, default=0.02, help="seconds between two chunks of a stream (0: every token)"
    )
    sv.add_argument(
        "--stream-chunk-rate",
        type=float,
        default=80.0,
        help="chunks per second, all streams together: with k streams sending text, each gets one every "
        "max(--stream-interval, k / rate) seconds (0: no cap)",
    )
    sv.add_argument("--device", default="auto")


def _config_help(preset: str) -> str:
    from jojo.config import config_help

    return config_help(preset)


def _add_quickstart_command(sub) -> None:
    """`jojo quickstart`: the whole pipeline on the embedded corpus."""
    q = sub.add_parser("quickstart", help="the whole pipeline on the embedded corpus, with a report")
    q.add_argument("--out", default="runs/quickstart", help="run directory for every artefact")
    q.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the training budget and corpus (default 1: ~5 min on 2 CPU cores)",
    )
    q.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    q.add_argument("--device", default="auto")
    q.add_argument("--seed", type=int, default=0)


def _add_tokenizer_commands(sub) -> None:
    """`jojo tokenizer train|eval`."""
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer on a corpus")
    tt.add_argument(
        "--input", default=EMBEDDED, help=f"a file, folder or glob ('{EMBEDDED}' = Jojo's generated corpus)"
    )
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--out", required=True, help="output directory (or path ending in .json)")
    tt.add_argument("--field", default="text", help="text field of JSON/JSONL records")
    tt.add_argument("--docs", type=int, default=20000, help="documents of the embedded corpus")
    tt.add_argument("--max-mb", type=float, default=100, help="train on at most the first N MB (default 100)")
    te = tsub.add_parser("eval", help="bytes per token on a corpus, side by side; checks special tokens")
    te.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder holding one)")
    te.add_argument("--compare", help="a second tokenizer.json to compare with")
    te.add_argument("--input", default=EMBEDDED, help=f"corpus: a file, folder or glob ('{EMBEDDED}' = generated)")
    te.add_argument("--field", default=None, help="text field of JSON/JSONL/Parquet records (default text)")
    te.add_argument("--split-on", default="auto", help="how text files split into documents (see prepare)")
    te.add_argument("--max-mb", type=float, default=100, help="read at most this many MB of the corpus")


def _add_prepare_command(sub) -> None:
    """`jojo prepare`: a corpus into token shards."""
    pr = sub.add_parser(
        "prepare",
        help="tokenize a corpus into token shards",
        description="Reads text/JSONL/JSON/Parquet/CSV files (also .gz/.zst), folders, globs, Hugging Face "
        "datasets (--hf) or a named recipe (--dataset; --list shows them); with none of these, Jojo's embedded "
        "corpus. Streams in bounded memory on every core; an unchanged re-run is a cache hit.",
    )
    pr.add_argument("--source", help=f"a file, folder or glob ('{EMBEDDED}' = Jojo's generated corpus, the default)")
    pr.add_argument("--dataset", help="a named recipe (story, fineweb-edu, chat, alpaca, sft, ...; see --list)")
    pr.add_argument("--hf", metavar="ID", help="stream a Hugging Face dataset, e.g. roneneldan/TinyStories")
    pr.add_argument("--subset", help="the hub dataset's config/subset (e.g. sample-10BT)")
    pr.add_argument("--split", help="the hub dataset's split (default: train, or the recipe's)")
    pr.add_argument("--list", action="store_true", help="list the named recipes and exit")
    pr.add_argument("--out", help="output directory for shards and meta.json")
    pr.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "json", "parquet", "csv"])
    pr.add_argument(
        "--split-on",
        default="auto",
        help="text files: blank (blank lines), eot (<|endoftext|>), line, file (one document per file), or any "
        "separator string; auto = eot if the first 2 MB of a file contain <|endoftext|>, else blank",
    )
    pr.add_argument("--field", help="text field of JSON/JSONL/Parquet/CSV records (default text)")
    pr.add_argument("--template", help="build the text from fields, e.g. '{instruction}\\n{output}'")
    pr.add_argument("--tokenizer", help="tokenizer.json to use; default: train one on the corpus")
    pr.add_argument("--vocab-size", type=int, default=4096, help="when training a tokenizer")
    pr.add_argument(
        "--tokenizer-sample-mb", type=float, default=100, help="train the tokenizer on the first N MB (default 100)"
    )
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.add_argument("--test-fraction", type=float, default=0.0)
    pr.add_argument("--seed", type=int, default=0, help="seeds the train/val/test split (and the embedded corpus)")
    pr.add_argument(
        "--docs",
        type=int,
        default=None,
        help="embedded corpus: documents to generate (default 20000); other sources: stop after N documents",
    )
    pr.add_argument("--workers", type=int, default=0, help="encoding processes (default: one per core)")
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    pr.add_argument("--overwrite", action="store_true", help="rebuild, even over shards of another tokenizer")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_training_commands(sub) -> None:
    """`jojo train` and `jojo sft`: their options are the config fields (generated help)."""
    run_help = "options of the run (each a config field: --section.key=value or --section.key value):"
    tr = sub.add_parser(
        "train",
        help="pretrain or continue training a model",
        description="Pretrain a model on a prepared dataset with one config: a preset or JSON file (--config), then "
        "any option below. Several processes: torchrun --nproc_per_node=N -m jojo.cli train ...",
        epilog=f"{run_help}\n\n{_config_help('tiny')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    tr.add_argument("--config", default=None, help="JSON config file or preset name (default tiny)")
    tr.add_argument("--list-presets", action="store_true", help="list the presets with their sizes and exit")
    tr.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint, with its config"
    )
    tr.add_argument("--init-from", help="start from this checkpoint's weights (fresh optimizer and step)")
    tr.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    tr.add_argument("--save-config", help="write the resolved config to this JSON file and exit")
    tr.add_argument(
        "--dry-run",
        action="store_true",
        help="build model, data and optimizer; print parameters, FLOPs/token, memory estimate and budget; exit",
    )

    sf = sub.add_parser(
        "sft",
        help="fine-tune a pretrained checkpoint on conversations (chat SFT), fully or with LoRA",
        description="Trains with the same loop as `jojo train`; the loss counts assistant turns only. Data (--data): "
        "'embedded' (Jojo's synthetic chats, the default) or JSONL/JSON/Parquet files of {\"messages\": [...]} / "
        '{"conversations": [...]} (system/user/assistant) or Alpaca records (instruction/input/output). '
        "jojo sft CKPT --data FILE --out DIR; after Ctrl+C, jojo sft --resume --out DIR continues with the run's own "
        "config.",
        epilog=f"{run_help}\n\n{_config_help('sft-tiny')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    # `jojo sft CKPT [options]`: the checkpoint may come first instead of --init-from. It is not an argparse
    # positional: the overrides pass through unparsed, and `--out X` would hand X to a positional.
    sf.add_argument("--init-from", help="the pretrained checkpoint or run directory (or give it first: jojo sft CKPT)")
    sf.add_argument("--config", default=None, help="JSON config file or preset name (default sft-tiny)")
    sf.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint, with its config"
    )
    sf.add_argument("--show-config", action="store_true", help="print the resolved config and exit")


def _add_inference_commands(sub) -> None:
    """`jojo chat`, `jojo generate` and `jojo plot`."""
    ch = sub.add_parser(
        "chat",
        help="chat with a checkpoint (a REPL; `echo Hi | jojo chat CKPT` prints one answer)",
        description="Commands in the REPL: /reset, /system TEXT, /save FILE, /quit. The oldest turns are dropped "
        "when the conversation outgrows the context (never the system prompt).",
    )
    ch.add_argument("checkpoint", help="checkpoint directory or run directory")
    ch.add_argument("--system", help="system prompt")
    _add_sampling_flags(ch)

    ge = sub.add_parser("generate", help="sample text from a checkpoint")
    ge.add_argument("checkpoint", help="checkpoint directory or run directory")
    src = ge.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the text to continue (default: a fresh document)")
    src.add_argument(
        "--prompt-file",
        help='batch: prompts.txt (one per line) or prompts.jsonl ({"prompt": ...} per line), all through the '
        "batched engine; writes {prompt, completion, tokens, finish_reason} per line to --output (or stdout)",
    )
    src.add_argument("--interactive", action="store_true", help="a prompt loop: each line typed is continued")
    ge.add_argument("--num-samples", type=int, default=1)
    ge.add_argument("--output", help="write the samples (with --prompt-file: results.jsonl) to this file")
    ge.add_argument("--no-stream", action="store_true", help="print each sample when done instead of streaming")
    ge.add_argument("--nonstop", action="store_true", help="keep generating past the context (a sliding window)")
    _add_sampling_flags(ge)

    pl = sub.add_parser("plot", help="redraw a run's loss curve (loss.png) from its metrics.jsonl")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jojo", description="Build a language model from scratch, end to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quickstart_command(sub)
    _add_tokenizer_commands(sub)
    _add_prepare_command(sub)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_export_commands(sub)
    _add_eval_commands(sub)
    _add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "sft"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return commands.dispatch(args, rest) or 0
    except JojoError as exc:
        print(f"jojo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jojo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        where = getattr(args, "out", None) or getattr(args, "output", None)
        message = environment_message(exc, REDUCE.get(args.command), where)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"jojo: error: {message}", file=sys.stderr)
        return 1
    finally:
        # A torchrun/FSDP2 run leaves its sharded model in reference cycles (hooks that hold their module). Left
        # to interpreter shutdown, freeing it tears down gloo work objects after Python is half gone, and the
        # process aborts ("terminate called without an active exception": a quarter to a third of 2-process
        # FSDP2 runs on CPU here). Free it now, while the interpreter is whole.
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
