"""Import a PEFT prompt-learning adapter as a KV-prefix adapter (needs the `peft` extra).

PEFT's prompt-learning methods act on a causal LM as a per-layer K/V prefix:

- PREFIX_TUNING (with or without `prefix_projection`) and CARTRIDGE hand PEFT's
  prompt-encoder output to the model as `past_key_values` of `num_virtual_tokens`
  (P) positions. Those K are free parameters put straight into the cache (RoPE is never
  applied to them), and PEFT places the query at positions P.. (HF's default after a
  cache of P), for RoPE and learned positions alike: the K/V are taken as PEFT builds
  them, with no rotation or shift.
- PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING (one task id) and CPT concatenate P
  soft-prompt embeddings before the query's embeddings. The virtual tokens sit at
  positions 0..P-1 and never attend to the query, so their K/V are exactly what the
  model computes for those embeddings alone.
- BOS: PEFT puts the virtual tokens before everything, so `tokenizer(text)` gives PEFT
  `[virtual x P][BOS][query]`, while the server tokenizes a text query without special
  tokens. By default (`query_special_tokens="auto"`) the tokenizer's leading special
  ids are run through PEFT's own forward after the virtual tokens and become the last
  prefix positions (`prefix_special_ids`), so the served prefix is P + 1 long for a
  tokenizer that adds BOS. `"none"` imports the virtual tokens alone (for adapters
  trained and used on ids without special tokens).

Every K/V comes out of PEFT's own code (`PeftModel.get_prompt` and
`PeftModelForCausalLM.forward`); no encoder is re-implemented. Weights are read with
safetensors and handed to PEFT as a state dict: PEFT never opens a weights path
(with only `adapter_model.bin` it would unpickle it), and `adapter_config.json` is
read here, so PEFT never falls back to the hub. Imports `peft` only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint
from vllm_deepthink.format.errors import read_json
from vllm_deepthink.format.hf_config import kv_geometry, text_config
from vllm_deepthink.producers.base_model import resolve_model
from vllm_deepthink.producers.kv_import import (
    ImportRefusedError,
    check_model_supported,
    check_prefix_kv,
    file_sha256,
    make_adapter,
)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"

# peft_type -> our method. KV types give PEFT's prefix to the model as past_key_values;
# the others concatenate soft-prompt embeddings before the query.
KV_PREFIX_TYPES = {"PREFIX_TUNING": "peft-prefix-tuning", "CARTRIDGE": "peft-cartridge"}
EMBEDDING_TYPES = {"PROMPT_TUNING": "peft-prompt-tuning", "P_TUNING": "peft-p-tuning",
                   "MULTITASK_PROMPT_TUNING": "peft-multitask-prompt-tuning", "CPT": "peft-cpt"}
PEFT_METHODS = {**KV_PREFIX_TYPES, **EMBEDDING_TYPES}
QUERY_SPECIAL_TOKENS = ("auto", "none")


def _refuse(message: str) -> ImportRefusedError:
    return ImportRefusedError(message)


# ----------------------------------------------------------------- reading (no peft import)

def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter directory, checked for KV-prefix import.

    Refuses non-prompt-learning types (LoRA, IA3, ...), non-causal-LM task types,
    encoder-decoder adapters and `modules_to_save` (which changes base weights).
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / PEFT_CONFIG_NAME
    if not path.is_file():
        raise _refuse(
            f"{adapter_dir}: expected a PEFT adapter directory holding {PEFT_CONFIG_NAME}; "
            f"found none. Pass the directory written by PeftModel.save_pretrained (the hub "
            f"is never asked).")
    cfg = read_json(path, "; save the adapter again.", ImportRefusedError)
    if not isinstance(cfg, dict):
        raise _refuse(f"{path}: expected a JSON object, found {type(cfg).__name__}.")
    peft_type = str(cfg.get("peft_type"))
    if peft_type not in PEFT_METHODS:
        raise _refuse(
            f"{path}: peft_type {peft_type!r} is not a KV-prefix method; expected one of "
            f"{sorted(PEFT_METHODS)}. LoRA, IA3 and other weight adapters change the "
            f"model's weights, not its K/V: serve LoRA with vLLM's own --enable-lora. "
            f"ADAPTION_PROMPT (gated, zero-initialised attention) is not a plain prefix.")
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        raise _refuse(
            f"{path}: task_type {cfg.get('task_type')!r}; expected CAUSAL_LM: only "
            f"decoder-only language-model adapters can be served as a KV prefix (other task "
            f"types have other heads or an encoder).")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise _refuse(
            f"{path}: num_transformer_submodules={cfg['num_transformer_submodules']} "
            f"(an encoder-decoder adapter); expected 1 (decoder-only).")
    if cfg.get("modules_to_save"):
        raise _refuse(
            f"{path}: modules_to_save={cfg['modules_to_save']} also trains base-model "
            f"modules, which a KV prefix cannot carry; expected none. Retrain without "
            f"modules_to_save.")
    return cfg


def peft_weights_path(adapter_dir: str | Path) -> Path:
    """adapter_model.safetensors; a pickle-only adapter is refused (never opened)."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / PEFT_WEIGHTS_NAME
    if weights.is_file():
        return weights
    if (adapter_dir / PEFT_PICKLE_NAME).is_file():
        raise _refuse(
            f"{adapter_dir}: found only {PEFT_PICKLE_NAME}, a pickle; expected "
            f"{PEFT_WEIGHTS_NAME}. Pickles are never loaded here. Convert it once, in an "
            f"environment you trust: PeftModel.from_pretrained(base_model, "
            f"{str(adapter_dir)!r}).save_pretrained(OUT_DIR) writes {PEFT_WEIGHTS_NAME} "
            f"(safetensors is PEFT's default), then import OUT_DIR.")
    raise _refuse(
        f"{adapter_dir}: expected {PEFT_WEIGHTS_NAME} next to {PEFT_CONFIG_NAME}; found "
        f"neither it nor {PEFT_PICKLE_NAME}. Save the adapter with "
        f"PeftModel.save_pretrained.")


def check_peft_geometry(cfg: dict[str, Any], model_config: Any, source: str) -> None:
    """The saved prompt-learning geometry against the base model. PEFT itself does not
    check it: e.g. a 2-layer GPT-2 prefix (2 heads x 64) loads silently on a 3-layer
    Llama with 2 KV heads x 64 and would fill only 2 layers."""
    num_layers, num_kv_heads, head_dim = kv_geometry(model_config)
    hidden = int(text_config(model_config).hidden_size)
    base = cfg.get("base_model_name_or_path")
    hint = (f"The adapter was trained for another model (base_model_name_or_path={base!r}): "
            f"import it with that model.")
    if cfg.get("num_layers") != num_layers:
        raise _refuse(f"{source}: num_layers={cfg.get('num_layers')}; expected the base "
                      f"model's {num_layers} layers. {hint}")
    if cfg["peft_type"] in KV_PREFIX_TYPES:
        expected = (num_kv_heads * head_dim, num_kv_heads)
        found = (cfg.get("token_dim"), cfg.get("num_attention_heads"))
        if found != expected:
            raise _refuse(
                f"{source}: (token_dim, num_attention_heads)={found}; the base model's K/V "
                f"cache needs {expected} (num_kv_heads*head_dim, num_kv_heads). {hint} "
                f"(Prefix-tuning adapters saved by PEFT before its grouped-query-attention "
                f"fix were provisioned with query heads: retrain them.)")
    elif cfg.get("token_dim") != hidden:
        raise _refuse(f"{source}: token_dim={cfg.get('token_dim')}; expected the base model's "
                      f"embedding size {hidden}. {hint}")
    if type(cfg.get("num_virtual_tokens")) is not int or cfg["num_virtual_tokens"] < 1:
        raise _refuse(f"{source}: num_virtual_tokens={cfg.get('num_virtual_tokens')!r}; "
                      f"expected a positive integer.")


def check_peft_tensors(state: dict[str, torch.Tensor], cfg: dict[str, Any], model_config: Any,
                       source: str) -> None:
    """Exactly the tensors PEFT saves for the type, of the expected shape, finite."""
    peft_type = cfg["peft_type"]
    expected = {"prompt_embeddings"}
    if peft_type == "MULTITASK_PROMPT_TUNING":
        expected |= {"prefix_task_cols", "prefix_task_rows"}
    if set(state) != expected:
        raise _refuse(
            f"{source}: tensors {sorted(state)}; expected exactly {sorted(expected)} (what "
            f"PeftModel.save_pretrained writes for {peft_type}). Save the adapter again with "
            f"PeftModel.save_pretrained.")
    num_layers, _, _ = kv_geometry(model_config)
    width = cfg["token_dim"] * (2 * num_layers if peft_type in KV_PREFIX_TYPES else 1)
    shape = (cfg["num_virtual_tokens"], width)
    if tuple(state["prompt_embeddings"].shape) != shape:
        raise _refuse(
            f"{source}: prompt_embeddings has shape {tuple(state['prompt_embeddings'].shape)}; "
            f"{PEFT_CONFIG_NAME} says {list(shape)} (num_virtual_tokens x "
            f"{'num_layers*2*token_dim' if peft_type in KV_PREFIX_TYPES else 'token_dim'}). "
            f"The weights belong to another config.")
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise _refuse(f"{source}: tensor {name!r} has NaN/Inf (or non-float) values; "
                          f"expected finite weights. Retrain or restore the adapter.")


def _same_model_by_name(adapter_base: str, model_name: str) -> bool:
    return Path(adapter_base).name.lower() == Path(model_name).name.lower()


def check_peft_base(cfg: dict[str, Any], model_name: str, fingerprint: ModelFingerprint,
                    source: str) -> None:
    """The adapter's base_model_name_or_path names the base model (`model_name`:
    its resolved directory, or its hub id): the same fingerprint when that path is a
    local checkpoint, else the same model name."""
    adapter_base = cfg.get("base_model_name_or_path")
    if not adapter_base:
        return  # nothing recorded: the geometry checks are all there is
    fix = (f"Import it with that model, or pass `allow_base_mismatch` if {model_name!r} "
           f"holds the same weights under another name.")
    local = Path(adapter_base)
    if local.is_dir() and (local / "config.json").is_file():
        try:
            theirs = ModelFingerprint.from_checkpoint(local)
        except (OSError, ValueError):
            theirs = None
        if theirs is not None:
            diffs = theirs.mismatches(fingerprint)
            if diffs:
                raise _refuse(
                    f"{source}: the adapter was trained on {adapter_base!r}, whose "
                    f"fingerprint differs from the base model {model_name!r} ("
                    + "; ".join(diffs[:3]) + f"). {fix}")
            return
    if not _same_model_by_name(adapter_base, model_name):
        raise _refuse(
            f"{source}: the adapter was trained on base_model_name_or_path="
            f"{adapter_base!r}; found the base model {model_name!r}, another model name. {fix}")


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids `tokenizer(text)` puts before a text (e.g. [BOS]); [] if none."""
    found = None
    for text in ("a", "Review: fine"):
        with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        extra = len(with_special) - len(plain)
        if extra < 0 or with_special[extra:] != plain:
            raise _refuse(
                f"the tokenizer adds special tokens that are not a leading prefix "
                f"({with_special} vs {plain} for {text!r}); expected leading ones only (such "
                f"as BOS). Pass `query_special_tokens` none if the adapter was used on ids "
                f"without special tokens.")
        ids = with_special[:extra]
        if found is not None and ids != found:
            raise _refuse(f"the tokenizer's leading special tokens depend on the text "
                          f"({found} vs {ids}); pass `query_special_tokens` none.")
        found = ids
    return found


# ----------------------------------------------------------------- through PEFT

def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise _refuse(
            f"importing a PEFT adapter needs the `peft` package ({exc}); install it with "
            f"`pip install 'vllm-deepthink[peft]'`.") from None
    return peft


def load_peft_model(base_model, cfg: dict[str, Any], state: dict[str, torch.Tensor]):
    """PeftModelForCausalLM over `base_model` in inference mode, weights from `state`
    (a state dict read with safetensors; PEFT never opens a file)."""
    _import_peft()
    from peft import PeftConfig, PeftModelForCausalLM, set_peft_model_state_dict

    cfg = dict(cfg)
    if cfg["peft_type"] in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"):
        # The weights come from the adapter: a TEXT init would load a tokenizer, and
        # MultitaskPromptEmbedding.__init__ torch.loads (unpickles) a non-safetensors
        # prompt_tuning_init_state_dict_path even in inference mode.
        cfg["prompt_tuning_init"] = "RANDOM"
        cfg.pop("prompt_tuning_init_state_dict_path", None)
    config = PeftConfig.from_peft_type(**cfg)
    config.inference_mode = True  # encoders collapse to the saved (encoder-output) embedding
    model = PeftModelForCausalLM(base_model, config)
    try:
        set_peft_model_state_dict(model, state)
    except RuntimeError as exc:
        raise _refuse(f"the adapter weights do not fit this base model ({exc}).") from None
    # In inference mode the encoder is the saved (encoder-output) embedding itself.
    loaded = model.prompt_encoder[model.active_adapter].embedding.weight
    if not torch.equal(loaded.detach().cpu().float(), state["prompt_embeddings"].float()):
        raise _refuse("PEFT did not load prompt_embeddings into its prompt encoder; this "
                      "PEFT version is not supported (tested with peft 0.21).")
    model.eval()
    return model


@torch.no_grad()
def peft_prefix_kv(peft_model, special_ids: list[int] | tuple[int, ...] = (),
                   task_id: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (keys, values), each [num_kv_heads, P', head_dim] with
    P' = num_virtual_tokens + len(special_ids): what HF's cache holds after PEFT's
    virtual tokens (and `special_ids` after them), computed by PEFT's own code."""
    cfg = peft_model.active_peft_config
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    task_ids = None if task_id is None else torch.tensor([task_id])
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    if special_ids:
        ids = torch.tensor([list(special_ids)], device=device)
        # PEFT's forward: prefix as past_key_values, or soft prompt concatenated before ids.
        out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         task_ids=task_ids)
        cache = out.past_key_values
    elif peft_type in KV_PREFIX_TYPES:
        # The cache PeftModelForCausalLM.forward passes as past_key_values.
        cache = peft_model.get_prompt(batch_size=1, max_cache_len=cfg.num_virtual_tokens)
    else:
        prompts = peft_model.get_prompt(batch_size=1, task_ids=task_ids)   # [1, P, hidden]
        prompts = prompts.to(base.get_input_embeddings().weight.dtype)    # as PEFT's forward
        cache = base(inputs_embeds=prompts, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise _refuse(f"PEFT returned a {type(cache).__name__} for this model, not a "
                      f"transformers Cache; this architecture is not supported.")
    # Cache layers hold [1, num_kv_heads, P', head_dim]; keep [num_kv_heads, P', head_dim].
    keys = [layer.keys[0].detach().clone() for layer in layers]
    values = [layer.values[0].detach().clone() for layer in layers]
    return keys, values


# ----------------------------------------------------------------- the import

def import_peft_adapter(adapter_dir: str | Path, model_dir: str | Path, *,
                        task_id: int | None = None, query_special_tokens: str = "auto",
                        allow_base_mismatch: bool = False, dtype: str = "float32",
                        build_args: dict[str, Any] | None = None) -> DeepThinkAdapter:
    """A KV-prefix adapter equal to the PEFT adapter in `adapter_dir` on `model_dir`.

    Served with a text query (tokenized without special tokens), it reproduces
    `PeftModel(tokenizer(query))` for query_special_tokens="auto", or
    `PeftModel(tokenizer(query, add_special_tokens=False))` for "none". The K/V are
    computed in float32 and stored in `dtype`. Raises ImportRefusedError.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if query_special_tokens not in QUERY_SPECIAL_TOKENS:
        raise _refuse(f"query_special_tokens must be one of {QUERY_SPECIAL_TOKENS}, found "
                      f"{query_special_tokens!r}")
    cfg = read_peft_config(adapter_dir)
    weights = peft_weights_path(adapter_dir)
    config_source = str(adapter_dir / PEFT_CONFIG_NAME)
    peft_type = cfg["peft_type"]
    if peft_type == "MULTITASK_PROMPT_TUNING":
        num_tasks = cfg.get("num_tasks")
        if type(task_id) is not int or not 0 <= task_id < (num_tasks or 0):
            raise _refuse(
                f"{config_source}: a multitask prompt-tuning adapter holds one soft prompt "
                f"per task; `task_id` must be in 0..{(num_tasks or 1) - 1}, found "
                f"{task_id!r}. Import one adapter per task id.")
    elif task_id is not None:
        raise _refuse(f"`task_id` is for MULTITASK_PROMPT_TUNING adapters; this one is "
                      f"{peft_type}.")
    model_dir, model_name = resolve_model(model_dir, error=ImportRefusedError)
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_model_supported(model_config, str(model_dir))
    check_peft_geometry(cfg, model_config, config_source)
    fingerprint = ModelFingerprint.from_checkpoint(model_dir, model_config)
    if not allow_base_mismatch:
        check_peft_base(cfg, model_name, fingerprint, str(adapter_dir))

    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise _refuse(f"{weights}: not a readable safetensors file ({exc}).") from None
    check_peft_tensors(state, cfg, model_config, str(weights))

    peft = _import_peft()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    specials = special_prefix_ids(tokenizer) if query_special_tokens == "auto" else []
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 local_files_only=True).eval()
    peft_model = load_peft_model(base, cfg, state)
    keys, values = peft_prefix_kv(peft_model, specials, task_id)
    fix = "This model's K/V cache cannot hold the adapter's prefix."
    length = check_prefix_kv(keys, values, model_config, f"PEFT prefix of {adapter_dir}", fix)
    if length != cfg["num_virtual_tokens"] + len(specials):
        raise _refuse(f"PEFT produced a prefix of {length} positions; expected "
                      f"num_virtual_tokens + special tokens = "
                      f"{cfg['num_virtual_tokens']} + {len(specials)}.")

    import transformers

    provenance = {
        "source": "peft",
        "source_dir": str(adapter_dir.resolve()),
        "files": {PEFT_CONFIG_NAME: file_sha256(adapter_dir / PEFT_CONFIG_NAME),
                  PEFT_WEIGHTS_NAME: file_sha256(weights)},
        "peft_version": peft.__version__,
        "adapter_peft_version": cfg.get("peft_version"),
        "transformers_version": transformers.__version__,
        "peft_type": peft_type,
        "task_type": cfg.get("task_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "num_virtual_tokens": cfg["num_virtual_tokens"],
        "query_special_tokens": query_special_tokens,
    }
    for key in ("prefix_projection", "encoder_reparameterization_type", "num_tasks",
                "prompt_tuning_init"):
        if key in cfg:
            provenance[key] = cfg[key]
    if task_id is not None:
        provenance["task_id"] = task_id
    return make_adapter(model_name, fingerprint, PEFT_METHODS[peft_type], keys, values,
                        prefix_special_ids=specials, provenance=provenance, dtype=dtype,
                        build_args=build_args or {})
