"""lm-evaluation-harness plug-in: a Jojo checkpoint as an lm-eval model named `jojo`, so its hundreds of tasks
run on a checkpoint or run directory without converting it.

    pip install 'jojo[lmeval]'
    python -m jojo.eval.harness --model jojo --model_args path=runs/tiny --tasks hellaswag,arc_easy --limit 100

`python -m jojo.eval.harness ARGS` is `lm_eval ARGS` with the `jojo` model registered: lm-eval 0.4 finds models
only in its own registry (it has no plug-in discovery), and importing this module adds `jojo` to it. From
Python:

    import jojo.eval.harness  # registers "jojo"
    import lm_eval
    lm_eval.simple_evaluate(model="jojo", model_args="path=runs/tiny", tasks=["hellaswag"])

model_args: `path` (or `pretrained`): checkpoint or run directory; `dtype` (float32 | bfloat16 | auto);
`max_gen_toks` (256). lm-eval's own flags give the device (`--device cpu`; its default, cuda:0, falls back to
what there is when no GPU is present) and `--batch_size` (rows per forward; auto = 32).

Log-likelihoods go through Jojo's engine (`jojo.eval.tasks.score_requests`), which truncates and scores exactly
as lm-eval's `hf` model does (the same token requests: lm-eval's `TemplateLM` tokenizes the pairs), so a task's
figures match those of the checkpoint exported with `jojo export hf`. Rolling log-likelihoods (perplexity
tasks) use lm-eval's own windowing; generation uses Jojo's KV-cached engine, stopping at any `until` string.
"""

from __future__ import annotations

import sys

import torch

from jojo.checkpoint import load_checkpoint
from jojo.device import pick_device, pick_dtype
from jojo.errors import JojoError
from jojo.eval.tasks import score_requests
from jojo.infer.engine import SamplingConfig, generate_stream
from jojo.tokenizer import EOT, render_chat

try:  # the plug-in exists only where lm-eval is installed (the `lmeval` extra)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised where lm-eval is absent
    TemplateLM = None

INSTALL_HINT = "lm-evaluation-harness is not installed; pip install 'jojo[lmeval]' (or pip install lm-eval)"


def _batch_size(value) -> int:
    """lm-eval passes batch_size as an int or a string ('16', 'auto', 'auto:4'); auto means our default."""
    text = str(value).strip().lower()
    return int(text) if text.isdigit() and int(text) > 0 else 32


if TemplateLM is not None:

    @register_model("jojo")
    class JojoLM(TemplateLM):
        """lm-eval's model interface over a Jojo checkpoint."""

        def __init__(
            self,
            path: str | None = None,
            pretrained: str | None = None,
            device: str | None = "auto",
            dtype: str = "float32",
            batch_size=32,
            max_batch_size=None,
            max_gen_toks: int = 256,
            **kwargs,
        ):
            super().__init__()
            checkpoint = path or pretrained
            if not checkpoint:
                raise JojoError("the jojo model needs model_args path=CHECKPOINT (a checkpoint or run directory)")
            device = device or "auto"
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval asks for cuda:0 unless told --device; without a GPU, take what there is
                print(f"jojo: {device} is not available; using {pick_device('auto')}", file=sys.stderr)
                device = "auto"
            self._device = pick_device(device)
            self._dtype = pick_dtype(str(dtype).replace("torch.", ""), self._device)
            self.model, self.tok, self.state = load_checkpoint(checkpoint, self._device)
            self.batch_size = _batch_size(batch_size)
            self._max_gen_toks = int(max_gen_toks)
            self.checkpoint = str(checkpoint)

        # ---- what TemplateLM needs ------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self.tok.eot_id

        @property
        def max_length(self) -> int:
            return self.model.config.block_size

        @property
        def device(self) -> torch.device:
            return self._device

        @property
        def tokenizer_name(self) -> str:
            return f"jojo-{self.tok.hash}"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tok.encode(string)

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tok.decode(tokens if isinstance(tokens, list) else [tokens])

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            scores = score_requests(
                self.model,
                [(ctx, cont) for _, ctx, cont in requests],
                batch_size=self.batch_size,
                device=self._device,
                dtype=self._dtype,
                progress=not disable_tqdm,
            )
            out = []
            for (request, _, _), s in zip(requests, scores):
                answer = (s.logprob, s.greedy)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                out.append(answer)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for ctx, cont in map(
                    make_disjoint_window,
                    get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.eot_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                ):
                    windows.append((ctx, cont))
                    owner.append(i)
            scores = score_requests(
                self.model, windows, batch_size=self.batch_size, device=self._device, dtype=self._dtype,
                progress=not disable_tqdm,
            )  # fmt: skip
            totals = [0.0] * len(requests)
            for i, s in zip(owner, scores):
                totals[i] += s.logprob
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                text = self._generate(context, dict(gen_kwargs or {}))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

        def _generate(self, context: str, kwargs: dict) -> str:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if EOT not in until:
                until.append(EOT)
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self._max_gen_toks)))
            max_new = max(1, min(max_new, self.max_length - 1))
            do_sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 0.0)) if do_sample else 0.0
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-(self.max_length - max_new) :]  # keep the end of a long prompt, room for the answer
            sc = SamplingConfig(max_tokens=max_new, temperature=temperature, top_p=float(kwargs.get("top_p", 1.0)))
            generated: list[int] = []
            text = ""
            for token in generate_stream(self.model, ids, sc, self.tok.vocab_size, {self.eot_token_id}):
                generated.append(token)
                text = self.tok.decode(generated)
                if any(stop and stop in text for stop in until):
                    break
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            return text

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return render_chat(chat_history, add_generation_prompt=add_generation_prompt)


def main(argv: list[str] | None = None) -> int:
    """`python -m jojo.eval.harness ARGS`: lm-eval's command line with the `jojo` model registered."""
    if TemplateLM is None:
        print(f"jojo: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except JojoError as exc:
        print(f"jojo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
