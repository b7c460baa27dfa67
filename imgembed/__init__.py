"""imgembed: image embeddings for PostgreSQL, computed by Celery workers with OpenCLIP."""

__version__ = "0.2.0"
