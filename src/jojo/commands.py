"""One function per `jojo` command: glue between parsed arguments and the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jojo.errors import JojoError, ensure_dir

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
    from jojo.api import prepare
    from jojo.data.recipes import list_recipes

    if args.list:
        print(list_recipes())
        return
    result = prepare(
        args.source,
        args.out,
        dataset=args.dataset,
        hf=args.hf,
        subset=args.subset,
        split=args.split,
        format=args.format,
        split_on=_unescape(args.split_on),
        field=args.field,
        template=_unescape(args.template),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        docs=args.docs,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    meta, hit = result.meta, result.cache_hit
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
    print(f"prepared -> {result.path}")


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


def _show_config(cfg, args) -> bool:
    """--show-config / --save-config: print or write the resolved config instead of running."""
    if getattr(args, "save_config", None):
        cfg.save(args.save_config)
        print(f"config -> {args.save_config}")
    if args.show_config:
        print(json.dumps(cfg.to_dict(), indent=2))
    return bool(args.show_config or getattr(args, "save_config", None))


def cmd_list_presets() -> None:
    from jojo.api import presets

    print(
        f"{'preset':<12} {'parameters':>11} {'family':<7} {'layers':>6} {'width':>6} {'heads':>6} {'context':>8} vocab"
    )
    for p in presets():
        c = p["config"]
        vocab = f"{c.vocab_size}" if p["vocab_given"] else f"{c.vocab_size}* "
        heads = f"{c.n_head}/{c.n_kv_head}" if c.n_kv_head != c.n_head else f"{c.n_head}"
        print(f"{p['name']:<12} {p['params'] / 1e6:>10.1f}M {c.family:<7} {c.n_layer:>6} {c.n_embd:>6} {heads:>6} "
              f"{c.block_size:>8} {vocab}")  # fmt: skip
    print(
        "* the tokenizer's vocabulary when it trains (counted here at 4096); sizes: jojo train --config NAME --dry-run"
    )


def cmd_train(args, rest: list[str]) -> None:
    from jojo.api import pretrain, run_config

    if args.list_presets:
        return cmd_list_presets()

    if args.show_config or args.save_config or args.dry_run:
        cfg = run_config(args.config, rest, default="tiny", resume=args.resume)
        if _show_config(cfg, args):
            return
        from jojo.train.run import dry_run

        dry_run(cfg, init_from=args.init_from)
        return
    result = pretrain(args.config, overrides=rest, resume=args.resume, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 alone reports
        return
    bpb = f", val {result.val_bpb:.4f} bpb" if result.val_bpb is not None else ""
    state = "interrupted and saved" if result.interrupted else "stopped early" if result.stopped_early else "done"
    print(
        f"{state}: step {result.step}, val loss {result.val_loss:.4f}{bpb}, "
        f"{result.tokens_per_second:,.0f} tokens/s -> {result.run_dir}"
    )


def cmd_sft(args, rest: list[str]) -> None:
    from jojo.api import finetune, run_config

    init_from = args.init_from
    if rest and not rest[0].startswith("--"):  # `jojo sft CKPT ...`
        if init_from:
            raise JojoError(f"give the checkpoint once: first ({rest[0]}) or with --init-from ({init_from})")
        init_from, rest = rest[0], rest[1:]
    if args.show_config:
        _show_config(run_config(args.config, rest, default="sft-tiny", resume=args.resume), args)
        return
    result = finetune(init_from, config=args.config, overrides=rest, resume=args.resume)
    fit = result.fit
    state = "interrupted and saved" if fit.interrupted else "done"
    print(f"{state}: step {fit.step}, val loss {fit.val_loss:.4f} (assistant tokens) -> {fit.run_dir}")
    print(f"next: jojo chat {fit.run_dir}")


def _sampling(args) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_chat(args) -> None:
    from jojo.api import LM
    from jojo.infer.chat import chat_repl
    from jojo.infer.engine import SamplingConfig

    sc = SamplingConfig(**_sampling(args))  # checked before the model loads
    lm = LM.load(args.checkpoint, args.device)
    label = f"{lm.path} (step {lm.state.get('step', '?')})"
    chat_repl(lm.model, lm.tokenizer, sc, system=args.system, label=label)


def read_prompts(path: str | Path) -> list[str]:
    """prompts.txt: one prompt per non-empty line; prompts.jsonl: {"prompt": ...} (or a JSON string) per line."""
    path = Path(path)
    if not path.is_file():
        raise JojoError(f"prompt file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".json"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JojoError(f'{path}:{n}: not valid JSON ({exc.msg}); one {{"prompt": ...}} per line') from None
            obj = obj.get("prompt") if isinstance(obj, dict) else obj
            if not isinstance(obj, str):
                raise JojoError(f'{path}:{n}: expected {{"prompt": "..."}} or a JSON string')
            prompts.append(obj)
        else:
            prompts.append(line)
    if not prompts:
        raise JojoError(f"{path} holds no prompts")
    return prompts


def cmd_generate(args) -> None:
    from jojo.api import LM
    from jojo.infer.engine import SamplingConfig

    sc = SamplingConfig(**_sampling(args))  # checked before the model loads
    if args.num_samples < 1:
        raise JojoError("--num-samples must be >= 1")
    prompts = read_prompts(args.prompt_file) if args.prompt_file else None
    lm = LM.load(args.checkpoint, args.device)
    if prompts is not None:
        records = [r.record() for r in lm.generate_batch(prompts, **_sampling(args))]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if args.output:
            ensure_dir(Path(args.output).parent)
            Path(args.output).write_text(lines, encoding="utf-8")
            print(f"{len(records)} completions -> {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(lines)
        return
    if args.interactive:
        return _generate_interactive(lm, sc, args)
    generator = lm.generator.generator(args.seed)  # one random stream over all the samples of a run
    samples = [_generate_one(lm, args.prompt or "", sc, args, i, generator) for i in range(args.num_samples)]
    if args.output:
        sep = "\n\n" + "-" * 40 + "\n\n"
        ensure_dir(Path(args.output).parent)
        Path(args.output).write_text(sep.join(samples) + "\n", encoding="utf-8")
        print(f"samples -> {args.output}", file=sys.stderr)


def _generate_one(lm, prompt: str, sc, args, i: int, generator=None) -> str:
    gen = lm.generator
    ids = gen.prompt_ids(prompt)
    if len(ids) >= lm.config.block_size:
        raise JojoError(
            f"the prompt is {len(ids)} tokens but the model's context is {lm.config.block_size}; shorten the prompt"
        )
    if args.num_samples > 1:
        print(f"--- sample {i + 1} ---", flush=True)
    if not args.no_stream:
        print(prompt, end="", flush=True)
    pieces = []
    for piece in gen.stream(ids, sc, generator=generator, nonstop=args.nonstop):
        pieces.append(piece)
        if not args.no_stream:
            print(piece, end="", flush=True)
    text = prompt + "".join(pieces)
    if args.no_stream:
        print(text, end="")
    print(flush=True)
    return text


def _generate_interactive(lm, sc, args) -> None:
    """A prompt loop: each line typed is continued (Ctrl+D or /quit ends it; Ctrl+C stops one answer)."""
    print("jojo generate: type a prompt, Enter continues it; /quit or Ctrl+D ends", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return
        if prompt.strip() in ("/quit", "/exit"):
            return
        try:
            _generate_one(lm, prompt, sc, args, 0, lm.generator.generator(args.seed))
        except JojoError as exc:
            print(f"({exc})", file=sys.stderr)
        except KeyboardInterrupt:
            print(" [stopped]")


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


def cmd_eval(args) -> None:
    if args.checkpoint == "download":
        from jojo.eval.download import download_tasks

        manifest = download_tasks(args.tasks, args.out or args.data_dir)
        print(f"{len(manifest['tasks'])} task(s) in the manifest; evaluate with: jojo eval CKPT --data-dir DIR")
        return
    from jojo.eval.run import evaluate_checkpoint, format_report, report_json

    report = evaluate_checkpoint(
        args.checkpoint,
        tasks=args.tasks,
        limit=args.limit,
        data=args.data,
        split=args.split,
        text=args.text,
        text_format=args.text_format,
        split_on=_unescape(args.split_on),
        field=args.field,
        stride=args.stride,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        data_dir=args.data_dir,
        chat=args.chat,
        chat_data=args.chat_data,
        generate=args.generate,
        device=args.device,
        dtype=args.dtype,
        progress=sys.stderr.isatty(),
    )
    print(format_report(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report_json(report))
        print(f"report -> {args.output}")


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
        prefill_chunk=args.prefill_chunk,
        threads=args.threads,
        cors_origins=tuple(args.cors_origin),
        device=args.device,
        model_name=args.model_name,
        stream_interval=args.stream_interval,
        stream_chunk_rate=args.stream_chunk_rate,
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
        "eval": cmd_eval,
        "serve": cmd_serve,
    }
    return handlers[args.command](args)
