"""The web console: three server-rendered pages on one layout, and one small script, at `/`.

The pages hold no secrets and no server state: the browser keeps the API key the person typed
and calls the same public API as any other client.
"""

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from services.gateway.security_headers import console_policy

HERE = Path(__file__).parent

router = APIRouter(include_in_schema=False)
assets = StaticFiles(directory=HERE / "static")
templates = Jinja2Templates(directory=HERE / "templates")


def _page(request: Request, template: str) -> HTMLResponse:
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": console_policy(request.app.state.settings)}
    return templates.TemplateResponse(request, template, headers=headers)


@router.get("/", response_class=HTMLResponse)
async def semi_auto_page(request: Request) -> HTMLResponse:
    return _page(request, "semi_auto.html")


@router.get("/automatic", response_class=HTMLResponse)
async def automatic_page(request: Request) -> HTMLResponse:
    return _page(request, "automatic.html")


@router.get("/groups", response_class=HTMLResponse)
async def groups_page(request: Request) -> HTMLResponse:
    return _page(request, "groups.html")
