"""One function per `jojo` command: glue between parsed arguments and the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jojo.errors import JojoError

EMBEDDED = "embedded"


def cmd_tokenizer_train(args) -> None:
    from jojo.data.prepare import train_on_sample
    from jojo.data.recipes import open_source

    source = open_source(args.input, field=args.field, docs=args.docs)
    tok, seen = train_on_sample(source, args.vocab_size, int(args.max_mb * 1e6))
    path = tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens, hash {tok.hash}, trained on {seen / 1e6:.1f} MB of text -> {path}")


def _unescape(text: str | None) -> str | None:
    """`\\n` and `\\t` typed on a command line (a template, a separator) mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t") if text else text


def cmd_prepare(args) -> None:
    from jojo.data.prepare import prepare_corpus
    from jojo.data.recipes import list_recipes, open_source

    if args.list:
        print(list_recipes())
        return
    if not args.out:
        raise JojoError("--out DIR is required: the folder for the shards and meta.json")
    source = open_source(
        args.source,
        dataset=args.dataset,
        hf=args.hf,
        subset=args.subset,
        split=args.split,
        fmt=args.format,
        split_on=_unescape(args.split_on),
        field=args.field,
        template=_unescape(args.template),
        docs=args.docs,
        seed=args.seed,
    )
    meta, hit = prepare_corpus(
        source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        workers=args.workers,
        max_docs=0 if source.description == EMBEDDED else (args.docs or 0),
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    for split, info in meta["splits"].items():
        if split == "test" and not info["docs"]:
            continue
        floor = f", entropy floor {info['entropy_floor_bpb']:.4f} bpb" if "entropy_floor_bpb" in info else ""
        print(f"{split}: {info['docs']:,} docs, {info['tokens']:,} tokens, {info['bytes']:,} bytes{floor}")
    build = meta.get("build", {})
    if not hit and build.get("seconds"):
        mb = build["input_bytes"] / 1e6
        print(
            f"read {mb:,.1f} MB in {build['seconds']:.1f} s ({mb / build['seconds']:.1f} MB/s, "
            f"{build['workers']} worker(s), {build['encoder']} encoder)"
        )
    if build.get("encoder_note"):
        print(f"note: encoded with tokenizers, not tiktoken: {build['encoder_note']}")
    print(f"prepared -> {args.out}")


def cmd_tokenizer_eval(args) -> None:
    from jojo.data.prepare import sample_texts
    from jojo.data.recipes import open_source
    from jojo.tokenizer import Tokenizer, evaluate_tokenizer

    toks = [Tokenizer.load(args.tokenizer)] + ([Tokenizer.load(args.compare)] if args.compare else [])
    reports = []
    for tok in toks:
        source = open_source(args.input, field=args.field, split_on=_unescape(args.split_on))
        reports.append(evaluate_tokenizer(tok, sample_texts(source, int(args.max_mb * 1e6))))
    first = reports[0]
    print(f"corpus: {args.input} ({first['docs']:,} documents, {first['bytes']:,} bytes)")
    rows = [
        ("tokenizer", [r["tokenizer"] for r in reports]),
        ("hash", [r["hash"] for r in reports]),
        ("vocab size", [f"{r['vocab_size']:,}" for r in reports]),
        ("tokens", [f"{r['tokens']:,}" for r in reports]),
        ("bytes / token", [f"{r['bytes_per_token']:.3f}" for r in reports]),
        ("specials never split", ["yes" if r["specials_never_split"] else "NO" for r in reports]),
    ]
    width = max(len(v) for _, values in rows for v in values) + 2
    for name, values in rows:
        print(f"{name:<22}" + "".join(f"{v:<{width}}" for v in values))
    for r in reports:
        for special, info in r["specials"].items():
            bad = (
                not info["probes_ok"]
                or info["vocab_entries_containing_it"]
                or (info["in_corpus"] != info["encoded_as_one_id"])
            )
            if bad:
                print(
                    f"{r['tokenizer']}: {special} (id {info['id']}): probes {'ok' if info['probes_ok'] else 'FAIL'}, "
                    f"{info['vocab_entries_containing_it']} vocab entries contain it, {info['in_corpus']} in the "
                    f"corpus -> {info['encoded_as_one_id']} single ids"
                )


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
    if args.dry_run:
        from jojo.train.run import dry_run

        dry_run(cfg, init_from=args.init_from)
        return
    result = run_training(cfg, resume=args.resume, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 alone reports
        return
    bpb = f", val {result.val_bpb:.4f} bpb" if result.val_bpb is not None else ""
    state = "interrupted and saved" if result.interrupted else "stopped early" if result.stopped_early else "done"
    print(
        f"{state}: step {result.step}, val loss {result.val_loss:.4f}{bpb}, "
        f"{result.tokens_per_second:,.0f} tokens/s -> {result.run_dir}"
    )


def cmd_sft(args, rest: list[str]) -> None:
    from jojo.config import load_config
    from jojo.train.sft import run_sft

    init_from = args.init_from
    if rest and not rest[0].startswith("--"):  # `jojo sft CKPT ...`
        if init_from:
            raise JojoError(f"give the checkpoint once: first ({rest[0]}) or with --init-from ({init_from})")
        init_from, rest = rest[0], rest[1:]
    rest = ["--data.packing=false" if a == "--no-packing" else a for a in rest]
    overrides = rest + (["--data.dataset", args.data] if args.data else [])
    cfg = load_config(args.config, overrides)
    if args.show_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return
    result = run_sft(
        cfg,
        init_from,
        data_format=args.data_format,
        on_bad=args.on_bad,
        val_fraction=args.val_fraction,
        embedded_n=args.embedded_chats,
        resume=args.resume,
    )
    fit = result.fit
    state = "interrupted and saved" if fit.interrupted else "done"
    print(f"{state}: step {fit.step}, val loss {fit.val_loss:.4f} (assistant tokens) -> {fit.run_dir}")
    print(f"next: jojo chat {fit.run_dir}")


def cmd_chat(args) -> None:
    from jojo.infer.chat import chat_main
    from jojo.infer.engine import SamplingConfig

    sc = SamplingConfig(args.max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    chat_main(args.checkpoint, sc, system=args.system, device=args.device)


def cmd_generate(args) -> None:
    import torch

    from jojo.checkpoint import load_checkpoint
    from jojo.device import pick_device
    from jojo.infer.engine import SamplingConfig, TextStreamer, generate_stream

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


def cmd_serve(args) -> None:
    from jojo.checkpoint import resolve_checkpoint

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise JojoError("jojo serve needs FastAPI and uvicorn: pip install -e '.[serve]' (or setup.sh --dev)") from None
    from jojo.serve.app import ServeSettings, serve

    resolve_checkpoint(args.checkpoint)  # a wrong path fails here, before the server starts
    settings = ServeSettings(
        checkpoint=args.checkpoint,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("JOJO_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        threads=args.threads,
        cors_origins=tuple(args.cors_origin),
        device=args.device,
        model_name=args.model_name,
        stream_interval=args.stream_interval,
    )
    serve(settings)


def dispatch(args, rest: list[str]) -> int | None:
    if args.command == "tokenizer":
        return cmd_tokenizer_eval(args) if args.tokenizer_command == "eval" else cmd_tokenizer_train(args)
    if args.command == "train":
        return cmd_train(args, rest)
    if args.command == "sft":
        return cmd_sft(args, rest)
    handlers = {
        "prepare": cmd_prepare,
        "generate": cmd_generate,
        "chat": cmd_chat,
        "plot": cmd_plot,
        "quickstart": cmd_quickstart,
        "export": cmd_export,
        "import": cmd_import,
        "upload": cmd_upload,
        "serve": cmd_serve,
    }
    return handlers[args.command](args)
