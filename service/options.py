"""Pruning options from a request, checked at submit time by the library itself.

Nothing here lists the options: names, types and rules come from `PruneConfig` (its fields for
coercing query-string text, `PruneConfig.from_dict` for unknown names and ranges), so an option
the library adds is accepted by the API the day it lands. The only others are the MLflow job
options (`source`, `register_as`), which the worker strips before pruning (`split`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import fields
from functools import cache
from typing import Any, get_origin, get_type_hints

from pydantic import TypeAdapter, ValidationError

from graphprune import mlflow_io
from graphprune.config import PruneConfig
from graphprune.errors import GraphpruneError
from service.problems import Problem
from service.settings import ENV_PREFIX, Settings

CONFIG_PARAM = "config"  # a JSON object of options; single options given beside it win
# Options that name files on the machine that runs the job: a client must not point at the server's.
SERVER_PATH_OPTIONS = frozenset({"calibration"})
SOURCE = "source"  # an MLflow model URI to prune instead of an upload; only in a JSON body
REGISTER_AS = "register_as"  # register the pruned model in MLflow as a new version of this name
JOB_OPTIONS = frozenset({SOURCE, REGISTER_AS})  # job options that are not PruneConfig fields
# A job's recovery trains for at most this share of the job timeout, so it stops with a result (the best
# checkpoint, or the one-shot model) instead of being killed at the timeout with none.
RECOVER_SHARE = 0.5
CAPS = {"max_model_bytes": "max_model_bytes", "samples": "max_samples", "latency_runs": "max_latency_runs",
        "obs_memory": "max_obs_memory"}
MAX_JSON_CHARS, MAX_JSON_DEPTH = 1 << 16, 8  # client JSON (config, mapping options): size and nesting


@cache
def _types() -> dict[str, Any]:
    hints = get_type_hints(PruneConfig)
    return {f.name: hints[f.name] for f in fields(PruneConfig)}


@cache
def _adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(_types()[name])


def parse(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Options from NAME=VALUE text (query string, form fields), `config` being a JSON object of them."""
    texts: dict[str, list[str]] = {}
    for name, value in pairs:
        texts.setdefault(name, []).append(value)
    configs = texts.pop(CONFIG_PARAM, [])
    if len(configs) > 1:
        raise Problem(422, f"{CONFIG_PARAM!r} was given {len(configs)} times; give one JSON object")
    options = _config_object(configs[0]) if configs and configs[0].strip() else {}
    options.update({name: _from_text(name, values) for name, values in texts.items()})
    if SOURCE in options:
        raise Problem(422, f"{SOURCE!r} names the model to prune: send it in a JSON body "
                           '(Content-Type: application/json, {"source": "models:/NAME/VERSION"}), not beside a model')
    return validate(options)


def parse_json(pairs: Iterable[tuple[str, str]], text: bytes) -> dict[str, Any]:
    """Options of a JSON body: `source` (required), `register_as`, `config` and single options.
    Query parameters win over the body, as single options win over `config`."""
    body = _config_object(text.decode("utf-8", "replace"), "the JSON body")
    config = body.pop(CONFIG_PARAM, {})
    if not isinstance(config, dict):
        raise Problem(422, f"{CONFIG_PARAM!r} in the JSON body must be an object of options")
    if SOURCE not in body:
        raise Problem(422, f"a JSON body names an MLflow model to prune: {{{SOURCE!r}: \"models:/NAME/VERSION\"}}; "
                           "upload a model as application/octet-stream or multipart/form-data instead")
    query = parse(pairs)
    return validate({**config, **body, **query})


def capped(options: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The options a job runs with under the server's caps (`Settings.max_*`; recovery time at most
    RECOVER_SHARE of the job timeout). Asking for more is a 422 naming the cap; an option left unset
    gets the cap where the library's default is higher. The job's options show what it runs under."""
    out, defaults = dict(options), PruneConfig()
    caps = [(option, getattr(settings, setting), f"{ENV_PREFIX}{setting.upper()}") for option, setting in CAPS.items()]
    if out.get("recover", "none") != "none":
        caps.append(("recover_time", round(settings.job_timeout_s * RECOVER_SHARE, 3),
                     f"{RECOVER_SHARE:g} of {ENV_PREFIX}JOB_TIMEOUT_S"))
    for option, cap, source in caps:
        asked = out.get(option)
        if asked is not None and asked > cap:
            raise Problem(422, f"{option} {asked:,} is over this server's limit of {cap:,} ({source}); "
                               f"ask for {cap:,} or less")
        unlimited = option == "recover_time" and not asked  # 0 (the default) means "no limit"
        if unlimited or (asked is None and getattr(defaults, option) > cap):
            out[option] = cap
    for name, shape in out.get("input_shapes", {}).items():
        if math.prod(shape) > settings.max_input_values:
            raise Problem(422, f"input_shapes[{name!r}] = {shape} has {math.prod(shape):,} elements, over this "
                               f"server's limit of {settings.max_input_values:,} ({ENV_PREFIX}MAX_INPUT_VALUES)")
    return out


def split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's options → (the PruneConfig options, the MLflow job options)."""
    return ({k: v for k, v in options.items() if k not in JOB_OPTIONS},
            {k: v for k, v in options.items() if k in JOB_OPTIONS})


def validate(options: dict[str, Any]) -> dict[str, Any]:
    """Coerce to the option types and run the library's checks; 422 names what is wrong."""
    forbidden = sorted(SERVER_PATH_OPTIONS & set(options))
    if forbidden:
        raise Problem(422, f"option(s) {', '.join(forbidden)} name files on the server and cannot be set "
                           "through the API")
    config, job = split(options)
    types = _types()
    coerced: dict[str, Any] = {}
    for name, value in config.items():
        if name not in types:
            coerced[name] = value  # left for from_dict, which names every unknown option
            continue
        try:
            coerced[name] = _adapter(name).validate_python(value)
        except ValidationError as exc:
            msg = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            raise Problem(422, f"option {name!r}: {msg} (got {value!r})") from None
    try:
        PruneConfig.from_dict(coerced)
    except GraphpruneError as exc:
        raise Problem(422, str(exc)) from None
    return {**coerced, **_job_options(job)}


def _job_options(job: dict[str, Any]) -> dict[str, Any]:
    """`source` and `register_as` checked by pattern, and only accepted when this server can use MLflow."""
    if not job:
        return {}
    for name, value in job.items():
        if not isinstance(value, str):
            raise Problem(422, f"option {name!r} must be a string, got {value!r}")
    try:
        if SOURCE in job:
            mlflow_io.check_uri(job[SOURCE])
        if REGISTER_AS in job:
            mlflow_io.check_name(job[REGISTER_AS])
    except GraphpruneError as exc:
        raise Problem(422, str(exc)) from None
    reason = mlflow_io.unavailable_reason()
    if reason:
        raise Problem(422, f"option(s) {', '.join(sorted(job))} need MLflow, and {reason}")
    return job


def _json(text: str, what: str) -> Any:
    """JSON from a client, bounded in size and depth: the decoder recurses per level, so a deep enough
    document would otherwise end the request in a RecursionError (a 500)."""
    if len(text) > MAX_JSON_CHARS:
        raise Problem(422, f"{what} is {len(text):,} characters of JSON; options fit in {MAX_JSON_CHARS:,}")
    too_deep = Problem(422, f"{what} nests deeper than {MAX_JSON_DEPTH} levels; options nest 3 at most "
                            '(e.g. {"input_shapes": {"x": [1, 3, 224, 224]}})')
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Problem(422, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    pending = [(value, 1)]
    while pending:  # iteratively: a recursive walk could hit the same limit
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return value


def _config_object(text: str, what: str = repr(CONFIG_PARAM)) -> dict[str, Any]:
    value = _json(text, what)
    if not isinstance(value, dict):
        raise Problem(422, f"{what} must be a JSON object of options, got {type(value).__name__}")
    return value


def _from_text(name: str, values: list[str]) -> Any:
    """Text as the option's type expects it: lists repeat the parameter, mappings are JSON."""
    kind = get_origin(_types().get(name))
    if kind is list:
        return values
    if len(values) > 1:
        raise Problem(422, f"option {name!r} was given {len(values)} times; give it once")
    if kind is dict:
        return _json(values[0], f"option {name!r}")
    return values[0]


def openapi_parameters() -> list[dict[str, Any]]:
    """Query parameters for every settable option, derived from PruneConfig."""
    params: list[dict[str, Any]] = [{
        "name": CONFIG_PARAM, "in": "query", "required": False,
        "description": "JSON object of options; the single options below override its keys",
        "schema": {"type": "string"},
    }]
    defaults = PruneConfig()
    for name, hint in _types().items():
        if name in SERVER_PATH_OPTIONS:
            continue
        default = getattr(defaults, name)
        if get_origin(hint) is dict:
            schema = {"type": "string", "description": "a JSON object", "default": json.dumps(default)}
        else:
            schema = {**_adapter(name).json_schema(), "default": default}
        params.append({"name": name, "in": "query", "required": False, "schema": schema})
    params.append({"name": REGISTER_AS, "in": "query", "required": False, "description": (
        "register the pruned model in the server's MLflow registry as a new version of this name "
        "(422 when the server has no MLflow store configured)"),
        "schema": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": mlflow_io.NAME_PATTERN}})
    return params
