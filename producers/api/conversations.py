"""``/v1/conversations``: read a conversation's memory, or forget it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Response

from kontext.store import memory
from producers.api.auth import Caller
from producers.api.state import ApiState, state
from schemas.api import CONVERSATION_ID_PATTERN, ConversationView, ErrorBody

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

ConversationId = Annotated[str, Path(pattern=CONVERSATION_ID_PATTERN)]


@router.get(
    "/{conversation_id}", response_model=ConversationView, responses={404: {"model": ErrorBody}}
)
async def get_conversation(
    conversation_id: ConversationId, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> ConversationView:
    """The stored turns and summaries of one of the tenant's conversations."""
    found = await memory.conversation(api.pool, conversation_id, principal.tenant_id)
    if found is None:
        raise HTTPException(404, f"no conversation {conversation_id}")
    return ConversationView.model_validate(found)


@router.delete("/{conversation_id}", status_code=204, responses={404: {"model": ErrorBody}})
async def delete_conversation(
    conversation_id: ConversationId, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> Response:
    """Forget one of the tenant's conversations: its turns, embeddings, summaries and jobs."""
    if not await memory.forget(api.pool, conversation_id, principal.tenant_id):
        raise HTTPException(404, f"no conversation {conversation_id}")
    return Response(status_code=204)
