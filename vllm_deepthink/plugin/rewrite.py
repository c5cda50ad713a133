"""The rewrite of an adapter request into a plain vLLM request.

A request for adapter `name` (its AdapterInfo, registry.py) becomes one the rest of the
engine serves without a registry:

    prompt token ids    = L placeholder ids (the adapter's demo ids) + query ids
    cache_salt          = "deepthink:<name>:<weights digest>[:<user salt>]"
    kv_transfer_params  = {"deepthink": {name, path, digest, prefix_len, frontend}}

The salt keeps adapter blocks apart from every other prompt in the prefix cache;
the digest makes a rebuilt adapter (same name, new weights) a new cache entry. `wrote`
tells the output side which entries this process's frontend wrote. Nothing here
imports vLLM.
"""

from __future__ import annotations

import copy
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

from vllm_deepthink.plugin.protocol import PARAMS_KEY, TransferEntry
from vllm_deepthink.plugin.registry import FRONTEND_TOKEN, AdapterInfo
from vllm_deepthink.plugin.request_checks import AdapterRequestError

_FRONTEND_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")


def query_token_ids(prompt: Any, tokenizer: Any) -> tuple[list[int], str | None, str | None]:
    """(query ids, query text or None, user cache salt or None) of a prompt.

    Text is tokenized WITHOUT special tokens (the adapter is the whole prefix); a
    prompt given as token ids is used as given. `prompt` is a rendered engine
    input (dict with "type") or a raw prompt (str or dict). A rendered text prompt
    (the renderer tokenized it with its defaults, which may add BOS) loses the
    special tokens the renderer put before the text; the ids after them are kept
    (beam search re-submits the rendered ids plus the grown ones; truncation keeps a
    part). When the text cannot tokenize to those special tokens itself (it does not
    contain their strings) that needs no tokenization (_special_frame); otherwise the
    ids must start with the text's own tokenization to lose its special start.
    """
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise AdapterRequestError(
            f"adapter requests take a text or token-id prompt, found {type(prompt).__name__}",
            param="prompt")
    kind = prompt.get("type")
    if kind is not None and kind != "token":
        raise AdapterRequestError(
            f"adapter requests take text or token ids; a {kind!r} prompt (embeddings, "
            f"multimodal or encoder-decoder) cannot follow a Deep-Thinking prefix.",
            param="prompt")
    if "prompt_embeds" in prompt or "multi_modal_data" in prompt:
        raise AdapterRequestError(
            "adapter requests take text or token ids, not embeddings or multimodal data",
            param="prompt")
    text = prompt.get("prompt")
    salt = prompt.get("cache_salt")
    ids = prompt.get("prompt_token_ids")
    if ids is None:
        if not isinstance(text, str):
            raise AdapterRequestError("an adapter request needs a text or token-id prompt",
                                      param="prompt")
        ids = _encode(tokenizer, text, add_special_tokens=False)
    elif isinstance(text, str) and tokenizer is not None:
        ids = list(ids)
        frame = _special_frame(tokenizer)
        if kind == "token" and frame is not None and frame.added_by_renderer(text):
            # Rendered: the frame's tokens at the start are the renderer's, the rest
            # the text's own ids.
            if ids[:len(frame.before)] == frame.before:
                ids = ids[len(frame.before):]
        else:
            # Ids that do not start with the text's own tokenization (user token ids,
            # truncation) are kept as given.
            plain = _encode(tokenizer, text, add_special_tokens=False)
            with_special = None if frame is None else [*frame.before, *plain, *frame.after]
            if with_special is None or ids[:len(with_special)] != with_special:
                with_special = _encode(tokenizer, text, add_special_tokens=True)
            if ids[:len(with_special)] == with_special:
                ids = plain + ids[len(with_special):]
    elif kind == "token" and tokenizer is not None and list(ids) == _empty_ids(tokenizer):
        # The renderer drops the text of an empty prompt and keeps only the special
        # tokens it added (e.g. [BOS]): an empty text query.
        ids = []
    ids = [int(i) for i in ids]
    if not ids:
        raise AdapterRequestError(
            "the query has zero tokens; an adapter request needs at least one query "
            "token after the adapter prefix (the engine must compute one position).",
            param="prompt")
    return ids, text if isinstance(text, str) else None, salt


@dataclass(frozen=True)
class _Frame:
    """The special tokens `tokenizer` puts around a text's own ids: `before` and `after`;
    `empty`: its ids of the empty text. `before_strings`: the (lowercased) strings of
    `before`'s tokens when each is an added token (its id comes from nothing but its
    string) and `after` is empty; else None."""

    before: list[int]
    after: list[int]
    empty: list[int]
    before_strings: tuple[str, ...] | None

    def added_by_renderer(self, text: str) -> bool:
        """Whether `before` at the start of a rendered prompt of `text` can only be the
        renderer's: the text holds none of its tokens' strings, so its own ids cannot
        hold them."""
        if self.before_strings is None:
            return False
        lowered = text.lower()  # an added token may match normalized (lowercased) text
        return not any(s in lowered for s in self.before_strings)


_FRAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FRAME_PROBE = "Review: a probe of the special tokens\nAnswer:"


def _special_frame(tokenizer: Any) -> _Frame | None:
    """`tokenizer`'s _Frame, from one probe text, remembered per tokenizer; None when its
    special tokens do not frame the plain ids (or it cannot be remembered)."""
    try:
        return _FRAMES[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: the caller tokenizes, as before
        return None
    plain = _encode(tokenizer, _FRAME_PROBE, add_special_tokens=False)
    full = _encode(tokenizer, _FRAME_PROBE, add_special_tokens=True)
    frame = None
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            before, after = full[:i], full[i + len(plain):]
            added = {int(v): k for k, v in _added_vocab(tokenizer).items()}
            strings = (tuple(added[t].lower() for t in before)
                       if not after and all(t in added for t in before) else None)
            frame = _Frame(before, after, _encode(tokenizer, "", add_special_tokens=True),
                           strings)
            break
    _FRAMES[tokenizer] = frame
    return frame


def _added_vocab(tokenizer: Any) -> dict[str, int]:
    try:
        return dict(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        return {}


def _empty_ids(tokenizer: Any) -> list[int]:
    frame = _special_frame(tokenizer)
    return frame.empty if frame is not None else _encode(tokenizer, "",
                                                         add_special_tokens=True)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise AdapterRequestError(
            "a text prompt needs the tokenizer (the engine was started with "
            "skip_tokenizer_init); send token ids instead", param="prompt")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def rewrite_request(info: AdapterInfo, prompt: Any, params: Any, tokenizer: Any,
                    max_model_len: int) -> tuple[dict[str, Any], Any]:
    """The (engine input, sampling params) that serve `prompt` with adapter `info`.

    Returns a token engine input of placeholder + query ids with the adapter's
    cache salt, and a clone of `params` carrying kv_transfer_params for the
    scheduler and workers.
    """
    query_ids, text, user_salt = query_token_ids(prompt, tokenizer)
    total = info.prefix_len + len(query_ids)
    if total >= max_model_len:
        raise AdapterRequestError(
            f"adapter {info.name!r} occupies {info.prefix_len} positions and the query "
            f"{len(query_ids)}; together {total} leave no room for output within "
            f"max_model_len={max_model_len}. Shorten the query or raise max_model_len.",
            param="prompt")
    engine_input: dict[str, Any] = {
        "type": "token",
        "prompt_token_ids": [*info.placeholder_ids, *query_ids],  # ints (AdapterInfo)
        "cache_salt": info.cache_salt(user_salt),
    }
    if text is not None:
        engine_input["prompt"] = text
    if isinstance(prompt, dict) and "arrival_time" in prompt:
        engine_input["arrival_time"] = prompt["arrival_time"]
    return engine_input, adapter_sampling_params(params, info)


def adapter_sampling_params(params: Any, info: AdapterInfo) -> Any:
    if getattr(params, "prompt_logprob_token_ids", None) is not None:
        raise AdapterRequestError(
            "prompt_logprob_token_ids is not supported with Deep-Thinking adapters; "
            "use prompt_logprobs", param="prompt_logprob_token_ids")
    # A shallow copy whose changed fields are new objects: the caller's params (shared by
    # many prompts) stay untouched, and vLLM deep-copies these next
    # (InputProcessor.process_inputs), so a deep copy here would be a second one.
    params = copy.copy(params)
    extra = dict(params.extra_args or {})
    kv_params = dict(extra.get("kv_transfer_params") or {})
    kv_params[PARAMS_KEY] = info.transfer_params()
    extra["kv_transfer_params"] = kv_params
    params.extra_args = extra
    # The adapter prefix arrives through the prefix-cache path: prompt logprobs
    # must not switch it off (vLLM's default for them). patches/engine.py caps the local
    # hit instead so the query's prompt logprobs are computed.
    params.skip_reading_prefix_cache = False
    return params


def wrote(entry: TransferEntry | None) -> bool:
    """Whether this process's frontend wrote `entry` (so the engine runs our connector).
    The one reader of the entry's `frontend` token: anything but 32 lowercase hex digits
    is not ours (compare_digest raises TypeError on a non-ASCII str)."""
    if entry is None or not isinstance(entry.frontend, str):
        return False
    return bool(_FRONTEND_TOKEN_PATTERN.fullmatch(entry.frontend)) and secrets.compare_digest(
        entry.frontend, FRONTEND_TOKEN)
