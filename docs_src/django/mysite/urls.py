"""The two views of the project."""

from django.urls import path

from mysite import views

urlpatterns = [
    path("reports/<int:year>", views.report),
    path("sync-reports/<int:year>", views.sync_report),
]
