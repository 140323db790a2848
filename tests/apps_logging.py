"""An app that takes over logging as it loads, as frameworks do for a server of their own
(Litestar replaces the root's handlers; a ``dictConfig`` disables the loggers it does not
name); its endpoint logs a line of its own. Only the worker imports it: in the test process
it would take over pytest's logging too."""

import logging
import logging.config

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from async_task_middleware import AsyncTaskMiddleware
from tests.worker import celery_app

logging.config.dictConfig(
    {
        "version": 1,
        "disable_existing_loggers": True,
        "handlers": {"nowhere": {"class": "logging.NullHandler"}},
        "root": {"handlers": ["nowhere"], "level": "WARNING"},
    }
)
logger = logging.getLogger("tests.endpoint")


async def log(request: Request) -> PlainTextResponse:
    logger.warning("endpoint line %s", request.query_params["key"])
    return PlainTextResponse("logged")


app = AsyncTaskMiddleware(
    Starlette(routes=[Route("/log", log, methods=["POST"])]),
    celery_app=celery_app,
    routes=["POST /log"],
    name="takes-logging",
)
