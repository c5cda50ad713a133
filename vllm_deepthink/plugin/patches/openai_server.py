"""Patches of vLLM's OpenAI server (`vllm serve`), one function per patch.

The serving logic lives in plugin/serving/ (flags.py, models.py, routes.py); these
functions only plug it in. Applied in every process like the engine patches; the
entrypoint modules are imported inside the functions, so this module stays cheap
to import. Each patch leaves requests for the base model and LoRA adapters, and
servers started without the DeepThink connector, on vLLM's own path.
"""

from __future__ import annotations

from vllm_deepthink.plugin.patches.base import PatchSpec, is_patched, original, replace


def patch_specs() -> tuple[PatchSpec, ...]:
    """PatchSpecs of the OpenAI-server patches (imports vLLM's entrypoint modules)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers import app as app_module
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.v1.engine.async_llm import AsyncLLM

    return (
        PatchSpec(EngineArgs, "add_cli_args", "vllm/engine/arg_utils.py", ("parser",)),
        PatchSpec(EngineArgs, "from_cli_args", "vllm/engine/arg_utils.py", ("args",)),
        PatchSpec(BaseServing, "_check_model", "vllm/entrypoints/serve/engine/serving.py",
                  ("self", "request")),
        PatchSpec(BaseServing, "_maybe_get_adapters",
                  "vllm/entrypoints/serve/engine/serving.py",
                  ("self", "request", "supports_default_mm_loras")),
        PatchSpec(OpenAIServingModels, "show_available_models",
                  "vllm/entrypoints/openai/models/serving.py", ("self",)),
        PatchSpec(OpenAIServingModels, "init_static_loras",
                  "vllm/entrypoints/openai/models/serving.py", ("self",)),
        PatchSpec(OpenAIServingModels, "_check_load_lora_adapter_request",
                  "vllm/entrypoints/openai/models/serving.py", ("self", "request")),
        PatchSpec(AsyncLLM, "add_request", "vllm/v1/engine/async_llm.py",
                  ("self", "request_id", "prompt", "params", "arrival_time", "lora_request",
                   "tokenization_kwargs", "trace_headers", "priority", "data_parallel_rank",
                   "session_id", "prompt_text", "reasoning_ended", "reasoning_parser_kwargs",
                   "kv_hints")),
        PatchSpec(app_module, "register_api_routers", "vllm/entrypoints/launchers/app.py",
                  ("args", "app", "supported_tasks", "model_config")),
    )


def patch_engine_args_add_cli_args() -> None:
    """vllm/engine/arg_utils.py: EngineArgs.add_cli_args.

    Adds --deepthink-adapter, --deepthink-adapter-dir and --deepthink-resident-gib.
    AsyncEngineArgs.add_cli_args loads the general plugins (so this patch) right
    before it calls EngineArgs.add_cli_args: `vllm serve` parses the flags and
    lists them in --help.
    """
    from vllm.engine.arg_utils import EngineArgs

    if is_patched(EngineArgs, "add_cli_args"):
        return
    vllm_add_cli_args = original(EngineArgs, "add_cli_args")

    def add_cli_args(parser):
        from vllm_deepthink.plugin.serving import flags

        return flags.add_cli_args(vllm_add_cli_args(parser))

    replace(EngineArgs, "add_cli_args", add_cli_args, staticmethod)


def patch_engine_args_from_cli_args() -> None:
    """vllm/engine/arg_utils.py: EngineArgs.from_cli_args.

    Every `vllm serve` path (one API server, several, headless) builds its engine
    arguments here: the adapter flags become the connector's kv_transfer_config,
    as api.engine_args(adapters=...) does (serving.flags.apply_adapter_args). An adapter
    that cannot be served stops the command with its reason (exit status 1, no traceback).
    """
    from vllm.engine.arg_utils import EngineArgs

    if is_patched(EngineArgs, "from_cli_args"):
        return
    vllm_from_cli_args = original(EngineArgs, "from_cli_args")

    def from_cli_args(cls, args):
        from vllm_deepthink.format import AdapterFormatError
        from vllm_deepthink.plugin.protocol import AdapterNameError
        from vllm_deepthink.plugin.serving import flags

        engine_args = vllm_from_cli_args(cls, args)
        try:
            return flags.apply_adapter_args(engine_args, args)
        except (AdapterFormatError, AdapterNameError) as exc:
            # A bad adapter or name on the command line: the message says which and why;
            # exit as argparse does, without a traceback through vLLM's launcher.
            raise SystemExit(f"vllm serve: error: {exc}") from None

    replace(EngineArgs, "from_cli_args", from_cli_args, classmethod)


def patch_serving_check_model() -> None:
    """vllm/entrypoints/serve/engine/serving.py: BaseServing._check_model.

    The check every OpenAI endpoint runs before it renders a request (and before a
    stream starts). First the plugin's reserved fields (serving.reserved_field_error:
    `deepthink_*` vllm_xargs keys, our kv_transfer_params entry, `deepthink:` cache
    salts are a 400). Then a served adapter's name is a valid `model`; a name vLLM does
    not know is offered to the adapter resolvers (--deepthink-adapter-dir: DIR/NAME);
    any other unknown name still gets vLLM's 404, whose message then also lists the
    adapters. Without our connector: vLLM's check only.
    """
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if is_patched(BaseServing, "_check_model"):
        return
    vllm_check_model = BaseServing._check_model

    async def _check_model(self, request):
        from vllm_deepthink.plugin.serving import models as serving

        reserved = serving.reserved_field_error(self.models, request)
        if reserved is not None:
            if self.request_logger is not None:
                self.request_logger.log_request_body(request)
            return reserved
        name = getattr(request, "model", None)
        if serving.is_adapter_model(self.models, name):
            if self.request_logger is not None:
                self.request_logger.log_request_body(request)
            return None
        error = await vllm_check_model(self, request)
        if error is None:
            return None
        resolved = await serving.resolve_adapter_model(self.models, name)
        if resolved is True:
            if self.request_logger is not None:
                self.request_logger.log_request_body(request)
            return None
        return resolved or serving.name_served_adapters(self.models, error)

    replace(BaseServing, "_check_model", _check_model)


def patch_serving_maybe_get_adapters() -> None:
    """vllm/entrypoints/serve/engine/serving.py: BaseServing._maybe_get_adapters.

    An adapter's name resolves to serving.AdapterModelRequest, a LoRARequest
    stand-in: the serving code reports its name as the response's `model`, and
    patch_async_llm_add_request turns it into extra_args before the engine.
    """
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if is_patched(BaseServing, "_maybe_get_adapters"):
        return
    vllm_maybe_get_adapters = BaseServing._maybe_get_adapters

    def _maybe_get_adapters(self, request, supports_default_mm_loras=False):
        from vllm_deepthink.plugin.serving import models as serving

        stand_in = serving.adapter_model_request(self.models, getattr(request, "model", None))
        if stand_in is not None:
            return stand_in
        return vllm_maybe_get_adapters(self, request, supports_default_mm_loras)

    replace(BaseServing, "_maybe_get_adapters", _maybe_get_adapters)


def patch_async_llm_add_request() -> None:
    """vllm/v1/engine/async_llm.py: AsyncLLM.add_request.

    The funnel of every generate call of the OpenAI server (beam search included):
    an AdapterModelRequest passed as lora_request becomes
    extra_args["deepthink_adapter"] (which patch_input_processor then rewrites)
    and never reaches the engine as a LoRA.
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    if is_patched(AsyncLLM, "add_request"):
        return
    vllm_add_request = AsyncLLM.add_request

    async def add_request(self, request_id, prompt, params, arrival_time=None,
                          lora_request=None, *args, **kwargs):
        from vllm_deepthink.plugin.serving import models as serving

        params, lora_request = serving.to_engine_request(params, lora_request)
        return await vllm_add_request(self, request_id, prompt, params, arrival_time,
                                      lora_request, *args, **kwargs)

    replace(AsyncLLM, "add_request", add_request)


def patch_serving_models_list() -> None:
    """vllm/entrypoints/openai/models/serving.py: OpenAIServingModels.show_available_models.

    /v1/models lists each served adapter like a LoRA module: id = name,
    parent = base model, root = adapter path.
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    if is_patched(OpenAIServingModels, "show_available_models"):
        return
    vllm_show_available_models = OpenAIServingModels.show_available_models

    async def show_available_models(self):
        from vllm_deepthink.plugin.serving import models as serving

        model_list = await vllm_show_available_models(self)
        model_list.data.extend(serving.model_cards(self))
        return model_list

    replace(OpenAIServingModels, "show_available_models", show_available_models)


def patch_serving_models_init() -> None:
    """vllm/entrypoints/openai/models/serving.py: OpenAIServingModels.init_static_loras.

    vLLM awaits it in init_app_state, while the server starts and before it accepts
    requests. After vLLM's static LoRAs, the adapter registry is built there in a worker
    thread (serving.build_registry_at_start), not by the first request on the event
    loop; an engine-start adapter that cannot be served stops the server, as a bad
    --lora-modules entry does.
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    if is_patched(OpenAIServingModels, "init_static_loras"):
        return
    vllm_init_static_loras = OpenAIServingModels.init_static_loras

    async def init_static_loras(self):
        from vllm_deepthink.plugin.serving import models as serving

        await vllm_init_static_loras(self)
        await serving.build_registry_at_start(self)

    replace(OpenAIServingModels, "init_static_loras", init_static_loras)


def patch_serving_models_check_lora_load() -> None:
    """vllm/entrypoints/openai/models/serving.py:
    OpenAIServingModels._check_load_lora_adapter_request.

    The check /v1/load_lora_adapter runs before loading: a LoRA may not take the name
    of a Deep-Thinking adapter (served or in an adapter directory), which would shadow
    it silently (serving.lora_name_error, a 400). The other direction (an adapter named
    like a LoRA) is refused by serving.load_adapter. Without our connector: vLLM's check.
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    if is_patched(OpenAIServingModels, "_check_load_lora_adapter_request"):
        return
    vllm_check = OpenAIServingModels._check_load_lora_adapter_request

    async def _check_load_lora_adapter_request(self, request):
        from vllm_deepthink.plugin.serving import models as serving

        error = await vllm_check(self, request)
        return error if error is not None else serving.lora_name_error(self, request)

    replace(OpenAIServingModels, "_check_load_lora_adapter_request",
            _check_load_lora_adapter_request)


def patch_api_routers() -> None:
    """vllm/entrypoints/launchers/app.py: register_api_routers, the name build_app calls.

    Adds POST /v1/load_deepthink_adapter and /v1/unload_deepthink_adapter when
    VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING is true (serving/routes.py), like vLLM's
    LoRA routes. Not an endpoint plugin: those load only when named in
    VLLM_PLUGINS, a second switch next to the environment variable.
    """
    from vllm.entrypoints.launchers import app as app_module

    if is_patched(app_module, "register_api_routers"):
        return
    vllm_register_api_routers = app_module.register_api_routers

    def register_api_routers(args, app, supported_tasks, model_config=None):
        vllm_register_api_routers(args, app, supported_tasks, model_config)
        if "generate" in (supported_tasks or ()):
            from vllm_deepthink.plugin.serving import routes

            routes.attach_router(app)

    replace(app_module, "register_api_routers", register_api_routers)


def apply() -> None:
    """Apply the OpenAI-server patches (idempotent)."""
    patch_engine_args_add_cli_args()
    patch_engine_args_from_cli_args()
    patch_serving_check_model()
    patch_serving_maybe_get_adapters()
    patch_async_llm_add_request()
    patch_serving_models_list()
    patch_serving_models_init()
    patch_serving_models_check_lora_load()
    patch_api_routers()

