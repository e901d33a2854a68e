"""The business units' chat pages: GET /chat lists the assistants the caller's key may use, GET
/chat/{adapter_id} is one assistant's page. Plain HTML, CSS and JavaScript (`static/`), no build step; the
page streams its answers from /v1/chat/completions and keeps the conversation in the browser. With keys on,
a browser without one gets the key form first (server/auth.py, static/auth.js).
"""

from __future__ import annotations

import html
import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from lorax_lite.server.pages import CHAT_HTML, page
from lorax_lite.server.state import ServerState

router = APIRouter()


@router.get("/chat", response_class=HTMLResponse)
async def assistants(request: Request) -> HTMLResponse:
    """Every adapter (and the base model) the caller's key may use, as a card linking to its chat page."""
    state: ServerState = request.app.state.server
    cards = [_card(a.adapter_id, a.record.description, a.record.owner) if a.record
             else _card(a.adapter_id, "added by path", "")
             for a in await state.list_adapters(request)]
    if state.may_use_base_model(request):
        cards.append(_card(state.served_model_name, "the base model, without an adapter", ""))
    body = ('<h1>Assistants</h1><p class="lead">One assistant per business unit, all served by one base model.</p>'
            f'<ul class="cards">{"".join(cards)}</ul>')
    return page("Assistants", body)


def _card(adapter_id: str, description: str, owner: str) -> str:
    owner_line = f'<span class="owner">{html.escape(owner)}</span>' if owner else ""
    return (f'<li><a class="card" href="/chat/{html.escape(adapter_id)}"><strong>{html.escape(adapter_id)}</strong>'
            f'{owner_line}<span>{html.escape(description)}</span></a></li>')


@router.get("/chat/{adapter_id}", response_class=HTMLResponse)
async def chat_page(adapter_id: str, request: Request) -> HTMLResponse:
    """The chat page for one assistant; an invalid or unknown id (or one the key may not use) is a 404 page that
    links back, the base model without the key's permission a 403 page."""
    state: ServerState = request.app.state.server
    description = ""
    if state.is_base_model(adapter_id) and not state.may_use_base_model(request):
        body = ('<h1>The base model is not available to this key</h1>'
                '<p>Chat with one of its assistants instead. <a href="/chat">See the assistants</a>.</p>')
        return page("Not available", body, status=403)
    if not state.is_base_model(adapter_id):
        adapter = await state.find_adapter(request, adapter_id)
        if adapter is None:
            body = (f'<h1>No assistant called {html.escape(adapter_id)}</h1>'
                    '<p>It is not registered on this server. <a href="/chat">See the assistants</a>.</p>')
            return page("Unknown assistant", body, status=404)
        description = adapter.record.description if adapter.record else ""
    config = {"model": adapter_id, "description": description}
    body = CHAT_HTML.replace("{{name}}", html.escape(adapter_id)).replace(
        "{{config}}", html.escape(json.dumps(config), quote=True))
    return page(f"{adapter_id} assistant", body)
