# imgembed's image: dispatcher, workers and migrations. CPU by default; the GPU worker in
# docker-compose.yml runs the same image with an NVIDIA device reserved (torch's wheel ships CUDA).

# Stage 1: the wheel, built from the source tree.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY imgembed ./imgembed
COPY worker ./worker
COPY schema ./schema
COPY migrations ./migrations
COPY sql ./sql
COPY analysis ./analysis
COPY training ./training
COPY bench ./bench
COPY examples ./examples
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the wheel installed (not the source tree), with what workers and clustering need.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/imgembed-*.whl)[worker,analysis]" && rm -rf /wheels
# /models is the model directory: a new volume mounted there takes its owner, so workers may keep
# pulled weights and ONNX exports in it.
RUN useradd --create-home imgembed && mkdir /models && chown imgembed /models
USER imgembed
WORKDIR /home/imgembed
ENTRYPOINT ["imgembed"]
CMD ["--help"]
