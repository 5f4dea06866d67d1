"""Training speed: Jojo's training step vs a Hugging Face transformers model of the same architecture.

Both sides are built from one set of sizes with random init (speed does not depend on what the weights say):
Jojo's `GPT` and `GPT2LMHeadModel` (or `LlamaForCausalLM` with `--family llama`) with SDPA attention, same
vocabulary, layers, width, heads, context, batch and dtype. One training step is what a training loop does:
forward with the loss, backward, gradient clipping, an AdamW step and zero_grad.

- jojo: `GPT(cfg)(x, targets)` under `Runtime.autocast()`, the optimizer from `jojo.train.optim.build_optimizer`
  (AdamW, decay on matrices only): the exact step `jojo.train.loop.fit` runs.
- transformers: `model(input_ids=x, labels=x)` (its own shifted loss) and `torch.optim.AdamW` with its defaults,
  as a hand-written HF training loop runs (`--peer-fused-adamw` gives it torch's fused AdamW as well).

`--peer nanogpt` times the nanoGPT-style loop of `nanogpt_style.py` instead (GPT-2 blocks, float32, AdamW, eager,
as nanoGPT's `train.py` runs on a CPU) against Jojo's *default* step for the same model and batch: the preset's
optimizer (`--preset tiny`: Muon for hidden matrices), `--dtype auto` (bf16 autocast where the CPU has native bf16)
and `system.compile` auto for a long run (compiled on such a CPU; the warm-up line shows the compile time, which
the tokens/s after it do not include).

Timing: `--rounds` rounds after warm-up; in each round both contenders run `--steps` steps back to back, taking
turns (so a slow spell of a shared machine hits both alike); tokens/s per round, median over rounds. MFU is
6N+attention FLOPs per token (`GPT.flops_per_token`, PaLM appendix B) times tokens/s over the GPU's dense
bf16/tf32 peak, printed only where the peak is known (CUDA GPUs in `jojo.train.system.PEAK_FLOPS`).

    python benchmarks/train_throughput.py                     # gpt2 6x384, ctx 256, batch 8, vocab 8192: 13.9M params
    python benchmarks/train_throughput.py --family llama
    python benchmarks/train_throughput.py --preset gpt2-124m --device cuda --dtype bfloat16
    python benchmarks/train_throughput.py --peer nanogpt --preset tiny          # 4x128, batch 16: 1.35M params
    python benchmarks/train_throughput.py --peer nanogpt                        # 6x384, batch 8: 13.9M params
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from jojo.config import ModelConfig, OptimizerConfig, load_config
from jojo.device import pick_device, pick_dtype
from jojo.model import GPT
from jojo.train.optim import build_optimizer
from jojo.train.system import Runtime, peak_flops, resolve_compile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_style import NanoGPT, configure_optimizer  # noqa: E402


def hf_model(cfg: ModelConfig, dtype_name: str):
    """The transformers model of the same architecture, random init, SDPA attention."""
    if cfg.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hc = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.mlp_hidden,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )
        hc._attn_implementation = "sdpa"
        return GPT2LMHeadModel(hc)
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
    )
    hc._attn_implementation = "sdpa"
    return LlamaForCausalLM(hc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", choices=["transformers", "nanogpt"], default="transformers")
    ap.add_argument("--preset", help="take model sizes, batch and optimizer from a Jojo config preset (e.g. tiny)")
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=0, help="rows per step (default: the preset's, else 8)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="Jojo's autocast dtype (default: float32 against transformers, Jojo's own auto against "
                         "the nanoGPT loop, which always runs float32)")  # fmt: skip
    ap.add_argument(
        "--compile",
        choices=["auto", "true", "false"],
        help="compile Jojo's model (default: false against transformers, Jojo's auto against nanoGPT)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--only", choices=["jojo", "peer"], help="time one side only")
    ap.add_argument("--peer-fused-adamw", action="store_true", help="give transformers torch's fused AdamW as well")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nano = args.peer == "nanogpt"
    dtype_name = args.dtype or ("auto" if nano else "float32")
    compile_flag = args.compile or ("auto" if nano else "false")

    if args.preset:
        tc = load_config(args.preset, {"model": {"vocab_size": args.vocab}})
        cfg, batch, opt_cfg = tc.model, args.batch or tc.data.batch_size, tc.optimizer
    else:
        cfg = ModelConfig(
            family=args.family,
            vocab_size=args.vocab,
            block_size=args.ctx,
            n_layer=args.layers,
            n_head=args.heads,
            n_kv_head=args.heads // 2 if args.family == "llama" else None,
            n_embd=args.dim,
            tie_embeddings=True,
        )
        batch, opt_cfg = args.batch or 8, OptimizerConfig()
    opt_cfg = dataclasses.replace(opt_cfg, lr=1e-4)
    if nano and (cfg.family != "gpt2" or not cfg.tie_embeddings or not cfg.bias):
        raise SystemExit("the nanoGPT loop is a GPT-2 (biases, tied embeddings): use --family gpt2")
    device = pick_device(args.device)
    rt = Runtime(device, pick_dtype(dtype_name, device, training=True))
    compiled = resolve_compile({"auto": None, "true": True, "false": False}[compile_flag], rt, 10**6)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    contenders = {}
    jojo = GPT(cfg).to(device).train()
    n_params = jojo.num_params()
    flops_tok = jojo.flops_per_token()
    if args.only != "peer":
        jopt = build_optimizer(jojo, opt_cfg, device.type)
        train_model = torch.compile(jojo) if compiled else jojo

        def jojo_step():
            with rt.autocast():
                _, loss = train_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(jojo.parameters(), 1.0)
            jopt.step()
            jopt.zero_grad(set_to_none=True)
            return loss

        contenders["jojo"] = jojo_step
    if args.only != "jojo":
        if nano:
            peer = NanoGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.n_head).to(device).train()
            popt = configure_optimizer(peer, 1e-4)
        else:
            peer = hf_model(cfg, dtype_name).to(device).train()
            extra = {"fused": True} if args.peer_fused_adamw else {}
            popt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **extra)
        n_peer = sum(p.numel() for p in peer.parameters())
        assert n_peer == n_params, f"parameter counts differ: jojo {n_params:,} vs {args.peer} {n_peer:,}"
        peer_autocast = (lambda: contextlib.nullcontext()) if nano else rt.autocast

        def peer_step():
            with peer_autocast():
                loss = peer(x, y)[1] if nano else peer(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
            popt.step()
            popt.zero_grad(set_to_none=True)
            return loss

        contenders[args.peer] = peer_step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens = batch * cfg.block_size
    peer_dtype = "float32" if nano else str(rt.dtype).replace("torch.", "")
    print(
        f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, ctx {cfg.block_size}, vocab {cfg.vocab_size}: "
        f"{n_params / 1e6:.2f}M params; batch {batch} ({tokens} tokens/step), {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
        f"jojo: {str(rt.dtype).replace('torch.', '')}, {'compiled' if compiled else 'eager'}, optimizer "
        f"{opt_cfg.name}; {args.peer}: {peer_dtype}, eager, AdamW"
    )
    for name, fn in contenders.items():  # warm-up: allocator, oneDNN primitives, optimizer state, compiling
        t0 = time.perf_counter()
        for _ in range(2):
            fn()
        sync()
        print(f"{name:>13}: warm-up (2 steps{', compiling' if name == 'jojo' and compiled else ''}) "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = fn()
            loss.item()
            sync()
            rates[name].append(args.steps * tokens / (time.perf_counter() - t0))
    peak = peak_flops(device, rt.dtype)
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in rates.items():
        mfu = f", MFU {100 * flops_tok * med[name] / peak:.1f}%" if peak else ""
        print(f"{name:>13}: {med[name]:,.0f} tokens/s (rounds: {', '.join(f'{r:,.0f}' for r in v)}){mfu}")
    if len(med) == 2:
        # Per-round ratios: both sides ran back to back, so a slow spell of a shared machine cancels out.
        ratios = [a / b for a, b in zip(rates["jojo"], rates[args.peer])]
        print(
            f"jojo / {args.peer}: {statistics.median(ratios):.2f}x (median of per-round ratios; range "
            f"{min(ratios):.2f}-{max(ratios):.2f}; ratio of medians {med['jojo'] / med[args.peer]:.2f}x)"
        )


if __name__ == "__main__":
    main()
