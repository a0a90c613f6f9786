"""`python -m textgen.model.compile_step [step|attention]`: compile the served model's lone-stream pass (the
default) or its batch's attention of decoding rows (textgen/model/compiled_attention.py) into the compile
cache, in a process of its own (textgen/model/compiled.py starts it when the cache misses).

It loads the model as the server did (the same MODEL_NAME, TEXTGEN_DTYPE resolved, TEXTGEN_THREADS and
TEXTGEN_CACHE_DIR), exports the program, compiles it and writes the package where the server looks for it. Apart,
because compiling in the server cost it twice over: inductor's working memory (random GPT-2: the process's
peak RSS 1827 MB against 1186 without compiling, measured on the AMD EPYC Zen 4), and tracing holds the
GIL, so the engine's steps stalled (one stream: 124-137 ms a token while tracing, against ~11).
Exit status 0 when the package is in the cache. It stops when the server does (`_follow_parent`): a stopped
server's compile would otherwise go on for a minute or two, taking the CPU from whatever runs next.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from textgen.config import Settings
from textgen.model.compiled import PARENT, SCRATCH
from textgen.model.loading import load_model
from textgen.model.native import attention_dtype, compiled_dtype, native_decoding
from textgen.model.source import resolve_model


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else "step"
    if kind not in ("step", "attention"):
        print("usage: python -m textgen.model.compile_step [step|attention]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="textgen.compile_step %(levelname)s %(message)s")
    settings = Settings.from_env(os.environ)
    _follow_parent(settings.cache_dir / "compiled")
    loaded = load_model(settings, resolve_model(settings))
    decoding = native_decoding(loaded.model)
    if decoding is None:
        print(f"{loaded.model_id}: Hugging Face's forward pass decodes this model", file=sys.stderr)
        return 1
    if kind == "step":
        program, tensors = decoding.lone, compiled_dtype(loaded.dtype)
    else:
        program, tensors = decoding.attention, attention_dtype(loaded.model, loaded.dtype)
    if tensors is None:
        print(f"{loaded.dtype} decodes eagerly: nothing to compile", file=sys.stderr)
        return 1
    return 0 if program.compile(tensors, settings.cache_dir) else 1


def _follow_parent(folder: Path) -> None:
    """Exit, dropping this process's half-written package in `folder` and its directory for inductor's
    working files (TEXTGEN_COMPILE_SCRATCH, which the server would have removed), once the server that started
    it (TEXTGEN_COMPILE_PARENT, its pid: this process's parent until it is gone) is gone."""
    parent = os.environ.get(PARENT)
    if parent is None:  # started by hand
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        for partial in folder.glob(f"partial-{os.getpid()}-*"):
            partial.unlink(missing_ok=True)
        if os.environ.get(SCRATCH):
            shutil.rmtree(os.environ[SCRATCH], ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch, name="textgen-follow-parent", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
