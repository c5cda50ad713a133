"""HTTP routes for runtime adapter management, mirroring vLLM's LoRA routes:

    POST /v1/load_deepthink_adapter    {"adapter_name", "adapter_path", "load_inplace"?}
    POST /v1/unload_deepthink_adapter  {"adapter_name"}

Attached only when VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING is true (patches.openai_server calls
`attach_router` while vLLM builds its FastAPI app). Errors have the OpenAI shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import validate_json_request
from vllm.logger import init_logger

from vllm_deepthink.plugin.serving import flags
from vllm_deepthink.plugin.serving import models as serving

logger = init_logger(__name__)

LOAD_PATH = "/v1/load_deepthink_adapter"
UNLOAD_PATH = "/v1/unload_deepthink_adapter"


class LoadDeepThinkAdapterRequest(BaseModel):
    adapter_name: str
    adapter_path: str
    load_inplace: bool = False


class UnloadDeepThinkAdapterRequest(BaseModel):
    adapter_name: str


def _respond(result: ErrorResponse | str):
    if isinstance(result, ErrorResponse):
        return JSONResponse(content=result.model_dump(), status_code=result.error.code)
    return Response(status_code=200, content=result)


router = APIRouter()


@router.post(LOAD_PATH, dependencies=[Depends(validate_json_request)])
async def load_deepthink_adapter(request: LoadDeepThinkAdapterRequest, raw_request: Request):
    models = raw_request.app.state.openai_serving_models
    result = await serving.load_adapter(models, request.adapter_name, request.adapter_path,
                                        replace=request.load_inplace)
    if not isinstance(result, ErrorResponse):
        logger.info("Loaded Deep-Thinking adapter '%s' from %s", request.adapter_name,
                    request.adapter_path)
    return _respond(result)


@router.post(UNLOAD_PATH, dependencies=[Depends(validate_json_request)])
async def unload_deepthink_adapter(request: UnloadDeepThinkAdapterRequest,
                                   raw_request: Request):
    models = raw_request.app.state.openai_serving_models
    result = await serving.unload_adapter(models, request.adapter_name)
    if not isinstance(result, ErrorResponse):
        logger.info("Unloaded Deep-Thinking adapter '%s'", request.adapter_name)
    return _respond(result)


def attach_router(app: FastAPI) -> None:
    """Add the routes when runtime updating is allowed; otherwise do nothing."""
    if not flags.runtime_updating_allowed():
        return
    logger.warning("Deep-Thinking adapter loading & unloading at runtime is enabled "
                   "(%s). Anyone who can reach the server can load adapters from its "
                   "file system.", flags.RUNTIME_UPDATING_ENV)
    app.include_router(router)
