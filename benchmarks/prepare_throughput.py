"""`jojo prepare` end to end vs tiktoken's own `encode_ordinary_batch`, on a generated >= 1 GB text file.

    python benchmarks/prepare_throughput.py                 # 1 GB corpus under /tmp/jojo_bench
    python benchmarks/prepare_throughput.py --size-gb 0.1   # a quick look

What is measured (every figure in MB/s of UTF-8 input, 1 MB = 10^6 bytes):
- jojo prepare: the `jojo prepare` command as a user runs it, in a child process: read the file, split it into
  documents, pick each document's split, encode, write the shards and meta.json. Wall clock of the child.
  Peak RSS: the largest single process (getrusage RUSAGE_CHILDREN: the command or one of its workers) and the
  peak of the whole process tree summed (polled from /proc every 50 ms).
- tiktoken encode_ordinary_batch: the same documents, the same tiktoken Encoding (built from the same
  tokenizer.json), `num_threads` = the cores; only the encode calls are timed (the text is read beforehand,
  64 MB of documents at a time; reading and writing are not counted), so it is an encode-only ceiling.
The tokenizer is trained once on the first 20 MB and passed with --tokenizer; one more run lets
`jojo prepare` train its own tokenizer (on its default 100 MB sample) to show the RSS of that path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

EOT = "<|endoftext|>"


def generate(path: Path, size: int) -> None:
    from jojo.data.synthetic import iter_corpus_text

    if path.exists() and path.stat().st_size >= size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    written = 0
    started = time.perf_counter()
    with tmp.open("w", encoding="utf-8") as fh:
        for text in iter_corpus_text(10**10, seed=1):
            piece = f"{text}\n{EOT}\n"
            fh.write(piece)
            written += len(piece.encode("utf-8"))
            if written >= size:
                break
    tmp.replace(path)
    print(f"generated {written / 1e6:,.0f} MB in {time.perf_counter() - started:.0f} s -> {path}", flush=True)


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (kB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_prepare(args: list[str]) -> dict:
    """Run `jojo prepare ARGS` as a child; wall time, its peak single-process RSS (wait4: the command or one
    of its workers, whichever peaked highest) and the peak of the whole tree summed."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jojo.cli", "prepare", *args, "--no-progress"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    done, peak, out = threading.Event(), [0], []

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.05)

    threads = [
        threading.Thread(target=poll, daemon=True),
        threading.Thread(target=lambda: out.append(proc.stdout.read())),
    ]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    if proc.returncode:
        raise SystemExit(f"jojo prepare failed:\n{out[0]}")
    return {"seconds": seconds, "max_rss_mb": usage.ru_maxrss / 1e3, "tree_rss_mb": peak[0] / 1e3, "log": out[0]}


def generate_from(path: Path, size: int, source: Path) -> None:
    """A corpus made of a real text's paragraphs (blank-line separated), repeated, as documents."""
    from jojo.data.sources import iter_texts

    if path.exists() and path.stat().st_size >= size:
        return
    docs = [d + f"\n{EOT}\n" for d in iter_texts(source, split_on="blank")]
    block = "".join(docs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for _ in range(size // len(block) + 1):
            fh.write(block)
    print(f"generated {path.stat().st_size / 1e6:,.0f} MB from {source} -> {path}", flush=True)


def tiktoken_baseline(path: Path, tokenizer_path: Path, threads: int) -> dict:
    from jojo.data.sources import FileSource
    from jojo.tokenizer import Tokenizer

    enc, reason = Tokenizer.load(tokenizer_path).tiktoken_encoding()
    if enc is None:
        raise SystemExit(f"tokenizer not convertible to tiktoken: {reason}")
    encode_s, nbytes, ntokens, batch, size = 0.0, 0, 0, [], 0

    def flush() -> None:
        nonlocal encode_s, ntokens
        started = time.perf_counter()
        out = enc.encode_ordinary_batch(batch, num_threads=threads)
        encode_s += time.perf_counter() - started
        ntokens += sum(len(ids) for ids in out)
        batch.clear()

    for rec in FileSource(path, split_on="eot").records():
        batch.append(rec["text"])
        size += len(rec["text"])
        nbytes += len(rec["text"].encode("utf-8"))
        if size >= 64e6:
            flush()
            size = 0
    flush()
    return {"seconds": encode_s, "bytes": nbytes, "tokens": ntokens}


def parallel_capacity() -> float:
    """How many cores' worth of CPU two busy processes get here (2.0 on two free cores)."""
    code = "import time\nt=time.perf_counter()\nfor i in range(20_000_000): pass\nprint(time.perf_counter()-t)"

    def timed(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    one = timed(1)
    return 2 * one / timed(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/jojo_bench", help="where the corpus and outputs go (never the repo)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument(
        "--text",
        help="build the corpus from this real text file's paragraphs, repeated (default: Jojo's generated corpus)",
    )
    args = ap.parse_args()

    from jojo.data.prepare import default_workers, sample_texts
    from jojo.data.sources import FileSource
    from jojo.tokenizer import train_tokenizer

    work = Path(args.dir)
    if args.text:
        corpus = work / f"{Path(args.text).stem}_{args.size_gb:g}gb.txt"
        generate_from(corpus, int(args.size_gb * 1e9), Path(args.text))
    else:
        corpus = work / f"corpus_{args.size_gb:g}gb.txt"
        generate(corpus, int(args.size_gb * 1e9))
    size_mb = corpus.stat().st_size / 1e6
    cores = default_workers()
    tok_path = work / f"tokenizer_{corpus.stem}.json"
    tok = train_tokenizer(sample_texts(FileSource(corpus), int(20e6)), args.vocab_size)
    tok.save(tok_path)
    print(f"corpus {size_mb:,.0f} MB; tokenizer {tok.vocab_size} tokens; {cores} cores", flush=True)
    capacity = parallel_capacity()
    print(f"two busy processes get {capacity:.2f} cores' worth of CPU", flush=True)

    results = {"corpus_mb": size_mb, "cores": cores, "parallel_capacity": capacity, "vocab_size": tok.vocab_size}
    rows = []
    runs = [
        (f"jojo prepare --tokenizer ({cores} workers)", ["--tokenizer", str(tok_path)]),
        ("jojo prepare --tokenizer --workers 1", ["--tokenizer", str(tok_path), "--workers", "1"]),
        ("jojo prepare (trains its tokenizer on 100 MB)", ["--vocab-size", str(args.vocab_size)]),
    ]
    for name, extra in runs:
        r = run_prepare(["--source", str(corpus), "--out", str(work / "out"), "--overwrite", *extra])
        r["mb_s"] = size_mb / r["seconds"]
        results[name] = {k: v for k, v in r.items() if k != "log"}
        rows.append((name, r["mb_s"], r["seconds"], r["max_rss_mb"], r["tree_rss_mb"]))
        print(f"{name}: {r['mb_s']:.1f} MB/s, {r['seconds']:.1f} s, max RSS {r['max_rss_mb']:.0f} MB "
              f"(tree {r['tree_rss_mb']:.0f} MB)\n{r['log'].strip()}", flush=True)  # fmt: skip
    again = run_prepare(["--source", str(corpus), "--out", str(work / "out"), "--vocab-size", str(args.vocab_size)])
    results["cache hit seconds"] = again["seconds"]
    print(f"re-run on unchanged input: {again['seconds']:.2f} s ({again['log'].splitlines()[0]})", flush=True)
    for threads in sorted({cores, 1}, reverse=True):
        b = tiktoken_baseline(corpus, tok_path, threads)
        name = f"tiktoken encode_ordinary_batch, num_threads={threads} (encode only)"
        mb_s = size_mb / b["seconds"]
        results[name] = {"seconds": b["seconds"], "mb_s": mb_s, "tokens": b["tokens"]}
        rows.append((name, mb_s, b["seconds"], None, None))
        print(f"{name}: {mb_s:.1f} MB/s ({b['seconds']:.1f} s, {b['tokens']:,} tokens)", flush=True)

    ref = results[f"tiktoken encode_ordinary_batch, num_threads={cores} (encode only)"]["mb_s"]
    print(f"\n| {'what':<64} | MB/s | x tiktoken {cores}T | seconds | max RSS MB | tree RSS MB |")
    print(f"|{'-' * 66}|-----:|------:|------:|------:|------:|")
    for name, mb_s, secs, rss, tree in rows:
        rss_s = f"{rss:,.0f}" if rss is not None else "-"
        tree_s = f"{tree:,.0f}" if tree is not None else "-"
        print(f"| {name:<64} | {mb_s:.1f} | {mb_s / ref:.2f} | {secs:.1f} | {rss_s} | {tree_s} |")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
