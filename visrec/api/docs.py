"""The API's docs pages (Swagger UI at /docs, ReDoc at /redoc) with their scripts served from here: FastAPI's
own pages load them from a CDN, and were blank on a machine without internet (a service behind a
firewall, this project's own machine). The scripts are those the `fastapi-offline` package ships (Swagger
UI 5, which reads OpenAPI 3.1); it is read as files, never imported."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html

STATIC = "/docs/static"
ASSETS = {  # the only files served: a name is looked up here, never joined to a path
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico"} | {f"{STATIC}/{name}" for name in ASSETS}

router = APIRouter(include_in_schema=False)


@cache
def _folder() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:  # a declared dependency: only a broken install lacks it
        raise HTTPException(404, "the docs pages' scripts are not installed (the fastapi-offline package)")
    return Path(spec.origin).parent / "static"


@router.get("/docs")
def swagger(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="visrec API",
        swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC}/favicon.png",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
    )


@router.get("/docs/oauth2-redirect")
def oauth2_redirect() -> Response:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title="visrec API",
        redoc_js_url=f"{root}{STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{STATIC}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/favicon.ico")
def favicon() -> Response:  # browsers ask for it on every page, the gallery's too: no key, no 401 in the log
    return asset("favicon.png")


@router.get(STATIC + "/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "no such file")
    return Response(
        (_folder() / name).read_bytes(),
        media_type=ASSETS[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )
