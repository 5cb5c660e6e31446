"""Table names and schemas the pipeline writes, from the project's one topology description.

``iotbridge/spec.py`` is pure data (no cloud client, no Pulumi); the Flex Template image copies it next to this
package (see ``Dockerfile``), so launcher and workers read the same table definitions as the Pulumi program
that creates the tables.
"""

from __future__ import annotations

from iotbridge.spec import BIGTABLE, TABLES, TableSpec

RAW = "telemetry_raw"
MINUTE = "telemetry_1m"
ERRORS = "telemetry_errors"
BIGTABLE_TABLE = BIGTABLE.table
BIGTABLE_FAMILIES = BIGTABLE.column_families


def table(name: str) -> TableSpec:
    return TABLES[name]
