# promptmill on Ray 2.60: the image the KubeRay manifests and cluster nodes run (head and workers alike).
#   docker build -t registry.example.com/my-org/promptmill:0.1.0-gpu --build-arg VARIANT=gpu .    # CUDA torch, rayproject/ray:...-gpu
#   docker build -t registry.example.com/my-org/promptmill:0.1.0-cpu .                            # CPU torch (the default)
# The project is installed from this checkout with its shipped checkpoints (/app/models/checkpoints) and the diffusers
# extra, on Ray's own image (same Ray and Python as the cluster: Ray Jobs needs them equal on every node).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}

ARG VARIANT
ARG TORCH_VERSION=2.13.0
# CPU: the CPU-only wheels (no CUDA libraries, ~10x smaller); GPU: PyPI's default CUDA build
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# Ray's image runs as user ray (its Python lives in ray's home); /app is made ray's before the editable install
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users promptmill ./promptmill
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users models ./models
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users examples ./examples
# the shipped checkpoints are package data of models (/app/models/checkpoints; specs name them shipped:NAME)
RUN pip install --no-cache-dir -e ".[diffusers]" && promptmill --help >/dev/null

ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
USER ray
