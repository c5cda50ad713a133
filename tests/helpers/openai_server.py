"""A real `vllm serve` for the server tests (one per test module), and an OpenAI client.

`VllmServer(model_dir, extra_args, log_path, env)` is the product's
`vllm_deepthink.apps.processes.Server` with the test settings: the environment's
`bin/vllm` console script (what users run), float32, eager, a small max_model_len,
and `engine_env` plus `env`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_deepthink.apps.processes import AdminCallError, Server, engine_env  # noqa: F401

VLLM_SCRIPT = Path(sys.executable).parent / "vllm"

# One template for the tiny models (they ship none): "role: content" lines.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


class VllmServer(Server):
    def __init__(self, model_dir: str | Path, extra_args: list[str], log_path: str | Path,
                 env: dict[str, str] | None = None, max_model_len: int = 512):
        super().__init__(
            model_dir, ["--dtype", "float32", "--enforce-eager", "--max-model-len",
                        str(max_model_len), "--max-num-seqs", "32", "--seed", "0", *extra_args],
            log_path=log_path, env=engine_env(VLLM_LOGGING_LEVEL="INFO", **(env or {})),
            vllm=[str(VLLM_SCRIPT)])


def openai_client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0,
                         timeout=180.0)
