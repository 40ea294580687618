"""Django's URLconf for the replay-fidelity suite: async views at /, sync views at /sync/."""

from __future__ import annotations

from typing import Any

from django.urls import include, path

from .frameworks import django_views


def _patterns(asynchronous: bool) -> list[Any]:
    views = django_views(asynchronous)
    return [
        path("items/<str:name>", views["items"], name="items"),
        path("state", views["state"]),
        path("missing", views["missing"]),
        path("boom", views["boom"]),
        path("redirect", views["redirect"]),
        path("stream", views["stream"]),
        path("binary", views["binary"]),
        path("where", views["where"], name="where"),
        path("vary-star", views["vary_star"]),
    ]


urlpatterns = [
    path("", include((_patterns(asynchronous=True), "async"))),
    path("sync/", include((_patterns(asynchronous=False), "sync"))),
]
