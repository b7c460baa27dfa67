"""Services for when the user set none: an embedded PostgreSQL with pgvector and a private Redis
(install ``imgembed[local]``), and the stack that ``imgembed up`` runs on them."""
