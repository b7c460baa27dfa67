"""imgembed's workers: the Celery tasks, reading and decoding images, and the embedding models.
The only part of imgembed that imports torch (install ``imgembed[worker]``)."""
