# imgembed's image: dispatcher, workers and migrations. CPU by default; the GPU worker in
# docker-compose.yml runs the same image with an NVIDIA device reserved (torch's wheel ships CUDA).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schema ./schema
COPY migrations ./migrations
COPY sql ./sql
RUN pip install -e .
RUN useradd --create-home imgembed
USER imgembed
ENTRYPOINT ["imgembed"]
CMD ["--help"]
