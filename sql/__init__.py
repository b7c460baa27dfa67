"""imgembed's SQL, as package data: idempotent definitions (functions, views, roles and grants),
one concern a file, applied in name order at every upgrade to the newest revision."""
