"""Settings of the example project: DATABASES comes from poolkit (pooled URL + a direct alias for migrations)."""

from poolkit.integrations.django import databases

SECRET_KEY = "example-only-not-secret"  # noqa: S105 - an example project, never deployed
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django.contrib.contenttypes", "notes"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# POOLKIT_POOLED_URL (the transaction pooler) -> "default"; POOLKIT_DIRECT_URL -> "direct" (migrations).
DATABASES = databases(application_name="django-example")
