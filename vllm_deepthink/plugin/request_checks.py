"""The checks of every client value of the plugin, in the frontend process.

Scheduler and worker code only reads what rewrite.py wrote. A client cannot write our
kv_transfer_params entry, an extra_args key of the plugin other than the two documented
ones, a malformed scoring position, or a cache salt in the `deepthink:` namespace; an
adapter and a LoRA never serve one request together. Errors are AdapterRequestError
(UnknownAdapterError for a name nobody serves, AdapterLookupUnavailable when a resolver
cannot answer now), which patches/engine.py raises as vLLM's client errors (HTTP 400 /
404) and serving/models.py as OpenAI errors. Nothing here imports vLLM.
"""

from __future__ import annotations

from typing import Any

from vllm_deepthink.plugin.protocol import (
    ADAPTER_ARG,
    PARAMS_KEY,
    RESERVED_ARG_PREFIX,
    SALT_NAMESPACE,
    SCORED_FROM_ARG,
    AdapterNameError,
    check_adapter_name,
    has_transfer_entry,
    is_int,
    is_reserved_salt,
)


class AdapterRequestError(ValueError):
    """A request for an adapter that cannot be served, or a request field of the
    plugin that is not valid; the message says why. `param` names the request field.
    patches/engine.py raises it to vLLM as a validation error (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapterError(AdapterRequestError):
    """A request names an adapter nobody serves (HTTP 404)."""


class AdapterLookupUnavailable(AdapterRequestError):
    """A resolver could not answer now (its hub is rate-limited or down): HTTP 503 over
    the OpenAI server; the name is asked again after the resolver's short error ttl."""


def adapter_name(params: Any) -> str | None:
    """The adapter a SamplingParams selects, or None."""
    extra = getattr(params, "extra_args", None) or {}
    if ADAPTER_ARG not in extra:
        return None
    return checked_name(extra[ADAPTER_ARG])


def checked_name(name: Any) -> str:
    """`name` if it can name an adapter, else AdapterRequestError (param `model`)."""
    try:
        return check_adapter_name(name)
    except AdapterNameError as exc:
        raise AdapterRequestError(str(exc), param="model") from None


def reserved_client_field(vllm_xargs: Any, kv_transfer_params: Any, cache_salt: Any
                          ) -> AdapterRequestError | None:
    """The error for an HTTP request whose client-controlled fields reach into the
    plugin's namespace, or None. Over HTTP the adapter is chosen by `model` only:
    every `deepthink_*` key of vllm_xargs is refused, as are our kv_transfer_params
    entry and cache salts in the `deepthink:` namespace."""
    if isinstance(vllm_xargs, dict):
        for key in vllm_xargs:
            if isinstance(key, str) and key.startswith(RESERVED_ARG_PREFIX):
                return AdapterRequestError(
                    f"vllm_xargs key {key!r} is reserved for vllm-deepthink: over HTTP a "
                    f"Deep-Thinking adapter is chosen by `model` (its name, as listed by "
                    f"/v1/models), never by vllm_xargs. Remove {key!r}.", param="vllm_xargs")
    for params in (kv_transfer_params,
                   vllm_xargs.get("kv_transfer_params") if isinstance(vllm_xargs, dict)
                   else None):
        if has_transfer_entry(params):
            return _forged_entry_error()
    if is_reserved_salt(cache_salt):
        return _reserved_salt_error(cache_salt)
    return None


def check_request(prompt: Any, params: Any, lora_request: Any = None) -> str | None:
    """Validate the plugin's fields of a request to an engine that runs the DeepThink
    connector; return the adapter name it selects (None: a plain request).

    Refused (AdapterRequestError): our kv_transfer_params entry (only the rewrite
    writes it), kv_transfer_params that is not an object, a `deepthink_*` extra_args
    key other than ADAPTER_ARG and SCORED_FROM_ARG, a SCORED_FROM_ARG that is not an
    int >= 0, a cache salt in the `deepthink:` namespace, an adapter together with a
    LoRA. This is where client values are parsed, so that scheduler and worker code
    never has to.
    """
    extra = getattr(params, "extra_args", None) or {}
    kv_params = extra.get("kv_transfer_params")
    if kv_params is not None and not isinstance(kv_params, dict):
        raise AdapterRequestError(
            f"kv_transfer_params must be a JSON object, found {type(kv_params).__name__} "
            f"{kv_params!r:.60}", param="kv_transfer_params")
    if has_transfer_entry(kv_params):
        raise _forged_entry_error()
    for key in extra:
        if (isinstance(key, str) and key.startswith(RESERVED_ARG_PREFIX)
                and key not in (ADAPTER_ARG, SCORED_FROM_ARG)):
            raise AdapterRequestError(
                f"unknown vllm-deepthink extra_args key {key!r}; the plugin reads "
                f"{ADAPTER_ARG!r} (offline API: vllm_deepthink.sampling_params(adapter=...)) "
                f"and {SCORED_FROM_ARG!r} (the vLLM scorer) only.", param="extra_args")
    if SCORED_FROM_ARG in extra:
        value = extra[SCORED_FROM_ARG]
        if not (is_int(value) and value >= 0):
            raise AdapterRequestError(
                f"extra_args[{SCORED_FROM_ARG!r}] must be an int >= 0 (the first prompt "
                f"position a scoring request scores), found {value!r:.60}",
                param=SCORED_FROM_ARG)
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if is_reserved_salt(salt):
        raise _reserved_salt_error(salt)
    name = adapter_name(params)
    if name is not None and lora_request is not None:
        raise AdapterRequestError(
            f"a request cannot use a LoRA adapter ({getattr(lora_request, 'lora_name', '?')!r}) "
            f"and the Deep-Thinking adapter {name!r} together: the adapter's K/V were "
            f"computed with the base model's weights. Send it without one of them.",
            param="model")
    return name


def _forged_entry_error() -> AdapterRequestError:
    return AdapterRequestError(
        f"kv_transfer_params[{PARAMS_KEY!r}] is reserved for vllm-deepthink (it names the "
        f"files the workers load); select an adapter by `model` over HTTP or with "
        f"vllm_deepthink.sampling_params(adapter=NAME) offline.", param="kv_transfer_params")


def _reserved_salt_error(salt: str) -> AdapterRequestError:
    return AdapterRequestError(
        f"cache_salt {salt[:40]!r} is in the {SALT_NAMESPACE!r} namespace, which is reserved "
        f"for the prefix-cache blocks of Deep-Thinking adapters; use a salt that does not "
        f"start with {SALT_NAMESPACE!r} (an adapter request's own salt is combined with "
        f"the adapter's).", param="cache_salt")
