"""Entry point of the main job. Until the HTTP server lands it answers one chat message through
the Python API and prints the reply:

    python launch/serve.py                          # the embedded default model
    python launch/serve.py --model PATH --message "..." --max-tokens 64
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist import LLM, SamplingParams  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local Hugging Face checkpoint directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", default=None, help="a ds_configs/*.json engine configuration")
    parser.add_argument("--dtype", default=None, help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest sequence in tokens")
    parser.add_argument("--message", default="What is the capital of France? Answer in one sentence.",
                        help="the user message to answer")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {k: v for k, v in (("dtype", args.dtype), ("max_model_len", args.max_model_len)) if v is not None}
    llm = LLM(model=args.model, config=args.config, **kwargs)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    output = llm.chat([{"role": "user", "content": args.message}], params)[0].outputs[0]
    print(output.text)
    print(f"[{len(output.token_ids)} tokens, finish_reason={output.finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
