"""GPU training throughput: one GPT-2 124M training step at context 1024, bf16 autocast + torch.compile, as
`jojo.train.loop.fit` runs it (forward with the loss, backward, clip at 1.0, fused AdamW, zero_grad).

Reports tokens/s, MFU, peak memory and compile time. MFU = `GPT.flops_per_token()` x tokens/s / peak, with
flops_per_token = 6 N_matmul + 12 L C T (PaLM, appendix B) and the peak from `jojo.train.system.PEAK_FLOPS`
(dense bf16 datasheet figure of the GPU; None on a GPU missing from the table, and on CPU).

Timing: the first step (it compiles) is timed on its own; `--warmup` more steps; then `--steps` steps between
two CUDA synchronisations. compile_s = first step - one steady step. The data is one fixed random batch already
on the device (throughput does not depend on the values). Peak memory: torch.cuda.max_memory_allocated over the
timed steps (optimizer state included).

    python benchmarks/gpu_train.py                                  # gpt2-124m, batch 16, bf16, compile
    python benchmarks/gpu_train.py --batch 32 --json out.json
    python benchmarks/gpu_train.py --device cpu --layers 2 --dim 64 --heads 2 --ctx 32 --vocab 256 --no-compile
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jojo.config import ModelConfig, OptimizerConfig, SystemConfig, load_config
from jojo.model import GPT
from jojo.train.optim import build_optimizer
from jojo.train.system import gpu_model, peak_flops, setup_runtime

MFU_TARGET = 0.50  # issue 16: nanoGPT / llm.c reach ~50% for GPT-2 124M on A100/H100 in bf16


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-124m", help="model sizes from this Jojo preset")
    ap.add_argument("--layers", type=int, help="override the preset's n_layer")
    ap.add_argument("--dim", type=int, help="override n_embd")
    ap.add_argument("--heads", type=int, help="override n_head")
    ap.add_argument("--ctx", type=int, help="override block_size (the preset's: 1024)")
    ap.add_argument("--vocab", type=int, help="override vocab_size (the preset's: 50304)")
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    ap.add_argument("--json", help="also write the results to this file")
    return ap.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    c = load_config(args.preset).model
    sizes = {"n_layer": args.layers, "n_embd": args.dim, "n_head": args.heads, "block_size": args.ctx}
    sizes["vocab_size"] = args.vocab
    fields = {k: v for k, v in vars(c).items() if k not in ("mlp_hidden", "n_kv_head")}  # re-derived from sizes
    fields.update({k: v for k, v in sizes.items() if v})
    return ModelConfig(**fields)


def flash_available(head_dim: int, dtype: torch.dtype) -> bool | None:
    """Can SDPA run FlashAttention for this head size and dtype on this GPU (None off CUDA)?"""
    if not torch.cuda.is_available():
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 128, head_dim, device="cuda", dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def main(argv=None) -> dict:
    args = parse(argv)
    cfg = model_config(args)
    rt = setup_runtime(SystemConfig(device=args.device, dtype=args.dtype))  # TF32 on, as `jojo train` does
    cuda = rt.device.type == "cuda"
    compile_model = cuda if args.compile is None else args.compile
    torch.manual_seed(0)
    model = GPT(cfg).to(rt.device).train()
    train_model = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4), rt.device.type)
    scaler = rt.grad_scaler()
    data = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1), device=rt.device)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> torch.Tensor:
        with rt.autocast():
            loss = train_model(x, y)[1]  # as the loop: the logits are not kept through backward
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            for opt in optimizer.optimizers:
                scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            for opt in optimizer.optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(rt.device)

    tokens = args.batch * cfg.block_size
    name = torch.cuda.get_device_name(rt.device) if cuda else "cpu"
    print(
        f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, ctx {cfg.block_size}, vocab {cfg.vocab_size}: "
        f"{model.num_params() / 1e6:.1f}M params; batch {args.batch} ({tokens:,} tokens/step); "
        f"{str(rt.dtype).replace('torch.', '')}, compile {compile_model}; {name}; torch {torch.__version__}",
        flush=True,
    )
    sync()
    t0 = time.perf_counter()
    first_loss = float(step())  # compiles
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    last_loss = float(loss)  # reads the loss once, after the timed steps
    sync()
    elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps
    tps = tokens / step_s
    flops_tok = model.flops_per_token()
    peak = peak_flops(rt.device, rt.dtype)
    mfu = flops_tok * tps / peak if peak else None
    graphs = None
    if compile_model:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    res = {
        "device": str(rt.device.type),
        "gpu": name if cuda else None,
        "gpu_model": gpu_model(name) if cuda else None,
        "torch": torch.__version__,
        "dtype": str(rt.dtype).replace("torch.", ""),
        "compile": compile_model,
        "params": model.num_params(),
        "batch": args.batch,
        "ctx": cfg.block_size,
        "vocab": cfg.vocab_size,
        "tokens_per_step": tokens,
        "steps": args.steps,
        "step_ms": 1000 * step_s,
        "tokens_per_second": tps,
        "flops_per_token": flops_tok,
        "peak_flops": peak,
        "mfu": mfu,
        "mfu_target": MFU_TARGET,
        "peak_memory_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30 if cuda else None,
        "first_step_s": first_step_s,
        "compile_s": max(first_step_s - step_s, 0.0) if compile_model else None,
        "compiled_graphs": graphs,
        "flash_attention": flash_available(cfg.head_dim, rt.dtype),
        "loss_first": first_loss,
        "loss_last": last_loss,
    }
    mfu_text = f"MFU {100 * mfu:.1f}% (target {100 * MFU_TARGET:.0f}%)" if mfu is not None else "MFU n/a (peak unknown)"
    mem = f", peak memory {res['peak_memory_gib']:.1f} GiB" if cuda else ""
    comp = f", compile {res['compile_s']:.1f} s" if compile_model else ""
    print(f"{tps:,.0f} tokens/s, {1000 * step_s:.1f} ms/step, {mfu_text}{mem}{comp}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"results -> {args.json}")
    return res


if __name__ == "__main__":
    main()
