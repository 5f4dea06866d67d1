"""Jojo models in the ecosystem: Hugging Face folders out and in, GGUF out, and the Hub.

- `hf`:   `export_hf` writes a folder `transformers` loads with no custom code (GPT2LMHeadModel or
          LlamaForCausalLM); `import_hf` turns such a folder back into a Jojo checkpoint.
- `gguf`: `export_gguf` writes one .gguf file for llama.cpp and Ollama (f32, f16 or q8_0).
- `hub`:  `upload` converts and pushes to the Hugging Face Hub (or only converts, with dry_run).
- `card`: the model card (README.md) written beside the weights.

Every mapping between names is a table plus a parity test (tests/test_export.py): our logits equal
transformers' to 1e-4 in fp32, and export -> import -> export is bit-exact. Only safetensors and JSON are
read; a PyTorch pickle is opened with `weights_only=True` or refused.
"""
