"""The embedded LLM server: `python -m appliance.inference.llm_server` (the supervisor's `llm` component).

It is llama-cpp-python's own OpenAI-compatible server (`llama_cpp.server`) with the appliance's choices
applied: the chat model is the manifest's (sha256-checked before it is loaded, like every model), it
listens on loopback only, and a new request never interrupts one that is streaming (the library's
default does). One process holds the model, whatever its size; the API processes reach it over HTTP
(`appliance.inference.llm.LLMClient`) and queue for it there. A GPU host runs the same module with
`n_gpu_layers` from the manifest, or any OpenAI-compatible server named by `APPLIANCE_LLM_URL`.
"""

from __future__ import annotations

import sys
from typing import Any

from appliance.inference.embedding import available_cpus
from appliance.inference.manifest import ManifestError, ModelIntegrityError, get_model, verified_path
from appliance.settings import Settings, get_settings


def server_config(settings: Settings) -> tuple[Any, Any]:
    """(ServerSettings, ModelSettings) for llama_cpp.server, from the settings and the manifest."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    spec = get_model(settings.models_dir, name=settings.chat_model, purpose="chat")
    threads = settings.llm_threads or available_cpus()
    model = ModelSettings(
        model=str(verified_path(spec, settings.models_dir)),
        model_alias=spec.name,
        n_ctx=int(spec.params.get("n_ctx", 4096)),
        n_gpu_layers=int(spec.params.get("n_gpu_layers", 0)),
        n_threads=threads,
        n_threads_batch=threads,
        chat_format=spec.params.get("chat_format"),  # None: the template in the GGUF metadata
        flash_attn=bool(spec.params.get("flash_attn", True)),
        verbose=False,
    )
    server = ServerSettings(host="127.0.0.1", port=settings.llm_port, interrupt_requests=False)
    return server, model


def main() -> int:
    import uvicorn
    from llama_cpp.server.app import create_app

    settings = get_settings()
    try:
        server, model = server_config(settings)
    except (ManifestError, ModelIntegrityError, LookupError) as exc:
        print(f"llm: {exc}", file=sys.stderr)
        return 2
    app = create_app(server_settings=server, model_settings=[model])
    print(f"llm: serving {model.model_alias} on {server.host}:{server.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
