"""One function per `jojo` command: glue between parsed arguments and the library."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from jojo.errors import JojoError

EMBEDDED = "embedded"


def embedded_records(n_docs: int, seed: int = 0) -> Iterator[dict]:
    """Jojo's own corpus (stories + chats), each record carrying its information content in bits."""
    from jojo.data.synthetic import generate_corpus

    for doc in generate_corpus(n_docs, seed=seed):
        yield {"text": doc.text, "bits": doc.bits, "kind": doc.kind}


def source_records(source: str, field: str = "text", n_docs: int = 20000, seed: int = 0) -> Iterator[dict]:
    if source == EMBEDDED:
        return embedded_records(n_docs, seed)
    from jojo.data.sources import iter_records

    return iter_records(source, field)


def cmd_tokenizer_train(args) -> None:
    from jojo.tokenizer import train_tokenizer

    texts = (r["text"] for r in source_records(args.input, args.field, args.docs))
    tok = train_tokenizer(texts, args.vocab_size)
    path = tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens, hash {tok.hash} -> {path}")


def cmd_prepare(args) -> None:
    from jojo.data.prepare import prepare_records
    from jojo.tokenizer import Tokenizer, train_tokenizer

    if not 0 < args.val_fraction < 1:
        raise JojoError("--val-fraction must be between 0 and 1")
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        texts = (r["text"] for r in source_records(args.source, args.field, args.docs, args.seed))
        tok = train_tokenizer(texts, args.vocab_size)
        print(f"trained a tokenizer: {tok.vocab_size} tokens (hash {tok.hash})")
    records = source_records(args.source, args.field, args.docs, args.seed)
    meta = prepare_records(records, tok, args.out, args.val_fraction, args.seed, source=args.source)
    for split, info in meta["splits"].items():
        floor = f", entropy floor {info['entropy_floor_bpb']:.4f} bpb" if "entropy_floor_bpb" in info else ""
        print(f"{split}: {info['docs']:,} docs, {info['tokens']:,} tokens, {info['bytes']:,} bytes{floor}")
    print(f"prepared -> {args.out}")


def cmd_train(args, rest: list[str]) -> None:
    from jojo.config import load_config
    from jojo.train.run import run_training

    cfg = load_config(args.config, rest)
    if args.show_config or args.save_config:
        import json

        if args.save_config:
            cfg.save(args.save_config)
            print(f"config -> {args.save_config}")
        if args.show_config:
            print(json.dumps(cfg.to_dict(), indent=2))
        return
    result = run_training(cfg, resume=args.resume, init_from=args.init_from)
    bpb = f", val {result.val_bpb:.4f} bpb" if result.val_bpb is not None else ""
    state = "interrupted and saved" if result.interrupted else "done"
    print(
        f"{state}: step {result.step}, val loss {result.val_loss:.4f}{bpb}, "
        f"{result.tokens_per_second:,.0f} tokens/s -> {result.run_dir}"
    )


def cmd_generate(args) -> None:
    import torch

    from jojo.infer.engine import SamplingConfig, TextStreamer, generate_stream
    from jojo.train.checkpoint import load_checkpoint
    from jojo.train.system import pick_device

    sc = SamplingConfig(args.max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    if args.num_samples < 1:
        raise JojoError("--num-samples must be >= 1")
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise JojoError(f"prompt file not found: {path}")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt if args.prompt is not None else ""
    device = pick_device(args.device)
    model, tok, _ = load_checkpoint(args.checkpoint, device)
    prompt_ids = tok.encode(prompt) if prompt else [tok.eot_id]  # no prompt: start a fresh document
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    samples = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", flush=True)
        streamer = TextStreamer(tok)
        if not args.no_stream:
            print(prompt, end="", flush=True)
        for token in generate_stream(model, prompt_ids, sc, tok.vocab_size, {tok.eot_id}, generator=generator):
            piece = streamer.push(token)
            if piece and not args.no_stream:
                print(piece, end="", flush=True)
        tail = streamer.flush()
        text = prompt + tok.decode(streamer.ids)
        if args.no_stream:
            print(text, end="")
        elif tail:
            print(tail, end="")
        print(flush=True)
        samples.append(text)
    if args.output:
        sep = "\n\n" + "-" * 40 + "\n\n"
        Path(args.output).write_text(sep.join(samples) + "\n", encoding="utf-8")
        print(f"samples -> {args.output}", file=sys.stderr)


def cmd_plot(args) -> None:
    from jojo.train.monitor import plot_run

    print(f"plot -> {plot_run(args.run_dir, args.out)}")


def cmd_quickstart(args) -> None:
    from jojo.quickstart import run_quickstart

    run_quickstart(out=args.out, scale=args.scale, family=args.family, device=args.device, seed=args.seed)


def cmd_export(args) -> None:
    if args.export_format == "hf":
        from jojo.export.hf import export_hf

        print(f"transformers folder -> {export_hf(args.checkpoint, args.out, dtype=args.dtype)}")
    else:
        from jojo.export.gguf import export_gguf

        print(f"GGUF ({args.type}) -> {export_gguf(args.checkpoint, args.out, args.type)}")


def cmd_import(args) -> None:
    from jojo.export.hf import import_hf

    print(f"checkpoint -> {import_hf(args.folder, args.out, block_size=args.block_size)}")


def cmd_upload(args) -> None:
    from jojo.export.hub import upload

    where, folder = upload(
        args.checkpoint,
        args.repo_name,
        organization=args.organization,
        private=args.private,
        dry_run=args.dry_run,
        out=args.out,
        dtype=args.dtype,
        gguf_type=args.gguf,
    )
    if args.dry_run:
        print(f"dry run: nothing uploaded; the folder for {where} is {folder}")
    else:
        print(f"uploaded {folder} -> {where}")


def dispatch(args, rest: list[str]) -> int | None:
    if args.command == "tokenizer":
        return cmd_tokenizer_train(args)
    if args.command == "train":
        return cmd_train(args, rest)
    handlers = {
        "prepare": cmd_prepare,
        "generate": cmd_generate,
        "plot": cmd_plot,
        "quickstart": cmd_quickstart,
        "export": cmd_export,
        "import": cmd_import,
        "upload": cmd_upload,
    }
    return handlers[args.command](args)
