"""``/v1/models``: the served models and their aliases, in OpenAI's shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from kontext.settings import Settings
from producers.api.auth import Caller
from producers.api.errors import error_response
from producers.api.state import ApiState, state
from schemas.api import ApiError, ErrorBody
from schemas.openai import Model, ModelList

router = APIRouter(prefix="/v1/models", tags=["openai"])


def served(settings: Settings) -> list[Model]:
    """Each served engine (``KONTEXT_ENGINES``), then each alias of one
    (``KONTEXT_MODEL_ALIASES``), its ``root`` the engine that answers it."""
    models = [Model(id=engine, root=engine) for engine in settings.engines]
    models += [
        Model(id=alias, root=target)
        for alias, target in settings.model_aliases.items()
        if target in settings.engines and alias not in settings.engines
    ]
    return models


@router.get("", response_model=ModelList, responses={401: {"model": ErrorBody}})
async def list_models(api: Annotated[ApiState, Depends(state)], principal: Caller) -> ModelList:
    """The models a chat completion or a job may name."""
    return ModelList(data=served(api.settings))


@router.get(
    "/{model_id}",
    response_model=Model,
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def retrieve_model(
    model_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> Model | Response:
    """One served model or alias; 404 ``model_not_found`` otherwise."""
    models = served(api.settings)
    for model in models:
        if model.id == model_id:
            return model
    return error_response(
        404,
        ApiError(
            code="model_not_found",
            message=f"model {model_id!r} is not served here",
            param="model",
            served_models=[m.id for m in models],
        ),
    )
