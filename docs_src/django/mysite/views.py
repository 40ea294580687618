"""A slow report, as an async view and as a sync one: the worker runs both."""

import asyncio
import time

from django.http import HttpRequest, JsonResponse


async def report(request: HttpRequest, year: int) -> JsonResponse:
    """The report of `year`: run by the worker, never by the web app."""
    await asyncio.sleep(1)  # stands for the slow part: queries, a computation
    return JsonResponse({"year": year, "total": sum(range(year))})


def sync_report(request: HttpRequest, year: int) -> JsonResponse:
    """The same report from a sync view (Django runs it in a thread under ASGI)."""
    time.sleep(1)  # stands for the slow part: ORM queries, a computation
    return JsonResponse({"year": year, "total": sum(range(year))})
