"""The design textgen replaces: transformers.pipeline behind a plain HTTP handler, one request at a time.

    python bench/baseline_server.py MODEL_DIR --port 3100

POST /generate {"prompt", "max_new_tokens", "temperature", "top_p", "do_sample"} -> {"generated_text", ...}
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
from transformers import pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = pipeline("text-generation", model=args.model, device="cpu")
    tokenizer = generator.tokenizer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # readiness
            self._reply(200, {"status": "ready"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            sample = body.get("temperature", 0.7) > 0
            kwargs = dict(
                max_new_tokens=body.get("max_new_tokens", 50), do_sample=sample, return_full_text=False
            )
            if sample:
                kwargs.update(temperature=body["temperature"], top_p=body.get("top_p", 0.9))
            if body.get("ignore_eos"):
                kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            start = time.perf_counter()
            text = generator(body["prompt"], pad_token_id=tokenizer.eos_token_id, **kwargs)[0][
                "generated_text"
            ]
            # With ignore_eos exactly max_new_tokens were generated; otherwise count the returned text.
            tokens = kwargs["max_new_tokens"] if body.get("ignore_eos") else len(tokenizer.encode(text))
            self._reply(
                200,
                {
                    "generated_text": text,
                    "usage": {"completion_tokens": tokens},
                    "seconds": time.perf_counter() - start,
                },
            )

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    HTTPServer.request_queue_size = (
        256  # queued, not refused: clients wait their turn as with the old service
    )
    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
