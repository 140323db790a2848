"""Word count on Django (ASGI), in one file: the settings, the view, the URL and the wrap.

Django's ASGI handler is wrapped like any ASGI app, with CORS outside the middleware. Django
has no lifespan: the middleware passes it on, Django refuses it, and the server and the worker
each note that once, quietly, and go on.
"""

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="the word-count example; Django signs nothing here",  # noqa: S106
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402
from starlette.middleware.cors import CORSMiddleware  # noqa: E402

from async_task_middleware import AsyncTaskMiddleware  # noqa: E402
from examples.wordcount.counting import word_count  # noqa: E402
from examples.wordcount.worker import CORS, PROTECTION, celery_app  # noqa: E402


@csrf_exempt
@require_POST
def count_words(request: HttpRequest) -> JsonResponse:
    text = request.FILES.get("text")
    if text is None:
        return JsonResponse({"detail": "a file field 'text' is required"}, status=422)
    return JsonResponse({"count": word_count(text.read().decode())})


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


urlpatterns = [path("words", count_words), path("health", health)]

django_app = get_asgi_application()
app = CORSMiddleware(
    AsyncTaskMiddleware(
        django_app,
        celery_app=celery_app,
        routes=["POST /words"],
        name="wordcount-django",
        **PROTECTION,
    ),
    **CORS,
)
