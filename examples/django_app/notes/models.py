"""The example's one model."""

from django.db import models


class Note(models.Model):
    body = models.TextField()

    class Meta:
        db_table = "poolkit_example_note"
