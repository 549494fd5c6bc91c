"""``manage.py notes_demo``: write and stream notes through the pooled alias; print what happened as JSON."""

import json
from typing import Any

from django.core.management.base import BaseCommand
from django.db import connections, transaction

from notes.models import Note


class Command(BaseCommand):
    help = "create notes and read them back with .iterator() through the pooled connection"

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            Note.objects.bulk_create(Note(body=f"note {i}") for i in range(5))
        # .iterator() would DECLARE a server-side cursor; DISABLE_SERVER_SIDE_CURSORS makes it a plain query.
        bodies = [n.body for n in Note.objects.order_by("id").iterator(chunk_size=2)]
        for _ in range(10):  # enough repeats that psycopg would prepare the statement if it were allowed to
            Note.objects.filter(body="note 0").count()
        conn = connections["default"]
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_prepared_statements")
            prepared = cur.fetchone()[0]
        self.stdout.write(
            json.dumps(
                {
                    "bodies": bodies,
                    "pooled": bool(conn.settings_dict["OPTIONS"].get("pool")),
                    "server_side_cursors": not conn.settings_dict["DISABLE_SERVER_SIDE_CURSORS"],
                    "prepared_statements": prepared,
                    "port": conn.settings_dict["PORT"],
                }
            )
        )
